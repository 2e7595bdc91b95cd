"""Per-rank memory of one training step, predicted from the configuration alone.

"Will it fit?" should cost a second on a laptop, not an hour in a GPU queue. The model
here counts what this code base actually keeps alive, tensor by tensor, as read from
megatron/model (which tensors autograd saves per layer, which buffers the Ulysses
all-to-alls allocate, what the loss materialises) and megatron/training (how each ZeRO
stage stores parameters, gradients and Adam state). It is validated against exact
measurements of CPU steps (tests/memory/), where `MemoryTracker` counts live tensor bytes
the way the CUDA caching allocator's "allocated" counter does, and at full scale against
the real model under fake tensors (megatron/planning/measure.py).

A step's peak is the static state (parameters, gradients, optimizer state) plus the
largest of these moments of the step:

  first_forward   (sequence-tiled layers, full recompute) a layer's first forward
  forward_end     every layer's saved activations + the logits/loss forward
  loss_backward   the same + the cross-entropy gradient buffers
  layer_forward   attention of the last layer: all-to-all buffers and attention workspace
  layer_backward  the last layer's backward (with full recompute: its recomputed activations)

Sequence-tiled layers (--tiled-projection-tiles) have their own model, tiled_memory.py.
With activation offload every layer but the last keeps its saved set in host memory
(`host_activations`), and one more layer's set is on the device while it is prefetched.

Precision: parameters, gradients and Adam state are fp32 in every mode (fp32 master
weights, megatron/training/precision.py); bf16/fp16 run the matmuls under autocast, so
saved inputs of linear layers and attention are 2 bytes, the residual stream is in the
training precision unless --fp32-residual-connection (norms compute in fp32 copies),
softmax statistics stay fp32, and autocast's bf16 copies of fp32 weights are alive while
they are saved for backward (and, with its weight cache, until the forward ends). Under
ZeRO-2/3 FSDP2 gathers the weights in bf16: no copies then, 2-byte gathered parameters.
`device="cuda"` stores dropout masks as bool (1 byte) and adds kernel-private workspace
(the flash backward's fp32 dQ accumulator, logsumexp's temporaries); on CPU they are absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.config import ModelConfig, ParallelConfig
from megatron.planning import tiled_memory
from megatron.planning.model_states import _states, parameter_tensors, zero1_partition_max  # noqa: F401

GIB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class _Geometry:
    """Sizes of one rank's step; every tensor count below is in elements of these."""

    m: ModelConfig
    p: ParallelConfig  # the strategy (attention kernel, recompute, tiling) and SP degrees
    n: int  # sequence length
    b: int  # micro batch
    sp: int
    ring: int
    act: int  # bytes of a saved matmul/attention activation (2 under autocast)
    mask: int  # bytes of one hidden-dropout mask element, by device
    device: str
    res: int = 4  # bytes of a residual-stream element (2 under half precision, 4 with fp32 residual)
    wbytes: int = 4  # bytes of a weight as the layers read it (2 when FSDP gathers in bf16/fp16)

    @property
    def ulysses(self) -> int:
        return self.sp // self.ring

    @property
    def t(self) -> int:  # tokens this rank holds outside attention
        return self.b * self.n // self.sp

    @property
    def na(self) -> int:  # tokens this rank's attention sees (all N for pure Ulysses)
        return self.b * self.n // self.ring

    @property
    def hl(self) -> int:  # query heads per rank inside attention
        return math.ceil(self.m.num_attention_heads / self.ulysses)

    @property
    def kvl(self) -> int:  # K/V heads per rank (replicated when fewer than the Ulysses degree)
        return max(1, math.ceil(self.m.num_query_groups / self.ulysses))

    @property
    def gqa(self) -> bool:
        return self.hl > self.kvl

    @property
    def qkv_width(self) -> int:
        m = self.m
        return (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels

    @property
    def n_qkv(self) -> int:  # elements of this rank's q, k, v inside attention
        return self.na * (self.hl + 2 * self.kvl) * self.m.kv_channels

    @property
    def n_head_out(self) -> int:  # elements of this rank's attention output
        return self.na * self.hl * self.m.kv_channels

    @property
    def fc1_width(self) -> int:
        return 2 * self.m.ffn_hidden_size if self.m.activation == "swiglu" else self.m.ffn_hidden_size


def _norm_saved(g: _Geometry) -> int:
    """What a norm keeps besides its input: LayerNorm mean/rstd; RMSNorm (composed from
    elementwise ops) rstd and the normalised fp32 tensor."""
    if g.m.normalization == "LayerNorm":
        return 8 * g.t
    return 4 * g.t + 4 * g.t * g.m.hidden_size


def _attention_input_storages(g: _Geometry) -> int:
    """Storages that the q, k, v handed to the local attention live in: the all-to-all
    receive buffer under Ulysses; otherwise the QKV projection output (v is always a view
    of it) plus, with RoPE, the new rotated q and k."""
    m, a = g.m, g.act
    if g.ulysses > 1:
        return a * g.n_qkv
    qkv_out = a * g.t * g.qkv_width
    if m.position_embedding_type == "rope":
        return qkv_out + a * g.t * (m.num_attention_heads + m.num_query_groups) * m.kv_channels
    return qkv_out


def _backend_saved_inputs(g: _Geometry) -> int:
    """What the local attention keeps of q, k, v: flash-attn contiguous copies; sdpa and
    classic the inputs themselves, with k and v replaced by their repeats under GQA."""
    m, a = g.m, g.act
    if g.p.attention_backend == "flash-attn":
        return a * g.n_qkv
    if not g.gqa:
        return _attention_input_storages(g)
    reps = 2 * a * g.na * g.hl * m.kv_channels
    if g.ulysses > 1:
        return a * g.n_qkv + reps  # q is a view of the receive buffer
    rope = m.position_embedding_type == "rope"
    return reps + (a * g.t * m.num_attention_heads * m.kv_channels if rope else a * g.t * g.qkv_width)


def _scores(g: _Geometry) -> int:
    return g.b * g.hl * g.na * g.na  # elements of one [b, h/p, N, N] score matrix


def _attention_saved(g: _Geometry, selective: bool) -> dict:
    """Saved bytes of core attention for one layer: inputs, workspace, output."""
    m, a = g.m, g.act
    if selective:  # the checkpoint keeps its inputs; the output is what the projection saves
        return {"inputs": _attention_input_storages(g), "workspace": 0, "output": 0}
    lse = 4 * g.b * g.hl * g.na
    if g.ring > 1:  # ring attention keeps q, k, v as given (GQA expanded per block), out, lse
        return {"inputs": _attention_input_storages(g), "workspace": lse, "output": a * g.n_head_out}
    inputs = _backend_saved_inputs(g)
    if g.p.attention_backend in ("sdpa", "flash-attn"):
        return {"inputs": inputs, "workspace": lse, "output": a * g.n_head_out}
    # classic: fp32 probabilities (+ their bf16 copy under autocast) and the bool causal
    # mask; under autocast q and k are saved as fp32 copies
    s = _scores(g)
    work = 4 * s + (2 * s if a == 2 else 0) + g.na * g.na
    if a == 2:
        inputs += 4 * 2 * g.na * g.hl * m.kv_channels
    if m.attention_dropout > 0:
        work += s * (1 if g.device == "cuda" else 4) + 4 * s
    return {"inputs": inputs, "workspace": work, "output": 0}


def _proj_input_aliases_output(g: _Geometry) -> bool:
    """The fused kernels return [b, s, h, d] memory: with one sample and no all-to-all the
    projection's input is a view of the attention output rather than a copy."""
    return g.sp == 1 and g.b == 1 and g.p.attention_backend in ("sdpa", "flash-attn")


def _mlp_internals(g: _Geometry) -> int:
    """fc1 output and activation output (GeLU); fc1 output, SiLU output and product (SwiGLU)."""
    return g.act * g.t * g.m.ffn_hidden_size * (4 if g.m.activation == "swiglu" else 2)


def layer_saved(g: _Geometry, recompute: str | None) -> dict:
    """Bytes one transformer layer keeps for backward, in forward order (input included)."""
    m, a, t, h = g.m, g.act, g.t, g.m.hidden_size
    if recompute == "full":
        return {"layer input": g.res * t * h}
    attn = _attention_saved(g, selective=recompute == "selective")
    proj_in = a * t * m.num_attention_heads * m.kv_channels
    if attn["output"] and _proj_input_aliases_output(g):
        proj_in = 0
    mask = g.mask * t * h if m.hidden_dropout > 0 else 0
    return {
        "layer input": 4 * t * h,
        "input norm": _norm_saved(g),
        "qkv input": a * t * h,
        "attention inputs": attn["inputs"],
        "attention workspace": attn["workspace"],
        "attention output": attn["output"] + proj_in,
        "residual + norm": mask + 4 * t * h + _norm_saved(g),
        # tiled MLP: the tile checkpoints keep only the fp32 norm output
        "mlp": g.res * t * h if g.p.mlp_tiles > 1 else a * t * h + _mlp_internals(g),
        "dropout mask": mask,
    }


_BEFORE_CORE = ("layer input", "input norm", "qkv input", "attention inputs")


def _layer_forward_peak(g: _Geometry, recompute: str | None) -> int:
    """Live bytes of the last layer while it runs forward (beyond the earlier layers).

    Two moments: core attention (QKV output, all-to-all buffers, score matrices) and the
    MLP (its intermediates are Python locals, alive even when nothing is saved).
    """
    m, a, t, h = g.m, g.act, g.t, g.m.hidden_size
    items = layer_saved(g, None if recompute == "full" else recompute)
    before = sum(items[k] for k in _BEFORE_CORE)
    qkv_out = a * t * g.qkv_width
    if g.ulysses > 1:  # QKV output (a local) + packed send buffer + receive buffer
        core = qkv_out + max(a * g.n_qkv, 2 * a * t * m.num_attention_heads * m.kv_channels)
    else:
        core = 0
    if g.ring > 1:  # K/V block + the one in flight, fp32 output accumulator + one block's output
        core += 2 * a * 2 * g.na * g.kvl * m.kv_channels + 2 * 4 * g.n_head_out
    elif g.p.attention_backend == "classic":
        core += 2 * 4 * _scores(g) + 2 * g.na * g.na  # scaled and masked scores, the mask
    elif recompute == "selective" and (g.p.attention_backend == "flash-attn" or g.gqa):
        core += _backend_saved_inputs(g)  # the kernel's Q/K/V copies or K/V repeats, during the call
    core += items["attention workspace"] + items["attention output"]
    attention = before + core
    if recompute == "full":  # the layer input, residual, fp32 norm output and one MLP tile's locals
        mlp = g.res * t * h + items["residual + norm"] + g.res * t * h + _mlp_internals(g) // g.p.mlp_tiles
    else:
        mlp = sum(items.values())
    return max(attention, mlp + a * t * h)  # + the MLP output


def _layer_backward_extra(g: _Geometry, items: dict) -> int:
    """Bytes beyond the last layer's saved set while it runs backward: the incoming
    gradient plus, at the MLP or at attention (whichever is larger), the block gradients.

    An input gradient appears as the node's own saved input is released, so the MLP costs
    one [T, ffn] gradient for GeLU and two for SwiGLU (the product's two factors) above its
    saved set; attention costs dQ, dK, dV at the kernel's head count and the output
    gradient, after the MLP's saved tensors are gone.
    """
    m, a, t, h = g.m, g.act, g.t, g.m.hidden_size
    f = m.ffn_hidden_size
    wgrad_scale = 4 + (2 if a == 2 else 0)  # fp32 weight gradient (+ its bf16 original)
    tiles = max(1, g.p.mlp_tiles)
    tt = math.ceil(t / tiles)
    mlp = max((2 if m.activation == "swiglu" else 1) * a * tt * f, a * tt * f + wgrad_scale * f * h)
    if tiles > 1:  # one tile's intermediates are recomputed
        mlp += _mlp_internals(g) // tiles + a * tt * h
    kernel_heads = g.hl + 2 * (g.hl if g.gqa and g.p.attention_backend != "flash-attn" else g.kvl)
    attn = a * t * m.num_attention_heads * m.kv_channels + a * g.na * kernel_heads * m.kv_channels
    if g.ring > 1:  # fp32 dQ; K/V and fp32 dK/dV blocks, each with the one in flight; for one
        # block the kernel's contiguous Q, K, V, dO, O copies and its fp32 gradients
        kv = 2 * g.na * g.kvl * m.kv_channels
        block = g.n_head_out + 2 * g.na * g.hl * m.kv_channels
        attn = a * t * m.num_attention_heads * m.kv_channels + 4 * g.n_head_out + 2 * a * kv + 2 * 4 * kv \
            + a * (block + 2 * g.n_head_out) + 4 * block
    if g.ulysses > 1:
        attn += a * g.n_qkv  # the assembled gradient of the receive buffer
    if g.p.attention_backend in ("sdpa", "flash-attn") and g.device == "cuda" and g.ring == 1:
        attn += 4 * g.n_head_out  # the fp32 dQ accumulator of the flash backward
    if g.p.attention_backend == "classic":
        attn += 2 * 4 * _scores(g)
    # the QKV projection's backward: its output gradient and its weight gradient
    attn = max(attn, a * t * g.qkv_width + wgrad_scale * h * g.qkv_width)
    after_mlp = items.get("mlp", 0) + items.get("residual + norm", 0) + items.get("dropout mask", 0)
    dx = g.res * t * h
    return dx + max(mlp, attn - after_mlp)


def _loss(g: _Geometry) -> dict:
    """Final norm, logits and cross-entropy: what is saved, and the forward/backward peaks."""
    a, r, t, h, v = g.act, g.res, g.t, g.m.hidden_size, g.m.vocab_size
    if g.p.projection_tiles > 1:  # the tiled final norm keeps its input (the last layer's output) only
        saved = r * t * h + 8 * t
    else:
        saved = 4 * t * h + _norm_saved(g) + 8 * t  # final-norm input and stats, labels
    tile = g.p.loss_tile_tokens
    if tile > 0:
        tt = min(tile, t)
        saved += r * t * h + 8 * t  # hidden states (the final norm's output), log-sum-exp and losses
        # the matmul's weight in the compute dtype: a bf16 copy of an fp32 weight, none of FSDP's bf16 one
        w = 2 * v * h if a == 2 and g.wbytes == 4 else 0
        # one tile's logits at a time (and their fp32 copy under autocast); logsumexp's [tile, V]
        # temporaries are private to the kernel on CPU, two fp32 buffers on CUDA
        fwd = w + 4 * tt * v + (a * tt * v if a == 2 else 0) + (8 * tt * v if g.device == "cuda" else 0)
        # the hidden states' gradient and the fp32 weight gradient, then one tile's fp32 logits,
        # their compute-dtype copy and the [V, h] product added into the weight gradient
        bwd = w + r * t * h + 4 * v * h + 4 * tt * v + (a * tt * v if a == 2 else 0) + a * v * h
        if g.p.projection_tiles > 1:  # then the tiled final norm's backward: the hidden states' gradient
            # (in place of the hidden states), the input gradient and one tile's fp32 norm backward
            # (six [tile, h] buffers)
            bwd = max(bwd, r * t * h + 6 * 4 * math.ceil(t / g.p.projection_tiles) * h)
        return {"saved": saved, "forward": fwd, "backward": bwd}
    saved += a * t * h  # input of the output projection
    fwd = 4 * t * v + a * t * v + (4 * t * v if a == 2 else 0) + (4 * t * h if a == 2 else 0)
    bwd = max(12 * t * v,  # log-softmax output + its incoming and outgoing gradients
              a * t * v + (4 * t * v if a == 2 else 0) + a * t * h + 4 * v * h + (2 * v * h if a == 2 else 0))
    return {"saved": saved, "forward": fwd, "backward": bwd}


def _all_to_all_buffers(g: _Geometry) -> int:
    """Transient Ulysses buffers of one layer: the packed QKV send buffer (the receive buffer
    is what attention saves), or the output's send and receive buffers, whichever is larger."""
    if g.ulysses == 1:
        return 0
    m = g.m
    return g.act * max(g.n_qkv, 2 * g.t * m.num_attention_heads * m.kv_channels)


def _embedding_saved(g: _Geometry) -> int:
    m, t = g.m, g.t
    out = 8 * t  # position ids
    if m.hidden_dropout > 0:
        out += (1 if g.device == "cuda" else 4) * t * m.hidden_size
    if m.position_embedding_type == "rope":
        out += 2 * 4 * t * m.kv_channels  # cos and sin, shared by every layer
    return out


def estimate_memory(model: ModelConfig, seq_length: int, *, micro_batch_size: int = 1,
                    data_parallel_size: int = 1, precision: str = "fp32", device: str = "cuda",
                    autocast_weight_cache: bool = True, parallel: ParallelConfig | None = None,
                    **parallel_fields) -> dict:
    """Bytes one rank needs for a training step of `model` on `seq_length`-token sequences.

    The strategy is `parallel` (a ParallelConfig: SP/ring degrees, ZeRO stage, attention
    kernel, recompute, tiling), with any of its fields overridden by keyword
    (`sequence_parallel_size=4, zero_stage=3, recompute_granularity="full"`, ...).

    The sequence-data-parallel group that ZeRO shards over has SP x DP ranks. Returns a
    dict of bytes: the static state (`parameters`, `gradients`, `optimizer_state`), the
    step's working memory (`activations` as configured and under each recompute mode,
    `logits_loss`, `all_to_all_buffers`, `attention_workspace`, `backward_workspace`,
    `gathered_parameters`, `weight_copies`), the total at each moment in `phases`, and
    `peak` / `peak_phase`; `peak_above_states` is the peak minus the static state, the
    quantity the CPU validation measures.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    p = (parallel or ParallelConfig()).replace(**parallel_fields)
    sp, ring, zero = p.sequence_parallel_size, p.ring_attention_size, p.zero_stage
    if sp < 1 or ring < 1 or sp % ring or data_parallel_size < 1 or micro_batch_size < 1:
        raise ValueError(f"need SP >= 1, DP >= 1, micro batch >= 1 and ring size dividing SP; got SP={sp}, "
                         f"ring={ring}, DP={data_parallel_size}, micro batch={micro_batch_size}")
    if seq_length % sp:
        raise ValueError(f"seq_length ({seq_length}) must be divisible by the SP size ({sp})")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero}")
    half = precision != "fp32"
    act = 2 if half else 4
    g = _Geometry(m=model, p=p, n=seq_length, b=micro_batch_size, sp=sp, ring=ring, act=act,
                  mask=1 if device == "cuda" else act, device=device,
                  res=2 if half and not p.fp32_residual_connection else 4,
                  wbytes=2 if half and zero >= 2 else 4)
    L, h, v = model.num_layers, model.hidden_size, model.vocab_size
    tensors = parameter_tensors(model)
    sdp = sp * data_parallel_size
    states = _states(model, zero, sdp, tensors)
    static = sum(states.values())

    recompute = p.recompute_granularity
    tiled = p.projection_tiles > 1
    per_layer = {mode: layer_saved(g, mode) for mode in (None, "selective", "full")}
    if tiled:  # the tiled layer keeps its own set (tiled_memory.py); full recompute keeps its input
        per_layer[None] = per_layer["selective"] = tiled_memory.saved(g)
    saved = {mode: sum(items.values()) for mode, items in per_layer.items()}
    emb = _embedding_saved(g)
    loss = _loss(g)
    # offload: every layer but the last keeps its saved set in host memory; in backward one
    # more layer's set is on the device (prefetched), from the moment the prefetch starts
    offload = p.offload_activations and L > 1
    on_device = 1 if offload else L
    stored = emb + on_device * saved[recompute]
    host = (L - 1) * saved[recompute] if offload else 0
    prefetched = saved[recompute] if offload else 0
    others = stored - saved[recompute]  # what the rest of the model holds while one layer runs
    if tiled:
        terms = tiled_memory.phase_terms(g, recompute)
        # a tiled layer asks for the previous layer's tensors after its attention backward
        for k in ("send gradient", "pre backward"):
            if prefetched and terms[k]:
                terms[k]["prefetched input of the next layer (offload)"] = prefetched
        ph = {k: sum(v.values()) for k, v in terms.items()}
        fwd_keys = ("pre", "exchange", "attention", "projection", "mlp")
        fwd_moment = max(fwd_keys, key=ph.get)
        bwd_moment = max((k for k in ph if k not in fwd_keys), key=ph.get)
        layer_fwd, layer_bwd = ph[fwd_moment], ph[bwd_moment]
        layer_terms = {"layer_forward": (fwd_moment, terms[fwd_moment]),
                       "layer_backward": (bwd_moment, terms[bwd_moment])}
        bwd_x = layer_bwd - saved[recompute]
    else:
        bwd_x = _layer_backward_extra(g, per_layer[None if recompute == "full" else recompute])
        # the last layer's backward runs on its full saved set (recomputed under full recompute)
        full_layer = saved[None] if recompute == "full" else saved[recompute]
        layer_bwd = full_layer + bwd_x + prefetched
        layer_fwd = _layer_forward_peak(g, recompute) + prefetched
        layer_terms = {"layer_forward": ("attention", {"the layer's forward working set": layer_fwd}),
                       "layer_backward": ("backward", {"the layer's saved set": full_layer,
                                                       "its backward workspace": bwd_x,
                                                       "prefetched layer (offload)": prefetched})}

    # parameters the step holds beyond its shard: FSDP's gathered copies (bf16 under half
    # precision: MixedPrecisionPolicy), gradient buffers of one layer before its reduce-scatter,
    # autocast's bf16 copies of fp32 weights
    layer_params = sum(n for name, n, _ in tensors if name.startswith("layers.0."))
    root_params = sum(n for name, n, _ in tensors if not name.startswith("layers."))
    total_params = sum(n for _, n, _ in tensors)
    # what autocast casts to bf16: the weights and biases of the four linear layers
    lin_layer = sum(n for name, n, _ in tensors if name.startswith("layers.0.") and "norm" not in name)
    pb = g.wbytes  # bytes of a gathered parameter
    if zero == 2:
        gathered = pb * total_params
    elif zero == 3:
        gathered = pb * (root_params + min(2, L) * layer_params)
    else:
        gathered = 0
    # FSDP reduce-scatters a layer's gradients after its backward (the unsharded gradient in the
    # gathered dtype + the fp32 reduce-scatter input); the root's wait for the end: the output
    # weight's gradient is alive from the loss backward on
    grad_buffers = (pb + 4) * layer_params if zero >= 2 else 0
    root_grads = pb * v * h if zero >= 2 else 0
    # autocast copies fp32 weights; FSDP's bf16 gathers need none
    copied = half and not (zero >= 2)
    out_copy = 2 * v * h if copied and p.loss_tile_tokens == 0 else 0
    all_copies = 2 * (L * lin_layer + v * h) if copied else 0
    if not copied:
        copies = dict.fromkeys(("forward_end", "loss_backward", "layer_forward", "layer_backward"), 0)
    elif recompute == "full":
        cached = autocast_weight_cache
        copies = {"forward_end": all_copies if cached else out_copy,
                  "loss_backward": out_copy,
                  "layer_forward": 2 * L * lin_layer if cached else 2 * lin_layer,
                  "layer_backward": 2 * lin_layer}
    else:
        copies = {"forward_end": all_copies, "loss_backward": L * 2 * lin_layer + out_copy,
                  "layer_forward": 2 * L * lin_layer, "layer_backward": 2 * L * lin_layer}

    phases = {
        "forward_end": stored + loss["saved"] + loss["forward"] + copies["forward_end"] + gathered,
        # (FSDP has gathered the last layer for its backward; the output weight's gradient appears
        # when the loss backward ends)
        "loss_backward": stored + loss["saved"] + loss["backward"] + copies["loss_backward"]
        + (gathered - pb * layer_params if zero == 3 and L > 1 else gathered),
        "layer_forward": others + layer_fwd + copies["layer_forward"] + gathered,
        # the first forward of a layer under full recompute, before the loss (tiled layers)
        "first_forward": (emb + tiled_memory.first_forward(g) + gathered)
        if tiled and recompute == "full" else 0,
        "layer_backward": others + layer_bwd + copies["layer_backward"] + gathered + grad_buffers + root_grads,
    }
    if not phases["first_forward"]:
        del phases["first_forward"]
    peak_phase = max(phases, key=phases.get)
    peak = static + phases[peak_phase]
    # the terms of the peak, largest first: what to shrink to go longer
    peak_terms = {"parameters (fp32 shard)": states["parameters"], "gradients (fp32 shard)": states["gradients"],
                  "optimizer state (Adam shard)": states["optimizer state"]}
    if peak_phase in ("layer_forward", "layer_backward"):
        moment, layer_items = layer_terms[peak_phase]
        peak_terms["other layers' saved inputs on the device"] = others
        peak_terms.update({f"{name} ({moment})": b for name, b in layer_items.items()})
        if peak_phase == "layer_backward":
            peak_terms["one layer's unsharded gradients + reduce-scatter input (ZeRO)"] = grad_buffers
            peak_terms["output weight gradient (ZeRO)"] = root_grads
    elif peak_phase == "first_forward":
        peak_terms["a layer's first forward (input, Q/K/V buffers, outputs)"] = phases[peak_phase] - gathered - emb
        peak_terms["RoPE cos/sin, embedding"] = emb
    else:
        peak_terms["saved activations on the device"] = stored
        peak_terms["logits and loss (saved + one tile)"] = loss["saved"] + loss[
            "forward" if peak_phase == "forward_end" else "backward"]
    if peak_phase != "first_forward":
        peak_terms["gathered parameters (ZeRO)"] = gathered if peak_phase != "loss_backward" else \
            (gathered - pb * layer_params if zero == 3 and L > 1 else gathered)
    peak_terms["autocast weight copies"] = copies.get(peak_phase, 0)
    peak_terms = dict(sorted(((k, v) for k, v in peak_terms.items() if v), key=lambda kv: -kv[1]))
    # softmax statistics (or score matrices) of every layer that keeps them; with full
    # recompute, of the one layer being recomputed
    if tiled:
        attn_ws = tiled_memory.sizes(g)["LSE"] * (1 if recompute == "full" else L)
    else:
        attn_ws = per_layer[None]["attention workspace"] if recompute == "full" else \
            per_layer[recompute]["attention workspace"] * L
    return {
        "parameters": states["parameters"],
        "gradients": states["gradients"],
        "optimizer_state": states["optimizer state"],
        "gathered_parameters": gathered + (grad_buffers if peak_phase == "layer_backward" else 0)
        + (root_grads if peak_phase in ("loss_backward", "layer_backward") else 0),
        "weight_copies": copies[peak_phase],
        "activations": stored,
        "activations_no_recompute": emb + L * saved[None],
        "activations_selective_recompute": emb + L * saved["selective"],
        "activations_full_recompute": emb + L * saved["full"],
        "host_activations": host,
        "offloaded_per_step": host,
        "logits_loss": loss["saved"] + max(loss["forward"], loss["backward"]),
        "all_to_all_buffers": _all_to_all_buffers(g),
        "attention_workspace": attn_ws,
        "backward_workspace": bwd_x,
        "per_layer": per_layer[recompute],
        "phases": {k: static + x for k, x in phases.items()},
        "peak_phase": peak_phase,
        "peak_terms": peak_terms,
        "peak": peak,
        "peak_above_states": phases[peak_phase],
        "static": static,
        "num_parameters": total_params,
        "tokens_per_rank": g.t,
        "residual_bytes": g.res,
    }


def sequence_granularity(sequence_parallel_size: int, ring_attention_size: int = 1) -> int:
    """Sequence lengths must be multiples of this: SP shards, and 2R zigzag chunks for a ring."""
    if ring_attention_size > 1:
        return math.lcm(sequence_parallel_size, 2 * ring_attention_size)
    return sequence_parallel_size


def largest_seq_length(model: ModelConfig, budget_bytes: float, *, grow_positions: bool = True,
                       limit: int = 1 << 34, **settings) -> int:
    """Longest sequence (a multiple of the SP granularity) whose step peak fits `budget_bytes`.

    `grow_positions`: learned absolute positions get `max_position_embeddings = N` (what the
    scripts do), so their table grows with N. Returns 0 when even the shortest does not fit.
    """
    parallel = settings.get("parallel") or ParallelConfig()
    step = sequence_granularity(settings.get("sequence_parallel_size", parallel.sequence_parallel_size),
                                settings.get("ring_attention_size", parallel.ring_attention_size))

    def peak(n: int) -> float:
        m = model
        if grow_positions and m.position_embedding_type == "learned_absolute":
            m = m.replace(max_position_embeddings=n)
        return estimate_memory(m, n, **settings)["peak"]

    if peak(step) > budget_bytes:
        return 0
    lo, hi = 1, 2  # in units of `step`: lo fits, hi is the first guess that may not
    while hi * step <= limit and peak(hi * step) <= budget_bytes:
        lo, hi = hi, hi * 2
    if hi * step > limit:
        return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid * step) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo * step
