"""--wandb-project / --wandb-exp-name / --wandb-save-dir: real Weights & Biases logging, as upstream's flags mean.

The calls are checked against a recording stand-in (exact arguments), then once against the real package
in offline mode (WANDB_MODE=offline: nothing leaves the machine), where the run file must hold our metrics.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import types

import pytest

from megatron.arguments import parse_args
from megatron.config import ConfigError, LogConfig
from megatron.training.metrics import RunLogger

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 "
        "--train-iters 10 --mock-data --vocab-size 100").split()


def _stats(it: int) -> dict:
    return {"lm_loss": 5.0 - it, "grad_norm": 1.5, "lr": 1e-3, "loss_scale": 1.0, "skipped": False, "skipped_iters": 0,
            "consumed_samples": 8 * it, "consumed_tokens": 512 * it, "global_batch_size": 8, "elapsed_ms": 10.0,
            "tokens_per_sec": 5e4, "tflops_per_rank": 0.1, "peak_memory_bytes": 2**20}


class _Recorder:
    """Stands in for the wandb module and its Run: records calls with their arguments."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    module = types.ModuleType("wandb")
    module.init = rec.init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return rec


def test_flags_reach_the_log_config(monkeypatch, tmp_path):
    monkeypatch.setattr("megatron.arguments._has_module", lambda name: True)
    c = parse_args(BASE + ["--wandb-project", "pretrain-llama2", "--wandb-exp-name", "exp0",
                           "--save", str(tmp_path / "ckpt")], world_size=1, padded_vocab_size=128)
    log = c.log
    assert (log.wandb_project, log.wandb_exp_name) == ("pretrain-llama2", "exp0")
    assert log.wandb_save_dir == str(tmp_path / "ckpt" / "wandb")  # upstream's default: <save>/wandb
    config = dict(log.wandb_config)
    assert config["hidden_size"] == 64 and config["wandb_project"] == "pretrain-llama2"
    assert parse_args(BASE, world_size=1, padded_vocab_size=128).log.wandb_project == ""  # off by default


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("megatron.arguments._has_module", lambda name: name != "wandb")
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--wandb-project", "p"], world_size=1, padded_vocab_size=128)
    assert "--wandb-project" in str(e.value) and "pip install wandb" in str(e.value)
    # a dry run on a login node does not need the package
    assert parse_args(BASE + ["--wandb-project", "p"], world_size=1, padded_vocab_size=128,
                      check_environment=False).log.wandb_project == "p"


def test_run_logger_calls(recorder, tmp_path):
    cfg = LogConfig(log_interval=1, wandb_project="proj", wandb_exp_name="exp0",
                    wandb_save_dir=str(tmp_path / "wb"), wandb_config=(("lr", 0.001), ("seed", 1)))
    logger = RunLogger(cfg, train_iters=2, enabled=True, stream=open(os.devnull, "w"))  # noqa: SIM115
    logger.iteration(1, _stats(1))
    logger.iteration(2, _stats(2))
    logger.evaluation("valid", 2, 3.0, 16, 1024)
    logger.close()
    calls = recorder.calls
    assert calls[0] == ("init", {"project": "proj", "name": "exp0", "config": {"lr": 0.001, "seed": 1},
                                 "dir": str(tmp_path / "wb")})
    assert os.path.isdir(tmp_path / "wb")
    assert ("log", {"lm loss": 4.0}, 1) in calls and ("log", {"lm loss": 3.0}, 2) in calls
    assert ("log", {"learning-rate": 1e-3}, 2) in calls
    # "vs samples" series: their own axis, logged at the current iteration (W&B steps never go back)
    assert ("define_metric", "lm loss vs samples", "samples") in calls
    assert ("log", {"lm loss vs samples": 3.0, "samples": 16}, 2) in calls
    assert ("log", {"lm loss validation": 3.0}, 2) in calls
    steps = [c[2] for c in calls if c[0] == "log"]
    assert steps == sorted(steps)
    assert calls[-1] == ("finish",)


def test_disabled_ranks_do_not_start_a_run(recorder):
    cfg = LogConfig(wandb_project="proj")
    RunLogger(cfg, train_iters=1, enabled=False).close()
    assert recorder.calls == []


def _flush_wandb() -> None:
    """finish() hands the records to wandb's background service, which writes the run file on its own time
    (at process exit in a real run); shutting the service down makes the file complete before it is read."""
    import wandb

    wandb.teardown()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_real_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb's own files (settings, cache) stay in the test dir
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    save_dir = tmp_path / "wandb-save"
    cfg = LogConfig(log_interval=1, wandb_project="pretrain-llama2", wandb_exp_name="exp0",
                    wandb_save_dir=str(save_dir), wandb_config=(("hidden_size", 64),))
    logger = RunLogger(cfg, train_iters=2, enabled=True, stream=open(os.devnull, "w"))  # noqa: SIM115
    for it in (1, 2):
        logger.iteration(it, _stats(it))
    logger.close()
    _flush_wandb()
    runs = glob.glob(str(save_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(save_dir)
    with open(runs[0], "rb") as f:
        data = f.read()
    for needle in (b"exp0", b"pretrain-llama2", b"lm loss", b"lm loss vs samples", b"hidden_size"):
        assert needle in data, needle


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_pretrain_gpt_logs_to_wandb_offline(tmp_path, monkeypatch):
    """The flags reach the training loop: a 2-iteration run writes its losses and flags to an offline W&B run."""
    import pretrain_gpt

    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path)),
                       ("WANDB_CACHE_DIR", str(tmp_path / "cache")), ("WANDB_CONFIG_DIR", str(tmp_path / "config"))):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --lr 1e-3 --train-iters 2 "
            "--mock-data --vocab-size 100 --log-interval 1 --eval-iters 0 --wandb-project pretrain-llama2 "
            f"--wandb-exp-name exp0 --wandb-save-dir {tmp_path / 'wb'}").split()
    assert pretrain_gpt.main(argv) == 0
    _flush_wandb()
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    with open(runs[0], "rb") as f:
        data = f.read()
    for needle in (b"exp0", b"lm loss", b"learning-rate", b"hidden_size", b"train_iters"):
        assert needle in data, needle
