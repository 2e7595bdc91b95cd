"""The (ring x ulysses) SP mesh, the zigzag token layout and the ring's block math, checked
against hand-written expectations and an explicit full softmax. Runtime: about 2 s (reuses
the 4- and 8-rank pools)."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.sequence_parallel import ring as ring_mod
from megatron.core.sequence_parallel.layout import (
    ring_permutation,
    sequence_permutation,
    sequence_shard_indices,
    shard_sequence,
    zigzag_positions,
    zigzag_shard,
    zigzag_unshard,
)
from tests.utils import rel_err


def _layout(sp, ring):
    state = ps.initialize_model_parallel(sequence_parallel_size=sp, ring_attention_size=ring)
    out = {
        "sp": dist.get_process_group_ranks(state.sp_group),
        "dp": dist.get_process_group_ranks(state.dp_group),
        "ulysses": dist.get_process_group_ranks(ps.get_ulysses_group()),
        "ring": dist.get_process_group_ranks(ps.get_ring_attention_group()) if ring > 1 else None,
        "ring_rank": ps.get_ring_attention_rank(), "ring_size": ps.get_ring_attention_world_size(),
        "ulysses_rank": ps.get_ulysses_rank(), "ulysses_size": ps.get_ulysses_world_size(),
        "sp_rank": state.sp_rank, "describe": state.describe(),
    }
    ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("world,sp,ring", [(4, 4, 2), (4, 4, 4), (4, 4, 1), (8, 4, 2)])
def test_ring_x_ulysses_rank_layout(ranks, world, sp, ring):
    u = sp // ring
    for rank, r in enumerate(ranks(world, _layout, sp, ring)):
        block = rank // sp * sp
        assert r["sp"] == list(range(block, block + sp))  # unchanged: SP blocks, DP strided
        assert r["dp"] == list(range(rank % sp, world, sp))
        ustart = rank // u * u
        assert r["ulysses"] == list(range(ustart, ustart + u))  # Ulysses fastest: consecutive ranks
        assert r["sp_rank"] == r["ring_rank"] * u + r["ulysses_rank"]
        assert (r["ring_size"], r["ulysses_size"]) == (ring, u)
        if ring > 1:
            assert r["ring"] == list(range(block + rank % u, block + sp, u))  # strided by U
            assert f"ulysses {u} x ring {ring}" in r["describe"]
    assert ps.ring_group_ranks(8, 4, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ps.ulysses_group_ranks(8, 4, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_zigzag_positions_by_hand():
    # 16 tokens, ring 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert zigzag_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert zigzag_positions(6, 1, 0).tolist() == list(range(6))
    # ring 2 x ulysses 2: each Ulysses rank holds half of its ring rank's tokens
    idx = [sequence_shard_indices(16, sp_size=4, ring_size=2, sp_rank=r).tolist() for r in range(4)]
    assert idx == [[0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]
    # pure Ulysses is Megatron's contiguous split
    assert sequence_shard_indices(16, sp_size=4, sp_rank=2).tolist() == [8, 9, 10, 11]
    assert sequence_permutation(16, 4, 2).tolist() == sum(idx, [])
    assert torch.equal(sequence_permutation(16, 4, 2), ring_permutation(16, 2))


@pytest.mark.parametrize("n,sp,ring", [(16, 4, 2), (24, 8, 2), (32, 8, 4), (24, 6, 2), (16, 4, 4)])
def test_shards_partition_the_sequence_and_balance_causal_work(n, sp, ring):
    shards = [sequence_shard_indices(n, sp_size=sp, ring_size=ring, sp_rank=r) for r in range(sp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    x = torch.arange(3 * n).view(3, n)
    assert torch.equal(shard_sequence(x, sp_size=sp, ring_size=ring, sp_rank=1), x[:, shards[1]])
    gathered = torch.cat([zigzag_shard(x, ring, r, dim=1) for r in range(ring)], dim=1)
    assert torch.equal(zigzag_unshard(gathered, ring, dim=1), x)
    # causal work of a ring rank = sum over its tokens of (position + 1): equal on every ring rank
    work = {int((zigzag_positions(n, ring, r) + 1).sum()) for r in range(ring)}
    assert len(work) == 1


def _blocks(seed=0, hq=4, hkv=2, sq=6, sk=10):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, sq, 8, generator=g)
    k = torch.randn(2, hkv, sk, 8, generator=g)
    v = torch.randn(2, hkv, sk, 8, generator=g)
    return q, k, v


def _full_softmax(q, k, v, scale, keep):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("flash", [True, False])
def test_online_softmax_merge_of_two_key_blocks_is_exact(flash, monkeypatch):
    if not flash:
        monkeypatch.setattr(ring_mod, "_CPU_FLASH_FWD", None)
    q, k, v = _blocks()
    out = torch.zeros(2, 4, 6, 8)
    lse = torch.full((2, 4, 6), float("-inf"))
    for cols in (slice(0, 4), slice(4, 10)):
        ring_mod._merge_(out, lse, *ring_mod._block_forward(q, k[:, :, cols], v[:, :, cols], 0.3, False, None))
    ref_out, ref_lse = _full_softmax(q, k, v, 0.3, None)
    assert rel_err(out, ref_out) < 1e-6 and rel_err(lse, ref_lse) < 1e-6


def test_block_backward_with_global_statistics_sums_to_full_gradient():
    """dq from two key blocks, each using the merged out and lse, equals the full softmax's dq;
    masked rows (a document mask that hides a whole block from some queries) stay finite."""
    q, k, v = _blocks(1)
    seg_q = torch.tensor([[0, 0, 1, 1, 1, 2]] * 2)
    seg_k = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]] * 2)
    keep = seg_q[:, None, :, None] == seg_k[:, None, None, :]  # [b, 1, sq, sk]
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, _ = _full_softmax(qq, kk, vv, 0.3, keep)
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    out = torch.zeros(2, 4, 6, 8)
    lse = torch.full((2, 4, 6), float("-inf"))
    blocks = (slice(0, 4), slice(4, 10))
    for cols in blocks:
        ring_mod._merge_(out, lse, *ring_mod._block_forward(q, k[:, :, cols], v[:, :, cols], 0.3, False,
                                                            keep[..., cols]))
    assert torch.isfinite(out).all() and rel_err(out, ref_out) < 1e-6
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for cols in blocks:
        a, b, c = ring_mod._block_backward(dout, q, k[:, :, cols], v[:, :, cols], out, lse, delta, 0.3, False,
                                           keep[..., cols])
        dq += a
        dk[:, :, cols] += b
        dv[:, :, cols] += c
    for got, ref in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        assert rel_err(got, ref) < 1e-6


def test_document_blocks_are_skipped_unmasked_or_masked():
    # ring of 2, 4 tokens per rank; ring order: rank 0's tokens then rank 1's; the ring passes
    # (device ids, host ids) and decides on the host copy
    both = lambda t: (t, t.numpy())  # noqa: E731
    one_doc = torch.tensor([[5, 5, 5, 5, 5, 5, 5, 5]])
    assert ring_mod._document_keep(both(one_doc), 1, 0, slice(0, 4), slice(0, 2), 4) == (False, None)
    disjoint = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    assert ring_mod._document_keep(both(disjoint), 1, 0, slice(0, 4), slice(0, 2), 4) == (True, None)
    skip, keep = ring_mod._document_keep(both(disjoint), 0, 0, slice(0, 4), slice(0, 4), 4)
    assert not skip and keep[0, 0].tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2
