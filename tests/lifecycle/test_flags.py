"""The position-encoding, GeLU and vocabulary flags -> ModelConfig, with upstream's meaning (about 1 s)."""

import pytest

from megatron.arguments import parse_args
from megatron.config import ConfigError

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 "
        "--train-iters 10 --mock-data --vocab-size 100").split()
ROPE = ["--position-embedding-type", "rope"]


def model(*extra):
    return parse_args(BASE + list(extra), world_size=1, padded_vocab_size=128).model


def error(*extra) -> str:
    with pytest.raises(ConfigError) as e:
        model(*extra)
    return str(e.value)


def test_gelu_follows_upstream():
    """Upstream's default MLP with biases runs the fused bias-GeLU kernel, i.e. the tanh approximation."""
    assert model().activation == "gelu_tanh"
    assert model("--no-bias-gelu-fusion").activation == "gelu"
    assert model("--disable-bias-linear").activation == "gelu"  # upstream turns the fusion off without biases
    assert model("--onnx-safe", "True").activation == "gelu"  # upstream: erf_gelu
    assert model("--openai-gelu", "--no-bias-gelu-fusion").activation == "gelu_tanh"
    assert model("--openai-gelu", "--disable-bias-linear").activation == "gelu_tanh"
    assert model("--swiglu").activation == "swiglu"
    assert "pass one of them" in error("--swiglu", "--openai-gelu")
    notes = parse_args(BASE, world_size=1, padded_vocab_size=128).notes
    assert any("tanh approximation" in n and "--no-bias-gelu-fusion" in n for n in notes)


def test_true_vocab_size_comes_from_the_tokenizer():
    m = parse_args(BASE, world_size=1).model  # NullTokenizer: 100 ids + EOD, padded to 128
    assert (m.vocab_size, m.true_vocab_size, m.output_vocab_size) == (128, 101, 101)
    unpadded = parse_args(BASE + ["--make-vocab-size-divisible-by", "1"], world_size=1).model
    assert (unpadded.vocab_size, unpadded.true_vocab_size) == (101, None)


def test_rope_scaling_and_partial_rotary_flags():
    m = model(*ROPE, "--rotary-percent", "0.25", "--rope-scaling-type", "yarn", "--rope-scaling-factor", "4",
              "--original-max-position-embeddings", "16", "--rope-yarn-beta-fast", "16",
              "--rope-yarn-mscale", "0.707", "--rope-yarn-mscale-all-dim", "1", "--rope-yarn-no-truncate")
    assert (m.rotary_percent, m.rotary_dim, m.rope_scaling_type, m.rope_scaling_factor) == (0.25, 4, "yarn", 4.0)
    assert (m.original_max_position_embeddings, m.yarn_beta_fast, m.yarn_mscale, m.yarn_truncate) == \
        (16, 16.0, 0.707, False)
    m = model(*ROPE, "--rope-scaling-type", "llama3", "--rope-scaling-factor", "8",
              "--original-max-position-embeddings", "16", "--rope-llama3-high-freq-factor", "2")
    assert (m.llama3_low_freq_factor, m.llama3_high_freq_factor) == (1.0, 2.0)
    assert model(*ROPE, "--rope-scaling-type", "linear", "--rope-scaling-factor", "2").rope_scaling_factor == 2.0
    assert "needs --rope-scaling-factor" in error(*ROPE, "--rope-scaling-type", "linear")
    assert "needs --original-max-position-embeddings" in error(*ROPE, "--rope-scaling-type", "dynamic",
                                                               "--rope-scaling-factor", "2")
    assert "needs rotary position embeddings" in error("--rope-scaling-type", "linear", "--rope-scaling-factor", "2")
    assert "only act with --rope-scaling-type" in error(*ROPE, "--rope-scaling-factor", "2")
    assert "RoPE only" in error("--rotary-percent", "0.5")
    assert "even number" in error(*ROPE, "--rotary-percent", "0.2")  # 16 x 0.2 = 3 dims


def test_memory_estimator_accepts_the_rope_fields():
    """Partial rotary and RoPE scaling change no tensor the estimator counts."""
    from megatron.planning.memory_estimate import estimate_memory

    plain = model(*ROPE)
    scaled = model(*ROPE, "--rotary-percent", "0.5", "--rope-scaling-type", "yarn", "--rope-scaling-factor", "4",
                   "--original-max-position-embeddings", "16", "--openai-gelu")
    assert estimate_memory(scaled, 1024)["peak"] == estimate_memory(plain, 1024)["peak"]
