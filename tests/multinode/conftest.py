"""Fixtures: two emulated hosts per test module, a Slurm cluster on them on demand.

Both tear down in finalizers whatever the tests did (daemons by PID, then every process
left in the namespaces, then the namespaces). Where the machine cannot emulate hosts
(not root, no iproute2, namespaces refused) or cannot get Slurm, the tests skip and say
why; ULYSSES_REQUIRE_MULTINODE=1 turns those skips into failures (for CI, where they
must run).
"""

from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.multinode.cluster import ClusterUnavailable, Slurm, TwoHosts, install_slurm
from tests.multinode.runs import reference_losses


def _unavailable(msg: str) -> None:
    if os.environ.get("ULYSSES_REQUIRE_MULTINODE") == "1":
        pytest.fail(f"{msg} (ULYSSES_REQUIRE_MULTINODE=1: these tests must run here)")
    pytest.skip(msg)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _sigterm_runs_finalizers():
    """A SIGTERM (a CI timeout, a killed session) becomes KeyboardInterrupt, on which pytest
    still runs the finalizers; by default SIGTERM would end pytest and leave the daemons."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def two_hosts():
    with _sigterm_runs_finalizers(), tempfile.TemporaryDirectory(prefix="multinode-") as d:
        cluster = TwoHosts(Path(d))
        try:
            cluster.create()
        except ClusterUnavailable as e:
            _unavailable(f"multi-node tests skipped: {e}")
        try:
            yield cluster
        finally:
            cluster.destroy()


@pytest.fixture(scope="module")
def slurm(two_hosts):
    reason = install_slurm()
    if reason:
        _unavailable(f"Slurm tests skipped: {reason}")
    s = Slurm(two_hosts)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def reference(ranks, tmp_path_factory):
    """{sp: {iteration: loss}} of the tiny job on one host with 4 ranks (runs.py), once per session."""
    return reference_losses(ranks, tmp_path_factory.mktemp("multinode-reference"))
