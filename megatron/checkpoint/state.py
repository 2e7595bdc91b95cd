"""What a checkpoint holds, part by part.

Each part is a torch `Stateful` (`state_dict()` / `load_state_dict()`) plus
`template(keys)`: the entries to read for it, given what the checkpoint holds (None: read
nothing). `key` is the part's top-level name; None puts its entries at the top level.
The names on disk are those of the first version, so older checkpoints and the tools
keep working:

    model.<fqn>                                     get_model_state_dict: one name per parameter for
                                                    a plain module, DDP and FSDP2 (global shapes)
    optimizer.state.<fqn>.{step,exp_avg,exp_avg_sq} Adam state by parameter name, global shapes,
                                                    `step` per parameter whatever the implementation
    optimizer.param_groups                          for people; on load the flags give the hyperparameters
    loss_scaler.*                                   fp16 dynamic scaler
    iteration, consumed_tokens, applied_steps, skipped_iters    the train state (top level)
    consumed_samples                                the data position (top level)
    rng/rank_XXXXX.pt                               per-rank generators + layout (a file, not DCP:
                                                    DCP would write one replicated value for all ranks)

Resharding: model and FSDP optimizer state are DTensors or plain tensors with global
shapes, which DCP reshards on load. ZeroRedundancyOptimizer (ZeRO-1) is not understood by
`get_state_dict`, so its state is written here by name: each rank writes the entries of the
parameters it owns, and reads back only those it owns under the new layout. Nothing is
gathered, and no rank ever holds another partition's moments.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


class CheckpointKeys:
    """What one checkpoint holds, from its DCP metadata: top-level keys and optimizer entries by name."""

    def __init__(self, metadata) -> None:
        lookup = metadata.planner_data or {}
        self.roots: set = set()
        self.optimizer_state: dict[str, set] = {}
        for fqn in metadata.state_dict_metadata:
            path = tuple(lookup.get(fqn, (fqn,)))
            self.roots.add(path[0])
            if len(path) == 4 and path[:2] == ("optimizer", "state"):
                self.optimizer_state.setdefault(path[2], set()).add(path[3])


def _names(model: torch.nn.Module) -> dict:
    """Parameter -> the name DCP's state_dict helpers give it (DDP's "module." dropped)."""
    return {p: n.removeprefix("module.") for n, p in model.named_parameters()}


class ModelPart:
    key = "model"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def template(self, keys: CheckpointKeys) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, sd)


class OptimizerPart:
    """Adam state by parameter name, for FSDP (DTensor parameters, via DCP's helpers) and for
    plain parameters (one optimizer, or ZeroRedundancyOptimizer's local one: the rank's partition).

    `step_in_param_groups`: the optimizer keeps Adam's step as an int in each param group
    (apex FusedAdam) instead of a tensor per parameter; it is written per parameter all the same,
    so a checkpoint loads under either implementation.
    """

    key = "optimizer"

    def __init__(self, model: torch.nn.Module, optimizer, step_in_param_groups: bool = False) -> None:
        self.model, self.optimizer, self.step_in_groups = model, optimizer, step_in_param_groups
        zero = sys.modules.get("torch.distributed.optim")  # not imported: no ZeroRedundancyOptimizer exists
        self.zero1 = zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)
        self.local = optimizer.optim if self.zero1 else optimizer  # the optimizer that holds state
        self.fsdp = any(hasattr(p, "to_local") for p in model.parameters())
        self._groups = None

    # ---------------------------------------------------------------- save

    def state_dict(self) -> dict:
        if self.fsdp:
            return get_optimizer_state_dict(self.model, self.optimizer)
        names = _names(self.model)
        state = {}
        for g in self.local.param_groups:
            for p in g["params"]:
                s = self.local.state.get(p)
                if not s or "exp_avg" not in s:
                    continue  # never stepped
                step = s["step"] if "step" in s else g.get("step", 0)
                state[names[p]] = {"step": torch.as_tensor(step, dtype=torch.float32).detach().reshape(()).cpu(),
                                   "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        # the wrapper's groups list every parameter on every rank (identical everywhere)
        groups = [{**{k: v for k, v in g.items() if k not in ("params", "step")},
                   "params": [names[p] for p in g["params"]]} for g in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    # ---------------------------------------------------------------- load

    def template(self, keys: CheckpointKeys) -> dict:
        saved = keys.optimizer_state
        if self.fsdp:
            full = get_optimizer_state_dict(self.model, self.optimizer)  # allocates this rank's shards
            self._groups = full["param_groups"]
            return {"state": {n: {k: v for k, v in s.items() if k in saved[n]}
                              for n, s in full["state"].items() if n in saved}}
        names = _names(self.model)
        moment_dtype = torch.float32 if self.step_in_groups else None  # apex keeps fp32 moments
        state = {}
        for g in self.local.param_groups:  # only the parameters this rank owns
            for p in g["params"]:
                n = names[p]
                if n not in saved:
                    continue
                t = {"step": torch.zeros((), dtype=torch.float32)}
                for k in ("exp_avg", "exp_avg_sq"):
                    t[k] = torch.zeros_like(p, dtype=moment_dtype or p.dtype)
                state[n] = {k: v for k, v in t.items() if k in saved[n]}
        return {"state": state}

    def load_state_dict(self, sd: dict) -> None:
        by_name = sd["state"]
        if self.fsdp:
            set_optimizer_state_dict(self.model, self.optimizer, {"state": by_name, "param_groups": self._groups})
            return
        names = _names(self.model)
        if self.step_in_groups:
            self._load_step_in_groups(by_name, names)
            return
        # torch optimizers: their own load_state_dict puts each value where the implementation wants
        # it (fused: step on the parameter's device); hyperparameters stay those of the flags
        order = [p for g in self.local.param_groups for p in g["params"]]
        state = {i: by_name[names[p]] for i, p in enumerate(order) if names[p] in by_name}
        groups, offset = [], 0
        for g in self.local.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(offset, offset + len(g["params"])))})
            offset += len(g["params"])
        self.local.load_state_dict({"state": state, "param_groups": groups})

    def _load_step_in_groups(self, by_name: dict, names: dict) -> None:
        """apex FusedAdam: fp32 moments per parameter, one int step per param group."""
        outer = self.optimizer.param_groups if self.zero1 else [None] * len(self.local.param_groups)
        for g, wrapper_group in zip(self.local.param_groups, outer):
            steps = []
            for p in g["params"]:
                s = by_name.get(names[p])
                if s is None:
                    continue
                self.local.state[p] = {k: s[k].to(device=p.device, dtype=torch.float32)
                                       for k in ("exp_avg", "exp_avg_sq") if k in s}
                if "step" in s:
                    steps.append(int(s["step"]))
            if steps:  # equal within a group unless the saving optimizer skipped parameters
                g["step"] = max(steps)
                if wrapper_group is not None:
                    wrapper_group["step"] = g["step"]


class ScalerPart:
    key = "loss_scaler"

    def __init__(self, scaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def template(self, keys: CheckpointKeys) -> dict | None:
        return self.scaler.state_dict() if self.key in keys.roots else None

    def load_state_dict(self, sd: dict) -> None:
        self.scaler.load_state_dict(sd)


class _Counters:
    """Integer counters of an object (the trainer's TrainState), stored at the top level."""

    key = None
    names: tuple = ()

    def __init__(self, holder) -> None:
        self.holder = holder

    def state_dict(self) -> dict:
        return {k: int(getattr(self.holder, k)) for k in self.names}

    def template(self, keys: CheckpointKeys) -> dict:
        return {k: 0 for k in self.names if k in keys.roots}

    def load_state_dict(self, sd: dict) -> None:
        for k in self.names:
            setattr(self.holder, k, int(sd.get(k, 0)))


class DataPositionPart(_Counters):
    """Samples consumed so far: the data iterators are rebuilt at this position after loading."""

    names = ("consumed_samples",)


class TrainStatePart(_Counters):
    """Iteration and the counters that follow it; older checkpoints lack some (derived here)."""

    names = ("iteration", "consumed_tokens", "applied_steps", "skipped_iters")

    def __init__(self, holder, seq_length: int | None = None) -> None:
        super().__init__(holder)
        self.seq_length = seq_length

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        if not self.holder.consumed_tokens and self.seq_length:
            self.holder.consumed_tokens = self.holder.consumed_samples * self.seq_length
        if "applied_steps" not in sd:  # checkpoints of older versions and converted ones
            self.holder.applied_steps = self.holder.iteration


# ------------------------------------------------------------------------------ RNG


def layout_of(parallel_state, rank: int, world: int) -> dict:
    """The rank layout RNG streams belong to: degrees and this rank's coordinates."""
    if parallel_state is None:
        return {"world_size": world, "rank": rank}
    ps = parallel_state
    return {"world_size": ps.world_size, "rank": ps.rank, "sp": ps.sp_size, "dp": ps.dp_size,
            "ring": ps.ring_size, "sp_rank": ps.sp_rank, "dp_rank": ps.dp_rank, "ring_rank": ps.ring_rank}


class RNGPart:
    """This rank's Python, NumPy, torch CPU and CUDA generators, with the layout that used them.

    Restored only when the layout is the same (degrees and this rank's coordinates): a
    stream belongs to the tokens and heads a rank held. Otherwise each rank keeps the fresh
    stream the run seeded (seed + 1 + rank) and a note says why.
    """

    def __init__(self, layout: dict) -> None:
        self.layout = layout

    def state_dict(self) -> dict:
        """In a form that `torch.load(weights_only=True)` accepts."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                 "torch": torch.get_rng_state(), "layout": dict(self.layout)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def mismatch(self, state: dict, saved_world: int) -> str | None:
        saved = state.get("layout")
        if saved is None:  # files of older versions: only the world size is known
            return None if saved_world == self.layout["world_size"] else \
                f"saved by {saved_world} ranks, running on {self.layout['world_size']}"
        keys = [k for k in ("world_size", "sp", "dp", "ring") if k in saved or k in self.layout]
        if any(saved.get(k) != self.layout.get(k) for k in (*keys, "rank", "sp_rank", "dp_rank", "ring_rank")):
            desc = lambda d: " ".join(f"{k}={d.get(k)}" for k in keys)  # noqa: E731
            return f"saved with layout {desc(saved)}, running with {desc(self.layout)}"
        return None

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
