"""Pretrain a GPT model with DeepSpeed-Ulysses sequence parallelism.

    torchrun --nproc-per-node 2 pretrain_gpt.py --ds-sequence-parallel-size 2 ... (Megatron flags)

Flags are Megatron-DeepSpeed's (see megatron/arguments.py). `--dry-run` validates the
configuration for the world size in WORLD_SIZE (no process group, no GPU needed) and
prints the per-rank plan. `main(argv)` can be called repeatedly inside one torchrun job
(tests run several configurations on the same ranks).
"""

from __future__ import annotations

import os
import sys


def _is_first_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def main(argv=None) -> int:
    from megatron.arguments import parse_args  # noqa: PLC0415
    from megatron.config import ConfigError  # noqa: PLC0415

    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    if dry_run:
        argv.remove("--dry-run")
    try:
        cfg = parse_args(argv, check_environment=not dry_run)
    except ConfigError as e:
        if _is_first_rank():
            print(f"pretrain_gpt.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    if dry_run:
        from megatron.planning.plan import describe_plan  # noqa: PLC0415

        print(describe_plan(cfg, gpus_per_node=int(os.environ.get("GPUS_PER_NODE", cfg.world_size))))
        return 0
    import torch.distributed as dist  # noqa: PLC0415

    from megatron.training import pretrain  # noqa: PLC0415

    owns_process_group = not dist.is_initialized()
    pretrain(cfg)
    if owns_process_group and dist.is_initialized():
        # exiting with live gloo/NCCL threads can abort the process ("terminate called
        # without an active exception") and turn a finished run into a failed job
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
