"""Pre-norm transformer layer, pure single-device torch.

The layout is `[s, b, h]` as in Megatron. Core attention is a local backend module
(`attention.core_attention`, SDPA by default) called as `core_attention(q, k, v,
segment_ids=documents)`; `megatron.parallel.parallelize_gpt` swaps it for the sequence-
parallel wrapper, and wraps layers and MLPs for recompute and tiling, without changing a
parameter name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import ModelConfig
from megatron.model.attention_backends import build_local_attention
from megatron.model.rotary import apply_rotary


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the dtypes of input and weights (bf16 weights when
    FSDP gathers parameters in bf16), returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the dtypes of input and weights, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def build_norm(config: ModelConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    return LayerNorm(config.hidden_size, eps=config.norm_epsilon)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_query_groups, c.kv_channels
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # fused projection, output ordered [all Q heads | all K heads | all V heads]
        self.qkv = nn.Linear(c.hidden_size, q_out + 2 * kv_out, bias=c.add_bias_linear)
        self.proj = nn.Linear(q_out, c.hidden_size, bias=c.add_bias_linear)
        self.use_rope = c.position_embedding_type == "rope"
        self.core_attention = build_local_attention("sdpa", causal=True, dropout_p=c.attention_dropout,
                                                    layout="sbhd")

    def qkv_heads(self, x: torch.Tensor, rope: tuple | None = None):
        """Q, K, V of the tokens `x` `[s, b, h]`, rotated: `[s, b, hq, d]`, `[s, b, hkv, d]` twice.
        (Also what incremental decoding, megatron/inference, computes per new token.)"""
        qkv = self.qkv(x)  # [s, b, (hq + 2 hkv) d]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # [s, b, hq, d]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [s, b, hkv, d]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [s, b, hkv, d]
        if self.use_rope:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple | None = None, segment_ids=None) -> torch.Tensor:
        s, b, _ = x.shape
        q, k, v = self.qkv_heads(x, rope)
        ctx = self.core_attention(q, k, v, segment_ids=segment_ids)  # [s, b, hq, d]
        return self.proj(ctx.reshape(s, b, self.num_heads * self.head_dim))  # [s, b, h]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        # "gelu": exact (erf); "gelu_tanh": the tanh approximation (OpenAI GPT-2, --openai-gelu, and
        # what upstream's default fused bias-GeLU kernel computes)
        self.gelu_approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        fc1_out = 2 * config.ffn_hidden_size if self.swiglu else config.ffn_hidden_size
        # for SwiGLU the fc1 output is [gate | up]
        self.fc1 = nn.Linear(config.hidden_size, fc1_out, bias=config.add_bias_linear)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate=self.gelu_approximate)
        return self.fc2(y)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_norm = build_norm(config)
        self.attention = SelfAttention(config)
        self.post_attention_norm = build_norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x: torch.Tensor, rope=None, segment_ids=None) -> torch.Tensor:
        drop = self.hidden_dropout if self.training else 0.0
        x = x + F.dropout(self.attention(self.input_norm(x), rope, segment_ids), p=drop)
        return x + F.dropout(self.mlp(self.post_attention_norm(x)), p=drop)

    def init_plan(self, config: ModelConfig) -> list[tuple[nn.Parameter, callable]]:
        """Megatron's init, in order: N(0, std) weights, std / sqrt(2 L) for the two output
        projections, zero biases, unit norm weights."""
        std = config.init_method_std
        out_std = std / math.sqrt(2.0 * config.num_layers)
        plan = [(p, init) for norm in (self.input_norm,) for p, init in norm_init_plan(norm)]
        for lin, s in ((self.attention.qkv, std), (self.attention.proj, out_std)):
            plan += linear_init_plan(lin, s)
        plan += norm_init_plan(self.post_attention_norm)
        for lin, s in ((self.mlp.fc1, std), (self.mlp.fc2, out_std)):
            plan += linear_init_plan(lin, s)
        return plan


def normal_init(std: float):
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def linear_init_plan(lin: nn.Linear, std: float) -> list:
    plan = [(lin.weight, normal_init(std))]
    if lin.bias is not None:
        plan.append((lin.bias, nn.init.zeros_))
    return plan


def norm_init_plan(norm: nn.Module) -> list:
    plan = [(norm.weight, nn.init.ones_)]
    if getattr(norm, "bias", None) is not None:
        plan.append((norm.bias, nn.init.zeros_))
    return plan
