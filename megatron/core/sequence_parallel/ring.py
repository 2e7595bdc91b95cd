"""Ring attention with the zigzag layout: exact attention over a sequence split across R ranks.

Each ring rank keeps its queries and passes its K/V block around the ring, one hop per
step; after R steps every query has met every key. Partial results are merged with the
online softmax: a block's output O_b and log-sum-exp l_b join the running (O, l) as

    l' = log(e^l + e^l_b),   O' = O e^(l - l') + O_b e^(l_b - l')

in fp32, which is exactly softmax over the union of the keys. The backward pass needs
no merge: with the final O and l, a block's probabilities are P = exp(S - l) and the
usual flash-attention backward (dS = P (dO V^T - rowsum(dO O))) gives that block's share
of dQ, dK, dV. dQ stays home; dK/dV accumulators (fp32) travel with their K/V block and
take one more hop at the end to reach their owner.

Zigzag layout (causal balance). The sequence is cut into 2R chunks of c = N/(2R) tokens
and ring rank r holds chunks r and 2R-1-r, in that order. With a causal mask every step
then costs every rank the same two c x c blocks: its own K/V (step 0) is one causal
attention over its 2c tokens (local order is global order); K/V from a lower rank is
needed by all 2c queries for its first chunk only; K/V from a higher rank is needed by
the second query chunk only, for both of its chunks. A plain contiguous split would give
rank R-1 R times the work of rank 0.

Block math: PyTorch's flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, which
returns the log-sum-exp) for blocks without a document mask on CPU; otherwise an explicit
fp32 softmax on the block (document masks, other devices). Blocks whose queries and keys
share no document are skipped. There is no attention dropout.

`segment_ids` (documents) are `[b, N]` in *ring order*: ring rank 0's 2c tokens, then rank
1's, ... (`ring_permutation`), which is exactly what all-gathering the per-rank shards
yields; pass `segment_ids_order="natural"` for natural token order.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import comm

_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- zigzag layout -------------------------------------------------------------------------

def check_ring_seq_len(seq_len: int, ring_size: int) -> None:
    if ring_size > 1 and seq_len % (2 * ring_size):
        raise ValueError(
            f"the sequence length ({seq_len}) must be divisible by 2 x ring size ({2 * ring_size}) for "
            f"the zigzag layout (each ring rank holds 2 of the 2R chunks): choose --seq-length as a "
            f"multiple of {2 * ring_size} or a smaller --ring-attention-size"
        )


def zigzag_chunks(ring_size: int, ring_rank: int) -> tuple[int, int]:
    """The two global chunk indices (of 2R) ring rank `ring_rank` holds, in local order."""
    return ring_rank, 2 * ring_size - 1 - ring_rank


def zigzag_positions(seq_len: int, ring_size: int, ring_rank: int, *, device=None) -> torch.Tensor:
    """Global token indices held by ring rank `ring_rank`, in its local order (LongTensor [N/R]).

    These are the position ids of the rank's tokens; with R = 1 it is simply 0..N-1.
    """
    if ring_size == 1:
        return torch.arange(seq_len, device=device)
    check_ring_seq_len(seq_len, ring_size)
    c = seq_len // (2 * ring_size)
    first, second = zigzag_chunks(ring_size, ring_rank)
    return torch.cat([torch.arange(first * c, first * c + c, device=device),
                      torch.arange(second * c, second * c + c, device=device)])


def ring_permutation(seq_len: int, ring_size: int, *, device=None) -> torch.Tensor:
    """Ring order: every ring rank's tokens, rank after rank. `x_ring = x_natural[perm]`."""
    return torch.cat([zigzag_positions(seq_len, ring_size, r, device=device) for r in range(ring_size)])


def zigzag_shard(x: torch.Tensor, ring_size: int, ring_rank: int, dim: int = 0) -> torch.Tensor:
    """The tokens of ring rank `ring_rank` from a full, naturally ordered sequence along `dim`."""
    return x.index_select(dim, zigzag_positions(x.shape[dim], ring_size, ring_rank, device=x.device))


def zigzag_unshard(x: torch.Tensor, ring_size: int, dim: int = 0) -> torch.Tensor:
    """Natural order from the ring-order concatenation of every ring rank's shard along `dim`."""
    perm = ring_permutation(x.shape[dim], ring_size, device=x.device)
    return x.index_select(dim, torch.argsort(perm))


# --- one block: queries of this rank vs one K/V block ------------------------------------------

def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    # [b, hkv, s, d] -> [b, hkv * group, s, d]; query head i reads K/V head i // group
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _fold(t: torch.Tensor, group: int) -> torch.Tensor:
    # [b, hkv * group, s, d] -> [b, hkv, group, s, d] -> sum over the group: [b, hkv, s, d]
    return t if group == 1 else t.unflatten(1, (-1, group)).sum(2)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that saw no key yet) replaced by 0, so exp(x - lse) stays 0, not nan."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _use_flash(q: torch.Tensor, keep) -> bool:
    return keep is None and _FLASH_FWD is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES


def _masked_scores(q, k, scale, causal, keep):
    """fp32 scores `[b, h, sq, sk]` with -inf where a query may not see a key."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        keep_c = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        keep = keep_c if keep is None else keep & keep_c
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def _block_forward(q, k, v, scale, causal, keep):
    """(out fp32 `[b, h, sq, d]`, lse fp32 `[b, h, sq]`) of q `[b, h, sq, d]` over k, v `[b, hkv, sk, d]`."""
    group = q.shape[1] // k.shape[1]
    k, v = _expand(k, group), _expand(v, group)
    if _use_flash(q, keep):
        out, lse = _FLASH_FWD(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
        return out.float(), lse.float()
    scores = _masked_scores(q, k, scale, causal, keep)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a row that sees no key of this block
    probs = torch.exp(scores - _finite(lse)[..., None])
    return torch.matmul(probs, v.float()), lse


def _block_backward(dout, q, k, v, out, lse, delta, scale, causal, keep):
    """This block's dq `[b, h, sq, d]`, dk, dv `[b, hkv, sk, d]` (fp32), given the final out and lse."""
    group = q.shape[1] // k.shape[1]
    ke, ve = _expand(k, group), _expand(v, group)
    if _use_flash(q, keep):
        dq, dk, dv = _FLASH_BWD(dout.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(),
                                out.contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
        dq, dk, dv = dq.float(), dk.float(), dv.float()
    else:
        probs = torch.exp(_masked_scores(q, ke, scale, causal, keep) - lse[..., None])  # [b, h, sq, sk]
        dof = dout.float()
        dv = torch.matmul(probs.transpose(-1, -2), dof)
        dscores = probs * (torch.matmul(dof, ve.float().transpose(-1, -2)) - delta[..., None])
        dq = torch.matmul(dscores, ke.float()) * scale
        dk = torch.matmul(dscores.transpose(-1, -2), q.float()) * scale
    return dq, _fold(dk, group), _fold(dv, group)


def _merge_(out, lse, block_out, block_lse) -> None:
    """Fold one block's (out, lse) into the running (out, lse), in place, in fp32."""
    new = torch.logaddexp(lse, block_lse)
    ref = _finite(new)
    out.mul_(torch.exp(lse - ref)[..., None]).add_(block_out * torch.exp(block_lse - ref)[..., None])
    lse.copy_(new)


# --- the schedule ------------------------------------------------------------------------

def _step_blocks(rank: int, src: int, length: int, causal: bool) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal diagonal?) that rank's queries need from src's K/V."""
    every = slice(0, length)
    if not causal:
        return [(every, every, False)]
    if src == rank:  # both chunks against both: causal in local order (= global order)
        return [(every, every, True)]
    half = length // 2
    if src < rank:  # src's first chunk precedes both of mine; its second follows both
        return [(every, slice(0, half), False)]
    return [(slice(half, length), every, False)]  # only my second chunk follows both of src's


def _document_keep(seg, rank, src, rows, cols, length):
    """(skip?, keep) for a block: keep is None when the document mask keeps everything."""
    if seg is None:
        return False, None
    sq = seg[:, rank * length:(rank + 1) * length][:, rows]  # [b, sq]
    sk = seg[:, src * length:(src + 1) * length][:, cols]  # [b, sk]
    # cheap O(s) answers first: one document spans the block, or the block shares none
    if bool((sq == sk[:, :1]).all()) and bool((sk == sk[:, :1]).all()):
        return False, None
    if not bool(torch.isin(sq.reshape(-1), sk.reshape(-1)).any()):
        return True, None
    keep = sq[:, None, :, None] == sk[:, None, None, :]  # [b, 1, sq, sk]
    if bool(keep.all()):
        return False, None
    return not bool(keep.any()), keep


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, seg):
        # q [b, hq, L, d], k/v [b, hkv, L, d]: this rank's L = N/R tokens in zigzag order
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        length = q.shape[2]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # [2, b, hkv, L, d]: one message per hop
        for step in range(size):
            src = (rank - step) % size
            pending = comm.ring_shift(kv, group, tag=0) if step + 1 < size else None
            for rows, cols, diag in _step_blocks(rank, src, length, causal):
                skip, keep = _document_keep(seg, rank, src, rows, cols, length)
                if skip:
                    continue
                b_out, b_lse = _block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], scale, diag, keep)
                _merge_(out[:, :, rows], lse[:, :, rows], b_out, b_lse)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, seg)
        ctx.group, ctx.causal, ctx.scale = group, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seg = ctx.saved_tensors
        group, causal, scale = ctx.group, ctx.causal, ctx.scale
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        length = q.shape[2]
        delta = (dout.float() * out.float()).sum(-1)  # [b, hq, L]: rowsum(dO * O)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # [2, b, hkv, L, d]
        dkv_pending = None
        for step in range(size):
            src = (rank - step) % size
            kv_pending = comm.ring_shift(kv, group, tag=0) if step + 1 < size else None
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # src's dK, dV share
            for rows, cols, diag in _step_blocks(rank, src, length, causal):
                skip, keep = _document_keep(seg, rank, src, rows, cols, length)
                if skip:
                    continue
                dq_b, dk_b, dv_b = _block_backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols],
                                                   kv[1][:, :, cols], out[:, :, rows], lse[:, :, rows],
                                                   delta[:, :, rows], scale, diag, keep)
                dq[:, :, rows] += dq_b
                dkv[0][:, :, cols] += dk_b
                dkv[1][:, :, cols] += dv_b
            if dkv_pending is not None:  # what the ranks before me added for src's K/V
                dkv += dkv_pending.wait()
            if size > 1:
                dkv_pending = comm.ring_shift(dkv, group, tag=1)
            if kv_pending is not None:
                kv = kv_pending.wait()
        if dkv_pending is not None:  # the last hop brings every rank its own dK, dV
            dkv = dkv_pending.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *, causal: bool = True,
                   softmax_scale: float | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of this ring rank's queries over the whole ring's keys.

    q `[b, hq, L, d]`, k and v `[b, hkv, L, d]` (hq % hkv == 0): the L = N/R tokens of this
    rank in zigzag order. segment_ids: `[b, N]` in ring order, or None. Returns `[b, hq, L, d]`.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    size = dist.get_world_size(group)
    if causal and size > 1 and q.shape[2] % 2:
        raise ValueError(f"ring attention with the zigzag layout needs an even number of local tokens, got "
                         f"{q.shape[2]}: make the sequence length divisible by 2 x ring size ({2 * size})")
    if segment_ids is not None:
        if segment_ids.shape[-1] != size * q.shape[2] or segment_ids.shape[0] != q.shape[0]:
            raise ValueError(f"segment_ids must be [b, N] = [{q.shape[0]}, {size * q.shape[2]}] for the whole "
                             f"sequence, got {tuple(segment_ids.shape)}")
        segment_ids = segment_ids.to(q.device)
    return _RingAttentionFn.apply(q, k, v, group, causal, scale, segment_ids)


class RingAttention(nn.Module):
    """Ring attention over `ring_group`, called like a local attention backend.

    `attn(q, k, v, attention_mask=None, segment_ids=None)` with q `[L, b, hq, d]` ("sbhd") or
    `[b, L, hq, d]` ("bshd"), the L tokens of this ring rank in zigzag order. This is what
    `DistributedAttention` wraps to make the Ulysses x ring hybrid.
    """

    def __init__(self, ring_group, *, causal: bool = True, softmax_scale: float | None = None,
                 dropout_p: float = 0.0, layout: str = "sbhd", segment_ids_order: str = "ring") -> None:
        super().__init__()
        if layout not in ("sbhd", "bshd"):
            raise ValueError(f"layout must be 'sbhd' or 'bshd', got {layout!r}")
        if segment_ids_order not in ("ring", "natural"):
            raise ValueError(f"segment_ids_order must be 'ring' (SP-gathered) or 'natural', got {segment_ids_order!r}")
        self.ring_group = ring_group
        self.causal, self.softmax_scale, self.dropout_p = causal, softmax_scale, dropout_p
        self.layout, self.segment_ids_order = layout, segment_ids_order

    @classmethod
    def from_local(cls, local_attention, ring_group, **kwargs) -> RingAttention:
        """Take causal, scale, dropout and layout from a LocalAttention (or a wrapper of one)."""
        inner = local_attention
        while not hasattr(inner, "causal") and hasattr(inner, "inner"):
            inner = inner.inner  # e.g. the transformer's selective-recompute wrapper
        if not hasattr(inner, "causal"):
            raise TypeError(f"cannot read causal/softmax_scale from {type(local_attention).__name__}: pass a "
                            "megatron.model.attention_backends.LocalAttention or build RingAttention directly")
        kw = dict(causal=inner.causal, softmax_scale=getattr(inner, "softmax_scale", None),
                  dropout_p=getattr(inner, "dropout_p", 0.0), layout=getattr(inner, "layout", "sbhd"))
        kw.update(kwargs)
        return cls(ring_group, **kw)

    def forward(self, q, k, v, attention_mask=None, segment_ids=None):
        if attention_mask is not None:
            raise ValueError("ring attention takes no attention_mask (it never builds the N x N mask): use "
                             "causal=True and segment_ids for document masks, or --ring-attention-size 1")
        if self.training and self.dropout_p > 0:
            raise ValueError(f"ring attention has no attention dropout, but dropout_p={self.dropout_p} was "
                             "requested in training: set --attention-dropout 0 (or --ring-attention-size 1)")
        size = dist.get_world_size(self.ring_group)
        if segment_ids is not None and self.segment_ids_order == "natural":
            segment_ids = segment_ids.index_select(1, ring_permutation(segment_ids.shape[1], size,
                                                                        device=segment_ids.device))
        # [L, b, h, d] -> [b, h, L, d]   or   [b, L, h, d] -> [b, h, L, d]
        to_bhsd = (lambda t: t.permute(1, 2, 0, 3)) if self.layout == "sbhd" else (lambda t: t.transpose(1, 2))
        out = ring_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), self.ring_group, causal=self.causal,
                             softmax_scale=self.softmax_scale, segment_ids=segment_ids)
        # [b, h, L, d] -> [L, b, h, d]   or   [b, h, L, d] -> [b, L, h, d]
        return out.permute(2, 0, 1, 3) if self.layout == "sbhd" else out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, layout={self.layout}, segment_ids_order={self.segment_ids_order}"


def ring_bytes(seq_len: int, batch: int, kv_heads: int, head_dim: int, ring_size: int,
               elem_size: int = 4) -> dict[str, int]:
    """Bytes one ring rank sends in one attention layer (kind "ring_p2p").

    A hop carries the rank's K and V, 2 (N/R) b hkv d elements. Forward: R-1 hops.
    Backward: R-1 K/V hops plus R hops of the fp32 dK/dV accumulators (the last one home).
    Per rank this is about 2 N hkv d (R-1)/R elements each way: it does not shrink with R,
    which is why the hybrid keeps R small and lets Ulysses take the rest.
    """
    if ring_size == 1:
        return {"forward": 0, "backward": 0, "total": 0}
    block = 2 * (seq_len // ring_size) * batch * kv_heads * head_dim
    forward = (ring_size - 1) * block * elem_size
    backward = forward + ring_size * block * 4
    return {"forward": forward, "backward": backward, "total": forward + backward}
