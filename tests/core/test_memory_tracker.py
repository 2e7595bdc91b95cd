"""The CPU memory tracker counts exactly the storages operators create and free."""

import torch

from megatron.planning.memory_tracker import MemoryTracker

MB4 = 1000 * 1000 * 4


def test_counts_allocations_views_and_frees():
    x = torch.randn(1000, 1000, requires_grad=True)  # baseline: not counted
    with MemoryTracker() as m:
        a = x @ x  # +1 buffer
        v = a.t()  # view: +0
        b = a.relu()  # +1
        assert m.live == 2 * MB4
        del a, v  # relu keeps its output, not its input: a is freed
        assert m.live == MB4
        b.sum().backward()  # grad of a, two matmul grads, summed into x.grad
        assert 0 <= m.peak - 4 * MB4 < 64  # plus the scalar loss and its gradient
        assert m.live == 2 * MB4  # b and x.grad
        del b
    assert m.live == MB4  # x.grad outlives the block


def test_track_existing_and_reset_peak():
    w = torch.zeros(250, 1000)
    with MemoryTracker() as m:
        m.track_existing([w, w[:10]])  # a view of a tracked storage counts once
        assert m.live == 1000 * 1000
        y = torch.ones(500, 1000)
        m.reset_peak()
        del y
        assert m.peak == 3 * 1000 * 1000 and m.live == 1000 * 1000
