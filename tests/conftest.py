import pytest

from tests.dist_harness import close_pools, run_on_ranks


@pytest.fixture(scope="session")
def ranks():
    """`ranks(world_size, fn, *args)` runs a module-level `fn` on a reused pool of gloo ranks."""
    yield run_on_ranks
    close_pools()
