"""On-disk cache of index arrays: named by a hash of what determines them, written
atomically, built once per job.

Building a sample index for billions of tokens takes seconds and every rank needs the
same arrays, so rank 0 builds and saves them while the other ranks wait on a barrier,
then everyone memory-maps the files. Files are written under a temporary name and
renamed, so a crash never leaves a half-written file under a name a later run trusts.
On a filesystem that is not shared between nodes a rank that still finds no file after
the barrier builds the arrays itself (they are deterministic, so all ranks agree).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable

import numpy as np


def describe_file(path: str) -> dict:
    """Identity of a data file for cache keys: its path, size and modification time."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _dist():
    """torch.distributed if a process group is up, else None (imported lazily: the data
    tools must not pay torch's import time)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _save_atomic(path: str, array: np.ndarray) -> None:
    # a plain open() (not mkstemp, which makes 0600 files) so the cache gets the umask's
    # permissions and other users of a shared data directory can read it
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".probe")
        os.close(fd)
        os.remove(tmp)
        return True
    except OSError:
        return False


def cached_arrays(folder: str | None, stem: str, description: dict, names: tuple,
                  build: Callable[[], dict], collective: bool = True, log=None) -> dict:
    """Arrays `names` for `description`, loaded from `folder` or built by `build()`.

    `collective=True`: every rank of the default process group calls this (rank 0 builds,
    the rest wait on a barrier). `collective=False`: no communication; each process loads
    or builds on its own (concurrent writers are safe thanks to the atomic renames).
    With `folder=None` or an unwritable folder the arrays are built in memory.
    """
    log = log or (lambda msg: None)
    paths = {}
    if folder is not None:
        key = cache_key(description)
        paths = {n: os.path.join(folder, f"{stem}_{key}_{n}.npy") for n in names}
        desc_path = os.path.join(folder, f"{stem}_{key}_description.json")

    def complete() -> bool:
        return bool(paths) and all(os.path.isfile(p) for p in paths.values()) and os.path.isfile(desc_path)

    def build_and_save() -> dict:
        arrays = build()
        if paths and _writable(folder):
            for n in names:
                _save_atomic(paths[n], arrays[n])
            tmp = desc_path + f".tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(description, f, indent=1, sort_keys=True)
            os.replace(tmp, desc_path)  # written last: marks the set complete
            log(f"saved index cache {os.path.join(folder, stem)}_{key}_*.npy")
        elif paths:
            log(f"WARNING: cannot write to {folder}; index kept in memory (pass a writable cache dir)")
        return arrays

    def load() -> dict | None:
        """The cached arrays, or None (with a warning) when a file is damaged: a cache is
        disposable, so a truncated or garbled file is rebuilt, never fatal."""
        arrays = {}
        for n in names:
            try:
                arrays[n] = np.load(paths[n], mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                _warn(f"WARNING: index cache file {paths[n]} is damaged ({e}); rebuilding it")
                return None
        return arrays

    dist = _dist() if collective else None
    built = loaded = None
    if dist is None or dist.get_rank() == 0:
        if complete():
            loaded = load()
        if loaded is None:
            built = build_and_save()
    if dist is not None:
        dist.barrier()
    if built is not None:
        return built
    if loaded is None and complete():
        loaded = load()
    if loaded is None:  # not shared with rank 0, unwritable, or damaged since
        return build_and_save()
    return loaded


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["cache_key", "cached_arrays", "describe_file"]
