"""KV-cache generation: greedy output equals transformers' `generate()` on the exported model token for
token (batches of prompts of different lengths, stop at EOD), sampling filters equal transformers'
warpers, and the sequence-parallel prefill + per-head decode equals one process (about 6 s)."""

import pytest
import torch

from megatron.checkpoint.hf import to_hf
from megatron.config import ConfigError
from megatron.core import parallel_state as ps
from megatron.inference import Generator, SamplingConfig, filter_logits
from tests.conversion.tiny import tiny_model
from tests.utils import rel_err
from tools.checkpoint.convert_to_hf import write_hf_directory

transformers = pytest.importorskip("transformers")
PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120, 7], [64, 2, 2, 31], [11, 90, 4, 77, 6, 19, 23]]
NEW = 10

VARIANTS = {
    # Llama with GQA and dynamic NTK: positions beyond the original context while decoding
    "llama-dynamic": ("llama", dict(rope_scaling_type="dynamic", rope_scaling_factor=2.0,
                                    original_max_position_embeddings=12, max_position_embeddings=12)),
    "llama-yarn": ("llama", dict(rope_scaling_type="yarn", rope_scaling_factor=4.0,
                                 original_max_position_embeddings=8)),
    "gpt2-tanh": ("gpt3", dict(activation="gelu_tanh")),
    "neox-partial": ("gpt3", dict(position_embedding_type="rope", rotary_percent=0.5)),
}


def hf_generate(model, tmp_path, prompts, eos=None, **kw):
    """transformers' generate() on the exported model, left-padded batch; new tokens per prompt."""
    hf_sd, hf_config = to_hf(model.state_dict(), model.config)
    hf_config["eos_token_id"] = eos
    write_hf_directory(str(tmp_path), hf_sd, hf_config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                      pad_token_id=eos if eos is not None else 0, **kw)[:, width:]
    rows = []
    for row in out.tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_transformers_generate_and_stops_at_eod(variant, tmp_path):
    family, kw = VARIANTS[variant]
    model = tiny_model(family, seed=1, **kw)
    gen = Generator(model)
    ours = gen.generate(PROMPTS, NEW).tokens
    assert ours == hf_generate(model, tmp_path / "a", PROMPTS), variant
    assert all(len(r) == NEW for r in ours)
    # stop at the end-of-document token: pick one that greedy decoding produces mid-way in row 0
    eod = ours[0][4]
    stopped = gen.generate(PROMPTS, NEW, eod_id=eod).tokens
    assert stopped[0][-1] == eod and len(stopped[0]) <= 5
    assert stopped == hf_generate(model, tmp_path / "b", PROMPTS, eos=eod)


def test_sampling_filters_equal_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for cfg in (SamplingConfig(0.7, 5, 1.0), SamplingConfig(1.3, 0, 0.8), SamplingConfig(0.9, 10, 0.6)):
        ref = logits.clone()
        for warper in ([TemperatureLogitsWarper(cfg.temperature)] + ([TopKLogitsWarper(cfg.top_k)] if cfg.top_k else [])
                       + ([TopPLogitsWarper(cfg.top_p)] if cfg.top_p < 1 else [])):
            ref = warper(None, ref)
        assert torch.equal(filter_logits(logits, cfg), ref)
    with pytest.raises(ConfigError, match="--top-p"):
        SamplingConfig(1.0, 0, 0.0)


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("llama", seed=2)
    gen = Generator(model)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    a, b = gen.generate(PROMPTS, NEW, cfg, seed=5), gen.generate(PROMPTS, NEW, cfg, seed=5)
    assert a.tokens == b.tokens and a.tokens != gen.generate(PROMPTS, NEW, cfg, seed=6).tokens
    # every sampled first token is among the 3 most likely
    top3 = a.first_logits.topk(3).indices
    assert all(row[0] in top3[i].tolist() for i, row in enumerate(a.tokens))


# ------------------------------------------------------------------ sequence-parallel prefill


def _sp_generation(kv_heads):
    state = ps.initialize_model_parallel(sequence_parallel_size=2)
    model = tiny_model("llama", seed=3, num_query_groups=kv_heads, rope_scaling_type="yarn", rope_scaling_factor=2.0,
                       original_max_position_embeddings=8)
    prompts = [list(range(3, 40)), [9, 8, 7, 6, 5]]  # 37 tokens: not a multiple of the SP size
    single = Generator(model).generate(prompts, NEW)
    gen = Generator(model, state)
    mine = gen.generate(prompts, NEW)
    sampled = [g.generate(prompts, NEW, SamplingConfig(0.8, 20, 0.9), seed=4).tokens for g in (Generator(model), gen)]
    heads = (len(gen.q_heads), len(gen.kv_heads))
    return mine.tokens == single.tokens, rel_err(mine.first_logits, single.first_logits), sampled[0] == sampled[1], heads


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sp_prefill_and_per_head_decode_equal_one_process(ranks, kv_heads):
    """Each rank keeps the K/V of its heads only (after the all-to-all): with 2 K/V heads on 2 ranks
    the cache is halved; with 1 K/V head it is replicated, as in training."""
    for same, err, same_sampled, heads in ranks(2, _sp_generation, kv_heads):
        assert same and same_sampled and err < 1e-5
        assert heads == (2, 1)  # of 4 query heads and (1 or 2) K/V heads


# ------------------------------------------------------------------ the tool


def _checkpoint(tmp_path, model, vocab_ids=127):
    """A DCP checkpoint as training leaves it, with the run config (tokenizer) in config.json."""
    from tools.checkpoint.convert_to_torch import save_dcp_checkpoint

    data = {"tokenizer_type": "NullTokenizer", "vocab_size": vocab_ids, "seq_length": 32}
    save_dcp_checkpoint(str(tmp_path / "ckpt"), model.state_dict(), model.config, iteration=3,
                        run_config={"data": data})
    return str(tmp_path / "ckpt")


def _tool_on_ranks(argv):
    from tools.generate import build_parser, run

    return run(build_parser().parse_args(argv))


def test_generate_tool_single_process_and_sp(ranks, tmp_path, capsys):
    from tools.generate import main

    model = tiny_model("llama", seed=1)
    ckpt = _checkpoint(tmp_path, model)
    expected = Generator(model).generate(PROMPTS, NEW, eod_id=127).tokens
    argv = ["--load", ckpt, "--max-new-tokens", str(NEW)]
    for p in PROMPTS:
        argv += ["--prompt-ids", " ".join(map(str, p))]
    assert main(argv + ["--output-json", str(tmp_path / "out.json")]) == 0
    import json

    report = json.loads((tmp_path / "out.json").read_text())
    assert report["eod_id"] == 127 and [r["new_ids"] for r in report["results"]] == expected
    assert report["results"][0]["text"] == " ".join(map(str, expected[0]))  # NullTokenizer text: the ids
    # text prompts go through the checkpoint's tokenizer
    assert main(["--load", ckpt, "--prompt", "5 17 99", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("[0] ")
    # under torchrun (here: the rank pool) every rank joins one SP group; same tokens
    for rep in ranks(2, _tool_on_ranks, argv):
        assert rep["sequence_parallel_size"] == 2 and [r["new_ids"] for r in rep["results"]] == expected
    assert main(["--load", ckpt]) == 2
    assert "pass at least one --prompt" in capsys.readouterr().err
