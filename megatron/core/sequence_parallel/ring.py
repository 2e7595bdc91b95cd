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

Block math: PyTorch's flash kernels, which return the log-sum-exp the merge needs, for
blocks without a document mask (`_scaled_dot_product_flash_attention_for_cpu` on CPU,
`_scaled_dot_product_flash_attention` on CUDA for fp16/bf16, as torch's own context
parallelism calls them); otherwise an explicit fp32 softmax on the block (document masks,
fp32 on CUDA). Blocks whose queries and keys share no document are skipped, decided on the
host from the document lengths (no device sync). There is no attention dropout.

Precision: the forward and the custom backward run with autocast switched off, on the
dtype the inputs arrive in (bf16 under bf16 autocast), so that the probabilities the
backward recomputes are exactly those whose log-sum-exp the forward stored.

Documents (`segment_ids`) are a `megatron.core.documents.Documents` (or a `[b, N]` tensor)
over the full sequence in natural token order; the ring reorders them to ring order
(`ring_permutation`) itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron.core import comm
from megatron.core.documents import as_documents
from megatron.core.sequence_parallel.layout import ring_permutation

_CPU_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_CUDA_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_CUDA_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_backward", None)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_CUDA_MAX_HEAD_DIM = 256


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


def _flash_kind(q: torch.Tensor, keep) -> str | None:
    """Which fused kernel can compute this block ("cpu", "cuda") or None for the explicit path."""
    if keep is not None:
        return None
    if q.device.type == "cpu" and _CPU_FLASH_FWD is not None and q.dtype in _CPU_DTYPES:
        return "cpu"
    if q.device.type == "cuda" and _CUDA_FLASH_FWD is not None and q.dtype in _CUDA_DTYPES \
            and q.shape[-1] <= _CUDA_MAX_HEAD_DIM:
        return "cuda"
    return None


def _masked_scores(q, k, scale, causal, keep):
    """fp32 scores `[b, h, sq, sk]` with -inf where a query may not see a key."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        keep_c = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        keep = keep_c if keep is None else keep & keep_c
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def _block_forward(q, k, v, scale, causal, keep, aux=None):
    """(out fp32 `[b, h, sq, d]`, lse fp32 `[b, h, sq]`) of q `[b, h, sq, d]` over k, v `[b, hkv, sk, d]`.

    `aux` (a dict) receives the extra outputs of the CUDA flash kernel that its backward takes.
    """
    group = q.shape[1] // k.shape[1]
    k, v = _expand(k, group), _expand(v, group)
    kind = _flash_kind(q, keep)
    if kind == "cpu":
        out, lse = _CPU_FLASH_FWD(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
        return out.float(), lse.float()
    if kind == "cuda":
        out, lse, *rest = _CUDA_FLASH_FWD(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, False,
                                          scale=scale)
        if aux is not None and "cuda" not in aux:
            # cum_seq_q, cum_seq_k, max_q, max_k, philox seed/offset: unused by the dense kernel's
            # backward beyond being passed through (torch's context parallelism does the same)
            aux["cuda"] = rest[:6]
        return out.float(), lse.float()
    scores = _masked_scores(q, k, scale, causal, keep)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a row that sees no key of this block
    probs = torch.exp(scores - _finite(lse)[..., None])
    return torch.matmul(probs, v.float()), lse


def _block_backward(dout, q, k, v, out, lse, delta, scale, causal, keep, aux=None):
    """This block's dq `[b, h, sq, d]`, dk, dv `[b, hkv, sk, d]` (fp32), given the final out and lse."""
    group = q.shape[1] // k.shape[1]
    ke, ve = _expand(k, group), _expand(v, group)
    kind = _flash_kind(q, keep)
    if kind == "cpu":
        dq, dk, dv = _CPU_FLASH_BWD(dout.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(),
                                    out.contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
        dq, dk, dv = dq.float(), dk.float(), dv.float()
    elif kind == "cuda":
        cum_q, cum_k, _, _, seed, offset = aux["cuda"]
        dq, dk, dv = _CUDA_FLASH_BWD(dout.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(),
                                     out.contiguous(), lse.contiguous(), cum_q, cum_k, q.shape[2], ke.shape[2],
                                     0.0, causal, seed, offset, scale=scale)
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
    """(skip?, keep) for one block; keep is None when the document mask keeps everything.

    `seg` is (device ids, host ids), both `[b, N]` in ring order, or None. The decisions are
    taken on the host copy, so no layer waits for the GPU; only a block that really mixes
    documents builds its `[b, 1, sq, sk]` mask, on the device.
    """
    if seg is None:
        return False, None
    dev, host = seg
    rq, rk = np.arange(length)[rows], np.arange(length)[cols]
    sq = host[:, rank * length + rq]  # [b, sq]
    sk = host[:, src * length + rk]  # [b, sk]
    if (sq == sk[:, :1]).all() and (sk == sk[:, :1]).all():  # one document spans the block
        return False, None
    keep_host = sq[:, :, None] == sk[:, None, :]  # [b, sq, sk]
    if keep_host.all():
        return False, None
    if not keep_host.any():  # the block shares no document
        return True, None
    dq = dev[:, rank * length:(rank + 1) * length][:, rows]  # [b, sq]
    dk = dev[:, src * length:(src + 1) * length][:, cols]  # [b, sk]
    return False, dq[:, None, :, None] == dk[:, None, None, :]  # [b, 1, sq, sk]


def _no_autocast(device_type: str):
    """Both passes compute in the dtypes chosen here, never in whatever autocast would pick."""
    return torch.autocast(device_type, enabled=False)


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, seg):
        # q [b, hq, L, d], k/v [b, hkv, L, d]: this rank's L = N/R tokens in zigzag order
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        length = q.shape[2]
        aux: dict = {}
        with _no_autocast(q.device.type):
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
                    b_out, b_lse = _block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], scale, diag,
                                                  keep, aux)
                    _merge_(out[:, :, rows], lse[:, :, rows], b_out, b_lse)
                if pending is not None:
                    kv = pending.wait()
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.seg, ctx.aux = group, causal, scale, seg, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, seg, aux = ctx.group, ctx.causal, ctx.scale, ctx.seg, ctx.aux
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        length = q.shape[2]
        with _no_autocast(q.device.type):
            dout = dout.to(q.dtype)
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
                                                       delta[:, :, rows], scale, diag, keep, aux)
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
                   softmax_scale: float | None = None, segment_ids=None) -> torch.Tensor:
    """Exact attention of this ring rank's queries over the whole ring's keys.

    q `[b, hq, L, d]`, k and v `[b, hkv, L, d]` (hq % hkv == 0): the L = N/R tokens of this
    rank in zigzag order. segment_ids: a `Documents` (or `[b, N]` tensor) of the full sequence
    in natural order, or None. Returns `[b, hq, L, d]`.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    size = dist.get_world_size(group)
    if causal and size > 1 and q.shape[2] % 2:
        raise ValueError(f"ring attention with the zigzag layout needs an even number of local tokens, got "
                         f"{q.shape[2]}: make the sequence length divisible by 2 x ring size ({2 * size})")
    seg = None
    docs = as_documents(segment_ids)
    if docs is not None:
        if docs.seq_len != size * q.shape[2] or docs.batch != q.shape[0]:
            raise ValueError(f"segment_ids must cover the whole sequence, [b, N] = [{q.shape[0]}, "
                             f"{size * q.shape[2]}], got {docs}")
        docs = docs.to(q.device)
        seg = docs.permuted(("ring", size), ring_permutation(docs.seq_len, size, device="cpu"))  # host index
    return _RingAttentionFn.apply(q, k, v, group, causal, scale, seg)


class RingAttention(nn.Module):
    """Ring attention over `ring_group`, called like a local attention backend.

    `attn(q, k, v, attention_mask=None, segment_ids=None)` with q `[L, b, hq, d]` ("sbhd") or
    `[b, L, hq, d]` ("bshd"), the L tokens of this ring rank in zigzag order. segment_ids cover
    the full sequence: a `Documents` (natural order, what the GPT model passes), or a `[b, N]`
    tensor in ring order (what all-gathering every rank's shard yields: `segment_ids_order=
    "ring"`, the default) or in natural order (`segment_ids_order="natural"`). This is what
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
            inner = inner.inner  # e.g. the selective-recompute wrapper
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
        if torch.is_tensor(segment_ids) and self.segment_ids_order == "ring":  # ring order -> natural order
            perm = ring_permutation(segment_ids.shape[1], dist.get_world_size(self.ring_group),
                                    device=segment_ids.device)
            segment_ids = segment_ids.index_select(1, torch.argsort(perm))
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
