"""What `parallelize_gpt` does to the modules of a built model, each without renaming a parameter.

torchtitan wraps modules (`checkpoint_wrapper`), which prefixes every parameter name; here a
module's `forward` is replaced by a wrapped version of itself instead, so state dicts,
checkpoints, ZeRO-1's by-name optimizer state and the Hugging Face mapping see the same
names as the plain model's. FSDP2's hooks run around the replaced forward exactly as around
the original (they live in `__call__`).

* `apply_recompute(layer)`: full recompute (activation checkpointing): the layer keeps only
  its inputs and recomputes the rest in backward; `apply_full_recompute` applies Megatron's
  methods (uniform chunks of layers, or a block of the first layers).
* `Recompute(local_attention)`: selective recompute of core attention (a parameter-free module).
* `apply_mlp_tiling(mlp, tiles)`: the MLP over sequence tiles, each recomputed in backward.
* `apply_layer_tiling(layer, tiles, mlp_tiles)`: every token-local part of the layer (norms,
  QKV projection + RoPE, output projection, MLP, residual adds) over sequence tiles.
* `apply_norm_tiling(norm, tiles)`: a norm over sequence tiles (the final norm).
* `apply_offload(layer, offloader, index)`: tensors the layer saves for backward live in
  pinned host memory, copied on side streams and prefetched one layer ahead (offload.py).
* `SequenceParallelInputs`: the model's inputs for one SP shard (position ids, documents).
* `install_residual_dtype(model, dtype)`: the dtype of the residual stream (a hook on the
  embedding's output; every layer then keeps it: norms return their input's dtype and the
  branches' matmuls run in autocast's dtype).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from megatron.core import comm
from megatron.core.documents import Documents
from megatron.core.sequence_parallel.all_to_all import exchange
from megatron.core.sequence_parallel.layer import _pack, check_same_local_shape
from megatron.core.sequence_parallel.layout import sequence_permutation, sequence_shard_indices
from megatron.model.tiling import tiled_apply
from megatron.parallel.offload import ActivationOffloader


def replace_forward(module: nn.Module, wrap) -> nn.Module:
    """Set `module.forward = wrap(original_forward)`; `module.wrapped_forwards` lists what was applied."""
    module.forward = wrap(module.forward)
    module.wrapped_forwards = (*getattr(module, "wrapped_forwards", ()), getattr(wrap, "__name__", str(wrap)))
    return module


def apply_recompute(layer: nn.Module) -> nn.Module:
    def recompute(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run
    return replace_forward(layer, recompute)


def apply_full_recompute(model: nn.Module, method: str = "uniform", num_layers: int = 1,
                         offloader: ActivationOffloader | None = None) -> nn.Module:
    """Megatron's full recompute: `uniform` recomputes the layers in chunks of `num_layers` (a chunk
    keeps only its input; backward recomputes the chunk, so the peak holds `num_layers` layers'
    activations); `block` recomputes the first `num_layers` layers one by one and keeps the rest.
    `offloader` (uniform chunks of several layers): each chunk's input goes to host memory (the
    offloader counts chunks as its layers); otherwise apply_offload wraps each layer."""
    layers = list(model.layers)
    if method == "block":
        for layer in layers[:num_layers]:
            apply_recompute(layer)
        return model
    if num_layers == 1:
        for layer in layers:
            apply_recompute(layer)
        return model

    def chunked(run_layers):
        @functools.wraps(run_layers)
        def run(x, rope, documents):
            for start in range(0, len(layers), num_layers):
                chunk = layers[start:start + num_layers]

                def run_chunk(h, chunk=chunk):
                    for layer in chunk:
                        h = layer(h, rope, documents)
                    return h
                if not torch.is_grad_enabled():
                    x = run_chunk(x)
                    continue
                keep = [t for t in tree_flatten((rope,))[0] if isinstance(t, torch.Tensor)]
                hooks = offloader.layer_hooks(start // num_layers, keep) if offloader is not None \
                    else contextlib.nullcontext()
                with hooks:
                    x = checkpoint(run_chunk, x, use_reentrant=False)
            return x
        return run
    replace_forward_of(model, "run_layers", chunked)
    return model


def replace_forward_of(module: nn.Module, method: str, wrap) -> nn.Module:
    """`replace_forward` for another method of the module (e.g. GPTModel.run_layers)."""
    setattr(module, method, wrap(getattr(module, method)))
    module.wrapped_forwards = (*getattr(module, "wrapped_forwards", ()), f"{method}:{getattr(wrap, '__name__', wrap)}")
    return module


def apply_mlp_tiling(mlp: nn.Module, num_tiles: int) -> nn.Module:
    def tiled(forward):
        @functools.wraps(forward)
        def run(x):
            return tiled_apply(forward, x, num_tiles)
        return run
    return replace_forward(mlp, tiled)


def _params(*modules: nn.Module) -> list:
    return [p for m in modules for p in m.parameters()]


def apply_layer_tiling(layer: nn.Module, tiles: int, mlp_tiles: int) -> nn.Module:
    """Every token-local part of a transformer layer over sequence tiles, forward and backward.

    The layer computes what `TransformerLayer.forward` computes, in three `tiled_map`s around
    core attention: input norm + QKV projection + RoPE (`tiles` tiles), output projection +
    residual add (`tiles`), post-attention norm + MLP + residual add (`mlp_tiles`). Each keeps
    only its input for backward (the layer input, the attention output, the mid-layer residual)
    and never holds more than one tile's norm output, fp32 copies, RoPE temporaries or MLP
    intermediate; the residual adds write into one buffer. With hidden dropout active the adds
    are not fused (dropout draws are not recomputed tile by tile).
    """
    from megatron.model.sequence_tiling import tiled_map  # noqa: PLC0415

    attn = layer.attention
    nq, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def tiled(forward):
        @functools.wraps(forward)
        def run(x, rope=None, segment_ids=None):
            drop = layer.hidden_dropout if layer.training else 0.0
            cos_sin = rope if attn.use_rope else None

            def heads(rows, xt):  # [tt, b, h] -> the tile's rotated q [tt, b, hq, d], k, v [tt, b, hkv, d]
                tile_rope = None if cos_sin is None else tuple(t[rows] for t in cos_sin)  # [tt, b, 1, d]
                return attn.qkv_heads(layer.input_norm(xt), tile_rope)

            def pre(rows, xt):  # [tt, b, h] -> [tt, b, (nq + 2 nkv) d]
                return torch.cat([t.flatten(-2) for t in heads(rows, xt)], dim=-1)

            prefetch = getattr(layer, "offload_prefetch", None)
            ulysses = _packed_ulysses(attn.core_attention, nq, nkv)
            if ulysses is not None:
                # the tiles write the all-to-all's send buffer [P, s/P, b, c, d] themselves: no
                # [s/P, b, (nq + 2 nkv) d] QKV output exists besides it
                da, plan, widths = ulysses
                p, c = plan.size, sum(widths)

                def packed(rows, xt):
                    send, _ = _pack(list(heads(rows, xt)), [plan.q_heads, plan.kv_heads, plan.kv_heads])
                    return send.view(p, *xt.shape[:2], c, d)  # [p, tt, b, c, d]

                send = tiled_map(packed, (x,), _params(layer.input_norm, attn.qkv), tiles, out_dim=1)
                if prefetch is not None and send.requires_grad:  # the layer's attention backward is over
                    send.register_hook(lambda grad: prefetch())
                s_local, b = send.shape[1], send.shape[2]
                recv = exchange(send.view(-1), None, None, da.spg)  # [p * s/p * b * c * d]
                del send
                # every source sent its s/p tokens: [p, s/p, b, c, d] -> [s, b, c, d]
                q, k, v = recv.view(p * s_local, b, c, d).split(widths, dim=2)
                del recv
                out = da.local_attn(q, k, v, segment_ids=segment_ids)  # [s, b, hq/p, d]
                del q, k, v
                if out.dim() == 3:
                    out = out.unflatten(-1, (-1, d))
                # my heads of every token back to the token's rank: [p, s/p, b, hq/p, d]
                back = exchange(out.reshape(-1), None, None, da.spg).view(p, s_local, b, out.shape[2], d)
                del out
                ctx = back.movedim(0, 2)  # [s/p, b, p, hq/p, d]: global head order, a view
                del back
            else:
                qkv = tiled_map(pre, (x,), _params(layer.input_norm, attn.qkv), tiles)
                if prefetch is not None and qkv.requires_grad:  # the layer's attention backward is over
                    qkv.register_hook(lambda grad: prefetch())
                q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
                ctx = attn.core_attention(q.unflatten(-1, (nq, d)), k.unflatten(-1, (nkv, d)),
                                          v.unflatten(-1, (nkv, d)), segment_ids=segment_ids)  # [s, b, nq, d]
                del q, k, v, qkv

            def proj(rows, c):  # [tt, b, nq, d] (or [tt, b, p, nq/p, d]) -> [tt, b, h]
                return attn.proj(c.reshape(c.shape[0], c.shape[1], nq * d))

            if drop:
                x = x + F.dropout(tiled_map(proj, (ctx,), _params(attn.proj), tiles), p=drop)
            else:
                x = tiled_map(proj, (ctx,), _params(attn.proj), tiles, residual=x)
            del ctx

            def mlp(rows, xt):
                return layer.mlp(layer.post_attention_norm(xt))

            mlp_params = _params(layer.post_attention_norm, layer.mlp)
            if drop:
                return x + F.dropout(tiled_map(mlp, (x,), mlp_params, mlp_tiles), p=drop)
            return tiled_map(mlp, (x,), mlp_params, mlp_tiles, residual=x)
        return run
    return replace_forward(layer, tiled)


def _packed_ulysses(core_attention, nq: int, nkv: int):
    """(DistributedAttention, head plan, per-rank [q, k, v] head widths) when a tiled layer can write
    the all-to-all's send buffer directly: plain Ulysses over P > 1 ranks, Q/K/V fused in one
    exchange, no head-chunk overlap, the same number of heads for every rank."""
    from megatron.core.sequence_parallel.layer import DistributedAttention  # noqa: PLC0415

    if type(core_attention) is not DistributedAttention or core_attention.overlap_chunks != 1 \
            or not core_attention.fuse_qkv or core_attention.gather_idx != 0 or core_attention.world_size == 1:
        return None
    plans = core_attention.head_plans(nq, nkv)
    plan = plans[0]
    widths = {(len(plan.q_heads[u]), len(plan.kv_heads[u]), len(plan.kv_heads[u])) for u in range(plan.size)}
    if len(plans) != 1 or len(widths) != 1:
        return None
    return core_attention, plan, list(widths.pop())


def apply_norm_tiling(norm: nn.Module, tiles: int) -> nn.Module:
    """A norm over sequence tiles: one tile's fp32 copies at a time, forward and backward."""
    from megatron.model.sequence_tiling import tiled_map  # noqa: PLC0415

    def tiled(forward):
        @functools.wraps(forward)
        def run(x):
            return tiled_map(lambda rows, t: forward(t), (x,), list(norm.parameters()), tiles)
        return run
    return replace_forward(norm, tiled)


def apply_offload(layer: nn.Module, offloader: ActivationOffloader, index: int) -> nn.Module:
    """Keep what layer `index` saves for backward (with full recompute: just its input) in host
    memory, copied out and prefetched back asynchronously by `offloader` (megatron.parallel.offload).
    Tensors among the other arguments (RoPE's cos/sin, shared by every layer) stay on the device."""
    def offload(forward):
        @functools.wraps(forward)
        def run(x, *args, **kwargs):
            keep = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            with offloader.layer_hooks(index, keep):
                return forward(x, *args, **kwargs)
        return run
    if "tiled" in getattr(layer, "wrapped_forwards", ()):  # the tiled layer says when to prefetch
        layer.offload_prefetch = functools.partial(offloader.prefetch, index - 1)
        offloader.deferred.add(index)
    return replace_forward(layer, offload)


class Recompute(nn.Module):
    """Recompute the wrapped (parameter-free) module in backward instead of keeping its activations."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


class SequenceParallelInputs:
    """A forward pre-hook that turns a GPT model's inputs for one SP shard into what its layers need.

    * position ids, when not given: the global positions of the shard's tokens (the layout);
    * `sequence_length`, when not given: the full sequence's, N = shard length x P;
    * `segment_ids` given as this shard's `[b, N/P]` ids: all-gathered over the SP group
      (one collective per micro-batch, on the ids' device) into the `Documents` of the full
      sequences; a `Documents` (what the data path builds from the EOD index) passes as is;
    * the shard length, checked equal on every rank once per distinct length.
    """

    def __init__(self, parallel_state, signature: inspect.Signature) -> None:
        self.ps = parallel_state
        self.signature = signature
        self._checked: set = set()
        self._positions: dict = {}

    def __call__(self, module, args, kwargs):
        bound = self.signature.bind(*args, **kwargs)
        tokens = bound.arguments["tokens"]
        b, local = tokens.shape
        if local not in self._checked:
            check_same_local_shape(local, self.ps.sp_group, device=tokens.device)
            self._checked.add(local)
        if bound.arguments.get("position_ids") is None:
            bound.arguments["position_ids"] = self.positions(local, tokens.device).expand(b, local)
        if "sequence_length" in self.signature.parameters and bound.arguments.get("sequence_length") is None:
            bound.arguments["sequence_length"] = local * self.ps.sp_size  # the full sequence (dynamic RoPE)
        seg = bound.arguments.get("segment_ids")
        if seg is not None and not isinstance(seg, Documents):
            bound.arguments["segment_ids"] = self.documents(seg)
        return bound.args, bound.kwargs

    def positions(self, local: int, device) -> torch.Tensor:
        key = (local, str(device))
        if key not in self._positions:
            idx = sequence_shard_indices(local * self.ps.sp_size, self.ps, device=device)  # [N/P]
            self._positions[key] = idx.unsqueeze(0)
        return self._positions[key]

    def documents(self, shard_ids: torch.Tensor) -> Documents:
        gathered = comm.all_gather_along(shard_ids.contiguous(), 1, self.ps.sp_group, kind="all_gather_segments")
        if self.ps.ring_size > 1:  # gathered order -> natural order
            perm = sequence_permutation(gathered.shape[1], self.ps.sp_size, self.ps.ring_size, device=gathered.device)
            gathered = gathered.index_select(1, torch.argsort(perm))
        return Documents.from_segment_ids(gathered)


def install_sequence_parallel_inputs(model: nn.Module, parallel_state) -> SequenceParallelInputs:
    hook = SequenceParallelInputs(parallel_state, inspect.signature(model.forward))
    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.sequence_parallel_inputs = hook
    return hook


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def residual_dtype(precision: str, fp32_residual_connection: bool = False) -> torch.dtype | None:
    """The residual stream's dtype under `precision`, or None when nothing is cast (fp32).

    Upstream Megatron under --bf16/--fp16 runs the whole model in half precision
    (Float16Module), so its residual stream is bf16/fp16 unless --fp32-residual-connection;
    the same here. Half the bytes of every saved layer input and of every offloaded one.
    """
    if precision not in _HALF:
        return None
    return torch.float32 if fp32_residual_connection else _HALF[precision]


class ResidualCast:
    """Forward hook of the embedding: its output (the residual stream) in `dtype`."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module, args, out):
        return out.to(self.dtype)  # the same tensor when it already has the dtype


def install_residual_dtype(model: nn.Module, dtype: torch.dtype) -> ResidualCast:
    hook = ResidualCast(dtype)
    model.embedding.register_forward_hook(hook)
    model.residual_cast = hook
    return hook
