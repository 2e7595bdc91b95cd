"""A checkpoint saved at one (world size, SP, DP, ZeRO stage) trains on at any other.

Each source run A saves at iteration 2 and goes on to 4; each target run B loads A's
iteration 2 under another layout and trains iterations 3 and 4, whose losses must match
A's (rel. err. < 1e-5, fp32, dropout 0). Iteration 3's loss checks the weights, iteration
4's the optimizer state. --finetune is checked through the validation loss at B's
iteration 0, which must equal A's at iteration 2. Runtime ~25 s on 2 cores (pools of
1, 2 and 4 ranks, shared with tests/training).
"""

from __future__ import annotations

import json

import pytest

COMMON = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 250 "
          "--micro-batch-size 1 --global-batch-size 4 --train-iters 4 --lr 3e-3 --lr-warmup-iters 1 "
          "--lr-decay-iters 4 --lr-decay-style cosine --hidden-dropout 0 --attention-dropout 0 --eval-iters 1 "
          "--eval-interval 2 --log-interval 100 --seed 3").split()
SOURCES = {"sp2_z0": "--ds-sequence-parallel-size 2 --zero-stage 0",
           "sp2_z3": "--ds-sequence-parallel-size 2 --zero-stage 3"}
# (target world size, target flags, source); ZeRO-1 saving is covered by test_resume.py
TARGETS = {
    "sp2->sp1": (1, "--ds-sequence-parallel-size 1 --zero-stage 0", "sp2_z0"),
    "z3->z0": (2, "--ds-sequence-parallel-size 2 --zero-stage 0", "sp2_z3"),
    "sp2->sp4,z0->z3": (4, "--ds-sequence-parallel-size 4 --zero-stage 3", "sp2_z0"),
    "dp1->dp2,z3->z1": (4, "--ds-sequence-parallel-size 2 --zero-stage 1", "sp2_z3"),
}


def _run(runs: list) -> None:
    import pretrain_gpt

    for argv in runs:
        assert pretrain_gpt.main(argv) == 0, argv


def _events(path, event):
    return [e for e in map(json.loads, open(path)) if e["event"] == event]


def test_checkpoints_reshard_across_layouts(ranks, tmp_path):
    src = {name: (str(tmp_path / name), str(tmp_path / f"{name}.jsonl")) for name in SOURCES}
    ranks(2, _run, [COMMON + SOURCES[n].split() + ["--save", d, "--save-interval", "2", "--log-json", log]
                    for n, (d, log) in src.items()])
    for d, _ in src.values():  # roll back to iteration 2 (iteration 4 stays on disk, unused)
        (tmp_path / d / "latest_checkpointed_iteration.txt").write_text("2")
    plan: dict[int, list] = {1: [], 2: [], 4: []}
    for name, (world, flags, source) in TARGETS.items():
        plan[world].append(COMMON + flags.split() + ["--load", src[source][0], "--log-json",
                                                      str(tmp_path / f"{name}.jsonl")])
    plan[1].append(COMMON + ["--ds-sequence-parallel-size", "1", "--finetune", "--train-iters", "1", "--load",
                             src["sp2_z3"][0], "--log-json", str(tmp_path / "finetune.jsonl")])
    for world, runs in plan.items():
        ranks(world, _run, runs)
    for name, (_world, _flags, source) in TARGETS.items():
        ref = _events(src[source][1], "train")
        got = _events(tmp_path / f"{name}.jsonl", "train")
        assert [e["iteration"] for e in got] == [3, 4], name
        for a, b in zip(got, ref[2:]):
            assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), f"{name}: iteration {a['iteration']}"
    valid_at_2 = [e for e in _events(src["sp2_z3"][1], "valid") if e["iteration"] == 2][0]["lm_loss"]
    fine = _events(tmp_path / "finetune.jsonl", "valid")
    assert fine[0]["iteration"] == 0 and fine[0]["lm_loss"] == pytest.approx(valid_at_2, rel=1e-5)
    assert _events(tmp_path / "finetune.jsonl", "train")[0]["iteration"] == 1
