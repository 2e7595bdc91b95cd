"""What a sequence-tiled layer keeps and allocates: the planner's model of `--tiled-projection-tiles`.

A tiled layer (megatron.parallel.wrappers.apply_layer_tiling) is three `tiled_map`s around
core attention; under Ulysses the first one writes the all-to-all's send buffer itself
and the last two read the returned heads in place. Its memory is a short list of whole
`[tokens, width]` buffers plus one tile's intermediates, read here from the code:

  X    the layer input (and every residual-stream tensor): r bytes per element
  S, R the all-to-all send and receive buffers of Q, K, V (a bytes; R is what attention reads)
  OUT  the attention kernel's outputs, one per head chunk, kept for its backward
  O    their concatenation, sent back (OA in the code); OB what comes back (the projection's input)
  X1   the residual after attention (the MLP block's input)
  LSE  the kernel's fp32 log-sum-exp

Without Ulysses (SP 1, or a ring, or uneven heads) the QKV output `[t, W]` takes the place of
S and R and the attention output is the projection's input.

`phases(g)` returns the bytes of each moment of one layer's life beyond what the rest of the
model holds: its recomputed forward (full recompute) and its backward, in order. The tile
terms follow each op's outputs in one tile (an fp32 copy and an fp32 result per norm, RoPE's
fp32 temporaries, the MLP's `[tile, 2 ffn]`), validated against MemoryTracker in tests/memory.
"""

from __future__ import annotations

import math

from megatron.model.sequence_tiling import head_chunks


def fused_ulysses(g) -> bool:
    """The tiled layer writes the send buffer itself (plain Ulysses, equal heads on every rank)."""
    if g.ulysses == 1 or g.ring > 1 or g.p.ulysses_overlap_chunks > 1:
        return False
    m = g.m
    q_even = m.num_attention_heads % g.ulysses == 0
    kv_equal = m.num_query_groups % g.ulysses == 0 or g.ulysses % m.num_query_groups == 0
    return q_even and kv_equal


def _chunk_heads(g) -> tuple[int, int]:
    """(query, K/V) heads of the largest head chunk of the local attention."""
    chunks = head_chunks(g.hl, g.kvl, g.p.attention_head_chunks)
    return max(c[0].stop - c[0].start for c in chunks), max(c[1].stop - c[1].start for c in chunks)


def sizes(g) -> dict:
    """Bytes of the whole buffers of one tiled layer (see the module doc)."""
    m, a, r, t, h, d = g.m, g.act, g.res, g.t, g.m.hidden_size, g.m.kv_channels
    hq = m.num_attention_heads
    qkv = a * g.n_qkv if g.ulysses > 1 else a * t * g.qkv_width
    out = a * g.n_head_out
    return {
        "X": r * t * h,
        "QKV": qkv,  # S and R (or the QKV output)
        "OUT": out,
        "O": out,
        "OB": a * t * hq * d if g.ulysses > 1 else 0,  # without Ulysses the projection reads O itself
        "X1": max(r, a) * t * h,
        "LSE": 4 * g.b * g.hl * g.na,
    }


def _tile_terms(g) -> dict:
    """Intermediates of one tile, forward (no graph) and backward (recomputed with its graph)."""
    m, a, r, h = g.m, g.act, g.res, g.m.hidden_size
    d, hq, hkv, f = m.kv_channels, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    fc1 = g.fc1_width
    tp = math.ceil(g.t / g.p.projection_tiles)
    tm = math.ceil(g.t / g.p.mlp_tiles)
    rms = m.normalization == "RMSNorm"
    norm = 4 * h * (2 if rms else 1)  # fp32 copy of the input (+ RMSNorm's fp32 result), per token
    rope = 4 * 3 * (hq + hkv) * d if m.position_embedding_type == "rope" else 0
    # forward: a norm's fp32 copies are gone before the matmul that reads its output
    pre_fwd = tp * (r * h + max(norm, 2 * a * g.qkv_width + rope))
    pre_bwd = 2 * pre_fwd
    mlp_fwd = tm * (r * h + max(norm, a * (fc1 + 2 * f) + a * h))
    mlp_bwd = tm * (2 * norm + a * (2 * fc1 + 3 * f + 2 * h))
    proj_fwd = tp * (a * hq * d + a * h)
    proj_bwd = 2 * proj_fwd
    # fp32 sums of the tiles' weight gradients and one tile's own (in the weights' dtype)
    wb = g.wbytes
    w_mlp = (4 + wb) * (fc1 * h + f * h)
    w_pre = (4 + wb) * (g.qkv_width * h)
    w_proj = (4 + wb) * (hq * d * h)
    return {"pre_fwd": pre_fwd, "pre_bwd": pre_bwd + w_pre, "mlp_fwd": mlp_fwd, "mlp_bwd": mlp_bwd + w_mlp,
            "proj_fwd": proj_fwd, "proj_bwd": proj_bwd + w_proj}


def attention_backward_extra(g) -> int:
    """The head-chunked attention's backward beyond its saved set: the dQ buffer, fp32 dK/dV sums,
    one chunk's kernel gradients and (CUDA) the flash backward's fp32 dQ accumulator of one chunk."""
    d, a = g.m.kv_channels, g.act
    cq, ckv = _chunk_heads(g)
    chunks = len(head_chunks(g.hl, g.kvl, g.p.attention_head_chunks))
    kernel = a * g.na * (cq + 2 * ckv) * d  # the kernel's dQ, dK, dV for one call
    workspace = 4 * g.na * cq * d if g.device == "cuda" else 0
    if chunks == 1:  # one call: its gradients are the gradients
        return kernel + workspace
    dq = a * g.na * g.hl * d
    dkv = 2 * 4 * g.na * g.kvl * d
    return dq + dkv + kernel + workspace


def phase_terms(g, recompute: str | None) -> dict:
    """Each moment of one layer's recomputed forward and backward, as {buffer: bytes}, beyond the
    rest of the model (its own input X and the incoming gradient G included; other layers' not)."""
    s, tile = sizes(g), _tile_terms(g)
    X, QKV, OUT, OA, OB, X1, LSE = (s[k] for k in ("X", "QKV", "OUT", "O", "OB", "X1", "LSE"))
    ulysses = g.ulysses > 1
    proj_in = OB if ulysses else OA
    base = {"layer input": X, "incoming gradient": X}
    out: dict
    saved = {**base, "attention inputs (Q, K, V)": QKV, "attention outputs kept by the kernel": OUT + LSE}
    after = {"layer input": X, "attention inputs (Q, K, V)": QKV, "attention outputs kept by the kernel": OUT + LSE}
    out = {
        "pre": {**base, "QKV send buffer" if ulysses else "QKV output": QKV, "one tile": tile["pre_fwd"]},
        "exchange": {**base, "QKV send buffer": QKV, "QKV receive buffer": QKV} if ulysses else {},
        "attention": {**saved, "attention output": OA, **({"returned heads": OB} if ulysses else {})},
        "projection": {**saved, "projection input": proj_in, "residual after attention": X1,
                       "one tile": tile["proj_fwd"]},
        "mlp": {**saved, "projection input": proj_in, "residual after attention": X1, "layer output": X,
                "one tile": tile["mlp_fwd"]},
        "mlp backward": {**saved, "projection input": proj_in, "residual after attention": X1,
                         "its gradient": X1, "one tile (recomputed, with gradients)": tile["mlp_bwd"]},
        "projection backward": {**after, "projection input": proj_in, "gradient after attention": X1,
                                "projection input gradient": proj_in,
                                "one tile (recomputed, with gradients)": tile["proj_bwd"]},
        "attention backward": {**after, "gradient after attention": X1, "attention output gradient": OA,
                               "dQ, fp32 dK/dV, one chunk's kernel gradients and workspace":
                               attention_backward_extra(g)},
        "qkv gradient": {"layer input": X, "gradient after attention": X1, "dQ, dK, dV": QKV,
                         "receive buffer gradient": QKV},
        "send gradient": {"layer input": X, "gradient after attention": X1,
                          **({"receive buffer gradient": QKV, "send buffer gradient": QKV} if ulysses
                             else {"QKV output gradient": 2 * QKV})},
        "pre backward": {"layer input": X, "gradient after attention": X1, "QKV gradient": QKV,
                         "layer input gradient": X, "one tile (recomputed, with gradients)": tile["pre_bwd"]},
    }
    return _ring_terms(g, out) if g.ring > 1 else out


def _ring_terms(g, terms: dict) -> dict:
    """Ulysses x ring: the QKV output stays referenced through attention (the generic path), the ring's
    output is what its backward keeps (not a second copy), and its fp32 accumulators (ring.py):
    forward the fp32 output and the K/V block in flight; backward fp32 dQ, K/V and fp32 dK/dV blocks
    with the ones in flight, and one block's kernel copies."""
    a, d = g.act, g.m.kv_channels
    kv = 2 * g.na * g.kvl * d
    block = g.n_head_out + 2 * g.na * g.hl * d
    qkv_out = a * g.t * g.qkv_width
    for k in ("attention", "projection", "mlp", "mlp backward"):
        terms[k].pop("attention outputs kept by the kernel", None)
        terms[k]["attention output kept by the ring (+ log-sum-exp)"] = a * g.n_head_out + sizes(g)["LSE"]
    terms["attention"].pop("attention output", None)
    terms["attention"]["QKV output (referenced through attention)"] = qkv_out
    expand = 2 * a * g.na * g.hl * d if g.hl > g.kvl else 0  # a block's K/V repeated for GQA (CPU/fp32 path)
    terms["attention"]["ring: fp32 output accumulator, K/V blocks in flight, GQA repeats"] = \
        2 * 4 * g.n_head_out + 2 * a * kv + expand
    ring_bwd = 4 * g.n_head_out + 2 * a * kv + 2 * 4 * kv + a * (block + 2 * g.n_head_out) + 4 * block
    terms["attention backward"]["dQ, fp32 dK/dV, one chunk's kernel gradients and workspace"] = ring_bwd
    return terms


def phases(g, recompute: str | None) -> dict:
    """Bytes of one layer at each moment of its recomputed forward and its backward (phase_terms summed)."""
    return {k: sum(v.values()) for k, v in phase_terms(g, recompute).items()}


def first_forward(g) -> int:
    """One layer's peak in the first forward under full recompute (nothing saved, no gradient), the
    layer input included; under offload, on CUDA, the previous layer's input may still be copying out."""
    s, tile = sizes(g), _tile_terms(g)
    X, QKV, OA, OB, X1 = (s[k] for k in ("X", "QKV", "O", "OB", "X1"))
    ulysses = g.ulysses > 1
    chunks = len(head_chunks(g.hl, g.kvl, g.p.attention_head_chunks))
    in_flight = X if g.p.offload_activations and g.device == "cuda" else 0
    ring = 0
    if g.ring > 1:  # the generic path: the QKV output, send and receive buffers, the ring's fp32 output
        qkv_out, kv = g.act * g.t * g.qkv_width, 2 * g.na * g.kvl * g.m.kv_channels
        expand = 2 * g.act * g.na * g.hl * g.m.kv_channels if g.hl > g.kvl else 0  # GQA repeats of a block
        ring = max(X + qkv_out + 2 * QKV,
                   X + qkv_out + QKV + 2 * 4 * g.n_head_out + 2 * g.act * kv + g.act * g.n_head_out + expand)
    return in_flight + max(
        ring,
        X + QKV + tile["pre_fwd"],
        X + 2 * QKV if ulysses else 0,  # send and receive buffers
        X + QKV + OA * (2 if chunks > 1 and not ulysses else 1),
        X + OA + OB if ulysses else 0,
        X + (OB if ulysses else OA) + X1 + tile["proj_fwd"],
        X + X1 + X + tile["mlp_fwd"],
    )


def saved(g) -> dict:
    """What one tiled layer keeps for backward without recompute, item by item."""
    s = sizes(g)
    return {"layer input": s["X"], "attention inputs": s["QKV"], "attention outputs": s["OUT"] + s["LSE"],
            "projection input": s["OB"] if g.ulysses > 1 else s["O"], "mlp input": s["X1"]}
