"""Megatron-DeepSpeed's launch scripts train: each vendored argv, scaled down (layers, hidden size,
heads, sequence, batch and length; `scale_down`), trains 3 iterations at SP 2 on two gloo ranks
with every other flag kept (precision and loss scaling, the DeepSpeed JSON, recompute, schedules,
outputs). Substitutions forced by the CPU: the GPU attention kernels (flash-attn, Triton) become
SDPA (scripts/gpu_check.sh covers the kernels on a GPU), `--distributed-backend nccl` becomes gloo,
and the scripts that need tensor or pipeline parallelism run with both set to 1. What `--dry-run`
accepts must train.
"""

from __future__ import annotations

import json
import math
import os

from tests.upstream.scripts import (
    EXAMPLES,
    drop_flag,
    get_flag,
    load_example,
    localize,
    scale_down,
    set_flag,
    write_tokenizer_files,
)

GPU_KERNEL_FLAGS = ("--use-flash-attn-triton", "--use-flash-attn-v2", "--use-flash-attn", "--use-flash-attn-v1",
                    "--use-flash-attn-builder")


def cpu_argv(name: str, workdir: str, files: dict) -> list:
    ex = load_example(name)
    argv = scale_down(ex["argv"])
    for flag in GPU_KERNEL_FLAGS:
        argv = drop_flag(argv, flag)
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        if get_flag(argv, flag) is not None:
            argv = set_flag(argv, flag, 1)
    if get_flag(argv, "--distributed-backend") == "nccl":
        argv = set_flag(argv, "--distributed-backend", "gloo")
    argv = localize(argv, ex["ds_config"], workdir, files)
    return argv + ["--log-json", os.path.join(workdir, "log.jsonl"), "--eval-iters", "1", "--eval-interval", "3"]


def _train(argvs: list) -> list:
    import pretrain_gpt

    return [pretrain_gpt.main(argv) for argv in argvs]


def test_upstream_scripts_train_three_iterations_at_sp2(ranks, tmp_path):
    files = write_tokenizer_files(str(tmp_path / "tokenizers"))
    names = sorted(EXAMPLES)
    argvs = [cpu_argv(name, str(tmp_path / name), files) for name in names]
    codes = ranks(2, _train, argvs)
    for i, name in enumerate(names):
        rc = [c[i] for c in codes]
        assert rc == [0, 0], (name, rc)
        log = [json.loads(line) for line in open(os.path.join(tmp_path, name, "log.jsonl"))]
        losses = [e["lm_loss"] for e in log if e["event"] == "train"]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses), (name, losses)
        topo = next(e for e in log if e["event"] == "topology")["ranks"]
        assert [r["sp_group"] for r in topo] == [[0, 1], [0, 1]], name
