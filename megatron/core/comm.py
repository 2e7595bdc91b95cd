"""The one place where the project talks to other ranks.

Every collective the project issues goes through a function here, so that the bytes a
rank sends and the seconds it waits can be counted per kind of collective. Tests check
the all-to-all volume against the Ulysses formula exactly; benchmarks and the training
log read the time share of communication.

"Bytes sent" means bytes that leave this rank: for an all-to-all over P ranks, the
(P-1)/P of the input that goes to other ranks (the chunk a rank keeps is not sent).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

# torch >= 2.13 renamed all_gather_into_tensor; keep both working
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_bytes: dict[str, int] = defaultdict(int)
_calls: dict[str, int] = defaultdict(int)
_seconds: dict[str, float] = defaultdict(float)


def reset_counters() -> None:
    _bytes.clear()
    _calls.clear()
    _seconds.clear()


def bytes_sent(kind: str | None = None) -> int:
    """Bytes this rank sent since the last reset, for one kind or in total."""
    return _bytes[kind] if kind is not None else sum(_bytes.values())


def calls(kind: str) -> int:
    return _calls[kind]


def seconds(kind: str | None = None) -> float:
    """Wall seconds spent inside collectives (synchronous ones) since the last reset."""
    return _seconds[kind] if kind is not None else sum(_seconds.values())


def counters() -> dict[str, dict[str, float]]:
    kinds = set(_bytes) | set(_calls) | set(_seconds)
    return {k: {"bytes": _bytes[k], "calls": _calls[k], "seconds": _seconds[k]} for k in sorted(kinds)}


@contextmanager
def _record(kind: str, nbytes: int):
    start = time.perf_counter()
    try:
        yield
    finally:
        _seconds[kind] += time.perf_counter() - start
        _bytes[kind] += int(nbytes)
        _calls[kind] += 1


def world_size(group) -> int:
    return dist.get_world_size(group)


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all along dim 0: chunk j of `input` goes to rank j of `group`."""
    p = dist.get_world_size(group)
    nbytes = input.numel() * input.element_size() * (p - 1) // p
    with _record("all_to_all", nbytes):
        dist.all_to_all_single(output, input, group=group)
    return output


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce. Bytes counted as a ring algorithm sends them: 2 (P-1)/P of the tensor."""
    p = dist.get_world_size(group)
    nbytes = 2 * tensor.numel() * tensor.element_size() * (p - 1) // p
    with _record(kind, nbytes):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_along(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim` (rank order). Not differentiable."""
    p = dist.get_world_size(group)
    if p == 1:
        return tensor
    x = tensor.movedim(dim, 0).contiguous()  # [n, ...]
    out = torch.empty((p * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _record("all_gather", x.numel() * x.element_size() * (p - 1)):
        _all_gather_single(out, x, group=group)
    return out.movedim(0, dim)  # [p*n, ...] -> original layout with dim grown p-fold


def all_gather_object(obj, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    with _record("all_gather_object", 0):
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    p = dist.get_world_size(group)
    nbytes = tensor.numel() * tensor.element_size() if dist.get_rank() == src and p > 1 else 0
    with _record("broadcast", nbytes):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def barrier(group=None) -> None:
    with _record("barrier", 0):
        dist.barrier(group=group)


def all_to_all_single_async(input: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 that returns at once.

    The result is a functional-collective tensor that waits for the data the first time it
    is used, so computation issued in between overlaps with the transfer. Seconds are not
    recorded (the wait happens elsewhere); bytes are.
    """
    import torch.distributed._functional_collectives as fc

    p = dist.get_world_size(group)
    _bytes["all_to_all"] += input.numel() * input.element_size() * (p - 1) // p
    _calls["all_to_all"] += 1
    return fc.all_to_all_single(input.contiguous(), None, None, group)


def all_to_all_single_uneven(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                             input_split_sizes: list[int], group) -> torch.Tensor:
    """All-to-all along dim 0 with per-rank split sizes (uneven head splits under Ulysses).

    Counted as kind "all_to_all" like the equal-split one, so the Ulysses volume of a
    layer is one number whichever path moved it; only the splits for other ranks count.
    """
    me = dist.get_rank(group)
    row = input[0].numel() if input.dim() > 1 else 1
    nbytes = (sum(input_split_sizes) - input_split_sizes[me]) * row * input.element_size()
    with _record("all_to_all", nbytes):
        if len(set(input_split_sizes)) == 1 and len(set(output_split_sizes)) == 1:
            dist.all_to_all_single(output, input, group=group)
        else:
            dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group)
    return output


class PendingShift:
    """An in-flight ring exchange; `wait()` returns the tensor received from the previous rank.

    Its seconds are counted at `wait()`, i.e. only the time the caller was actually blocked
    (the transfer overlaps whatever ran between the start and the wait).
    """

    def __init__(self, works, sent: torch.Tensor, received: torch.Tensor, kind: str) -> None:
        self._works, self._sent, self._received, self._kind = works, sent, received, kind

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        for work in self._works:
            work.wait()
        _seconds[self._kind] += time.perf_counter() - start
        self._works, self._sent = [], None  # the send buffer may be freed now
        return self._received


def ring_shift(tensor: torch.Tensor, group, *, tag: int = 0, kind: str = "ring_p2p") -> PendingShift:
    """Asynchronously send `tensor` to the next rank of `group` and receive the previous rank's.

    Ring attention passes K/V blocks (and, in backward, their gradient accumulators) one hop
    per step with this; `tag` keeps two exchanges in flight between the same ranks apart.
    The caller must not modify `tensor` before `wait()`.
    """
    p = dist.get_world_size(group)
    me = dist.get_rank(group)
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    nxt = dist.get_global_rank(group, (me + 1) % p) if group is not None else (me + 1) % p
    prv = dist.get_global_rank(group, (me - 1) % p) if group is not None else (me - 1) % p
    _bytes[kind] += tensor.numel() * tensor.element_size()
    _calls[kind] += 1
    works = [dist.isend(tensor, nxt, group=group, tag=tag), dist.irecv(received, prv, group=group, tag=tag)]
    return PendingShift(works, tensor, received, kind)
