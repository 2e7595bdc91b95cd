"""Token layout of a sequence-parallel shard: which global tokens each SP rank holds.

The one place that answers "which tokens are mine" for the data loader (what to read),
the model (position ids) and the planner (what each rank computes). Two layouts:

* Plain Ulysses (ring size R = 1): SP rank r holds the contiguous block
  `[r N/P, (r+1) N/P)`, as in Megatron-DeepSpeed.
* Ulysses x ring (R > 1): the sequence is cut into 2R zigzag chunks of N/(2R) tokens;
  ring rank r owns chunks r and 2R-1-r (in that order), and Ulysses rank u of that ring
  rank holds the u-th of U = P/R equal consecutive pieces of them
  (sp_rank = ring_rank * U + ulysses_rank). With a causal mask every ring step then
  costs each rank the same work (see ring.py).

"Gathered order" is what all-gathering every SP rank's shard yields: the shards of SP
ranks 0..P-1 concatenated (`sequence_permutation`). It equals natural order when R = 1.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron.config import ConfigError


class LayoutError(ConfigError):
    """A sequence length that cannot be sharded over the SP group; the message names the fix."""


def check_seq_len(seq_len: int, sp_size: int, ring_size: int = 1) -> None:
    """Raise with the fix if `seq_len` cannot be sharded over `sp_size` ranks with this ring."""
    if ring_size < 1 or sp_size % ring_size:
        raise LayoutError(f"--ring-attention-size ({ring_size}) must be a positive divisor of "
                          f"--ds-sequence-parallel-size ({sp_size})")
    if seq_len % sp_size:
        raise LayoutError(f"--seq-length {seq_len} must be divisible by --ds-sequence-parallel-size {sp_size}: "
                          f"every rank holds N/P tokens; choose a multiple of {sp_size}")
    if ring_size > 1 and seq_len % (2 * ring_size):
        raise LayoutError(f"--seq-length ({seq_len}) must be divisible by 2 x ring size ({2 * ring_size}) "
                          f"(--ring-attention-size {ring_size}) for the zigzag layout (each ring rank holds 2 of the 2R "
                          f"chunks): choose a multiple of {int(np.lcm(sp_size, 2 * ring_size))} or a "
                          f"smaller --ring-attention-size")


def seq_len_granularity(sp_size: int, ring_size: int = 1) -> int:
    """The smallest step of valid sequence lengths for this layout."""
    return int(np.lcm(sp_size, 2 * ring_size)) if ring_size > 1 else sp_size


def zigzag_chunks(ring_size: int, ring_rank: int) -> tuple[int, int]:
    """The two global chunk indices (of 2R) ring rank `ring_rank` holds, in local order."""
    return ring_rank, 2 * ring_size - 1 - ring_rank


def zigzag_positions(seq_len: int, ring_size: int, ring_rank: int, *, device=None) -> torch.Tensor:
    """Global token indices held by ring rank `ring_rank`, in its local order (LongTensor [N/R])."""
    if ring_size == 1:
        return torch.arange(seq_len, device=device)
    check_seq_len(seq_len, ring_size, ring_size)
    c = seq_len // (2 * ring_size)
    first, second = zigzag_chunks(ring_size, ring_rank)
    return torch.cat([torch.arange(first * c, first * c + c, device=device),
                      torch.arange(second * c, second * c + c, device=device)])


def ring_permutation(seq_len: int, ring_size: int, *, device=None) -> torch.Tensor:
    """Ring order: every ring rank's tokens, rank after rank. `x_ring = x_natural[perm]`."""
    return torch.cat([zigzag_positions(seq_len, ring_size, r, device=device) for r in range(ring_size)])


def token_ranges(seq_len: int, sp_size: int, sp_rank: int, ring_size: int = 1) -> list[tuple[int, int]]:
    """SP rank `sp_rank`'s tokens as at most two `(start, stop)` ranges, in local order.

    This is the whole layout; `sequence_shard_indices` expands it. The data loader reads
    exactly these ranges of every sample (plus one token for the last label).
    """
    check_seq_len(seq_len, sp_size, ring_size)
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sequence parallel rank {sp_rank} not in [0, {sp_size})")
    piece = seq_len // sp_size
    if ring_size == 1:
        return [(sp_rank * piece, (sp_rank + 1) * piece)]
    ulysses = sp_size // ring_size
    ring_rank, ulysses_rank = divmod(sp_rank, ulysses)
    c = seq_len // (2 * ring_size)
    # the ring rank's N/R tokens in local order, as two chunks; take the u-th piece of them
    chunks = [(k * c, k * c + c) for k in zigzag_chunks(ring_size, ring_rank)]
    lo, hi = ulysses_rank * piece, (ulysses_rank + 1) * piece  # offsets within the 2c local tokens
    out = []
    for i, (start, _) in enumerate(chunks):
        a, b = max(lo, i * c), min(hi, (i + 1) * c)
        if a < b:
            out.append((start + a - i * c, start + b - i * c))
    return out


def sequence_shard_indices(seq_len: int, parallel_state=None, *, sp_size: int | None = None,
                           ring_size: int = 1, sp_rank: int | None = None, device=None) -> torch.Tensor:
    """Global indices (LongTensor `[N/P]`, in local order) of the tokens SP rank `sp_rank` holds.

    Shard every per-token tensor with it (`tokens[:, idx]`) and use it as position ids.
    Pass a ParallelState, or the sizes.
    """
    if parallel_state is not None:
        sp_size, ring_size, sp_rank = parallel_state.sp_size, parallel_state.ring_size, parallel_state.sp_rank
    elif sp_size is None or sp_rank is None:
        raise ValueError("pass a ParallelState, or sp_size= and sp_rank= (and ring_size=)")
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in token_ranges(seq_len, sp_size, sp_rank, ring_size)])


def sequence_permutation(seq_len: int, sp_size: int, ring_size: int = 1, *, device=None) -> torch.Tensor:
    """Gathered order: the shards of SP ranks 0..P-1 concatenated. `x_gathered = x[:, perm]`."""
    return torch.cat([sequence_shard_indices(seq_len, sp_size=sp_size, ring_size=ring_size, sp_rank=r,
                                             device=device) for r in range(sp_size)])


def shard_sequence(x: torch.Tensor, parallel_state=None, *, dim: int = 1, **sizes) -> torch.Tensor:
    """This rank's tokens of a full, naturally ordered tensor along `dim` (default `[b, s, ...]`)."""
    idx = sequence_shard_indices(x.shape[dim], parallel_state, device=x.device, **sizes)
    return x.index_select(dim, idx)


def zigzag_shard(x: torch.Tensor, ring_size: int, ring_rank: int, dim: int = 0) -> torch.Tensor:
    """The tokens of ring rank `ring_rank` from a full, naturally ordered sequence along `dim`."""
    return x.index_select(dim, zigzag_positions(x.shape[dim], ring_size, ring_rank, device=x.device))


def zigzag_unshard(x: torch.Tensor, ring_size: int, dim: int = 0) -> torch.Tensor:
    """Natural order from the ring-order concatenation of every ring rank's shard along `dim`."""
    perm = ring_permutation(x.shape[dim], ring_size, device=x.device)
    return x.index_select(dim, torch.argsort(perm))


__all__ = ["LayoutError", "check_seq_len", "ring_permutation", "seq_len_granularity", "sequence_permutation",
           "sequence_shard_indices", "shard_sequence", "token_ranges", "zigzag_chunks", "zigzag_positions",
           "zigzag_shard", "zigzag_unshard"]
