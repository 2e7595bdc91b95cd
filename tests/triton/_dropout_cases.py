"""Attention dropout in the Triton kernel, checked under the interpreter (run by _interpret_cases.py).

The kernel draws its keep mask from Philox keyed by (seed, batch, head, query, key);
`dropout_keep_mask` returns that mask for a seed, so each case runs TritonAttention in
training mode, rebuilds the seed it drew (same torch seed -> same draw), and compares
output and gradients with a plain fp32 attention that applies exactly that mask. The
other checks cover what a mask comparison cannot: the kernel's own mask read back from
its output, p = 0 and eval mode, reproducibility, the keep rate, and recompute.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

import megatron.model.triton_attention as ta
from megatron.model.attention_backends import keep_mask
from tests.utils import rel_err

# 32-wide tiles: the interpreter pays about a millisecond per nested @triton.jit call and
# tl.rand nests six, so fewer, larger tiles keep these cases at about a second each
TILES = dict(block_m=32, block_n=32)
TORCH_SEED = 1234

# name: (s, b, hq, hkv, d, causal, layout, document cuts per row, tiles, dtype, dropout_p)
# no s is a multiple of the tile sizes, so padding rows/columns are in play everywhere
DROPOUT_CASES = {
    "drop_causal_mha_sbhd_s40_b2": (40, 2, 2, 2, 16, True, "sbhd", None, TILES, "float32", 0.1),
    "drop_noncausal_gqa2_bshd_s37": (37, 1, 2, 1, 16, False, "bshd", None, TILES, "float32", 0.3),
    "drop_causal_gqa2_docs_s45_mixed_tiles": (45, 1, 2, 1, 16, True, "bshd", [[7, 30]],
                                              dict(block_m=32, block_n=16, bwd_block_m=16, bwd_block_n=32),
                                              "float32", 0.2),
    "drop_noncausal_docs_sbhd_s33_b2_int64": (33, 2, 2, 1, 24, False, "sbhd", [[9], [20]],
                                              dict(TILES, int64_index=True), "float32", 0.5),
    "drop_causal_gqa2_docs_fp16_s40": (40, 1, 2, 1, 16, True, "sbhd", [[13]], TILES, "float16", 0.1),
}


def _segments(b: int, s: int, cuts: list[list[int]] | None) -> torch.Tensor | None:
    if cuts is None:
        return None
    seg = torch.zeros(b, s, dtype=torch.long)
    for i, row in enumerate(cuts):
        for c in row:
            seg[i, c:] += 1
    return seg


def reference(q, k, v, z, *, causal, segment_ids, scale):
    """(softmax(q k^T * scale, masked) * z) @ v in fp32 on [b, h, s, d]; z [b, hq, s, s] is keep / (1 - p)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))  # [b, hkv, s, d] -> [b, hq, s, d]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = keep_mask(q.shape[2], k.shape[2], causal=causal, segment_ids=segment_ids, attention_mask=None,
                        device=q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1) * z, v)


def _to_bhsd(t, layout):
    return t.permute(1, 2, 0, 3) if layout == "sbhd" else t.transpose(1, 2)  # -> [b, h, s, d]


def run_dropout_case(name: str) -> dict:
    fa = ta._kernels()
    s, b, hq, hkv, d, causal, layout, cuts, tiles, dtype, p = DROPOUT_CASES[name]
    gen = torch.Generator().manual_seed(7)
    dt = getattr(torch, dtype)

    def shape(h):
        return (s, b, h, d) if layout == "sbhd" else (b, s, h, d)

    q, k, v = (torch.randn(shape(h), generator=gen).to(dt) for h in (hq, hkv, hkv))
    grad = torch.randn(shape(hq), generator=gen).to(dt)
    seg = _segments(b, s, cuts)

    attn = ta.TritonAttention(causal=causal, layout=layout, dropout_p=p, **tiles)  # training mode
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(TORCH_SEED)
    out = attn(*leaves, segment_ids=seg)
    out.backward(grad)
    got = [out.detach(), *(t.grad for t in leaves)]

    torch.manual_seed(TORCH_SEED)
    seed = fa.draw_seed("cpu")  # the draw the module made
    keep = fa.dropout_keep_mask(seed, b, hq, s, p)  # [b, hq, s, s]
    z = keep.float() / (1 - p)
    ref_leaves = [_to_bhsd(t.float(), layout).clone().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves, z, causal=causal, segment_ids=seg, scale=1 / math.sqrt(d))
    ref.backward(_to_bhsd(grad.float(), layout))
    want = [ref.detach(), *(t.grad for t in ref_leaves)]

    got = [_to_bhsd(t.float(), layout) for t in got]
    keys = ("out", "dq", "dk", "dv")
    return {"dropout_case": name,
            "errors": {key: rel_err(a, r) for key, a, r in zip(keys, got, want)},
            "max_abs": {key: (a - r).abs().max().item() for key, a, r in zip(keys, got, want)},
            "keep_rate": keep.float().mean().item()}


def _read_back_mask(fa, causal: bool) -> dict:
    """The kernel's own mask, read from its output: q = k = 0 makes P uniform over the visible keys,
    V = dO = identity (d = s) makes O = P * Z and dV = sum over the group's heads of (P * Z)^T."""
    b, hq, hkv, s, p, seed = 1, 2, 1, 40, 0.25, 31337
    q = torch.zeros(b, hq, s, s, requires_grad=True)
    k = torch.zeros(b, hkv, s, s, requires_grad=True)
    v = torch.eye(s).expand(b, hkv, s, s).clone().requires_grad_()
    # one 64-wide tile per head (tiling is the reference cases' business): a quarter of the interpreter time
    cfg = fa.KernelConfig(s, dtype=torch.float32, device="cpu", block_m=64, block_n=64, bwd_block_m=None,
                          bwd_block_n=None, num_warps=None, num_stages=None)
    out = fa.flash_attention(q, k, v, causal=causal, cfg=cfg, dropout_p=p, seed=seed)
    out.backward(torch.eye(s).expand(b, hq, s, s))
    keep = fa.dropout_keep_mask(seed, b, hq, s, p).float()
    visible = torch.arange(1, s + 1, dtype=torch.float32)[:, None] if causal else torch.full((s, 1), float(s))
    if causal:
        keep = keep.tril()
    fwd_mask = out.detach() * visible * (1 - p)  # [b, hq, s, s]: keep as read from O
    dv_mask = v.grad * visible.T * (1 - p)  # [b, hkv, s(key), s(query)]
    group_keep = keep.sum(dim=1, keepdim=True).transpose(-1, -2)  # heads of the group summed, transposed
    return {"fwd_max_dev": (fwd_mask - keep).abs().max().item(),
            "dv_max_dev": (dv_mask - group_keep).abs().max().item(),
            "kept": int(keep.sum().item()), "pairs": b * hq * s * (s + 1) // 2 if causal else keep.numel()}


def dropout_checks() -> dict:
    fa = ta._kernels()
    res = {"read_back_noncausal": _read_back_mask(fa, False), "read_back_causal": _read_back_mask(fa, True)}

    gen = torch.Generator().manual_seed(3)
    s, b, h, d = 24, 1, 2, 16  # one tile per head: these checks are about the seed, not the tiling
    q, k, v = (torch.randn(s, b, h, d, generator=gen) for _ in range(3))
    grad = torch.randn(s, b, h, d, generator=gen)

    # p = 0 and eval mode: the plain kernel, bit for bit, and no draw from the generator
    plain = ta.TritonAttention(**TILES)(q, k, v)
    state = torch.get_rng_state()
    p0 = ta.TritonAttention(dropout_p=0.0, **TILES)(q, k, v)
    evaluated = ta.TritonAttention(dropout_p=0.3, **TILES).eval()(q, k, v)
    res["p0_equal_plain"] = torch.equal(p0, plain)
    res["eval_equal_plain"] = torch.equal(evaluated, plain)
    res["p0_eval_rng_untouched"] = torch.equal(state, torch.get_rng_state())

    # the same torch seed gives the same mask; the generator moves on between calls
    attn = ta.TritonAttention(dropout_p=0.3, **TILES)
    torch.manual_seed(5)
    first, second = attn(q, k, v), attn(q, k, v)
    torch.manual_seed(5)
    again = attn(q, k, v)
    res["same_torch_seed_same_output"] = torch.equal(first, again)
    res["next_call_differs"] = not torch.equal(first, second)
    res["dropout_changes_output"] = not torch.equal(first, plain)
    bhsd = [t.permute(1, 2, 0, 3) for t in (q, k, v)]  # [s, b, h, d] -> [b, h, s, d]
    cfg = fa.KernelConfig(d, dtype=torch.float32, device="cpu", bwd_block_m=None, bwd_block_n=None,
                          num_warps=None, num_stages=None, **TILES)
    by_int = fa.flash_attention(*bhsd, cfg=cfg, dropout_p=0.3, seed=99)
    by_tensor = fa.flash_attention(*bhsd, cfg=cfg, dropout_p=0.3, seed=torch.tensor([99]))
    res["explicit_seed_reproducible"] = torch.equal(by_int, by_tensor)

    # keep rate of the mask (the cases above show the kernel applies exactly this mask)
    masks = {p: fa.dropout_keep_mask(2024, 1, 2, 128, p) for p in (0.1, 0.5)}  # 32768 draws: sd <= 0.0028
    res["keep_rates"] = {str(p): m.float().mean().item() for p, m in masks.items()}
    # independent heads and seeds agree on a fraction p^2 + (1 - p)^2 = 0.5 of the draws
    res["head_agreement"] = (masks[0.5][:, 0] == masks[0.5][:, 1]).float().mean().item()
    res["seed_agreement"] = (masks[0.5] == fa.dropout_keep_mask(2025, 1, 2, 128, 0.5)).float().mean().item()

    # recompute under activation checkpointing (non-reentrant, as the project's recompute uses it)
    # redraws the same seed: identical output and gradients
    grads = {}
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(11)
        out = checkpoint(attn, *leaves, use_reentrant=False) if recompute else attn(*leaves)
        out.backward(grad)
        grads[recompute] = [out.detach(), *(t.grad for t in leaves)]
    res["checkpoint_identical"] = all(torch.equal(a, r) for a, r in zip(grads[True], grads[False]))
    return res
