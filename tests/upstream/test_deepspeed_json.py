"""`--deepspeed --deepspeed_config X` means what it means upstream: DeepSpeed's engine rules clipping and fp16
loss scaling (Megatron's flags for them are ignored, with a note), Megatron's flags rule the batch."""

from __future__ import annotations

import json

import pytest

from megatron.arguments import parse_args
from megatron.config import ConfigError
from megatron.deepspeed_json import deepspeed_loss_scaling

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 "
        "--train-iters 10 --mock-data --vocab-size 100").split()


@pytest.fixture
def ds(tmp_path):
    def write(obj) -> str:
        path = tmp_path / f"ds{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(obj))
        return str(path)
    return write


def cfg(extra, world=1):
    return parse_args(BASE + extra.split(), world_size=world, padded_vocab_size=128)


@pytest.mark.parametrize("fp16, stage, expected", [
    # (loss_scale, initial, window, hysteresis, min)
    ({"enabled": True}, 0, (None, 2 ** 16, 1000, 1, 1)),  # fp16 optimizer: 2^16, no hysteresis
    ({"enabled": True}, 2, (None, 2 ** 32, 1000, 1, 1)),  # ZeRO's scaler with its own defaults
    ({"enabled": True, "loss_scale_window": 500}, 1, (None, 2 ** 16, 500, 2, 1)),
    ({"enabled": True, "initial_scale_power": 12}, 2, (None, 2 ** 12, 1000, 2, 1)),
    ({"enabled": True, "initial_scale_power": 12, "hysteresis": 4}, 0, (None, 2 ** 12, 1000, 1, 1)),
    ({"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
      "initial_scale_power": 11}, 3, (None, 2 ** 11, 500, 2, 1)),  # the sequence_parallel examples' template
    ({"enabled": True, "loss_scale": 128}, 1, (128.0,)),
])
def test_loss_scaling_as_deepspeed_builds_it(fp16, stage, expected):
    s = deepspeed_loss_scaling(fp16, stage)
    got = (s["loss_scale"], s["initial_loss_scale"], s["loss_scale_window"], s["hysteresis"], s["min_loss_scale"])
    assert got[:len(expected)] == expected


def test_megatron_loss_scale_flags_are_ignored_under_deepspeed(ds):
    path = ds({"fp16": {"enabled": True, "initial_scale_power": 12}, "zero_optimization": {"stage": 2}})
    c = cfg(f"--deepspeed --deepspeed_config {path} --fp16 --loss-scale 12 --hysteresis 3")
    o = c.optim
    assert o.fp16 and o.loss_scale is None and o.initial_loss_scale == 2.0 ** 12 and o.hysteresis == 2
    notes = "\n".join(c.notes)
    assert "--loss-scale 12.0, --hysteresis 3: ignored under --deepspeed" in notes
    assert "fp16 dynamic loss scaling from 2^12" in notes
    # without --deepspeed the JSON is one more source of settings and the flag stays (static scale 12)
    assert cfg(f"--deepspeed_config {path} --fp16 --loss-scale 12").optim.loss_scale == 12.0


def test_fp16_json_without_initial_scale_power_starts_at_2_16(ds):
    path = ds({"fp16": {"enabled": True, "loss_scale": 0, "hysteresis": 2}, "zero_optimization": {"stage": 1}})
    assert cfg(f"--deepspeed --deepspeed_config {path}").optim.initial_loss_scale == 2.0 ** 16
    # no zero_optimization section: DeepSpeed's engine runs stage 0 (its fp16 optimizer), whatever --zero-stage says
    bare = ds({"fp16": {"enabled": True}})
    o = cfg(f"--deepspeed --deepspeed_config {bare} --zero-stage 1").optim
    assert (o.initial_loss_scale, o.hysteresis) == (2.0 ** 16, 1)


def test_fp16_flag_without_fp16_section_is_noted(ds):
    path = ds({"train_batch_size": 1})
    c = cfg(f"--deepspeed --deepspeed_config {path} --fp16")
    assert c.optim.fp16 and any("would scale no losses" in n for n in c.notes)


def test_clipping_follows_the_json(ds):
    no_key = ds({"train_batch_size": 1})
    c = cfg(f"--deepspeed --deepspeed_config {no_key} --clip-grad 1.0")
    assert c.optim.clip_grad == 0.0  # DeepSpeed does not clip without gradient_clipping
    notes = "\n".join(c.notes)
    assert "--clip-grad 1.0: ignored under --deepspeed" in notes and "gradients are not clipped" in notes
    assert cfg(f"--deepspeed --deepspeed_config {no_key}").optim.clip_grad == 0.0
    clip = ds({"gradient_clipping": 0.5})
    c = cfg(f"--deepspeed --deepspeed_config {clip} --clip-grad 1.0")
    assert c.optim.clip_grad == 0.5 and any("clipped at global norm 0.5" in n for n in c.notes)
    # without --deepspeed a disagreement is still an error, and no JSON key keeps the flag
    with pytest.raises(ConfigError, match="--clip-grad 1.0 conflicts with 0.5"):
        cfg(f"--deepspeed_config {clip} --clip-grad 1.0")
    assert cfg(f"--deepspeed_config {no_key} --global-batch-size 1").optim.clip_grad == 1.0


def test_megatron_batch_flags_rule_under_deepspeed(ds):
    path = ds({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    c = cfg(f"--deepspeed --deepspeed_config {path} --micro-batch-size 4 --global-batch-size 1024", world=8)
    assert (c.train.micro_batch_size, c.train.global_batch_size, c.num_micro_batches) == (4, 1024, 32)
    notes = "\n".join(c.notes)
    assert "train_batch_size 64 ignored under --deepspeed: the global batch is 1024 (--global-batch-size)" in notes
    assert "gradient_accumulation_steps 2 ignored" in notes
    # no --global-batch-size: micro x data parallel, as upstream (the JSON's train_batch_size does not count)
    c = cfg(f"--deepspeed --deepspeed_config {path}", world=8)
    assert (c.train.micro_batch_size, c.train.global_batch_size) == (4, 32)
    assert any("--micro-batch-size x data-parallel size = 4 x 8" in n for n in c.notes)


def test_zero_stage_and_precision_still_agree_under_deepspeed(ds):
    path = ds({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}})
    assert "--zero-stage 3 conflicts with 1" in _error(f"--deepspeed --deepspeed_config {path} --zero-stage 3")
    c = cfg(f"--deepspeed --deepspeed_config {path}")
    assert c.parallel.zero_stage == 1 and c.optim.bf16


def test_unused_json_keys_are_listed(ds):
    path = ds({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "steps_per_print": 10,
               "fp16": {"enabled": True, "consecutive_hysteresis": True}})
    notes = "\n".join(cfg(f"--deepspeed --deepspeed_config {path}").notes)
    for key in ("'zero_optimization.offload_param' ignored", "'steps_per_print' ignored",
                "'fp16.consecutive_hysteresis' ignored"):
        assert key in notes, key


def _error(extra) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(extra)
    return str(e.value)
