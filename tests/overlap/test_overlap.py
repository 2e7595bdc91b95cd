"""Head-chunk pipelined Ulysses equals plain Ulysses (forward, backward, bytes)."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import comm
from megatron.core import parallel_state as ps
from megatron.core.sequence_parallel import DistributedAttention
from megatron.model.attention_backends import build_local_attention
from tests.utils import rel_err


def _compare(chunks, hq, hkv, documents):
    state = ps.initialize_model_parallel(sequence_parallel_size=dist.get_world_size())
    p, r = state.sp_size, state.sp_rank
    g = torch.Generator().manual_seed(0)
    s, b, d = 16, 2, 8
    full = [torch.randn(s, b, h, d, generator=g) for h in (hq, hkv, hkv)]
    dout = torch.randn(s, b, hq, d, generator=g)
    seg = torch.tensor([[0] * 6 + [1] * 10, [0] * 3 + [1] * 13]) if documents else None
    sl = s // p
    local = build_local_attention("sdpa", causal=True)
    results = []
    for mode in ("plain", "chunked"):
        x = [t[r * sl:(r + 1) * sl].clone().requires_grad_() for t in full]
        comm.reset_counters()
        if mode == "plain":
            out = DistributedAttention(local, state.sp_group)(*x, segment_ids=seg)
        else:
            out = DistributedAttention(local, state.sp_group, overlap_chunks=chunks)(*x, segment_ids=seg)
        out.backward(dout[r * sl:(r + 1) * sl])
        results.append((out.detach(), [t.grad for t in x], comm.bytes_sent("all_to_all")))
    (o1, g1, b1), (o2, g2, b2) = results
    errs = [rel_err(o2, o1)] + [rel_err(a, c) for a, c in zip(g2, g1)]
    ps.destroy_model_parallel()
    return max(errs), b1, b2


@pytest.mark.parametrize("world,chunks,hq,hkv,documents", [
    (2, 2, 8, 8, False), (2, 4, 8, 8, True), (4, 2, 8, 8, False), (2, 2, 8, 4, True),
])
def test_chunked_equals_plain_ulysses(ranks, world, chunks, hq, hkv, documents):
    for err, plain_bytes, chunked_bytes in ranks(world, _compare, chunks, hq, hkv, documents):
        assert err < 1e-6
        assert plain_bytes == chunked_bytes  # same volume, more messages


def test_chunks_must_divide_heads(ranks):
    with pytest.raises(AssertionError, match="divisible by sp_size x chunks = 8"):
        ranks(2, _compare, 4, 4, 4, False)
