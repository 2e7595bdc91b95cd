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

from megatron.planning.long_context import PRESETS, describe_strategy, longest_sequence, plan  # noqa: E402
from megatron.planning.memory_estimate import GIB  # noqa: E402

ONE_GPU = {"zero_stage": 0}  # no process group: the model's own fp32 weights, autocast casts them


def run_step(model_cfg, seq: int, parallel, device: torch.device) -> dict:
    """One forward + backward at `seq` tokens; peak allocated bytes and the offloader's statistics."""
    from megatron.model import GPTModel  # noqa: PLC0415
    from megatron.parallel import parallelize_gpt  # noqa: PLC0415

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
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        loss = model(tokens, labels=labels)
    loss.float().mean().backward()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"max_memory_allocated": torch.cuda.max_memory_allocated(device), "static": static,
           "max_memory_reserved": torch.cuda.max_memory_reserved(device), "seconds": seconds,
           "offload": model.activation_offloader.stats() if hasattr(model, "activation_offloader") else None}
    del loss, adam
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt-1.3b-rope")
    ap.add_argument("--gpu-memory-gb", type=float, help="default: the device's total memory")
    ap.add_argument("--reserve-gb", type=float, default=2.0, help="kept out of the budget (CUDA context, slack)")
    ap.add_argument("--host-memory-gb", type=float,
                    help="host memory the offloaded layer inputs may take (default: 60 %% of this machine's RAM)")
    ap.add_argument("--seq-length", type=int, help="run this length instead of the longest planned")
    ap.add_argument("--dry-run", action="store_true", help="plan only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = PRESETS[args.preset]()
    if args.gpu_memory_gb is None:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: pass --gpu-memory-gb (with --dry-run)")
        args.gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    budget = (args.gpu_memory_gb - args.reserve_gb) * GIB
    if args.host_memory_gb is None:
        args.host_memory_gb = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    longest, est = longest_sequence(model, 1, budget, host_budget_bytes=args.host_memory_gb * GIB, **ONE_GPU)
    seq = args.seq_length or longest
    est = plan(model, seq, 1, **ONE_GPU) if seq else None
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
    measured = run_step(model, seq, est["parallel"], torch.device("cuda", torch.cuda.current_device()))
    report.update(measured)
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
