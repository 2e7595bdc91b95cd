"""Two emulated hosts: the fixture itself, then pretrain_gpt.py across them with torchrun.

Runtime on 2 cores shared with other work: ~100 CPU-seconds, ~2 minutes: toy job ~10 s,
both pretraining cases in ONE two-host job ~20 s (6 processes start once, not twice), the
single-host references ~3 s once per session on the rank pool, node failure ~60 s (a run up
to its first checkpoint, the 15 s process-group timeout, a relaunch).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.multinode import cluster as C
from tests.multinode.runs import ITERS, SP_CASES, TINY, assert_same_losses, num_lines, read_losses

pytestmark = pytest.mark.slow
TIMEOUT_MINUTES = 0.25  # --distributed-timeout-minutes of the node-failure run


def test_toy_allreduce_rank_layout(two_hosts):
    """4 ranks on 2 hosts: consecutive ranks share a host, each host has its own name and address."""
    out = two_hosts.workdir / "toy.json"
    procs = two_hosts.torchrun([str(C.REPO / "tests/multinode/toy_allreduce.py"), str(out)], "toy")
    codes = C.wait_all(procs, timeout=90)
    assert codes == [0, 0], two_hosts.tail("toy")
    res = json.loads(out.read_text())
    assert res["world"] == 4 and res["sum"] == 1 + 2 + 3 + 4
    by_rank = sorted(res["ranks"], key=lambda r: r["rank"])
    assert [r["local_rank"] for r in by_rank] == [0, 1, 0, 1]
    hosts = [r["hostname"] for r in by_rank]
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3] and set(hosts) == set(C.HOSTNAMES)
    for r in by_rank:  # the address gloo advertises is the host's veth address, not loopback
        assert r["addr"] == f"{C.SUBNET}.{C.HOSTNAMES.index(r['hostname']) + 1}"
        assert r["node_rank"] == r["rank"] // 2


def test_teardown_kills_every_process_and_removes_stale_namespaces(tmp_path):
    """destroy() ends processes that left our session; a crashed run's namespaces are removed."""
    reason = C.why_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = C.TwoHosts(tmp_path).create()
    try:
        # a daemon-like grandchild in its own session, as torchrun's workers are
        hosts.hosts[1].run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &"], timeout=10)
        pids = hosts.hosts[1].pids()
        assert pids, "the background sleep should be in node2's namespace"
    finally:
        hosts.destroy()
    hosts.destroy()  # idempotent
    assert not any(Path(f"/proc/{p}").exists() and _is_sleep(p) for p in pids)
    assert not any(Path("/run/netns", h.netns).exists() for h in hosts.hosts)
    # a namespace named after a dead owner (a crashed run) is deleted at the next setup
    dead = _dead_pid()
    stale = f"{C.NS_PREFIX}{dead}x1-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in C.remove_stale_namespaces()
    assert not Path("/run/netns", stale).exists()


def _is_sleep(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
    except OSError:
        return False


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def two_host_runs(two_hosts):
    """Both SP cases in ONE torchrun job across the hosts (run_configs.py calls pretrain_gpt.main for
    each on the job's process group): a 2 x 2-rank job starts 6 processes that import torch
    (~25 CPU-seconds here), so the two layouts share one start. Returns (exit codes, logs by SP)."""
    logs = {sp: two_hosts.workdir / f"pretrain-sp{sp}.jsonl" for sp in SP_CASES}
    configs = two_hosts.workdir / "pretrain.json"
    configs.write_text(json.dumps([[*TINY, "--ds-sequence-parallel-size", str(sp), "--log-json", str(logs[sp])]
                                   for sp in SP_CASES]))
    procs = two_hosts.torchrun([str(C.REPO / "tests/multinode/run_configs.py"), str(configs)], "pretrain")
    return C.wait_all(procs, timeout=180), logs


@pytest.mark.parametrize("sp", SP_CASES, ids=["sp2_in_host_x_dp2_across", "sp4_across_hosts"])
def test_pretrain_two_hosts_matches_single_host(two_hosts, two_host_runs, reference, sp):
    """torchrun --nnodes 2 --nproc-per-node 2 on each host == one host with 4 ranks (fp32, rel < 1e-5)."""
    codes, logs = two_host_runs
    assert codes == [0, 0], two_hosts.tail("pretrain")
    events = [json.loads(line) for line in logs[sp].read_text().splitlines()]
    config = next(e for e in events if e["event"] == "config")
    assert (config["world_size"], config["sp"], config["dp"]) == (4, sp, 4 // sp), config
    text = two_hosts.tail("pretrain", n=10**6)
    assert f"sp={sp}" in text and f"dp={4 // sp}" in text, text
    assert_same_losses(read_losses(logs[sp]), reference[sp])


def test_node_failure_bounded_exit_and_resume(two_hosts, reference):
    """Host node2 dies mid-run (link cut, every process killed): node1 exits with an error within
    the --distributed-timeout-minutes bound; the last checkpoint is intact; a relaunch resumes."""
    sp, work = 4, two_hosts.workdir
    log, ckpt = work / "nodefail.jsonl", work / "nodefail-ckpt"
    args = [str(C.REPO / "pretrain_gpt.py"), *TINY, "--ds-sequence-parallel-size", str(sp), "--log-json", str(log),
            "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2",
            "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)]
    node1, node2 = two_hosts.hosts
    procs = two_hosts.torchrun(args, "nodefail")
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 120
    while not tracker.exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, two_hosts.tail("nodefail")
        time.sleep(0.05)
    # a dead host sends nothing (no FIN, no RST): cut its link first, so node1 can only
    # notice through the process-group timeout
    node2.run(["ip", "link", "set", "eth0", "down"], timeout=10)
    killed_at = time.monotonic()
    node2.kill_all()
    try:
        code = procs[0].wait(timeout=TIMEOUT_MINUTES * 60 + 90)
    except subprocess.TimeoutExpired:
        C.kill_tree(procs[0].pid)
        pytest.fail(f"node1 still running {TIMEOUT_MINUTES * 60 + 90:.0f} s after node2 died: "
                    f"--distributed-timeout-minutes {TIMEOUT_MINUTES} is not honoured\n{two_hosts.tail('nodefail')}")
    waited = time.monotonic() - killed_at
    procs[1].wait(timeout=10)
    text = two_hosts.tail("nodefail", n=10**6)
    assert code != 0, text
    assert "timed out" in text.lower(), f"node1 should say that a collective timed out:\n{text}"
    assert waited < TIMEOUT_MINUTES * 60 + 45, f"node1 took {waited:.0f} s to give up:\n{text}"
    saved = int(tracker.read_text())
    done = max(read_losses(log))
    assert 2 <= saved <= done < ITERS, f"saved {saved}, logged {done}:\n{text}"

    node2.run(["ip", "link", "set", "eth0", "up"], timeout=10)  # the node is back (or replaced)
    before = num_lines(log)
    procs = two_hosts.torchrun(args, "nodefail-relaunch")
    assert C.wait_all(procs, timeout=150) == [0, 0], two_hosts.tail("nodefail-relaunch")
    # the relaunch starts after the checkpoint and continues the uninterrupted curve
    assert sorted(read_losses(log, skip_lines=before)) == list(range(saved + 1, ITERS + 1)), \
        two_hosts.tail("nodefail-relaunch")
    assert_same_losses(read_losses(log), reference[sp])
