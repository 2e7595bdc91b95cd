"""Speed of the project's Triton flash-attention kernel against SDPA and flash-attn.

On a CUDA GPU, for each sequence length (default 4k..32k) this times forward and
forward + backward of the local attention backends on `[s, b, hq, d]` inputs (causal,
optionally GQA and packed documents), checks the Triton output against SDPA, and prints
a table of milliseconds, achieved TFLOP/s (causal FLOPs: 2 matmuls of s^2/2 d per head
forward, 2.5x that backward) and peak memory.

Without a GPU it says so and stops, unless --interpret is given: then it runs the kernel
under Triton's CPU interpreter at tiny sizes as a correctness and smoke check (its
timings measure the interpreter, not the kernel).

    python benchmarks/bench_triton_attention.py [--seqlens 4096 8192 16384 32768]
        [--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16 --docs 4]
    python benchmarks/bench_triton_attention.py --interpret
"""

from __future__ import annotations

import argparse
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


def build(name, **kw):
    if name == "triton":
        from megatron.model.triton_attention import TritonAttention
        return TritonAttention(causal=True, **kw)
    from megatron.model.attention_backends import build_local_attention
    return build_local_attention(name, causal=True)


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
    print(f"{'seq':>6} {'backend':>10} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9} "
          f"{'peak GiB':>9} {'max|o-sdpa|':>12}")
    for s in args.seqlens:
        q, k, v, grad, seg = make_inputs(s, args.batch, args.heads, hkv, args.head_dim, dtype, "cuda",
                                         args.docs)
        flops = causal_fwd_flops(args.batch, s, args.heads, args.head_dim, args.docs)
        ref = None
        for name in ["sdpa"] + [n for n in args.backends if n != "sdpa"]:
            try:
                attn = build(name)
            except RuntimeError as e:
                print(f"{s:>6} {name:>10}  skipped: {str(e)[:80]}")
                continue
            with torch.no_grad():
                out = attn(q, k, v, segment_ids=seg)
            if name == "sdpa":
                ref = out.float()
            diff = (out.float() - ref).abs().max().item()
            torch.cuda.reset_peak_memory_stats()
            t_f, t_fb = time_backend(attn, q, k, v, grad, seg, args.iters)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{s:>6} {name:>10} {t_f:8.2f} {flops / t_f / 1e9:9.1f} {t_fb:8.2f} "
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
