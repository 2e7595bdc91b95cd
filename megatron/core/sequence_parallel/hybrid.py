"""Ulysses x ring: sequence parallelism beyond the head count.

Ulysses alone needs at least one head per rank, so P <= heads. The hybrid splits the SP
group of P ranks into R rings of U = P/R Ulysses ranks (`initialize_model_parallel(...,
ring_attention_size=R)`; sp_rank = ring_rank * U + ulysses_rank, Ulysses fastest). Inside
a Ulysses group the usual all-to-all gives each rank all N/R tokens of its ring rank for
H/U heads; ring attention (ring.py) then runs over the R ranks that hold the same heads.
8 heads on SP 16 is U = 8 x R = 2. R = P is pure ring attention, R = 1 pure Ulysses.

Token layout (what the data loader and the model's position ids must follow). The
sequence of N tokens is cut into 2R zigzag chunks; ring rank r owns chunks r and
2R-1-r (N/R tokens, in that order) and Ulysses rank u of that ring rank holds the u-th
of U equal consecutive pieces of them. `sequence_shard_indices(N, state)` returns those
global token indices: shard tokens, labels, loss mask and position ids with it
(`x[:, idx]`). With R = 1 it is Megatron's contiguous block [sp_rank N/P, (sp_rank+1) N/P).

segment_ids: the model all-gathers the per-rank shards over the SP group, which yields
them in SP-rank order = ring order (`sequence_permutation(N, P, R)`, equal to natural
order when R = 1). That is the order this module expects by default, so the model needs
no change beyond its position ids; `segment_ids_order="natural"` accepts natural order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.sequence_parallel.layer import DistributedAttention
from megatron.core.sequence_parallel.ring import (
    RingAttention,
    check_ring_seq_len,
    ring_bytes,
    zigzag_positions,
)
from megatron.core.sequence_parallel.uneven import plan_heads, ulysses_bytes

_LAYOUT_SEQ_DIM = {"sbhd": 0, "bshd": 1}


def _layout_of(local_attention) -> str:
    inner = local_attention
    while not hasattr(inner, "layout") and hasattr(inner, "inner"):
        inner = inner.inner
    return getattr(inner, "layout", "sbhd")


class UlyssesRingAttention(nn.Module):
    """Ulysses all-to-all over `ulysses_group` around ring attention over `ring_group`.

    Called like DistributedAttention: `attn(q, k, v, segment_ids=None)` with q `[s/p, b, hq, d]`
    (or `[b, s/p, hq, d]` for a "bshd" local attention) and k, v with hkv heads; returns the
    output in q's shape. The tokens of rank (u, r) are `sequence_shard_indices`; segment_ids
    are `[b, N]` in SP-gathered (ring) order. The local attention contributes its settings
    (causal, softmax scale, layout); its own kernel is not used, the ring computes the blocks.
    GQA and head counts that do not divide U are handled by the Ulysses step (uneven.py).
    """

    def __init__(self, local_attention: Callable[..., torch.Tensor], ulysses_group, ring_group, *,
                 check_shapes: bool = True, fuse_qkv: bool = True, segment_ids_order: str = "ring") -> None:
        super().__init__()
        layout = _layout_of(local_attention)
        self.ring = RingAttention.from_local(local_attention, ring_group, segment_ids_order=segment_ids_order)
        self.ulysses = DistributedAttention(self.ring, ulysses_group, scatter_idx=2,
                                            gather_idx=_LAYOUT_SEQ_DIM[layout], fuse_qkv=fuse_qkv,
                                            check_shapes=check_shapes)
        self.ulysses_group, self.ring_group = ulysses_group, ring_group

    @property
    def ulysses_size(self) -> int:
        return dist.get_world_size(self.ulysses_group)

    @property
    def ring_size(self) -> int:
        return dist.get_world_size(self.ring_group)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("Ulysses x ring attention takes no attention_mask: use causal attention and "
                             "segment_ids for document masks, or --ring-attention-size 1 for explicit masks")
        return self.ulysses(query, key, value, segment_ids=segment_ids)


HybridAttention = UlyssesRingAttention


def build_sequence_parallel_attention(local_attention: Callable[..., torch.Tensor], parallel_state, *,
                                      check_shapes: bool = False) -> nn.Module:
    """The core attention for this SP layout: DistributedAttention (R = 1) or the hybrid (R > 1).

    The model calls the result as `core_attention(q, k, v, segment_ids=segment_ids)` with
    `[s/p, b, h, d]` shards and the SP-all-gathered `[b, N]` segment ids.
    """
    ring = getattr(parallel_state, "ring_size", 1)
    layout = _layout_of(local_attention)
    if ring == 1:
        return DistributedAttention(local_attention, parallel_state.sp_group, scatter_idx=2,
                                    gather_idx=_LAYOUT_SEQ_DIM[layout], check_shapes=check_shapes)
    return UlyssesRingAttention(local_attention, parallel_state.ulysses_group, parallel_state.ring_group,
                                check_shapes=check_shapes)


# --- token layout --------------------------------------------------------------------------

def _sizes(parallel_state, sp_size, ring_size, sp_rank) -> tuple[int, int, int]:
    if parallel_state is not None:
        return parallel_state.sp_size, getattr(parallel_state, "ring_size", 1), parallel_state.sp_rank
    if sp_size is None or sp_rank is None:
        raise ValueError("pass a ParallelState, or sp_size= and sp_rank= (and ring_size=)")
    return sp_size, ring_size, sp_rank


def check_seq_len(seq_len: int, sp_size: int, ring_size: int = 1) -> None:
    """Raise with the fix if `seq_len` cannot be sharded over sp_size ranks with this ring."""
    if sp_size % ring_size:
        raise ValueError(f"ring size ({ring_size}) must divide the sequence parallel size ({sp_size})")
    if seq_len % sp_size:
        raise ValueError(f"the sequence length ({seq_len}) must be divisible by --ds-sequence-parallel-size "
                         f"({sp_size}): every rank holds N/P tokens")
    check_ring_seq_len(seq_len, ring_size)


def sequence_shard_indices(seq_len: int, parallel_state=None, *, sp_size: int | None = None,
                           ring_size: int = 1, sp_rank: int | None = None, device=None) -> torch.Tensor:
    """Global indices (LongTensor `[N/P]`, in local order) of the tokens SP rank `sp_rank` holds.

    Shard every per-token tensor with it (`tokens[:, idx]`) and use it as position ids
    (or gather per-document positions with it). Pass a ParallelState, or the sizes.
    """
    sp, ring, rank = _sizes(parallel_state, sp_size, ring_size, sp_rank)
    check_seq_len(seq_len, sp, ring)
    ulysses = sp // ring
    ring_rank, ulysses_rank = divmod(rank, ulysses)  # sp_rank = ring_rank * U + ulysses_rank
    mine = zigzag_positions(seq_len, ring, ring_rank, device=device)  # [N/R]
    piece = seq_len // sp
    return mine[ulysses_rank * piece:(ulysses_rank + 1) * piece]


def sequence_permutation(seq_len: int, sp_size: int, ring_size: int = 1, *, device=None) -> torch.Tensor:
    """SP-gathered order: the shards of SP ranks 0..P-1 concatenated. `x_gathered = x[:, perm]`."""
    return torch.cat([sequence_shard_indices(seq_len, sp_size=sp_size, ring_size=ring_size, sp_rank=r,
                                             device=device) for r in range(sp_size)])


def shard_sequence(x: torch.Tensor, parallel_state=None, *, dim: int = 1, **sizes) -> torch.Tensor:
    """This rank's tokens of a full, naturally ordered tensor along `dim` (default `[b, s, ...]`)."""
    idx = sequence_shard_indices(x.shape[dim], parallel_state, device=x.device, **sizes)
    return x.index_select(dim, idx)


# --- communication volume ------------------------------------------------------------------

def attention_comm_bytes(seq_len: int, batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                         sp_size: int, ring_size: int = 1, *, sp_rank: int = 0,
                         elem_size: int = 4) -> dict[str, dict[str, int]]:
    """Bytes SP rank `sp_rank` sends in one attention layer, by kind, from the formulas.

    {"all_to_all": {...}, "ring_p2p": {...}} with "forward", "backward", "total" each; the
    kinds are those megatron.core.comm counts. Ulysses: (2 hq + 2 hkv) d N/P (U-1)/U per
    pass with even heads (uneven.ulysses_bytes for the general plan). Ring: see ring.ring_bytes,
    on the K/V heads one Ulysses rank holds.
    """
    check_seq_len(seq_len, sp_size, ring_size)
    ulysses = sp_size // ring_size
    u_rank = sp_rank % ulysses
    plan = plan_heads(num_heads, num_kv_heads, ulysses)
    if ulysses == 1:
        a2a = {"forward": 0, "backward": 0, "total": 0}
    else:
        a2a = ulysses_bytes(plan, u_rank, seq_len // sp_size, batch, head_dim, elem_size)
    kv_heads = plan.local_heads(u_rank)[1]
    ring = ring_bytes(seq_len, batch, kv_heads, head_dim, ring_size, elem_size)
    return {"all_to_all": a2a, "ring_p2p": ring}
