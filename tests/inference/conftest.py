import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run tiny models: one intra-op thread is faster than two (and than fighting over 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
