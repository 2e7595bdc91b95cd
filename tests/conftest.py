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


# Under pytest-xdist (scripts/test.sh runs two workers on the 2-core CI machine) every file is one
# unit of work, so its module fixtures are built once; the two multinode files are one unit (one
# emulated cluster at a time), and the heaviest units are handed out first, so that neither worker
# ends the run with a long tail. Measured CPU-seconds (tests/cputime.py), heaviest first:
HEAVY_FIRST = (
    "tests/multinode",  # ~230: two emulated hosts and a Slurm cluster, 6-20 processes per job
    "tests/training/test_cli.py",  # ~85: torchrun on the corpus, SIGTERM + resume through _launch.sh
    "tests/cli/test_jobs.py",  # ~52: five torchrun jobs
    "tests/memory/test_long_context_memory.py",  # ~42: every trick measured, a reduced full-scale fake run
    "tests/lifecycle/test_extend_context.py",  # ~41: extend_context.sh end to end
    "tests/training/test_e2e_parity.py",  # ~41: 25 runs on the pools
    "tests/parallel/test_gpu_check_dry.py",  # ~33
    "tests/checkpoint/test_preemption.py",  # ~31
    "tests/core/test_model_equivalence.py",  # ~18
    "tests/conversion/test_tools.py",  # ~17
    "tests/checkpoint/test_optimizer_state.py",  # ~15
    "tests/memory/test_memory_estimate.py",  # ~13
)


def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "tests/multinode" if path.startswith("tests/multinode/") else path


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker collects; all must agree on the order
        rank = {unit: i for i, unit in enumerate(HEAVY_FIRST)}
        items.sort(key=lambda item: rank.get(_work_unit(item.nodeid), len(HEAVY_FIRST)))  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-file scheduling with the multinode folder as one unit, in collection order."""
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    config.option.loadscopereorder = False  # keep HEAVY_FIRST's order (xdist sorts by test count)
    return ByFile(config, log)
