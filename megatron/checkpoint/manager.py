"""CheckpointManager: load-or-start, save, and the rules that keep checkpoints safe.

    manager = CheckpointManager(cfg.checkpoint, run_config=cfg, parallel_state=ps, log=print)
    manager.prepare()                   # before the model is built: decide what to load, refuse
                                        # damaged or mismatched checkpoints and unsafe --save dirs
    manager.attach(model, optimizer, scaler, trainer.state)
    manager.load()                      # in place; no-op when starting from scratch
    manager.save(iteration)             # at intervals, on signals, at the end

Rules (docs/checkpoints.md says the same to users):
- `--load` is a `--save` directory (the tracker names the iteration; without a tracker the
  newest complete one, with a note) or one `iter_XXXXXXX` directory.
- A damaged checkpoint (unreadable index, missing or truncated shard, checksum mismatch) is
  an error naming each file and the newest complete checkpoint before it. `--load-fallback`
  loads that one instead (with a warning) and renames the damaged directory `*.damaged`:
  falling back is never silent, because a transient read error on a network file system
  would otherwise throw away the newest progress.
- A run never replaces or deletes a checkpoint under `--save` that it did not start from,
  unless `--overwrite-checkpoints`: checked before training, not at the first save.
- The same iteration is never saved twice by one run (nor the one it loaded).
- RNG states come back only on the same rank layout.
- `--save` must be one directory shared by all ranks (checked once, before training).
Every error a user can fix is a CheckpointError.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid

from megatron.checkpoint import compat, storage
from megatron.checkpoint import format as fmt
from megatron.checkpoint.format import CheckpointError, DamagedCheckpoint, Target
from megatron.checkpoint.state import (
    CheckpointKeys,
    DataPositionPart,
    ModelPart,
    OptimizerPart,
    RNGPart,
    ScalerPart,
    TrainStatePart,
    layout_of,
)

COUNTERS = ("iteration", "consumed_samples", "consumed_tokens", "applied_steps", "skipped_iters")


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


class CheckpointManager:
    def __init__(self, cfg, *, run_config=None, parallel_state=None, log=print, no_dist: bool = False) -> None:
        self.cfg, self.run_config, self.ps, self.log = cfg, run_config, parallel_state, log
        self.ranks = storage._Ranks(no_dist)
        self.no_dist = not self.ranks.dist
        self.target: Target | None = None
        self.parts: dict = {}
        self.rng: RNGPart | None = None
        self._saved: set = set()  # iterations under --save this run wrote or started from
        self._remove_after: list = []  # checkpoints to delete after the first save (--overwrite-checkpoints)
        self._prepared = False

    # ------------------------------------------------------------------ collective helpers

    def _on_rank0(self, fn):
        """Run `fn` on rank 0 and give its result (or its CheckpointError) to every rank."""
        result, err = None, None
        if self.ranks.rank == 0:
            try:
                result = fn()
            except CheckpointError as e:
                err = e
            except OSError as e:  # an unreadable or unwritable path is a user error too
                err = CheckpointError(f"{e.filename or 'a checkpoint path'}: {e.strerror or e}; check the path and "
                                      f"its permissions")
        if self.no_dist:
            if err is not None:
                raise err
            return result
        result, err = self.ranks.gather((result, err))[0]
        if err is not None:
            raise err
        return result

    # ------------------------------------------------------------------ before the model is built

    def prepare(self) -> None:
        """Decide what to load and check that loading and saving are safe; collective."""
        cfg = self.cfg
        if cfg.load:
            if not os.path.exists(cfg.load) and fmt.same_dir(cfg.load, cfg.save):
                # a resubmittable job (--save and --load the same directory) on its first run
                self.log(f"--load {cfg.load}: does not exist yet (same as --save), starting from scratch")
            else:
                self.target = self._on_rank0(lambda: fmt.resolve_load(cfg.load))
                if self.target is None:
                    self.log(f"--load {cfg.load}: no {fmt.TRACKER} and no checkpoint found, starting from scratch")
                else:
                    self._check_integrity()
                    if self.run_config is not None:
                        self._on_rank0(lambda: compat.check_config(self.target.path, self.run_config))
        if cfg.save:
            self._check_save_dir()
            if self.ranks.world > 1:
                self._check_shared(cfg.save)
        self._prepared = True

    def _check_integrity(self) -> None:
        """Complete (cheap, rank 0) and verified (checksums, split over ranks); falls back if allowed."""
        while True:
            t = self.target
            try:
                files, sums = self._on_rank0(lambda t=t: _files_to_verify(t.path))
                if t.note:
                    self.log(f"note: {t.note}")
                storage.verify_checksums(t.path, files, sums, no_dist=self.no_dist)
                return
            except DamagedCheckpoint as e:
                older = self._on_rank0(lambda t=t: fmt.newest_complete(t.root, below=t.iteration))
                if not self.cfg.load_fallback:
                    raise CheckpointError(_damage_message(t, e, older)) from None
                if older is None:
                    raise CheckpointError(_damage_message(t, e, None) + " --load-fallback found nothing to fall "
                                          "back to.") from None
                self.log(f"WARNING: {_what(t, e)}; --load-fallback: loading the newest complete checkpoint before "
                         f"it, iteration {older}, instead")
                self._on_rank0(lambda t=t: self._set_aside(t))
                self.target = Target(t.root, fmt.checkpoint_dir(t.root, older), older,
                                     note=f"--load-fallback chose iteration {older}")

    def _set_aside(self, damaged: Target) -> None:
        """Rename a damaged directory that this run's saves would otherwise collide with."""
        if not (fmt.same_dir(damaged.root, self.cfg.save) and os.path.isdir(damaged.path)):
            return
        dest = damaged.path + fmt.DAMAGED
        n = 1
        while os.path.exists(dest):
            n += 1
            dest = f"{damaged.path}{fmt.DAMAGED}{n}"
        os.rename(damaged.path, dest)
        self.log(f"renamed the damaged {damaged.path} to {dest} (kept, not deleted)")

    def _check_save_dir(self) -> None:
        """Refuse (before training) a --save directory holding checkpoints this run would overwrite."""
        cfg, t = self.cfg, self.target
        start = 0 if t is None or cfg.finetune else t.iteration
        continues = t is not None and not cfg.finetune and fmt.same_dir(t.root, cfg.save)

        def conflicts():
            return [it for it in fmt.iteration_dirs(cfg.save) if it > start or (it == start and not continues)]

        found = self._on_rank0(conflicts)
        if continues:
            self._saved.add(start)
        if not found:
            return
        listed = ", ".join(map(str, found[:10])) + (" ..." if len(found) > 10 else "")
        if cfg.overwrite_checkpoints:
            self.log(f"--overwrite-checkpoints: the checkpoints of iterations {listed} under {cfg.save} were not "
                     f"written by the run this one continues; they are replaced or removed from the first save on")
            self._remove_after = list(found)
            return
        if t is None:
            origin = "starts from scratch" + (f" (--load {cfg.load} held no checkpoint)" if cfg.load else "")
        elif cfg.finetune:
            origin = f"starts at iteration 0 (--finetune from {t.path})"
        else:
            origin = f"starts from iteration {start} ({t.path})"
        raise CheckpointError(
            f"--save {cfg.save} already holds checkpoints this run did not start from (iterations {listed}); this "
            f"run {origin}, so its saves would overwrite them or leave the tracker pointing back. Resume from "
            f"the newest with --load {cfg.save}, choose another --save directory, or pass --overwrite-checkpoints "
            f"to let this run replace them")

    def _check_shared(self, root: str) -> None:
        """Every rank writes a marker into `root`; rank 0 must see all of them (it renames what they write)."""
        nonce = self.ranks.gather(uuid.uuid4().hex if self.ranks.rank == 0 else None)[0]
        check = os.path.join(root, f".shared-check-{nonce}")
        err = None
        try:
            os.makedirs(check, exist_ok=True)
            with open(os.path.join(check, f"rank_{self.ranks.rank:05d}"), "w") as f:
                f.write(socket.gethostname())
        except OSError as e:
            err = f"rank {self.ranks.rank} ({socket.gethostname()}) cannot write into {root}: {e}"
        errors = [e for e in self.ranks.gather(err) if e]
        if errors:
            raise CheckpointError(f"--save {root} is not writable from every rank: " + "; ".join(errors[:4]))
        hosts = self.ranks.gather(socket.gethostname())

        def missing():
            seen = set(os.listdir(check)) if os.path.isdir(check) else set()
            return [r for r in range(self.ranks.world) if f"rank_{r:05d}" not in seen]

        absent = self._on_rank0(missing)
        with contextlib.suppress(OSError):  # each rank removes its marker (a node-local directory has only its own)
            os.remove(os.path.join(check, f"rank_{self.ranks.rank:05d}"))
        self.ranks.gather(None)
        if self.ranks.rank == 0 or absent:
            with contextlib.suppress(OSError):
                os.rmdir(check)
        if absent:
            def message():  # rank 0's view, the same text on every rank
                others = sorted({hosts[r] for r in absent})
                return (f"--save {root} is not one directory shared by all ranks: rank 0 (on {hosts[0]}) does not "
                        f"see the files that ranks {absent[:8]}{' ...' if len(absent) > 8 else ''} (on "
                        f"{', '.join(others)}) wrote there. Every rank writes its own shards and rank 0 renames the "
                        f"checkpoint, so --save must be on a file system that all nodes mount at the same path (NFS, "
                        f"Lustre, GPFS); pass such a path")
            raise CheckpointError(self._on_rank0(message))

    # ------------------------------------------------------------------ parts

    def attach(self, model, optimizer=None, scaler=None, train_state=None) -> None:
        """Register what a checkpoint holds: model, optimizer, loss scaler, train state + data position, RNG."""
        run = self.run_config
        self.parts = {"model": ModelPart(model)}
        if optimizer is not None:
            apex = run is not None and run.optim.optimizer_impl == "apex"
            self.parts["optimizer"] = OptimizerPart(model, optimizer, step_in_param_groups=apex)
        if scaler is not None:
            self.parts["loss_scaler"] = ScalerPart(scaler)
        if train_state is not None:
            self.parts["data"] = DataPositionPart(train_state)
            self.parts["train"] = TrainStatePart(train_state, run.data.seq_length if run is not None else None)
        self.rng = RNGPart(layout_of(self.ps, self.ranks.rank, self.ranks.world))

    # ------------------------------------------------------------------ load

    def load(self) -> Loaded:
        """Load the prepared target into the attached parts, in place, on every rank."""
        if not self._prepared:
            self.prepare()
        cfg, t = self.cfg, self.target
        if t is None:
            return Loaded.of(None, None)
        metadata = fmt.read_metadata(t.path)
        keys = CheckpointKeys(metadata)
        load_optim = "optimizer" in self.parts and not cfg.no_load_optim and not cfg.finetune
        if load_optim and "optimizer" not in keys.roots:
            raise CheckpointError(f"{t.path} holds no optimizer state (saved with --no-save-optim, or converted); "
                                  f"pass --no-load-optim or --finetune")
        wanted = {"model"} | ({"optimizer"} if load_optim else set())
        if not cfg.finetune:
            wanted |= {"loss_scaler", "data", "train"}
        parts = {k: p for k, p in self.parts.items() if k in wanted}
        state: dict = {}
        for part in parts.values():
            tmpl = part.template(keys)
            if tmpl is None:
                continue
            if part.key is None:
                state.update(tmpl)
            else:
                state[part.key] = tmpl
        if "world_size" in keys.roots:
            state["world_size"] = 0
        compat.check_model_shapes(state["model"], metadata, t.path)
        storage.read_state(t.path, state, no_dist=self.no_dist)
        for part in parts.values():
            if part.key is None:
                part.load_state_dict({k: state[k] for k in part.names if k in state})
            elif part.key in state:
                part.load_state_dict(state[part.key])
        rng_note = self._restore_rng(t.path, int(state.get("world_size", 0)))
        counters = {k: int(state.get(k, 0)) for k in COUNTERS}
        if "applied_steps" not in state:
            counters["applied_steps"] = counters["iteration"]
        if cfg.finetune:
            counters = dict.fromkeys(COUNTERS, 0)
        self.log(f"loaded checkpoint {t.path} (iteration {state.get('iteration', t.iteration)}, "
                 f"{'with' if load_optim else 'without'} optimizer state, {rng_note})"
                 + ("; --finetune: weights only, counters start at 0" if cfg.finetune else ""))
        return Loaded.of(counters, t.path)

    def _restore_rng(self, path: str, saved_world: int) -> str:
        import torch  # noqa: PLC0415

        if self.cfg.no_load_rng or self.cfg.finetune or self.rng is None:
            return "RNG not restored"
        file = fmt.rng_file(path, self.ranks.rank)
        if not os.path.isfile(file):
            return "RNG not restored: the checkpoint has no RNG states (--no-save-rng)"
        try:
            state = torch.load(file, weights_only=True)
        except Exception as e:  # noqa: BLE001 (checkpoints without checksums.json are not verified)
            raise CheckpointError(f"{file} cannot be read ({type(e).__name__}); the checkpoint is damaged: "
                                  f"pass --no-load-rng to load it without RNG states") from e
        why = self.rng.mismatch(state, saved_world)
        if why is not None:
            return f"RNG not restored: {why}; each rank continues with the stream this run seeded"
        self.rng.load_state_dict(state)
        return "RNG restored"

    # ------------------------------------------------------------------ save

    def save(self, iteration: int) -> str | None:
        """Write a checkpoint of `iteration` under --save; None if this run already has it. Collective."""
        from megatron import __version__  # noqa: PLC0415

        cfg = self.cfg
        if not cfg.save:
            raise CheckpointError("save() needs --save")
        if not self._prepared:
            self.prepare()
        if iteration in self._saved:  # e.g. --exit-interval on a --save-interval step, or nothing trained
            return None
        state: dict = {}
        for name, part in self.parts.items():
            if name == "optimizer" and cfg.no_save_optim:
                continue
            sd = part.state_dict()
            if part.key is None:
                state.update(sd)
            else:
                state[part.key] = sd
        state.update({"world_size": self.ranks.world, "version": __version__})
        config = None
        if self.run_config is not None:
            config = compat.config_for_checkpoint(self.run_config, __version__)
            state["config"] = _json(config)
        rank_files = {}
        if not cfg.no_save_rng and self.rng is not None:
            rank_files[os.path.relpath(fmt.rng_file("", self.ranks.rank))] = self.rng.state_dict()
        path = storage.write_checkpoint(cfg.save, iteration, state, rank_files=rank_files, config=config,
                                        overwrite=cfg.overwrite_checkpoints, keep_last=cfg.keep_last,
                                        remove_after=self._remove_after, no_dist=self.no_dist, log=self.log)
        self._remove_after = []
        self._saved.add(iteration)
        return path


# ------------------------------------------------------------------------------ helpers


def _files_to_verify(path: str) -> tuple[list, dict]:
    fmt.check_complete(path)
    sums = fmt.read_checksums(path)
    return (sorted(sums), sums) if sums else ([], {})


def _what(t: Target, e: DamagedCheckpoint) -> str:
    if e.problems == ["it is missing"]:
        tracked = os.path.join(t.root, fmt.TRACKER)
        if t.note is None and os.path.isfile(tracked):
            return f"{tracked} names iteration {t.iteration}, but {t.path} is missing"
        return f"{t.path} is missing"
    return f"{t.path} is damaged: " + "; ".join(e.problems)


def _damage_message(t: Target, e: DamagedCheckpoint, older: int | None) -> str:
    msg = f"{_what(t, e)}; {fmt.found(t.root)}."
    if older is None:
        return msg + " No complete checkpoint precedes it: restore the damaged files, or start from scratch " \
                     "in another --save directory."
    return (msg + f" The newest complete checkpoint before it is {fmt.checkpoint_dir(t.root, older)} (iteration "
            f"{older}): pass --load-fallback to resume from it (the damaged directory is then renamed "
            f"{os.path.basename(t.path)}{fmt.DAMAGED}, not deleted), or restore the damaged files.")


def _json(obj) -> str:
    import json  # noqa: PLC0415

    return json.dumps(obj, default=str)


# ------------------------------------------------------------------------------ one-call API


def load_checkpoint(root: str, model, optimizer=None, loss_scaler=None, *, load_optim: bool = True,
                    load_rng: bool = True, finetune: bool = False, log=print) -> Loaded:
    """Load the checkpoint `root` names into `model` (and `optimizer`, `loss_scaler`) in place.

    `root` is a --save directory or one iter_XXXXXXX directory. Returns `(iteration,
    consumed_samples)` with `.counters` (COUNTERS names; all 0 with `finetune`) and `.path`;
    `.counters` is None when `root` holds no checkpoint yet. Collective when a process group
    exists; works without one (one process), as the tools and tests use it.
    """
    from types import SimpleNamespace  # noqa: PLC0415

    from megatron.config import CheckpointConfig  # noqa: PLC0415

    cfg = CheckpointConfig(load=root, no_load_optim=not load_optim or optimizer is None, no_load_rng=not load_rng,
                           finetune=finetune)
    manager = CheckpointManager(cfg, log=log)
    manager.prepare()
    holder = SimpleNamespace(**dict.fromkeys(COUNTERS, 0))
    manager.attach(model, optimizer, loss_scaler, holder)
    return manager.load()
