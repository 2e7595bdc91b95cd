"""DistributedAttention: Ulysses all-to-all around any local attention.

Drop-in for DeepSpeed's `deepspeed.sequence.layer.DistributedAttention`: same constructor
`(local_attention, sequence_process_group, scatter_idx=2, gather_idx=0)` and call
`dist_attn(query, key, value, *args, **kwargs)`, extra arguments passed to the local
attention untouched. Two differences, both invisible to callers:

* Q, K and V travel in one all-to-all (one latency instead of three) whenever they share
  sequence length, batch, head dim and dtype, GQA included: the K/V heads of each
  destination rank are packed next to its Q heads.
* Head counts need not divide P (see `uneven.py`): with fewer K/V heads than P the K/V
  heads are replicated just enough (their gradients summed back), and query heads that
  do not divide P travel with per-rank split sizes. Only heads < P is refused (that cap
  is what ring attention, `hybrid.py`, lifts).
* Shapes are validated with clear errors (same local sequence length on every rank,
  4-D inputs, caller in the group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import comm
from megatron.core.sequence_parallel.all_to_all import all_to_all, all_to_all_dim0
from megatron.core.sequence_parallel.uneven import gather_heads, plan_heads, scatter_heads

_LAYOUTS = {0: "[s/p, b, heads, d]", 1: "[b, s/p, heads, d]"}


class DistributedAttention(nn.Module):
    """Run `local_attention` on full sequences for a 1/P slice of the heads.

    Inputs are sequence shards `[s/p, b, heads, d]` (gather_idx=0) or `[b, s/p, heads, d]`
    (gather_idx=1); the local attention receives `[s, b, heads/p, d]` or
    `[b, s, heads/p, d]`; the output comes back in the input layout with all heads.

    `check_shapes=True` costs one tiny all-gather per call to prove that every rank holds
    the same number of tokens (a mismatch would otherwise corrupt the all-to-all or hang);
    the GPT model validates once per step instead and turns it off.
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
    ) -> None:
        super().__init__()
        if scatter_idx != 2 or gather_idx not in _LAYOUTS:
            raise ValueError(
                f"DistributedAttention supports scatter_idx=2 (heads) with gather_idx=0 for "
                f"{_LAYOUTS[0]} or gather_idx=1 for {_LAYOUTS[1]}; got scatter_idx={scatter_idx}, "
                f"gather_idx={gather_idx}"
            )
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

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.spg)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        p = self.world_size
        self._validate(query, key, value, p)
        if p == 1:
            return self.local_attn(query, key, value, *args, **kwargs)
        seq_dim = self.gather_idx
        plan = plan_heads(query.shape[2], key.shape[2], p)
        if not plan.even:
            return self._uneven_forward(plan, query, key, value, *args, **kwargs)
        if self.fuse_qkv and _fusable(query, key, value):
            q, k, v = self._fused_qkv_all_to_all(query, key, value, p)
        else:
            q, k, v = (all_to_all(t, self.spg, scatter_dim=2, gather_dim=seq_dim) for t in (query, key, value))
        out = self.local_attn(q, k, v, *args, **kwargs)
        if out.dim() == 3:  # local attention returned merged heads [.., .., heads/p * d]
            out = out.unflatten(-1, (q.shape[2], -1))
        # [s, b, h/p, d] -> [s/p, b, h, d]   (or [b, s, h/p, d] -> [b, s/p, h, d])
        return all_to_all(out, self.spg, scatter_dim=seq_dim, gather_dim=2)

    def _uneven_forward(self, plan, query, key, value, *args, **kwargs):
        """Ulysses with per-rank head splits and replicated K/V heads (see uneven.py)."""
        seq_dim = self.gather_idx
        lists = [plan.q_heads, plan.kv_heads, plan.kv_heads]
        if self.fuse_qkv and _fusable(query, key, value):
            q, k, v = scatter_heads([query, key, value], lists, self.spg, seq_dim)
        else:
            q, k, v = (scatter_heads([t], [h], self.spg, seq_dim)[0] for t, h in zip((query, key, value), lists))
        out = self.local_attn(q, k, v, *args, **kwargs)
        if out.dim() == 3:  # merged heads [.., .., h_me * d] -> [.., .., h_me, d]
            out = out.unflatten(-1, (q.shape[2], -1))
        return gather_heads(out, plan.q_heads, self.spg, seq_dim)  # [s/p, b, h, d]

    def _fused_qkv_all_to_all(self, q, k, v, p):
        """One all-to-all for Q, K and V: per destination rank, its Q heads then K then V."""
        hq, hkv = q.shape[2], k.shape[2]
        if self.gather_idx == 0:
            sl, b = q.shape[0], q.shape[1]
            # [s/p, b, h, d] -> [s/p, b, p, h/p, d] -> [p, s/p, b, h/p, d]
            parts = [t.unflatten(2, (p, -1)).movedim(2, 0) for t in (q, k, v)]
            packed = torch.cat(parts, dim=3)  # [p, s/p, b, hq/p + 2 hkv/p, d]
            recv = all_to_all_dim0(packed, self.spg)  # [p (source = seq chunk), s/p, b, c, d]
            full = recv.reshape(p * sl, b, *recv.shape[3:])  # [s, b, c, d]
        else:
            b, sl = q.shape[0], q.shape[1]
            # [b, s/p, h, d] -> [b, s/p, p, h/p, d] -> [p, b, s/p, h/p, d]
            parts = [t.unflatten(2, (p, -1)).movedim(2, 0) for t in (q, k, v)]
            packed = torch.cat(parts, dim=3)  # [p, b, s/p, c, d]
            recv = all_to_all_dim0(packed, self.spg)  # [p (source), b, s/p, c, d]
            full = recv.movedim(0, 1).reshape(b, p * sl, *recv.shape[3:])  # [b, s, c, d]
        return full.split([hq // p, hkv // p, hkv // p], dim=2)

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
        if q.shape[2] % k.shape[2]:
            raise ValueError(
                f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) "
                "(grouped-query attention): check --num-attention-heads and --num-query-groups"
            )
        if q.shape[2] < p:
            raise ValueError(
                f"the number of query heads ({q.shape[2]}) is smaller than the sequence parallel "
                f"size ({p}): every Ulysses rank needs at least one head. Lift the cap with "
                f"--ring-attention-size R so that --ds-sequence-parallel-size / R <= {q.shape[2]}"
            )
        if self.check_shapes and p > 1:
            check_same_local_shape(q.shape[seq_dim], self.spg)


def check_same_local_shape(local_seq_len: int, group) -> None:
    """Raise on every rank if the ranks of `group` hold different numbers of tokens."""
    mine = torch.tensor([local_seq_len], dtype=torch.int64)
    lengths = comm.all_gather_along(mine, 0, group).tolist()
    if len(set(lengths)) != 1:
        raise ValueError(
            f"local sequence lengths differ across the sequence parallel group: {lengths} "
            "(rank order). Every rank must hold seq_length / sp_size tokens: make the sequence "
            "length divisible by --ds-sequence-parallel-size and shard it evenly"
        )


def _fusable(q, k, v) -> bool:
    return (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
            and q.shape[3] == k.shape[3] == v.shape[3])
