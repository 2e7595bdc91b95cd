"""Named wall-clock timers for the parts of a step (forward, backward, all-to-all, optimizer).

On GPU a timer synchronises the device at start and stop, otherwise it would time kernel
launches; that costs a little overlap, which is why timers are opt-in
(--timing-log-level >= 1 or --log-timers-to-tensorboard). The all-to-all time comes from
`megatron.core.comm`, which times every collective it issues.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Timers:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._elapsed: dict[str, float] = defaultdict(float)
        self._sync = torch.cuda.is_available()

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self._elapsed[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self._elapsed[name] += seconds

    def pop_all(self) -> dict[str, float]:
        """Seconds accumulated per timer since the last call, and reset."""
        out = dict(self._elapsed)
        self._elapsed.clear()
        return out
