"""Pre-norm transformer layer whose core attention may be distributed with Ulysses.

Everything here except core attention is token-local and runs on the rank's sequence
shard `[s/p, b, h]`. Core attention is a pluggable local backend, wrapped by
`DistributedAttention` when the SP group has more than one rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.config import ModelConfig
from megatron.core.sequence_parallel import DistributedAttention
from megatron.core.sequence_parallel.hybrid import build_sequence_parallel_attention
from megatron.core.sequence_parallel.overlap import ChunkedUlyssesAttention
from megatron.model.attention_backends import build_local_attention
from megatron.model.rotary import apply_rotary
from megatron.model.tiling import tiled_apply


def build_norm(config: ModelConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)


class _Recompute(nn.Module):
    """Recompute the wrapped module in backward instead of keeping its activations."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def wrap_core_attention(local: nn.Module, config: ModelConfig, parallel_state=None) -> nn.Module:
    """The local backend alone (no SP), or wrapped for Ulysses, overlapped Ulysses or Ulysses x Ring."""
    if parallel_state is None or parallel_state.sp_size == 1:
        return local
    ring = getattr(parallel_state, "ring_size", 1)
    if ring > 1:
        if config.ulysses_overlap_chunks > 1:
            raise ValueError("--ulysses-overlap-chunks > 1 is not combined with --ring-attention-size > 1 yet; "
                             "drop one of the two")
        return build_sequence_parallel_attention(local, parallel_state, check_shapes=False)
    if config.ulysses_overlap_chunks > 1:
        return ChunkedUlyssesAttention(local, parallel_state.sp_group, config.ulysses_overlap_chunks)
    # the model checks the shard length once per step, not once per layer
    return DistributedAttention(local, parallel_state.sp_group, scatter_idx=2, gather_idx=0, check_shapes=False)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, parallel_state=None) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_query_groups, c.kv_channels
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # fused projection, output ordered [all Q heads | all K heads | all V heads]
        self.qkv = nn.Linear(c.hidden_size, q_out + 2 * kv_out, bias=c.add_bias_linear)
        self.proj = nn.Linear(q_out, c.hidden_size, bias=c.add_bias_linear)
        local = build_local_attention(c.attention_backend, causal=True, dropout_p=c.attention_dropout,
                                      layout="sbhd")
        if c.recompute_granularity == "selective":
            local = _Recompute(local)
        self.use_rope = c.position_embedding_type == "rope"
        self.core_attention = wrap_core_attention(local, c, parallel_state)

    def forward(self, x: torch.Tensor, rope: tuple | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        s, b, _ = x.shape
        qkv = self.qkv(x)  # [s/p, b, (hq + 2 hkv) d]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # [s/p, b, hq, d]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [s/p, b, hkv, d]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [s/p, b, hkv, d]
        if self.use_rope:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        ctx = self.core_attention(q, k, v, segment_ids=segment_ids)  # [s/p, b, hq, d]
        return self.proj(ctx.reshape(s, b, self.num_heads * self.head_dim))  # [s/p, b, h]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
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
            y = F.gelu(y)
        return self.fc2(y)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel_state=None) -> None:
        super().__init__()
        self.input_norm = build_norm(config)
        self.attention = SelfAttention(config, parallel_state)
        self.post_attention_norm = build_norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout
        self.mlp_tiles = config.mlp_tiles

    def forward(self, x: torch.Tensor, rope=None, segment_ids=None) -> torch.Tensor:
        drop = self.hidden_dropout if self.training else 0.0
        x = x + F.dropout(self.attention(self.input_norm(x), rope, segment_ids), p=drop)
        return x + F.dropout(tiled_apply(self.mlp, self.post_attention_norm(x), self.mlp_tiles), p=drop)


def init_layer_(layer: TransformerLayer, config: ModelConfig) -> None:
    """Megatron's init: N(0, std) for weights, std / sqrt(2 L) for the two output projections."""
    std = config.init_method_std
    out_std = std / math.sqrt(2.0 * config.num_layers)
    for lin, s in ((layer.attention.qkv, std), (layer.attention.proj, out_std),
                   (layer.mlp.fc1, std), (layer.mlp.fc2, out_std)):
        nn.init.normal_(lin.weight, mean=0.0, std=s)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    for norm in (layer.input_norm, layer.post_attention_norm):
        norm.reset_parameters()
