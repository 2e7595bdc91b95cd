"""Checkpoints with torch.distributed.checkpoint (DCP), in Megatron's directory layout.

    <save>/iter_0000100/               one DCP checkpoint (every rank writes its shards)
    <save>/latest_checkpointed_iteration.txt   "100"

State dicts come from `torch.distributed.checkpoint.state_dict.get_state_dict`, which
gives the same fully-qualified parameter names for a plain module, DDP and FSDP2, so a
checkpoint written under one ZeRO stage or SP/DP layout can be loaded under another
(DCP reshards DTensors on load). ZeroRedundancyOptimizer is not understood by
`get_state_dict`; its state is gathered and stored in the same parameter-name form,
so it too is layout-independent, and loaded back through its own `load_state_dict`
(every rank keeps its partition).

Writing is atomic: every rank writes into `iter_XXXXXXX.tmp`, and only once all ranks
are done does rank 0 rename it and then replace the tracker file, so a job killed at any
moment leaves the previous checkpoint named by the tracker and intact. Loading reads only
what the tracker names. RNG states differ per rank and are stored one file per rank
(`rng/rank_00003.pt`): DCP writes a plain object once, so a shared key would give every
rank the state of rank 0.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# tests set this to "ITERATION:SECONDS" so that a kill lands between the DCP write and the rename
PAUSE_ENV = "MEGATRON_TEST_PAUSE_BEFORE_CHECKPOINT_RENAME"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the path and the fix."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _is_zero1(optimizer) -> bool:
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def _zero1_state_by_name(model: torch.nn.Module, optimizer) -> dict:
    """ZeroRedundancyOptimizer state keyed by parameter name (gathered; full on every rank)."""
    optimizer.consolidate_state_dict(to=0)
    # consolidate_state_dict leaves the full state on rank 0 only; broadcast it so every
    # rank passes DCP the same replicated values (DCP writes them once)
    obj = [optimizer.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    full = obj[0]
    name_of = {p: n.removeprefix("module.") for n, p in model.named_parameters()}
    # the consolidated dict numbers parameters in param-group order, like torch.optim
    by_index = dict(enumerate(name_of[p] for g in optimizer.param_groups for p in g["params"]))
    return {"state": {by_index[i]: s for i, s in full["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} | {
                "params": [by_index[i] for i in g["params"]]} for g in full["param_groups"]]}


def _zero1_template(model: torch.nn.Module, optimizer) -> dict:
    """Empty by-name Adam state with the saved shapes, for DCP to load into."""
    name_of = {p: n.removeprefix("module.") for n, p in model.named_parameters()}
    state = {name_of[p]: {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for g in optimizer.param_groups for p in g["params"]}
    return {"state": state}


def _load_zero1(model: torch.nn.Module, optimizer, by_name: dict) -> None:
    """Feed by-name Adam state to ZeroRedundancyOptimizer (each rank keeps its partition)."""
    name_of = {p: n.removeprefix("module.") for n, p in model.named_parameters()}
    order = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    groups = []
    offset = 0
    for g in optimizer.param_groups:
        n = len(g["params"])
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(offset, offset + n))})
        offset += n
    state = {i: by_name["state"][name] for i, name in enumerate(order) if name in by_name["state"]}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------ files and directories

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Make the checkpoint durable before it becomes visible under its final name."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _write_tracker(root: str, iteration: int) -> None:
    """Replace the tracker atomically: readers see the old iteration or the new one, never a torn file."""
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    _fsync_path(root)


def _replace_dir(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed last, so a
    kill in between leaves `final.old`, which loading and the next save both recover."""
    old = final + ".old"
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(os.path.dirname(final) or ".")
    if os.path.exists(old):
        shutil.rmtree(old)


def _clean_interrupted_saves(root: str, log) -> None:
    """Rank 0, before a save: drop `.tmp` directories of killed saves and restore a `.old` one
    whose replacement never got its final name."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(".old") and os.path.isdir(path):
            if os.path.exists(path[:-4]):
                shutil.rmtree(path)
            else:
                os.rename(path, path[:-4])
                log(f"restored {path[:-4]} from an interrupted save")
        elif name.endswith(".tmp") and os.path.isdir(path):
            shutil.rmtree(path)
            log(f"removed {path}, left by a save that did not finish")


def iteration_dirs(root: str) -> list[int]:
    """Iterations with a complete (renamed) directory under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m)


def _prune(root: str, keep_last: int, protect: set, log) -> None:
    its = iteration_dirs(root)
    for it in its[:-keep_last]:
        if it not in protect:
            shutil.rmtree(checkpoint_dir(root, it), ignore_errors=True)
            log(f"removed {checkpoint_dir(root, it)} (--keep-last-checkpoints {keep_last})")


def _pause_for_tests(iteration: int) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec and int(spec.split(":")[0]) == iteration:
        print(f"checkpoint {iteration}: written, pausing before the rename ({PAUSE_ENV})", flush=True)
        time.sleep(float(spec.split(":")[1]))


# ------------------------------------------------------------------------------ RNG

def _rng_state() -> dict:
    """This rank's generators in a form that `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _rng_file(path: str, rank: int) -> str:
    return os.path.join(path, "rng", f"rank_{rank:05d}.pt")


# ------------------------------------------------------------------------------ save

COUNTERS = ("iteration", "consumed_samples", "consumed_tokens", "applied_steps", "skipped_iters")


def save_checkpoint(root: str, counters: dict, model: torch.nn.Module, optimizer, loss_scaler=None, *,
                    config=None, save_optim: bool = True, save_rng: bool = True, keep_last: int | None = None,
                    log=print) -> str:
    """Write `root/iter_XXXXXXX` atomically and point the tracker at it; collective over all ranks.

    `counters` holds the names in COUNTERS ("iteration" is required). `config` (a RunConfig)
    is stored in the checkpoint and as `config.json`, which the conversion tools read.
    """
    from megatron import __version__  # noqa: PLC0415

    rank, world = dist.get_rank(), dist.get_world_size()
    iteration = int(counters["iteration"])
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        _clean_interrupted_saves(root, log)
    dist.barrier()
    opts = StateDictOptions()
    if save_optim and _is_zero1(optimizer):
        model_sd, optim_sd = get_model_state_dict(model, options=opts), _zero1_state_by_name(model, optimizer)
    elif save_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), None
    config_json = json.dumps(asdict(config), default=str) if config is not None else None
    state = {"model": model_sd, "world_size": world, "version": __version__,
             **{k: int(counters.get(k, 0)) for k in COUNTERS}}
    if config_json is not None:
        state["config"] = config_json
    if optim_sd is not None:
        state["optimizer"] = optim_sd
    if loss_scaler is not None:
        state["loss_scaler"] = loss_scaler.state_dict()
    dcp.save(state, checkpoint_id=tmp)
    if save_rng:
        os.makedirs(os.path.dirname(_rng_file(tmp, rank)), exist_ok=True)
        torch.save(_rng_state(), _rng_file(tmp, rank))
    dist.barrier()  # every rank's shards and RNG file are in `tmp`
    if rank == 0:
        if config_json is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({**json.loads(config_json), "version": __version__}, f, indent=1)
        _fsync_tree(tmp)
        _pause_for_tests(iteration)
        _replace_dir(tmp, final)
        _write_tracker(root, iteration)
        if keep_last:
            _prune(root, keep_last, {iteration}, log)
        log(f"saved checkpoint at iteration {iteration} to {final}")
    dist.barrier()
    return final


# ------------------------------------------------------------------------------ load

def latest_iteration(root: str) -> int | None:
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} must hold an iteration number, found {text[:40]!r}; write the iteration "
                              f"of a complete directory ({_found(root)}) into it")
    return int(text)


def _found(root: str) -> str:
    its = iteration_dirs(root)
    return "complete iteration directories here: " + (", ".join(map(str, its)) if its else "none")


def _resolve(root: str, it: int) -> str:
    path = checkpoint_dir(root, it)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        return path + ".old"  # a save of the same iteration was killed between its two renames
    if not os.path.isfile(os.path.join(path, ".metadata")):
        what = "is missing" if not os.path.isdir(path) else "has no .metadata (an incomplete or damaged checkpoint)"
        raise CheckpointError(f"{os.path.join(root, TRACKER)} names iteration {it}, but {path} {what}; "
                              f"{_found(root)}. Put one of those iterations into the tracker file, "
                              f"or restore the directory")
    return path


def _read_metadata(path: str):
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 (any failure to parse means the same thing to the user)
        raise CheckpointError(f"{path}/.metadata cannot be read ({type(e).__name__}: {e}); the checkpoint is "
                              f"damaged: load an earlier iteration ({_found(os.path.dirname(path))}) by writing "
                              f"it into {TRACKER}") from e


def _check_model_shapes(model_sd: dict, metadata, path: str) -> None:
    """Compare global shapes before DCP loads anything, and name every parameter that differs."""
    saved = {k.removeprefix("model."): m for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
    problems = []
    for name, value in model_sd.items():
        meta = saved.get(name)
        if meta is None:
            problems.append(f"  {name}: shape {tuple(value.shape)} from the flags, absent from the checkpoint")
        elif hasattr(meta, "size") and tuple(meta.size) != tuple(value.shape):
            problems.append(f"  {name}: checkpoint {tuple(meta.size)} vs flags {tuple(value.shape)}")
    problems += [f"  {name}: in the checkpoint, not in the model built from the flags"
                 for name in sorted(set(saved) - set(model_sd))]
    if problems:
        hint = ""
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            hint = f" (the saving run's flags are in {cfg_file}, under \"model\")"
        raise CheckpointError(f"{path} does not match the model of these flags:\n" + "\n".join(problems[:30])
                              + ("\n  ..." if len(problems) > 30 else "")
                              + f"\nUse the model flags of the run that saved it{hint}.")


class Loaded(tuple):
    """`(iteration, consumed_samples)`, the historical return value, plus `.counters` and `.path`."""

    counters: dict | None
    path: str | None

    @classmethod
    def of(cls, counters: dict | None, path: str | None) -> Loaded:
        c = counters or {}
        out = cls((c.get("iteration", 0), c.get("consumed_samples", 0)))
        out.counters, out.path = counters, path
        return out


def load_checkpoint(root: str, model: torch.nn.Module, optimizer, loss_scaler=None, *, load_optim: bool = True,
                    load_rng: bool = True, finetune: bool = False, log=print) -> Loaded:
    """Load the checkpoint the tracker under `root` names, in place, on every rank.

    Returns `(iteration, consumed_samples)` with `.counters` (COUNTERS names; all 0 with
    `finetune`) and `.path`; `.counters` is None when `root` exists but holds no tracker yet
    (a first run of a resubmitted job). Works without a process group (one process).
    """
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory; pass the --save directory of an earlier run")
    it = latest_iteration(root)
    if it is None:
        log(f"--load {root}: no {TRACKER} found, starting from scratch")
        return Loaded.of(None, None)
    path = _resolve(root, it)
    metadata = _read_metadata(path)
    keys = metadata.state_dict_metadata
    top = {k.split(".", 1)[0] for k in keys}
    load_optim = load_optim and not finetune
    if load_optim and "optimizer" not in top:
        raise CheckpointError(f"{path} holds no optimizer state (saved with --no-save-optim, or converted); "
                              f"pass --no-load-optim or --finetune")
    opts = StateDictOptions()
    zero1 = _is_zero1(optimizer)
    if load_optim and zero1:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), _zero1_template(model, optimizer)
    elif load_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), None
    _check_model_shapes(model_sd, metadata, path)
    state = {"model": model_sd, **{k: 0 for k in (*COUNTERS, "world_size") if k in keys}}
    if optim_sd is not None:
        state["optimizer"] = optim_sd
    use_scaler = loss_scaler is not None and not finetune and "loss_scaler" in top
    if use_scaler:
        state["loss_scaler"] = loss_scaler.state_dict()
    dcp.load(state, checkpoint_id=path)
    if optim_sd is not None and zero1:
        set_model_state_dict(model, state["model"], options=opts)
        _load_zero1(model, optimizer, state["optimizer"])
    elif optim_sd is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=opts)
    else:
        set_model_state_dict(model, state["model"], options=opts)
    if use_scaler:
        loss_scaler.load_state_dict(state["loss_scaler"])
    rng_note = _restore_rng(path, int(state.get("world_size", 0)), load_rng and not finetune)
    counters = {k: int(state.get(k, 0)) for k in COUNTERS}
    if "applied_steps" not in state:  # checkpoints of older versions and converted ones
        counters["applied_steps"] = counters["iteration"]
    if finetune:
        counters = dict.fromkeys(COUNTERS, 0)
    log(f"loaded checkpoint {path} (iteration {state.get('iteration', 0)}, "
        f"{'with' if optim_sd is not None else 'without'} optimizer state, {rng_note})"
        + ("; --finetune: weights only, counters start at 0" if finetune else ""))
    return Loaded.of(counters, path)


def _restore_rng(path: str, saved_world: int, wanted: bool) -> str:
    if not wanted:
        return "RNG not restored"
    rank, world = _rank_and_world()
    if saved_world != world:
        return f"RNG not restored: saved by {saved_world} ranks, running on {world}"
    file = _rng_file(path, rank)
    if not os.path.isfile(file):
        return "RNG not restored: the checkpoint has no RNG states (--no-save-rng)"
    _set_rng_state(torch.load(file, weights_only=True))
    return "RNG restored"
