"""One script that proves the GPU paths on a device: `bash scripts/gpu_check.sh` (this file).

On one CUDA GPU, in well under 8 minutes, it prints a table and exits non-zero on any failure:

1. training: bf16 steps of a model with the 1.3B layer shape (hidden 2048, 16 heads; fewer
   layers to keep it short) at 32k tokens, SP 1, full recompute, through the real
   `pretrain_gpt.py` (torchrun, NCCL), once per attention backend that is available (sdpa,
   triton, flash-attn when importable): the loss is finite and equal across backends within
   bf16 tolerance; tokens/s and MFU against the GPU's data-sheet peak are reported;
2. memory: the planner (megatron.planning.memory_estimate) against the run's
   `torch.cuda.max_memory_allocated`, within 15 %;
3. the Triton kernel, forward and backward, against SDPA at head dims 64/96/128 in bf16 and fp16;
4. the longest sequence: benchmarks/long_context_gpu_check.py plans the longest sequence a
   1.3B-shape model fits on this one device with every memory trick on (bf16 residual, tiled
   layers, head-chunked attention, tiled loss, full recompute with the layer inputs offloaded
   to pinned host memory), trains one step at the longest length whose step should take about
   GPU_CHECK_LONG_SECONDS (default 150; 0 runs the full planned length, which takes many minutes
   since attention is quadratic) and compares the planner with `torch.cuda.max_memory_allocated`
   (within 15 %) and the offloader's host bytes with the planned ones.

`--dry` runs the same code end to end on CPU at tiny sizes (fp32, gloo, the Triton kernel
under its interpreter) so that the script is exercised by the test suite; its numbers say
nothing about a GPU. With `--json PATH` (or $OUT set) the results are also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEMORY_TOLERANCE = 0.15
LOSS_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}  # relative, across backends, per iteration


def _model_flags(dry: bool) -> tuple[list[str], dict]:
    if dry:
        shape = dict(layers=2, hidden=64, heads=4, seq=256, vocab=512)
    else:
        shape = dict(layers=8, hidden=2048, heads=16, seq=32768, vocab=50304)
    flags = ["--num-layers", str(shape["layers"]), "--hidden-size", str(shape["hidden"]),
             "--num-attention-heads", str(shape["heads"]), "--seq-length", str(shape["seq"]),
             "--max-position-embeddings", str(shape["seq"]), "--mock-data", "--vocab-size", str(shape["vocab"]),
             "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "4", "--lr", "1e-4",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--log-interval", "1",
             "--checkpoint-activations", "--seed", "1234"]
    return flags, shape


def available_backends(dry: bool) -> list[str]:
    if dry:
        return ["sdpa", "classic"]
    import importlib.util  # noqa: PLC0415

    names = ["sdpa"]
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash-attn")
    return names


def train(backend: str, dry: bool, precision: str) -> dict:
    """One real pretrain_gpt.py run; returns its per-iteration losses, speed and peak memory."""
    flags, shape = _model_flags(dry)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               os.path.join(ROOT, "pretrain_gpt.py"), *flags, "--attention-backend", backend, "--log-json", log]
        if precision != "fp32":
            cmd.append(f"--{precision}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"backend": backend, "ok": False, "error": (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()}
        events = [json.loads(line) for line in open(log)]
    steps = [e for e in events if e["event"] == "train"]
    timed = steps[1:] or steps  # the first iteration compiles and warms up
    best = min(timed, key=lambda e: e["elapsed_ms"])
    return {"backend": backend, "ok": True, "losses": [e["lm_loss"] for e in steps],
            "tokens_per_sec": best["tokens_per_sec"], "tflops_per_rank": best["tflops_per_rank"],
            "mfu": best.get("mfu"), "peak_memory_bytes": max(e["peak_memory_bytes"] for e in steps),
            "wall_s": wall, "shape": shape}


def planned_peak(backend: str, dry: bool, precision: str) -> float:
    from megatron.arguments import parse_args  # noqa: PLC0415
    from megatron.planning.memory_estimate import estimate_memory  # noqa: PLC0415

    flags, _ = _model_flags(dry)
    cfg = parse_args(flags + ["--attention-backend", backend] + ([f"--{precision}"] if precision != "fp32" else []),
                     world_size=1, check_environment=False)
    return estimate_memory(cfg.model, cfg.data.seq_length, parallel=cfg.parallel, precision=precision,
                           device="cpu" if dry else "cuda", autocast_weight_cache=False)["peak"]


def triton_vs_sdpa(dry: bool) -> list[dict]:
    """The Triton kernel's output and gradients against SDPA's (causal, GQA), per head dim and dtype."""
    code = (
        "import json, sys, torch\n"
        "from megatron.model.attention_backends import build_local_attention\n"
        "from tests.utils import rel_err\n"
        "dry = sys.argv[1] == '1'\n"
        "dev = 'cpu' if dry else 'cuda'\n"
        "cases = [(64, 'fp32')] if dry else [(d, t) for d in (64, 96, 128) for t in ('bf16', 'fp16')]\n"
        "s = 64 if dry else 4096\n"
        "rows = []\n"
        "for d, t in cases:\n"
        "    dt = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[t]\n"
        "    g = torch.Generator().manual_seed(d)\n"
        "    q = torch.randn(s, 1, 8, d, generator=g).to(dev, dt)\n"
        "    k, v = (torch.randn(s, 1, 2, d, generator=g).to(dev, dt) for _ in range(2))\n"
        "    dout = torch.randn(s, 1, 8, d, generator=g).to(dev, dt)\n"
        "    res = {}\n"
        "    for name in ('triton', 'sdpa'):\n"
        "        kw = dict(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16) if (dry and name == 'triton') else {}\n"
        "        attn = build_local_attention(name, causal=True, **kw)\n"
        "        x = [t.clone().requires_grad_() for t in (q, k, v)]\n"
        "        out = attn(*x)\n"
        "        out.backward(dout)\n"
        "        res[name] = [out.float()] + [t.grad.float() for t in x]\n"
        "    errs = [rel_err(a, b) for a, b in zip(res['triton'], res['sdpa'])]\n"
        "    rows.append({'head_dim': d, 'dtype': t, 'max_rel_err': max(errs)})\n"
        "print('RESULT ' + json.dumps(rows))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", code, "1" if dry else "0"], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return [{"error": (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()}]


def _long_context_run(args: list) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "long_context_gpu_check.py"), "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()}
    return json.loads(lines[-1])


def long_context(dry: bool) -> dict:
    """benchmarks/long_context_gpu_check.py in its own process (a clean allocator); its JSON report.
    Dry: the plan for an 80 GiB GPU, and the step's code run on CPU at a tiny size (`cpu_smoke`)."""
    if not dry:
        seconds = float(os.environ.get("GPU_CHECK_LONG_SECONDS", "150"))
        return _long_context_run(["--max-step-seconds", str(seconds)] if seconds > 0 else [])
    report = _long_context_run(["--dry-run", "--gpu-memory-gb", "80", "--host-memory-gb", "107"])
    smoke = _long_context_run(["--cpu-smoke"])
    if "error" in smoke:
        return smoke
    report["cpu_smoke"] = smoke
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes: exercise the script, measure nothing")
    ap.add_argument("--json", default=None, help="write the results here (default: $OUT/gpu_check.json if $OUT)")
    args = ap.parse_args(argv)
    import torch  # noqa: PLC0415

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; run with --dry to exercise the script on CPU", file=sys.stderr)
        return 2
    precision = "fp32" if args.dry else "bf16"
    device = "CPU (dry run: numbers are not GPU results)" if args.dry else torch.cuda.get_device_name()
    print(f"gpu_check on {device} | torch {torch.__version__} | precision {precision}", flush=True)
    failures, results = [], {"device": device, "dry": args.dry, "precision": precision, "training": [],
                              "triton": []}

    # 1 + 2: training through the real entry point, once per backend
    for backend in available_backends(args.dry):
        r = train(backend, args.dry, precision)
        if r["ok"]:
            r["planned_peak_bytes"] = planned_peak(backend, args.dry, precision)
            r["memory_error"] = (r["planned_peak_bytes"] - r["peak_memory_bytes"]) / r["peak_memory_bytes"]
        results["training"].append(r)
        print(f"  trained with {backend}: {'ok' if r['ok'] else 'FAILED'}", flush=True)
    ok_runs = [r for r in results["training"] if r["ok"]]
    failures += [f"training with {r['backend']} failed:\n{r['error']}" for r in results["training"] if not r["ok"]]
    if ok_runs:
        ref = ok_runs[0]
        for r in ok_runs:
            if not all(math.isfinite(x) for x in r["losses"]):
                failures.append(f"{r['backend']}: non-finite loss {r['losses']}")
            worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
            r["loss_rel_diff_vs_" + ref["backend"]] = worst
            if worst > LOSS_TOLERANCE[precision]:
                failures.append(f"{r['backend']}: losses {r['losses']} differ from {ref['backend']}'s "
                                f"{ref['losses']} by {worst:.2e} (tolerance {LOSS_TOLERANCE[precision]})")
            if not args.dry and abs(r["memory_error"]) > MEMORY_TOLERANCE:
                failures.append(f"{r['backend']}: planner {r['planned_peak_bytes'] / 2**30:.2f} GiB vs measured "
                                f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({100 * r['memory_error']:+.1f} %)")
    # 3: the Triton kernel against SDPA
    results["triton"] = triton_vs_sdpa(args.dry)
    for row in results["triton"]:
        if "error" in row:
            failures.append(f"triton vs sdpa failed:\n{row['error']}")
        elif row["max_rel_err"] > {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}[row["dtype"]]:
            failures.append(f"triton vs sdpa at head dim {row['head_dim']} {row['dtype']}: {row['max_rel_err']:.2e}")

    # 4: the longest sequence on one device
    lc = results["long_context"] = long_context(args.dry)
    if "error" in lc:
        failures.append(f"long-context check failed:\n{lc['error']}")
    elif not lc.get("longest_planned"):
        failures.append("long-context check: the planner fits no sequence on this device")
    elif not args.dry:
        if abs(lc["planned_over_measured"] - 1) > MEMORY_TOLERANCE:
            failures.append(f"long context at {lc['seq_length']:,} tokens: planned {lc['planned_peak'] / 2**30:.2f} GiB "
                            f"vs max_memory_allocated {lc['max_memory_allocated'] / 2**30:.2f} GiB")
        off = lc.get("offload") or {}
        if off and abs(off["host_peak"] - lc["planned_host_bytes"]) > MEMORY_TOLERANCE * lc["planned_host_bytes"]:
            failures.append(f"long context: offloaded {off['host_peak'] / 2**30:.2f} GiB to host vs planned "
                            f"{lc['planned_host_bytes'] / 2**30:.2f} GiB")

    shape = ok_runs[0]["shape"] if ok_runs else {}
    print(f"\ntraining: {shape.get('layers')} layers x hidden {shape.get('hidden')}, {shape.get('heads')} heads, "
          f"seq {shape.get('seq')}, SP 1, full recompute, {precision}")
    print("| backend | losses | max rel diff | tokens/s | TFLOP/s | MFU | peak GiB (measured) | planned GiB | plan error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ok_runs:
        diff = next((v for k, v in r.items() if k.startswith("loss_rel_diff")), 0.0)
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = "n/a (CPU RSS)" if args.dry else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        err = "n/a" if args.dry else f"{100 * r['memory_error']:+.1f}%"
        print(f"| {r['backend']} | {' '.join(f'{x:.4f}' for x in r['losses'])} | {diff:.1e} | "
              f"{r['tokens_per_sec']:.0f} | {r['tflops_per_rank']:.1f} | {mfu} | {mem} | "
              f"{r['planned_peak_bytes'] / 2**30:.2f} | {err} |")
    print("\n| triton vs sdpa: head dim | dtype | max rel err (out, dq, dk, dv) |\n|---|---|---|")
    for row in results["triton"]:
        if "error" not in row:
            print(f"| {row['head_dim']} | {row['dtype']} | {row['max_rel_err']:.2e} |")
    if "error" not in lc:
        print(f"\nlongest sequence, {lc['preset']} on one GPU of {lc['gpu_memory_gb']:.0f} GiB (host memory for offload "
              f"{lc['host_memory_gb']:.0f} GiB): planned longest {lc['longest_planned']:,} tokens")
        if "max_memory_allocated" in lc:
            off = lc.get("offload") or {}
            print("| tokens run | planned GiB | max_memory_allocated GiB | planned / measured | host GiB (offloaded / "
                  "planned) | step s |\n|---|---|---|---|---|---|")
            print(f"| {lc['seq_length']:,} | {lc['planned_peak'] / 2**30:.2f} | {lc['max_memory_allocated'] / 2**30:.2f} "
                  f"| {lc['planned_over_measured']:.3f} | {off.get('host_peak', 0) / 2**30:.2f} / "
                  f"{lc['planned_host_bytes'] / 2**30:.2f} | {lc['seconds']:.1f} |")
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    print("\nall checks passed" + (" (dry run on CPU: nothing about a GPU was measured)" if args.dry else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
