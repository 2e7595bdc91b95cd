"""tools/estimate_memory.py: pretrain_gpt.py's flags in, breakdown + verdict + longest N out.

Runs in-process (no torch work, ~1 s after imports).
"""

from __future__ import annotations

import json
import re

import pytest

from megatron.config import ModelConfig
from megatron.planning.memory_estimate import GIB, estimate_memory, largest_seq_length, sequence_granularity
from tools.estimate_memory import main

# the model flags of examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh
GPT_1_3B = ("--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 32768 "
            "--max-position-embeddings 32768 --init-method-std 0.013 --ds-sequence-parallel-size 4 "
            "--zero-stage 1 --micro-batch-size 1 --global-batch-size 2 --train-tokens 300000000000 "
            "--lr 2e-4 --min-lr 1e-6 --lr-decay-style cosine --bf16 --use-flash-attn-v2 "
            "--checkpoint-activations --mock-data --vocab-size 50257").split()


def run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_script_flags_give_breakdown_verdict_and_longest_sequence(capsys):
    code, out, _ = run(capsys, GPT_1_3B + ["--world-size", "4", "--gpu-memory-gb", "80"])
    assert code == 0
    for label in ("parameters", "gradients", "optimizer state", "activations kept for backward (full)",
                  "no recompute", "logits + loss", "all-to-all buffers", "attention workspace"):
        assert label in out
    assert "-> FITS" in out and "SP 4 x DP 1 | ZeRO-1 over 4 | bf16 | flash-attn | recompute full" in out
    longest = int(re.search(r"longest sequence that fits with these settings: ([\d,]+)", out)[1].replace(",", ""))
    assert longest > 32768 and longest % 4 == 0


def test_verdict_and_longest_sequence_agree_with_the_library(capsys):
    code, out, _ = run(capsys, GPT_1_3B + ["--world-size", "4", "--gpu-memory-gb", "40", "--json"])
    data = json.loads(out)
    assert code == 0 and data["fits"] == (data["peak"] <= data["budget_bytes"])
    assert data["budget_bytes"] == 38 * GIB  # 40 GiB minus the default 2 GiB reserve
    cfg = ModelConfig.gpt3(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=50304,
                           max_position_embeddings=32768, init_method_std=0.013)
    settings = dict(sequence_parallel_size=4, zero_stage=1, precision="bf16", autocast_weight_cache=False,
                    attention_backend="flash-attn", recompute_granularity="full")
    assert data["peak"] == estimate_memory(cfg, 32768, **settings)["peak"]
    n = data["largest_seq_length"]
    assert n == largest_seq_length(cfg, 38 * GIB, **settings)
    grown = lambda k: cfg.replace(max_position_embeddings=k)  # noqa: E731
    assert estimate_memory(grown(n), n, **settings)["peak"] <= 38 * GIB
    assert estimate_memory(grown(n + 4), n + 4, **settings)["peak"] > 38 * GIB


def test_does_not_fit_is_reported(capsys):
    argv = ("--num-layers 64 --hidden-size 6144 --num-attention-heads 64 --seq-length 32768 "
            "--max-position-embeddings 32768 --ds-sequence-parallel-size 4 --zero-stage 0 --bf16 "
            "--use-flash-attn-v2 --checkpoint-activations --world-size 4").split()
    code, out, _ = run(capsys, argv)
    assert code == 0 and "DOES NOT FIT" in out


def test_sweep_table(capsys):
    code, out, _ = run(capsys, GPT_1_3B + ["--world-size", "8", "--sweep-seq", "32768,65536,1002"])
    assert code == 0
    assert re.search(r"\| 32,768 \| 8,192 \|", out) and re.search(r"\| 65,536 \| 16,384 \|", out)
    assert "not a multiple of 4" in out


def test_world_size_sources(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    _, out, _ = run(capsys, GPT_1_3B + ["--nnodes", "2", "--gpus-per-node", "8", "--global-batch-size", "4"])
    assert "16 ranks = SP 4 x DP 4" in out
    code, _, err = run(capsys, GPT_1_3B + ["--world-size", "8", "--num-gpus", "4"])
    assert code == 2 and "disagree" in err
    _, out, _ = run(capsys, GPT_1_3B)
    assert "4 ranks = SP 4 x DP 1" in out and "no world size given" in out


def test_launch_script_dry_run_words_are_skipped(capsys, monkeypatch):
    """A script's DRY_RUN path calls `$PYTHON pretrain_gpt.py --dry-run FLAGS` with WORLD_SIZE set."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    argv = ["--gpu-memory-gb", "80", "/repo/pretrain_gpt.py", "--dry-run"] + GPT_1_3B + ["--global-batch-size", "2"]
    code, out, _ = run(capsys, argv)
    assert code == 0 and "8 ranks = SP 4 x DP 2" in out


def test_head_count_limits_ulysses_unless_rings_are_assumed(capsys):
    argv = GPT_1_3B + ["--world-size", "64"]
    argv[argv.index("--ds-sequence-parallel-size") + 1] = "64"
    code, _, err = run(capsys, argv)
    assert code == 2 and "--num-attention-heads (16) must be >= the Ulysses degree" in err
    code, out, _ = run(capsys, argv + ["--ring-attention-size", "4"])
    assert code == 0 and "SP 64 (Ulysses 16 x ring 4) x DP 1" in out
    code, _, err = run(capsys, argv + ["--ring-attention-size", "3"])
    assert code == 2 and "must divide" in err


def test_granularity():
    assert sequence_granularity(4) == 4
    assert sequence_granularity(64, 4) == 64  # N/64 tokens per rank, 2 x 4 zigzag chunks
    assert sequence_granularity(4, 4) == 8  # pure ring: two chunks per ring rank


@pytest.mark.parametrize("bad", [["--zero-stage", "5"], ["--seq-length", "1001"]])
def test_flag_errors_name_the_flag(capsys, bad):
    code, _, err = run(capsys, GPT_1_3B + ["--world-size", "4"] + bad)
    assert code == 2 and bad[0] in err


def test_longest_llama3_8b_on_one_node_is_at_least_4m_tokens(capsys):
    """The product question: Llama-3-8B on 8 x 80 GiB with every trick on."""
    code, out, _ = run(capsys, ["--longest", "--preset", "llama3-8b", "--num-gpus", "8", "--gpu-memory-gb", "80",
                                "--json"])
    data = json.loads(out)
    assert code == 0 and data["seq_length"] >= 4 * 2**20 and data["peak"] <= 78 * GIB
    assert data["host_per_node"] == 8 * data["host_activations"] > 0


def test_reference_alst_table(capsys):
    code, out, _ = run(capsys, ["--reference", "alst"])
    assert code == 0 and "arXiv:2506.13996" in out
    rows = {int(m[1]): (int(m[2].replace(",", "")), int(m[3].replace(",", "")))
            for m in re.finditer(r"^\| (\d+) \| ([\d,]+) \| ([\d,]+) \|", out, re.M)}
    assert rows[8][0] == 3_700_000 and rows[32][0] == 15_000_000 and rows[1][0] == 500_000
    assert rows[8][1] >= 4 * 2**20 and rows[32][1] > rows[8][1]


def test_longest_flags_are_a_valid_run(capsys):
    """The flags --longest prints parse as a pretrain_gpt.py run of that length (same validation)."""
    from megatron.arguments import parse_args  # noqa: PLC0415

    code, out, _ = run(capsys, ["--longest", "--preset", "llama3-8b", "--num-gpus", "8"])
    flags = re.search(r"^flags: (.*)$", out, re.M)[1].split()
    n = int(re.search(r"longest sequence: ([\d,]+) tokens", out)[1].replace(",", ""))
    model = ("--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 "
             "--group-query-attention --ffn-hidden-size 14336 --swiglu --normalization RMSNorm "
             "--use-rotary-position-embeddings --untie-embeddings-and-output-weights --disable-bias-linear "
             f"--seq-length {n} --max-position-embeddings {n} --lr 1e-4 --train-iters 1 --mock-data "
             "--vocab-size 128000 --distributed-backend nccl").split()
    cfg = parse_args(model + flags, world_size=8, padded_vocab_size=128256, check_environment=False)
    p = cfg.parallel
    assert (p.zero_stage, p.recompute_granularity, p.offload_activations) == (3, "full", True)
    assert p.projection_tiles > 1 and p.attention_head_chunks == 4 and cfg.data.seq_length == n
