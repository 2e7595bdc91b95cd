"""Sequence parallelism: the Ulysses exchange (DistributedAttention), ring attention and the
Ulysses x Ring hybrid, and the token layout of a shard.

    all_to_all.py  the one differentiable all-to-all (equal or uneven splits, optionally async)
    heads.py       which heads each Ulysses rank attends over (GQA, uneven counts, overlap chunks)
    layer.py       DistributedAttention (DeepSpeed's API), packing Q/K/V into one exchange
    ring.py        zigzag ring attention with online-softmax merge
    hybrid.py      Ulysses x ring, and build_sp_attention (the one builder)
    layout.py      which tokens each SP rank holds
"""

from megatron.core.sequence_parallel.all_to_all import all_to_all, all_to_all_dim0, exchange
from megatron.core.sequence_parallel.hybrid import UlyssesRingAttention, build_sp_attention
from megatron.core.sequence_parallel.layer import DistributedAttention, check_same_local_shape

__all__ = ["DistributedAttention", "UlyssesRingAttention", "all_to_all", "all_to_all_dim0", "build_sp_attention",
           "check_same_local_shape", "exchange"]
