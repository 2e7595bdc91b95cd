"""Communication volume and time of one Ulysses attention layer, forward + backward.

For each (N, P) this starts P gloo ranks on the CPU, runs DistributedAttention around the
SDPA backend on `[N/P, 1, H, d]` shards and prints the all-to-all bytes each rank sent
(read from megatron.core.comm's counters), the formula's value and their ratio.

Formula per rank and layer, forward: Q, K, V in and O out are `(2 hq + 2 hkv) d N/P`
elements, of which the fraction (P-1)/P leaves the rank; backward moves the same again.
With hkv = hq that is the paper's 4 N h / P, constant when N and P grow together.

Times on this 2-core machine are only comparable within a row group of equal P <= 2
(more ranks than cores oversubscribe); the volumes are exact everywhere.

    python benchmarks/bench_attention.py [--hidden 512 --heads 8 --kv-heads 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from megatron.core import comm  # noqa: E402
from megatron.core.sequence_parallel import DistributedAttention  # noqa: E402
from megatron.initialize import free_port  # noqa: E402
from megatron.model.attention_backends import build_local_attention  # noqa: E402


def _rank(rank, world, port, n, hq, hkv, d, iters, out_q, chunks=1):
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    local = build_local_attention("sdpa", causal=True)
    if chunks > 1:
        attn = DistributedAttention(local, dist.group.WORLD, overlap_chunks=chunks)
    else:
        attn = DistributedAttention(local, dist.group.WORLD, check_shapes=False)
    sl = n // world
    q = torch.randn(sl, 1, hq, d, requires_grad=True)
    k = torch.randn(sl, 1, hkv, d, requires_grad=True)
    v = torch.randn(sl, 1, hkv, d, requires_grad=True)
    grad = torch.randn(sl, 1, hq, d)
    times, fwd_bytes, total_bytes = [], 0, 0
    for i in range(iters + 1):
        dist.barrier()
        comm.reset_counters()
        t0 = time.perf_counter()
        out = attn(q, k, v)
        fwd_bytes = comm.bytes_sent("all_to_all")
        out.backward(grad)
        dist.barrier()
        if i:  # first iteration warms up
            times.append(time.perf_counter() - t0)
        total_bytes = comm.bytes_sent("all_to_all")
        a2a_s = comm.seconds("all_to_all")
    if rank == 0:
        out_q.put((fwd_bytes, total_bytes, statistics.median(times), a2a_s))
    dist.destroy_process_group()


def measure(n, p, hq, hkv, d, iters, chunks=1):
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(p, free_port(), n, hq, hkv, d, iters, q, chunks), nprocs=p, join=True,
                       start_method="spawn")
    return q.get()


def formula_bytes(n, p, hq, hkv, d, elem=4):
    """Forward all-to-all bytes sent per rank: (2 hq + 2 hkv) d N/P elements x (P-1)/P."""
    return (2 * hq + 2 * hkv) * d * (n // p) * elem * (p - 1) // p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA); default = heads")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--points", default="1024:1,2048:2,4096:4,8192:8,8192:1,8192:2,8192:4",
                    help="comma-separated N:P pairs")
    args = ap.parse_args(argv)
    hq, d = args.heads, args.hidden // args.heads
    hkv = args.kv_heads or hq
    print(f"# one attention layer, fwd+bwd, fp32, hidden {args.hidden}, {hq} heads, {hkv} K/V heads, "
          f"head dim {d}, batch 1, SDPA backend, gloo on CPU")
    print("| N | P | a2a MB/rank fwd | formula MB fwd | ratio | a2a MB/rank fwd+bwd | step ms | a2a share |")
    print("|---|---|---|---|---|---|---|---|")
    for point in args.points.split(","):
        n, p = (int(x) for x in point.split(":"))
        if p == 1:
            fwd, total, sec, a2a_s = 0, 0, *measure(n, 1, hq, hkv, d, args.iters)[2:]
        else:
            fwd, total, sec, a2a_s = measure(n, p, hq, hkv, d, args.iters)
        expect = formula_bytes(n, p, hq, hkv, d)
        ratio = f"{fwd / expect:.3f}" if expect else "-"
        print(f"| {n} | {p} | {fwd / 2**20:.2f} | {expect / 2**20:.2f} | {ratio} | {total / 2**20:.2f} | "
              f"{sec * 1e3:.1f} | {a2a_s / sec:.0%} |", flush=True)


if __name__ == "__main__":
    main()
