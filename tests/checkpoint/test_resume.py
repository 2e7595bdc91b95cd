"""Exact resume on one topology: N iterations, save, restart, N more == 2N straight through.

Bitwise (fp32, CPU, same topology) with dropout on, so the per-rank RNG states, the data
position, the optimizer and the schedule must all come back exactly. Also covered in the
same pool call: --keep-last-checkpoints, --no-load-rng (the curve must then differ, which
shows the RNG restore is what makes it exact), and an fp16 run whose skipped step puts the
schedule's clock (applied_steps) behind the iteration;
--exit-duration-in-mins and --exit-interval. Runtime ~10 s on 2 cores.
"""

from __future__ import annotations

import json
import os

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 250 "
        "--micro-batch-size 1 --global-batch-size 2 --lr 1e-3 --lr-warmup-iters 1 --lr-decay-iters 6 "
        "--lr-decay-style cosine --eval-iters 0 --log-interval 100 --ds-sequence-parallel-size 2 --seed 5").split()
DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1".split()
FP16 = ("--fp16 --initial-loss-scale 1024 --hysteresis 1 --loss-scale-window 100 --hidden-dropout 0 "
        "--attention-dropout 0").split()


def _runs(root: str) -> None:
    import torch.distributed as dist

    import pretrain_gpt
    from megatron.arguments import parse_args
    from megatron.training import pretrain

    def run(extra, log):
        assert pretrain_gpt.main(BASE + extra + ["--log-json", os.path.join(root, log)]) == 0

    j = os.path.join
    run(DROPOUT + ["--zero-stage", "1", "--train-iters", "6", "--save", j(root, "full"), "--save-interval", "2",
                   "--keep-last-checkpoints", "2"], "full.jsonl")
    run(DROPOUT + ["--zero-stage", "1", "--train-iters", "3", "--save", j(root, "ck")], "first.jsonl")
    run(DROPOUT + ["--zero-stage", "1", "--train-iters", "6", "--load", j(root, "ck"), "--save", j(root, "ck2")],
        "second.jsonl")
    run(DROPOUT + ["--zero-stage", "1", "--train-iters", "4", "--load", j(root, "ck"), "--no-load-rng"], "norng.jsonl")

    run(["--zero-stage", "0", "--train-iters", "100", "--exit-duration-in-mins", "0", "--save", j(root, "dur")],
        "duration.jsonl")
    run(["--zero-stage", "0", "--train-iters", "100", "--exit-interval", "2", "--save-interval", "2", "--save",
         j(root, "exit")], "exit.jsonl")

    def hook(trainer):  # one overflow at iteration 2: applied_steps falls one behind the iteration
        def inject(iteration, grads):
            if iteration == 2 and dist.get_rank() == 0:
                grads[0].fill_(float("inf"))
        trainer.grad_hook = inject

    for extra, log in ((["--train-iters", "5"], "fp16_full.jsonl"),
                       (["--train-iters", "3", "--save", j(root, "ck16")], "fp16_first.jsonl")):
        pretrain(parse_args(BASE + FP16 + ["--zero-stage", "3", "--log-json", j(root, log)] + extra), trainer_hook=hook)
    run(FP16 + ["--zero-stage", "3", "--train-iters", "5", "--load", j(root, "ck16")], "fp16_second.jsonl")


def _train(path) -> list[dict]:
    return [e for e in map(json.loads, open(path)) if e["event"] == "train"]


def test_resume_is_bitwise_exact_and_retention_keeps_the_last(ranks, tmp_path):
    ranks(2, _runs, str(tmp_path))
    full, first, second = (_train(tmp_path / f"{n}.jsonl") for n in ("full", "first", "second"))
    assert [e["iteration"] for e in second] == [4, 5, 6]
    assert [e["lm_loss"] for e in first + second] == [e["lm_loss"] for e in full]  # bitwise
    assert [e["consumed_tokens"] for e in second] == [e["consumed_tokens"] for e in full[3:]]
    # the RNG restore is what makes it exact: without it dropout masks differ
    assert _train(tmp_path / "norng.jsonl")[0]["lm_loss"] != full[3]["lm_loss"]
    # --keep-last-checkpoints 2: iterations 4 and 6 remain, each with one RNG file per rank
    assert sorted(os.listdir(tmp_path / "full")) == ["iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(tmp_path / "full" / "iter_0000006" / "rng")) == ["rank_00000.pt", "rank_00001.pt"]
    cfg = json.load(open(tmp_path / "full" / "iter_0000006" / "config.json"))
    assert cfg["model"]["hidden_size"] == 64 and cfg["version"]
    # --exit-duration-in-mins 0: every rank agrees to stop after the first iteration, saved
    assert [e["iteration"] for e in _train(tmp_path / "duration.jsonl")] == [1]
    assert (tmp_path / "dur" / "latest_checkpointed_iteration.txt").read_text() == "1"
    done = [json.loads(x) for x in open(tmp_path / "duration.jsonl") if '"done"' in x][-1]
    assert done["exit_reason"] == "duration"
    assert len(_train(tmp_path / "exit.jsonl")) == 2
    assert (tmp_path / "exit" / "latest_checkpointed_iteration.txt").read_text() == "2"
    # fp16: the skipped step is remembered (schedule and scaler resume where they were)
    f_full, f_first, f_second = (_train(tmp_path / f"fp16_{n}.jsonl") for n in ("full", "first", "second"))
    assert [e["skipped"] for e in f_full] == [False, True, False, False, False]
    assert [e["lm_loss"] for e in f_first + f_second] == [e["lm_loss"] for e in f_full]
    assert [(e["lr"], e["loss_scale"], e["skipped_iters"]) for e in f_second] == \
        [(e["lr"], e["loss_scale"], e["skipped_iters"]) for e in f_full[3:]]
