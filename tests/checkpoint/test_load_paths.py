"""What `--load` may name, on one process (no process group): a --save root, one iteration
directory, and the paths that must fail instead of silently training from scratch. ~1 s."""

from __future__ import annotations

import os

import pytest
import torch

from megatron.checkpoint import TRACKER, CheckpointError, checkpoint_dir, load_checkpoint
from megatron.checkpoint.format import resolve_load
from megatron.model import GPTModel
from tests.conversion.tiny import tiny_config
from tools.checkpoint.convert_to_torch import save_dcp_checkpoint

QUIET = {"log": lambda *_: None}


@pytest.fixture
def root(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_config("gpt3"))
    for it in (2, 4):
        save_dcp_checkpoint(str(tmp_path / "ck"), model.state_dict(), model.config, iteration=it)
    return tmp_path / "ck"


def test_iteration_directory_and_missing_tracker(root):
    t = resolve_load(str(root / "iter_0000002"))
    assert (t.iteration, t.path, t.root) == (2, checkpoint_dir(str(root), 2), str(root))
    assert load_checkpoint(str(root / "iter_0000002"), GPTModel(tiny_config("gpt3")), **QUIET) == (2, 0)
    (root / TRACKER).unlink()
    t = resolve_load(str(root))
    assert t.iteration == 4 and "is missing: loading the newest complete checkpoint, iteration 4" in t.note
    assert sorted(os.listdir(root / "iter_0000004")) == [".metadata", "__0_0.distcp", "checksums.json", "config.json"]


def test_paths_that_are_not_checkpoints_fail(root, tmp_path):
    os.rename(root / "iter_0000004", root / "iter_0000004.tmp")
    with pytest.raises(CheckpointError, match="is a save that never finished"):
        resolve_load(str(root / "iter_0000004.tmp"))
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; --load takes"):
        resolve_load(str(tmp_path / "model.pt"))
    other = tmp_path / "hf"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds no checkpoint .* but other files \(config.json\)"):
        resolve_load(str(other))
    fresh = tmp_path / "fresh"  # a --save directory whose only save was killed: start from scratch
    (fresh / "iter_0000001.tmp").mkdir(parents=True)
    (fresh / ".shared-check-0").mkdir()
    assert resolve_load(str(fresh)) is None
