"""Communication per rank of Ulysses, ring and Ulysses x ring attention at the same (N, P).

For each sequence length N this starts P gloo ranks on the CPU once and runs one causal
attention layer, forward + backward, for every layout U x R = P: pure Ulysses (P x 1),
the hybrids, pure ring (1 x P). It prints, per layout, the bytes one rank sent by kind
(read from megatron.core.comm's counters, forward + backward) next to the formula's value
(megatron.core.sequence_parallel.hybrid.attention_comm_bytes), whether every rank matched
its formula exactly, and the median step time.

Formulas per rank and layer (elements; fp32 here, so x4 for bytes; s = N/P tokens per rank):
  Ulysses all-to-all, forward and again backward: (2 Hq + 2 Hkv) d s (U-1)/U
  ring, forward: (R-1) hops of K+V = 2 (N/R) (Hkv/U) d each;
        backward: (R-1) K/V hops + R hops of the fp32 dK/dV accumulators
Ulysses volume per rank stays flat as N and P grow together; the ring's grows with R, which
is why the hybrid keeps R as small as the head count allows.

Times on this 2-core machine oversubscribe the CPU for P > 2: compare rows of one N only.

    python benchmarks/bench_sp_comm.py [--seq-lens 2048 4096 --sp 4 --heads 8 --kv-heads 8 --head-dim 64]
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
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.sequence_parallel.hybrid import (  # noqa: E402
    attention_comm_bytes,
    build_sp_attention,
)
from megatron.initialize import free_port  # noqa: E402
from megatron.model.attention_backends import build_local_attention  # noqa: E402

KINDS = ("all_to_all", "ring_p2p")



def _layouts(p: int, heads: int) -> list[int]:
    """Ring sizes R (divisors of P) whose Ulysses degree P/R fits the head count."""
    return [r for r in range(1, p + 1) if p % r == 0 and p // r <= heads]


def _rank(rank, world, port, seq_lens, hq, hkv, d, iters, out_q):
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for n in seq_lens:
        for ring in _layouts(world, hq):
            state = ps.initialize_model_parallel(sequence_parallel_size=world, ring_attention_size=ring)
            attn = build_sp_attention(build_local_attention("sdpa", causal=True), state)
            sl = n // world
            g = torch.Generator().manual_seed(rank)
            q = torch.randn(sl, 1, hq, d, generator=g, requires_grad=True)
            k = torch.randn(sl, 1, hkv, d, generator=g, requires_grad=True)
            v = torch.randn(sl, 1, hkv, d, generator=g, requires_grad=True)
            grad = torch.randn(sl, 1, hq, d, generator=g)
            times, measured = [], {}
            for i in range(iters + 1):  # the first iteration warms up
                dist.barrier()
                comm.reset_counters()
                t0 = time.perf_counter()
                attn(q, k, v).backward(grad)
                dist.barrier()
                if i:
                    times.append(time.perf_counter() - t0)
                measured = {kind: comm.bytes_sent(kind) for kind in KINDS}
            formula = attention_comm_bytes(n, 1, hq, hkv, d, world, ring, sp_rank=state.sp_rank)
            rows.append((n, ring, measured, {kind: formula[kind]["total"] for kind in KINDS},
                         statistics.median(times)))
            ps.destroy_model_parallel()
    out_q.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--sp", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.sp, port, args.seq_lens, args.heads, args.kv_heads,
                                             args.head_dim, args.iters, out_q)) for r in range(args.sp)]
    for p in procs:
        p.start()
    per_rank = dict(out_q.get() for _ in procs)
    for p in procs:
        p.join()
    print(f"P={args.sp}  Hq={args.heads} Hkv={args.kv_heads} d={args.head_dim} b=1 fp32, causal, "
          "one attention layer forward+backward; bytes sent by rank 0 (MiB), 'exact' = every rank "
          "equals its formula to the byte")
    print("| N | layout U x R | all-to-all meas / formula | ring p2p meas / formula | total MiB | exact | step ms |")
    print("|---:|---|---:|---:|---:|:---:|---:|")
    mib = 1 / 2**20
    for i, (n, ring, measured, formula, step) in enumerate(per_rank[0]):
        exact = all(per_rank[r][i][2] == per_rank[r][i][3] for r in per_rank)
        name = "ulysses" if ring == 1 else ("ring" if ring == args.sp else "hybrid")
        a2a = f"{measured['all_to_all'] * mib:.2f} / {formula['all_to_all'] * mib:.2f}"
        rp = f"{measured['ring_p2p'] * mib:.2f} / {formula['ring_p2p'] * mib:.2f}"
        total = sum(measured.values()) * mib
        print(f"| {n} | {args.sp // ring} x {ring} ({name}) | {a2a} | {rp} | {total:.2f} | "
              f"{'yes' if exact else 'NO'} | {step * 1e3:.0f} |")


if __name__ == "__main__":
    main()
