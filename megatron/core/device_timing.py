"""Seconds of enclosed work per name, without synchronising inside the step.

On CUDA a region records an event pair on the current stream and the pair is read back only
when its seconds are asked for (once per logged iteration): the enclosed work's GPU time,
with no host sync in the hot path. On CPU a region is wall-clock. Used by the collective
counters (`megatron.core.comm`) and the step timers (`megatron.training.timers`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class TimedRegions:
    """Accumulated seconds per name. `max_pending` bounds the unread CUDA event pairs of a name:
    beyond it, pairs that have finished are read back without waiting."""

    def __init__(self, max_pending: int | None = None) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._pending: dict[str, list] = defaultdict(list)  # unread CUDA (start, end) pairs
        self._max_pending = max_pending

    @contextmanager
    def region(self, name: str, cuda: bool):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending[name].append((start, end))
                if self._max_pending is not None and len(self._pending[name]) > self._max_pending:
                    self._resolve(name, block=False)
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - begin

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] += seconds

    def _resolve(self, name: str, block: bool) -> None:
        """Turn finished CUDA event pairs into seconds (all of them, waiting, when `block`)."""
        keep = []
        for start, end in self._pending.get(name, []):
            if block or end.query():
                end.synchronize()
                self._seconds[name] += start.elapsed_time(end) / 1000.0
            else:
                keep.append((start, end))
        self._pending[name] = keep

    def names(self) -> set:
        return set(self._seconds) | set(self._pending)

    def seconds(self, name: str) -> float:
        """Seconds of `name` so far (waits for its recorded GPU work)."""
        self._resolve(name, block=True)
        return self._seconds[name]

    def pop_all(self) -> dict[str, float]:
        """Seconds per name since the last call, and reset (waits for recorded GPU work)."""
        out = {name: self.seconds(name) for name in self.names()}
        self.clear()
        return out

    def clear(self) -> None:
        self._seconds.clear()
        self._pending.clear()
