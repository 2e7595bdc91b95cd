"""What only real multi-process jobs show: torchrun at 2 ranks (and two torchruns as two nodes).

Five jobs, each a few seconds of CPU (a torchrun job costs ~7 CPU-seconds here: three Python
processes importing torch), for the behaviours that involve more than one process:

* the launch script's --preflight stops a bad run before torchrun starts any rank;
* a user error every rank hits after the process group started is printed once (rank 0), and
  torchrun's ChildFailedError traceback is replaced by one summary line (_torchrun.py);
* a user error only rank 1 hits: the job ends at once (not at the collective timeout) and the
  message is printed once, by rank 1, which names itself;
* SIGKILL to torchrun: both ranks are gone within seconds (parent-death signal);
* a lost node: the survivor says what happened, at which iteration, and which checkpoint to
  resume from with --load.

Everything else about the messages is checked in-process, cheaply, by test_user_errors.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron.initialize import free_port
from tests.cli.conftest import VOCAB

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
MODEL = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 32 --micro-batch-size 1 "
         "--global-batch-size 1 --lr 1e-3 --eval-iters 0 --log-interval 1 --ds-sequence-parallel-size 2 "
         "--distributed-timeout-minutes 3").split()
MOCK = MODEL + ["--mock-data", "--vocab-size", str(VOCAB)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [PY, os.path.join(ROOT, "examples_seq_parallel", "_torchrun.py")]


def _run(cmd, timeout=240, **kw):
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **kw.pop("env", {})}, capture_output=True, text=True,
                          timeout=timeout, **kw)
    return proc, time.monotonic() - start


def _assert_once(text: str, needle: str) -> None:
    assert "Traceback" not in text, text
    assert text.count(needle) == 1, f"{needle!r} should appear once in:\n{text}"


def test_launch_script_preflight_stops_a_bad_run_before_torchrun(data):
    model = " ".join(MODEL + ["--train-iters", "2"])
    proc, _ = _run(["bash", "-c", f"MODEL_ARGS=({model}); source examples_seq_parallel/_launch.sh"],
                   env={"NNODES": "1", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
                        "DATA_PATH": f"{data['dir']}/nothing", "TOKENIZER_TYPE": "NullTokenizer",
                        "EXTRA_ARGS": f"--vocab-size {VOCAB}"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    _assert_once(text, f"pretrain_gpt.py: error: index file {data['dir']}/nothing.idx of dataset prefix")
    assert "torch.distributed" not in text and "> world=" not in text, "torchrun must not have started:\n" + text


def test_error_of_every_rank_after_the_process_group_started_is_printed_once(data):
    """Data made with a larger vocabulary than the model's: every rank finds it while building its
    datasets (after init_process_group); rank 0 prints it, rank 1 stays silent."""
    proc, _ = _run(TORCHRUN + ["--standalone", "--nproc-per-node", "2", "pretrain_gpt.py", *MODEL,
                               "--train-iters", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50",
                               "--make-vocab-size-divisible-by", "1", "--data-path", data["good"]])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    _assert_once(text, f"pretrain_gpt.py: error: dataset {data['good']!r} holds token id 100")
    assert "> world=2" in text  # (the process group had started)
    last = text.strip().splitlines()[-1]
    assert last.startswith("torchrun: pretrain_gpt.py failed: rank ") and "exited with code 2" in last, text


def test_error_of_one_rank_only_ends_the_job_at_once(tmp_path):
    """Rank 1 alone fails after the process group started; rank 0 goes on into training and waits
    for it in a collective. The job must end within seconds, not at the 3-minute collective
    timeout, with rank 1's message printed once."""
    proc, seconds = _run(TORCHRUN + ["--standalone", "--nproc-per-node", "2", "tests/cli/rank_fails.py", *MOCK,
                                     "--train-iters", "1000"], env={"FAIL_RANK": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    _assert_once(text, "pretrain_gpt.py: error on rank 1 of 2: the data this rank reads is too small")
    assert seconds < 120, f"the job took {seconds:.0f} s to end:\n{text}"


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def _wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the job ended first:\n{proc.stdout.read() if proc.stdout else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _iterations(log) -> list:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(x)["iteration"] for x in f if '"train"' in x]


def test_ranks_die_with_torchrun(tmp_path):
    """SIGKILL to torchrun (an OOM kill, kill -9): its ranks must not train on as orphans."""
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "pretrain_gpt.py", *MOCK, "--train-iters", "100000", "--log-json", str(log)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _iterations(log), 180, "the first iteration", proc)
        ranks = _children(proc.pid)
        assert len(ranks) == 2 and all(_alive(r) for r in ranks), ranks
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()
        _wait_for(lambda: not any(_alive(r) for r in ranks), 10, "the ranks to die with torchrun")
        print(f"ranks gone {time.monotonic() - killed:.2f} s after SIGKILL to torchrun")
    finally:
        for r in _children(proc.pid):
            os.kill(r, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_lost_node_is_named_with_the_checkpoint_to_resume_from(tmp_path):
    """Two torchruns as two nodes of one rank each (static rendezvous on this host). Node 1's
    torchrun is SIGKILLed mid-run (its rank dies with it); node 0's rank must say that a peer is
    gone, during which iteration, and which checkpoint to resume from with --load."""
    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
              str(free_port())]
    args = ["pretrain_gpt.py", *MOCK, "--train-iters", "100000", "--save", str(ck), "--save-interval", "2",
            "--log-json", str(log)]
    node0 = subprocess.Popen(TORCHRUN + launch + ["--node-rank", "0"] + args, cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node1 = subprocess.Popen(TORCHRUN + launch + ["--node-rank", "1"] + args, cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (ck / "latest_checkpointed_iteration.txt").exists() and len(_iterations(log)) >= 3,
                  180, "a checkpoint and three iterations", node0)
        rank1 = _children(node1.pid)
        node1.kill()
        node1.wait(timeout=10)
        killed = time.monotonic()
        out, _ = node0.communicate(timeout=120)
        waited = time.monotonic() - killed
        assert not any(_alive(r) for r in rank1), "node 1's rank outlived its torchrun"
    finally:
        for p in (node0, node1):
            for r in _children(p.pid):
                os.kill(r, signal.SIGKILL)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    saved = int((ck / "latest_checkpointed_iteration.txt").read_text())
    done = max(_iterations(log))
    assert node0.returncode == 1, out
    _assert_once(out, "pretrain_gpt.py: error: lost contact with another rank during iteration")
    line = next(ln for ln in out.splitlines() if "lost contact" in ln)
    # the step that failed: the one after the last logged (or the one whose logging collective failed)
    completed = int(re.search(r"during iteration (\d+) \((\d+) completed\)", line).group(2))
    assert completed in (done, done + 1), (done, line)
    assert f"The last complete checkpoint is iteration {saved}: {ck / f'iter_{saved:07d}'}" in line, line
    assert f"relaunch the same command with --load {ck}" in line, line
    assert "Connection reset by peer" in line or "Connection closed by peer" in line, line
    assert waited < 60, f"node 0 took {waited:.0f} s to notice"
    assert out.strip().splitlines()[-1].startswith("torchrun: pretrain_gpt.py failed: rank 0 exited with code 1")
    assert saved <= done
