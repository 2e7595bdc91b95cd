"""Does pipelining Ulysses over head chunks hide the all-to-all? Measured, not assumed.

Runs one attention layer forward + backward on P gloo ranks for K = 1 (plain Ulysses,
one fused Q/K/V all-to-all) and K = 2, 4 head chunks (all-to-alls overlapped with the
attention of other chunks), and prints step times as ratios to K = 1 measured in the same
run, alternating the order to spread machine noise.

    python benchmarks/bench_overlap.py [--points 8192:2,16384:2 --hidden 512 --heads 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import measure  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="8192:2,16384:2")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--chunks", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args(argv)
    hq, d = args.heads, args.hidden // args.heads
    chunk_list = [int(c) for c in args.chunks.split(",")]
    print(f"# one attention layer fwd+bwd, hidden {args.hidden}, {hq} heads, fp32, gloo on CPU, "
          f"median of {args.repeats} runs x {args.iters} iterations")
    print("| N | P | K | step ms | a2a-wait share | time vs K=1 |")
    print("|---|---|---|---|---|---|")
    for point in args.points.split(","):
        n, p = (int(x) for x in point.split(":"))
        times = {k: [] for k in chunk_list}
        shares = {k: [] for k in chunk_list}
        for rep in range(args.repeats):
            order = chunk_list if rep % 2 == 0 else chunk_list[::-1]
            for k in order:
                _, _, sec, a2a_s = measure(n, p, hq, hq, d, args.iters, chunks=k)
                times[k].append(sec)
                shares[k].append(a2a_s / sec)
        base = statistics.median(times[chunk_list[0]])
        for k in chunk_list:
            t = statistics.median(times[k])
            share = f"{statistics.median(shares[k]):.0%}" if k == 1 else "async"
            print(f"| {n} | {p} | {k} | {t * 1e3:.0f} | {share} | {t / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
