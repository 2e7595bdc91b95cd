"""Preemption and faults with real torchrun jobs (launched by examples_seq_parallel/_launch.sh).

- SIGTERM to the job's processes (what Slurm sends before a kill) with --exit-signal-handler:
  the ranks finish the iteration, save, and the job exits 0 with the tracker naming the last
  logged iteration.
- SIGKILL in the middle of a save (held between the DCP write and the rename by a test
  hook): the tracker still names the previous iteration, and resuming from it reproduces
  the uninterrupted curve bitwise (dropout on, so the RNG states matter too).
Runtime ~20 s on 2 cores (two torchrun jobs of 2 ranks, then the session's 2-rank pool).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

from megatron.checkpoint import PAUSE_ENV, TRACKER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 250 "
        "--micro-batch-size 1 --global-batch-size 2 --lr 1e-3 --lr-decay-iters 8 --lr-decay-style cosine "
        "--hidden-dropout 0.1 --attention-dropout 0.1 --eval-iters 0 --log-interval 1000 "
        "--ds-sequence-parallel-size 2 --seed 9").split()


def _launch(args: list, out_file, env: dict | None = None) -> subprocess.Popen:
    """Start a 2-rank job through _launch.sh in its own process group (a Slurm job step)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NNODES": "1", "GPUS_PER_NODE": "2", "MASTER_PORT": str(port), "MOCK_DATA": "1",
           "VOCAB_SIZE": "250", "EXTRA_ARGS": " ".join(args), **(env or {})}
    script = "MODEL_ARGS=(); source examples_seq_parallel/_launch.sh"
    return subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=out_file, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _job_pids(pid: int) -> list[int]:
    """`pid` and all its descendants: torchrun starts each rank in a session of its own, so a
    process-group signal misses them; Slurm signals every process of the step, like this."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _signal_job(proc: subprocess.Popen, sig: int) -> None:
    for p in _job_pids(proc.pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _wait_for(predicate, proc, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            _signal_job(proc, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_job(proc, signal.SIGKILL)
        raise


def _train(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [e for e in map(json.loads, open(path)) if e["event"] == "train"]


def test_sigterm_saves_and_exits_zero(tmp_path):
    log, ck = tmp_path / "log.jsonl", tmp_path / "ck"
    with open(tmp_path / "out.txt", "w") as out:
        proc = _launch(BASE + ["--train-iters", "100000", "--exit-signal-handler", "--save", str(ck),
                               "--log-json", str(log)], out)
        _wait_for(lambda: len(_train(log)) >= 2, proc, "iteration 2")
        _signal_job(proc, signal.SIGTERM)  # what Slurm does at preemption or scancel
        rc = _finish(proc)
    text = (tmp_path / "out.txt").read_text()
    assert rc == 0, text[-3000:]
    last = _train(log)[-1]["iteration"]
    assert (ck / TRACKER).read_text() == str(last) and (ck / f"iter_{last:07d}" / ".metadata").exists()
    assert "SIGTERM received" in text


def _resume(root: str) -> None:
    import pretrain_gpt

    common = BASE + ["--train-iters", "6"]
    assert pretrain_gpt.main(common + ["--log-json", os.path.join(root, "straight.jsonl")]) == 0
    ck = os.path.join(root, "ck")
    assert pretrain_gpt.main(common + ["--load", ck, "--save", ck, "--log-json", os.path.join(root, "resumed.jsonl")]) == 0


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(ranks, tmp_path):
    ck = tmp_path / "ck"
    with open(tmp_path / "out.txt", "w") as out:
        proc = _launch(BASE + ["--train-iters", "6", "--save-interval", "2", "--save", str(ck),
                               "--log-json", str(tmp_path / "killed.jsonl")], out, env={PAUSE_ENV: "4:120"})
        _wait_for(lambda: "pausing before the rename" in (tmp_path / "out.txt").read_text(), proc, "the save of 4")
        _signal_job(proc, signal.SIGKILL)  # a node failure: every process dies at once
        _finish(proc, 60)
    assert (ck / TRACKER).read_text() == "2"
    assert (ck / "iter_0000004.tmp" / ".metadata").exists() and not (ck / "iter_0000004").exists()
    ranks(2, _resume, str(tmp_path))
    resumed = _train(tmp_path / "resumed.jsonl")
    assert [e["iteration"] for e in resumed] == [3, 4, 5, 6]
    assert [e["lm_loss"] for e in resumed] == [e["lm_loss"] for e in _train(tmp_path / "straight.jsonl")[2:]]
    assert (ck / TRACKER).read_text() == "6" and not (ck / "iter_0000004.tmp").exists()
