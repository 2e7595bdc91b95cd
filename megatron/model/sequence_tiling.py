"""Tiling of a layer's token-local work and of core attention's heads, forward and backward.

At millions of tokens a rank's `[N/P, width]` tensors are the memory: a layer's QKV output
(1.5x the residual stream for Llama-3-8B), the fp32 copies the norms make, the MLP's
`[N/P, 2 ffn]` intermediate. Two helpers bound them:

* `tiled_map(fn, inputs, params, tiles, residual=)`: `fn` applied to `tiles` slices of
  dim 0 (tokens) of `inputs`, written into one output buffer (plus `residual`, fused:
  `residual + fn(x)` without a separate `[N/P, h]` branch output). Only the inputs are
  saved; the backward recomputes one tile at a time and writes the input gradients into
  one buffer, so a tile's intermediates are the only ones ever alive, forward or
  backward. Parameter gradients are summed over tiles in fp32. Exact in fp32: rows are
  independent, only the order of the weight-gradient sum changes.
* `HeadChunkedAttention(local, chunks)`: core attention over head chunks, one kernel call
  per chunk (K/V heads of a chunk are those its query heads read, so GQA needs no K/V
  repeat), each chunk's graph kept and run backward on its own: the kernels' fp32
  workspace (flash backward's dQ accumulator, GQA's expanded dK/dV) is one chunk's, and
  input gradients are written into one buffer per tensor instead of being accumulated
  from full-size zero-padded pieces.

The `fn` of `tiled_map` must be deterministic (no dropout): its backward recomputes it.
Autocast is re-entered in backward exactly as it was in forward.
"""

from __future__ import annotations

import torch
from torch import nn


def tile_rows(n: int, tiles: int) -> list[slice]:
    """`tiles` nearly equal consecutive slices of range(n) (fewer when n < tiles)."""
    tiles = max(1, min(tiles, n))
    bounds = [n * i // tiles for i in range(tiles + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(tiles)]


class _AutocastState:
    """The autocast setting of the device in forward, to re-enter in backward (another thread on GPUs)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=False)


class _TiledMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tiles, n_inputs, residual, residual_is_input, out_dim, *tensors):
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        if residual_is_input:  # out = x + fn(x): the gradient of x is written once, with both terms
            residual = inputs[0]
        rows_list = tile_rows(inputs[0].shape[0], tiles)
        out = None
        # detached: a view taken without grad of a tensor that requires grad would still claim to
        # require it (module hooks, e.g. torch's MemTracker, would then try to hook its grad)
        plain = [t.detach() for t in inputs]
        residual = None if residual is None else residual.detach()
        for rows in rows_list:
            y = fn(rows, *(t[rows] for t in plain))
            if out is None:  # tiles along `out_dim`, in the dtype of fn's output (+ the residual's, promoted)
                dtype = y.dtype if residual is None else torch.result_type(residual, y)
                shape = list(y.shape)
                shape[out_dim] = inputs[0].shape[0]
                out = y.new_empty(shape, dtype=dtype)
            if residual is None:
                out[(slice(None),) * out_dim + (rows,)] = y
            else:
                torch.add(residual[rows], y, out=out[rows])
            del y
        ctx.fn, ctx.rows_list, ctx.n_params = fn, rows_list, len(params)
        ctx.params = params  # parameters are not activations: referenced, not saved
        ctx.has_residual = residual is not None and not residual_is_input
        ctx.residual_is_input = residual_is_input
        ctx.out_dim = out_dim
        ctx.autocast = _AutocastState(inputs[0].device.type)
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs = ctx.saved_tensors
        n_in = len(inputs)
        need_in = ctx.needs_input_grad[6:6 + n_in]
        need_p = ctx.needs_input_grad[6 + n_in:]
        params = [p for p, need in zip(ctx.params, need_p) if need]
        grads_in = [torch.empty_like(t) if need else None for t, need in zip(inputs, need_in)]
        acc: list = [None] * len(params)  # fp32 sums of the parameter gradients over tiles
        with torch.enable_grad(), ctx.autocast():
            for rows in ctx.rows_list:
                tile = [t[rows].detach().requires_grad_(need) for t, need in zip(inputs, need_in)]
                y = ctx.fn(rows, *tile)
                wrt = [t for t, need in zip(tile, need_in) if need] + params
                grads = torch.autograd.grad(y, wrt, grad_out[(slice(None),) * ctx.out_dim + (rows,)],
                                            allow_unused=True)
                del y
                k = 0
                for i, need in enumerate(need_in):
                    if need:
                        g = grads[k]
                        if i == 0 and ctx.residual_is_input and g is not None:
                            torch.add(grad_out[rows], g, out=grads_in[i][rows])
                        elif i == 0 and ctx.residual_is_input:
                            grads_in[i][rows] = grad_out[rows]
                        elif g is None:
                            grads_in[i][rows].zero_()
                        else:
                            grads_in[i][rows] = g
                        k += 1
                for j, g in enumerate(grads[k:]):
                    if g is not None:
                        acc[j] = g.float() if acc[j] is None else acc[j].add_(g)
                del grads, tile
        it = iter(acc)
        param_grads = []
        for p, need in zip(ctx.params, need_p):
            g = next(it) if need else None
            param_grads.append(None if g is None else g.to(p.dtype))
        grad_residual = grad_out if ctx.has_residual and ctx.needs_input_grad[3] else None
        return (None, None, None, grad_residual, None, None, *grads_in, *param_grads)


def tiled_map(fn, inputs: tuple, params, tiles: int, *, residual: torch.Tensor | None = None,
              out_dim: int = 0) -> torch.Tensor:
    """`[residual +] cat([fn(rows, *(t[rows] for t in inputs)) for rows in tiles], dim=out_dim)`,
    memory-bounded.

    `fn(rows, *tile_inputs)` maps tiles of dim 0 (it may slice other per-token tensors, such
    as RoPE's cos/sin, with `rows`); `params` are the tensors it reads that need gradients
    (module parameters). Its outputs are placed along `out_dim` of the result (dim 1 for a
    layout such as the all-to-all's `[P, tokens, ...]`; `residual` needs dim 0). With
    `tiles == 1` or without autograd this is a plain loop.
    """
    inputs = tuple(inputs)
    params = tuple(p for p in params if p is not None)
    if residual is not None and out_dim != 0:
        raise ValueError("a fused residual needs the tiles along dim 0")
    same = residual is not None and residual is inputs[0]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*inputs, *params)):
        with torch.no_grad():
            return _TiledMap.forward(_NoCtx(), fn, tiles, len(inputs), residual, False, out_dim, *inputs, *params)
    return _TiledMap.apply(fn, tiles, len(inputs), None if same else residual, same, out_dim, *inputs, *params)


class _NoCtx:
    """Stand-in for autograd's ctx when nothing needs a gradient."""

    def save_for_backward(self, *tensors) -> None:
        pass


# --- core attention over head chunks ------------------------------------------------------

def head_chunks(num_heads: int, num_kv_heads: int, chunks: int) -> list[tuple[slice, slice]]:
    """(query heads, K/V heads) of each chunk: `chunks` runs of query heads aligned to the GQA groups,
    so that each run reads whole K/V heads (a chunk within one group reads that group's K/V head)."""
    group = num_heads // num_kv_heads
    per = max(1, num_heads // max(1, chunks))
    if per < group:  # a divisor of the group: chunks never straddle two K/V heads
        per = max(d for d in range(1, per + 1) if group % d == 0)
    else:
        per -= per % group
    out = []
    for a in range(0, num_heads, per):
        b = min(num_heads, a + per)
        out.append((slice(a, b), slice(a // group, (b - 1) // group + 1)))
    return out


class _Source(torch.autograd.Function):
    """The start of a chunk's graph: a view of a chunk of q/k/v whose node holds no data (a leaf
    would: its AccumulateGrad keeps the tensor, and with it the whole all-to-all buffer)."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


class _Captured:
    """Saved-tensor hooks that route a chunk graph's saved tensors through its parent's ctx: they are
    then saved (or, under activation checkpointing, recomputed; under offload, offloaded) like any
    custom Function's, and the chunk graphs themselves hold no tensor."""

    def __init__(self) -> None:
        self.tensors: list | None = []
        self.source: tuple = ()

    def pack(self, t):
        self.tensors.append(t)
        return len(self.tensors) - 1

    def unpack(self, i):
        return self.source[i]


class _HeadChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inner, plan, head_dim, kwargs, q, k, v):
        # q [s, b, hq, d], k/v [s, b, hkv, d] ("sbhd"; head dim 2 in "bshd" too)
        cap = _Captured()
        anchor = torch.empty(0, device=q.device, requires_grad=True)
        outs, edges = [], []
        edge = torch.autograd.graph.get_gradient_edge
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(cap.pack, cap.unpack):
            for qh, kvh in plan:
                qc = _Source.apply(anchor, q[:, :, qh].detach())
                kc = _Source.apply(anchor, k[:, :, kvh].detach())
                vc = _Source.apply(anchor, v[:, :, kvh].detach())
                oc = inner(qc, kc, vc, **kwargs)
                if oc.dim() == 3:
                    oc = oc.unflatten(-1, (-1, head_dim))
                edges.append((qh, kvh, oc.shape[2], edge(oc), edge(qc), edge(kc), edge(vc)))
                outs.append(oc.detach())
                del qc, kc, vc, oc
        out = torch.cat(outs, dim=2)
        del outs
        ctx.save_for_backward(*cap.tensors)
        cap.tensors = None
        ctx.cap, ctx.edges = cap, edges
        ctx.shapes, ctx.dtypes = (q.shape, k.shape, v.shape), (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        need_q, need_k, need_v = ctx.needs_input_grad[4:7]
        (qs, ks, vs), (qt, kt, vt) = ctx.shapes, ctx.dtypes
        ctx.cap.source = ctx.saved_tensors
        dq = dout.new_empty(qs, dtype=qt) if need_q else None
        # a K/V head read by several chunks sums their gradients (fp32, like the GQA kernels)
        dk = dout.new_zeros(ks, dtype=torch.float32) if need_k else None
        dv = dout.new_zeros(vs, dtype=torch.float32) if need_v else None
        start = 0
        for qh, kvh, width, e_out, e_q, e_k, e_v in ctx.edges:
            wrt = [e for e, need in ((e_q, need_q), (e_k, need_k), (e_v, need_v)) if need]
            grads = iter(torch.autograd.grad([e_out], wrt, [dout[:, :, start:start + width]]))
            start += width
            if need_q:
                dq[:, :, qh] = next(grads)
            if need_k:
                dk[:, :, kvh] += next(grads)
            if need_v:
                dv[:, :, kvh] += next(grads)
            del grads  # one chunk's kernel gradients alive at a time
        ctx.cap.source = ()
        return (None, None, None, None, dq, None if dk is None else dk.to(kt), None if dv is None else dv.to(vt))


class HeadChunkedAttention(nn.Module):
    """A local attention run over head chunks, one chunk's kernel workspace at a time.

    Called like the local attention it wraps (`attn(q, k, v, attention_mask=None,
    segment_ids=None)`, heads on dim 2 in both layouts); `inner` is that attention, so
    builders that read its settings (causal, layout, softmax scale) find them.
    """

    def __init__(self, inner: nn.Module, chunks: int) -> None:
        super().__init__()
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.inner = inner
        self.chunks = chunks

    def forward(self, q, k, v, attention_mask=None, segment_ids=None):
        plan = head_chunks(q.shape[2], k.shape[2], self.chunks)
        kwargs = {"attention_mask": attention_mask, "segment_ids": segment_ids}
        if len(plan) == 1:
            return self.inner(q, k, v, **kwargs)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
            outs = []
            for qh, kvh in plan:
                o = self.inner(q[:, :, qh], k[:, :, kvh], v[:, :, kvh], **kwargs)
                outs.append(o.unflatten(-1, (-1, q.shape[3])) if o.dim() == 3 else o)
            return torch.cat(outs, dim=2)
        return _HeadChunked.apply(self.inner, plan, q.shape[3], kwargs, q, k, v)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}"
