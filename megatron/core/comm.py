"""The one place where the project talks to other ranks.

Every collective the project issues goes through a function here, so that the bytes a
rank sends and the seconds it waits can be counted per kind of collective. Tests check
the all-to-all volume against the Ulysses formula exactly; benchmarks and the training
log read the time share of communication.

"Bytes sent" means bytes that leave this rank: for an all-to-all over P ranks, the
(P-1)/P of the input that goes to other ranks (the chunk a rank keeps is not sent).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron.core.device_timing import TimedRegions

# torch >= 2.13 renamed all_gather_into_tensor; keep both working
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_bytes: dict[str, int] = defaultdict(int)
_calls: dict[str, int] = defaultdict(int)
# seconds per kind; on CUDA read back from event pairs only when asked (once per logged iteration)
_timing = TimedRegions(max_pending=512)


def reset_counters() -> None:
    _bytes.clear()
    _calls.clear()
    _timing.clear()


def bytes_sent(kind: str | None = None) -> int:
    """Bytes this rank sent since the last reset, for one kind or in total."""
    return _bytes[kind] if kind is not None else sum(_bytes.values())


def calls(kind: str) -> int:
    return _calls[kind]


def seconds(kind: str | None = None) -> float:
    """Seconds spent inside synchronous collectives since the last reset.

    On CPU (gloo) this is wall time around the call. On CUDA the call only enqueues work,
    so the time is measured with CUDA events on the current stream around the collective
    (which waits for NCCL to finish): reading it synchronizes with the GPU, so call this
    once per logged iteration, not per micro-batch.
    """
    return _timing.seconds(kind) if kind is not None else sum(_timing.seconds(k) for k in _timing.names())


def counters() -> dict[str, dict[str, float]]:
    kinds = set(_bytes) | set(_calls) | _timing.names()
    return {k: {"bytes": _bytes[k], "calls": _calls[k], "seconds": seconds(k)} for k in sorted(kinds)}


@contextmanager
def _record(kind: str, nbytes: int, device: torch.device | None = None):
    _bytes[kind] += int(nbytes)
    _calls[kind] += 1
    with _timing.region(kind, cuda=device is not None and device.type == "cuda"):
        yield


def _check_device(tensor: torch.Tensor, group, what: str) -> None:
    """NCCL reduces only CUDA tensors: fail here, naming the call, instead of deep inside NCCL."""
    if tensor.device.type != "cuda" and dist.get_backend(group) == "nccl":
        raise RuntimeError(f"{what}: a {tensor.device.type} tensor was passed to an NCCL collective; create "
                           "it on the group's device (torch.cuda.current_device())")


def world_size(group) -> int:
    return dist.get_world_size(group)


def all_to_all_rows(input: torch.Tensor, in_splits: list[int] | None, out_splits: list[int] | None, group,
                    *, async_op: bool = False) -> torch.Tensor:
    """All-to-all along dim 0: `in_splits[j]` rows go to rank j; rows from rank i arrive in
    rank order (`out_splits[i]` of them). None splits mean P equal chunks.

    The only all-to-all of the project (kind "all_to_all"). Bytes counted are the rows that
    leave this rank. With `async_op` the call returns at once: the result is a functional-
    collective tensor that waits for its data the first time it is used, so work issued in
    between overlaps the transfer (its wait is not timed).
    """
    _check_device(input, group, "all_to_all")
    p, me = dist.get_world_size(group), dist.get_rank(group)
    input = input.contiguous()
    row = input[0].numel() * input.element_size() if input.dim() > 1 else input.element_size()
    if in_splits is None:
        if input.shape[0] % p:
            raise ValueError(f"all_to_all: dim 0 ({input.shape[0]}) is not divisible by the group size {p}")
        nbytes = input.shape[0] // p * (p - 1) * row
    else:
        nbytes = (sum(in_splits) - in_splits[me]) * row
    even = in_splits is None or (len(set(in_splits)) == 1 and len(set(out_splits)) == 1)
    ins, outs = (None, None) if even else (list(in_splits), list(out_splits))
    if async_op:
        import torch.distributed._functional_collectives as fc  # noqa: PLC0415

        _bytes["all_to_all"] += nbytes
        _calls["all_to_all"] += 1
        return fc.all_to_all_single(input, outs, ins, group)
    rows = input.shape[0] if out_splits is None else sum(out_splits)
    output = input.new_empty((rows,) + tuple(input.shape[1:]))
    with _record("all_to_all", nbytes, input.device):
        if even:
            dist.all_to_all_single(output, input, group=group)
        else:
            dist.all_to_all_single(output, input, outs, ins, group=group)
    return output


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce. Bytes counted as a ring algorithm sends them: 2 (P-1)/P of the tensor."""
    _check_device(tensor, group, kind)
    p = dist.get_world_size(group)
    nbytes = 2 * tensor.numel() * tensor.element_size() * (p - 1) // p
    with _record(kind, nbytes, tensor.device):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_along(tensor: torch.Tensor, dim: int, group, kind: str = "all_gather") -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim` (rank order). Not differentiable."""
    p = dist.get_world_size(group)
    if p == 1:
        return tensor
    _check_device(tensor, group, kind)
    x = tensor.movedim(dim, 0).contiguous()  # [n, ...]
    out = torch.empty((p * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _record(kind, x.numel() * x.element_size() * (p - 1), x.device):
        _all_gather_single(out, x, group=group)
    return out.movedim(0, dim)  # [p*n, ...] -> original layout with dim grown p-fold


def all_gather_object(obj, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    with _record("all_gather_object", 0):
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    _check_device(tensor, group, "broadcast")
    p = dist.get_world_size(group)
    nbytes = tensor.numel() * tensor.element_size() if dist.get_rank() == src and p > 1 else 0
    with _record("broadcast", nbytes, tensor.device):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def barrier(group=None) -> None:
    with _record("barrier", 0):
        dist.barrier(group=group)


class PendingShift:
    """An in-flight ring exchange; `wait()` returns the tensor received from the previous rank.

    Its seconds are counted at `wait()`, i.e. only the time the caller was actually blocked
    (the transfer overlaps whatever ran between the start and the wait); on CUDA, where `wait()`
    only makes the current stream wait, as the GPU time of that wait (CUDA events).
    """

    def __init__(self, works, sent: torch.Tensor, received: torch.Tensor, kind: str) -> None:
        self._works, self._sent, self._received, self._kind = works, sent, received, kind

    def wait(self) -> torch.Tensor:
        with _timing.region(self._kind, cuda=self._received.is_cuda):
            for work in self._works:
                work.wait()
        self._works, self._sent = [], None  # the send buffer may be freed now
        return self._received


def ring_shift(tensor: torch.Tensor, group, *, tag: int = 0, kind: str = "ring_p2p") -> PendingShift:
    """Asynchronously send `tensor` to the next rank of `group` and receive the previous rank's.

    Ring attention passes K/V blocks (and, in backward, their gradient accumulators) one hop
    per step with this; `tag` keeps two exchanges in flight between the same ranks apart on
    gloo (NCCL matches point-to-point messages by issue order, which both ends share). The
    send and the receive go out as one `batch_isend_irecv`: NCCL needs a rank's matching
    send and receive grouped, or a ring of 2 can deadlock on large blocks and rings of 3+ on
    the lazy creation of their communicators. The caller must not modify `tensor` before `wait()`.
    """
    _check_device(tensor, group, kind)
    p = dist.get_world_size(group)
    me = dist.get_rank(group)
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    nxt = dist.get_global_rank(group, (me + 1) % p) if group is not None else (me + 1) % p
    prv = dist.get_global_rank(group, (me - 1) % p) if group is not None else (me - 1) % p
    _bytes[kind] += tensor.numel() * tensor.element_size()
    _calls[kind] += 1
    ops = [dist.P2POp(dist.isend, tensor, nxt, group=group, tag=tag),
           dist.P2POp(dist.irecv, received, prv, group=group, tag=tag)]
    return PendingShift(dist.batch_isend_irecv(ops), tensor, received, kind)
