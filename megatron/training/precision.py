"""Numeric precision of training: autocast for bf16/fp16, loss scaling for fp16.

Parameters, gradients and optimizer state stay fp32 in every mode (the "master weights");
bf16/fp16 apply to the matmuls through `torch.autocast`. fp16 gradients can overflow or
vanish, so fp16 multiplies the loss by a scale, checks the unscaled gradients through the
global gradient norm (a sharded gradient may overflow on one rank only), and skips the
step on every rank when that norm is not finite. The dynamic scaler follows Megatron's rules: back off by 2x after
`hysteresis` consecutive overflows, grow by 2x after `loss_scale_window` clean steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from megatron.config import OptimConfig


def autocast_context(cfg: OptimConfig, device_type: str):
    """`torch.autocast` for bf16/fp16, a no-op for fp32.

    The autocast weight cache is off: it keeps a low-precision copy of every fp32 weight it
    casts until the forward ends, a copy of the model's linear weights under ZeRO-0/1 (2.44 GiB
    per rank for the 1.3B script; see tools/estimate_memory.py --autocast-weight-cache). Under
    ZeRO-2/3 FSDP2 gathers bf16/fp16 weights, which autocast does not cast: nothing to cache.
    Without it, tensors autograd saves are kept as usual and only re-used weights (the tied
    embedding) are cast twice.
    """
    if cfg.bf16:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=False)
    if cfg.fp16:
        return torch.autocast(device_type=device_type, dtype=torch.float16, cache_enabled=False)
    return contextlib.nullcontext()


class ConstantLossScaler:
    """A fixed scale (1.0 for fp32/bf16, or fp16 with --loss-scale). Overflowing steps are still skipped."""

    def __init__(self, scale: float = 1.0) -> None:
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self._scale}

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])


class DynamicLossScaler(ConstantLossScaler):
    """Megatron's dynamic loss scale with hysteresis (a pure-Python state machine, easy to test)."""

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2) -> None:
        super().__init__(initial_scale)
        self.min_scale, self.growth_factor, self.backoff_factor = min_scale, growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def build_loss_scaler(cfg: OptimConfig) -> ConstantLossScaler:
    if not cfg.fp16:
        return ConstantLossScaler(1.0)
    if cfg.loss_scale is not None:
        return ConstantLossScaler(cfg.loss_scale)
    return DynamicLossScaler(initial_scale=cfg.initial_loss_scale, min_scale=cfg.min_loss_scale,
                             growth_interval=cfg.loss_scale_window, hysteresis=cfg.hysteresis)


def local_grads(params: Iterable[torch.nn.Parameter]) -> list:
    """This rank's gradient tensors (the local shard of DTensor gradients under FSDP2)."""
    out = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        out.append(g.to_local() if hasattr(g, "to_local") else g)
    return out


def unscale_(grads: list, scale: float) -> None:
    """Divide gradients by the loss scale in place. Overflow is detected from the global
    gradient norm (computed anyway for clipping and logging): it is inf/NaN on every rank
    as soon as any rank's shard holds one, so all ranks skip the same steps."""
    if grads and scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / scale)
