"""The per-rank plan of a run, printed by `pretrain_gpt.py --dry-run` (DRY_RUN=1 in the scripts).

It answers "what will each GPU do, and will it fit" before a job waits in a queue: the
rank layout (SP groups are consecutive ranks, DP groups strided by SP), batch geometry,
tokens per step and per rank, and the ZeRO bytes per rank for parameters, gradients and
Adam state. Activation memory is not estimated (it depends on kernels and recompute).
"""

from __future__ import annotations

from megatron.config import RunConfig
from megatron.core.topology import Topology
from megatron.parallel.data_parallel import zero_formula_bytes
from megatron.planning.flops import flops_per_step

_MAX_RANK_ROWS = 64


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def run_topology(cfg: RunConfig) -> Topology:
    """The topology the run builds (what validation checked, what the plan prints)."""
    m, p = cfg.model, cfg.parallel
    return Topology(cfg.world_size, p.sequence_parallel_size, p.ring_attention_size,
                    num_heads=m.num_attention_heads, num_kv_heads=m.num_query_groups,
                    seq_length=cfg.data.seq_length, overlap_chunks=p.ulysses_overlap_chunks)


def planned_ranks(cfg: RunConfig) -> list[dict]:
    """What every rank will be, from the topology alone: coordinates, the global ranks of its
    groups, and the query / K/V heads its attention holds. `pretrain` logs the same facts read
    back from the process groups and modules it built (event "topology"); tests compare them."""
    topo = run_topology(cfg)
    groups = {"sp": topo.sp_groups(), "dp": topo.dp_groups(), "ulysses": topo.ulysses_groups(),
              "ring": topo.ring_groups()}
    out = []
    for r in range(cfg.world_size):
        c = topo.coords(r)
        mine = {name: next(g for g in gs if r in g) for name, gs in groups.items()}
        heads = list(topo.heads_per_rank(c.ulysses_rank))
        out.append({"rank": r, "dp_rank": c.dp_rank, "sp_rank": c.sp_rank, "ring_rank": c.ring_rank,
                    "ulysses_rank": c.ulysses_rank, **{f"{k}_group": v for k, v in mine.items()},
                    "heads": heads})
    return out


def describe_plan(cfg: RunConfig, gpus_per_node: int | None = None) -> str:
    world, sp = cfg.world_size, cfg.parallel.sequence_parallel_size
    dp, mbs, gbs = cfg.data_parallel_size, cfg.train.micro_batch_size, cfg.train.global_batch_size
    seq, m, par = cfg.data.seq_length, cfg.model, cfg.parallel
    topo = run_topology(cfg)
    heads, kv_heads = topo.max_heads_per_rank()
    sp_text = (f"sequence parallel {sp} = Ulysses {topo.ulysses_size} x ring {topo.ring_size}"
               if topo.ring_size > 1 else f"sequence parallel (Ulysses) {sp}")
    gpn = gpus_per_node or world
    n_params = m.num_parameters()
    mem = zero_formula_bytes(n_params, cfg.parallel.zero_stage, world)
    total = sum(mem.values())
    lines = [
        "DRY RUN: configuration is valid; nothing was launched.",
        f"world size {world} ({max(1, world // gpn)} node(s) x {gpn} rank(s)) = data parallel {dp} x "
        f"{sp_text}",
        f"ZeRO stage {par.zero_stage} over the {world}-rank sequence-data-parallel group | "
        f"precision {cfg.optim.dtype_name} | attention {par.attention_backend} | recompute {par.recompute_granularity}",
        f"batch: micro {mbs} x accumulation {cfg.num_micro_batches} x dp {dp} = global {gbs} sequences of "
        f"{seq} tokens",
        f"tokens per step {cfg.tokens_per_step:,} | per rank per micro-batch {mbs} x {seq // sp:,} tokens "
        f"(1/{sp} of each sequence) | heads per rank in attention {heads} (K/V {kv_heads})"
        + (f" over {seq // topo.ring_size:,} tokens (1/{topo.ring_size} of the sequence, then the ring)"
           if topo.ring_size > 1 else ""),
        f"train iterations {cfg.train.train_iters:,} = {cfg.train.train_iters * gbs:,} samples = "
        f"{cfg.train.train_iters * cfg.tokens_per_step:,} tokens | lr {cfg.optim.lr:g} -> {cfg.optim.min_lr:g} "
        f"{cfg.optim.lr_decay_style} over {cfg.optim.lr_decay_steps:,} steps, warmup {cfg.optim.lr_warmup_steps:,}",
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, ffn "
        f"{m.ffn_hidden_size}, vocab {m.vocab_size} -> {_count(n_params)} parameters | "
        f"{_count(flops_per_step(m, seq, gbs), _FLOP_UNITS)}FLOP per step",
        f"bytes per rank (fp32 master weights + Adam): params {_gib(mem['param_bytes'])}, grads "
        f"{_gib(mem['grad_bytes'])}, optimizer {_gib(mem['optimizer_bytes'])}, total {_gib(total)} "
        f"(+ activations)",
        "",
        f"{'rank':>5} {'node':>5} {'local':>6} {'dp_rank':>8} {'sp_rank':>8}  sp group / dp group"
        + ("  (ring rank, ulysses rank)" if topo.ring_size > 1 else ""),
    ]
    sp_groups, dp_groups = topo.sp_groups(), topo.dp_groups()
    for r in range(min(world, _MAX_RANK_ROWS)):
        c = topo.coords(r)
        extra = f"  ({c.ring_rank}, {c.ulysses_rank})" if topo.ring_size > 1 else ""
        lines.append(f"{r:5d} {r // gpn:5d} {r % gpn:6d} {c.dp_rank:8d} {c.sp_rank:8d}  "
                     f"{_short(sp_groups[c.dp_rank])} / {_short(dp_groups[c.sp_rank])}{extra}")
    if world > _MAX_RANK_ROWS:
        lines.append(f"... {world - _MAX_RANK_ROWS} more ranks follow the same pattern")
    lines += [f"note: {n}" for n in cfg.notes]
    lines.append("not checked in a dry run: flash-attn/triton installation and GPUs on the target nodes")
    return "\n".join(lines)


def _count(x: float, units=(("B", 1e9), ("M", 1e6), ("k", 1e3))) -> str:
    for unit, scale in units:
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


_FLOP_UNITS = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6))


def _short(ranks: list) -> str:
    if len(ranks) <= 6:
        return str(ranks)
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)})"
