"""Learning-rate schedule: linear warmup, then constant / linear / cosine / inverse-sqrt decay.

Steps are counted from 1: `lr(k)` is the rate used by the k-th optimizer step. Warmup
steps use `lr * k / warmup`, so the first step already learns (Megatron's first warmup
step uses 0) and the last warmup step uses the peak. After warmup, step k uses the rate
decayed over the k - 1 steps before it, as in Megatron: without warmup the first step
uses the peak, and step `decay_steps + 1` is the first at `min_lr`. Values are a pure function of the
step, so a resumed run reproduces the schedule without saving any scheduler state.
"""

from __future__ import annotations

import math

from megatron.config import OptimConfig


class LRSchedule:
    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 style: str = "cosine") -> None:
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        self.style = style

    @classmethod
    def from_config(cls, cfg: OptimConfig) -> LRSchedule:
        return cls(cfg.lr, cfg.min_lr, cfg.lr_warmup_steps, cfg.lr_decay_steps, cfg.lr_decay_style)

    def __call__(self, step: int) -> float:
        """Rate for the `step`-th optimizer step (1-based)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        done = step - 1  # steps completed before this one
        if self.style == "inverse-square-root":
            # continuous at the end of warmup; min_lr is a floor
            w = max(self.warmup_steps, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(w) / math.sqrt(max(done, w)))
        if done >= self.decay_steps:
            return self.min_lr
        span = self.decay_steps - self.warmup_steps
        ratio = (done - self.warmup_steps) / span if span > 0 else 1.0
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def apply(self, optimizer, step: int) -> float:
        """Set the rate of every param group for `step`; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
