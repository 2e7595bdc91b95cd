"""ZeRO stages over the sequence-data-parallel (SDP) group with torch-native engines.

Part of `parallelize_gpt` (megatron.parallel.parallelize), which calls `apply_data_parallel`.

Parameters are replicated over SP x DP (every SP rank needs every weight for its token
shard), so gradient reduction and ZeRO sharding both span the flattened SDP mesh:

  stage 0  DistributedDataParallel: replicated params, grads and optimizer state.
  stage 1  DDP + ZeroRedundancyOptimizer: optimizer state sharded (see optimizer.py).
  stage 2  FSDP2 `fully_shard` per transformer layer, reshard_after_forward=False:
           grads and optimizer state sharded; a layer's full parameters stay gathered
           from its forward to its backward (no second all-gather), freed after backward.
  stage 3  FSDP2 per layer with resharding after forward: params, grads and optimizer
           state sharded; each layer is all-gathered again for backward.

Under --bf16/--fp16, FSDP2 gathers parameters in half precision (MixedPrecisionPolicy) and
reduce-scatters gradients in fp32.

DDP and FSDP average gradients over the group; the loss helper pre-multiplies the loss
so that the average is the gradient of the global-batch mean (megatron.model.loss).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

SHARDED_GRAD_STAGES = (2, 3)


# DDP keyword arguments that every supported torch (>= 2.5) accepts; `forward_sync_buffers`
# (torch >= 2.13) and `broadcast_buffers` (deprecated there) are not needed: the model has no
# buffers. tests/parallel checks this list against torch 2.5's signature.
DDP_KWARGS = ("process_group", "device_ids", "gradient_as_bucket_view")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _fsdp():
    """FSDP2's `fully_shard` and `MixedPrecisionPolicy` (public since torch 2.6, under
    `torch.distributed._composable.fsdp` in 2.5)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415
    return fully_shard, MixedPrecisionPolicy


def mixed_precision_policy(precision: str):
    """bf16/fp16 runs gather parameters in half precision (half the all-gather bytes and the
    gathered copy) and reduce-scatter gradients in fp32; the sharded fp32 masters stay fp32."""
    _, policy = _fsdp()
    if precision not in _HALF:
        return policy()
    # cast_forward_inputs=False: layer inputs (the residual stream, RoPE's fp32 cos/sin) keep
    # their dtype; autocast casts what each matmul needs, as it does without FSDP
    return policy(param_dtype=_HALF[precision], reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_data_parallel(model: nn.Module, zero_stage: int, parallel_state, device: torch.device,
                        precision: str = "fp32") -> nn.Module:
    """Apply the data-parallel engine of `zero_stage` over the SDP group.

    Stages 0/1 need materialised parameters (DDP broadcasts rank 0's at construction);
    stages 2/3 shard whatever the model holds, meta tensors included (materialised after).
    """
    if zero_stage in (0, 1):
        if parallel_state is None or parallel_state.sdp_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        kwargs = dict(process_group=parallel_state.sdp_group,
                      device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True)
        assert set(kwargs) <= set(DDP_KWARGS)
        return DDP(model, **kwargs)
    fully_shard, _ = _fsdp()

    # The GPT model returns its per-token loss as a transposed view; the loop never
    # modifies it in place, which is the only case FSDP2's warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    reshard = zero_stage == 3
    policy = mixed_precision_policy(precision)
    mesh = parallel_state.sdp_mesh
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    # the residual stream's dtype (the embedding output's) is set by parallelize_gpt's
    # residual_dtype hook, whatever the gathered weights' dtype
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def grad_sync_context(model: nn.Module, zero_stage: int, is_last_micro_batch: bool):
    """Defer the gradient all-reduce to the last micro-batch (DDP stages).

    FSDP stages reduce-scatter after every micro-batch on purpose: that keeps gradients
    sharded between micro-batches, which is the memory saving ZeRO-2/3 promise.
    """
    if zero_stage in (0, 1) and hasattr(model, "no_sync") and not is_last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def grads_are_sharded(zero_stage: int, sdp_size: int) -> bool:
    return zero_stage in SHARDED_GRAD_STAGES and sdp_size > 1


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def memory_breakdown(model: nn.Module, optimizer) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state (at rest, after a step).

    Under FSDP2 parameters and gradients are DTensors whose local shard is what the rank
    stores; ZeroRedundancyOptimizer keeps state only for its own partition in `.optim`.
    """
    params = list(model.parameters())
    inner = getattr(optimizer, "optim", optimizer)
    state = [v for s in inner.state.values() for v in s.values()
             if torch.is_tensor(v) and v.numel() > 1]  # the scalar step counters are not "state"
    return {
        "param_bytes": _bytes(params),
        "grad_bytes": _bytes(p.grad for p in params if p.grad is not None),
        "optimizer_bytes": _bytes(state),
    }


def zero_formula_bytes(num_params: int, zero_stage: int, n: int, bytes_per_value: int = 4) -> dict:
    """Expected per-rank bytes of params, grads and Adam state (2 values) for ZeRO over n ranks.

    With fp32 master weights there is no separate master copy: Adam's exp_avg and
    exp_avg_sq are the whole optimizer state (8 bytes per parameter). These are bytes at
    rest, between steps, which is what `memory_breakdown` measures. FSDP2 stores sharded
    parameters at rest for stage 2 as well; what separates stage 2 from 3 is that stage 2
    keeps each layer's gathered copy from forward to backward (the whole model's
    parameters at the peak), where stage 3 holds about one layer at a time.
    """
    p = num_params * bytes_per_value
    shard = lambda x: x / n  # noqa: E731
    return {
        "param_bytes": shard(p) if zero_stage >= 2 else p,
        "grad_bytes": shard(p) if zero_stage >= 2 else p,
        "optimizer_bytes": shard(2 * p) if zero_stage >= 1 else 2 * p,
    }
