"""The tiny pretraining job the multi-node tests run, its reference, and loss comparison.

The reference is the same flags on ONE host with the same world size: the session's pool
of 4 gloo ranks on loopback (tests/dist_harness.py, already started by the other
multi-rank tests), where `pretrain_gpt.main` reuses the pool's process group. Layout,
seeds and reduction order then match, so fp32 losses must agree to rounding (relative
error < 1e-5). The references of SP 2 and SP 4 are computed together, once per session
(the `reference` fixture), so the two-host, Slurm, preemption and node-failure tests all
compare against the same runs.

Dropout is 0: a resumed run restarts the dropout RNG streams (checkpoints hold no RNG
state yet), so with dropout the curve after a resume would differ from an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _run_on_rank(configs: list[list[str]]) -> None:
    """On every rank of a pool: pretrain_gpt.main for each flag set (the pool's process group is reused)."""
    import pretrain_gpt

    for argv in configs:
        code = pretrain_gpt.main(argv)
        assert code == 0, f"pretrain_gpt.main returned {code} for {' '.join(argv)}"


def reference_losses(ranks, workdir: Path) -> dict[int, dict[int, float]]:
    """{sp: {iteration: loss}}: the same job on one host with 4 ranks, every SP case."""
    logs = {s: Path(workdir) / f"reference-sp{s}.jsonl" for s in SP_CASES}
    ranks(4, _run_on_rank, [[*TINY, "--ds-sequence-parallel-size", str(s), "--log-json", str(logs[s])]
                            for s in SP_CASES])
    out = {}
    for s in SP_CASES:
        out[s] = read_losses(logs[s])
        assert sorted(out[s]) == list(range(1, ITERS + 1)), f"reference SP {s}: {sorted(out[s])}"
    return out
