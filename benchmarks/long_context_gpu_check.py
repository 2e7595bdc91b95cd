"""One GPU, every memory trick on: the longest sequence the planner says fits, run for real.

For a 1.3B-shape model (the GPT-3 1.3B layout of examples_seq_parallel with RoPE: preset
`gpt-1.3b-rope`), the planner (megatron/planning/long_context.py) finds the longest sequence
whose training step fits this device (`--gpu-memory-gb`, default: the device's total memory
minus `--reserve-gb`) with every trick on for one GPU: bf16 with a bf16 residual stream,
sequence-tiled layers, head-chunked SDPA (torch's FlashAttention-2 kernels), tiled loss,
full recompute with the layer inputs offloaded to pinned host memory. The script then trains
one step at that length (or `--seq-length`) and prints the planner's prediction beside
`torch.cuda.max_memory_allocated()`, plus what the offloader moved.

Parameters, gradients and Adam's two moments are fp32 tensors of the model's size on the
GPU (the state after a first optimizer step), as the planner assumes; no optimizer step
runs. `--dry-run` prints the plan only (no GPU needed).

Attention is quadratic: at the longest length one step of the 1.3B shape takes many minutes.
`--max-step-seconds S` runs the longest length whose step the model-FLOP count says finishes in
about S seconds at `--assumed-mfu` of the device's peak (still with every trick on, so the
planner is checked against the allocator at that length); the longest planned length for the
whole device is printed and reported either way. scripts/gpu_check.sh uses this.

    python benchmarks/long_context_gpu_check.py            # on a GPU machine
    python benchmarks/long_context_gpu_check.py --dry-run --gpu-memory-gb 80
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron.planning.flops import device_peak_tflops, flops_per_step  # noqa: E402
from megatron.planning.long_context import PRESETS, describe_strategy, longest_sequence, plan  # noqa: E402
from megatron.planning.memory_estimate import GIB  # noqa: E402

ONE_GPU = {"zero_stage": 0}  # no process group: the model's own fp32 weights, autocast casts them


def run_step(model_cfg, seq: int, parallel, device: torch.device) -> dict:
    """One forward + backward at `seq` tokens; peak allocated bytes (CUDA) and the offloader's
    statistics. On CPU (`--cpu-smoke`) the same code runs at a tiny size and measures no memory."""
    from megatron.model import GPTModel  # noqa: PLC0415
    from megatron.parallel import parallelize_gpt  # noqa: PLC0415

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPTModel(model_cfg)
    model = parallelize_gpt(model, None, parallel, device=device, precision="bf16", data_parallel=False).train()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    adam = [torch.zeros_like(p) for p in params for _ in range(2)]
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, model_cfg.vocab_size, (1, seq), device=device, generator=g)
    labels = torch.randint(0, model_cfg.vocab_size, (1, seq), device=device, generator=g)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) if cuda else None
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        loss = model(tokens, labels=labels)
    loss.float().mean().backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"max_memory_allocated": torch.cuda.max_memory_allocated(device) if cuda else None, "static": static,
           "max_memory_reserved": torch.cuda.max_memory_reserved(device) if cuda else None, "seconds": seconds,
           "loss": float(loss.detach().float().mean()),
           "offload": model.activation_offloader.stats() if hasattr(model, "activation_offloader") else None}
    del loss, adam
    return out


def longest_within_seconds(model_cfg, longest: int, seconds: float, peak_tflops: float, mfu: float) -> int:
    """The longest N <= `longest` (a multiple of 1024) whose step, counted as model FLOPs plus one
    recomputed forward (full recompute), takes at most `seconds` at `mfu` of `peak_tflops`."""
    def step_seconds(n: int) -> float:
        return flops_per_step(model_cfg, n, 1) * 4 / 3 / (peak_tflops * 1e12 * mfu)

    lo, hi = 0, longest // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if step_seconds(mid * 1024) <= seconds else (lo, mid - 1)
    return min(longest, lo * 1024) if lo else min(longest, 1024)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt-1.3b-rope")
    ap.add_argument("--gpu-memory-gb", type=float, help="default: the device's total memory")
    ap.add_argument("--reserve-gb", type=float, default=2.0, help="kept out of the budget (CUDA context, slack)")
    ap.add_argument("--host-memory-gb", type=float,
                    help="host memory the offloaded layer inputs may take (default: 60 %% of this machine's RAM)")
    ap.add_argument("--seq-length", type=int, help="run this length instead of the longest planned")
    ap.add_argument("--max-step-seconds", type=float,
                    help="run the longest length whose step should take at most this long (see above)")
    ap.add_argument("--assumed-mfu", type=float, default=0.4, help="for --max-step-seconds (default 0.4)")
    ap.add_argument("--dry-run", action="store_true", help="plan only")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the step code on CPU for a 2-layer, hidden-64 version of the preset at 512 tokens "
                         "(what the test suite exercises; measures nothing)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = PRESETS[args.preset]()
    if args.cpu_smoke:
        model = model.replace(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=16,
                              ffn_hidden_size=256,
                              vocab_size=512, max_position_embeddings=512)
        args.gpu_memory_gb, args.seq_length = args.gpu_memory_gb or 4.0, args.seq_length or 512
    if args.gpu_memory_gb is None:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: pass --gpu-memory-gb (with --dry-run)")
        args.gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    budget = (args.gpu_memory_gb - args.reserve_gb) * GIB
    if args.host_memory_gb is None:
        args.host_memory_gb = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    longest, est = longest_sequence(model, 1, budget, host_budget_bytes=args.host_memory_gb * GIB, **ONE_GPU)
    seq = args.seq_length or longest
    if args.max_step_seconds and seq and not args.seq_length:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        peak = device_peak_tflops(name, "bf16") or 300.0  # an unknown device: an A100-class guess
        seq = longest_within_seconds(model, longest, args.max_step_seconds, peak, args.assumed_mfu)
    tiles = dict(projection_tiles=4, mlp_tiles=4, loss_tile_tokens=128) if args.cpu_smoke else {}  # tiled paths run
    est = plan(model, seq, 1, **ONE_GPU, **tiles) if seq else None
    report = {"preset": args.preset, "gpu_memory_gb": args.gpu_memory_gb, "budget_bytes": budget,
              "host_memory_gb": args.host_memory_gb,
              "longest_planned": longest, "seq_length": seq,
              "planned_peak": est["peak"] if est else None, "planned_phase": est["peak_phase"] if est else None,
              "planned_host_bytes": est["host_activations"] if est else None}
    if not args.json:
        print(f"{args.preset}: {model.num_parameters() / 1e9:.2f} B parameters; one GPU of {args.gpu_memory_gb:.1f} GiB"
              f" (budget {budget / GIB:.1f} GiB), host memory for offload up to {args.host_memory_gb:.0f} GiB")
        print(f"longest planned sequence: {longest:,} tokens" + (f"; running {seq:,}" if seq != longest else ""))
        if est:
            print(f"every trick: {describe_strategy(est['parallel'])}")
            print(f"planned peak {est['peak'] / GIB:.2f} GiB ({est['peak_phase']}), host memory for offloaded "
                  f"inputs {est['host_activations'] / GIB:.2f} GiB")
    if args.dry_run or not seq:
        if args.json:
            print(json.dumps(report))
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    measured = run_step(model, seq, est["parallel"], device)
    report.update(measured)
    if args.cpu_smoke:
        if args.json:
            print(json.dumps(report))
        else:
            print(f"CPU smoke run at {seq} tokens: loss {measured['loss']:.4f}, offload {measured['offload']}")
        return 0
    report["planned_over_measured"] = est["peak"] / measured["max_memory_allocated"]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"torch.cuda.max_memory_allocated {measured['max_memory_allocated'] / GIB:.2f} GiB (reserved "
              f"{measured['max_memory_reserved'] / GIB:.2f}) vs planned {est['peak'] / GIB:.2f} GiB: planned / "
              f"measured = {report['planned_over_measured']:.3f}; step {measured['seconds']:.1f} s")
        if measured["offload"]:
            o = measured["offload"]
            print(f"offload: {o['bytes_offloaded'] / GIB:.2f} GiB to host, {o['bytes_prefetched'] / GIB:.2f} GiB "
                  f"prefetched, {o['bytes_fetched_on_demand'] / GIB:.2f} GiB fetched on demand, host peak "
                  f"{o['host_peak'] / GIB:.2f} GiB (planned {est['host_activations'] / GIB:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
