"""Every long-context memory trick at once, sized for a sequence length: what `--longest` plans.

`every_trick(model, N, world)` is the strategy for the longest sequences: Ulysses SP over
the whole world (ring attention only where the query heads run out), ZeRO-3 with bf16
gathers, full recompute with the layer inputs offloaded to host memory, every token-local
part of a layer in sequence tiles (each tile's intermediates about `TILE_BYTES`), the loss
in tiles of `[tile, vocab]` fp32 logits of about `TILE_BYTES`, and the local attention one
query head at a time. Tile counts grow with N so that no tile's intermediates grow with it.
"""

from __future__ import annotations

import math

from megatron.config import ModelConfig, ParallelConfig

PRESETS = {
    # Meta's Llama-3-8B shape (RoPE base 500000); vocab 128256 is already a multiple of 128
    "llama3-8b": lambda: ModelConfig.llama(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                           num_query_groups=8, ffn_hidden_size=14336, vocab_size=128256,
                                           max_position_embeddings=1 << 26, rotary_base=500000.0,
                                           hidden_dropout=0.0, attention_dropout=0.0),
    # the 1.3B GPT-3 layout of examples_seq_parallel (24 x 2048, 16 heads, GeLU, LayerNorm, tied
    # embeddings) with RoPE: learned positions would need an N x h table at millions of tokens
    "gpt-1.3b-rope": lambda: ModelConfig.gpt3(num_layers=24, hidden_size=2048, num_attention_heads=16,
                                              vocab_size=50304, max_position_embeddings=1 << 26,
                                              position_embedding_type="rope", hidden_dropout=0.0,
                                              attention_dropout=0.0),
}

TILE_BYTES = 2 ** 30  # intermediates of one tile (fp32 logits, MLP, QKV + fp32 norm copies) aimed at


def sequence_parallel_layout(model: ModelConfig, world_size: int) -> tuple[int, int]:
    """(SP, ring): SP over every rank; Ulysses up to the query-head count, a ring beyond it."""
    heads = model.num_attention_heads
    if world_size <= heads:
        return world_size, 1
    ring = math.ceil(world_size / heads)
    while world_size % ring:
        ring += 1
    return world_size, ring


def every_trick(model: ModelConfig, seq_length: int, world_size: int, *, attention_backend: str = "sdpa",
                precision_bytes: int = 2, tile_bytes: int = TILE_BYTES) -> ParallelConfig:
    """The ParallelConfig with every memory trick on, its tiles sized for `seq_length` tokens."""
    sp, ring = sequence_parallel_layout(model, world_size)
    t = max(1, seq_length // sp)
    v, h = model.vocab_size, model.hidden_size
    fc1 = (2 if model.activation == "swiglu" else 1) * model.ffn_hidden_size
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * model.kv_channels
    loss_tile = max(128, 2 ** int(math.log2(max(1, tile_bytes // (4 * v)))))
    # per token of a tile: the MLP's fc1 output and activations; the QKV output + fp32 norm and RoPE copies
    mlp_tiles = max(1, math.ceil(t * (fc1 + model.ffn_hidden_size) * precision_bytes / tile_bytes))
    projection_tiles = max(1, math.ceil(t * (qkv * precision_bytes + 4 * (2 * h + qkv)) / tile_bytes))
    heads_per_rank = math.ceil(model.num_attention_heads / (sp // ring))
    return ParallelConfig(sequence_parallel_size=sp, ring_attention_size=ring, zero_stage=3,
                          attention_backend=attention_backend, recompute_granularity="full",
                          loss_tile_tokens=loss_tile, mlp_tiles=mlp_tiles, projection_tiles=projection_tiles,
                          offload_activations=True, attention_head_chunks=heads_per_rank,
                          fp32_residual_connection=False)


def plan(model: ModelConfig, seq_length: int, world_size: int, *, precision: str = "bf16", device: str = "cuda",
         attention_backend: str = "sdpa", micro_batch_size: int = 1, **overrides) -> dict:
    """`estimate_memory` of `model` at `seq_length` with every trick on (fields of ParallelConfig in
    `overrides` replace every_trick's choices); the estimate carries its `parallel` config."""
    from megatron.planning.memory_estimate import estimate_memory  # noqa: PLC0415

    parallel = every_trick(model, seq_length, world_size, attention_backend=attention_backend).replace(**overrides)
    est = estimate_memory(model, seq_length, micro_batch_size=micro_batch_size,
                          data_parallel_size=world_size // parallel.sequence_parallel_size, precision=precision,
                          device=device, parallel=parallel)
    est["parallel"] = parallel
    return est


def longest_sequence(model: ModelConfig, world_size: int, budget_bytes: float, *, limit: int = 1 << 30,
                     host_budget_bytes: float | None = None, **settings) -> tuple[int, dict | None]:
    """The longest N (a multiple of the SP granularity) whose step fits `budget_bytes` per rank with
    every trick on (and whose offloaded activations fit `host_budget_bytes` of host memory per
    rank, when given), and its plan; (0, None) when nothing fits."""
    from megatron.planning.memory_estimate import sequence_granularity  # noqa: PLC0415

    sp, ring = sequence_parallel_layout(model, world_size)
    step = sequence_granularity(sp, ring)

    def fits(n: int):
        est = plan(model, n, world_size, **settings)
        host_ok = host_budget_bytes is None or est["host_activations"] <= host_budget_bytes
        return est if est["peak"] <= budget_bytes and host_ok else None

    if fits(step) is None:
        return 0, None
    lo, hi = 1, 2
    while hi * step <= limit and fits(hi * step) is not None:
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * step) is not None:
            lo = mid
        else:
            hi = mid
    return lo * step, fits(lo * step)


def describe_strategy(parallel: ParallelConfig) -> str:
    """One line of what every_trick chose."""
    ring = f" x ring {parallel.ring_attention_size}" if parallel.ring_attention_size > 1 else ""
    return (f"bf16 (bf16 residual stream), {parallel.attention_backend} attention over "
            f"{parallel.attention_head_chunks} head chunk(s), Ulysses SP {parallel.sequence_parallel_size}{ring}, "
            f"ZeRO-{parallel.zero_stage}{' (bf16 gathers)' if parallel.zero_stage >= 2 else ''}, full recompute, "
            f"layer inputs offloaded to host memory, "
            f"layer parts in {parallel.projection_tiles} tiles, MLP in {parallel.mlp_tiles} tiles, loss in tiles "
            f"of {parallel.loss_tile_tokens} tokens")


def strategy_flags(parallel: ParallelConfig) -> str:
    """The pretrain_gpt.py flags of an every_trick strategy."""
    flags = ["--bf16", f"--ds-sequence-parallel-size {parallel.sequence_parallel_size}",
             f"--zero-stage {parallel.zero_stage}", f"--attention-backend {parallel.attention_backend}",
             "--recompute-granularity full", "--offload-activations",
             f"--tiled-projection-tiles {parallel.projection_tiles}", f"--tiled-mlp-tiles {parallel.mlp_tiles}",
             f"--tiled-loss-tokens {parallel.loss_tile_tokens}",
             f"--attention-head-chunks {parallel.attention_head_chunks}"]
    if parallel.ring_attention_size > 1:
        flags.append(f"--ring-attention-size {parallel.ring_attention_size}")
    return " ".join(flags)
