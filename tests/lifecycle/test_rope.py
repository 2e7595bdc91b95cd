"""RoPE variants against transformers' own definitions, and under sequence parallelism (about 3 s).

The reference is transformers' `ROPE_INIT_FUNCTIONS` and rotary modules on a `LlamaConfig`
(GPT-NeoX for partial rotary): inverse frequencies, attention factor and cos/sin must be
bitwise equal, which is what makes imported models match to fp32 rounding.
"""

import pytest
import torch

from megatron.config import ConfigError, ModelConfig, ParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.sequence_parallel.layout import sequence_shard_indices
from megatron.model import GPTModel
from megatron.model.rotary import RotaryEmbedding, apply_rotary
from megatron.parallel import parallelize_gpt
from tests.utils import rel_err

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM, ORIG = 32, 64
SCALINGS = {
    "linear": dict(factor=4.0),
    "dynamic": dict(factor=4.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=ORIG),
    "yarn-mscale": dict(factor=8.0, original_max_position_embeddings=ORIG, mscale=0.707, mscale_all_dim=1.0,
                        beta_fast=16.0, beta_slow=2.0),
    "yarn-attn-factor": dict(factor=2.0, original_max_position_embeddings=ORIG, attention_factor=1.3,
                             truncate=False),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=ORIG),
}


def hf_config(kind, params, base=10000.0, partial=1.0):
    rope = {"rope_type": kind.split("-")[0], "rope_theta": base, **params}
    if partial != 1.0:
        return transformers.GPTNeoXConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=ORIG,
                                          rope_parameters={**rope, "partial_rotary_factor": partial})
    return transformers.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                                    max_position_embeddings=ORIG, rope_parameters=rope)


def ours(kind, params, base=10000.0, partial=1.0):
    p = dict(params)
    cfg = ModelConfig.llama(num_layers=1, hidden_size=4 * HEAD_DIM, num_attention_heads=4, vocab_size=8,
                            max_position_embeddings=ORIG, rotary_base=base, rotary_percent=partial,
                            rope_scaling_type=kind.split("-")[0], rope_scaling_factor=p.pop("factor"),
                            original_max_position_embeddings=p.pop("original_max_position_embeddings", ORIG),
                            yarn_beta_fast=p.pop("beta_fast", 32.0), yarn_beta_slow=p.pop("beta_slow", 1.0),
                            yarn_mscale=p.pop("mscale", None), yarn_mscale_all_dim=p.pop("mscale_all_dim", None),
                            rope_attention_factor=p.pop("attention_factor", None), yarn_truncate=p.pop("truncate", True),
                            llama3_low_freq_factor=p.pop("low_freq_factor", 1.0),
                            llama3_high_freq_factor=p.pop("high_freq_factor", 4.0))
    assert not p
    return RotaryEmbedding.from_config(cfg)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_inverse_frequencies_equal_transformers(kind, partial):
    cfg = hf_config(kind, SCALINGS[kind], partial=partial)
    rope = ours(kind, SCALINGS[kind], partial=partial)
    for seq_len in ([None, 3 * ORIG] if kind == "dynamic" else [None]):
        ref, attention = ROPE_INIT_FUNCTIONS[kind.split("-")[0]](cfg, torch.device("cpu"),
                                                                   *([torch.tensor(seq_len)] if seq_len else []))
        got = rope.inv_freq(seq_len)
        assert got.shape == ref.shape == (int(HEAD_DIM * partial) // 2,)
        assert torch.equal(got, ref.float()), (kind, seq_len, (got - ref).abs().max())
        assert rope.attention_scaling == attention
    if kind == "dynamic":  # below the original context dynamic NTK is plain RoPE
        assert torch.equal(rope.inv_freq(ORIG), rope.inv_freq(None))


@pytest.mark.parametrize("kind", ["yarn", "llama3", "dynamic", "partial"])
def test_cos_sin_and_rotation_equal_transformers_modules(kind):
    """transformers' rotary module + apply_rotary_pos_emb on positions beyond the original context."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    partial = 0.25 if kind == "partial" else 1.0
    params = SCALINGS["yarn" if kind == "partial" else kind]
    cfg = hf_config("yarn" if kind == "partial" else kind, params, base=500.0, partial=partial)
    hf = (GPTNeoXRotaryEmbedding if partial != 1.0 else LlamaRotaryEmbedding)(cfg)
    rope = ours("yarn" if kind == "partial" else kind, params, base=500.0, partial=partial)
    n = 3 * ORIG
    pos = torch.arange(n)[None]
    x = torch.randn(1, 4, n, HEAD_DIM, generator=torch.Generator().manual_seed(0))  # [b, h, s, d]
    cos_ref, sin_ref = hf(x, pos)  # [b, s, r]
    cos, sin = rope(pos, n)  # [s, b, 1, r]
    assert torch.equal(cos[:, 0, 0], cos_ref[0]) and torch.equal(sin[:, 0, 0], sin_ref[0])
    apply = neox_apply if partial != 1.0 else apply_rotary_pos_emb
    q_ref, _ = apply(x, x, cos_ref, sin_ref)
    q = apply_rotary(x.permute(2, 0, 1, 3), cos, sin).permute(1, 2, 0, 3)  # [b, h, s, d] via [s, b, h, d]
    assert (q - q_ref).abs().max() < 1e-6


def test_rope_flags_are_validated():
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=8, max_position_embeddings=16)
    with pytest.raises(ConfigError, match="RoPE only"):
        ModelConfig.gpt3(**base, rotary_percent=0.5)
    with pytest.raises(ConfigError, match="even number"):
        ModelConfig.llama(**base, rotary_percent=0.2)  # int(16 x 0.2) = 3 dims
    with pytest.raises(ConfigError, match="rope-scaling-factor must be >= 1"):
        ModelConfig.llama(**base, rope_scaling_type="linear", rope_scaling_factor=0.5)
    with pytest.raises(ConfigError, match="rope-scaling-type must be one of"):
        ModelConfig.llama(**base, rope_scaling_type="ntk")


# ------------------------------------------------------------------ sequence parallelism

S = 32


def _sp_config(kind):
    return ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=96,
                             ffn_hidden_size=96, max_position_embeddings=4 * S, hidden_dropout=0.0,
                             attention_dropout=0.0, init_method_std=0.2, rotary_percent=0.5,
                             rope_scaling_type=kind, rope_scaling_factor=4.0, original_max_position_embeddings=S // 4)


def _sp_losses(sp, ring, kind):
    state = ps.initialize_model_parallel(sequence_parallel_size=sp, ring_attention_size=ring)
    torch.manual_seed(7)
    ref = GPTModel(_sp_config(kind)).eval()
    torch.manual_seed(7)
    model = parallelize_gpt(GPTModel(_sp_config(kind)), state, ParallelConfig(sequence_parallel_size=sp,
                                                                              ring_attention_size=ring),
                            data_parallel=False).eval()
    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, 96, (2, S), generator=g), torch.randint(0, 96, (2, S), generator=g)
    idx = sequence_shard_indices(S, state)
    with torch.no_grad():
        full = ref(tokens, labels=labels)[:, idx]
        mine = model(tokens[:, idx], labels=labels[:, idx])  # positions and sequence length from the SP hook
    return rel_err(mine, full)


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_scaled_rope_under_ulysses_and_zigzag_ring_equals_one_process(ranks, kind):
    """Global positions and the full sequence length reach every rank: SP=2 (Ulysses) and the zigzag
    ring layout give the single-process per-token losses (dynamic NTK included, which depends on N)."""
    for sp, ring in ((2, 1), (2, 2)):
        for err in ranks(2, _sp_losses, sp, ring, kind):
            assert err < 1e-5, (kind, sp, ring, err)


def test_dynamic_ntk_depends_on_the_sequence_length():
    torch.manual_seed(7)
    model = GPTModel(_sp_config("dynamic")).eval()
    tokens = torch.randint(0, 96, (1, S), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, head = model(tokens), model(tokens[:, :S // 2])
        same = model(tokens[:, :S // 2], sequence_length=S)
    assert (head - full[:, :S // 2]).abs().max() > 1e-4  # a shorter sequence is scaled less
    assert (same - full[:, :S // 2]).abs().max() < 1e-5  # the length, not the token count, decides
