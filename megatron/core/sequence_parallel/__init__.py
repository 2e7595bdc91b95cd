"""Sequence parallelism: Ulysses all-to-all (DistributedAttention), ring attention and the
Ulysses x Ring hybrid, head-chunk overlap, and the token layout helpers."""

from megatron.core.sequence_parallel.all_to_all import all_to_all, all_to_all_dim0
from megatron.core.sequence_parallel.layer import DistributedAttention, check_same_local_shape

__all__ = ["DistributedAttention", "all_to_all", "all_to_all_dim0", "check_same_local_shape"]
