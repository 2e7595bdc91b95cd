"""Will it fit? Per-rank GPU memory of a pretrain_gpt.py run, before it waits in a queue.

Takes the same flags as pretrain_gpt.py plus the machine:

    python tools/estimate_memory.py --world-size 4 --gpu-memory-gb 80 \\
        --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 32768 \\
        --max-position-embeddings 32768 --ds-sequence-parallel-size 4 --zero-stage 1 \\
        --bf16 --use-flash-attn-v2 --checkpoint-activations --micro-batch-size 1

and prints the per-rank breakdown (parameters, gradients, optimizer state under the
ZeRO stage, activations with and without checkpointing, logits/loss, all-to-all buffers,
attention workspace), the verdict, and the longest sequence that fits with the same
settings. `--sweep-seq 65536,131072` (or `auto`) tabulates the peak against N.

A launch script can be estimated as is: its DRY_RUN path runs `$PYTHON pretrain_gpt.py
--dry-run FLAGS` with WORLD_SIZE set, so

    DRY_RUN=1 NNODES=1 GPUS_PER_NODE=4 PYTHON="python tools/estimate_memory.py" \\
        bash examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh

runs this tool on the script's flags (the pretrain_gpt.py path and --dry-run are skipped).
Sizes are GiB (2^30 bytes); `--gpu-memory-gb 80` means an 80 GiB card (A100/H100 80GB).

The longest sequence with every memory trick on (megatron/planning/long_context.py: ZeRO-3,
full recompute with offloaded layer inputs, sequence tiling, head-chunked attention, tiled loss),
the term that bounds it and the host memory the offload needs:

    python tools/estimate_memory.py --longest --preset llama3-8b --num-gpus 8 --gpu-memory-gb 80
    python tools/estimate_memory.py --longest --num-gpus 1 --gpu-memory-gb 80 MODEL_FLAGS
    python tools/estimate_memory.py --reference alst     # Llama-3-8B at 1/8/32 GPUs beside ALST's paper
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `megatron` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.arguments import build_parser, config_from_args  # noqa: E402
from megatron.config import ConfigError, RunConfig  # noqa: E402
from megatron.planning.long_context import (  # noqa: E402
    PRESETS,
    describe_strategy,
    longest_sequence,
    strategy_flags,
)
from megatron.planning.memory_estimate import (  # noqa: E402
    GIB,
    estimate_memory,
    largest_seq_length,
    sequence_granularity,
)

_PHASE_NAMES = {"forward_end": "end of forward (logits + loss)", "loss_backward": "loss backward",
                "layer_forward": "last layer forward (attention)", "layer_backward": "last layer backward",
                "first_forward": "a layer's first forward"}


def _add(group, parser, flag: str, **kw) -> None:
    """Add an estimator flag unless pretrain_gpt.py's parser already defines it."""
    if flag not in parser._option_string_actions:
        group.add_argument(flag, **kw)


def _estimator_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("memory estimate (tools/estimate_memory.py)")
    _add(g, parser, "--world-size", type=int, help="number of ranks (GPUs) of the job")
    _add(g, parser, "--num-gpus", type=int, help="alias of --world-size")
    _add(g, parser, "--nnodes", type=int, help="nodes; world size = --nnodes x --gpus-per-node")
    _add(g, parser, "--gpus-per-node", type=int, help="GPUs per node (with --nnodes)")
    _add(g, parser, "--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    _add(g, parser, "--reserve-gb", type=float, default=2.0,
         help="GiB per GPU kept out of the budget: CUDA context, NCCL buffers, allocator slack (default 2)")
    _add(g, parser, "--sweep-seq", help="comma-separated sequence lengths to tabulate, or 'auto'")
    _add(g, parser, "--ring-attention-size", type=int, default=1,
         help="assume Ulysses x ring (hybrid) attention with rings of this size: SP may then exceed "
              "the head count, up to heads x ring size")
    _add(g, parser, "--estimate-device", choices=["cuda", "cpu"], default="cuda",
         help="cuda (bool dropout masks, flash kernels' scratch) or cpu (what tests/memory measures)")
    _add(g, parser, "--autocast-weight-cache", action="store_true",
         help="assume torch.autocast's weight cache is on (the training stack turns it off): a bf16 copy "
              "of every weight is kept to the end of forward")
    _add(g, parser, "--padded-vocab-size", type=int, help="vocabulary size to use instead of building the tokenizer")
    _add(g, parser, "--json", action="store_true", help="print the breakdown as JSON")
    return parser


def _strip_launcher_words(argv: list[str]) -> list[str]:
    """Drop what a launch script's DRY_RUN path adds around the flags (see the module doc)."""
    return [a for a in argv if a != "--dry-run" and not a.endswith("pretrain_gpt.py")]


def _fill_required(args: argparse.Namespace, notes: list[str]) -> None:
    """Flags pretrain_gpt.py requires but memory does not depend on get harmless values."""
    if not args.data_path and not args.mock_data:
        args.mock_data = True
        notes.append("no --data-path: estimating with --mock-data")
    if args.mock_data and args.tokenizer_type is None and args.vocab_size is None \
            and args.padded_vocab_size is None:
        args.vocab_size = 50257
        notes.append("no vocabulary given: GPT-2's 50257 tokens (pass --vocab-size or --padded-vocab-size)")
    if args.train_iters is None and args.train_samples is None and args.train_tokens is None:
        args.train_iters = 1
    if args.lr is None:
        args.lr = 1e-4


def world_size_of(args: argparse.Namespace, sp: int, notes: list[str]) -> int:
    """--world-size / --num-gpus / --nnodes x --gpus-per-node / WORLD_SIZE, else the SP size."""
    given = [v for v in (args.world_size, args.num_gpus) if v is not None]
    if args.nnodes is not None or args.gpus_per_node is not None:
        if args.nnodes is None or args.gpus_per_node is None:
            raise ConfigError("--nnodes and --gpus-per-node go together; pass both (or --world-size N)")
        given.append(args.nnodes * args.gpus_per_node)
    if len(set(given)) > 1:
        raise ConfigError(f"--world-size / --num-gpus / --nnodes x --gpus-per-node disagree ({given}); pass one")
    if given:
        return given[0]
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    notes.append(f"no world size given: assuming {sp} ranks (one SP group, DP 1); pass --world-size N")
    return sp


def parse(argv: list[str]) -> tuple[RunConfig, argparse.Namespace, list[str]]:
    """pretrain_gpt.py's own parsing and validation, for an explicit world size.

    With --ring-attention-size R the SP group is R rings of SP/R Ulysses ranks. While
    pretrain_gpt.py has no such flag (the model runs the hybrid when its ParallelState is
    built with ring_attention_size), the flags are validated as the Ulysses part (SP/R
    ranks, world/R), so the head-count rule applies to SP/R, which is what the hybrid needs.
    """
    parser = build_parser(_estimator_flags)
    args = parser.parse_args(_strip_launcher_words(argv))
    notes: list[str] = []
    _fill_required(args, notes)
    world = world_size_of(args, args.ds_sequence_parallel_size, notes)
    if args.ring_attention_size > 1 and getattr(args, "attention_dropout", 0):
        args.attention_dropout = 0.0  # ring attention has none; memory is the same either way
        notes.append("ring attention runs without attention dropout (--attention-dropout 0 assumed)")
    cfg = config_from_args(args, world, check_environment=False, padded_vocab_size=args.padded_vocab_size)
    return cfg, args, notes


def estimate_settings(cfg: RunConfig, args: argparse.Namespace) -> dict:
    """Keyword arguments of `estimate_memory` for a parsed run."""
    return dict(micro_batch_size=cfg.train.micro_batch_size, parallel=cfg.parallel,
                data_parallel_size=cfg.world_size // cfg.parallel.sequence_parallel_size,
                precision=cfg.optim.dtype_name, device=args.estimate_device,
                autocast_weight_cache=args.autocast_weight_cache)


def _row(label: str, x: float) -> str:
    return f"  {label:<42s}{x / GIB:9.2f}"


def report(cfg: RunConfig, est: dict, settings: dict, budget: float, gpu: float, largest: int) -> str:
    m, s, par = cfg.model, settings, cfg.parallel
    sp, dp, zero = par.sequence_parallel_size, s["data_parallel_size"], par.zero_stage
    rec = {None: "none", "full": "full", "selective": "selective"}[par.recompute_granularity]
    ring = par.ring_attention_size
    hybrid = f" (Ulysses {sp // ring} x ring {ring})" if ring > 1 else ""
    lines = [
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
        f"(K/V {m.num_query_groups}), ffn {m.ffn_hidden_size}, vocab {m.vocab_size}, "
        f"{m.position_embedding_type} positions -> {est['num_parameters'] / 1e9:.3f} B parameters",
        f"run: seq {cfg.data.seq_length:,} x micro batch {s['micro_batch_size']} | {cfg.world_size} ranks = "
        f"SP {sp}{hybrid} x DP {dp} | ZeRO-{zero} over {sp * dp} | {s['precision']} | {par.attention_backend} | "
        f"recompute {rec} | loss tiles {par.loss_tile_tokens or 'off'} | {est['tokens_per_rank']:,} tokens per rank",
        "",
        "per-rank memory (GiB)",
        _row(f"parameters (fp32{', sharded' if zero >= 2 else ''})", est["parameters"]),
        _row(f"gradients (fp32{', sharded' if zero >= 2 else ''})", est["gradients"]),
        _row(f"optimizer state (Adam{f', ZeRO-{zero} sharded' if zero >= 1 else ''})", est["optimizer_state"]),
        _row(f"activations kept for backward ({rec})", est["activations"]),
        f"    (no recompute {est['activations_no_recompute'] / GIB:.2f} | selective "
        f"{est['activations_selective_recompute'] / GIB:.2f} | full {est['activations_full_recompute'] / GIB:.2f})",
        _row("activations offloaded to host memory", est["host_activations"]),
        _row("logits + loss (saved + peak)", est["logits_loss"]),
        _row("all-to-all buffers (one layer)", est["all_to_all_buffers"]),
        _row("attention workspace (lse or scores)", est["attention_workspace"]),
        _row("backward workspace (last layer)", est["backward_workspace"]),
        _row("bf16 weight copies (autocast)", est["weight_copies"]),
        _row("gathered params + grad buffers (ZeRO)", est["gathered_parameters"]),
        "",
        "peak by moment of the step (GiB): " + " | ".join(
            f"{_PHASE_NAMES[k]} {v / GIB:.2f}" for k, v in est["phases"].items()),
    ]
    fits = est["peak"] <= budget
    verdict = "FITS" if fits else "DOES NOT FIT"
    lines.append(f"peak {est['peak'] / GIB:.2f} GiB ({_PHASE_NAMES[est['peak_phase']]}) + reserve "
                 f"{(gpu - budget) / GIB:.2f} of {gpu / GIB:.0f} GiB -> {verdict} "
                 f"({'headroom' if fits else 'short by'} {abs(budget - est['peak']) / GIB:.2f} GiB)")
    if est["host_activations"]:
        per_node = est["host_activations"] * min(cfg.world_size, 8)
        lines.append(f"host memory for offloaded activations: {est['host_activations'] / GIB:.2f} GiB per rank, "
                     f"{per_node / GIB:.2f} GiB per node of {min(cfg.world_size, 8)} GPUs")
    lines.append(f"longest sequence that fits with these settings: "
                 f"{largest:,} tokens" if largest else "no sequence length fits with these settings")
    return "\n".join(lines)


def sweep(cfg: RunConfig, settings: dict, spec: str, budget: float, largest: int) -> str:
    granule = sequence_granularity(cfg.parallel.sequence_parallel_size, cfg.parallel.ring_attention_size)
    if spec == "auto":
        n, seqs = 4096, []
        while n <= max(largest * 2, 8192):
            seqs.append(n)
            n *= 2
    else:
        seqs = [int(x) for x in spec.split(",") if x.strip()]
    rows = ["| N | tokens/rank | activations GiB | peak GiB | moment | fits |", "|---|---|---|---|---|---|"]
    for n in seqs:
        if n % granule:
            rows.append(f"| {n:,} | - | - | - | not a multiple of {granule} | - |")
            continue
        m = cfg.model
        if m.position_embedding_type == "learned_absolute":
            m = m.replace(max_position_embeddings=max(n, m.max_position_embeddings))
        est = estimate_memory(m, n, **settings)
        rows.append(f"| {n:,} | {est['tokens_per_rank']:,} | {est['activations'] / GIB:.2f} | "
                    f"{est['peak'] / GIB:.2f} | {est['peak_phase']} | {'yes' if est['peak'] <= budget else 'no'} |")
    return "\n".join(rows)


# Arctic Long Sequence Training (ALST, arXiv:2506.13996, abstract and Figure 1): the longest
# sequence trained for Llama-8B on H100 80GB GPUs: 500K on one GPU, 3.7M on one 8-GPU node,
# 15M on four nodes (32 GPUs). Its single-GPU run offloads the optimizer state to the CPU.
ALST_LLAMA_8B = {1: 500_000, 8: 3_700_000, 32: 15_000_000}
_LONGEST_WORDS = ("--longest", "--reference", "--preset")


def _longest_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="estimate_memory.py --longest",
        description="The longest sequence a model trains on N GPUs of M GiB with every memory trick on "
                    "(megatron.planning.long_context.every_trick), the terms that bound it, and the host "
                    "memory its offloaded activations need.")
    ap.add_argument("--longest", action="store_true", help="search the longest sequence (the default here)")
    ap.add_argument("--reference", choices=["alst"], help="alst: Llama-3-8B at 1, 8 and 32 GPUs beside ALST's "
                    "published lengths (arXiv:2506.13996)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a model shape instead of pretrain_gpt.py's flags")
    ap.add_argument("--world-size", "--num-gpus", dest="world_size", type=int, help="GPUs (default 8)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--reserve-gb", type=float, default=2.0,
                    help="GiB per GPU kept out of the budget: CUDA context, NCCL, allocator slack (default 2)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for host memory per node (8)")
    ap.add_argument("--host-memory-gb", type=float,
                    help="host memory per node for offloaded activations (GiB); default: no limit, reported")
    ap.add_argument("--attention-backend", choices=["sdpa", "flash-attn"], default="sdpa",
                    help="sdpa (torch's FlashAttention-2 kernels, read the all-to-all buffers in place; default) "
                         "or flash-attn (the flash_attn package)")
    ap.add_argument("--json", action="store_true")
    return ap


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def longest(model, world: int, args) -> dict:
    budget = (args.gpu_memory_gb - args.reserve_gb) * GIB
    host = args.host_memory_gb * GIB / min(world, args.gpus_per_node) if args.host_memory_gb else None
    n, est = longest_sequence(model, world, budget, host_budget_bytes=host, attention_backend=args.attention_backend)
    return {"world_size": world, "seq_length": n, "estimate": est, "budget_bytes": budget,
            "host_per_node": est["host_activations"] * min(world, args.gpus_per_node) if est else 0}


def _describe_longest(model, r: dict, args) -> str:
    est, n, world = r["estimate"], r["seq_length"], r["world_size"]
    lines = [f"model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
             f"(K/V {model.num_query_groups}), ffn {model.ffn_hidden_size}, vocab {model.vocab_size}, "
             f"{model.position_embedding_type} positions -> {model.num_parameters() / 1e9:.2f} B parameters",
             f"machine: {world} GPU(s) x {args.gpu_memory_gb:g} GiB (budget {_gib(r['budget_bytes'])} GiB after "
             f"{args.reserve_gb:g} GiB reserve), {min(world, args.gpus_per_node)} per node, host memory "
             + (f"{args.host_memory_gb:g} GiB per node" if args.host_memory_gb else "not limited")]
    if not n:
        lines.append("no sequence fits, even with every trick on (the parameter, gradient and optimizer shards "
                     "alone may exceed the budget: use more GPUs)")
        return "\n".join(lines)
    lines += [f"every trick: {describe_strategy(est['parallel'])}",
              f"flags: {strategy_flags(est['parallel'])}",
              f"longest sequence: {n:,} tokens ({est['tokens_per_rank']:,} per GPU), peak "
              f"{_gib(est['peak'])} GiB per GPU at the {_PHASE_NAMES[est['peak_phase']]}",
              f"host memory for offloaded layer inputs: {_gib(est['host_activations'])} GiB per GPU, "
              f"{_gib(r['host_per_node'])} GiB per node",
              "terms of the peak, largest first (GiB):"]
    lines += [f"  {_gib(b):>9}  {name}" for name, b in est["peak_terms"].items()]
    return "\n".join(lines)


def longest_main(argv: list[str]) -> int:
    """`--longest` / `--reference alst` / `--preset`: every trick on, the longest sequence."""
    ap = _longest_parser()
    args, rest = ap.parse_known_args(argv)
    if args.reference == "alst":
        model = PRESETS["llama3-8b"]()
        rows = [longest(model, world, args) for world in sorted(ALST_LLAMA_8B)]
        if args.json:
            print(json.dumps([{"world_size": r["world_size"], "alst": ALST_LLAMA_8B[r["world_size"]],
                               "ours": r["seq_length"], "peak": r["estimate"]["peak"] if r["estimate"] else None,
                               "host_per_node": r["host_per_node"]} for r in rows]))
            return 0
        print(f"Llama-3-8B (32 layers, hidden 4096, 32 heads / 8 K/V, ffn 14336, vocab 128256, RoPE), GPUs of "
              f"{args.gpu_memory_gb:g} GiB ({args.reserve_gb:g} reserved), bf16, every trick on")
        print("| GPUs | ALST (paper) | this planner | peak GiB/GPU | bound by | host GiB/node |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            est = r["estimate"]
            bound = (f"{_PHASE_NAMES[est['peak_phase']]}: {next(iter(est['peak_terms']))}" if est
                     else "parameter/optimizer shards")
            print(f"| {r['world_size']} | {ALST_LLAMA_8B[r['world_size']]:,} | {r['seq_length']:,} | "
                  f"{_gib(est['peak']) if est else '-'} | {bound} | {_gib(r['host_per_node'])} |")
        print("ALST: arXiv:2506.13996 (Llama-8B on H100 80GB: 500K on 1 GPU, 3.7M on 8, 15M on 32). Its 1-GPU run "
              "offloads the optimizer state to the CPU, which this framework does not implement, so 8B x 16 bytes "
              "of fp32 weights, gradients and Adam state must fit one GPU here.")
        return 0
    if args.preset:
        model = PRESETS[args.preset]()
    else:
        try:
            cfg, _, _ = parse(rest + (["--world-size", str(args.world_size)] if args.world_size else []))
        except ConfigError as e:
            print(f"estimate_memory.py: error: {e}", file=sys.stderr)
            return 2
        model = cfg.model
    r = longest(model, args.world_size or 8, args)
    if args.json:
        est = dict(r["estimate"] or {})
        est.pop("parallel", None)
        print(json.dumps({"seq_length": r["seq_length"], "host_per_node": r["host_per_node"], **est},
                         default=str))
        return 0
    print(_describe_longest(model, r, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=")[0] in _LONGEST_WORDS for a in argv):
        return longest_main(argv)
    try:
        cfg, args, notes = parse(argv)
    except ConfigError as e:
        print(f"estimate_memory.py: error: {e}", file=sys.stderr)
        return 2
    settings = estimate_settings(cfg, args)
    est = estimate_memory(cfg.model, cfg.data.seq_length, **settings)
    gpu = args.gpu_memory_gb * GIB
    budget = gpu - args.reserve_gb * GIB
    # learned absolute positions: the table grows with N, as the scripts set it to --seq-length
    largest = largest_seq_length(cfg.model, budget, **settings)
    if args.json:
        out = dict(est)
        out.update(fits=est["peak"] <= budget, budget_bytes=budget, largest_seq_length=largest, settings=settings)
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(report(cfg, est, settings, budget, gpu, largest))
    if settings["autocast_weight_cache"] and settings["precision"] != "fp32":
        uncached = estimate_memory(cfg.model, cfg.data.seq_length, **{**settings, "autocast_weight_cache": False})
        if est["peak"] - uncached["peak"] > GIB:
            notes.append(f"torch.autocast's weight cache keeps a bf16 copy of every weight until the forward "
                         f"ends ({est['weight_copies'] / GIB:.2f} GiB here); with "
                         f"autocast(cache_enabled=False) the peak would be {uncached['peak'] / GIB:.2f} GiB "
                         f"(the training stack's default; drop --autocast-weight-cache)")
    if args.sweep_seq:
        print()
        print(sweep(cfg, settings, args.sweep_seq, budget, largest))
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
