"""A two-node Slurm cluster running the project's own batch script; preemption; node failure.

The batch script is examples_seq_parallel/slurm_pretrain_gpt.sbatch, submitted unchanged
as a user would, with command-line options for this cluster's shape (2 CPUs, no GPUs):
    sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=2 --export=ALL,GPUS_PER_NODE=2,...
           examples_seq_parallel/slurm_pretrain_gpt.sbatch ../tests/multinode/tiny_model.sh
Losses are compared with the single-host 4-rank reference of runs.py (equal to the
torchrun two-host run by test_two_hosts.py).

Runtime on 2 cores shared with other work (load ~5): ~46 s: Slurm up ~1.5 s, the two-node
job ~20 s, the single-host references ~3 s (once per session, on the rank pool), the
fresh-clone dry run ~1 s; preemption adds two jobs (~40 s) once it runs.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.multinode import cluster as C
from tests.multinode.runs import ITERS, TINY, assert_same_losses, num_lines, read_losses

pytestmark = pytest.mark.slow

SBATCH_SCRIPT = "examples_seq_parallel/slurm_pretrain_gpt.sbatch"
LAUNCH_SCRIPT = "../tests/multinode/tiny_model.sh"  # resolved by the batch script under examples_seq_parallel/
SP = 4


def _has_flag(flag: str) -> bool:
    return flag in (C.REPO / "megatron/arguments.py").read_text()


needs_signal_handler = pytest.mark.skipif(
    not _has_flag("--exit-signal-handler"),
    reason="needs --exit-signal-handler in pretrain_gpt.py / megatron/arguments.py: on SIGTERM finish the "
           "current iteration, save a checkpoint to --save and exit 0")


def _submit(slurm: C.Slurm, tag: str, extra_args: list[str], env: dict | None = None) -> tuple[int, Path]:
    out = slurm.cluster.workdir / f"{tag}-%j.out"
    env = {"GPUS_PER_NODE": "2", "MOCK_DATA": "1", "VOCAB_SIZE": "256", "SP": str(SP),
           "TINY_ARGS": " ".join(TINY), "EXTRA_ARGS": " ".join(extra_args), **(env or {})}
    job = slurm.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={out}",
                        "--export=ALL", SBATCH_SCRIPT, LAUNCH_SCRIPT], env=env)
    return job, Path(str(out).replace("%j", str(job)))


def _job_output(path: Path, tail: int = 6000) -> str:
    return C.digest(path.read_text(errors="replace"), tail) if path.exists() else f"(no {path})"


def test_sbatch_two_nodes_matches_torchrun(slurm, reference):
    """sbatch --nodes=2 of the project's batch script completes; losses equal the reference."""
    log = slurm.cluster.workdir / "slurm-run.jsonl"
    job, out = _submit(slurm, "slurm-run", ["--log-json", str(log)])
    info = slurm.wait_job(job, timeout=150)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_job_output(out)}"
    assert info["NodeList"] == "node[1-2]"
    text = out.read_text()
    assert "--rdzv-endpoint node1:" in text and f"sp={SP}" in text, text[:3000]
    assert_same_losses(read_losses(log), reference[SP])


def _wait_for_iteration(log: Path, it: int, timeout: float, job_out: Path) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and max(read_losses(log), default=0) >= it):
        if time.monotonic() > deadline:
            raise TimeoutError(f"iteration {it} not logged after {timeout:.0f} s:\n{_job_output(job_out)}")
        time.sleep(0.05)


@needs_signal_handler
def test_preemption_sigterm_checkpoint_and_resume(slurm, reference):
    """scancel --signal=TERM mid-run: checkpoint + clean exit; resubmitting resumes; losses as uninterrupted."""
    work = slurm.cluster.workdir
    log, ckpt = work / "preempt.jsonl", work / "preempt-ckpt"
    args = ["--log-json", str(log), "--exit-signal-handler"]
    job, out = _submit(slurm, "preempt", args, env={"CHECKPOINT_PATH": str(ckpt)})
    _wait_for_iteration(log, 2, timeout=120, job_out=out)
    # to every process of the job step (torchrun and its ranks on both nodes), as Slurm does
    # before a preemption or at the --signal=TERM@<seconds> warning
    slurm.client(["scancel", "--signal=TERM", str(job)])
    info = slurm.wait_job(job, timeout=90)
    stopped_at = max(read_losses(log))
    assert info["ExitCode"] == "0:0" and info["JobState"] == "COMPLETED", (
        f"the preempted job must end cleanly (if torchrun itself exits 1 on SIGTERM, _launch.sh must keep "
        f"SIGTERM for the ranks: TORCHELASTIC_SIGNALS_TO_HANDLE without SIGTERM + trap '' TERM)\n{info}\n"
        f"{_job_output(out)}")
    assert stopped_at < ITERS, f"the job finished ({stopped_at} iterations) before SIGTERM reached it"
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved == stopped_at, f"checkpoint at {saved}, last logged iteration {stopped_at}"

    before = num_lines(log)
    job2, out2 = _submit(slurm, "preempt-resume", args, env={"CHECKPOINT_PATH": str(ckpt)})
    info2 = slurm.wait_job(job2, timeout=150)
    assert info2["JobState"] == "COMPLETED", f"{info2}\n{_job_output(out2)}"
    assert sorted(read_losses(log, skip_lines=before)) == list(range(saved + 1, ITERS + 1)), _job_output(out2)
    assert_same_losses(read_losses(log), reference[SP])


def test_first_submission_from_a_fresh_clone(slurm, tmp_path):
    """The README's command, from a checkout that has only the repository's files (no outputs
    of earlier runs), as a new user runs it: the job must start and write its log."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=C.REPO, capture_output=True,
                            text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, cannot tell the repository's files: {listed.stderr.strip()}")
    clone = tmp_path / "clone"
    for name in listed.stdout.splitlines():
        src = C.REPO / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    env = {"DRY_RUN": "1", "GPUS_PER_NODE": "2", "PYTHON": str(C.REPO / ".venv/bin/python")}
    job = slurm.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL", SBATCH_SCRIPT,
                        "ds_pretrain_gpt_1.3B_seq_parallel_32k.sh"], env=env, cwd=clone)
    info = slurm.wait_job(job, timeout=60)
    logs = sorted(clone.glob(f"*-{job}.out"))  # '#SBATCH --output=%x-%j.out': the submit directory
    assert info["JobState"] == "COMPLETED" and logs, f"{info}\n{slurm.logs()}"
    assert "world" in logs[0].read_text().lower(), logs[0].read_text()[-3000:]
