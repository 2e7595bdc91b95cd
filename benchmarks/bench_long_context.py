"""Peak memory per rank against sequence length, for each long-context memory trick.

Measured (left panel): two gloo ranks (SP = 2) train one step of a small Llama-style model
(GQA, 3 layers) at N = 4k .. 32k tokens under each setting, each adding a trick to the one
before. Peak memory is measured exactly with `megatron.planning.memory_tracker.MemoryTracker`
(bytes of live tensors, the CPU analogue of `torch.cuda.max_memory_allocated`), above the
parameters; the offloader's host copies are not device memory and are not counted.

Planned (right panel): the planner's peak per GPU for Llama-3-8B on 8 x 80 GiB (SP 8, ZeRO-3,
bf16) with the same tricks added one by one, against the 78 GiB budget, with ALST's 3.7M
tokens (arXiv:2506.13996) and, when docs/long_context_full_scale.json exists (written by
benchmarks/long_context_full_scale.py --json-out), the fake-tensor measurements of the real
32-layer model.

Prints tables, the longest N whose step fits a memory budget per setting, and writes the plot
to docs/long_context_memory.png (needs matplotlib), then runs benchmarks/bench_sp_comm.py for
the communication volume and step time of Ulysses, Ring and the hybrid.

    python benchmarks/bench_long_context.py [--seqs 4096,8192,16384,32768 --budget-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.initialize import free_port  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from megatron.parallel import parallelize_gpt  # noqa: E402
from megatron.planning.memory_tracker import MemoryTracker  # noqa: E402
from megatron.training.loss import global_token_count, loss_for_backward  # noqa: E402

# each setting adds one trick to the previous one
SETTINGS = {
    "baseline": {},
    "tiled loss": {"loss_tile_tokens": 1024},
    "+ tiled MLP": {"loss_tile_tokens": 1024, "mlp_tiles": 8},
    "+ full recompute": {"loss_tile_tokens": 1024, "mlp_tiles": 8, "recompute_granularity": "full"},
    "+ offload": {"loss_tile_tokens": 1024, "mlp_tiles": 8, "recompute_granularity": "full",
                  "offload_activations": True},
    "+ tiled layer + head chunks": {"loss_tile_tokens": 1024, "mlp_tiles": 8, "recompute_granularity": "full",
                                   "offload_activations": True, "projection_tiles": 8, "attention_head_chunks": 2},
}


def model_config() -> ModelConfig:
    return ModelConfig.llama(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=256, vocab_size=8192, max_position_embeddings=1 << 20,
                             hidden_dropout=0.0, attention_dropout=0.0)


def _rank(rank, world, port, seqs, settings, out_q):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    state = parallel_state.initialize_model_parallel(sequence_parallel_size=world)
    rows = []
    for name in settings:
        cfg = model_config()
        torch.manual_seed(0)
        # the SP model without DDP: gradients of one step need no reduction to be measured
        model = parallelize_gpt(GPTModel(cfg), state, ParallelConfig(sequence_parallel_size=world, **SETTINGS[name]),
                                data_parallel=False)
        for n in seqs:
            sl = n // world
            g = torch.Generator().manual_seed(n)
            tokens = torch.randint(0, cfg.vocab_size, (1, n), generator=g)[:, rank * sl:(rank + 1) * sl]
            labels = torch.randint(0, cfg.vocab_size, (1, n), generator=g)[:, rank * sl:(rank + 1) * sl]
            mask = torch.ones(1, sl)
            model.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            with MemoryTracker() as mem:
                count = global_token_count(mask, state.sp_group)
                loss = loss_for_backward(model(tokens, labels=labels), mask, count, world)
                loss.backward()
            dist.barrier()
            rows.append((name, n, mem.peak, time.perf_counter() - t0))
            if rank == 0:
                print(f"  {name:28s} N={n:6d} peak {mem.peak / 2**20:8.1f} MiB  {rows[-1][3]:.1f} s", flush=True)
    if rank == 0:
        out_q.put(rows)
    dist.destroy_process_group()


def planned_curves(seqs: list[int]) -> dict:
    """The planner's peak per GPU for Llama-3-8B on 8 GPUs, tricks added one by one (GiB)."""
    from megatron.planning.long_context import PRESETS, every_trick  # noqa: PLC0415
    from megatron.planning.memory_estimate import GIB, estimate_memory  # noqa: PLC0415

    model = PRESETS["llama3-8b"]()
    base = dict(sequence_parallel_size=8, zero_stage=3, attention_backend="flash-attn")
    curves = {}
    for name, fields in SETTINGS.items():
        out = []
        for n in seqs:
            if name.startswith("+ tiled layer"):  # every trick, tiles sized for N as --longest sizes them
                par = every_trick(model, n, 8)
            else:
                par = ParallelConfig(**base, **{k: v for k, v in fields.items() if k != "mlp_tiles"},
                                     mlp_tiles=max(1, n // 8 // 8192) if "mlp_tiles" in fields else 1)
            out.append(estimate_memory(model, n, precision="bf16", parallel=par)["peak"] / GIB)
        curves[name] = out
    return curves


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="4096,8192,16384,32768")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--budget-mib", type=float, default=64.0)
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "long_context_memory.png"))
    ap.add_argument("--full-scale-json", default=os.path.join(ROOT, "docs", "long_context_full_scale.json"))
    ap.add_argument("--comm-seq-lens", default="2048 4096",
                    help="also print Ulysses / ring / hybrid bytes per rank vs formulas at P=4 "
                         "(benchmarks/bench_sp_comm.py) for these N; empty to skip")
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    settings = [s for s in args.settings.split(",") if s]
    cfg = model_config()
    print(f"# SP=2 on CPU (gloo), Llama-style: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads ({cfg.num_query_groups} K/V), ffn {cfg.ffn_hidden_size}, vocab "
          f"{cfg.vocab_size}, fp32, one training step (forward + backward), peak live tensor bytes per rank above "
          "the weights (host copies of offloaded activations excluded)")
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(2, free_port(), seqs, settings, q), nprocs=2, join=True, start_method="spawn")
    rows = q.get()
    peak = {(name, n): p for name, n, p, _ in rows}
    secs = {(name, n): t for name, n, _, t in rows}
    print("\n| N | " + " | ".join(f"{s} MiB" for s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for n in seqs:
        print(f"| {n} | " + " | ".join(f"{peak[(s, n)] / 2**20:.1f}" for s in settings) + " |")
    print("\n| N | " + " | ".join(f"{s} s/step" for s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for n in seqs:
        print(f"| {n} | " + " | ".join(f"{secs[(s, n)]:.1f}" for s in settings) + " |")
    budget = args.budget_mib * 2**20
    print(f"\nlongest measured N whose step fits {args.budget_mib:.0f} MiB per rank:")
    for s in settings:
        fits = [n for n in seqs if peak[(s, n)] <= budget]
        print(f"  {s:28s} {max(fits) if fits else 'none'}")
    big = [2 ** k for k in range(17, 24)] + [6 * 2 ** 20, 2 ** 23]
    big = sorted(set(big))
    curves = planned_curves(big)
    print("\n# planned peak GiB per GPU, Llama-3-8B on 8 GPUs (SP 8, ZeRO-3, bf16), tricks added one by one")
    print("| N | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for i, n in enumerate(big):
        print(f"| {n:,} | " + " | ".join(f"{curves[s][i]:.1f}" for s in SETTINGS) + " |")
    measured = None
    if os.path.exists(args.full_scale_json):
        with open(args.full_scale_json) as f:
            measured = [r for r in json.load(f) if r["world_size"] == 8]
    _plot(args.plot, seqs, settings, peak, budget, big, curves, measured)
    if args.comm_seq_lens.strip():
        import subprocess

        print("\n# communication per rank, Ulysses vs ring vs hybrid at the same (N, P)", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_sp_comm.py"), "--seq-lens",
                        *args.comm_seq_lens.split()], check=True)


def _plot(path, seqs, settings, peak, budget, big, curves, measured):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot written; pip install matplotlib)")
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    for s in settings:
        ax.plot(seqs, [peak[(s, n)] / 2**20 for n in seqs], marker="o", label=s)
    ax.axhline(budget / 2**20, color="grey", linestyle="--", linewidth=1, label="budget")
    _log_axes(ax, "sequence length N (tokens, SP = 2)", "peak activation memory per rank (MiB)",
              "Measured: one step, tiny Llama, CPU")
    for s in curves:
        bx.plot(big, curves[s], marker=".", label=s)
    bx.axhline(78, color="grey", linestyle="--", linewidth=1, label="80 GiB - 2 reserve")
    bx.axvline(3.7e6, color="black", linestyle=":", linewidth=1, label="ALST: 3.7M on 8 H100")
    if measured:
        bx.plot([r["seq_length"] for r in measured], [r["measured_peak"] / 2**30 for r in measured], "k*",
                markersize=10, label="measured (fake tensors, 32 layers)")
    _log_axes(bx, "sequence length N (tokens, 8 GPUs)", "peak per GPU (GiB)", "Planned: Llama-3-8B, SP 8, ZeRO-3, bf16")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def _log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Log-2 axes, labels, grid and legend of one panel."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
