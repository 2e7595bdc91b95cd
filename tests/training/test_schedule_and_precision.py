"""Learning-rate values checked by hand, and the fp16 loss scaler's skip/recover rules."""

import math

import pytest
import torch

from megatron.config import OptimConfig
from megatron.training.lr_schedule import LRSchedule
from megatron.training.precision import ConstantLossScaler, DynamicLossScaler, build_loss_scaler, unscale_


def test_linear_warmup_then_cosine():
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14, style="cosine")
    assert [s(k) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(5) == 1.0  # first decay step: nothing decayed yet
    # step 10 has 9 steps behind it: ratio (9 - 4) / (14 - 4) = 0.5 -> halfway between max and min
    assert s(10) == pytest.approx(0.1 + 0.5 * 0.9)
    # step 8: ratio (7 - 4) / 10 = 0.3 -> 0.1 + 0.9 * 0.5 * (cos(0.3 pi) + 1) = 0.8145...
    assert s(8) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(0.3 * math.pi) + 1))
    assert s(8) == pytest.approx(0.814503, abs=1e-6)
    assert s(15) == 0.1 and s(100) == 0.1


def test_linear_and_constant_and_inverse_sqrt():
    lin = LRSchedule(1.0, 0.0, 0, 4, "linear")
    assert [lin(k) for k in range(1, 7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    const = LRSchedule(2.0, 0.0, 2, 4, "constant")
    assert [const(k) for k in range(1, 6)] == [1.0, 2.0, 2.0, 2.0, 2.0]
    isq = LRSchedule(1.0, 0.01, 4, 100, "inverse-square-root")
    assert isq(4) == 1.0 and isq(5) == 1.0 and isq(17) == pytest.approx(0.5)


def test_schedule_sets_param_groups():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=9.0)
    assert LRSchedule(1.0, 0.0, 2, 10).apply(opt, 1) == 0.5
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_dynamic_loss_scaler_hysteresis_backoff_and_growth():
    s = DynamicLossScaler(initial_scale=2.0 ** 10, min_scale=1.0, growth_interval=3, hysteresis=2)
    s.update(True)  # first overflow is absorbed by hysteresis
    assert s.scale == 2.0 ** 10
    s.update(True)  # second consecutive overflow halves
    assert s.scale == 2.0 ** 9
    s.update(True)  # hysteresis is spent: every further overflow halves
    assert s.scale == 2.0 ** 8
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0 ** 8
    s.update(False)  # third clean step in a row grows and restores hysteresis
    assert s.scale == 2.0 ** 9
    s.update(True)
    assert s.scale == 2.0 ** 9
    tiny = DynamicLossScaler(initial_scale=2.0, min_scale=1.0, hysteresis=1)
    for _ in range(5):
        tiny.update(True)
    assert tiny.scale == 1.0  # never below --min-loss-scale
    restored = DynamicLossScaler()
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def test_build_loss_scaler_modes():
    assert type(build_loss_scaler(OptimConfig())) is ConstantLossScaler
    assert build_loss_scaler(OptimConfig(bf16=True)).scale == 1.0
    assert build_loss_scaler(OptimConfig(fp16=True, loss_scale=128.0)).scale == 128.0
    dyn = build_loss_scaler(OptimConfig(fp16=True, initial_loss_scale=2.0 ** 16, hysteresis=1, loss_scale_window=7))
    assert isinstance(dyn, DynamicLossScaler) and dyn.scale == 2.0 ** 16 and dyn.growth_interval == 7


def test_unscale():
    g = [torch.full((3,), 8.0), torch.full((2, 2), 4.0)]
    unscale_(g, 4.0)
    assert g[0].tolist() == [2.0] * 3 and g[1].sum().item() == 4.0
