"""The tiny pretraining job the multi-node tests run, its reference, and loss comparison.

The reference is the same flags on ONE host with the same world size (4 ranks, torchrun
--standalone on node1's loopback): layout, seeds and reduction order then match, so fp32
losses must agree to rounding (relative error < 1e-5). The references of SP 2 and SP 4
are computed together in one torchrun job, once per session, so the two-host, Slurm,
preemption and node-failure tests all compare against the same runs.

Dropout is 0: a resumed run restarts the dropout RNG streams (checkpoints hold no RNG
state yet), so with dropout the curve after a resume would differ from an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.multinode import cluster as C

ITERS = 16  # enough that a SIGTERM sent after iteration 2 lands before the end
SP_CASES = (2, 4)
# 2 layers, hidden 64, 4 heads (SP 4 needs heads % 4 == 0), 64 tokens (64 % 4 == 0); mock data.
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--mock-data", "--vocab-size", "256", "--eval-iters", "0", "--log-interval", "1",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--distributed-backend", "gloo", "--seed", "1234",
]
RTOL = 1e-5
_REFERENCE: dict[int, dict[int, float]] = {}


def num_lines(path: Path) -> int:
    return len(Path(path).read_text().splitlines()) if Path(path).exists() else 0


def read_losses(path: Path, skip_lines: int = 0) -> dict[int, float]:
    """{iteration: lm loss} from a --log-json file (later lines win: a resumed run appends);
    `skip_lines` reads only what a later run appended."""
    out = {}
    for line in Path(path).read_text().splitlines()[skip_lines:]:
        ev = json.loads(line)
        if ev.get("event") == "train":
            out[int(ev["iteration"])] = float(ev["lm_loss"])
    return out


def assert_same_losses(got: dict[int, float], want: dict[int, float], rtol: float = RTOL) -> None:
    assert sorted(got) == sorted(want), f"iterations differ: got {sorted(got)}, reference {sorted(want)}"
    bad = {i: (got[i], want[i]) for i in want if abs(got[i] - want[i]) > rtol * abs(want[i])}
    assert not bad, f"losses differ from the single-host reference beyond rel {rtol}: {bad}"


def reference_losses(hosts: C.TwoHosts, sp: int) -> dict[int, float]:
    """Losses of the same job on one host with 4 ranks (all SP cases computed on first use)."""
    if not _REFERENCE:
        tag = "reference"
        logs = {s: hosts.workdir / f"{tag}-sp{s}.jsonl" for s in SP_CASES}
        configs = hosts.workdir / f"{tag}.json"
        configs.write_text(json.dumps([[*TINY, "--ds-sequence-parallel-size", str(s), "--log-json", str(logs[s])]
                                       for s in SP_CASES]))
        node1 = hosts.hosts[0]
        argv = [str(C.REPO / ".venv/bin/python"), "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "4", str(C.REPO / "tests/multinode/run_configs.py"), str(configs)]
        p = node1.popen(argv, hosts.log(tag, node1), env=C.job_env())
        assert C.wait_all([p], timeout=150) == [0], hosts.tail(tag)
        for s in SP_CASES:
            _REFERENCE[s] = read_losses(logs[s])
            assert sorted(_REFERENCE[s]) == list(range(1, ITERS + 1)), hosts.tail(tag)
    return _REFERENCE[sp]
