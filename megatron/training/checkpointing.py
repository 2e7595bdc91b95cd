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

This is the minimal, correct core; periodic saving and resumption on a changed layout
are extended here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

TRACKER = "latest_checkpointed_iteration.txt"


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


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model: torch.nn.Module, optimizer,
                    loss_scaler=None, save_optim: bool = True, log=print) -> str:
    """Write `root/iter_XXXXXXX` with model (+ optimizer) state; collective over all ranks."""
    path = checkpoint_dir(root, iteration)
    opts = StateDictOptions()
    if save_optim and _is_zero1(optimizer):
        model_sd, optim_sd = get_model_state_dict(model, options=opts), _zero1_state_by_name(model, optimizer)
    elif save_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), None
    state = {"model": model_sd, "iteration": iteration, "consumed_samples": consumed_samples}
    if optim_sd is not None:
        state["optimizer"] = optim_sd
    if loss_scaler is not None:
        state["loss_scaler"] = loss_scaler.state_dict()
    dcp.save(state, checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, TRACKER), "w") as f:
            f.write(str(iteration))
        log(f"saved checkpoint at iteration {iteration} to {path}")
    dist.barrier()
    return path


def latest_iteration(root: str) -> int | None:
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        return int(f.read().strip())


def load_checkpoint(root: str, model: torch.nn.Module, optimizer, loss_scaler=None, load_optim: bool = True,
                    log=print) -> tuple[int, int]:
    """Load the latest checkpoint under `root` in place; returns (iteration, consumed_samples).

    Returns (0, 0) when `root` holds no checkpoint yet, so a first run with --load works.
    """
    it = latest_iteration(root)
    if it is None:
        log(f"--load {root}: no {TRACKER} found, starting from scratch")
        return 0, 0
    path = checkpoint_dir(root, it)
    opts = StateDictOptions()
    zero1 = _is_zero1(optimizer)
    if load_optim and zero1:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), _zero1_template(model, optimizer)
    elif load_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), None
    state = {"model": model_sd, "iteration": 0, "consumed_samples": 0}
    if optim_sd is not None:
        state["optimizer"] = optim_sd
    if loss_scaler is not None:
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
    if loss_scaler is not None:
        loss_scaler.load_state_dict(state["loss_scaler"])
    log(f"loaded checkpoint {path} (iteration {state['iteration']}, "
        f"{'with' if optim_sd is not None else 'without'} optimizer state)")
    return int(state["iteration"]), int(state["consumed_samples"])
