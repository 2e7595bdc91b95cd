"""The rank topology of a run, computed once: degrees, group ranks, heads per rank, token layout.

Flag validation, the `--dry-run` plan, the memory planner, `initialize_model_parallel` (which
turns it into process groups) and the data loader all read this one object, so a rule such
as "the world size must be a multiple of the SP size" or "every Ulysses rank needs a head"
is written once, with one message that names the flag and the fix.

Layout (Megatron-DeepSpeed's): global rank = dp_rank * P + sp_rank, so SP groups are blocks
of P consecutive ranks and DP groups are strided by P. With ring attention the SP group is
(ring R) x (ulysses U = P/R) with sp_rank = ring_rank * U + ulysses_rank: Ulysses groups are
U consecutive ranks (the heavy all-to-all traffic stays inside a node when U divides the
GPUs per node) and rings are strided by U.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from megatron.config import ConfigError
from megatron.core.sequence_parallel import layout
from megatron.core.sequence_parallel.heads import HeadPlan, plan_heads


@dataclass(frozen=True)
class RankCoords:
    rank: int
    dp_rank: int
    sp_rank: int
    ring_rank: int
    ulysses_rank: int


@dataclass(frozen=True)
class Topology:
    """Sizes of the SP x DP layout, plus (optionally) the model facts that constrain it.

    `num_heads`/`num_kv_heads` enable the head checks and `heads_per_rank`; `seq_length`
    the token-layout checks; `overlap_chunks` the head-chunk overlap checks. Construction
    validates everything given and raises `ConfigError` naming the flag to change.
    """

    world_size: int
    sp_size: int = 1
    ring_size: int = 1
    num_heads: int | None = None
    num_kv_heads: int | None = None
    seq_length: int | None = None
    overlap_chunks: int = 1

    def __post_init__(self) -> None:
        if self.num_kv_heads is None and self.num_heads is not None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        self._check_sizes()
        if self.num_heads is not None:
            self._check_heads()
        if self.seq_length is not None:
            self._check_seq_length()

    # --- validation --------------------------------------------------------------------

    def _check_sizes(self) -> None:
        world, sp, ring = self.world_size, self.sp_size, self.ring_size
        if sp < 1:
            raise ConfigError(f"--ds-sequence-parallel-size must be >= 1, got {sp}")
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        if sp > world:
            raise ConfigError(
                f"--ds-sequence-parallel-size ({sp}) is larger than the world size ({world}): the world size must "
                f"be a multiple of the sequence parallel size ({sp}); launch at least {sp} processes or lower "
                f"--ds-sequence-parallel-size")
        if world % sp:
            raise ConfigError(
                f"--ds-sequence-parallel-size ({sp}) must divide the world size ({world}): the world size must be "
                f"a multiple of the sequence parallel size ({sp}); launch a multiple of {sp} processes or choose "
                f"--ds-sequence-parallel-size among the divisors of {world}: {divisors}")
        if ring < 1 or sp % ring:
            raise ConfigError(
                f"--ring-attention-size ({ring}) must divide --ds-sequence-parallel-size ({sp}): the SP group is "
                f"Ulysses (SP/R ranks) x ring (R ranks); choose among {[d for d in range(1, sp + 1) if sp % d == 0]}")
        if self.overlap_chunks < 1:
            raise ConfigError(f"--ulysses-overlap-chunks must be >= 1, got {self.overlap_chunks}")

    def _check_heads(self) -> None:
        heads, kv, ulysses, sp = self.num_heads, self.num_kv_heads, self.ulysses_size, self.sp_size
        if heads < ulysses:
            ring = next((r for r in range(1, sp + 1) if sp % r == 0 and sp // r <= heads), sp)
            raise ConfigError(
                f"--num-attention-heads ({heads}) must be >= the Ulysses degree (--ds-sequence-parallel-size / "
                f"--ring-attention-size = {ulysses}): each Ulysses rank attends with at least one head; add "
                f"--ring-attention-size {ring} to put the rest of the SP group in a ring")
        chunks = self.overlap_chunks
        if chunks > 1 and (self.ring_size > 1 or heads % (sp * chunks) or kv % (sp * chunks)):
            raise ConfigError(
                f"--ulysses-overlap-chunks {chunks} needs --ring-attention-size 1 and both the query heads "
                f"({heads}) and K/V heads ({kv}) divisible by SP x chunks = {sp * chunks}; lower the chunk count")
        _ = self.head_plan  # the remaining head rules (GQA divisibility) with their messages

    def _check_seq_length(self) -> None:
        n, sp, ring = self.seq_length, self.sp_size, self.ring_size
        granularity = self.seq_granularity
        if n % granularity:
            raise ConfigError(
                f"--seq-length ({n}) must be divisible by {granularity} ({'2 x ' if ring > 1 else ''}"
                f"--ds-sequence-parallel-size {sp}): each SP rank holds an equal share"
                f"{' of the 2R zigzag chunks' if ring > 1 else ''}; pad --seq-length to a multiple of {granularity}")
        layout.check_seq_len(n, sp, ring)

    # --- sizes -------------------------------------------------------------------------

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def ulysses_size(self) -> int:
        return self.sp_size // self.ring_size

    @property
    def seq_granularity(self) -> int:
        """Valid sequence lengths are multiples of this (2 x SP with a ring: every rank gets an
        equal share of both of its ring rank's zigzag chunks)."""
        return 2 * self.sp_size if self.ring_size > 1 else self.sp_size

    @property
    def tokens_per_rank(self) -> int:
        return self.seq_length // self.sp_size

    # --- heads -------------------------------------------------------------------------

    @cached_property
    def head_plan(self) -> HeadPlan | None:
        """The heads each Ulysses rank attends over (None without head counts)."""
        if self.num_heads is None:
            return None
        return plan_heads(self.num_heads, self.num_kv_heads, self.ulysses_size)

    def heads_per_rank(self, ulysses_rank: int = 0) -> tuple[int, int]:
        """(query, K/V) heads Ulysses rank `ulysses_rank` holds inside attention (K/V replicated
        when fewer than the Ulysses degree)."""
        return self.head_plan.local_heads(ulysses_rank)

    def max_heads_per_rank(self) -> tuple[int, int]:
        return self.head_plan.max_local_heads()

    # --- ranks and groups --------------------------------------------------------------

    def coords(self, rank: int) -> RankCoords:
        dp_rank, sp_rank = divmod(rank, self.sp_size)
        ring_rank, ulysses_rank = divmod(sp_rank, self.ulysses_size)
        return RankCoords(rank, dp_rank, sp_rank, ring_rank, ulysses_rank)

    def sp_groups(self) -> list[list[int]]:
        """SP groups: blocks of P consecutive ranks."""
        return [list(range(s, s + self.sp_size)) for s in range(0, self.world_size, self.sp_size)]

    def dp_groups(self) -> list[list[int]]:
        """DP groups: strided by the SP size."""
        return [list(range(o, self.world_size, self.sp_size)) for o in range(self.sp_size)]

    def ulysses_groups(self) -> list[list[int]]:
        """All-to-all groups: blocks of U consecutive ranks."""
        u = self.ulysses_size
        return [list(range(s, s + u)) for s in range(0, self.world_size, u)]

    def ring_groups(self) -> list[list[int]]:
        """Rings: inside each SP block, ranks strided by U."""
        u, sp = self.ulysses_size, self.sp_size
        return [list(range(block + off, block + sp, u)) for block in range(0, self.world_size, sp)
                for off in range(u)]

    # --- token layout ------------------------------------------------------------------

    def token_ranges(self, sp_rank: int, seq_length: int | None = None) -> list[tuple[int, int]]:
        """The (at most two) token ranges SP rank `sp_rank` holds of every sample."""
        return layout.token_ranges(seq_length or self.seq_length, self.sp_size, sp_rank, self.ring_size)

    def shard_indices(self, sp_rank: int, seq_length: int | None = None, device=None) -> torch.Tensor:
        return layout.sequence_shard_indices(seq_length or self.seq_length, sp_size=self.sp_size,
                                             ring_size=self.ring_size, sp_rank=sp_rank, device=device)

    def describe(self) -> str:
        ring = f" = ulysses {self.ulysses_size} x ring {self.ring_size}" if self.ring_size > 1 else ""
        return f"world={self.world_size} dp={self.dp_size} sp={self.sp_size}{ring}"


__all__ = ["RankCoords", "Topology"]
