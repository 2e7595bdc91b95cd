"""torchrun, ending with one line instead of torchrun's traceback when a rank fails.

    python examples_seq_parallel/_torchrun.py [torchrun flags] pretrain_gpt.py [flags]

is `python -m torch.distributed.run` (same flags, same process, same signal handling), except
for how a failed job ends. Plain torchrun, when a rank exits non-zero, raises ChildFailedError:
a Python traceback and a box of 20 lines that bury the rank's own message (pretrain_gpt.py
prints a user error once per job, without a traceback). Here the job ends instead with

    torchrun: pretrain_gpt.py failed: rank 1 exited with code 2 (a user error: the message above says what to fix)

and the exit code of that rank. _launch.sh uses it by default (TORCHRUN overrides).
"""

from __future__ import annotations

import sys


def summary(rank: int, failure) -> str:
    """One line about the first rank that failed (a torch.distributed.elastic ProcessFailure)."""
    code = failure.exitcode
    if code < 0:
        name = failure.signal_name()
        why = {"SIGKILL": "killed by SIGKILL (out of memory? the kernel log and the scheduler's say)",
               "SIGSEGV": "crashed (SIGSEGV)", "SIGABRT": "aborted (SIGABRT)"}.get(name, f"killed by {name}")
        return f"torchrun: pretrain_gpt.py failed: rank {rank} was {why}; its last output is above"
    what = {2: "a user error: the message above says what to fix",
            1: "a lost peer or a bug: the message or traceback above says which"}.get(code, "see above")
    return f"torchrun: pretrain_gpt.py failed: rank {rank} exited with code {code} ({what})"


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415
    from torch.distributed.run import main as torchrun_main  # noqa: PLC0415

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(summary(rank, failure), file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # as a shell reports a signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
