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
