"""A pool of long-lived gloo ranks for multi-rank tests.

Starting a process that imports torch costs ~2.5 s here, so each world size gets one
pool of worker processes for the whole test session; a test ships a module-level
function to every rank and gets back each rank's return value (~20 ms per call).
Workers are forked by a forkserver that imported torch and the training stack once
(`_PRELOAD`), so a pool of N ranks costs ~0.3 CPU-seconds per rank to start instead of
~4 s (each spawned rank imported torch, torch.distributed.checkpoint, ... on its own).
The server runs nothing but imports, so no thread pool exists to be broken by the fork.
A failure on any rank raises in the test with that rank's traceback, and the pool is
torn down and rebuilt so one broken test cannot hang the next ones.
"""

from __future__ import annotations

import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp
from torch.distributed import TCPStore

_CTX = mp.get_context("forkserver")
# what every rank imports anyway; a module that fails to import is skipped by the server
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp", "torch._dynamo",
            "numpy", "megatron.arguments", "megatron.training", "megatron.parallel", "pretrain_gpt", "tests.dist_harness"]
_CTX.set_forkserver_preload(_PRELOAD)
CALL_TIMEOUT_S = float(os.environ.get("DIST_TEST_TIMEOUT", "180"))


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    results.put((rank, "ready", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            out = fn(*args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:  # noqa: BLE001 - the test reports it
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()
    # skip the interpreter's teardown (seconds with torch loaded): nothing is left to flush but stdio
    results.close()
    results.join_thread()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


class RankPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        # The rendezvous store is served from this process on a port the kernel picks: a port
        # chosen here and bound later by rank 0 could be taken in between by anything else on
        # the machine (another test session), which killed rank 0 with EADDRINUSE.
        self._store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        port = self._store.port
        self._tasks = [_CTX.Queue() for _ in range(world_size)]
        self._results = _CTX.Queue()
        self._procs = [
            _CTX.Process(target=_worker, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready")
        self.broken = False

    def _collect(self, expect: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        errors: dict[int, str] = {}
        deadline = time.monotonic() + CALL_TIMEOUT_S
        for _ in range(self.world_size):
            while True:  # a rank that died (a crash, an OOM kill) ends the wait at once, not at the timeout
                try:
                    rank, status, payload = self._results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                    if dead or time.monotonic() > deadline:
                        self.broken = True
                        what = f"ranks {dead} died" if dead else f"ranks did not answer within {CALL_TIMEOUT_S}s"
                        raise TimeoutError(f"{what} (waiting for {expect!r}); errors so far: {errors}") from None
            if status == "error":
                errors[rank] = payload
                # the other ranks are likely stuck in a collective: do not wait for them
                self.broken = True
                break
            out[rank] = payload
        if errors:
            rank, tb = next(iter(errors.items()))
            raise AssertionError(f"rank {rank} of {self.world_size} failed:\n{tb}")
        return out

    def run(self, fn: Callable, *args, **kwargs) -> list[Any]:
        """Call `fn(*args, **kwargs)` on every rank; return the results in rank order."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect("ok")

    def close(self) -> None:
        self.stop()
        self.join()

    def stop(self) -> None:
        """Ask every rank to exit (they leave the process group together)."""
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass

    def join(self, deadline: float | None = None) -> None:
        """Wait for the ranks until `deadline` (2 s from now; none for a broken pool), then terminate."""
        if deadline is None:
            deadline = time.monotonic() + (2 if not self.broken else 0.1)
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._store = None  # the rendezvous server goes with its ranks


_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    pool = _POOLS.get(world_size)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool


def close_pools() -> None:
    """All pools at once: every rank is told to exit first, then all are awaited together."""
    pools = list(_POOLS.values())
    _POOLS.clear()
    for pool in pools:
        pool.stop()
    deadline = time.monotonic() + 5
    for pool in pools:
        pool.join(deadline if not pool.broken else time.monotonic() + 0.1)


def run_on_ranks(world_size: int, fn: Callable, *args, **kwargs) -> list[Any]:
    return get_pool(world_size).run(fn, *args, **kwargs)
