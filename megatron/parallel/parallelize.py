"""`parallelize_gpt`: apply a run's parallelism and memory strategy to a pure `GPTModel`.

The model is built from its shape alone (`GPTModel(model_config)`, on the meta device for
large models); this step, as torchtitan's `parallelize_*` functions, makes it run:

1. core attention of every layer: the local kernel chosen by `--attention-backend` (or the
   flash-attention flags), wrapped for selective recompute, then for sequence parallelism
   (Ulysses `DistributedAttention`, head-chunk overlap, or Ulysses x ring);
2. the SP input handling of the model (position ids of the shard, documents of the full
   sequence, the shard-length check);
3. sequence tiling of every token-local part of a layer (or of its MLP only), head chunks
   of the local attention, tiled logits + loss, full recompute, activation offload (one
   `ActivationOffloader` per model, `model.activation_offloader`, for its statistics);
4. ZeRO: DDP (stages 0/1) or FSDP2 (stages 2/3, half-precision parameter gathers under
   --bf16/--fp16);
5. for a meta-device model: allocate this rank's shards and initialise them exactly as the
   single-process model would be (megatron.parallel.materialize).

`validate_strategy` checks, from the configs alone, everything this step or the first
forward would refuse, so `--dry-run` and flag parsing fail where the run would.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.config import ConfigError, ModelConfig, ParallelConfig
from megatron.core.sequence_parallel.hybrid import build_sp_attention
from megatron.core.topology import Topology
from megatron.model.attention_backends import build_local_attention
from megatron.model.sequence_tiling import HeadChunkedAttention
from megatron.model.tiling import TiledLanguageModelLoss
from megatron.parallel.data_parallel import apply_data_parallel
from megatron.parallel.materialize import has_meta_parameters, materialize_
from megatron.parallel.offload import ActivationOffloader
from megatron.parallel.wrappers import (
    Recompute,
    apply_full_recompute,
    apply_layer_tiling,
    apply_mlp_tiling,
    apply_norm_tiling,
    apply_offload,
    install_residual_dtype,
    install_sequence_parallel_inputs,
    residual_dtype,
)

FLASH_ATTN_MAX_HEAD_DIM = 256
TRITON_MAX_HEAD_DIM = 128


def validate_strategy(model: ModelConfig, parallel: ParallelConfig, *, world_size: int,
                      seq_length: int | None = None, precision: str = "fp32",
                      device_type: str | None = None) -> tuple[Topology, list[str]]:
    """The topology of the run and printed notes; raises ConfigError for what cannot run."""
    topology = Topology(world_size, parallel.sequence_parallel_size, parallel.ring_attention_size,
                        num_heads=model.num_attention_heads, num_kv_heads=model.num_query_groups,
                        seq_length=seq_length, overlap_chunks=parallel.ulysses_overlap_chunks)
    notes = []
    backend = parallel.attention_backend
    if backend == "flash-attn":
        if precision not in ("bf16", "fp16"):
            raise ConfigError("--use-flash-attn / --attention-backend flash-attn needs --bf16 or --fp16: the "
                              "flash-attn kernels take half-precision inputs only; add --bf16, or use "
                              "--attention-backend sdpa for fp32")
        if model.kv_channels > FLASH_ATTN_MAX_HEAD_DIM:
            raise ConfigError(f"flash-attn supports head dims up to {FLASH_ATTN_MAX_HEAD_DIM}, the model has "
                              f"{model.kv_channels} (--kv-channels / hidden / heads); use --attention-backend sdpa")
    if backend == "triton" and model.kv_channels > TRITON_MAX_HEAD_DIM:
        raise ConfigError(f"the triton attention kernel supports head dims up to {TRITON_MAX_HEAD_DIM}, the model "
                          f"has {model.kv_channels}; use --attention-backend sdpa or flash-attn")
    if parallel.ring_attention_size > 1:
        if model.attention_dropout:
            raise ConfigError(f"--ring-attention-size > 1 does not support attention dropout (got "
                              f"--attention-dropout {model.attention_dropout}); pass --attention-dropout 0")
        if parallel.recompute_granularity == "selective":
            notes.append("--recompute-granularity selective: ring attention keeps only its output and "
                         "log-sum-exp already, so selective recompute changes nothing under --ring-attention-size")
    if parallel.offload_activations and device_type == "cpu":
        notes.append("--offload-activations on CPU: saved layer inputs are copied to separate host tensors, "
                     "which saves no memory (the device is host memory); it pays off on GPUs")
    return topology, notes


def build_core_attention(model_config: ModelConfig, parallel: ParallelConfig, parallel_state) -> nn.Module:
    """The core attention module of one layer under this strategy."""
    local = build_local_attention(parallel.attention_backend, causal=True, dropout_p=model_config.attention_dropout,
                                  layout="sbhd")
    if parallel.attention_head_chunks > 1:
        local = HeadChunkedAttention(local, parallel.attention_head_chunks)
    if parallel.recompute_granularity == "selective":
        local = Recompute(local)
    # the SP input hook checks the shard length once per shape for the whole model
    return build_sp_attention(local, parallel_state, overlap_chunks=parallel.ulysses_overlap_chunks,
                              check_shapes=False)


def parallelize_gpt(model: nn.Module, parallel_state, parallel: ParallelConfig, *,
                    device: torch.device | None = None, precision: str = "fp32",
                    data_parallel: bool = True) -> nn.Module:
    """Apply `parallel` (a ParallelConfig) to `model` (a GPTModel, possibly on the meta device).

    `parallel_state` may be None for a single process. `precision` ("fp32", "bf16", "fp16")
    sets FSDP2's parameter-gather dtype and the residual stream's dtype (bf16/fp16 under
    half precision unless `parallel.fp32_residual_connection`; untouched in fp32).
    `data_parallel=False` skips step 4 (no DDP/FSDP: the caller reduces gradients itself;
    for tools and measurements). Returns the model to train
    (DDP-wrapped for ZeRO 0/1 with more than one rank; the same object otherwise). Parameter
    names are unchanged.
    """
    device = torch.device(device) if device is not None else (
        parallel_state.device if parallel_state is not None else torch.device("cpu"))
    config = model.config
    world = parallel_state.world_size if parallel_state is not None else 1
    validate_strategy(config, parallel, world_size=world, precision=precision, device_type=device.type)
    sp = parallel_state is not None and parallel_state.sp_size > 1
    chunked = (parallel.recompute_granularity == "full" and parallel.recompute_method == "uniform"
               and parallel.recompute_num_layers > 1)
    offloader = None
    if parallel.offload_activations:  # (in units of recomputed chunks when several layers form one)
        units = -(-len(model.layers) // parallel.recompute_num_layers) if chunked else len(model.layers)
        offloader = ActivationOffloader(device, num_layers=units)
        model.activation_offloader = offloader
    for layer in model.layers:
        layer.attention.core_attention = build_core_attention(config, parallel, parallel_state)
        if parallel.projection_tiles > 1:
            apply_layer_tiling(layer, parallel.projection_tiles, parallel.mlp_tiles)
        elif parallel.mlp_tiles > 1:
            apply_mlp_tiling(layer.mlp, parallel.mlp_tiles)
    if parallel.recompute_granularity == "full":
        # (uniform chunks of several layers: the chunk's input is what leaves the device)
        apply_full_recompute(model, parallel.recompute_method, parallel.recompute_num_layers,
                             offloader=offloader if chunked else None)
    if offloader is not None and not chunked:  # outermost: what recompute keeps is what leaves the device
        for index, layer in enumerate(model.layers):
            apply_offload(layer, offloader, index)
    if parallel.projection_tiles > 1:
        apply_norm_tiling(model.final_norm, parallel.projection_tiles)
    if parallel.loss_tile_tokens > 0:
        model.loss = TiledLanguageModelLoss(parallel.loss_tile_tokens)
    if sp:
        install_sequence_parallel_inputs(model, parallel_state)
    dtype = residual_dtype(precision, parallel.fp32_residual_connection)
    if dtype is not None:
        install_residual_dtype(model, dtype)
    meta = has_meta_parameters(model)
    if not data_parallel or parallel.zero_stage in (0, 1):
        if meta:
            materialize_(model, device)
        else:
            model.to(device)
        if not data_parallel:
            return model
        return apply_data_parallel(model, parallel.zero_stage, parallel_state, device, precision)
    if not meta:
        model.to(device)
    model = apply_data_parallel(model, parallel.zero_stage, parallel_state, device, precision)
    if meta:
        materialize_(model, device)
    return model


def built_rank_facts(model: nn.Module, parallel_state) -> dict:
    """This rank's topology as built, read back from its process groups and attention modules
    (the counterpart of megatron.planning.plan.planned_ranks, which derives it from the flags)."""
    import torch.distributed as dist  # noqa: PLC0415

    from megatron.core.sequence_parallel import DistributedAttention, UlyssesRingAttention  # noqa: PLC0415

    ps = parallel_state
    ranks = lambda g: dist.get_process_group_ranks(g) if g is not None else [ps.rank]  # noqa: E731
    inner = model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model
    attn = inner.layers[0].attention.core_attention
    cfg = inner.config
    if isinstance(attn, UlyssesRingAttention):
        attn = attn.ulysses
    if isinstance(attn, DistributedAttention):
        me = dist.get_rank(attn.spg)
        heads = [sum(p.local_heads(me)[i] for p in attn.head_plans(cfg.num_attention_heads, cfg.num_query_groups))
                 for i in (0, 1)]
    else:
        heads = [cfg.num_attention_heads, cfg.num_query_groups]
    return {"rank": ps.rank, "dp_rank": ps.dp_rank, "sp_rank": ps.sp_rank, "ring_rank": ps.ring_rank,
            "ulysses_rank": ps.ulysses_rank, "sp_group": ranks(ps.sp_group), "dp_group": ranks(ps.dp_group),
            "ulysses_group": ranks(ps.ulysses_group), "ring_group": ranks(ps.ring_group), "heads": heads}
