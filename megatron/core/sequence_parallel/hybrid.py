"""Ulysses x ring: sequence parallelism beyond the head count, and the one builder of SP attention.

Ulysses alone needs at least one head per rank, so P <= heads. The hybrid splits the SP
group of P ranks into R rings of U = P/R Ulysses ranks (`initialize_model_parallel(...,
ring_attention_size=R)`; sp_rank = ring_rank * U + ulysses_rank, Ulysses fastest). Inside
a Ulysses group the usual all-to-all gives each rank all N/R tokens of its ring rank for
H/U heads; ring attention (ring.py) then runs over the R ranks that hold the same heads.
8 heads on SP 16 is U = 8 x R = 2. R = P is pure ring attention, R = 1 pure Ulysses.
The token layout this needs (zigzag chunks) is layout.py's.

`build_sp_attention(local, parallel_state, ...)` is where every model gets its core
attention from: the local backend itself (SP 1), `DistributedAttention` (R = 1, optionally
overlapped over head chunks) or the hybrid (R > 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.sequence_parallel.heads import plan_heads, ulysses_bytes
from megatron.core.sequence_parallel.layer import DistributedAttention
from megatron.core.sequence_parallel.layout import check_seq_len
from megatron.core.sequence_parallel.ring import RingAttention, ring_bytes

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
    output in q's shape. The tokens of rank (u, r) are `layout.sequence_shard_indices`;
    segment_ids cover the full sequence (see RingAttention: a `Documents`, or ids in ring order
    as all-gathering the shards yields them, or in natural order with segment_ids_order="natural").
    The local attention contributes its settings (causal, softmax scale, layout); its own
    kernel is not used, the ring computes the blocks. GQA and head counts that do not divide
    U are handled by the Ulysses step (heads.py).
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
                attention_mask: torch.Tensor | None = None, segment_ids=None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("Ulysses x ring attention takes no attention_mask: use causal attention and "
                             "segment_ids for document masks, or --ring-attention-size 1 for explicit masks")
        return self.ulysses(query, key, value, segment_ids=segment_ids)


HybridAttention = UlyssesRingAttention


def build_sp_attention(local_attention: Callable[..., torch.Tensor], parallel_state, *,
                       overlap_chunks: int = 1, check_shapes: bool = False) -> nn.Module:
    """The core attention for this SP layout: the local attention (SP 1), DistributedAttention
    (R = 1, pipelined over `overlap_chunks` head chunks) or the Ulysses x ring hybrid (R > 1).

    The result is called as `core_attention(q, k, v, segment_ids=...)` with `[s/p, b, h, d]`
    shards (or `[b, s/p, h, d]` for a "bshd" local attention).
    """
    if parallel_state is None or parallel_state.sp_size == 1:
        return local_attention
    if parallel_state.ring_size > 1:
        if overlap_chunks > 1:
            raise ValueError("--ulysses-overlap-chunks > 1 is not combined with --ring-attention-size > 1 yet; "
                             "drop one of the two")
        return UlyssesRingAttention(local_attention, parallel_state.ulysses_group, parallel_state.ring_group,
                                    check_shapes=check_shapes)
    return DistributedAttention(local_attention, parallel_state.sp_group, scatter_idx=2,
                                gather_idx=_LAYOUT_SEQ_DIM[_layout_of(local_attention)], check_shapes=check_shapes,
                                overlap_chunks=overlap_chunks)


# --- communication volume ------------------------------------------------------------------

def attention_comm_bytes(seq_len: int, batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                         sp_size: int, ring_size: int = 1, *, sp_rank: int = 0,
                         elem_size: int = 4) -> dict[str, dict[str, int]]:
    """Bytes SP rank `sp_rank` sends in one attention layer, by kind, from the formulas.

    {"all_to_all": {...}, "ring_p2p": {...}} with "forward", "backward", "total" each; the
    kinds are those megatron.core.comm counts. Ulysses: (2 hq + 2 hkv) d N/P (U-1)/U per
    pass with even heads (heads.ulysses_bytes for the general plan). Ring: see ring.ring_bytes,
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
