"""Ulysses exchange for head counts that do not divide the Ulysses degree, and for GQA.

Plain Ulysses gives each of the U ranks H/U query heads and Hkv/U key/value heads, which
needs both counts divisible by U. Two common models break that:

* GQA with fewer K/V heads than U (Llama-70B: 8 K/V heads on 16 ranks). Each rank then
  receives the K/V heads its query heads read, so a K/V head is *replicated* on the
  U/Hkv ranks that share it. Replication is an `index_select` before the all-to-all, so
  autograd sums the replicas' gradients back into the one K/V head (the reduction).
* Query heads not divisible by U (6 heads on 4 ranks). Rank u takes a contiguous run of
  heads, the first H mod U ranks one more (torch.tensor_split's rule), and the all-to-all
  carries per-rank split sizes.

Everything is exact: no head is padded, dropped or computed twice. The price of uneven
heads is load imbalance (the busiest rank has ceil(H/U) heads); the price of replication
is K/V volume (U/Hkv copies), both reported by `ulysses_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core import comm


@dataclass(frozen=True)
class HeadPlan:
    """Which global query and K/V heads each Ulysses rank attends over.

    `q_heads[u]` is a contiguous run; `kv_heads[u]` lists the global K/V head that each of
    rank u's local K/V heads is a copy of, chosen so that rank u's local query head i reads
    local K/V head i // (len(q_heads[u]) // len(kv_heads[u])), the GQA rule every local
    backend applies.
    """

    num_heads: int
    num_kv_heads: int
    size: int
    q_heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]

    @property
    def even(self) -> bool:
        """True when this is plain Ulysses (both head counts divisible, no replication)."""
        return self.num_heads % self.size == 0 and self.num_kv_heads % self.size == 0

    def local_heads(self, rank: int) -> tuple[int, int]:
        return len(self.q_heads[rank]), len(self.kv_heads[rank])


def plan_heads(num_heads: int, num_kv_heads: int, size: int) -> HeadPlan:
    """Split `num_heads` query heads over `size` ranks and give each the K/V heads it needs."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    if num_heads < size:
        raise ValueError(
            f"the number of query heads ({num_heads}) is smaller than the Ulysses degree ({size}): "
            "every Ulysses rank needs at least one head. Lift the cap with ring attention: "
            f"--ring-attention-size R so that --ds-sequence-parallel-size / R <= {num_heads}"
        )
    group = num_heads // num_kv_heads
    base, extra = divmod(num_heads, size)
    q_heads, kv_heads, start = [], [], 0
    for u in range(size):
        n = base + (u < extra)
        heads = tuple(range(start, start + n))
        start += n
        needed = [h // group for h in heads]  # the K/V head each query head reads
        distinct = sorted(set(needed))
        counts = {needed.count(j) for j in distinct}
        # one copy per distinct K/V head when every one serves equally many query heads,
        # otherwise one per query head (the local backend's GQA rule needs equal groups)
        kv_heads.append(tuple(distinct) if len(counts) == 1 else tuple(needed))
        q_heads.append(heads)
    return HeadPlan(num_heads, num_kv_heads, size, tuple(q_heads), tuple(kv_heads))


class _AllToAllFlat(torch.autograd.Function):
    """All-to-all of a 1-D buffer with per-rank split sizes; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group):
        ctx.in_splits, ctx.out_splits, ctx.group = in_splits, out_splits, group
        out = x.new_empty(sum(out_splits))
        return comm.all_to_all_single_uneven(out, x.contiguous(), out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        gin = grad.new_empty(sum(ctx.in_splits))
        comm.all_to_all_single_uneven(gin, grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group)
        return gin, None, None, None


def _select_heads(t: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """`t[:, :, heads]` as a view when the heads are a contiguous run (no copy, no scatter-add)."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return t.narrow(2, heads[0], len(heads))
    return t.index_select(2, torch.tensor(heads, device=t.device))


def scatter_heads(tensors: list[torch.Tensor], head_lists: list[tuple[tuple[int, ...], ...]],
                  group, seq_dim: int) -> list[torch.Tensor]:
    """Send heads `head_lists[i][u]` of `tensors[i]` to rank u; gather the sequence.

    Inputs `[s/U, b, h_i, d]` (seq_dim 0) or `[b, s/U, h_i, d]` (seq_dim 1) on every rank;
    outputs `[s, b, len(head_lists[i][me]), d]` (or `[b, s, .., d]`), the tokens in rank
    order. All tensors travel in one all-to-all (they must share dtype and device).
    """
    size, me = dist.get_world_size(group), dist.get_rank(group)
    blocks = []
    for u in range(size):
        # [s/U, b, h, d] -> [s/U, b, h_u, d] -> flat, per tensor; one contiguous block per rank
        blocks.append(torch.cat([_select_heads(t, heads[u]).reshape(-1) for t, heads in zip(tensors, head_lists)]))
    in_splits = [blk.numel() for blk in blocks]
    shard = tensors[0].shape[seq_dim]
    other = tensors[0].shape[1 - seq_dim]
    mine = [shard * other * len(heads[me]) * t.shape[3] for t, heads in zip(tensors, head_lists)]
    recv = _AllToAllFlat.apply(torch.cat(blocks), in_splits, [sum(mine)] * size, group)
    per_source = recv.split([sum(mine)] * size)  # source rank u sent its tokens
    outs = []
    for i, (t, heads) in enumerate(zip(tensors, head_lists)):
        local_shape = list(t.shape)
        local_shape[2] = len(heads[me])
        offset = sum(mine[:i])
        # flat -> [s/U, b, h_me, d] per source; concatenated in rank order along the sequence
        parts = [src.narrow(0, offset, mine[i]).view(local_shape) for src in per_source]
        outs.append(torch.cat(parts, dim=seq_dim))  # [s, b, h_me, d]
    return outs


def gather_heads(out: torch.Tensor, q_heads: tuple[tuple[int, ...], ...], group, seq_dim: int) -> torch.Tensor:
    """Inverse of `scatter_heads` for the attention output: `[s, b, h_me, d]` -> `[s/U, b, H, d]`.

    Rank u's heads are the contiguous run q_heads[u] and runs follow rank order, so
    concatenating what each rank sends back along the head dim restores the head order.
    """
    size = dist.get_world_size(group)
    chunks = out.chunk(size, dim=seq_dim)  # [s, b, h_me, d] -> U x [s/U, b, h_me, d]
    send = torch.cat([c.reshape(-1) for c in chunks])
    shard_shape = list(chunks[0].shape)
    per_head = chunks[0].numel() // max(1, shard_shape[2])
    out_splits = [per_head * len(q_heads[u]) for u in range(size)]
    recv = _AllToAllFlat.apply(send, [chunks[0].numel()] * size, out_splits, group)
    parts = []
    for u, flat in enumerate(recv.split(out_splits)):
        shard_shape[2] = len(q_heads[u])
        parts.append(flat.view(shard_shape))  # [s/U, b, h_u, d]
    return torch.cat(parts, dim=2)  # [s/U, b, H, d]


def ulysses_bytes(plan: HeadPlan, rank: int, shard_tokens: int, batch: int, head_dim: int,
                  elem_size: int = 4) -> dict[str, int]:
    """Bytes Ulysses rank `rank` sends in one attention layer, from the head plan.

    Forward: to each other rank u its Q and K/V heads of my shard_tokens tokens, then my
    output heads of u's tokens back. Backward sends the transposed splits. With even heads
    both equal (2 Hq + 2 Hkv) d s/U (U-1)/U per token-shard, the paper's 4 N h / P.
    """
    u_all = range(plan.size)
    per_head = shard_tokens * batch * head_dim * elem_size
    qkv = [len(plan.q_heads[u]) + 2 * len(plan.kv_heads[u]) for u in u_all]
    q = [len(plan.q_heads[u]) for u in u_all]
    others = plan.size - 1
    forward = per_head * (sum(qkv) - qkv[rank] + others * q[rank])
    backward = per_head * (others * qkv[rank] + sum(q) - q[rank])
    return {"forward": forward, "backward": backward, "total": forward + backward}
