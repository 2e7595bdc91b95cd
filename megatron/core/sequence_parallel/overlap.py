"""Ulysses attention pipelined over head chunks, so all-to-alls overlap with attention.

Plain Ulysses is strictly sequential: all-to-all Q/K/V, attention, all-to-all output.
Attention heads are independent, so the heads a rank owns can be processed in K chunks:
every chunk's Q/K/V all-to-all is issued up front without waiting, the attention of
chunk c runs while the transfers of chunks c+1.. are still in flight, and chunk c's
output all-to-all is issued as soon as its attention is done. The backward pass mirrors
this, since each chunk's collectives are separate asynchronous autograd nodes.

Volume is unchanged (the same bytes in K messages); the cost is K-1 extra latencies, so
K = 2 is the sensible default on fast links and larger K only pays on slow ones.
`benchmarks/bench_overlap.py` measures the effect instead of assuming it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import comm


class _AsyncAllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 whose result (and gradient) is waited on lazily."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return comm.all_to_all_single_async(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_to_all_single_async(grad.contiguous(), ctx.group), None


def chunked_ulysses_attention(local_attention, q, k, v, group, num_chunks: int, *args, **kwargs):
    """Ulysses attention over `[s/p, b, heads, d]` shards in `num_chunks` overlapped head chunks.

    Equal to `DistributedAttention(local_attention, group)(q, k, v, ...)`; needs the per-rank
    head counts (hq/p and hkv/p) to be divisible by `num_chunks` and the local attention to
    treat heads independently (every backend here does; GQA groups stay inside a chunk).
    """
    p = dist.get_world_size(group)
    sl, b, hq, d = q.shape
    hkv = k.shape[2]
    if hq % (p * num_chunks) or hkv % (p * num_chunks):
        raise ValueError(
            f"overlap over {num_chunks} head chunks needs query heads ({hq}) and key/value heads "
            f"({hkv}) divisible by sp_size x chunks = {p * num_chunks}; lower --ulysses-overlap-chunks")
    cq, ckv = hq // p // num_chunks, hkv // p // num_chunks  # heads per rank per chunk

    def chunk_heads(t: torch.Tensor, c: int, per: int) -> torch.Tensor:
        # [s/p, b, h, d] -> [s/p, b, p, K, h/(pK), d] -> chunk c: [p, s/p, b, h/(pK), d]
        return t.unflatten(2, (p, num_chunks, per))[:, :, :, c].movedim(2, 0)

    in_flight = []
    for c in range(num_chunks):
        packed = torch.cat([chunk_heads(q, c, cq), chunk_heads(k, c, ckv), chunk_heads(v, c, ckv)], dim=3)
        in_flight.append(_AsyncAllToAll.apply(packed, group))  # [p, s/p, b, cq + 2 ckv, d]
    outs = []
    for recv in in_flight:
        full = recv.reshape(p * sl, b, cq + 2 * ckv, d)  # [p, s/p, ...] -> [s, b, cq + 2 ckv, d]
        qc, kc, vc = full.split([cq, ckv, ckv], dim=2)
        out = local_attention(qc, kc, vc, *args, **kwargs)  # [s, b, cq, d]
        # [s, b, cq, d] -> [p, s/p, b, cq, d]: slot j holds the tokens of rank j
        outs.append(_AsyncAllToAll.apply(out.reshape(p, sl, b, cq, d), group))
    # received slot j = heads of rank j's slice; chunk c = sub-slice c
    stacked = torch.stack(outs, dim=3)  # [p, s/p, b, K, cq, d]
    return stacked.permute(1, 2, 0, 3, 4, 5).reshape(sl, b, hq, d)  # -> [s/p, b, p*K*cq = hq, d]


class ChunkedUlyssesAttention(torch.nn.Module):
    """Module form of `chunked_ulysses_attention` with DistributedAttention's call convention."""

    def __init__(self, local_attention, sequence_process_group, num_chunks: int = 2) -> None:
        super().__init__()
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.num_chunks = num_chunks

    def forward(self, query, key, value, *args, **kwargs):
        return chunked_ulysses_attention(self.local_attn, query, key, value, self.spg, self.num_chunks,
                                         *args, **kwargs)
