"""Named timers for the parts of a step (forward, backward, optimizer).

On a GPU a timer records CUDA events on the current stream at start and stop and reads
them when the step's timers are collected (`pop_all`, once per iteration): the GPU time of
the enclosed work, with no synchronisation inside the step, so timers cost no overlap and
`--log-timers-to-tensorboard` (which the upstream launch scripts pass) is free to leave on.
On CPU they are wall-clock. The all-to-all time comes from `megatron.core.comm`, which
times every collective it issues the same way.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron.core.device_timing import TimedRegions


class Timers:
    def __init__(self, enabled: bool = True, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self._regions = TimedRegions()
        self._cuda = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        with self._regions.region(name, self._cuda):
            yield

    def add(self, name: str, seconds: float) -> None:
        self._regions.add(name, seconds)

    def pop_all(self) -> dict[str, float]:
        """Seconds accumulated per timer since the last call, and reset (waits for recorded GPU work)."""
        return self._regions.pop_all()
