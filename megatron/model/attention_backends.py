"""Local (single-rank) core attention backends behind one interface.

Every backend is an `nn.Module` called as `attn(q, k, v, attention_mask=None,
segment_ids=None)` with `q` of `[s, b, hq, d]` (layout "sbhd", what
`DistributedAttention(gather_idx=0)` hands over) or `[b, s, hq, d]` ("bshd"), and
`k`, `v` with `hkv` heads, `hq % hkv == 0` (GQA). The output has q's shape.

Masks, in Megatron's convention so ported code keeps its meaning:
* `attention_mask`: bool, True = do NOT attend; or float, added to the scores.
  Broadcastable to `[b, hq, sq, sk]` (under SP give it for the full sequence and with a
  head dim of 1).
* `segment_ids`: the documents of the full sequences, a `megatron.core.documents.Documents`
  (what the training path passes: every form a kernel needs is derived once per micro-batch,
  no layer waits for the GPU) or a `[b, s]` tensor of ids (converted with one host sync);
  a query attends only to keys of its own document (a run of equal ids), on top of causality.

`classic` is the reference (explicit fp32 softmax, any mask); `triton` is the project's
own FlashAttention-2 kernel (megatron/model/triton_attention.py, GPU or TRITON_INTERPRET=1);
`sdpa` is
`torch.nn.functional.scaled_dot_product_attention` with the causal fast path and
per-document calls for `segment_ids` (O(N) memory, no N x N mask); `flash-attn` uses
the `flash_attn` package on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.documents import Documents, as_documents


class LocalAttention(nn.Module):
    name = "base"

    def __init__(self, *, causal: bool = True, dropout_p: float = 0.0,
                 softmax_scale: float | None = None, layout: str = "sbhd") -> None:
        super().__init__()
        if layout not in ("sbhd", "bshd"):
            raise ValueError(f"layout must be 'sbhd' or 'bshd', got {layout!r}")
        self.causal = causal
        self.dropout_p = dropout_p
        self.softmax_scale = softmax_scale
        self.layout = layout

    def _scale(self, d: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(d)

    def _to_bhsd(self, t: torch.Tensor) -> torch.Tensor:
        # [s, b, h, d] -> [b, h, s, d]   or   [b, s, h, d] -> [b, h, s, d]
        return t.permute(1, 2, 0, 3) if self.layout == "sbhd" else t.transpose(1, 2)

    def _from_bhsd(self, t: torch.Tensor) -> torch.Tensor:
        # [b, h, s, d] -> [s, b, h, d]   or   [b, h, s, d] -> [b, s, h, d]
        return t.permute(2, 0, 1, 3) if self.layout == "sbhd" else t.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout_p={self.dropout_p}, layout={self.layout}"


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    hq, hkv = q.shape[1], k.shape[1]  # [b, h, s, d]
    if hkv != v.shape[1] or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}, {v.shape[1]})")
    return hq // hkv


def keep_mask(sq: int, sk: int, *, causal: bool, segment_ids: torch.Tensor | None,
              attention_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean `[b|1, h|1, sq, sk]` mask, True where a query may attend a key; None if no mask."""
    keep = None
    if causal:
        # queries are the last sq positions of the sk keys (sq == sk in training)
        keep = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)[None, None]
    if segment_ids is not None:
        if isinstance(segment_ids, Documents):
            segment_ids = segment_ids.to(device).segment_ids
        seg = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [b, 1, s, s]
        keep = seg if keep is None else keep & seg
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        allowed = ~attention_mask
        keep = allowed if keep is None else keep & allowed
    return keep


def _flash_gqa_ok(q: torch.Tensor, attention_mask) -> bool:
    """SDPA's `enable_gqa` is honoured only by its CUDA flash kernel (fp16/bf16, head dim <= 256, no
    mask); elsewhere it silently routes to the O(N^2) math kernel, so expanding K/V is better there."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and attention_mask is None and torch.backends.cuda.flash_sdp_enabled())


class ClassicAttention(LocalAttention):
    """softmax(Q K^T * scale + mask) V with the softmax in fp32: the numerical reference."""

    name = "classic"

    def forward(self, q, k, v, attention_mask=None, segment_ids=None):
        q, k, v = self._to_bhsd(q), self._to_bhsd(k), self._to_bhsd(v)
        group = _check_heads(q, k, v)
        segment_ids = as_documents(segment_ids)
        if group > 1:  # [b, hkv, s, d] -> [b, hq, s, d]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self._scale(q.shape[-1])
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            scores = scores + attention_mask.float()
        keep = keep_mask(q.shape[2], k.shape[2], causal=self.causal, segment_ids=segment_ids,
                         attention_mask=attention_mask, device=q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, p=self.dropout_p)
        out = torch.matmul(probs.to(v.dtype), v)  # [b, hq, s, d]
        return self._from_bhsd(out)


class SDPAttention(LocalAttention):
    """PyTorch's fused attention: flash kernel on CPU and GPU for the causal path."""

    name = "sdpa"

    def forward(self, q, k, v, attention_mask=None, segment_ids=None):
        q, k, v = self._to_bhsd(q), self._to_bhsd(k), self._to_bhsd(v)
        group = _check_heads(q, k, v)
        dropout = self.dropout_p if self.training else 0.0
        scale = self._scale(q.shape[-1])
        segment_ids = as_documents(segment_ids)
        gqa = {}
        if group > 1 and _flash_gqa_ok(q, attention_mask):  # the CUDA flash kernel reads K/V heads in place
            gqa = {"enable_gqa": True}
        elif group > 1:  # [b, hkv, s, d] -> [b, hq, s, d]: any other kernel would fall back to O(N^2) math
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if attention_mask is None and segment_ids is not None and self.causal:
            out = self._per_document(q, k, v, segment_ids, dropout, scale, gqa)
        elif attention_mask is None and segment_ids is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal, scale=scale,
                                                 **gqa)
        else:
            mask = keep_mask(q.shape[2], k.shape[2], causal=self.causal, segment_ids=segment_ids,
                             attention_mask=attention_mask, device=q.device)
            if attention_mask is not None and attention_mask.dtype != torch.bool:
                additive = attention_mask.to(q.dtype)
                mask = additive if mask is None else additive.masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, **gqa)
        return self._from_bhsd(out)

    @staticmethod
    def _per_document(q, k, v, docs: Documents, dropout, scale, gqa):
        """Causal attention inside each document, one kernel call per document.

        Keeps the flash kernel's O(N) memory for document-causal masks instead of building
        an N x N mask; the document lengths are host ints (no device sync per layer).
        """
        out = torch.empty_like(q)
        for bi, lengths in enumerate(docs.lengths):
            start = 0
            for n in lengths:
                sl = slice(start, start + n)
                out[bi:bi + 1, :, sl] = F.scaled_dot_product_attention(
                    q[bi:bi + 1, :, sl], k[bi:bi + 1, :, sl], v[bi:bi + 1, :, sl],
                    dropout_p=dropout, is_causal=True, scale=scale, **gqa)
                start += n
        return out


class FlashAttnAttention(LocalAttention):
    """The `flash_attn` package (FlashAttention-2) on CUDA; GQA native, documents via varlen."""

    name = "flash-attn"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._fa = import_flash_attn()

    def forward(self, q, k, v, attention_mask=None, segment_ids=None):
        if attention_mask is not None:
            raise ValueError("the flash-attn backend takes no explicit attention_mask; use causal "
                             "and segment_ids (document masks), or --attention-backend sdpa/classic")
        if not q.is_cuda:
            raise RuntimeError("the flash-attn backend runs on CUDA tensors only; use --attention-backend sdpa on CPU")
        dropout = self.dropout_p if self.training else 0.0
        scale = self._scale(q.shape[-1])
        if self.layout == "sbhd":  # [s, b, h, d] -> [b, s, h, d]
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        q, k, v = (t.contiguous() for t in (q, k, v))
        docs = as_documents(segment_ids)
        if docs is None:
            out = self._fa.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=self.causal)
        else:
            b, s = q.shape[:2]
            # every document of every row is one varlen sequence of the flattened [b * s] tokens;
            # cu_seqlens (int32, on the GPU) and max_seqlen (a host int) come precomputed
            docs = docs.to(q.device)
            out = self._fa.flash_attn_varlen_func(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), docs.cu_seqlens, docs.cu_seqlens,
                docs.max_seqlen, docs.max_seqlen, dropout_p=dropout, softmax_scale=scale,
                causal=self.causal).unflatten(0, (b, s))
        return out.transpose(0, 1) if self.layout == "sbhd" else out


def import_flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_interface
    except ImportError as e:
        raise RuntimeError(
            "--use-flash-attn / --attention-backend flash-attn needs the flash_attn package and a CUDA "
            "GPU (pip install flash-attn --no-build-isolation on a GPU machine); it is not installed "
            f"({e}). Use --attention-backend sdpa, which runs PyTorch's flash kernel"
        ) from e
    if not torch.cuda.is_available():
        raise RuntimeError("--attention-backend flash-attn needs a CUDA GPU; none is visible. Use sdpa")
    return flash_attn_interface


BACKENDS = {cls.name: cls for cls in (ClassicAttention, SDPAttention, FlashAttnAttention)}


def _triton_backend():
    from megatron.model.triton_attention import TritonAttention  # imports triton lazily

    return TritonAttention


def build_local_attention(name: str, **kwargs) -> LocalAttention:
    """Instantiate a backend by name (`classic`, `sdpa`, `flash-attn`, `triton`)."""
    if name == "triton":
        return _triton_backend()(**kwargs)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS) + ['triton']}")
    return BACKENDS[name](**kwargs)


def available_backends() -> list[str]:
    names = ["classic", "sdpa"]
    try:
        import_flash_attn()
        names.append("flash-attn")
    except RuntimeError:
        pass
    from megatron.model.triton_attention import triton_available

    if triton_available()[0]:
        names.append("triton")
    return names
