"""The one writer and the one reader of checkpoint directories (format.py names the files).

`write_checkpoint` is atomic: every rank writes its DCP shards and its own files into
`iter_XXXXXXX.tmp` and checksums what it wrote; only once every rank has succeeded does
rank 0 add config.json and checksums.json, fsync the directory, rename it to its final
name and then replace the tracker. A job killed at any moment leaves the tracker naming
the previous complete checkpoint. A failure on any rank (a full disk, a permission) is
agreed on by all ranks, the unfinished directory is removed, and every rank raises the
same CheckpointError, which says that the previous checkpoint and the tracker are intact.

It runs collectively when a process group exists (every rank calls it), or on one
process (`no_dist=True`, what the conversion tools use). Reading (`read_state`) and
verifying (`verify_checksums`) work the same two ways.

Checksums are crc32 (zlib) of each whole file, computed right after the write while the
file is still in the page cache: cost measured in benchmarks/bench_checkpoint_checksums.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import warnings
import zlib

import torch
import torch.distributed as dist

from megatron.checkpoint import format as fmt
from megatron.checkpoint.format import CheckpointError, DamagedCheckpoint

_CHUNK = 8 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def crc32_file(path: str) -> tuple[int, str]:
    """(size, crc32 as 8 hex digits) of a file, read in chunks."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


class _Ranks:
    """The process group as the writer and reader see it: all ranks, or just this process."""

    def __init__(self, no_dist: bool = False) -> None:
        self.dist = not no_dist and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.dist else 0
        self.world = dist.get_world_size() if self.dist else 1

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (an object all-gather: it also serves as a barrier)."""
        if not self.dist:
            return [obj]
        from megatron.core import comm  # noqa: PLC0415

        return comm.all_gather_object(obj)


def _dcp_failures(e: BaseException) -> list[tuple[int | None, BaseException]]:
    """The underlying exceptions of a DCP CheckpointException (per rank), or of any exception."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        return [(r, f[0] if isinstance(f, tuple) else f) for r, f in sorted(failures.items())]
    return [(None, e)]


def _is_no_space(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _describe(e: BaseException | None, rank: int) -> dict | None:
    """A picklable summary of a failure on this rank (exceptions of other ranks inside DCP included)."""
    if e is None:
        return None
    parts = [(rank if r is None else r, x) for r, x in _dcp_failures(e)]
    user = isinstance(e, CheckpointError)
    return {"user": str(e) if user else None, "no_space": any(_is_no_space(x) for _, x in parts),
            "errors": [(r, f"{type(x).__name__}: {fmt._first_line(x)}") for r, x in parts]}


def _out_of_space(directory: str) -> bool:
    """Whether writing 1 MiB more into `directory` fails for lack of space or quota. A full disk
    does not always surface as ENOSPC: torch.save's zip writer reports a short write as
    RuntimeError("[enforce fail at inline_container.cc] unexpected pos")."""
    probe = os.path.join(directory, ".space-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, bytes(1 << 20))
            os.fsync(fd)
        finally:
            os.close(fd)
        return False
    except OSError as e:
        return e.errno in _NO_SPACE
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


# ------------------------------------------------------------------------------ directory operations (rank 0)


def clean_interrupted_saves(root: str, log=print) -> None:
    """Drop `.tmp` directories of killed saves and restore a `.old` one whose replacement never
    got its final name."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(fmt.OLD) and os.path.isdir(path):
            if os.path.exists(path[:-len(fmt.OLD)]):
                shutil.rmtree(path)
            else:
                os.rename(path, path[:-len(fmt.OLD)])
                log(f"restored {path[:-len(fmt.OLD)]} from an interrupted save")
        elif name.endswith(fmt.TMP) and os.path.isdir(path):
            shutil.rmtree(path)
            log(f"removed {path}, left by a save that did not finish")


def _fsync_tree(path: str) -> None:
    """Make the checkpoint durable before it becomes visible under its final name."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fmt.fsync_path(os.path.join(dirpath, name))
        fmt.fsync_path(dirpath)


def prune(root: str, keep_last: int, protect: set, log=print) -> None:
    its = fmt.iteration_dirs(root)
    for it in its[:-keep_last]:
        if it not in protect:
            shutil.rmtree(fmt.checkpoint_dir(root, it), ignore_errors=True)
            log(f"removed {fmt.checkpoint_dir(root, it)} (--keep-last-checkpoints {keep_last})")


def _pause_for_tests(iteration: int) -> None:
    spec = os.environ.get(fmt.PAUSE_ENV, "")
    if spec and int(spec.split(":")[0]) == iteration:
        print(f"checkpoint {iteration}: written, pausing before the rename ({fmt.PAUSE_ENV})", flush=True)
        time.sleep(float(spec.split(":")[1]))


def _previous(root: str) -> str:
    try:
        it = fmt.read_tracker(root)
    except CheckpointError:
        it = None
    if it is None:
        return f"no earlier checkpoint is tracked under {root}"
    return f"the tracker still names iteration {it} ({fmt.checkpoint_dir(root, it)}), which is intact"


# ------------------------------------------------------------------------------ writing


def _dcp_writer(path: str):
    from torch.distributed.checkpoint import FileSystemWriter  # noqa: PLC0415

    class _Writer(FileSystemWriter):
        """DCP's file writer, remembering which files this rank wrote (to checksum them after)."""

        files: list = []

        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            self.files = sorted({r.storage_data.relative_path for r in fut.wait()})
            return fut

    return _Writer(path)


def write_checkpoint(root: str, iteration: int, state: dict, *, rank_files: dict | None = None,
                     config: dict | None = None, overwrite: bool = False, keep_last: int | None = None,
                     remove_after: list | None = None, no_dist: bool = False, log=print) -> str:
    """Write `root/iter_XXXXXXX` atomically and point the tracker at it; returns its path.

    `state` goes to DCP (every rank passes its own part; replicated entries are written
    once). `rank_files` ({relative path: object}) are this rank's own files, written with
    torch.save (RNG states). `config` becomes config.json. An existing directory of the same
    iteration is replaced only with `overwrite`. `remove_after` lists iterations that rank 0
    deletes once the new checkpoint is tracked (--overwrite-checkpoints).
    """
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415

    ranks = _Ranks(no_dist)
    final = fmt.checkpoint_dir(root, iteration)
    tmp = final + fmt.TMP
    err = None
    if ranks.rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            clean_interrupted_saves(root, log)
            if os.path.exists(final) and not overwrite:
                raise CheckpointError(f"{final} already exists; this run does not replace checkpoints it did not "
                                      f"write (pass --overwrite-checkpoints to allow it, or choose another --save)")
        except Exception as e:  # noqa: BLE001 (every rank must learn of it)
            err = e
    _fail_if_any(ranks, ranks.gather(_describe(err, ranks.rank)), root, iteration, tmp)

    # every rank: shards, own files, checksums of what it wrote
    sums: dict = {}
    err = None
    try:
        writer = _dcp_writer(tmp)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            dcp.save(state, storage_writer=writer, no_dist=not ranks.dist)
        own = list(writer.files)
        for rel, obj in (rank_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            torch.save(obj, os.path.join(tmp, rel))
            own.append(rel)
        if ranks.rank == 0:
            own.append(fmt.METADATA)
        for rel in own:
            size, crc = crc32_file(os.path.join(tmp, rel))
            sums[rel] = {"size": size, "crc32": crc}
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (DCP's is a BaseException)
        err = e
    gathered = ranks.gather((_describe(err, ranks.rank), sums))
    _fail_if_any(ranks, [d for d, _ in gathered], root, iteration, tmp)

    # rank 0: config.json, checksums.json, fsync, rename, tracker, retention
    err = None
    if ranks.rank == 0:
        renamed = False
        try:
            files = {k: v for _, s in gathered for k, v in s.items()}
            if config is not None:
                with open(os.path.join(tmp, fmt.CONFIG_FILE), "w") as f:
                    json.dump(config, f, indent=1, default=str)
                size, crc = crc32_file(os.path.join(tmp, fmt.CONFIG_FILE))
                files[fmt.CONFIG_FILE] = {"size": size, "crc32": crc}
            with open(os.path.join(tmp, fmt.CHECKSUMS), "w") as f:
                json.dump({"algorithm": "crc32", "files": dict(sorted(files.items()))}, f, indent=0)
            _fsync_tree(tmp)
            _pause_for_tests(iteration)
            old = final + fmt.OLD
            if os.path.exists(final):  # only with overwrite: move aside, removed once the tracker is written
                if os.path.exists(old):
                    shutil.rmtree(old)
                os.rename(final, old)
            os.rename(tmp, final)
            renamed = True
            fmt.fsync_path(root)
            fmt.write_tracker(root, iteration)
            if os.path.exists(old):
                shutil.rmtree(old)
        except Exception as e:  # noqa: BLE001
            err = e
            if renamed:  # the tracker was not replaced: take the new directory back out of sight
                os.rename(final, tmp)
                if os.path.exists(final + fmt.OLD):
                    os.rename(final + fmt.OLD, final)
        if err is None:
            for it in remove_after or ():
                if it != iteration and os.path.isdir(fmt.checkpoint_dir(root, it)):
                    shutil.rmtree(fmt.checkpoint_dir(root, it), ignore_errors=True)
                    log(f"removed {fmt.checkpoint_dir(root, it)}: newer than the checkpoint this run started "
                        f"from (--overwrite-checkpoints)")
            if keep_last:
                prune(root, keep_last, {iteration}, log)
            log(f"saved checkpoint at iteration {iteration} to {final}")
    _fail_if_any(ranks, ranks.gather(_describe(err, ranks.rank)), root, iteration, tmp)
    return final


def _fail_if_any(ranks: _Ranks, results: list, root: str, iteration: int, tmp: str) -> None:
    """If any rank failed (`results`: the gathered _describe outputs), remove the unfinished
    directory and raise the same CheckpointError on every rank."""
    failed = [d for d in results if d]
    if not failed:
        return
    no_space = any(d["no_space"] for d in failed)
    removed = False
    if ranks.rank == 0:
        if not no_space and not any(d["user"] for d in failed):
            no_space = _out_of_space(tmp if os.path.isdir(tmp) else root)
        removed = os.path.isdir(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    no_space, removed = ranks.gather((no_space, removed))[0]
    raise _save_failed(root, iteration, failed, no_space, removed)


def _save_failed(root: str, iteration: int, failed: list, no_space: bool, tmp_removed: bool) -> CheckpointError:
    user = [d["user"] for d in failed if d["user"]]
    if user:
        return CheckpointError(user[0])
    errors = sorted({e for d in failed for e in d["errors"]})  # DCP reports every rank's failure on each rank
    where = "; ".join(f"rank {r}: {text}" for r, text in errors[:4]) + (" ..." if len(errors) > 4 else "")
    removed = f"the unfinished {fmt.checkpoint_dir(root, iteration)}{fmt.TMP} was removed; " if tmp_removed else ""
    if no_space:
        free = ""
        try:
            st = os.statvfs(root)
            free = f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MiB free now)"
        except OSError:
            pass
        return CheckpointError(f"no space left on {root}{free} while saving the checkpoint of iteration {iteration} "
                               f"({where}); {removed}{_previous(root)}. Free space there (or pass another --save) "
                               f"and resume with --load {root}")
    return CheckpointError(f"saving the checkpoint of iteration {iteration} to {root} failed ({where}); {removed}"
                           f"{_previous(root)}")


# ------------------------------------------------------------------------------ reading


def files_for(metadata, sums: dict | None, roots: set | None) -> list[str]:
    """Files to verify: all recorded ones, or only those holding entries under `roots` (plus the index)."""
    if sums is None:
        return []
    if roots is None:
        return sorted(sums)
    lookup = metadata.planner_data or {}
    keep = {fmt.METADATA}
    for index, info in (metadata.storage_data or {}).items():
        fqn = getattr(index, "fqn", None)
        if fqn is not None and tuple(lookup.get(fqn, (fqn,)))[0] in roots:
            keep.add(info.relative_path)
    return sorted(f for f in sums if f in keep)


def verify_checksums(path: str, files: list[str], sums: dict, *, no_dist: bool = False) -> None:
    """crc32 of `files` against checksums.json, the files split over all ranks (each reads its
    share once); every rank raises the same DamagedCheckpoint naming each corrupt file."""
    ranks = _Ranks(no_dist)
    by_size = sorted(files, key=lambda f: -sums[f]["size"])
    load = [0] * ranks.world
    mine = []
    for f in by_size:  # greedy balance of bytes read
        r = min(range(ranks.world), key=lambda i: load[i])
        load[r] += sums[f]["size"]
        if r == ranks.rank:
            mine.append(f)
    problems = []
    for rel in mine:
        file = os.path.join(path, rel)
        try:
            size, crc = crc32_file(file)
        except OSError as e:
            problems.append(f"{file} cannot be read ({e})")
            continue
        if size != sums[rel]["size"]:
            problems.append(f"{file} has {size} bytes, {sums[rel]['size']} were written")
        elif crc != sums[rel]["crc32"]:
            problems.append(f"{file} is corrupt (crc32 {crc}, {sums[rel]['crc32']} was written)")
    everyone = sorted(p for ps in ranks.gather(problems) for p in ps)
    if everyone:
        raise DamagedCheckpoint(path, everyone)


def read_state(path: str, state: dict, *, no_dist: bool = False) -> None:
    """dcp.load into `state` (in place); a failure becomes a CheckpointError naming the checkpoint."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415

    ranks = _Ranks(no_dist)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=path, no_dist=not ranks.dist)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (DCP's is a BaseException)
        errors = sorted(set(_describe(e, 0)["errors"]))
        raise DamagedCheckpoint(path, ["reading it failed (" + "; ".join(f"rank {r}: {t}" for r, t in errors[:4])
                                       + ")"]) from None


def read_full(path: str, roots: set | None = None, *, verify: bool = True) -> dict:
    """The nested state dict of one checkpoint directory on one process, restricted to the
    top-level keys in `roots`; full tensors however many ranks wrote the shards.

    Uses only DCP's public API: shapes and dtypes come from the metadata, and `dcp.load`
    with `no_dist=True` fills full tensors, so the optimizer state never has to be read just
    to get the weights. With `verify`, the files holding those entries are checked against
    checksums.json first.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415

    metadata = fmt.check_complete(path)
    if verify:
        sums = fmt.read_checksums(path)
        verify_checksums(path, files_for(metadata, sums, roots), sums or {}, no_dist=True)
    lookup = metadata.planner_data or {}
    state: dict = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        keys = tuple(lookup.get(fqn, (fqn,)))
        if roots is not None and keys[0] not in roots:
            continue
        if isinstance(meta, TensorStorageMetadata):
            value = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            value = None  # a pickled object; DCP replaces the placeholder
        node = state
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    read_state(path, state, no_dist=True)
    return state


def top_level_keys(metadata) -> dict:
    """Top-level keys of a checkpoint -> whether any tensor lives under them."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415

    lookup = metadata.planner_data or {}
    roots: dict = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        root = tuple(lookup.get(fqn, (fqn,)))[0]
        roots[root] = roots.get(root, False) or isinstance(meta, TensorStorageMetadata)
    return roots
