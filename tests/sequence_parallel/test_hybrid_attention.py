"""Ulysses x ring attention (and uneven / GQA Ulysses) against the classic local attention on
the full sequence: forward output, dq, dk, dv (fp32, relative error < 1e-5), and the bytes
each rank sent against the formulas. World 4 for (2x2), (1x4), (4x1); world 8 for heads < P.
Runtime: about 25 s here (2 cores), most of it starting the 8-rank pool."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import comm
from megatron.core import parallel_state as ps
from megatron.core.sequence_parallel.heads import plan_heads
from megatron.core.sequence_parallel.hybrid import (
    UlyssesRingAttention,
    attention_comm_bytes,
    build_sp_attention,
)
from megatron.core.sequence_parallel.layer import DistributedAttention
from megatron.core.sequence_parallel.layout import sequence_permutation, sequence_shard_indices
from megatron.model.attention_backends import build_local_attention
from tests.utils import rel_err

S, B, D = 16, 2, 8
DOCS = torch.tensor([[0] * 3 + [1] * 6 + [2] * 5 + [3] * 2, [0] * 11 + [1] * 5])  # [b, s]


def _inputs(hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, hq, D, generator=g)
    k = torch.randn(S, B, hkv, D, generator=g)
    v = torch.randn(S, B, hkv, D, generator=g)
    dout = torch.randn(S, B, hq, D, generator=g)
    return q, k, v, dout


def _hybrid_case(sp, ring, hq, hkv, docs, causal=True, layout="sbhd", backend="sdpa", natural_ids=False):
    """One rank's errors and byte counts for one configuration."""
    state = ps.initialize_model_parallel(sequence_parallel_size=sp, ring_attention_size=ring)
    q, k, v, dout = _inputs(hq, hkv)
    seg = DOCS if docs else None
    # independent reference: classic fp32 softmax on the whole sequence, natural order
    ref_local = build_local_attention("classic", causal=causal, layout="sbhd")
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = ref_local(*ref_in, segment_ids=seg)
    ref_out.backward(dout)

    idx = sequence_shard_indices(S, state)
    # [s, b, h, d] -> [s/p, b, h, d] at this rank's global indices (then [b, s/p, h, d] for bshd)
    shard = lambda t: (t[idx] if layout == "sbhd" else t[idx].transpose(0, 1)).contiguous()  # noqa: E731
    unshard_ref = lambda t: t[idx] if layout == "sbhd" else t[idx].transpose(0, 1)  # noqa: E731
    local_in = [shard(t).requires_grad_() for t in (q, k, v)]
    seg_gathered = None
    if seg is not None:  # what GPTModel does: all-gather the per-rank ids over the SP group
        seg_gathered = comm.all_gather_along(seg[:, idx].contiguous(), 1, state.sp_group)
    local = build_local_attention(backend, causal=causal, layout=layout)
    attn = build_sp_attention(local, state, check_shapes=True)
    if natural_ids:  # the module can also take segment ids in natural token order
        attn = UlyssesRingAttention(local, state.ulysses_group, state.ring_group, segment_ids_order="natural")
        seg_gathered = seg
    comm.reset_counters()
    out = attn(*local_in, segment_ids=seg_gathered)
    fwd = {k_: comm.bytes_sent(k_) for k_ in ("all_to_all", "ring_p2p")}
    out.backward(shard(dout))
    total = {k_: comm.bytes_sent(k_) for k_ in ("all_to_all", "ring_p2p")}
    errs = {"out": rel_err(out, unshard_ref(ref_out))}
    for name, t, ref in zip("qkv", local_in, ref_in):
        errs["d" + name] = rel_err(t.grad, unshard_ref(ref.grad))
    expect = attention_comm_bytes(S, B, hq, hkv, D, sp, ring, sp_rank=state.sp_rank)
    measured = {kind: {"forward": fwd[kind], "total": total[kind]} for kind in fwd}
    expected = {kind: {"forward": e["forward"], "total": e["total"]} for kind, e in expect.items()}
    perm_ok = (seg is None or natural_ids or torch.equal(seg_gathered, seg[:, sequence_permutation(S, sp, ring)]))
    kind = type(attn).__name__
    ps.destroy_model_parallel()
    return errs, measured, expected, perm_ok, kind


def _check(results, kind):
    for errs, measured, expected, perm_ok, got_kind in results:
        assert got_kind == kind
        assert max(errs.values()) < 1e-5, errs
        assert measured == expected, (measured, expected)
        assert perm_ok


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 4), (4, 1)], ids=["u2xr2", "u1xr4", "u4xr1"])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_hybrid_p4_equals_full_attention(ranks, ulysses, ring, docs, heads):
    results = ranks(4, _hybrid_case, ulysses * ring, ring, *heads, docs)
    _check(results, "DistributedAttention" if ring == 1 else "UlyssesRingAttention")
    if ring > 1:  # the ring really moved K/V
        assert all(m["ring_p2p"]["total"] > 0 for _, m, *_ in results)


def test_hybrid_non_causal_bshd_classic_backend_and_natural_segment_ids(ranks):
    _check(ranks(4, _hybrid_case, 4, 2, 4, 4, True, False, "bshd", "classic"), "UlyssesRingAttention")
    _check(ranks(4, _hybrid_case, 4, 4, 4, 2, False, True, "bshd", "sdpa"), "UlyssesRingAttention")
    _check(ranks(4, _hybrid_case, 4, 2, 4, 4, True, True, "sbhd", "sdpa", True), "UlyssesRingAttention")


def _p8_cases():
    # (ulysses, ring, hq, hkv, docs): 4 heads on SP 8 lifts the Ulysses cap (heads < P);
    # 6 query / 2 K/V heads at Ulysses 4 is uneven heads plus K/V replication through the hybrid
    cases = [(4, 2, 4, 4, False), (2, 4, 4, 4, True), (4, 2, 6, 2, True)]
    return [(c, _hybrid_case(u * r, r, hq, hkv, docs)) for c, (u, r, hq, hkv, docs) in
            zip(cases, cases)]


def test_hybrid_p8_with_fewer_heads_than_ranks(ranks):
    per_rank = ranks(8, _p8_cases)
    for i in range(len(per_rank[0])):
        case = per_rank[0][i][0]
        try:
            _check([r[i][1] for r in per_rank], "UlyssesRingAttention")
        except AssertionError as e:
            raise AssertionError(f"case (ulysses, ring, hq, hkv, docs)={case}: {e}") from e


@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1), (6, 6), (6, 2), (6, 3), (5, 5), (4, 2), (10, 2)])
@pytest.mark.parametrize("fuse", [True, False])
def test_ulysses_uneven_heads_and_gqa_replication(ranks, hq, hkv, fuse):
    results = ranks(4, _uneven_case, hq, hkv, fuse)
    for errs, measured, expected in results:
        assert max(errs.values()) < 1e-5, errs
        assert measured == expected


def _uneven_case(hq, hkv, fuse, docs=True):
    state = ps.initialize_model_parallel(sequence_parallel_size=dist.get_world_size())
    q, k, v, dout = _inputs(hq, hkv, seed=hq * 10 + hkv)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = build_local_attention("classic", causal=True)(*ref_in, segment_ids=DOCS if docs else None)
    ref_out.backward(dout)
    p, r = state.sp_size, state.sp_rank
    sl = S // p
    local_in = [t[r * sl:(r + 1) * sl].clone().requires_grad_() for t in (q, k, v)]
    attn = DistributedAttention(build_local_attention("sdpa", causal=True), state.sp_group, fuse_qkv=fuse)
    comm.reset_counters()
    out = attn(*local_in, segment_ids=DOCS if docs else None)
    out.backward(dout[r * sl:(r + 1) * sl])
    errs = {"out": rel_err(out, ref_out[r * sl:(r + 1) * sl])}
    for name, t, ref in zip("qkv", local_in, ref_in):
        errs["d" + name] = rel_err(t.grad, ref.grad[r * sl:(r + 1) * sl])
    expected = attention_comm_bytes(S, B, hq, hkv, D, p, 1, sp_rank=r)["all_to_all"]["total"]
    ps.destroy_model_parallel()
    return errs, comm.bytes_sent("all_to_all"), expected


def test_head_plan_replicates_just_enough():
    plan = plan_heads(8, 2, 4)  # GQA: 2 K/V heads on 4 ranks -> each K/V head on 2 ranks
    assert plan.q_heads == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert plan.kv_heads == ((0,), (0,), (1,), (1,))
    plan = plan_heads(6, 6, 4)  # uneven: the first 6 mod 4 ranks take one more head
    assert [len(h) for h in plan.q_heads] == [2, 2, 1, 1]
    assert plan.kv_heads == plan.q_heads
    plan = plan_heads(6, 2, 4)  # rank 1's heads 2, 3 read K/V heads 0 and 1
    assert plan.kv_heads == ((0,), (0, 1), (1,), (1,))
    plan = plan_heads(10, 2, 4)  # rank 1's heads 3, 4, 5 read K/V 0, 0, 1: one copy per query head
    assert plan.q_heads[1] == (3, 4, 5) and plan.kv_heads[1] == (0, 0, 1) and plan.kv_heads[0] == (0,)
    assert plan_heads(16, 8, 4).even and not plan_heads(16, 2, 4).even
    with pytest.raises(ValueError, match="smaller than the Ulysses degree"):
        plan_heads(4, 4, 8)


def _errors(kind):
    state = ps.initialize_model_parallel(sequence_parallel_size=4, ring_attention_size=2)
    local = build_local_attention("sdpa", causal=True, dropout_p=0.1 if kind == "dropout" else 0.0)
    attn = build_sp_attention(local, state)
    t = torch.randn(4, 1, 4, 8)
    try:
        if kind == "mask":
            attn(t, t, t, attention_mask=torch.zeros(1, 1, 16, 16, dtype=torch.bool))
        elif kind == "dropout":
            attn.train()
            attn(t, t, t)
        elif kind == "seq":
            sequence_shard_indices(12, sp_size=4, ring_size=4, sp_rank=0)
        elif kind == "ring_size":
            ps.initialize_model_parallel(sequence_parallel_size=4, ring_attention_size=3)
        elif kind == "few_heads":
            ps.initialize_model_parallel(sequence_parallel_size=4)
            u = torch.randn(4, 1, 2, 8)
            DistributedAttention(local, ps.get_sequence_parallel_group())(u, u, u)
    except ValueError as e:
        return str(e)
    finally:
        ps.destroy_model_parallel()
    return None


@pytest.mark.parametrize("kind,message", [
    ("mask", "takes no attention_mask"),
    ("dropout", "set --attention-dropout 0"),
    ("seq", "divisible by 2 x ring size (8)"),
    ("ring_size", "--ring-attention-size (3) must divide --ds-sequence-parallel-size (4)"),
    ("few_heads", "query heads (2) is smaller than the sequence parallel size (4)"),
])
def test_errors_are_clear(ranks, kind, message):
    for msg in ranks(4, _errors, kind):
        assert msg is not None and message in msg, msg
