"""The command line as users run it: torchrun + pretrain_gpt.py, launch scripts, dry runs, errors."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def _run(cmd, env=None, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small build of the embedded corpus (stdlib sources, 2 MB, 2k-token vocabulary), ~5 s."""
    out = str(tmp_path_factory.mktemp("corpus"))
    proc = _run([PY, "tools/build_corpus.py", "--output-dir", out, "--target-mb", "2", "--vocab-size", "2000",
                 "--stdlib-only"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_invalid_flags_fail_fast_with_the_message():
    start = time.perf_counter()
    proc = _run([PY, "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                 "--seq-length", "64", "--lr", "1e-3", "--train-iters", "2", "--mock-data", "--vocab-size", "100",
                 "--fp16", "--bf16"])
    assert proc.returncode == 2
    assert "pretrain_gpt.py: error: --fp16 and --bf16 are mutually exclusive" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("script, env, needles", [
    ("ds_pretrain_gpt_1.3B_seq_parallel_32k.sh", {"NNODES": "1", "GPUS_PER_NODE": "8"},
     ["data parallel 2 x sequence parallel (Ulysses) 4", "ZeRO stage 1", "global 2 sequences of 32768",
      "tokens per step 65,536", "attention flash-attn | recompute full"]),
    ("ds_pretrain_gpt_30B_seq_parallel_32k.sh", {"NNODES": "4", "GPUS_PER_NODE": "8", "SP": "4", "GLOBAL_BATCH": "8"},
     ["world size 32 (4 node(s) x 8 rank(s)) = data parallel 8 x sequence parallel (Ulysses) 4", "ZeRO stage 3",
      "64 layers, hidden 6144, 64 heads", "params 3.44 GiB"]),
    # the defaults: one node, SP 8 (what fits 8x80GB), one sequence per data-parallel rank
    ("ds_pretrain_gpt_30B_seq_parallel_32k.sh", {"NNODES": "1", "GPUS_PER_NODE": "8"},
     ["world size 8 (1 node(s) x 8 rank(s)) = data parallel 1 x sequence parallel (Ulysses) 8",
      "global 1 sequences of 32768"]),
])
def test_launch_scripts_dry_run(script, env, needles):
    proc = _run(["bash", f"examples_seq_parallel/{script}"], env={"DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("+ ") and "pretrain_gpt.py --dry-run" in out  # the full command is printed first
    for n in needles:
        assert n in out, n


def test_dry_run_reports_invalid_world():
    proc = _run(["bash", "examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh"],
                env={"DRY_RUN": "1", "NNODES": "2", "GPUS_PER_NODE": "8", "GLOBAL_BATCH": "2"})
    assert proc.returncode == 2
    assert "--global-batch-size (2) must be divisible by --micro-batch-size (1) x data-parallel size (4" in proc.stderr
    # without GLOBAL_BATCH the scripts default it from the world size: two nodes validate
    proc = _run(["bash", "examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh"],
                env={"DRY_RUN": "1", "NNODES": "2", "GPUS_PER_NODE": "8"})
    assert proc.returncode == 0 and "global 4 sequences of 32768" in proc.stdout, proc.stderr


def test_slurm_script_dry_run():
    proc = _run(["bash", "examples_seq_parallel/slurm_pretrain_gpt.sbatch", "ds_pretrain_gpt_30B_seq_parallel_32k.sh"],
                env={"DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": ROOT, "MASTER_ADDR": "node0",
                     "GPUS_PER_NODE": "8", "GLOBAL_BATCH": "4"})
    assert proc.returncode == 0, proc.stderr
    assert "world size 16 (2 node(s) x 8 rank(s))" in proc.stdout
    # the batch script's own defaults (its #SBATCH --nodes=2, no GLOBAL_BATCH) validate too
    for script in ("ds_pretrain_gpt_1.3B_seq_parallel_32k.sh", "ds_pretrain_gpt_30B_seq_parallel_32k.sh"):
        proc = _run(["bash", "examples_seq_parallel/slurm_pretrain_gpt.sbatch", script],
                    env={"DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": ROOT, "MASTER_ADDR": "node0"})
        assert proc.returncode == 0, (script, proc.stderr)


@pytest.mark.slow
def test_torchrun_sp2_trains_on_the_corpus(corpus, tmp_path):
    """The real entry point under torchrun: loss falls on the embedded corpus, and the run writes
    iteration lines, timers, TensorBoard events and a DCP checkpoint."""
    out = tmp_path / "run"
    proc = _run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "pretrain_gpt.py",
                 "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "256",
                 "--ds-sequence-parallel-size", "2", "--zero-stage", "3", "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--train-iters", "40", "--lr", "5e-3", "--lr-warmup-iters", "4",
                 "--lr-decay-style", "cosine", "--min-lr", "5e-4", "--hidden-dropout", "0", "--attention-dropout", "0",
                 "--data-path", f"{corpus}/corpus_text_document", "--split", "90,5,5",
                 "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", f"{corpus}/tokenizer.model",
                 "--log-interval", "10", "--eval-interval", "20", "--eval-iters", "2", "--timing-log-level", "1",
                 "--tensorboard-dir", str(out / "tb"), "--log-timers-to-tensorboard",
                 "--save", str(out / "ck"), "--log-json", str(out / "log.jsonl")],
                env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(" iteration")]
    assert len(lines) == 4
    for field in ("consumed samples:", "consumed tokens:", "elapsed time per iteration (ms):", "learning rate:",
                  "global batch size:", "lm loss:", "loss scale:", "grad norm:", "number of skipped iterations:",
                  "tokens per second:", "TFLOP/s per rank:", "peak memory"):
        assert field in lines[-1], field
    assert "all-to-all:" in proc.stdout and "forward:" in proc.stdout and "optimizer:" in proc.stdout
    events = [json.loads(x) for x in open(out / "log.jsonl")]
    valid = [e["lm_loss"] for e in events if e["event"] == "valid"]
    assert len(valid) == 3 and valid[-1] < valid[0] - 1.0, valid
    assert any(e["event"] == "test" for e in events)
    assert glob.glob(str(out / "tb" / "events.out.tfevents.*"))
    assert (out / "ck" / "latest_checkpointed_iteration.txt").read_text() == "40"
    assert (out / "ck" / "iter_0000040" / ".metadata").exists()


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path):
    """--exit-signal-handler through _launch.sh (as Slurm runs it): SIGTERM to every process of the
    job, as `scancel --signal=TERM` sends it, ends the run with exit 0 and a checkpoint at the
    last logged iteration; the same command again resumes there."""
    import signal

    log, ck = tmp_path / "log.jsonl", tmp_path / "ck"
    model = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 1 "
             "--global-batch-size 1 --train-iters 100000 --lr 1e-3 --eval-iters 0 --log-interval 1 "
             "--ds-sequence-parallel-size 2")
    script = f'MODEL_ARGS=({model}); source examples_seq_parallel/_launch.sh'
    env = {**os.environ, "NNODES": "1", "GPUS_PER_NODE": "2", "MASTER_PORT": "29731", "MOCK_DATA": "1",
           "VOCAB_SIZE": "255", "CHECKPOINT_PATH": str(ck), "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": f"--log-json {log} --exit-signal-handler --seed 3"}

    def iterations():
        if not log.exists():
            return []
        return [json.loads(x)["iteration"] for x in open(log) if '"train"' in x]

    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(iterations()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and every rank, like Slurm
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(iterations())
    assert 3 <= stopped < 100000 and "SIGTERM received" in out
    assert int((ck / "latest_checkpointed_iteration.txt").read_text()) == stopped
    before = len(iterations())
    env["EXTRA_ARGS"] = f"--log-json {log} --seed 3 --exit-interval {stopped + 2}"
    again = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert iterations()[before:] == [stopped + 1, stopped + 2]


def _descendants(pid: int) -> list:
    """Child processes, recursively (torchrun starts each rank in a session of its own)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]
