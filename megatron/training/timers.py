"""Named timers for the parts of a step (forward, backward, optimizer).

On a GPU a timer records CUDA events on the current stream at start and stop and reads
them when the step's timers are collected (`pop_all`, once per iteration): the GPU time of
the enclosed work, with no synchronisation inside the step, so timers cost no overlap and
`--log-timers-to-tensorboard` (which the upstream launch scripts pass) is free to leave on.
On CPU they are wall-clock. The all-to-all time comes from `megatron.core.comm`, which
times every collective it issues the same way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Timers:
    def __init__(self, enabled: bool = True, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self._elapsed: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []
        self._cuda = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._elapsed[name] += time.perf_counter() - begin

    def add(self, name: str, seconds: float) -> None:
        self._elapsed[name] += seconds

    def pop_all(self) -> dict[str, float]:
        """Seconds accumulated per timer since the last call, and reset (waits for recorded GPU work)."""
        for name, start, end in self._events:
            end.synchronize()
            self._elapsed[name] += start.elapsed_time(end) / 1000.0
        self._events.clear()
        out = dict(self._elapsed)
        self._elapsed.clear()
        return out
