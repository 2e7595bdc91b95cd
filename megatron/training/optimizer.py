"""AdamW, the global gradient norm and clipping.

Weight decay applies to matrices and embeddings, not to biases or norm weights (Megatron's
rule). The optimizer implementation is the fastest available: apex FusedAdam on CUDA when
NVIDIA apex is installed (stages 0 and 1, whose parameters are plain tensors), otherwise
torch AdamW with `fused=True` (CPU and CUDA kernels), falling back to `foreach`.
ZeRO-1 wraps it in ZeroRedundancyOptimizer over the SDP group: each rank keeps Adam
state for, and updates, one partition of the parameters and broadcasts them after.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.distributed as dist
from torch import nn

from megatron.config import OptimConfig
from megatron.core import comm
from megatron.training.precision import local_grads


def param_groups(model: nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _apex_fused_adam():
    if not torch.cuda.is_available() or importlib.util.find_spec("apex") is None:
        return None
    try:
        from apex.optimizers import FusedAdam  # noqa: PLC0415
    except ImportError:  # the unrelated PyPI package called "apex", or a CPU-only build
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, cfg: OptimConfig, zero_stage: int, parallel_state):
    """Optimizer for the (already wrapped) model; returns (optimizer, implementation name)."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    apex_adam = _apex_fused_adam() if zero_stage in (0, 1) else None
    if apex_adam is not None:
        cls, extra, name = apex_adam, {"adam_w_mode": True}, "apex.FusedAdam"
    else:
        cls, extra, name = torch.optim.AdamW, {"fused": True}, "torch.AdamW(fused)"
        if not _fused_supported(model):
            extra, name = {"foreach": True}, "torch.AdamW(foreach)"
    if zero_stage == 1 and parallel_state.sdp_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: PLC0415

        opt = ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=parallel_state.sdp_group,
                                      **kw, **extra)
        return opt, f"ZeroRedundancyOptimizer[{name}]"
    return cls(groups, **kw, **extra), name


def _fused_supported(model: nn.Module) -> bool:
    """Fused AdamW needs plain tensors on a supported device (DTensor params go to foreach)."""
    p = next(model.parameters())
    if hasattr(p, "to_local"):
        return False
    try:
        probe = nn.Parameter(torch.zeros(2, device=p.device))
        probe.grad = torch.zeros(2, device=p.device)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def global_grad_norm(params: list, sharded: bool, group) -> float:
    """L2 norm of the full gradient. Sharded (FSDP) gradients add squared norms over `group`.

    Replicated gradients (DDP, ZeRO-1) are identical on every rank after the all-reduce,
    so their norm needs no communication. Returns inf/NaN if any rank holds one.
    """
    grads = local_grads(params)
    if grads:  # float64: squaring a large fp32 norm must not overflow by itself
        sq = torch.stack([n.double() for n in torch._foreach_norm(grads)]).square().sum().reshape(1)
    else:  # FSDP can leave a rank without any element of a small parameter
        sq = torch.zeros(1, dtype=torch.float64, device=params[0].device)
    if sharded and dist.get_world_size(group) > 1:
        comm.all_reduce(sq, group=group, kind="all_reduce_grad_norm")
    return math.sqrt(sq.item()) if math.isfinite(sq.item()) else float(sq.item())


def clip_gradients_(params: list, max_norm: float, total_norm: float) -> None:
    """Scale gradients so their global norm is at most `max_norm` (0 disables clipping)."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(local_grads(params), coef)
