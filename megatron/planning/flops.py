"""Model FLOPs of one training step, for the TFLOP/s and MFU figures in the log.

"Model FLOPs" count the arithmetic the model needs, not what the hardware executes:
activation recomputation is not counted (it is overhead, not progress). Every matmul
costs 2 flops per multiply-add; backward costs twice forward. The attention term is
counted for causal attention as executed by flash-style kernels: query i attends to
i+1 keys, so QK^T and PV together cost 2 * 2 * d * s(s+1)/2 per head and sample, i.e.
about half of the dense s x s product that Megatron's formula assumes. At long sequence
length this term dominates, and counting the full square would report an MFU that
credits work the kernel skips.
"""

from __future__ import annotations

from megatron.config import ModelConfig


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Forward flops per token of every weight matmul (QKV, output projection, MLP, logits)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    nq, nkv, f = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    qkv = h * (nq + 2 * nkv) * d
    proj = nq * d * h
    mlp = h * f * (2 if cfg.activation == "swiglu" else 1) + f * h
    logits = h * cfg.vocab_size
    return 2 * (cfg.num_layers * (qkv + proj + mlp) + logits)


def attention_flops_per_sequence(cfg: ModelConfig, seq_length: int) -> int:
    """Forward flops of causal core attention (scores and weighted sum) for one sequence."""
    pairs = seq_length * (seq_length + 1) // 2  # causal (query, key) pairs
    return cfg.num_layers * 2 * 2 * cfg.num_attention_heads * cfg.kv_channels * pairs


def flops_per_step(cfg: ModelConfig, seq_length: int, global_batch_size: int) -> int:
    """Model flops (forward + backward = 3x forward) of one optimizer step over the global batch."""
    fwd = seq_length * matmul_flops_per_token(cfg) + attention_flops_per_sequence(cfg, seq_length)
    return 3 * fwd * global_batch_size
