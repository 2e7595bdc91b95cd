"""DistributedAttention: Ulysses all-to-all around any local attention.

Drop-in for DeepSpeed's `deepspeed.sequence.layer.DistributedAttention`: same constructor
`(local_attention, sequence_process_group, scatter_idx=2, gather_idx=0)` and call
`dist_attn(query, key, value, *args, **kwargs)`, extra arguments passed to the local
attention untouched. Differences, all invisible to callers:

* Q, K and V travel in one all-to-all (one latency instead of three) whenever they share
  sequence length, batch, head dim and dtype, GQA included: per destination rank its Q
  heads, then its K and V heads.
* Head counts need not divide P (heads.py): with fewer K/V heads than P the K/V heads are
  replicated just enough (their gradients summed back), and query heads that do not divide
  P travel with per-rank split sizes. Only heads < P is refused (ring attention lifts it).
* `overlap_chunks=K` pipelines the exchange over K head chunks: every chunk's all-to-all is
  issued up front without waiting, chunk c's attention runs while later chunks are in
  flight, and its output goes back at once; the backward mirrors it (same bytes, K-1 more
  latencies; `benchmarks/bench_overlap.py` measures the effect).
* Shapes are validated with clear errors (same local sequence length on every rank, checked
  once per distinct shape; 4-D inputs; caller in the group).

Everything goes through one packer and one differentiable all-to-all (all_to_all.exchange):
plain Ulysses is the head plan whose ranks get equal, regularly spaced runs of heads, which
packs with a single copy into `[P, tokens, ..., heads, d]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import comm
from megatron.core.sequence_parallel.all_to_all import exchange
from megatron.core.sequence_parallel.heads import HeadPlan, plan_heads

_LAYOUTS = {0: "[s/p, b, heads, d]", 1: "[b, s/p, heads, d]"}


# --- packing -------------------------------------------------------------------------------

def _regular(runs: tuple[tuple[int, ...], ...], total: int) -> tuple[int, int] | None:
    """(offset, n) if rank u's heads are `[u total/P + offset, ... + n)` for every u, else None."""
    p = len(runs)
    if total % p:
        return None
    n, offset = len(runs[0]), runs[0][0] if runs[0] else 0
    for u, heads in enumerate(runs):
        if heads != tuple(range(u * total // p + offset, u * total // p + offset + n)):
            return None
    return offset, n


def _select_heads(t: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """`t[:, :, heads]`, a view when the heads are a contiguous run (gradients of copies add up)."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return t.narrow(2, heads[0], len(heads))
    return t.index_select(2, torch.tensor(heads, device=t.device))


def _pack(tensors: list[torch.Tensor], runs: list[tuple]) -> tuple[torch.Tensor, list[int] | None]:
    """Flat send buffer: for each destination rank u, the heads `runs[i][u]` of every tensor i.

    Returns (buffer, per-destination element counts, None when equal). Inputs `[s/p, b, h_i, d]`
    (seq_dim 0) or `[b, s/p, h_i, d]`; a destination's block is `[s/p, b, sum_i h_i(u), d]`.
    """
    p = len(runs[0])
    regular = [_regular(r, t.shape[2]) for t, r in zip(tensors, runs)]
    if all(x is not None for x in regular):
        # [.., .., h, d] -> [.., .., p, h/p, d] -> my slice of each rank's run -> [p, .., .., n, d]
        parts = [t.unflatten(2, (p, -1)).narrow(3, off, n).movedim(2, 0) for t, (off, n) in zip(tensors, regular)]
        return torch.cat(parts, dim=3).reshape(-1), None  # one copy: [p, .., .., sum n, d]
    blocks = [torch.cat([_select_heads(t, r[u]) for t, r in zip(tensors, runs)], dim=2).reshape(-1)
              for u in range(p)]  # per destination [.., .., c_u, d], flat
    return torch.cat(blocks), [blk.numel() for blk in blocks]


def _received(recv: torch.Tensor, p: int, shard: torch.Tensor, channels: int, seq_dim: int) -> torch.Tensor:
    """The flat buffer of p equal source blocks as the full sequence `[s, b, c, d]` (or `[b, s, c, d]`)."""
    # every source sent its s/p tokens: [p, s/p, b, c, d] (or [p, b, s/p, c, d])
    blocks = recv.view(p, *shard.shape[:2], channels, shard.shape[3])
    if seq_dim == 0:
        return blocks.flatten(0, 1)  # [s, b, c, d], a view: sources are consecutive token blocks
    return blocks.movedim(0, 1).flatten(1, 2)  # [b, p, s/p, c, d] -> [b, s, c, d]


class DistributedAttention(nn.Module):
    """Run `local_attention` on full sequences for a 1/P slice of the heads.

    Inputs are sequence shards `[s/p, b, heads, d]` (gather_idx=0) or `[b, s/p, heads, d]`
    (gather_idx=1); the local attention receives `[s, b, heads/p, d]` or
    `[b, s, heads/p, d]`; the output comes back in the input layout with all heads.

    `check_shapes=True` proves once per distinct local shape (one tiny all-gather on the
    inputs' device) that every rank holds the same number of tokens: a mismatch would
    otherwise corrupt the all-to-all or hang.
    """

    def __init__(
        self,
        local_attention: Callable[..., torch.Tensor],
        sequence_process_group=None,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        *,
        fuse_qkv: bool = True,
        check_shapes: bool = True,
        overlap_chunks: int = 1,
    ) -> None:
        super().__init__()
        if scatter_idx != 2 or gather_idx not in _LAYOUTS:
            raise ValueError(
                f"DistributedAttention supports scatter_idx=2 (heads) with gather_idx=0 for "
                f"{_LAYOUTS[0]} or gather_idx=1 for {_LAYOUTS[1]}; got scatter_idx={scatter_idx}, "
                f"gather_idx={gather_idx}"
            )
        if overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be >= 1, got {overlap_chunks}")
        group = sequence_process_group if sequence_process_group is not None else dist.group.WORLD
        if dist.is_initialized() and dist.get_rank(group) < 0:
            raise ValueError(
                f"rank {dist.get_rank()} is not a member of the sequence_process_group given to "
                "DistributedAttention: pass this rank's own SP group "
                "(parallel_state.get_sequence_parallel_group())"
            )
        self.local_attn = local_attention
        self.spg = group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.fuse_qkv = fuse_qkv
        self.check_shapes = check_shapes
        self.overlap_chunks = overlap_chunks
        self._plans: dict = {}
        self._checked: set = set()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.spg)

    def head_plans(self, num_heads: int, num_kv_heads: int) -> list[HeadPlan]:
        """The head plan of this group for these head counts, split into the overlap chunks."""
        key = (num_heads, num_kv_heads)
        if key not in self._plans:
            self._plans[key] = plan_heads(num_heads, num_kv_heads, self.world_size).chunk(self.overlap_chunks)
        return self._plans[key]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        p = self.world_size
        self._validate(query, key, value, p)
        if p == 1:
            return self.local_attn(query, key, value, *args, **kwargs)
        plans = self.head_plans(query.shape[2], key.shape[2])
        overlap = len(plans) > 1
        in_flight = [self._scatter(query, key, value, plan, overlap) for plan in plans]
        outs = []
        for plan, (q, k, v) in zip(plans, in_flight):
            out = self.local_attn(q(), k(), v(), *args, **kwargs)
            if out.dim() == 3:  # local attention returned merged heads [.., .., h_me * d]
                out = out.unflatten(-1, (-1, query.shape[3]))
            outs.append(self._gather(out, plan, overlap))
        return self._combine(outs, plans)

    # --- the two exchanges -----------------------------------------------------------------

    def _scatter(self, query, key, value, plan: HeadPlan, async_op: bool):
        """Send heads to their ranks and gather the sequence; returns three thunks for q, k, v
        (`[s, b, h_me, d]`), evaluated when the attention needs them (which waits if async)."""
        p, me, seq_dim = plan.size, dist.get_rank(self.spg), self.gather_idx
        groups = [[(query, plan.q_heads), (key, plan.kv_heads), (value, plan.kv_heads)]]
        if not (self.fuse_qkv and _fusable(query, key, value)):
            groups = [[g] for g in groups[0]]  # one all-to-all per tensor
        thunks = []
        for group in groups:
            tensors, runs = [t for t, _ in group], [r for _, r in group]
            send, in_splits = _pack(tensors, runs)
            widths = [len(r[me]) for r in runs]
            out_splits = None if in_splits is None else [_block(tensors[0], sum(widths))] * p
            recv = exchange(send, in_splits, out_splits, self.spg, async_op=async_op)
            thunks.append(_Unpacked(recv, p, tensors[0], widths, seq_dim))
        if len(thunks) == 1:
            return [thunks[0].part(i) for i in range(3)]
        return [t.part(0) for t in thunks]

    def _gather(self, out: torch.Tensor, plan: HeadPlan, async_op: bool):
        """Send each rank's tokens of my heads back: `[s, b, h_me, d]` out, from every source rank u
        its heads of my tokens in. Returns (flat received buffer, my shard's shape, heads per
        source); `_combine` lays them out as `[s/p, b, H, d]`."""
        p, seq_dim = plan.size, self.gather_idx
        # [s, b, h_me, d] -> p x [s/p, b, h_me, d]; destination j gets the tokens of rank j
        chunks = out.chunk(p, dim=seq_dim)
        send = torch.cat([c.reshape(-1) for c in chunks]) if seq_dim == 1 else out.reshape(-1)
        widths = [len(h) for h in plan.q_heads]
        shard = list(chunks[0].shape)
        per_head = chunks[0].numel() // max(1, shard[2])
        even = len(set(widths)) == 1
        out_splits = None if even else [per_head * w for w in widths]
        in_splits = None if even else [chunks[0].numel()] * p
        return exchange(send, in_splits, out_splits, self.spg, async_op=async_op), shard, widths

    def _combine(self, outs: list, plans: list[HeadPlan]) -> torch.Tensor:
        """All heads of my tokens, `[s/p, b, H, d]` (or `[b, s/p, H, d]`), in global head order."""
        pieces = []
        for recv, shard, widths in outs:
            if len(set(widths)) == 1:  # [p, s/p, b, n, d] -> [s/p, b, p, n, d] (rank-major heads)
                pieces.append(recv.view(len(widths), *shard[:2], widths[0], shard[3]).movedim(0, 2))
            else:  # uneven heads: per source [s/p, b, h_u, d], concatenated in rank order
                parts = [flat.view(*shard[:2], w, shard[3]) for flat, w in
                         zip(recv.split([shard[0] * shard[1] * w * shard[3] for w in widths]), widths)]
                return torch.cat(parts, dim=2)  # a single plan: no chunks
        if len(pieces) == 1:
            return pieces[0].flatten(2, 3)  # [s/p, b, p, n, d] -> [s/p, b, H, d]
        # chunk c holds sub-run c of every rank's heads: [s/p, b, p, K, n, d] -> [s/p, b, H, d]
        return torch.stack(pieces, dim=3).flatten(2, 4)

    # --- validation ------------------------------------------------------------------------

    def _validate(self, q, k, v, p) -> None:
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dim() != 4:
                raise ValueError(
                    f"DistributedAttention expects 4-D {name} laid out as {_LAYOUTS[self.gather_idx]} "
                    f"(gather_idx={self.gather_idx}), got shape {tuple(t.shape)}"
                )
        seq_dim, batch_dim = self.gather_idx, 1 - self.gather_idx
        if k.shape[:2] != v.shape[:2] or k.shape[2] != v.shape[2]:
            raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must share sequence, batch and heads")
        if q.shape[seq_dim] != k.shape[seq_dim] or q.shape[batch_dim] != k.shape[batch_dim]:
            raise ValueError(
                f"query {tuple(q.shape)} and key {tuple(k.shape)} must have the same local sequence "
                f"length and batch size in layout {_LAYOUTS[self.gather_idx]}"
            )
        if p > 1:
            self.head_plans(q.shape[2], k.shape[2])  # raises with the fix for impossible head counts
        if self.check_shapes and p > 1 and q.shape[seq_dim] not in self._checked:
            check_same_local_shape(q.shape[seq_dim], self.spg, device=q.device)
            self._checked.add(q.shape[seq_dim])


class _Unpacked:
    """The received buffer of one exchange and how to split it into q, k, v (lazily: for an
    asynchronous exchange, touching the buffer waits for it)."""

    def __init__(self, recv, p, like: torch.Tensor, widths: list[int], seq_dim: int) -> None:
        self.recv, self.p, self.like, self.widths, self.seq_dim = recv, p, like, widths, seq_dim
        self._full = None

    def part(self, i: int):
        def get() -> torch.Tensor:
            if self._full is None:
                full = _received(self.recv, self.p, self.like, sum(self.widths), self.seq_dim)
                self._full = full.split(self.widths, dim=2)
            return self._full[i]
        return get


def _block(like: torch.Tensor, channels: int) -> int:
    """Elements one source sends me: its s/p tokens of my `channels` heads."""
    return like.shape[0] * like.shape[1] * channels * like.shape[3]


def check_same_local_shape(local_seq_len: int, group, device=None) -> None:
    """Raise on every rank if the ranks of `group` hold different numbers of tokens.

    The probe is created on `device` (the inputs' device): NCCL only moves GPU tensors.
    """
    mine = torch.tensor([local_seq_len], dtype=torch.int64, device=device)
    lengths = comm.all_gather_along(mine, 0, group, kind="shape_check").tolist()
    if len(set(lengths)) != 1:
        raise ValueError(
            f"local sequence lengths differ across the sequence parallel group: {lengths} "
            "(rank order). Every rank must hold seq_length / sp_size tokens: make the sequence "
            "length divisible by --ds-sequence-parallel-size and shard it evenly"
        )


def _fusable(q, k, v) -> bool:
    return (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
            and q.shape[3] == k.shape[3] == v.shape[3])
