"""Runs the Triton kernel under the interpreter and prints one JSON object per line.

Started by test_triton_attention.py in a fresh process with TRITON_INTERPRET=1, because
the interpreter is chosen when triton is imported and the pytest process may have
imported it already. Each correctness case compares forward and the three gradients
with an independent reference backend (classic, or sdpa for repeated ids) and reports
norm-wise relative errors; each error case reports the exception it got; the dropout
cases and checks are in _dropout_cases.py.

    TRITON_INTERPRET=1 python -m tests.triton._interpret_cases [case ...]

It also reports which dot precision the kernels use under the interpreter.
"""

from __future__ import annotations

import json
import sys
import time

import megatron.model.triton_attention as ta  # before anything imports triton: must not import it

TRITON_IMPORTED_BY_MODULE = "triton" in sys.modules

import torch  # noqa: E402

from megatron.model.attention_backends import ClassicAttention, SDPAttention  # noqa: E402
from tests.triton._dropout_cases import DROPOUT_CASES, dropout_checks, run_dropout_case  # noqa: E402
from tests.utils import rel_err  # noqa: E402

SMALL = dict(block_m=16, block_n=16)


def _segments(b: int, s: int, cuts: list[list[int]]) -> torch.Tensor:
    """[b, s] document ordinals; row i starts a new document at each position in cuts[i]."""
    seg = torch.zeros(b, s, dtype=torch.long)
    for i, row in enumerate(cuts):
        for c in row:
            seg[i, c:] += 1
    return seg


# bfloat16 is absent: the interpreter's tl.dot multiplies the raw uint16 bits of bf16 operands
# (triton 3.9), so bf16 can only be checked on a GPU (benchmarks/bench_triton_attention.py).
# name: (s, b, hq, hkv, d, causal, layout, segment cuts or ids, tiles, dtype, reference)
CASES = {
    "causal_mha_sbhd_s40": (40, 2, 2, 2, 16, True, "sbhd", None, SMALL, "float32", "classic"),
    "causal_gqa2_bshd_s40_d32": (40, 1, 4, 2, 32, True, "bshd", None, SMALL, "float32", "classic"),
    "causal_gqa4_docs_sbhd_s64": (64, 1, 4, 1, 16, True, "sbhd", [[5, 21, 40]], SMALL, "float32",
                                  "classic"),
    "causal_docs_bshd_s40_mixed_tiles": (40, 1, 2, 1, 16, True, "bshd", [[3, 17, 18, 37]],
                                         dict(block_m=32, block_n=16, bwd_block_m=16, bwd_block_n=32),
                                         "float32", "classic"),
    "noncausal_docs_bshd_s40": (40, 2, 2, 2, 16, False, "bshd", [[9, 30], [1]], SMALL, "float32", "classic"),
    "noncausal_d24_padded_s16": (16, 1, 2, 2, 24, False, "sbhd", None, SMALL, "float32", "classic"),
    "causal_gqa2_docs_int64_index": (40, 2, 4, 2, 16, True, "bshd", [[7], [20]],
                                     dict(SMALL, int64_index=True), "float32", "classic"),
    "causal_default_tiles_s40": (40, 1, 2, 1, 16, True, "sbhd", [[11]], {}, "float32", "classic"),
    "causal_repeated_ids_vs_sdpa": (40, 1, 2, 2, 16, True, "sbhd", "0,0,1,1,0", SMALL, "float32", "sdpa"),
    "causal_gqa2_docs_fp16": (40, 1, 4, 2, 16, True, "sbhd", [[13]], SMALL, "float16", "classic"),
}


def run_case(name: str) -> dict:
    s, b, hq, hkv, d, causal, layout, docs, tiles, dtype, ref_name = CASES[name]
    gen = torch.Generator().manual_seed(1234)

    def shape(h):
        return (s, b, h, d) if layout == "sbhd" else (b, s, h, d)

    dt = getattr(torch, dtype)
    # inputs are rounded to the kernel's dtype once, then the reference runs on them in fp32
    q, k, v = (torch.randn(shape(h), generator=gen).to(dt) for h in (hq, hkv, hkv))
    grad = torch.randn(shape(hq), generator=gen).to(dt)
    if docs is None:
        seg = None
    elif isinstance(docs, str):  # runs of ids written out in blocks: "0,0,1,..." -> runs of s // len
        ids = [int(x) for x in docs.split(",")]
        seg = torch.tensor(ids).repeat_interleave(s // len(ids)).expand(b, s).contiguous()
    else:
        seg = _segments(b, s, docs)
    ref_cls = ClassicAttention if ref_name == "classic" else SDPAttention
    results = {}
    for label, module, cast in (("ref", ref_cls(causal=causal, layout=layout), torch.float32),
                                ("triton", ta.TritonAttention(causal=causal, layout=layout, **tiles), dt)):
        leaves = [t.to(cast).clone().requires_grad_() for t in (q, k, v)]
        t0 = time.process_time()
        out = module(*leaves, segment_ids=seg)
        out.backward(grad.to(cast))
        results[label] = [out.detach(), *(t.grad for t in leaves)], time.process_time() - t0
    errs = {key: rel_err(a.float(), r) for key, a, r in zip(("out", "dq", "dk", "dv"), results["triton"][0],
                                                              results["ref"][0])}
    same_dtype = all(t.dtype == dt for t in results["triton"][0])
    return {"case": name, "errors": errs, "dtype_kept": same_dtype, "cpu_s": round(results["triton"][1], 2)}


def _raises(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no exception"


def error_cases() -> dict:
    attn = ta.TritonAttention(**SMALL)
    q = torch.randn(16, 1, 2, 16)
    drop = ta.TritonAttention(dropout_p=0.1, **SMALL)
    return {
        "attention_mask": _raises(lambda: attn(q, q, q, attention_mask=torch.ones(16, 16, dtype=torch.bool))),
        "dropout_training_runs": _raises(lambda: drop(q, q, q)),
        "dropout_out_of_range": _raises(lambda: ta.TritonAttention(dropout_p=1.0)),
        "heads_not_multiple": _raises(lambda: attn(torch.randn(16, 1, 3, 16), q, q)),
        "head_dim_too_big": _raises(lambda: attn(*(torch.randn(16, 1, 2, 256),) * 3)),
        "dtype_mismatch": _raises(lambda: attn(q, q.double(), q)),
        "segment_shape": _raises(lambda: attn(q, q, q, segment_ids=torch.zeros(1, 8, dtype=torch.long))),
        "bad_tile": _raises(lambda: ta.TritonAttention(block_m=24)),
    }


def main(names: list[str]) -> None:
    print(json.dumps({"triton_imported_by_module": TRITON_IMPORTED_BY_MODULE,
                      "available": ta.triton_available(),
                      "fp32_dot_precision": ta._kernels().dot_precision(torch.float32, None, torch.device("cpu")),
                      "fp32_tf32_asked": ta._kernels().dot_precision(torch.float32, True, torch.device("cpu"))}),
          flush=True)
    for name in names or [*CASES, *DROPOUT_CASES]:
        print(json.dumps(run_dropout_case(name) if name in DROPOUT_CASES else run_case(name)), flush=True)
    if not names:
        print(json.dumps({"dropout_checks": dropout_checks()}), flush=True)
        print(json.dumps({"error_cases": error_cases()}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
