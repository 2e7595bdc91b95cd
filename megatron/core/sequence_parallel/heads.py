"""Which heads each Ulysses rank attends over: the head plan of the all-to-all.

Plain Ulysses gives each of the U ranks H/U query heads and Hkv/U key/value heads, which
needs both counts divisible by U. Two common models break that:

* GQA with fewer K/V heads than U (Llama-70B: 8 K/V heads on 16 ranks). Each rank then
  receives the K/V heads its query heads read, so a K/V head is *replicated* on the
  U/Hkv ranks that share it. Replication is an `index_select` before the all-to-all, so
  autograd sums the replicas' gradients back into the one K/V head (the reduction).
* Query heads not divisible by U (6 heads on 4 ranks). Rank u takes a contiguous run of
  heads, the first H mod U ranks one more (torch.tensor_split's rule), and the all-to-all
  carries per-rank split sizes.

Everything is exact: no head is padded, dropped or computed twice. The price of uneven
heads is load imbalance (the busiest rank has ceil(H/U) heads); the price of replication
is K/V volume (U/Hkv copies), both reported by `ulysses_bytes`.

Plain Ulysses (both counts divisible by U) is the special case of the same plan where
every rank gets equal contiguous runs; the exchange (layer.py) packs every plan the same
way and takes a copy-free path for it. Head-chunk overlap splits a plan into K sub-plans
(`chunk_plan`), each a plan of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.config import ConfigError


class HeadPlanError(ConfigError):
    """Head counts that no Ulysses degree can split; the message names the flags to change."""


@dataclass(frozen=True)
class HeadPlan:
    """Which global query and K/V heads each Ulysses rank attends over.

    `q_heads[u]` is a contiguous run; `kv_heads[u]` lists the global K/V head that each of
    rank u's local K/V heads is a copy of, chosen so that rank u's local query head i reads
    local K/V head i // (len(q_heads[u]) // len(kv_heads[u])), the GQA rule every local
    backend applies.
    """

    num_heads: int
    num_kv_heads: int
    size: int
    q_heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]

    @property
    def even(self) -> bool:
        """True when this is plain Ulysses (both head counts divisible, no replication)."""
        return self.num_heads % self.size == 0 and self.num_kv_heads % self.size == 0

    def local_heads(self, rank: int) -> tuple[int, int]:
        return len(self.q_heads[rank]), len(self.kv_heads[rank])

    def max_local_heads(self) -> tuple[int, int]:
        """(query, K/V) heads of the busiest rank: what sizes its attention buffers."""
        return max(map(len, self.q_heads)), max(map(len, self.kv_heads))

    def chunk(self, num_chunks: int) -> list[HeadPlan]:
        """Split an even plan into `num_chunks` plans over consecutive sub-runs of every rank's heads.

        Chunk c gives rank u the c-th of `num_chunks` equal pieces of its query and K/V heads, so
        the GQA correspondence (local query head i reads local K/V head i // group) holds inside
        every chunk and the chunks together are the plan.
        """
        if num_chunks == 1:
            return [self]
        hq, hkv = self.local_heads(0)
        if not self.even or hq % num_chunks or hkv % num_chunks:
            raise HeadPlanError(
                f"overlap over {num_chunks} head chunks needs query heads ({self.num_heads}) and key/value "
                f"heads ({self.num_kv_heads}) divisible by sp_size x chunks = {self.size * num_chunks}; "
                f"lower --ulysses-overlap-chunks")
        cq, ckv = hq // num_chunks, hkv // num_chunks
        return [HeadPlan(self.num_heads // num_chunks, self.num_kv_heads // num_chunks, self.size,
                         tuple(q[c * cq:(c + 1) * cq] for q in self.q_heads),
                         tuple(kv[c * ckv:(c + 1) * ckv] for kv in self.kv_heads))
                for c in range(num_chunks)]


def plan_heads(num_heads: int, num_kv_heads: int, size: int) -> HeadPlan:
    """Split `num_heads` query heads over `size` ranks and give each the K/V heads it needs."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise HeadPlanError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads}) "
                            "(grouped-query attention): check --num-attention-heads and --num-query-groups")
    if num_heads < size:
        raise HeadPlanError(
            f"the number of query heads ({num_heads}) is smaller than the sequence parallel size ({size}) of "
            "this all-to-all, i.e. smaller than the Ulysses degree: every Ulysses rank needs at least one head. "
            f"Lift the cap with --ring-attention-size R so that --ds-sequence-parallel-size / R <= {num_heads}"
        )
    group = num_heads // num_kv_heads
    base, extra = divmod(num_heads, size)
    q_heads, kv_heads, start = [], [], 0
    for u in range(size):
        n = base + (u < extra)
        heads = tuple(range(start, start + n))
        start += n
        needed = [h // group for h in heads]  # the K/V head each query head reads
        distinct = sorted(set(needed))
        counts = {needed.count(j) for j in distinct}
        # one copy per distinct K/V head when every one serves equally many query heads,
        # otherwise one per query head (the local backend's GQA rule needs equal groups)
        kv_heads.append(tuple(distinct) if len(counts) == 1 else tuple(needed))
        q_heads.append(heads)
    return HeadPlan(num_heads, num_kv_heads, size, tuple(q_heads), tuple(kv_heads))


def ulysses_bytes(plan: HeadPlan, rank: int, shard_tokens: int, batch: int, head_dim: int,
                  elem_size: int = 4) -> dict[str, int]:
    """Bytes Ulysses rank `rank` sends in one attention layer, from the head plan.

    Forward: to each other rank u its Q and K/V heads of my shard_tokens tokens, then my
    output heads of u's tokens back. Backward sends the transposed splits. With even heads
    both equal (2 Hq + 2 Hkv) d s/U (U-1)/U per token-shard, the paper's 4 N h / P.
    """
    u_all = range(plan.size)
    per_head = shard_tokens * batch * head_dim * elem_size
    qkv = [len(plan.q_heads[u]) + 2 * len(plan.kv_heads[u]) for u in u_all]
    q = [len(plan.q_heads[u]) for u in u_all]
    others = plan.size - 1
    forward = per_head * (sum(qkv) - qkv[rank] + others * q[rank])
    backward = per_head * (others * qkv[rank] + sum(q) - q[rank])
    return {"forward": forward, "backward": backward, "total": forward + backward}
