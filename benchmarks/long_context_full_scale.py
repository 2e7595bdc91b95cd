"""Llama-3-8B at millions of tokens, measured without a GPU: planner vs fake-tensor measurement.

For each (GPUs, N): one rank's training step of the real model (all 32 layers, SP = GPUs,
ZeRO-3 through FSDP2 with bf16 gathers, every memory trick as `every_trick` sizes it) runs
under FakeTensorMode with torch's fake process group (megatron/planning/measure.py), in a
process of its own; MemoryTracker counts every storage the operators allocate. Beside it,
the planner: `device="cpu"` (what the fake run allocates, for the comparison) and
`device="cuda"` (adds the CUDA-only kernel workspace: the flash backward's fp32 dQ
accumulator of one head chunk, logsumexp's fp32 temporaries, one layer input still copying
out during the forward).

    python benchmarks/long_context_full_scale.py                 # 1M and 4M on 8 GPUs (~10 min on 2 cores)
    python benchmarks/long_context_full_scale.py --runs 32:16777216 --layers 32

Prints a markdown table (docs/long-context-memory.md holds its numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.config import ParallelConfig  # noqa: E402
from megatron.planning.long_context import PRESETS  # noqa: E402
from megatron.planning.memory_estimate import GIB, estimate_memory  # noqa: E402


def measure(world: int, seq: int, layers: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "megatron.planning.measure", "--preset", "llama3-8b",
                          "--num-layers", str(layers), "--world-size", str(world), "--seq-length", str(seq),
                          "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="8:1048576,8:4194304", help="GPUS:N pairs, comma-separated")
    ap.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-8B shape (32)")
    ap.add_argument("--json-out", help="also write the rows here (docs/long_context_full_scale.json feeds the plot "
                                       "of benchmarks/bench_long_context.py)")
    args = ap.parse_args(argv)
    model = PRESETS["llama3-8b"]().replace(num_layers=args.layers)
    print(f"# Llama-3-8B shape, {args.layers} layers, bf16, one rank's step under fake tensors (GiB per GPU)")
    print("| GPUs | N | tokens/GPU | measured peak | planned (cpu) | error | planned (cuda) | host/GPU measured "
          "| host/GPU planned | forward / loss bwd / layers bwd measured | planned | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for spec in args.runs.split(","):
        world, seq = (int(x) for x in spec.split(":"))
        m = measure(world, seq, args.layers)
        par = ParallelConfig(**m["parallel"])
        cpu = estimate_memory(model, seq, precision="bf16", device="cpu", parallel=par)
        cuda = estimate_memory(model, seq, precision="bf16", device="cuda", parallel=par)
        ph, st = cpu["phases"], cpu["static"]
        planned = [max(ph["forward_end"], ph.get("first_forward", 0)) - st, ph["loss_backward"] - st,
                   max(ph["layer_forward"], ph["layer_backward"]) - st]
        measured = [m["moments"][k] for k in ("forward", "loss_backward", "layers_backward")]
        err = (cpu["peak"] - m["peak"]) / m["peak"]
        print(f"| {world} | {seq:,} | {seq // world:,} | {m['peak'] / GIB:.2f} | {cpu['peak'] / GIB:.2f} | "
              f"{100 * err:+.1f} % | {cuda['peak'] / GIB:.2f} | {m['host_peak'] / GIB:.1f} | "
              f"{cpu['host_activations'] / GIB:.1f} | {' / '.join(f'{x / GIB:.1f}' for x in measured)} | "
              f"{' / '.join(f'{x / GIB:.1f}' for x in planned)} | {m['seconds']:.0f} |", flush=True)
        rows.append({"world_size": world, "seq_length": seq, "layers": args.layers, "measured_peak": m["peak"],
                     "planned_cpu": cpu["peak"], "planned_cuda": cuda["peak"], "measured_host": m["host_peak"],
                     "planned_host": cpu["host_activations"], "measured_moments": m["moments"],
                     "static": m["static"], "seconds": m["seconds"], "parallel": m["parallel"]})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    print("static (parameter, gradient and Adam shards) included in every peak; 'planned (cuda)' adds the "
          "CUDA kernels' private workspace the fake run cannot see")
    return 0


if __name__ == "__main__":
    sys.exit(main())
