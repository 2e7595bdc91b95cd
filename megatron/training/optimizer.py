"""AdamW, the global gradient norm and clipping.

Weight decay applies to matrices and embeddings, not to biases or norm weights (Megatron's
rule). The implementation is torch AdamW with `fused=True` (CPU and CUDA kernels), or
`foreach` where fused cannot run (FSDP's DTensor parameters). NVIDIA apex FusedAdam is used
only when asked for (`--optimizer-impl apex`: CUDA, stages 0 and 1, whose parameters are
plain tensors), never because it happens to be installed. Its interface differs from
torch's in three ways the rest of the code respects: `zero_grad()` takes no argument (see
`zero_grad`), Adam's step count lives in each param group (`group["step"]`, an int) instead
of per parameter, and its state holds only `exp_avg` / `exp_avg_sq` (fp32); the checkpoint
code stores the step per parameter either way (megatron/checkpoint/state.py).
ZeRO-1 wraps it in ZeroRedundancyOptimizer over the SDP group: each rank keeps Adam
state for, and updates, one partition of the parameters and broadcasts them after.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math

import torch
import torch.distributed as dist
from torch import nn

from megatron.config import ConfigError, OptimConfig
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


_APEX_FIX = ("build NVIDIA apex from source with its CUDA extensions (in a clone of github.com/NVIDIA/apex: "
             "APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation .), or drop "
             "--optimizer-impl apex: the default torch AdamW is fused too")


def apex_fused_adam():
    """`apex.optimizers.FusedAdam`, checked to be usable here; ConfigError naming what is missing.

    Checked without creating a CUDA context (flags are validated before each rank picks its
    GPU): a CUDA device, the package, and its compiled `amp_C` extension, whose absence
    (a Python-only build) makes FusedAdam's constructor raise RuntimeError, not ImportError.
    """
    if not torch.cuda.is_available():
        raise ConfigError("--optimizer-impl apex needs a CUDA GPU (apex FusedAdam has no CPU kernel); drop the "
                          "flag to use torch AdamW")
    if importlib.util.find_spec("apex") is None:
        raise ConfigError(f"--optimizer-impl apex: NVIDIA apex is not installed; {_APEX_FIX}")
    try:
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: PLC0415
        from apex.optimizers import FusedAdam  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 (the unrelated PyPI "apex" package, or a broken build)
        raise ConfigError(f"--optimizer-impl apex: `from apex.optimizers import FusedAdam` fails "
                          f"({type(e).__name__}: {e}); the package named apex on PyPI is an unrelated project. "
                          f"{_APEX_FIX}") from e
    if not getattr(multi_tensor_applier, "available", False):
        why = getattr(multi_tensor_applier, "import_err", "amp_C is missing")
        raise ConfigError(f"--optimizer-impl apex: apex is installed without its CUDA extensions (a Python-only "
                          f"build: {why}), so FusedAdam cannot run; {_APEX_FIX}")
    return FusedAdam


@functools.cache
def _zero_grad_takes_set_to_none(cls: type) -> bool:
    return "set_to_none" in inspect.signature(cls.zero_grad).parameters


def zero_grad(optimizer) -> None:
    """Drop all gradients (set them to None), whatever the optimizer's zero_grad signature:
    apex FusedAdam's is `zero_grad(self)` and sets grads to None because `build_optimizer`
    passes `set_grad_none=True`."""
    if _zero_grad_takes_set_to_none(type(optimizer)):
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.zero_grad()


def build_optimizer(model: nn.Module, cfg: OptimConfig, zero_stage: int, parallel_state):
    """Optimizer for the (already wrapped) model; returns (optimizer, implementation name)."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer_impl == "apex":
        if zero_stage not in (0, 1):
            raise ConfigError(f"--optimizer-impl apex works with --zero-stage 0 or 1, got {zero_stage}")
        # apex's own keywords: AdamW-style decay, bias correction, grads set to None by zero_grad()
        cls, name = apex_fused_adam(), "apex.FusedAdam"
        extra = {"adam_w_mode": True, "bias_correction": True, "set_grad_none": True}
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
