import os

# One thread per process. The suite runs on 2 cores, where the pytest process, its rank pools and
# the jobs it starts share the CPUs: a second intra-op (OpenMP) or BLAS thread per process buys
# nothing there, and idle OpenMP workers spin-wait after every parallel region (the memory tests
# took twice the CPU with 2 threads). Subprocesses inherit the variables; a value set by the
# caller wins.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.dist_harness import close_pools, run_on_ranks  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already started (the pytest process imported torch and ran work before)
    pass


@pytest.fixture(scope="session")
def ranks():
    """`ranks(world_size, fn, *args)` runs a module-level `fn` on a reused pool of gloo ranks."""
    yield run_on_ranks
    close_pools()
