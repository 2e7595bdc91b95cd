"""What checkpoint checksums cost: crc32 of every file at save, and verification at load.

    python benchmarks/bench_checkpoint_checksums.py [--gib 2] [--dir /tmp]

Writes one checkpoint of GIB gibibytes of fp32 tensors with megatron.checkpoint's writer
on one process (no process group), and times:
* the DCP write alone (dcp.save into a plain directory, what the writer did before);
* the whole atomic save (write + crc32 of the files just written + fsync + rename);
* the crc32 pass alone, with the files in the page cache (the save-time cost);
* verification at load (crc32 of every file against checksums.json), with the files in
  the page cache and after evicting them (posix_fadvise DONTNEED: read from disk);
* the DCP load of the same checkpoint, for scale.
On a cluster every rank checksums only the files it wrote, and verification splits the
files over all ranks, so per-rank cost is (checkpoint bytes / ranks) / the rate printed here.
The machine is shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.checkpoint import format as fmt  # noqa: E402
from megatron.checkpoint.storage import crc32_file, read_full, verify_checksums, write_checkpoint  # noqa: E402


def _evict(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


_CPU: dict = {}


def _timed(fn, name=None):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if name:
        _CPU[name] = time.process_time() - c
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="checkpoint size in GiB (fp32 tensors of 64 MiB)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory under /tmp)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*single process.*")
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    torch.manual_seed(0)
    n = max(1, round(args.gib * 16))  # 64 MiB tensors
    state = {"model": {f"layer{i}.weight": torch.randn(4096, 4096) for i in range(n)}}
    nbytes = n * 4096 * 4096 * 4
    work = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    try:
        t_dcp, _ = _timed(lambda: dcp.save(state, checkpoint_id=os.path.join(work, "plain"), no_dist=True))
        shutil.rmtree(os.path.join(work, "plain"))
        root = os.path.join(work, "ck")
        t_save, path = _timed(lambda: write_checkpoint(root, 1, state, no_dist=True, log=lambda *_: None))
        files = [f for f in os.listdir(path) if f.endswith(".distcp") or f == fmt.METADATA]
        t_crc, _ = _timed(lambda: [crc32_file(os.path.join(path, f)) for f in files], "crc")
        sums = fmt.read_checksums(path)
        t_verify_warm, _ = _timed(lambda: verify_checksums(path, sorted(sums), sums, no_dist=True))
        _evict(path)
        t_verify_cold, _ = _timed(lambda: verify_checksums(path, sorted(sums), sums, no_dist=True))
        state["model"].clear()  # free the tensors before the load allocates its own
        t_load, _ = _timed(lambda: read_full(path, verify=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = nbytes / 1e9
    rows = [("DCP write alone (before)", t_dcp), ("atomic save incl. crc32 + fsync (now)", t_save),
            ("crc32 of the written files (page cache)", t_crc),
            ("verify at load, page cache", t_verify_warm), ("verify at load, from disk", t_verify_cold),
            ("DCP load (for scale)", t_load)]
    print(f"checkpoint: {nbytes / 2**30:.2f} GiB in {len(files) - 1} shard file(s); load average "
          f"{os.getloadavg()[0]:.1f}; zlib {__import__('zlib').ZLIB_RUNTIME_VERSION}")
    print("| step | seconds | GB/s |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {gb / t:.2f} |")
    print(f"\nchecksum cost at save: {t_crc:.2f} s wall, {_CPU['crc']:.2f} s CPU ({gb / _CPU['crc']:.2f} GB per "
          f"CPU-second) = {100 * t_crc / t_dcp:.0f} % of the DCP write's wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
