"""How errors reach the person who launched the job: once, without a traceback, with what to do.

Every error a user can fix derives from `megatron.config.UserError` (ConfigError,
IndexedDatasetError, DatasetTooSmallError, TokenizerError, TokenIdError, PreprocessError,
CheckpointError, PeerLostError). `pretrain_gpt.main` catches them on every rank and calls
`report_user_error`, which prints the message once per job and returns the exit code (2;
1 for a lost peer). Anything else is a bug and keeps its traceback.

Who prints. Ranks that fail together (the same bad flag, file or dataset) must not print the
message N times, and a rank that fails alone must not stay silent while the others wait for it
in a collective. So the ranks agree through the job's key-value store (torchrun's agent store,
reachable before the process group exists, or the process group's store): the first rank to
claim the report prints it. Rank 0 claims at once; another rank first lets rank 0 claim it (before
the process group starts, until rank 0 has claimed or passed validation itself; after, for
GRACE_SECONDS), so that an error of the whole job reads as in a one-process run, and a rank other
than 0 that prints names itself. Then the process exits, and torchrun (or Slurm) ends the job:
ranks blocked in a collective with the failed one are killed by the launcher, not left to hang.
Without a store (srun, before the process group) each node's first local rank prints.

`PeerLostError` translates what gloo and NCCL say when another rank of the job is gone
("Connection reset by peer", a collective timeout) into what happened, at which iteration,
and how to resume (the last complete checkpoint, --load).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time

from megatron.config import UserError

GRACE_SECONDS = 3.0  # after the process group started: how long a rank other than 0 lets rank 0 report first
VALIDATION_WAIT_SECONDS = 120.0  # before it: the most a rank other than 0 waits to learn rank 0's outcome
_run = itertools.count()  # main() calls in this process: one set of store keys each (tests call it repeatedly)
_current_run = 0
_agent_store = None


def begin_run() -> None:
    """Called by pretrain_gpt.main once per run: store keys of earlier runs in this process are not reused."""
    global _current_run
    _current_run = next(_run)


class PeerLostError(UserError):
    """Another rank of the job is gone (its process died, its node failed or was cut off): the message
    says when and how to resume. Not the user's mistake, but the user's to act on."""

    exit_code = 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the process group if there is one, else from the launcher's environment."""
    if "torch" in sys.modules:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", "SLURM_PROCID", default=0), _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def _store():
    """The job's key-value store: torchrun's agent store (a client of it; exists before the process
    group), else the default process group's store, else None."""
    global _agent_store
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("MASTER_ADDR") \
            and os.environ.get("MASTER_PORT"):
        if _agent_store is None:
            from datetime import timedelta  # noqa: PLC0415

            import torch.distributed as dist  # noqa: PLC0415

            _agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                         is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)
        return _agent_store
    if "torch" in sys.modules:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    return None


def _key(what: str) -> str:
    return (f"megatron/{what}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_current_run}")


def mark_validated() -> None:
    """Rank 0 found the flags and files good (before the process group starts): a rank that did not
    then reports its error itself, at once (see `claim_report`)."""
    rank, world = rank_and_world()
    if rank != 0 or world <= 1:
        return
    try:
        store = _store()
        if store is not None:
            store.set(_key("validated"), "1")
    except Exception:  # noqa: BLE001 (best effort: the other ranks then wait a while)
        pass


def claim_report(rank: int, world: int, code: int = 2) -> tuple[bool, int]:
    """(should this rank print the job's error, the job's exit code). True for exactly one of the
    ranks that call it (best effort: when the store cannot be reached, every caller prints rather
    than none). The exit code is the printing rank's: a rank that fails only because the reporting
    rank left (a PeerLostError, exit code 1) exits with the code of the error that was printed.

    Rank 0 claims at once. Another rank waits for rank 0 to claim (then stays silent): before the
    process group starts, until rank 0 has either claimed or finished validating (so an error of the
    whole job is always rank 0's to print, however slowly rank 0 started); after it, for at most
    GRACE_SECONDS (rank 0 may be blocked in a collective waiting for this rank)."""
    if world <= 1:
        return True, code
    try:
        store = _store()
    except Exception:  # noqa: BLE001 (the store's host is gone: better twice than never)
        return True, code
    if store is None:
        return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0) == 0, code
    key, mine = _key("user_error"), f"{rank}:{code}"
    try:
        if rank != 0:
            before_group = not _process_group_started()
            deadline = time.monotonic() + (VALIDATION_WAIT_SECONDS if before_group else GRACE_SECONDS)
            while time.monotonic() < deadline:
                if store.check([key]):
                    break
                if before_group and store.check([_key("validated")]):
                    break
                time.sleep(0.05)
        holder = store.compare_set(key, "", mine).decode()
    except Exception:  # noqa: BLE001
        return True, code
    if holder == mine:
        return True, code
    try:
        return False, int(holder.split(":")[1])
    except (IndexError, ValueError):
        return False, code


def _process_group_started() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist  # noqa: PLC0415

    return dist.is_available() and dist.is_initialized()


def report_user_error(e: BaseException, prog: str = "pretrain_gpt.py") -> int:
    """Print a UserError once per job (see the module docstring); return the exit code."""
    rank, world = rank_and_world()
    report, code = claim_report(rank, world, int(getattr(e, "exit_code", 2)))
    if report:
        where = f" on rank {rank} of {world}" if rank != 0 and world > 1 else ""
        print(f"{prog}: error{where}: {e}", file=sys.stderr, flush=True)
    return code


# ------------------------------------------------------------------------ a lost peer

_PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                    "timeout", "connection refused", "no route to host", "socket", "communicator was aborted",
                    "remote process exited", "end of file")


def is_peer_lost(e: BaseException) -> bool:
    """Does `e` say that a collective failed because another rank is gone (and not, e.g., a shape
    mismatch between ranks, which is a bug)?"""
    import torch.distributed as dist  # noqa: PLC0415

    lost_types = tuple(t for t in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistStoreError", None))
                       if t is not None)
    if lost_types and isinstance(e, lost_types):
        return True
    text = str(e).lower()
    backend_error = getattr(dist, "DistBackendError", None)
    from_backend = (backend_error is not None and isinstance(e, backend_error)) or \
        (isinstance(e, RuntimeError) and ("gloo" in text or "nccl" in text))
    return from_backend and any(w in text for w in _PEER_LOST_WORDS)


def _network_words(e: BaseException) -> str:
    """The first line of what gloo or NCCL said, without the source location and the boilerplate."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", line)  # "[.../pair.cc:537] "
    return line.split(" This is typically caused by")[0].rstrip(". ")


def last_checkpoint(save_dir: str | None) -> int | None:
    """The iteration of the last complete checkpoint under `save_dir` (its tracker file), or None."""
    if not save_dir:
        return None
    try:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def peer_lost_error(e: BaseException, completed_iterations: int | None, save_dir: str | None) -> PeerLostError | None:
    """`e` as a PeerLostError saying what happened and how to resume, or None if `e` is something else."""
    if not is_peer_lost(e):
        return None
    cause = _network_words(e)
    if completed_iterations is None:
        when = "before training started"
    else:
        when = f"during iteration {completed_iterations + 1} ({completed_iterations} completed)"
    saved = last_checkpoint(save_dir)
    if saved is not None:
        resume = (f"The last complete checkpoint is iteration {saved}: {os.path.join(save_dir, f'iter_{saved:07d}')}; "
                  f"relaunch the same command with --load {save_dir} to resume from it.")
    elif save_dir:
        resume = f"No checkpoint was completed under --save {save_dir} yet: relaunching starts from scratch."
    else:
        resume = ("No checkpoint can be resumed (no --save): relaunching starts from scratch; pass --save DIR "
                  "--save-interval N to be able to resume next time.")
    return PeerLostError(
        f"lost contact with another rank {when}: a process or node of this job is gone (its own log or the "
        f"scheduler's says why: out of memory, a crash, a node failure, a kill). What the network said: {cause}. "
        f"{resume}")


__all__ = ["GRACE_SECONDS", "PeerLostError", "UserError", "begin_run", "claim_report", "is_peer_lost",
           "last_checkpoint", "mark_validated", "peer_lost_error", "rank_and_world", "report_user_error"]
