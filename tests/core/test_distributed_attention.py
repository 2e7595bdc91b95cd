"""DistributedAttention against the local backend on the full sequence, on gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import comm
from megatron.core import parallel_state as ps
from megatron.core.sequence_parallel import DistributedAttention, all_to_all
from megatron.model.attention_backends import build_local_attention, keep_mask
from tests.utils import rel_err

S, B, D = 16, 2, 8


def _inputs(hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, hq, D, generator=g)
    k = torch.randn(S, B, hkv, D, generator=g)
    v = torch.randn(S, B, hkv, D, generator=g)
    dout = torch.randn(S, B, hq, D, generator=g)
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])  # [b, s]: documents
    return q, k, v, dout, seg


def _to_layout(t, layout):
    return t if layout == "sbhd" else t.transpose(0, 1).contiguous()


def _case(backend, layout, hq, hkv, mask_kind, fuse):
    state = ps.initialize_model_parallel(sequence_parallel_size=dist.get_world_size())
    p, r = state.sp_size, state.sp_rank
    q, k, v, dout, seg = _inputs(hq, hkv)
    kwargs = {}
    if mask_kind == "segments":
        kwargs["segment_ids"] = seg
    elif mask_kind == "bool":  # Megatron convention: True = masked out; random, diagonal kept
        m = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(3)) < 0.3
        kwargs["attention_mask"] = m & ~torch.eye(S, dtype=torch.bool)
    elif mask_kind == "additive":
        kwargs["attention_mask"] = torch.randn(1, 1, S, S, generator=torch.Generator().manual_seed(4))

    local = build_local_attention(backend, causal=True, layout=layout)
    # reference: the local backend on the full sequence
    ref_in = [_to_layout(t, layout).requires_grad_() for t in (q, k, v)]
    ref_out = local(*ref_in, **kwargs)
    ref_out.backward(_to_layout(dout, layout))

    sl = S // p
    seq_dim = 0 if layout == "sbhd" else 1
    shard = lambda t: _to_layout(t, layout).narrow(seq_dim, r * sl, sl).detach().clone()  # noqa: E731
    dist_in = [shard(t).requires_grad_() for t in (q, k, v)]
    dattn = DistributedAttention(local, state.sp_group, scatter_idx=2, gather_idx=seq_dim, fuse_qkv=fuse)
    comm.reset_counters()
    out = dattn(*dist_in, **kwargs)
    fwd_bytes = comm.bytes_sent("all_to_all")
    out.backward(shard(dout))
    errs = {"out": rel_err(out, ref_out.narrow(seq_dim, r * sl, sl))}
    for name, t, ref in zip("qkv", dist_in, ref_in):
        errs["d" + name] = rel_err(t.grad, ref.grad.narrow(seq_dim, r * sl, sl))
    elem = 4
    expected = (hq + 2 * hkv + hq) * D * sl * B * elem * (p - 1) // p
    ps.destroy_model_parallel()
    return errs, fwd_bytes, expected, comm.bytes_sent("all_to_all"), comm.calls("all_to_all")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["classic", "sdpa"])
@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
@pytest.mark.parametrize("mask_kind", ["causal", "segments", "bool", "additive"])
def test_equals_local_attention_on_full_sequence(ranks, world, backend, layout, mask_kind):
    for errs, fwd_bytes, expected, total, calls in ranks(world, _case, backend, layout, 8, 8, mask_kind, True):
        assert max(errs.values()) < 1e-5, errs
        assert fwd_bytes == expected  # 4 N h / P * (P-1)/P elements, exactly
        assert total == 2 * expected  # backward moves the same volume
        assert calls == 4  # fused QKV + output, forward and backward


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
def test_gqa_fused_and_unfused(ranks, fuse, layout):
    for errs, fwd_bytes, expected, _, calls in ranks(4, _case, "sdpa", layout, 8, 4, "causal", fuse):
        assert max(errs.values()) < 1e-5, errs
        assert fwd_bytes == expected  # K/V volume shrinks with the number of K/V heads
        assert calls == (4 if fuse else 8)


def test_classic_and_sdpa_agree():
    q, k, v, _, seg = _inputs(8, 4)
    for kwargs in ({}, {"segment_ids": seg}):
        a = build_local_attention("classic", causal=True)(q, k, v, **kwargs)
        b = build_local_attention("sdpa", causal=True)(q, k, v, **kwargs)
        assert rel_err(a, b) < 1e-5


def test_keep_mask_semantics():
    seg = torch.tensor([[0, 0, 1, 1]])
    keep = keep_mask(4, 4, causal=True, segment_ids=seg, attention_mask=None, device="cpu")[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep, expected)


def _a2a_roundtrip():
    group = dist.group.WORLD
    p, r = dist.get_world_size(), dist.get_rank()
    x = torch.arange(4 * 2 * 8 * 3, dtype=torch.float32).view(4, 2, 8, 3) + 1000 * r  # [s/p, b, h, d]
    x.requires_grad_()
    y = all_to_all(x, group, scatter_dim=2, gather_dim=0)  # [s, b, h/p, d]
    # rank r now holds heads [r*h/p, (r+1)*h/p) of every rank's tokens, in rank order
    expect = torch.cat([(torch.arange(4 * 2 * 8 * 3, dtype=torch.float32).view(4, 2, 8, 3) + 1000 * src)
                        [:, :, r * 8 // p:(r + 1) * 8 // p] for src in range(p)], dim=0)
    back = all_to_all(y, group, scatter_dim=0, gather_dim=2)
    back.backward(torch.ones_like(back) * (r + 1))
    return torch.equal(y, expect), torch.equal(back, x), torch.equal(x.grad, torch.full_like(x, r + 1.0))


def test_all_to_all_moves_the_right_chunks_and_inverts(ranks):
    for ok in ranks(4, _a2a_roundtrip):
        assert all(ok)


def _error(kind):
    state = ps.initialize_model_parallel(sequence_parallel_size=dist.get_world_size())
    local = build_local_attention("classic", causal=True)
    r = state.sp_rank
    try:
        if kind == "heads":
            t = torch.randn(4, 1, 2, 8)
            DistributedAttention(local, state.sp_group)(t, t, t)
        elif kind == "seq":
            t = torch.randn(4 + 2 * r, 1, 8, 8)
            DistributedAttention(local, state.sp_group)(t, t, t)
        elif kind == "rank":
            t = torch.randn(4, 8, 8)
            DistributedAttention(local, state.sp_group)(t, t, t)
        elif kind == "layout":
            DistributedAttention(local, state.sp_group, scatter_idx=1, gather_idx=2)
        elif kind == "group":
            g = dist.new_group([0, 1])
            DistributedAttention(local, g)
    except ValueError as e:
        return str(e)
    finally:
        ps.destroy_model_parallel()
    return None


@pytest.mark.parametrize("kind,message", [
    ("heads", "query heads (2) is smaller than the sequence parallel size (4)"),
    ("seq", "local sequence lengths differ across the sequence parallel group: [4, 6, 8, 10]"),
    ("rank", "expects 4-D query laid out as [s/p, b, heads, d]"),
    ("layout", "supports scatter_idx=2"),
])
def test_errors_are_clear(ranks, kind, message):
    for msg in ranks(4, _error, kind):
        assert msg is not None and message in msg, msg


def test_group_the_caller_is_not_in(ranks):
    msgs = ranks(4, _error, "group")
    assert msgs[0] is None and msgs[1] is None
    assert "is not a member of the sequence_process_group" in msgs[2]
    assert "is not a member" in msgs[3]


def _uneven(hq, hkv):
    """Heads not divisible by P (6 on 4) and fewer K/V heads than P (2 on 4) used to be errors;
    they are now exact (uneven all-to-all splits; K/V heads replicated, gradients summed)."""
    state = ps.initialize_model_parallel(sequence_parallel_size=dist.get_world_size())
    p, r = state.sp_size, state.sp_rank
    q, k, v, dout, seg = _inputs(hq, hkv)
    local = build_local_attention("sdpa", causal=True)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = build_local_attention("classic", causal=True)(*ref_in, segment_ids=seg)
    ref_out.backward(dout)
    sl = S // p
    dist_in = [t[r * sl:(r + 1) * sl].clone().requires_grad_() for t in (q, k, v)]
    out = DistributedAttention(local, state.sp_group)(*dist_in, segment_ids=seg)
    out.backward(dout[r * sl:(r + 1) * sl])
    errs = {"out": rel_err(out, ref_out[r * sl:(r + 1) * sl])}
    for name, t, ref in zip("qkv", dist_in, ref_in):
        errs["d" + name] = rel_err(t.grad, ref.grad[r * sl:(r + 1) * sl])
    ps.destroy_model_parallel()
    return errs


@pytest.mark.parametrize("hq,hkv", [(6, 6), (8, 2)], ids=["heads_not_divisible", "kv_heads_not_divisible"])
def test_heads_not_divisible_are_exact(ranks, hq, hkv):
    for errs in ranks(4, _uneven, hq, hkv):
        assert max(errs.values()) < 1e-5, errs
