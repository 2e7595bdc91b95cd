"""Missing, damaged and mismatched checkpoints fail with messages that name the path and the fix.

In one process without a process group (load_checkpoint works there, as the conversion tools
need). The checkpoint is the tracker + iter directory layout that `--save` writes, made by the
conversion tools' writer. Runtime ~2 s.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron.arguments import parse_args
from megatron.checkpoint import TRACKER, CheckpointError, checkpoint_dir, load_checkpoint
from megatron.config import ConfigError
from megatron.model import GPTModel
from tests.conversion.tiny import tiny_config
from tools.checkpoint.convert_to_torch import save_dcp_checkpoint

QUIET = {"log": lambda *_: None}


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_config("llama"))
    root = str(tmp_path / "ck")
    save_dcp_checkpoint(root, model.state_dict(), model.config, iteration=3)
    return root, model


def test_load_flag_must_exist_unless_it_is_the_save_directory(tmp_path):
    argv = "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 99 " \
           "--micro-batch-size 1 --global-batch-size 1 --train-iters 1 --lr 1e-3".split()
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"--load {missing}: no such directory"):
        parse_args(argv + ["--load", missing], world_size=1)
    assert parse_args(argv + ["--load", missing, "--save", missing], world_size=1).checkpoint.load == missing
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(missing, GPTModel(tiny_config("llama")), None, **QUIET)
    os.makedirs(missing)  # an empty directory: a first run, nothing to load
    assert load_checkpoint(missing, GPTModel(tiny_config("llama")), None, **QUIET).counters is None


def test_loads_weights_and_ignores_unfinished_saves(ckpt):
    root, model = ckpt
    os.makedirs(os.path.join(root, "iter_0000009.tmp"))  # a save killed before its rename
    other = GPTModel(tiny_config("llama"))
    loaded = load_checkpoint(root, other, None, load_optim=False, **QUIET)
    assert loaded == (3, 0) and loaded.path == checkpoint_dir(root, 3)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    # killed between moving the old directory aside and renaming the new one into place
    os.rename(checkpoint_dir(root, 3), checkpoint_dir(root, 3) + ".old")
    assert load_checkpoint(root, other, None, finetune=True, **QUIET).counters["iteration"] == 0


def test_missing_optimizer_state_is_explained(ckpt):
    root, model = ckpt
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="no optimizer state.*--no-load-optim or --finetune"):
        load_checkpoint(root, model, opt, **QUIET)


def test_tracker_naming_a_missing_or_damaged_iteration(ckpt):
    root, model = ckpt
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("5")
    with pytest.raises(CheckpointError, match=r"iter_0000005 is missing.*complete iteration directories here: 3"):
        load_checkpoint(root, model, None, load_optim=False, **QUIET)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("oops")
    with pytest.raises(CheckpointError, match="must hold an iteration number"):
        load_checkpoint(root, model, None, load_optim=False, **QUIET)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("3")
    with open(os.path.join(checkpoint_dir(root, 3), ".metadata"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match=r"iter_0000003/.metadata cannot be read.*damaged"):
        load_checkpoint(root, model, None, load_optim=False, **QUIET)


def test_shape_mismatch_names_every_parameter(ckpt):
    root, _ = ckpt
    wider = GPTModel(tiny_config("llama", ffn_hidden_size=128))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(root, wider, None, load_optim=False, **QUIET)
    lines = [x for x in str(err.value).splitlines() if "checkpoint (" in x]
    assert len(lines) == 2 * 2, str(err.value)  # fc1 and fc2 of both layers
    assert any("(192, 64) vs flags (256, 64)" in x for x in lines), str(err.value)
    deeper = GPTModel(tiny_config("llama", num_layers=3))
    with pytest.raises(CheckpointError, match="layers.2.*absent from the checkpoint"):
        load_checkpoint(root, deeper, None, load_optim=False, **QUIET)
