"""Training throughput of the tiny GPT at long sequence length, SP=1 vs SP=2, on this machine.

    .venv/bin/python benchmarks/bench_train.py                 # seq 4k, 8k, 16k x SP 1, 2
    .venv/bin/python benchmarks/bench_train.py --seqs 8192 --iters 3

Every configuration is a real `torchrun ... pretrain_gpt.py --mock-data` run (fp32, one
thread per rank, micro batch 1, no dropout). The first iteration is warm-up and is not
counted; the fastest remaining iteration is reported (on a shared machine noise only
adds time). Reported per configuration: tokens/s; model TFLOP/s per rank (causal attention
counted, see megatron/planning/flops.py); MFU; peak memory (max over ranks); and the share
of step time spent inside the all-to-all collectives.

MFU is against the device's peak: on a GPU the data-sheet peak of that GPU for the run's
precision (megatron/planning/flops.py's table; `--peak-tflops` or MEGATRON_PEAK_TFLOPS
overrides), on CPU this machine's fp32 matmul rate measured on one thread right before
the runs (there is no data sheet for a shared CPU). On a GPU the runs use `--precision
bf16` by default and the model is the 1.3B layer shape unless `--model` says otherwise.
The 2-core machine is shared: run it on an idle machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODEL = ("--num-layers 4 --hidden-size 256 --num-attention-heads 8 --mock-data --vocab-size 8191 "
         "--hidden-dropout 0 --attention-dropout 0 --micro-batch-size 1 --global-batch-size 1 "
         "--lr 1e-4 --eval-iters 0 --log-interval 1 --timing-log-level 1").split()


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of fp32 GEMM rate on one thread (the peak that MFU is measured against)."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def run(seq: int, sp: int, iters: int, python: str, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(sp),
               os.path.join(ROOT, "pretrain_gpt.py"), *MODEL, "--seq-length", str(seq),
               "--max-position-embeddings", str(seq), "--ds-sequence-parallel-size", str(sp),
               "--train-iters", str(iters), "--log-json", log, *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run seq={seq} sp={sp} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        events = [json.loads(line) for line in open(log)]
    steps = [e for e in events if e["event"] == "train"][1:]  # drop the warm-up iteration
    # the fastest iteration: on a shared machine, noise only ever adds time
    best = min(steps, key=lambda e: e["elapsed_ms"])
    elapsed = best["elapsed_ms"] / 1000
    return {
        "seq": seq, "sp": sp, "elapsed_s": elapsed,
        "elapsed_all_s": [round(e["elapsed_ms"] / 1000, 2) for e in steps],
        "tokens_per_sec": seq / elapsed,
        "tokens_per_sec_median": seq / (statistics.median(e["elapsed_ms"] for e in steps) / 1000),
        "tflops_per_rank": best["tflops_per_rank"],
        "peak_mem_mib": max(e["peak_memory_bytes"] for e in steps) / 2**20,
        "a2a_share": statistics.median(e["a2a_seconds"] / (e["elapsed_ms"] / 1000) for e in steps),
        "timers_ms": {k: 1000 * statistics.median(e["timers"][k] for e in steps) for k in steps[0].get("timers", {})},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--sps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=4, help="iterations per run, the first is warm-up")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                    help="default: bf16 on a GPU, fp32 on CPU (bf16 matmul on CPU is ~250x slower)")
    ap.add_argument("--peak-tflops", type=float, help="the device peak MFU is measured against (GPU: default "
                    "from the data-sheet table for the GPU and precision)")
    ap.add_argument("--extra", default="", help="more pretrain_gpt.py flags, e.g. '--use-flash-attn-v2'")
    args = ap.parse_args()
    python = sys.executable
    import torch  # noqa: PLC0415

    from megatron.planning.flops import device_peak_tflops  # noqa: PLC0415

    gpu = torch.cuda.is_available()
    precision = args.precision or ("bf16" if gpu else "fp32")
    extra = ([f"--{precision}"] if precision != "fp32" else []) + args.extra.split()
    if gpu:
        name = torch.cuda.get_device_name()
        peak_tflops = args.peak_tflops or device_peak_tflops(name, precision)
        if peak_tflops is None:
            raise SystemExit(f"no peak known for {name!r}: pass --peak-tflops (dense TFLOP/s for {precision})")
        peak = peak_tflops * 1e3  # GFLOP/s
        print(f"{name}: peak {peak_tflops:.1f} TFLOP/s ({precision}) | load average {os.getloadavg()[0]:.2f}",
              flush=True)
    else:
        peak = args.peak_tflops * 1e3 if args.peak_tflops else matmul_gflops()
        print(f"fp32 matmul rate (1 thread, 2048^3, best of 5): {peak:.1f} GFLOP/s | load average "
              f"{os.getloadavg()[0]:.2f} | cores {os.cpu_count()}", flush=True)
    rows = []
    for seq in args.seqs:
        for sp in args.sps:
            r = run(seq, sp, args.iters, python, extra)
            r["mfu"] = r["tflops_per_rank"] * 1e3 / peak
            rows.append(r)
            print(f"  seq {seq} sp {sp}: {r['tokens_per_sec']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
                  f"iteration s {r['elapsed_all_s']}, "
                  f"timers {json.dumps({k: round(v) for k, v in r['timers_ms'].items()})}", flush=True)
    base = {r["seq"]: r["tokens_per_sec"] for r in rows if r["sp"] == 1}
    print("\n| seq | SP | tokens/s (best) | speedup vs SP=1 | tokens/s (median) | model TFLOP/s per rank | MFU | "
          "peak memory per rank | all-to-all share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['tokens_per_sec'] / base[r['seq']]:.2f}x" if r["seq"] in base else "-"
        print(f"| {r['seq']} | {r['sp']} | {r['tokens_per_sec']:.0f} | {speed} | {r['tokens_per_sec_median']:.0f} | "
              f"{r['tflops_per_rank']:.4f} | {100 * r['mfu']:.1f}% | {r['peak_mem_mib']:.0f} MiB | "
              f"{100 * r['a2a_share']:.1f}% |")
    print(f"\nMFU = model FLOP/s per rank (best iteration) / {peak:.1f} GFLOP/s "
          f"({'the GPU data-sheet peak' if gpu else 'fp32 matmul, one thread'}). "
          f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
