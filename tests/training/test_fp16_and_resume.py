"""fp16 dynamic loss scaling skips and recovers; a checkpoint resumes the exact loss curve.

Both run on the session's rank pool with SP=2, for a replicated-gradient stage (ZeRO 0/1)
and the sharded one (ZeRO 3).
"""

from __future__ import annotations

import json
import os

import pytest

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 250 "
        "--micro-batch-size 1 --global-batch-size 2 --lr 1e-3 --hidden-dropout 0 --attention-dropout 0 "
        "--eval-iters 0 --log-interval 100 --ds-sequence-parallel-size 2 --seed 11").split()
OVERFLOW_AT = (2, 3)


def _fp16_runs(logs: dict) -> None:
    """Inject inf into rank 0's gradients at iterations 2 and 3 (one rank only, like a
    sharded gradient that overflows in one shard)."""
    import torch.distributed as dist

    from megatron.arguments import parse_args
    from megatron.training import pretrain

    def hook(trainer):
        def inject(iteration, grads):
            if iteration in OVERFLOW_AT and dist.get_rank() == 0:
                grads[0].fill_(float("inf"))
        trainer.grad_hook = inject

    for zero, log in logs.items():
        argv = BASE + ["--fp16", "--initial-loss-scale", "1024", "--hysteresis", "2", "--loss-scale-window", "2",
                       "--train-iters", "8", "--zero-stage", str(zero), "--log-json", log]
        pretrain(parse_args(argv), trainer_hook=hook)


@pytest.mark.parametrize("zero", [0, 3])
def test_fp16_overflow_is_skipped_and_the_scale_recovers(ranks, tmp_path, zero):
    log = str(tmp_path / f"fp16_z{zero}.jsonl")
    ranks(2, _fp16_runs, {zero: log})
    train = [json.loads(x) for x in open(log) if '"train"' in x]
    assert [e["skipped"] for e in train] == [i in OVERFLOW_AT for i in range(1, 9)]
    assert train[-1]["skipped_iters"] == 2
    scales = [e["loss_scale"] for e in train]
    # hysteresis 2: the first overflow keeps the scale, the second halves it; two clean
    # steps (window 2) double it again
    assert scales[:4] == [1024, 1024, 1024, 512] and scales[5] == 1024 and scales[7] == 2048
    # the schedule does not advance on skipped steps: iteration 4 uses step 2's rate
    lrs = [e["lr"] for e in train]
    assert lrs[1] == lrs[2] == lrs[3] and lrs[4] < lrs[3]
    assert all(e["lm_loss"] == e["lm_loss"] for e in train)  # finite, no NaN leaked into the weights
    assert all(e["grad_norm"] != float("inf") for i, e in enumerate(train, 1) if i not in OVERFLOW_AT)


def _resume_runs(root: str, zero: int) -> None:
    import pretrain_gpt

    ck = os.path.join(root, "ck")
    common = BASE + ["--zero-stage", str(zero), "--lr-decay-iters", "4", "--lr-decay-style", "cosine"]
    assert pretrain_gpt.main(common + ["--train-iters", "4", "--log-json", os.path.join(root, "full.jsonl")]) == 0
    assert pretrain_gpt.main(common + ["--train-iters", "2", "--save", ck,
                                       "--log-json", os.path.join(root, "first.jsonl")]) == 0
    assert pretrain_gpt.main(common + ["--train-iters", "4", "--load", ck,
                                       "--log-json", os.path.join(root, "second.jsonl")]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_checkpoint_resume_reproduces_the_curve(ranks, tmp_path, zero):
    ranks(2, _resume_runs, str(tmp_path), zero)

    def curve(name):
        return [json.loads(x)["lm_loss"] for x in open(tmp_path / name) if '"train"' in x]

    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (tmp_path / "ck" / "iter_0000002" / ".metadata").exists()
    resumed = curve("first.jsonl") + curve("second.jsonl")
    assert resumed == pytest.approx(curve("full.jsonl"), rel=1e-6)
