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


# Dense peak TFLOP/s of one GPU by the precision its matmuls run in (NVIDIA data sheets; the
# "with sparsity" figures are twice these). Keys are matched against torch.cuda.get_device_name(),
# longest first, so "H100 PCIe" wins over "H100". fp32 matmuls run on TF32 tensor cores when
# TF32 is enabled (the training stack enables it), so fp32 runs are measured against "tf32".
GPU_PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H800": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
}
PEAK_ENV = "MEGATRON_PEAK_TFLOPS"  # overrides the table (a GPU not in it, clocks, a different sheet)


def device_peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak dense TFLOP/s of `device_name` for matmuls in `precision` ("bf16", "fp16", "fp32");
    MEGATRON_PEAK_TFLOPS overrides; None for an unknown device (no MFU is reported then)."""
    import os  # noqa: PLC0415

    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    kind = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "tf32")
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return GPU_PEAK_TFLOPS[key][kind]
    return None
