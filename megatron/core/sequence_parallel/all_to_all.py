"""Differentiable all-to-all for Ulysses sequence parallelism.

An equal-split all-to-all along dim 0 is its own inverse (chunk j of rank i lands in
slot i of rank j, and the same exchange brings it back), so the backward pass is the
same collective applied to the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import comm


class _AllToAllDim0(torch.autograd.Function):
    """All-to-all of a `[p, ...]` tensor: slot j goes to rank j, slot i receives from rank i."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        return comm.all_to_all_single(out, x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        return comm.all_to_all_single(out, grad, ctx.group), None


def all_to_all_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange the P slots of dim 0 of `x` ([p, ...]) across the P ranks of `group`."""
    p = dist.get_world_size(group)
    if x.shape[0] != p:
        raise ValueError(f"all_to_all_dim0 needs dim 0 of size {p} (the group size), got {tuple(x.shape)}")
    return _AllToAllDim0.apply(x, group)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` along `scatter_dim` into P chunks, send chunk j to rank j, and concatenate
    the chunks received (in rank order) along `gather_dim`. Differentiable.

    With `[s/p, b, h, d]`, scatter_dim=2 and gather_dim=0 give `[s, b, h/p, d]`; the
    inverse call (scatter_dim=0, gather_dim=2) brings the output back.
    """
    p = dist.get_world_size(group)
    if p == 1:
        return x
    nd = x.dim()
    scatter_dim %= nd
    gather_dim %= nd
    shape = list(x.shape)
    if shape[scatter_dim] % p:
        raise ValueError(
            f"cannot split dim {scatter_dim} of size {shape[scatter_dim]} evenly over {p} ranks "
            f"(tensor shape {tuple(x.shape)})"
        )
    chunk = shape[scatter_dim] // p
    # [..., n, ...] -> [..., p, n/p, ...] -> [p, ..., n/p, ...]
    x = x.reshape(shape[:scatter_dim] + [p, chunk] + shape[scatter_dim + 1:]).movedim(scatter_dim, 0)
    y = all_to_all_dim0(x, group)  # [p (source rank), ..., n/p, ...]
    rest = shape[:scatter_dim] + [chunk] + shape[scatter_dim + 1:]
    # [p, ..., m, ...] -> [..., p, m, ...] -> [..., p*m, ...]
    y = y.movedim(0, gather_dim)
    return y.reshape(rest[:gather_dim] + [p * rest[gather_dim]] + rest[gather_dim + 1:])
