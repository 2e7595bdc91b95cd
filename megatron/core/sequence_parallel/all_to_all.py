"""The one differentiable all-to-all of sequence parallelism.

`exchange(x, in_splits, out_splits, group)` sends `in_splits[j]` rows of dim 0 of `x` to
rank j and returns the `out_splits[i]` rows received from each rank i, concatenated in
rank order. Its gradient is the same collective with the splits swapped (what rank i
sent to rank j comes back from j to i). Equal splits are the plain Ulysses case; uneven
splits carry head counts that do not divide the group size; `async_op=True` returns at
once and waits on first use of the result (head-chunk overlap), in backward as well.

`all_to_all(x, group, scatter_dim, gather_dim)` is the familiar equal-split form on top.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import comm


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, in_splits, out_splits, group, async_op: bool) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.async_op = (in_splits, out_splits), group, async_op
        return comm.all_to_all_rows(x, in_splits, out_splits, group, async_op=async_op)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        in_splits, out_splits = ctx.splits
        grad = comm.all_to_all_rows(grad, out_splits, in_splits, ctx.group, async_op=ctx.async_op)
        return grad, None, None, None, None


def exchange(x: torch.Tensor, in_splits: list[int] | None, out_splits: list[int] | None, group, *,
             async_op: bool = False) -> torch.Tensor:
    """All-to-all of the rows (dim 0) of `x`; None splits mean equal chunks. Differentiable."""
    return _Exchange.apply(x, in_splits, out_splits, group, async_op)


def all_to_all_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange the P slots of dim 0 of `x` ([p, ...]) across the P ranks of `group`."""
    p = dist.get_world_size(group)
    if x.shape[0] != p:
        raise ValueError(f"all_to_all_dim0 needs dim 0 of size {p} (the group size), got {tuple(x.shape)}")
    return exchange(x, None, None, group)


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


__all__ = ["all_to_all", "all_to_all_dim0", "exchange"]
