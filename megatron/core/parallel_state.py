"""Rank topology for Ulysses sequence parallelism (SP) x data parallelism (DP).

The layout is Megatron-DeepSpeed's: SP groups are blocks of consecutive ranks
(ranks 0..P-1 share every sample), DP groups are strided by the SP size, and the
sequence-data-parallel (SDP) group spans both. Parameters are replicated over SDP, so
gradients and ZeRO sharding use the SDP group.

Project code passes the `ParallelState` object around; the module-level accessors
exist only so user code written against Megatron-DeepSpeed keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_STATE: ParallelState | None = None


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks, groups and meshes of one process in the SP x DP layout.

    `mesh` has dims ("dp", "sp") in that order, so the SP coordinate varies fastest
    and SP groups are consecutive ranks. `sdp_mesh` is the 1-D mesh over all ranks of
    both axes, the one FSDP/DDP replicate and shard over.
    """

    world_size: int
    rank: int
    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    mesh: DeviceMesh
    sdp_mesh: DeviceMesh

    @property
    def sp_group(self):
        return self.mesh.get_group("sp")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def sdp_group(self):
        return self.sdp_mesh.get_group()

    @property
    def sdp_size(self) -> int:
        return self.sp_size * self.dp_size

    def describe(self) -> str:
        return (f"world={self.world_size} dp={self.dp_size} sp={self.sp_size} "
                f"(rank {self.rank}: dp_rank={self.dp_rank} sp_rank={self.sp_rank})")


def sp_group_ranks(world_size: int, sp_size: int) -> list[list[int]]:
    """The SP groups as lists of global ranks (blocks of consecutive ranks)."""
    return [list(range(start, start + sp_size)) for start in range(0, world_size, sp_size)]


def dp_group_ranks(world_size: int, sp_size: int) -> list[list[int]]:
    """The DP groups as lists of global ranks (strided by the SP size)."""
    return [list(range(offset, world_size, sp_size)) for offset in range(sp_size)]


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    *,
    device_type: str | None = None,
) -> ParallelState:
    """Build the SP x DP topology over the already initialised default process group.

    Signature-compatible with Megatron-DeepSpeed for the sizes this project supports
    (tensor and pipeline parallelism must be 1). Returns the `ParallelState` and also
    records it for the module-level accessors.
    """
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel() needs torch.distributed to be initialised first: call "
            "torch.distributed.init_process_group(backend) (launch with torchrun, which sets "
            "RANK/WORLD_SIZE/MASTER_ADDR), or megatron.initialize.initialize_distributed()."
        )
    if tensor_model_parallel_size != 1 or pipeline_model_parallel_size != 1:
        raise ValueError(
            "tensor and pipeline model parallelism are not supported by this project "
            f"(got tensor={tensor_model_parallel_size}, pipeline={pipeline_model_parallel_size}): "
            "set both to 1 and scale with --ds-sequence-parallel-size and data parallelism"
        )
    world = dist.get_world_size()
    sp = int(sequence_parallel_size)
    if sp < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sp}")
    if sp > world or world % sp:
        raise ValueError(
            f"the world size ({world}) must be a multiple of the sequence parallel size ({sp}): "
            f"launch a multiple of {sp} processes or choose --ds-sequence-parallel-size among the "
            f"divisors of {world}: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    dp = world // sp
    mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    sdp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("sdp",))
    rank = dist.get_rank()
    state = ParallelState(world_size=world, rank=rank, sp_size=sp, sp_rank=rank % sp,
                          dp_size=dp, dp_rank=rank // sp, mesh=mesh, sdp_mesh=sdp_mesh)
    _STATE = state
    return state


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "the parallel state is not initialised: call "
            "megatron.core.parallel_state.initialize_model_parallel(sequence_parallel_size=...) first"
        )
    return _STATE


def destroy_model_parallel() -> None:
    """Forget the current topology (the process groups stay valid until the world is destroyed)."""
    global _STATE
    _STATE = None


# Megatron-DeepSpeed compatibility surface -------------------------------------------------

def get_sequence_parallel_group():
    return get_parallel_state().sp_group


def get_sequence_parallel_world_size() -> int:
    return get_parallel_state().sp_size


def get_sequence_parallel_rank() -> int:
    return get_parallel_state().sp_rank


def get_data_parallel_group():
    return get_parallel_state().dp_group


def get_data_parallel_world_size() -> int:
    return get_parallel_state().dp_size


def get_data_parallel_rank() -> int:
    return get_parallel_state().dp_rank


def get_sequence_data_parallel_group():
    return get_parallel_state().sdp_group


def get_sequence_data_parallel_world_size() -> int:
    return get_parallel_state().sdp_size


def get_sequence_data_parallel_rank() -> int:
    return get_parallel_state().rank


def sequence_parallel_is_initialized() -> bool:
    return _STATE is not None


def get_tensor_model_parallel_world_size() -> int:
    return 1


def get_tensor_model_parallel_rank() -> int:
    return 0


def get_pipeline_model_parallel_world_size() -> int:
    return 1


__all__ = [
    "ParallelState", "initialize_model_parallel", "destroy_model_parallel", "get_parallel_state",
    "model_parallel_is_initialized", "get_sequence_parallel_group",
    "get_sequence_parallel_world_size", "get_sequence_parallel_rank", "get_data_parallel_group",
    "get_data_parallel_world_size", "get_data_parallel_rank", "get_sequence_data_parallel_group",
    "get_sequence_data_parallel_world_size", "get_sequence_data_parallel_rank",
    "sp_group_ranks", "dp_group_ranks",
]
