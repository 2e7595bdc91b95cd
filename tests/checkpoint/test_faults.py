"""Checkpoints under faults, with real 2-rank (gloo) saves and loads through pretrain_gpt.main.

Data loss first: `--load DIR/iter_N` loads that iteration; a missing tracker loads the
newest complete checkpoint; a run never overwrites checkpoints it did not start from
(without --overwrite-checkpoints). Then damage: an unreadable index, a truncated or
missing shard, flipped bits (crc32) each fail before the model is built, naming the file
and the newest complete checkpoint; --load-fallback resumes from it, bitwise on the
uninterrupted curve. A full disk keeps the previous checkpoint and the tracker. RNG
states on another layout, a --save directory not shared by all ranks, a checkpoint of
another model shape. Runtime ~25 s on 2 cores (the session's 2-rank pool).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess

import pytest

from megatron.checkpoint import TRACKER, CheckpointError, checkpoint_dir
from megatron.config import UserError

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 250 "
        "--micro-batch-size 1 --global-batch-size 2 --lr 1e-3 --lr-warmup-iters 1 --lr-decay-iters 8 "
        "--lr-decay-style cosine --eval-iters 0 --log-interval 100 --seed 4 --hidden-dropout 0.1 "
        "--attention-dropout 0.1").split()
SP2 = ["--ds-sequence-parallel-size", "2"]


def _main(argv: list, boom_if_built: bool = False) -> dict:
    """pretrain on this rank: {"error": CheckpointError text or None, "out": what rank 0 printed}."""
    from megatron.arguments import parse_args
    from megatron.training import pretrain

    def refuse(cfg, ps):
        raise AssertionError("the model was built although the checkpoint had to be refused first")

    out, err = io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            pretrain(parse_args(argv), model_provider=refuse if boom_if_built else None)
        except CheckpointError as e:
            err = str(e)
    return {"error": err, "out": out.getvalue()}


def _runs(runs: list) -> list:
    return [_main(argv, **kw) for argv, kw in runs]


def _train(path) -> list[float]:
    return [e["lm_loss"] for e in map(json.loads, open(path)) if e["event"] == "train"]


def _one(results: list, i: int) -> dict:
    """Run i's outcome, which every rank must agree on."""
    errors = {r[i]["error"] for r in results}
    assert len(errors) == 1, errors
    return {"error": errors.pop(), "out": results[0][i]["out"]}


@pytest.fixture(scope="module")
def source(ranks, tmp_path_factory):
    """One straight run of 8 iterations saving 2, 4, 6, 8 (the reference curve and the checkpoints)."""
    tmp = tmp_path_factory.mktemp("faults")
    ck, log = tmp / "ck", tmp / "full.jsonl"
    ranks(2, _runs, [(BASE + SP2 + ["--train-iters", "8", "--save", str(ck), "--save-interval", "2",
                                    "--log-json", str(log)], {})])
    return tmp, ck, _train(log)


def _copy(ck, dest):
    shutil.copytree(ck, dest)
    return dest


def test_data_loss_cases(ranks, source, tmp_path):
    _, ck, full = source
    a, b, c = _copy(ck, tmp_path / "a"), _copy(ck, tmp_path / "b"), _copy(ck, tmp_path / "c")
    (b / TRACKER).unlink()
    (b / "iter_0000008" / ".metadata").unlink()  # an incomplete newest directory is skipped too
    before = {p: os.stat(p).st_mtime_ns for p in (a / "iter_0000004" / "checksums.json",
                                                  a / "iter_0000008" / "checksums.json")}
    runs = [
        # one iteration directory named directly: loads 2 and trains 3, 4 on the straight curve
        (BASE + SP2 + ["--train-iters", "4", "--load", str(a / "iter_0000002"), "--log-json",
                       str(tmp_path / "named.jsonl")], {}),
        # the tracker is gone: the newest complete checkpoint (6) with a note
        (BASE + SP2 + ["--train-iters", "8", "--load", str(b), "--log-json", str(tmp_path / "notracker.jsonl")],
         {}),
        # ... but saving there would overwrite the incomplete iteration 8: only with the flag
        (BASE + SP2 + ["--train-iters", "8", "--load", str(b), "--save", str(b)], {"boom_if_built": True}),
        # a user pointing at one checkpoint with --save on its parent: 4, 6, 8 would be overwritten
        (BASE + SP2 + ["--train-iters", "4", "--load", str(a / "iter_0000002"), "--save", str(a)],
         {"boom_if_built": True}),
        # starting from scratch into a --save directory holding checkpoints
        (BASE + SP2 + ["--train-iters", "2", "--save", str(a)], {"boom_if_built": True}),
        # ... allowed with the flag: the stale newer checkpoints go once the first save is tracked
        (BASE + SP2 + ["--train-iters", "3", "--load", str(c / "iter_0000002"), "--save", str(c),
                       "--overwrite-checkpoints"], {}),
    ]
    results = ranks(2, _runs, runs)
    named, notracker, notracker_save, parent, scratch, overwrite = (_one(results, i) for i in range(6))
    assert named["error"] is None and _train(tmp_path / "named.jsonl") == full[2:4]  # bitwise
    assert notracker["error"] is None, notracker["error"]
    assert f"{TRACKER} is missing: loading the newest complete checkpoint, iteration 6 (skipped incomplete: [8])" \
        in notracker["out"], notracker["out"]
    assert _train(tmp_path / "notracker.jsonl") == full[6:8]
    assert "(iterations 8); this run starts from iteration 6" in notracker_save["error"]
    assert not (b / TRACKER).exists() and sorted(os.listdir(b)) == [f"iter_{i:07d}" for i in (2, 4, 6, 8)]
    for run in (parent, scratch):
        assert "already holds checkpoints this run did not start from (iterations 4, 6, 8)" in run["error"] \
            or "(iterations 2, 4, 6, 8)" in run["error"], run["error"]
        assert "--overwrite-checkpoints" in run["error"]
    assert all(os.stat(p).st_mtime_ns == t for p, t in before.items())  # untouched
    assert (a / TRACKER).read_text() == "8"
    assert overwrite["error"] is None, overwrite["error"]
    assert sorted(d for d in os.listdir(c) if d.startswith("iter_")) == ["iter_0000002", "iter_0000003"]
    assert (c / TRACKER).read_text() == "3"


def _damage(root, how: str) -> str:
    """Damage iteration 8 of `root`; returns the damaged file's name."""
    d = root / "iter_0000008"
    shard = sorted(f for f in os.listdir(d) if f.endswith(".distcp"))[-1]
    if how == "metadata":
        (d / ".metadata").write_bytes(b"garbage")
        return ".metadata"
    if how == "missing":
        (d / shard).unlink()
    elif how == "truncated":
        with open(d / shard, "r+b") as f:
            f.truncate(os.path.getsize(d / shard) // 2)
    elif how == "bitflip":
        with open(d / shard, "r+b") as f:
            f.seek(os.path.getsize(d / shard) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
    return shard


@pytest.mark.parametrize("how, says", [("metadata", "cannot be read"), ("missing", "is missing"),
                                       ("truncated", "is truncated"), ("bitflip", "is corrupt (crc32")])
def test_damaged_checkpoint_is_named_and_fallback_resumes(ranks, source, tmp_path, how, says):
    _, ck, full = source
    root = _copy(ck, tmp_path / "ck")
    file = _damage(root, how)
    log = tmp_path / "fallback.jsonl"
    refused, fell_back = (_one(ranks(2, _runs, [(argv, kw)]), 0) for argv, kw in [
        (BASE + SP2 + ["--train-iters", "10", "--load", str(root), "--save", str(root)], {"boom_if_built": True}),
        (BASE + SP2 + ["--train-iters", "8", "--load", str(root), "--save", str(root), "--load-fallback",
                       "--log-json", str(log)], {})])
    msg = refused["error"]
    assert msg and f"iter_0000008/{file}" in msg and says in msg, msg
    assert f"newest complete checkpoint before it is {checkpoint_dir(str(root), 6)}" in msg, msg
    assert "--load-fallback" in msg
    assert fell_back["error"] is None, fell_back["error"]
    assert "WARNING" in fell_back["out"] and "--load-fallback: loading the newest complete checkpoint" in \
        fell_back["out"]
    assert _train(log) == full[6:8]  # resumed from 6, bitwise
    assert (root / "iter_0000008.damaged").is_dir() and (root / TRACKER).read_text() == "8"


def _mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill_disk_at(iteration: int | None, argv: list) -> dict:
    """Without a small file system to fill: rank 1's shard write fails with ENOSPC at `iteration`."""
    import errno

    from megatron.checkpoint import storage

    original = storage._dcp_writer

    def writer(path):
        w = original(path)
        if iteration is not None and path.endswith(f"iter_{iteration:07d}.tmp"):
            import torch.distributed as dist
            base_write = w.write_data

            def write_data(plan, planner):
                if dist.get_rank() == 1:
                    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "__1_0.distcp"))
                return base_write(plan, planner)
            w.write_data = write_data
        return w

    storage._dcp_writer = writer
    try:
        return _main(argv)
    finally:
        storage._dcp_writer = original


def test_disk_full_keeps_the_previous_checkpoint(ranks, tmp_path):
    disk = tmp_path / "disk"
    real = _mount_tmpfs(disk, "2300k")  # the checkpoint of iteration 2 fits (~1.5 MB), a second one does not
    try:
        ck = disk / "ck"
        argv = BASE + SP2 + ["--train-iters", "6", "--save", str(ck), "--save-interval", "2"]
        full = _one([[r] for r in ranks(2, _fill_disk_at, None if real else 4, argv)], 0)
        msg = full["error"]
        assert msg and msg.startswith(f"no space left on {ck}") and "iteration 4" in msg, msg
        assert "the tracker still names iteration 2" in msg and "which is intact" in msg, msg
        assert (ck / TRACKER).read_text() == "2"
        assert sorted(os.listdir(ck)) == ["iter_0000002", TRACKER]  # the unfinished .tmp is gone
        (ck / "iter_0000002" / "unrelated").touch()
        resumed = _one(ranks(2, _runs, [(BASE + SP2 + ["--train-iters", "3", "--load", str(ck)], {})]), 0)
        assert resumed["error"] is None and "loaded checkpoint" in resumed["out"]
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)


def _shared_check(roots: list) -> str | None:
    import torch.distributed as dist

    from megatron.checkpoint.manager import CheckpointManager
    from megatron.config import CheckpointConfig

    root = roots[dist.get_rank()]
    try:
        CheckpointManager(CheckpointConfig(save=root), log=lambda *_: None).prepare()
    except CheckpointError as e:
        return str(e)
    return None


def test_save_directory_must_be_shared_by_all_ranks(ranks, tmp_path):
    # two nodes that see different directories under one path: rank 1's marker lands elsewhere
    node_local = ranks(2, _shared_check, [str(tmp_path / "node0"), str(tmp_path / "node1")])
    assert node_local[0] == node_local[1] and "is not one directory shared by all ranks" in node_local[0]
    assert "ranks [1]" in node_local[0]
    assert ranks(2, _shared_check, [str(tmp_path / "shared")] * 2) == [None, None]
    assert os.listdir(tmp_path / "shared") == [] and os.listdir(tmp_path / "node1") == []


def test_other_model_refused_before_building_and_rng_needs_the_same_layout(ranks, source, tmp_path):
    _, ck, _ = source
    wider = BASE + SP2 + ["--train-iters", "9", "--load", str(ck)]
    wider[wider.index("--hidden-size") + 1] = "128"
    layout = BASE + ["--ds-sequence-parallel-size", "1", "--train-iters", "9", "--load", str(ck)]
    shape, dp2 = (_one(ranks(2, _runs, [(argv, kw)]), 0) for argv, kw in [(wider, {"boom_if_built": True}),
                                                                           (layout, {})])
    assert shape["error"] and "hidden_size: checkpoint 64, flags 128 (--hidden-size)" in shape["error"]
    assert dp2["error"] is None
    assert "RNG not restored: saved with layout world_size=2 sp=2 dp=1 ring=1, running with world_size=2 sp=1 " \
           "dp=2 ring=1" in dp2["out"], dp2["out"]


def test_checkpoint_errors_are_user_errors():
    from megatron.checkpoint.hf import ConversionError
    from megatron.config import ConfigError

    assert issubclass(CheckpointError, UserError) and issubclass(ConfigError, UserError)
    assert issubclass(ConversionError, CheckpointError) and issubclass(ConversionError, ValueError)
