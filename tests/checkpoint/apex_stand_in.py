"""A CPU stand-in for NVIDIA apex's `apex.optimizers.FusedAdam`, with its interface, not its code.

Read from apex/optimizers/fused_adam.py (github.com/NVIDIA/apex at 6424da3b) and kept
identical in what callers can observe:
- constructor: `FusedAdam(params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
  adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True, capturable=False,
  master_weights=False)`; amsgrad raises RuntimeError; param-group defaults are lr,
  bias_correction, betas, eps, weight_decay (no `fused` / `foreach` keys);
- `zero_grad(self)` takes no argument (grads set to None when set_grad_none);
- Adam's step count is an int in each param group (`group["step"]`, incremented before the
  update, for a group with parameters); per-parameter state holds only `exp_avg` and
  `exp_avg_sq`, created as fp32 zeros on the first step;
- `step(closure=None, grads=None, output_params=None, scale=None, grad_norms=None,
  grad_scaler=None)`; the deprecated arguments raise RuntimeError.
The update is the AdamW formula of apex's multi_tensor_adam kernel (ADAM_MODE_1), in torch
ops on CPU instead of the CUDA multi-tensor launch.
"""

from __future__ import annotations

import torch


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True, capturable=False, master_weights=False):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        if capturable or master_weights:
            raise NotImplementedError("the stand-in covers the non-capturable path the project uses")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.capturable = capturable
        self.master_weights = master_weights

    def zero_grad(self):
        if self.set_grad_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
        else:
            super().zero_grad()

    @torch.no_grad()
    def step(self, closure=None, grads=None, output_params=None, scale=None, grad_norms=None, grad_scaler=None):
        if any(p is not None for p in [grads, output_params, scale, grad_norms]):
            raise RuntimeError("FusedAdam has been updated.  Simply initialize it identically to torch.optim.Adam, "
                               "and call step() with no arguments.")
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            group["step"] = group["step"] + 1 if "step" in group else 1
            beta1, beta2 = group["betas"]
            step = group["step"]
            c1 = 1 - beta1 ** step if group["bias_correction"] else 1.0
            c2 = 1 - beta2 ** step if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p).float()
                    state["exp_avg_sq"] = torch.zeros_like(p).float()
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if not self.adam_w_mode and group["weight_decay"]:
                    g = g + group["weight_decay"] * p.float()
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / c1) / ((v / c2).sqrt() + group["eps"])
                if self.adam_w_mode and group["weight_decay"]:
                    update = update + group["weight_decay"] * p.float()
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def install(monkeypatch=None):
    """Make megatron's optimizer builder find this class as apex's FusedAdam (CUDA checks included).
    Returns a function that undoes it (for pool workers, which outlive one test)."""
    from megatron.training import optimizer as opt  # noqa: PLC0415

    original = opt.apex_fused_adam
    if monkeypatch is not None:
        monkeypatch.setattr(opt, "apex_fused_adam", lambda: FusedAdam)
        return lambda: None
    opt.apex_fused_adam = lambda: FusedAdam

    def undo():
        opt.apex_fused_adam = original
    return undo
