"""The checkpoint format on disk: every name, and what makes a checkpoint complete.

    <save>/latest_checkpointed_iteration.txt   "100" (the tracker; Megatron's name)
    <save>/iter_0000100/                       one checkpoint
        .metadata                              torch.distributed.checkpoint (DCP) index
        __<rank>_<n>.distcp                    DCP shards, written by each rank
        rng/rank_00003.pt                      each rank's generators and rank layout
        config.json                            the saving run's config + version
        checksums.json                         size and crc32 of every other file
    <save>/iter_0000100.tmp/                   a save in progress (never loaded)
    <save>/iter_0000100.old/                   the previous copy while one is replaced
    <save>/iter_0000100.damaged/               set aside by --load-fallback (never deleted)

A checkpoint is *complete* when its `.metadata` parses, every shard file it names exists
and is long enough, and (when `checksums.json` exists) every file has its recorded
size. That check reads one small file and stats the rest. *Verified* adds the crc32 of
every file against `checksums.json` (storage.verify_checksums), which reads them all.

Nothing here needs a process group; the tools in tools/checkpoint/ use it on one process.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from megatron.config import UserError

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = ".metadata"
CONFIG_FILE = "config.json"
CHECKSUMS = "checksums.json"
RNG_DIR = "rng"
TMP, OLD, DAMAGED = ".tmp", ".old", ".damaged"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# tests set this to "ITERATION:SECONDS" so that a kill lands between the DCP write and the rename
PAUSE_ENV = "MEGATRON_TEST_PAUSE_BEFORE_CHECKPOINT_RENAME"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded or saved as asked; the message names the path and the fix."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint directory that is missing, incomplete or corrupt. `problems` names each file."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path, self.problems = path, list(problems)
        super().__init__(f"{path} is damaged: " + "; ".join(self.problems))

    def __reduce__(self):  # crosses ranks in an object all-gather
        return DamagedCheckpoint, (self.path, self.problems)


# ------------------------------------------------------------------------------ names


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rng_file(path: str, rank: int) -> str:
    return os.path.join(path, RNG_DIR, f"rank_{rank:05d}.pt")


def iteration_of(path: str) -> int | None:
    """N for a directory named iter_N, else None."""
    m = _ITER_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def iteration_dirs(root: str) -> list[int]:
    """Iterations with a directory of the final name under `root` (renamed, so fully written), ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root))
                  if m and os.path.isdir(os.path.join(root, m.group(0))))


def found(root: str) -> str:
    its = iteration_dirs(root)
    return "complete iteration directories here: " + (", ".join(map(str, its)) if its else "none")


def holds_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint directory or a --save root with a tracker or an iteration directory."""
    return (os.path.isfile(os.path.join(path, TRACKER)) or os.path.isfile(os.path.join(path, METADATA))
            or bool(iteration_dirs(path)))


def same_dir(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


# ------------------------------------------------------------------------------ tracker


def read_tracker(root: str) -> int | None:
    """The iteration the tracker names, None without a tracker; CheckpointError if it is not a number."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} must hold an iteration number, found {text[:40]!r}; write the iteration "
                              f"of a complete directory ({found(root)}) into it")
    return int(text)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tracker(root: str, iteration: int) -> None:
    """Replace the tracker atomically: readers see the old iteration or the new one, never a torn file."""
    tmp = os.path.join(root, TRACKER + TMP)
    try:
        with open(tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(root)


# ------------------------------------------------------------------------------ completeness


def read_metadata(path: str):
    """DCP's index of one checkpoint; DamagedCheckpoint naming the file if it cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415 (slow import)

    file = os.path.join(path, METADATA)
    if not os.path.isfile(file):
        raise DamagedCheckpoint(path, [f"it has no {METADATA} (an incomplete or damaged checkpoint)"])
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 (any failure to parse means the same thing to the user)
        raise DamagedCheckpoint(path, [f"{file} cannot be read ({type(e).__name__}: {_first_line(e)}); the "
                                       f"checkpoint is damaged"]) from e


def read_checksums(path: str) -> dict | None:
    """{relative path: {"size": n, "crc32": "8 hex digits"}}, or None for checkpoints written without it."""
    file = os.path.join(path, CHECKSUMS)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            data = json.load(f)
        return {str(k): {"size": int(v["size"]), "crc32": str(v["crc32"])} for k, v in data["files"].items()}
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpoint(path, [f"{file} cannot be read ({type(e).__name__}: {_first_line(e)})"]) from e


def shard_extents(metadata) -> dict[str, int]:
    """{shard file: bytes it must hold at least} from DCP's storage index."""
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    return need


def check_complete(path: str):
    """Cheap completeness check (one small read, a stat per file). Returns DCP's metadata, or
    raises DamagedCheckpoint naming every missing, truncated or resized file."""
    if not os.path.isdir(path):
        raise DamagedCheckpoint(path, ["it is missing"])
    metadata = read_metadata(path)
    sums = read_checksums(path)
    problems = []
    for rel, size in sorted(shard_extents(metadata).items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
        elif os.path.getsize(file) < size:
            problems.append(f"{file} is truncated ({os.path.getsize(file)} bytes, the index needs {size})")
    for rel, rec in sorted((sums or {}).items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            if f"{file} is missing" not in problems:
                problems.append(f"{file} is missing")
        elif os.path.getsize(file) != rec["size"] and not any(p.startswith(file + " ") for p in problems):
            problems.append(f"{file} has {os.path.getsize(file)} bytes, {rec['size']} were written")
    if problems:
        raise DamagedCheckpoint(path, problems)
    return metadata


def newest_complete(root: str, below: int | None = None) -> int | None:
    """The newest iteration under `root` (older than `below`) whose directory passes check_complete."""
    for it in reversed(iteration_dirs(root)):
        if below is not None and it >= below:
            continue
        try:
            check_complete(checkpoint_dir(root, it))
            return it
        except DamagedCheckpoint:
            continue
    return None


# ------------------------------------------------------------------------------ what --load names


@dataclass
class Target:
    """One checkpoint to load: its directory, the --save-style root it lives in, its iteration."""

    root: str
    path: str
    iteration: int
    note: str | None = None  # how it was chosen, when that is not the tracker


def resolve_load(load: str) -> Target | None:
    """The checkpoint `--load` names, or None when there is none yet (an empty directory).

    `load` may be a `--save` root (the tracker picks the iteration; without a tracker, the
    newest complete directory, with a note) or one `iter_XXXXXXX` directory. The target is
    not checked here beyond existing: see check_complete.
    """
    if os.path.isfile(load):
        raise CheckpointError(f"--load {load} is a file; --load takes the --save directory of an earlier run or one "
                              f"of its iter_XXXXXXX directories (turn a consolidated .pt or a Hugging Face model into "
                              f"one with tools/checkpoint/convert_from_hf.py --dcp DIR)")
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: no such directory; pass the --save directory of an earlier run, "
                              f"or one of its iter_XXXXXXX directories")
    name = os.path.basename(os.path.normpath(load))
    if name.endswith(TMP) and iteration_of(name[:-len(TMP)]) is not None:
        raise CheckpointError(f"--load {load} is a save that never finished (killed before its rename); pass its "
                              f"directory {os.path.dirname(os.path.abspath(load))} to load the last complete checkpoint")
    it = iteration_of(load)
    if it is not None or os.path.isfile(os.path.join(load, METADATA)):
        # one checkpoint directory, named directly
        root = os.path.dirname(os.path.abspath(load))
        return Target(root, os.path.abspath(load), it if it is not None else 0,
                      note=f"--load names the checkpoint directory {load}")
    tracked = read_tracker(load)
    if tracked is not None:
        path = checkpoint_dir(load, tracked)
        if not os.path.isdir(path) and os.path.isdir(path + OLD):
            path += OLD  # a save of the same iteration was killed between its two renames
        return Target(load, path, tracked)
    its = iteration_dirs(load)
    if not its:
        # nothing to load: fine for a --save directory that never got a checkpoint (left-overs of
        # killed saves at most), but a directory of other files is a wrong path, not a fresh start
        other = sorted(n for n in os.listdir(load) if not (n.startswith(".") or n.endswith(TMP) or n == TRACKER))
        if other:
            shown = ", ".join(other[:5]) + (" ..." if len(other) > 5 else "")
            raise CheckpointError(f"--load {load} holds no checkpoint (no {TRACKER}, no iter_XXXXXXX directory, no "
                                  f"{METADATA}) but other files ({shown}); pass the --save directory of an earlier "
                                  f"run or one of its iter_XXXXXXX directories, or drop --load to start from scratch")
        return None
    newest = newest_complete(load)
    if newest is None:
        raise CheckpointError(f"--load {load}: no {TRACKER}, and none of its iteration directories "
                              f"({', '.join(map(str, its))}) is complete; restore one, or drop --load to start "
                              f"from scratch in another --save directory")
    skipped = [i for i in its if i > newest]
    return Target(load, checkpoint_dir(load, newest), newest,
                  note=f"{os.path.join(load, TRACKER)} is missing: loading the newest complete checkpoint, "
                       f"iteration {newest}" + (f" (skipped incomplete: {skipped})" if skipped else ""))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
