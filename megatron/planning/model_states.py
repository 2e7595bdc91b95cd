"""Parameters, gradients and optimizer state per rank: what each ZeRO stage keeps at rest.

Split from memory_estimate.py (which re-exports these names); the step's working memory is there.
"""

from __future__ import annotations

from megatron.config import ModelConfig


def parameter_tensors(model: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, numel, ndim) of every parameter of `GPTModel(model)`, in registration order.

    ZeRO-1 assigns whole tensors to ranks, so its per-rank optimizer state depends on the
    tensor sizes, not only on their sum.
    """
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    hq, hkv, v = model.num_attention_heads, model.num_query_groups, model.vocab_size
    bias = model.add_bias_linear
    out = [("embedding.word_embeddings.weight", v * h, 2)]
    if model.position_embedding_type == "learned_absolute":
        out.append(("embedding.position_embeddings.weight", model.max_position_embeddings * h, 2))
    norm = [("weight", h, 1)] + ([("bias", h, 1)] if model.normalization == "LayerNorm" else [])
    fc1 = 2 * f if model.activation == "swiglu" else f
    qkv = (hq + 2 * hkv) * d
    linears = [("attention.qkv", qkv, h), ("attention.proj", h, hq * d), ("mlp.fc1", fc1, h), ("mlp.fc2", h, f)]
    for i in range(model.num_layers):
        out += [(f"layers.{i}.input_norm.{n}", k, nd) for n, k, nd in norm]
        for name, rows, cols in linears[:2]:
            out.append((f"layers.{i}.{name}.weight", rows * cols, 2))
            if bias:
                out.append((f"layers.{i}.{name}.bias", rows, 1))
        out += [(f"layers.{i}.post_attention_norm.{n}", k, nd) for n, k, nd in norm]
        for name, rows, cols in linears[2:]:
            out.append((f"layers.{i}.{name}.weight", rows * cols, 2))
            if bias:
                out.append((f"layers.{i}.{name}.bias", rows, 1))
    out += [(f"final_norm.{n}", k, nd) for n, k, nd in norm]
    if model.untie_embeddings_and_output_weights:
        out.append(("output_layer.weight", v * h, 2))
    return out


def zero1_partition_max(tensors: list[tuple[str, int, int]], ranks: int) -> int:
    """Largest per-rank element count under ZeroRedundancyOptimizer's greedy partition.

    It walks each param group (weight-decay matrices, then vectors) largest tensor first
    and gives each to the least-loaded rank; loads carry over between groups.
    """
    loads = [0] * ranks
    for group in ([t for t in tensors if t[2] >= 2], [t for t in tensors if t[2] < 2]):
        for _, n, _ in sorted(group, key=lambda t: t[1], reverse=True):
            i = loads.index(min(loads))
            loads[i] += n
    return max(loads)


def _states(m: ModelConfig, zero_stage: int, sdp: int, tensors) -> dict:
    """fp32 parameters, fp32 gradients and Adam's two fp32 moments per rank, at rest."""
    p = sum(n for _, n, _ in tensors)
    if zero_stage == 1 and sdp > 1:
        optim = 8 * zero1_partition_max(tensors, sdp)
    else:
        optim = 8 * p / (sdp if zero_stage >= 1 else 1)
    sharded = zero_stage >= 2
    return {"parameters": 4 * p / sdp if sharded else 4 * p,
            "gradients": 4 * p / sdp if sharded else 4 * p,
            "optimizer state": optim}
