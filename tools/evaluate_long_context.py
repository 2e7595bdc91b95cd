"""Long-context evaluation of a checkpoint: loss by position and passkey retrieval, distributed with SP.

    python tools/evaluate_long_context.py --load CKPT --data-path corpus_text_document --seq-length 8192 \\
        --passkey-lengths 2048 4096 8192 --output-dir eval/
    torchrun --nproc_per_node 8 tools/evaluate_long_context.py --load CKPT --data-path PREFIX --seq-length 131072 \\
        --passkey-lengths 32768 65536 131072 --output-dir eval/ --tensorboard-dir tb/

Forward only. Under torchrun all ranks form one sequence-parallel group (Ulysses; add
`--ring-attention-size R` for the Ulysses x ring layout), each sequence is sharded as in training,
and the results equal a single-process evaluation. Writes `results.json`,
`loss_by_position.png`, `passkey.png` (and TensorBoard scalars with `--tensorboard-dir`); long
runs print progress with an ETA.

Loss by position: the first `--num-documents` documents of at least `--seq-length + 1` tokens,
from the end of the `.bin/.idx` prefix (the held-out end of a `--split` run), averaged per
position bucket. Passkey: the text task with the checkpoint's tokenizer, or
`--passkey-synthetic MARKER:DIGIT_LO-DIGIT_HI:FILLER_LO-FILLER_HI[:KEY_TOKENS]` in token ids for
models without one. `--rope-scaling-*` evaluate the model with a RoPE scaling its checkpoint
does not record (e.g. dynamic NTK or yarn on a model trained without).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `megatron` and `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.config import ConfigError
from tools.generate import add_tokenizer_flags, init_distributed, tokenizer_for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint: a --save directory, an iter_XXXXXXX directory or a .pt")
    p.add_argument("--iteration", type=int, help="iteration to load (default: the latest)")
    g = p.add_argument_group("loss by position")
    g.add_argument("--data-path", help="a .bin/.idx prefix with long documents (omit to skip)")
    g.add_argument("--seq-length", type=int, help="tokens per evaluated sequence (default: the training seq length)")
    g.add_argument("--num-documents", type=int, default=8, help="documents to average over")
    g.add_argument("--buckets", type=int, default=16, help="position buckets")
    g.add_argument("--bucket-scale", choices=["linear", "log"], default="linear")
    g.add_argument("--documents-from", choices=["end", "start"], default="end",
                   help="take documents from the end of the dataset (held out by --split) or its start")
    g = p.add_argument_group("passkey retrieval")
    g.add_argument("--passkey-lengths", type=int, nargs="*", default=[], help="context lengths (omit to skip)")
    g.add_argument("--passkey-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths, 0 = start of the filler, 1 = right before the question")
    g.add_argument("--passkey-trials", type=int, default=5, help="examples per (length, depth)")
    g.add_argument("--passkey-digits", type=int, default=5, help="digits of the text passkey")
    g.add_argument("--passkey-synthetic", metavar="M:DLO-DHI:FLO-FHI[:K]",
                   help="token-level passkey (no tokenizer): marker id, digit id range, filler id range, key tokens")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model and run")
    g.add_argument("--rope-scaling-type", choices=["linear", "dynamic", "yarn", "llama3"],
                   help="evaluate with this RoPE scaling instead of the checkpoint's")
    g.add_argument("--rope-scaling-factor", type=float)
    g.add_argument("--original-max-position-embeddings", type=int)
    g.add_argument("--ring-attention-size", type=int, default=1, help="Ulysses x ring layout (R > 1)")
    g.add_argument("--attention-backend", default="sdpa", choices=["sdpa", "classic", "flash-attn", "triton"])
    g.add_argument("--batch-size", type=int, default=1, help="sequences per forward")
    g.add_argument("--bf16", action="store_true", help="run the model in bf16 (GPU)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"])
    add_tokenizer_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="results.json and the PNG plots go here")
    g.add_argument("--tensorboard-dir", help="write the results as TensorBoard scalars here")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--compare", action="append", default=[], metavar="LABEL=RESULTS.json",
                   help="draw this earlier result's loss curve next to the new one (repeatable)")
    g.add_argument("--label", default="", help="legend label of this run's curve")
    g.add_argument("--trained-context", type=int,
                   help="the context the model was trained at, marked on the loss plot (default: the checkpoint's)")
    return p


def parse_synthetic(spec: str):
    from megatron.inference.long_context import PasskeyTask  # noqa: PLC0415

    try:
        parts = spec.split(":")
        marker = int(parts[0])
        digits = tuple(int(x) for x in parts[1].split("-"))
        filler = tuple(int(x) for x in parts[2].split("-"))
        key_tokens = int(parts[3]) if len(parts) > 3 else 1
        if len(digits) != 2 or len(filler) != 2:
            raise ValueError
    except (ValueError, IndexError) as e:
        raise ConfigError(f"--passkey-synthetic {spec!r}: expected MARKER:DLO-DHI:FLO-FHI[:K], e.g. 1:2-10:10-64") from e
    return PasskeyTask.synthetic(marker, digits, filler, key_tokens)


def _config_changes(args) -> dict:
    if args.rope_scaling_type is None:
        return {}
    if args.rope_scaling_factor is None:
        raise ConfigError("--rope-scaling-type needs --rope-scaling-factor")
    return {"rope_scaling_type": args.rope_scaling_type, "rope_scaling_factor": args.rope_scaling_factor,
            "original_max_position_embeddings": args.original_max_position_embeddings}


def evaluate(args) -> dict:
    """Run the evaluation on this rank (every rank returns the same result)."""
    import torch  # noqa: PLC0415

    from megatron.config import ParallelConfig  # noqa: PLC0415
    from megatron.inference.checkpoint import load_model  # noqa: PLC0415
    from megatron.inference.long_context import LongContextEvaluator, PasskeyTask, long_documents  # noqa: PLC0415
    from megatron.parallel import parallelize_gpt  # noqa: PLC0415

    if not args.data_path and not args.passkey_lengths:
        raise ConfigError("nothing to evaluate: pass --data-path (loss by position) and/or --passkey-lengths")
    state, device = init_distributed(args.distributed_backend)
    if state is not None and args.ring_attention_size > 1:
        from megatron.core.parallel_state import initialize_model_parallel  # noqa: PLC0415

        state = initialize_model_parallel(sequence_parallel_size=state.sp_size,
                                          ring_attention_size=args.ring_attention_size, device_type=device.type)
    loaded = load_model(args.load, args.iteration, device=device, dtype=torch.bfloat16 if args.bf16 else None,
                        **_config_changes(args))
    sp = state.sp_size if state is not None else 1
    model = parallelize_gpt(loaded.model, state, ParallelConfig(sequence_parallel_size=sp,
                                                                ring_attention_size=args.ring_attention_size,
                                                                attention_backend=args.attention_backend,
                                                                zero_stage=0), device=device, data_parallel=False)
    trained = args.trained_context or ((loaded.run_config or {}).get("data") or {}).get("seq_length")
    evaluator = LongContextEvaluator(model, state, device)
    result = {"checkpoint": loaded.path, "iteration": loaded.iteration, "sequence_parallel_size": sp,
              "ring_attention_size": args.ring_attention_size, "trained_context": trained,
              "rope_scaling": [loaded.config.rope_scaling_type, loaded.config.rope_scaling_factor]}
    if args.data_path:
        n = args.seq_length or trained
        if not n:
            raise ConfigError("--seq-length is needed: the checkpoint records no training sequence length")
        docs = long_documents(args.data_path, n + 1, args.num_documents, from_end=args.documents_from == "end")
        result["loss_by_position"] = evaluator.loss_by_position(docs, n, args.buckets, args.bucket_scale,
                                                                args.batch_size)
        result["loss_by_position"]["trained_context"] = trained
    if args.passkey_lengths:
        if args.passkey_synthetic:
            task = parse_synthetic(args.passkey_synthetic)
        else:
            tokenizer = tokenizer_for(args, loaded.run_config)
            if tokenizer is None:
                raise ConfigError("the text passkey needs a tokenizer: the checkpoint records none usable here; pass "
                                  "the tokenizer flags, or --passkey-synthetic for a token-level task")
            task = PasskeyTask.from_tokenizer(tokenizer, args.passkey_digits)
        result["passkey"] = evaluator.passkey(task, args.passkey_lengths, args.passkey_depths, args.passkey_trials,
                                              args.seed, args.batch_size)
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    from megatron.inference.reports import write_report  # noqa: PLC0415

    compare = []
    for spec in args.compare:
        label, _, path = spec.partition("=")
        with open(path) as f:
            compare.append((label, json.load(f)))
    if args.output_dir:
        written = write_report(result, args.output_dir, plots=not args.no_plots, tensorboard_dir=args.tensorboard_dir,
                               step=result.get("iteration") or 0, compare=compare, label=args.label)
        print(f"wrote {', '.join(written)}")
    elif args.tensorboard_dir:
        from megatron.inference.reports import write_tensorboard  # noqa: PLC0415

        write_tensorboard(result, args.tensorboard_dir, result.get("iteration") or 0)
    summary = {k: v for k, v in result.items() if k not in ("loss_by_position", "passkey")}
    if "loss_by_position" in result:
        summary["loss"] = round(result["loss_by_position"]["overall_loss"], 4)
        summary["loss_by_bucket"] = [round(x, 4) for x in result["loss_by_position"]["mean_loss"]]
    if "passkey" in result:
        summary["passkey_accuracy"] = round(result["passkey"]["mean_accuracy"], 4)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
