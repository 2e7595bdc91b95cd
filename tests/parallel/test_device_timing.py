"""The CUDA path of TimedRegions (collective counters and step timers) with a stand-in for
`torch.cuda.Event`: a region records events and never waits; seconds are read back only when
asked for; beyond `max_pending` only finished pairs are read, without waiting."""

import torch

from megatron.core.device_timing import TimedRegions
from megatron.training.timers import Timers


class FakeEvent:
    log: list = []
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t, self.done = None, False

    def record(self) -> None:
        FakeEvent.clock += 1.0
        self.t = FakeEvent.clock
        FakeEvent.log.append("record")

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        FakeEvent.log.append("synchronize")
        self.done = True

    def elapsed_time(self, end) -> float:  # milliseconds, as CUDA events report
        return 1000.0 * (end.t - self.t)


def test_cuda_regions_record_events_and_read_them_only_when_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.log, FakeEvent.clock = [], 0.0
    timers = Timers(device=torch.device("cuda", 0))
    for _ in range(3):
        with timers("forward"):
            pass
    assert FakeEvent.log == ["record"] * 6  # no synchronisation inside the step
    assert timers.pop_all() == {"forward": 3.0}
    assert FakeEvent.log.count("synchronize") == 3
    assert timers.pop_all() == {}


def test_pending_pairs_beyond_the_bound_are_read_without_waiting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.log, FakeEvent.clock = [], 0.0
    regions = TimedRegions(max_pending=2)
    with regions.region("a2a", cuda=True):
        pass
    regions._pending["a2a"][0][1].done = True  # the first pair's work has finished on the GPU
    for _ in range(2):
        with regions.region("a2a", cuda=True):
            pass
    assert FakeEvent.log.count("synchronize") == 1  # only the finished pair was read
    assert len(regions._pending["a2a"]) == 2
    assert regions.seconds("a2a") == 3.0 and not regions._pending["a2a"]


def test_cpu_regions_are_wall_clock():
    regions = TimedRegions()
    with regions.region("x", cuda=False):
        sum(range(1000))
    regions.add("x", 1.0)
    assert 1.0 < regions.seconds("x") < 2.0
