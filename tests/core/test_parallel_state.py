"""Rank layout of initialize_model_parallel on real gloo ranks."""

import pytest
import torch.distributed as dist

from megatron.core import parallel_state as ps


def _layout(sp):
    state = ps.initialize_model_parallel(sequence_parallel_size=sp)
    out = {
        "sp": dist.get_process_group_ranks(ps.get_sequence_parallel_group()),
        "dp": dist.get_process_group_ranks(ps.get_data_parallel_group()),
        "sdp": dist.get_process_group_ranks(ps.get_sequence_data_parallel_group()),
        "sp_rank": ps.get_sequence_parallel_rank(),
        "sp_size": ps.get_sequence_parallel_world_size(),
        "dp_rank": state.dp_rank,
        "mesh_sp_rank": state.mesh.get_local_rank("sp"),
        "mesh_dp_rank": state.mesh.get_local_rank("dp"),
    }
    ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("world,sp", [(4, 1), (4, 2), (4, 4), (2, 2)])
def test_megatron_deepspeed_rank_layout(ranks, world, sp):
    results = ranks(world, _layout, sp)
    for rank, r in enumerate(results):
        block = rank // sp * sp
        assert r["sp"] == list(range(block, block + sp))  # SP: consecutive ranks
        assert r["dp"] == list(range(rank % sp, world, sp))  # DP: strided by SP
        assert r["sdp"] == list(range(world))
        assert r["sp_rank"] == r["mesh_sp_rank"] == rank % sp
        assert r["dp_rank"] == r["mesh_dp_rank"] == rank // sp
        assert r["sp_size"] == sp
    assert ps.sp_group_ranks(4, 2) == [[0, 1], [2, 3]]
    assert ps.dp_group_ranks(4, 2) == [[0, 2], [1, 3]]


def _bad_sp(sp):
    try:
        ps.initialize_model_parallel(sequence_parallel_size=sp)
    except ValueError as e:
        return str(e)
    return None


def test_world_not_divisible_by_sp_is_a_clear_error(ranks):
    messages = ranks(4, _bad_sp, 3)
    assert all("must be a multiple of the sequence parallel size (3)" in m for m in messages)
    assert "[1, 2, 4]" in messages[0]
    messages = ranks(2, _bad_sp, 4)
    assert all("must be a multiple" in m for m in messages)


def test_before_distributed_init_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        ps.initialize_model_parallel(sequence_parallel_size=2)
    with pytest.raises(RuntimeError, match="parallel state is not initialised"):
        ps.get_sequence_parallel_group()


def _tensor_parallel():
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
    except ValueError as e:
        return str(e)


def test_tensor_parallel_is_refused(ranks):
    assert "not supported" in ranks(2, _tensor_parallel)[0]
