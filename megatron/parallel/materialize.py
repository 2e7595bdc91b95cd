"""Meta-device models: allocate only this rank's shards, then initialise them exactly.

A 30B model in fp32 is ~110 GiB: building it whole on every rank and moving it to the GPU
before FSDP shards it cannot work. `parallelize_gpt` therefore accepts a model built under
`torch.device("meta")` (no memory), applies FSDP2 to it, and only then allocates the local
shards (`to_empty`) and initialises them here.

Exactness: every rank walks the model's `init_plan()` in its fixed order, draws each
parameter's FULL tensor from the device's seeded RNG (the same draws a single process makes
when it initialises the plain model) and keeps its own shard. So a sharded run starts from
bit-identical weights to the single-process reference, at the cost of one parameter's full
tensor of transient memory (the largest is the embedding) and of drawing every value on
every rank.
"""

from __future__ import annotations

import torch
from torch import nn


def has_meta_parameters(model: nn.Module) -> bool:
    return any(_local(p).is_meta for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_of(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's piece of `full` under the DTensor `param`'s placements (torch.chunk
    semantics, as DTensor and FSDP2 shard; trailing ranks may hold nothing)."""
    if not hasattr(param, "placements"):
        return full
    mesh = param.device_mesh
    out = full
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            pieces = torch.chunk(out, mesh.size(mesh_dim), dim=placement.dim)
            index = mesh.get_local_rank(mesh_dim)
            if index < len(pieces):
                out = pieces[index]
            else:
                shape = list(out.shape)
                shape[placement.dim] = 0
                out = out.new_empty(shape)
    return out


@torch.no_grad()
def materialize_(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate the meta parameters of `model` (FSDP-sharded or not) on `device` and initialise
    them from the current RNG of `device` in `model.init_plan()` order."""
    model.to_empty(device=device)
    for param, init in model.init_plan():
        local = _local(param)
        full = torch.empty(tuple(param.shape), dtype=local.dtype, device=device)
        init(full)
        piece = _shard_of(full, param)
        if piece.shape != local.shape:
            raise RuntimeError(f"materialize: shard of shape {tuple(piece.shape)} for a local tensor of shape "
                               f"{tuple(local.shape)}; the sharding is not a torch.chunk of dim 0")
        local.copy_(piece)
        del full
    return model
