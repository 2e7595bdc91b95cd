"""Speed of the project's Triton flash-attention kernel against SDPA and flash-attn.

On a CUDA GPU, for each sequence length (default 4k..32k) and attention dropout rate
(default 0 and 0.1, the upstream --attention-dropout) this times forward and forward +
backward of the local attention backends on `[s, b, hq, d]` inputs (causal, optionally
GQA and packed documents), checks the Triton output against SDPA (without dropout; the
masks differ otherwise), and prints a table of milliseconds, achieved TFLOP/s (causal
FLOPs: 2 matmuls of s^2/2 d per head forward, 2.5x that backward) and peak memory.
Before timing, it checks the kernel with dropout against an fp32 reference that
applies the kernel's own keep mask (`dropout_keep_mask`) at a small size.

Without a GPU it says so and stops, unless --interpret is given: then it runs the kernel
under Triton's CPU interpreter at tiny sizes as a correctness and smoke check (its
timings measure the interpreter, not the kernel), with and without dropout.

    python benchmarks/bench_triton_attention.py [--seqlens 4096 8192 16384 32768]
        [--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16 --docs 4 --dropout 0 0.1]
    python benchmarks/bench_triton_attention.py --interpret
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--docs", type=int, default=1, help="equal-length documents packed per sample")
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1],
                   help="attention dropout rates to time (training mode)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["triton", "sdpa", "flash-attn"])
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: run tiny sizes under TRITON_INTERPRET=1 (correctness smoke test)")
    return p.parse_args(argv)


def causal_fwd_flops(b, s, hq, d, docs):
    """QK^T and PV over the causal half of each document: 2 matmuls x 2 flops x (s/docs)^2/2 x d."""
    per_doc = s // docs
    return 2 * 2 * b * hq * docs * per_doc * per_doc // 2 * d


def make_inputs(s, b, hq, hkv, d, dtype, device, docs, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(s, b, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    grad = torch.randn(s, b, hq, d, generator=gen).to(device=device, dtype=dtype)
    seg = None
    if docs > 1:  # [s] -> [b, s] document ordinals
        seg = (torch.arange(s) * docs // s).expand(b, s).contiguous().to(device)
    return q, k, v, grad, seg


def build(name, dropout_p=0.0, **kw):
    """A backend in training mode (dropout on when dropout_p > 0)."""
    if name == "triton":
        from megatron.model.triton_attention import TritonAttention
        return TritonAttention(causal=True, dropout_p=dropout_p, **kw)
    from megatron.model.attention_backends import build_local_attention
    return build_local_attention(name, causal=True, dropout_p=dropout_p)


def dropout_reference_errors(s, b, hq, hkv, d, dtype, device, docs, p, seed=1234, **tiles):
    """Relative errors (out, dq, dk, dv) of the kernel with dropout against fp32 attention that
    applies the kernel's own keep mask (rebuilt with dropout_keep_mask from the seed it drew)."""
    from megatron.model.attention_backends import keep_mask
    from megatron.model.triton_attention import TritonAttention, _kernels
    from tests.utils import rel_err

    fa = _kernels()
    q, k, v, grad, seg = make_inputs(s, b, hq, hkv, d, dtype, device, docs, seed=1)
    torch.manual_seed(seed)
    out = TritonAttention(causal=True, dropout_p=p, **tiles)(q, k, v, segment_ids=seg)
    out.backward(grad)
    torch.manual_seed(seed)
    z = fa.dropout_keep_mask(fa.draw_seed(device), b, hq, s, p).float() / (1 - p)  # [b, hq, s, s]
    # [s, b, h, d] -> [b, h, s, d] in fp32; K/V repeated over each GQA group
    qf, kf, vf = (t.detach().float().permute(1, 2, 0, 3).clone().requires_grad_() for t in (q, k, v))
    group = hq // hkv
    scores = qf @ kf.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(d)
    allowed = keep_mask(s, s, causal=True, segment_ids=seg, attention_mask=None, device=device)
    ref = (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) * z) @ vf.repeat_interleave(group, 1)
    ref.backward(grad.float().permute(1, 2, 0, 3))
    got = [out.detach(), q.grad, k.grad, v.grad]
    want = [t.permute(2, 0, 1, 3) for t in (ref.detach(), qf.grad, kf.grad, vf.grad)]  # back to [s, b, h, d]
    return [rel_err(a.float(), r) for a, r in zip(got, want)]


def time_gpu(fn, iters):
    """Median milliseconds of fn() over iters runs, after two warm-up runs."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_backend(attn, q, k, v, grad, seg, iters):
    """(forward ms, forward + backward ms)."""
    def fwd():
        with torch.no_grad():
            attn(q, k, v, segment_ids=seg)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        attn(q, k, v, segment_ids=seg).backward(grad)

    return time_gpu(fwd, iters), time_gpu(fwd_bwd, iters)


def run_gpu(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    hkv = args.kv_heads or args.heads
    print(f"# {torch.cuda.get_device_name()}, b={args.batch} hq={args.heads} hkv={hkv} d={args.head_dim} "
          f"{args.dtype} causal docs={args.docs}, median of {args.iters}")
    if "triton" in args.backends and any(p > 0 for p in args.dropout):
        p = max(args.dropout)
        errs = dropout_reference_errors(1024, 1, 4, 2, args.head_dim, dtype, "cuda", max(1, args.docs), p)
        print(f"# triton dropout p={p} vs fp32 attention with the kernel's mask (s=1024, hq=4 hkv=2): rel err "
              + " ".join(f"{x}={e:.1e}" for x, e in zip(("out", "dq", "dk", "dv"), errs)), flush=True)
    print(f"{'seq':>6} {'dropout':>7} {'backend':>10} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9} "
          f"{'peak GiB':>9} {'max|o-sdpa|':>12}")
    for s in args.seqlens:
        q, k, v, grad, seg = make_inputs(s, args.batch, args.heads, hkv, args.head_dim, dtype, "cuda",
                                         args.docs)
        flops = causal_fwd_flops(args.batch, s, args.heads, args.head_dim, args.docs)
        for p in args.dropout:
            ref = None
            for name in ["sdpa"] + [n for n in args.backends if n != "sdpa"]:
                try:
                    attn = build(name, dropout_p=p)
                except RuntimeError as e:
                    print(f"{s:>6} {p:>7} {name:>10}  skipped: {str(e)[:80]}")
                    continue
                diff = float("nan")  # with dropout the backends draw different masks
                if p == 0:
                    with torch.no_grad():
                        out = attn(q, k, v, segment_ids=seg)
                    if name == "sdpa":
                        ref = out.float()
                    diff = (out.float() - ref).abs().max().item()
                torch.cuda.reset_peak_memory_stats()
                t_f, t_fb = time_backend(attn, q, k, v, grad, seg, args.iters)
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"{s:>6} {p:>7} {name:>10} {t_f:8.2f} {flops / t_f / 1e9:9.1f} {t_fb:8.2f} "
                      f"{3.5 * flops / t_fb / 1e9:9.1f} {peak:9.2f} {diff:12.2e}", flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()


def run_interpret():
    """Tiny CPU run under the interpreter: relative errors vs classic and process times."""
    from megatron.model.attention_backends import ClassicAttention, SDPAttention
    from megatron.model.triton_attention import TritonAttention, triton_available
    from tests.utils import rel_err

    ok, reason = triton_available()
    if not ok:
        sys.exit(f"cannot run the interpreter: {reason}")
    print(f"# {reason}; fp32, b=1 hq=4 hkv=2 d=32, tiles 16; times are the interpreter's, not the kernel's")
    print(f"{'seq':>5} {'docs':>5} {'backend':>8} {'f+b ms':>9} "
          + " ".join(f"{'err ' + x:>9}" for x in ("out", "dq", "dk", "dv")))
    for s, docs in ((64, 1), (128, 1), (128, 3)):
        results = {}
        for name, attn in (("classic", ClassicAttention()), ("sdpa", SDPAttention()),
                           ("triton", TritonAttention(block_m=16, block_n=16))):
            q, k, v, grad, seg = make_inputs(s, 1, 4, 2, 32, torch.float32, "cpu", docs)
            t0 = time.process_time()
            out = attn(q, k, v, segment_ids=seg)
            out.backward(grad)
            ms = (time.process_time() - t0) * 1e3
            results[name] = [out.detach(), q.grad, k.grad, v.grad]
            errs = [rel_err(a, r) for a, r in zip(results[name], results["classic"])]
            print(f"{s:>5} {docs:>5} {name:>8} {ms:9.1f} " + " ".join(f"{e:9.1e}" for e in errs), flush=True)
        t0 = time.process_time()
        errs = dropout_reference_errors(s, 1, 4, 2, 32, torch.float32, "cpu", docs, 0.1, block_m=16, block_n=16)
        ms = (time.process_time() - t0) * 1e3  # the kernel with dropout, its backward and the reference
        print(f"{s:>5} {docs:>5} {'tri-p0.1':>8} {ms:9.1f} " + " ".join(f"{e:9.1e}" for e in errs)
              + "  (vs fp32 attention with the kernel's dropout mask)", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.interpret:
        # must be set before triton is first imported (it picks the interpreter at kernel definition)
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)
        run_interpret()
    elif not torch.cuda.is_available():
        print("bench_triton_attention needs a CUDA GPU to time the kernel; none is visible. "
              "Run with --interpret for a tiny CPU correctness run under Triton's interpreter.")
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
