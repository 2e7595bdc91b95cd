"""Pretrain a GPT model with DeepSpeed-Ulysses sequence parallelism.

    torchrun --nproc-per-node 2 pretrain_gpt.py --ds-sequence-parallel-size 2 ... (Megatron flags)

Flags are Megatron-DeepSpeed's (see megatron/arguments.py). `--dry-run` validates the
configuration for the world size in WORLD_SIZE (no process group, no GPU needed) and
prints the per-rank plan. `--preflight` validates everything the ranks check before they
start a process group on this machine (flags; data, tokenizer and output paths; GPU and
packages) and prints nothing unless something is wrong: the launch scripts run it once
before torchrun. `main(argv)` can be called repeatedly inside one torchrun job (tests run
several configurations on the same ranks).

Errors: a user error (`megatron.config.UserError`: a bad flag, a missing or damaged data,
tokenizer or checkpoint file, an unwritable output path, data too small, a lost peer) is
printed once per job, without a traceback, and the process exits 2 (1 for a lost peer); see
megatron/errors.py. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

_LAUNCHER_PID = os.getppid()  # read first: a launcher that dies while we import torch is noticed too


def main(argv=None) -> int:
    from megatron.arguments import parse_args  # noqa: PLC0415
    from megatron.config import UserError  # noqa: PLC0415
    from megatron.errors import begin_run, mark_validated, report_user_error  # noqa: PLC0415
    from megatron.preflight import check_paths  # noqa: PLC0415

    begin_run()
    argv = list(sys.argv[1:] if argv is None else argv)
    modes = {m: m in argv for m in ("--dry-run", "--preflight")}
    argv = [a for a in argv if a not in modes]
    try:
        cfg = parse_args(argv, check_environment=not modes["--dry-run"])
        if not modes["--dry-run"]:
            check_paths(cfg)
    except UserError as e:
        return report_user_error(e)
    mark_validated()
    if modes["--preflight"]:
        return 0
    if modes["--dry-run"]:
        from megatron.planning.plan import describe_plan  # noqa: PLC0415

        print(describe_plan(cfg, gpus_per_node=int(os.environ.get("GPUS_PER_NODE", cfg.world_size))))
        return 0
    import torch.distributed as dist  # noqa: PLC0415

    from megatron.training import pretrain  # noqa: PLC0415

    owns_process_group = not dist.is_initialized()
    try:
        pretrain(cfg)
    except UserError as e:
        code = report_user_error(e)
        if owns_process_group:
            _drop_process_group()
        return code
    except BaseException:  # a bug keeps its traceback; the process group goes (main may be called again)
        if owns_process_group:
            _drop_process_group()
        raise
    if owns_process_group and dist.is_initialized():
        # exiting with live gloo/NCCL threads can abort the process ("terminate called
        # without an active exception") and turn a finished run into a failed job
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _drop_process_group() -> None:
    """After an error: forget the process group without talking to the other ranks (they may be
    gone or blocked in a collective), so that a later main() in this process starts afresh."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized() and dist.get_backend() == "gloo":
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (best effort on the way out)
            pass


if __name__ == "__main__":
    from megatron.initialize import die_with_launcher, launched_by_torchrun

    if launched_by_torchrun():  # not under a shell or nohup: there the parent may go away on purpose
        die_with_launcher(_LAUNCHER_PID)
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter teardown: with a peer gone, joining the communication threads can hang or abort
        os._exit(code)
    sys.exit(0)
