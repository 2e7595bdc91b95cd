"""Rank topology for sequence parallelism (SP) x data parallelism (DP).

The layout is Megatron-DeepSpeed's: SP groups are blocks of consecutive ranks
(ranks 0..P-1 share every sample), DP groups are strided by the SP size, and the
sequence-data-parallel (SDP) group spans both. Parameters are replicated over SDP, so
gradients and ZeRO sharding use the SDP group.

With ring attention (`ring_attention_size=R > 1`) the SP group of P ranks is a 2-D mesh
(ring R) x (ulysses U = P/R) with the Ulysses coordinate varying fastest:

    sp_rank = ring_rank * U + ulysses_rank        global rank = dp_rank * P + sp_rank

so every Ulysses group is U consecutive ranks (its two all-to-alls per layer, the bulk of
the traffic, stay inside a node when U divides the GPUs per node) and ring groups are
strided by U (their point-to-point K/V exchange is the traffic that crosses nodes).

Project code passes the `ParallelState` object around; the module-level accessors
exist only so user code written against Megatron-DeepSpeed keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron.core.topology import Topology

_STATE: ParallelState | None = None


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks, groups and meshes of one process in the SP x DP layout.

    `mesh` has dims ("dp", "sp") in that order, so the SP coordinate varies fastest
    and SP groups are consecutive ranks. `sdp_mesh` is the 1-D mesh over all ranks of
    both axes, the one FSDP/DDP replicate and shard over. `sp2d_mesh` (only when
    ring_size > 1) has dims ("dp", "ring", "ulysses") and splits each SP group into
    ring x ulysses, Ulysses fastest (see the module docstring).
    """

    world_size: int
    rank: int
    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    mesh: DeviceMesh
    sdp_mesh: DeviceMesh
    ring_size: int = 1
    ring_rank: int = 0
    sp2d_mesh: DeviceMesh | None = None
    device_type: str = "cpu"

    @property
    def topology(self) -> Topology:
        return Topology(self.world_size, self.sp_size, self.ring_size)

    @property
    def device(self) -> torch.device:
        """The device every tensor entering this state's collectives must live on."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    @property
    def ulysses_size(self) -> int:
        return self.sp_size // self.ring_size

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_size

    @property
    def ulysses_group(self):
        """The all-to-all group: the whole SP group when there is no ring axis."""
        return self.sp_group if self.sp2d_mesh is None else self.sp2d_mesh.get_group("ulysses")

    @property
    def ring_group(self):
        """The K/V ring; None when ring_size == 1 (no ring axis)."""
        return None if self.sp2d_mesh is None else self.sp2d_mesh.get_group("ring")

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
        ring = (f" = ulysses {self.ulysses_size} x ring {self.ring_size}" if self.ring_size > 1 else "")
        coords = (f", ulysses_rank={self.ulysses_rank} ring_rank={self.ring_rank}" if self.ring_size > 1 else "")
        return (f"world={self.world_size} dp={self.dp_size} sp={self.sp_size}{ring} "
                f"(rank {self.rank}: dp_rank={self.dp_rank} sp_rank={self.sp_rank}{coords})")


def sp_group_ranks(world_size: int, sp_size: int) -> list[list[int]]:
    """The SP groups as lists of global ranks (blocks of consecutive ranks)."""
    return Topology(world_size, sp_size).sp_groups()


def dp_group_ranks(world_size: int, sp_size: int) -> list[list[int]]:
    """The DP groups as lists of global ranks (strided by the SP size)."""
    return Topology(world_size, sp_size).dp_groups()


def ulysses_group_ranks(world_size: int, sp_size: int, ring_size: int) -> list[list[int]]:
    """The Ulysses (all-to-all) groups: blocks of sp_size / ring_size consecutive ranks."""
    return Topology(world_size, sp_size, ring_size).ulysses_groups()


def ring_group_ranks(world_size: int, sp_size: int, ring_size: int) -> list[list[int]]:
    """The ring groups: inside each SP block, ranks strided by the Ulysses size."""
    return Topology(world_size, sp_size, ring_size).ring_groups()


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    *,
    ring_attention_size: int = 1,
    device_type: str | None = None,
) -> ParallelState:
    """Build the SP x DP topology over the already initialised default process group.

    Signature-compatible with Megatron-DeepSpeed for the sizes this project supports
    (tensor and pipeline parallelism must be 1). `ring_attention_size` R splits each SP
    group into a ring of R Ulysses groups of P/R ranks (R = P: pure ring attention,
    R = 1: pure Ulysses). Returns the `ParallelState` and also records it for the
    module-level accessors.
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
    topology = Topology(world, int(sequence_parallel_size), int(ring_attention_size))
    sp, ring = topology.sp_size, topology.ring_size
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    dp = topology.dp_size
    # Gloo gives up on a peer that is not listening yet after a few quick retries, so a rank
    # that reaches group creation well before the others (e.g. while they still save the
    # previous run's checkpoint) can fail; meet on the default group first.
    dist.barrier()
    mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    sdp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("sdp",))
    sp2d_mesh = None
    if ring > 1:  # row-major (dp, ring, ulysses): the Ulysses coordinate varies fastest
        sp2d_mesh = init_device_mesh(device_type, (dp, ring, sp // ring),
                                     mesh_dim_names=("dp", "ring", "ulysses"))
    c = topology.coords(dist.get_rank())
    state = ParallelState(world_size=world, rank=c.rank, sp_size=sp, sp_rank=c.sp_rank,
                          dp_size=dp, dp_rank=c.dp_rank, mesh=mesh, sdp_mesh=sdp_mesh,
                          ring_size=ring, ring_rank=c.ring_rank, sp2d_mesh=sp2d_mesh, device_type=device_type)
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


def get_ring_attention_group():
    return get_parallel_state().ring_group


def get_ring_attention_world_size() -> int:
    return get_parallel_state().ring_size


def get_ring_attention_rank() -> int:
    return get_parallel_state().ring_rank


def get_ulysses_group():
    return get_parallel_state().ulysses_group


def get_ulysses_world_size() -> int:
    return get_parallel_state().ulysses_size


def get_ulysses_rank() -> int:
    return get_parallel_state().ulysses_rank


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
    "sp_group_ranks", "dp_group_ranks", "ulysses_group_ranks", "ring_group_ranks",
    "get_ring_attention_group", "get_ring_attention_world_size", "get_ring_attention_rank",
    "get_ulysses_group", "get_ulysses_world_size", "get_ulysses_rank",
]
