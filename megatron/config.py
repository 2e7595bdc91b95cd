"""Frozen, typed configuration.

The model and the parallel machinery read only these objects, never flags or globals,
so a model can be built in a test, a conversion tool or a notebook without argparse.
`megatron.arguments` turns Megatron-DeepSpeed flags into these dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
ATTENTION_BACKENDS = ("classic", "sdpa", "flash-attn", "triton")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT model.

    Two families are first class because Hugging Face export needs both:
    `ModelConfig.gpt3(...)` (LayerNorm, GeLU, learned positions, biases, tied
    embeddings; what the 1.3B/30B scripts train) and `ModelConfig.llama(...)`
    (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied output).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # already padded (see megatron.data.tokenizers)
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    num_query_groups: Optional[int] = None  # K/V heads; None means = num_attention_heads
    kv_channels: Optional[int] = None  # head dim; default hidden_size // heads
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu"
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_backend: str = "sdpa"
    attention_softmax_in_fp32: bool = True
    recompute_granularity: Optional[str] = None

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"--hidden-size ({self.hidden_size}) must be divisible by "
                    f"--num-attention-heads ({self.num_attention_heads}), or set --kv-channels"
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        self.validate()

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "ffn_hidden_size", "num_query_groups",
                     "kv_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--num-query-groups ({self.num_query_groups})"
            )
        _choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ConfigError(f"RoPE needs an even head dim, got kv_channels={self.kv_channels}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Exact parameter count of `GPTModel(self)` (checked against the model in tests)."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        d, nq, nkv = self.kv_channels, self.num_attention_heads, self.num_query_groups
        b = 1 if self.add_bias_linear else 0
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        qkv = h * (nq + 2 * nkv) * d + b * (nq + 2 * nkv) * d
        proj = nq * d * h + b * h
        fc1_out = 2 * f if self.activation == "swiglu" else f
        mlp = h * fc1_out + b * fc1_out + f * h + b * h
        layer = 2 * norm + qkv + proj + mlp
        emb = v * h
        if self.position_embedding_type == "learned_absolute":
            emb += self.max_position_embeddings * h
        out = v * h if self.untie_embeddings_and_output_weights else 0
        return emb + L * layer + norm + out

    @classmethod
    def gpt3(cls, **kw) -> "ModelConfig":
        base = dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                    activation="gelu", add_bias_linear=True,
                    untie_embeddings_and_output_weights=False)
        base.update(kw)
        return cls(**base)

    @classmethod
    def llama(cls, **kw) -> "ModelConfig":
        base = dict(position_embedding_type="rope", normalization="RMSNorm", norm_epsilon=1e-6,
                    activation="swiglu", add_bias_linear=False,
                    untie_embeddings_and_output_weights=True)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out. `sequence_parallel_size` is Ulysses (--ds-sequence-parallel-size)."""

    sequence_parallel_size: int = 1
    zero_stage: int = 0
    distributed_backend: str = "gloo"
    distributed_timeout_minutes: float = 10.0

    def __post_init__(self) -> None:
        if self.sequence_parallel_size < 1:
            raise ConfigError("--ds-sequence-parallel-size must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {list(allowed)}, got {value!r}")


__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "field"]
