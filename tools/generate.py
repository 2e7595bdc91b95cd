"""Generate text from a checkpoint with a KV cache; long prompts prefill across an SP group.

    python tools/generate.py --load CKPT --prompt "Once upon a time" --max-new-tokens 64
    python tools/generate.py --load CKPT --prompt-ids "12 7 33" --temperature 0.8 --top-p 0.9 --seed 1
    torchrun --nproc_per_node 8 tools/generate.py --load CKPT --prompt-file long.txt   # SP prefill on 8 ranks

`--load` takes a training `--save` directory (any SP/DP/ZeRO layout), one `iter_XXXXXXX`
directory or a consolidated .pt file. The tokenizer is the one the checkpoint was trained with
(or the tokenizer flags); generation stops at its end-of-document token. Greedy by default
(`--temperature 0`). Under torchrun every rank holds the weights and all ranks form one
sequence-parallel group: the prompt is sharded as in training and attention runs through the
Ulysses all-to-all; each rank then keeps the K/V cache of its heads only (see
megatron/inference/generation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `megatron` and `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from megatron.config import ConfigError
from megatron.data.tokenizers import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint: a --save directory, an iter_XXXXXXX directory or a .pt")
    p.add_argument("--iteration", type=int, help="iteration to load (default: the latest)")
    g = p.add_argument_group("prompts (one of)")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    g.add_argument("--prompt-file", help="a file whose whole text is one prompt")
    g.add_argument("--prompt-ids", action="append", default=[], help="token ids, e.g. '12 7 33' (repeat for a batch)")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample within this cumulative probability")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eod-id", type=int, help="stop token (default: the tokenizer's end-of-document token)")
    g.add_argument("--no-stop-at-eod", action="store_true", help="always generate --max-new-tokens tokens")
    add_tokenizer_flags(p)
    g = p.add_argument_group("output and devices")
    g.add_argument("--output-json", help="write prompts, token ids and texts here")
    g.add_argument("--bf16", action="store_true", help="run the model in bf16 (GPU)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], help="default: nccl with GPUs, else gloo")
    return p


TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")


def tokenizer_for(args, run_config: dict | None):
    """The tokenizer of the flags, else the checkpoint's; None when neither is available."""
    from megatron.inference.checkpoint import build_tokenizer_for  # noqa: PLC0415

    return build_tokenizer_for(run_config, {k: getattr(args, k) for k in TOKENIZER_FLAGS})


def add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer (default: the one recorded in the checkpoint)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-size", type=int)


def init_distributed(backend: str | None = None):
    """(parallel_state or None, device): one SP group over every rank (torchrun's, or a process group that
    already exists)."""
    import torch.distributed as dist  # noqa: PLC0415

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return None, torch.device("cuda" if cuda else "cpu")
    from megatron.core.parallel_state import initialize_model_parallel  # noqa: PLC0415
    from megatron.initialize import initialize_distributed  # noqa: PLC0415

    backend = backend or (dist.get_backend() if dist.is_initialized() else ("nccl" if cuda else "gloo"))
    _, _, local_rank = initialize_distributed(backend)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return initialize_model_parallel(sequence_parallel_size=world, device_type=device.type), device


def _prompts(args, tokenizer) -> list:
    texts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            texts.append(f.read())
    if texts and tokenizer is None:
        raise ConfigError("text prompts need a tokenizer: the checkpoint records none usable here; pass "
                          "--tokenizer-type and its files, or --prompt-ids")
    prompts = [tokenizer.tokenize(t) for t in texts] + [[int(x) for x in s.split()] for s in args.prompt_ids]
    if not prompts:
        raise ConfigError("pass at least one --prompt, --prompt-file or --prompt-ids")
    return prompts


def run(args) -> dict:
    from megatron.inference import Generator, SamplingConfig  # noqa: PLC0415
    from megatron.inference.checkpoint import load_model  # noqa: PLC0415

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    state, device = init_distributed(args.distributed_backend)
    loaded = load_model(args.load, args.iteration, device=device, dtype=torch.bfloat16 if args.bf16 else None)
    tokenizer = tokenizer_for(args, loaded.run_config)
    prompts = _prompts(args, tokenizer)
    eod = None if args.no_stop_at_eod else (args.eod_id if args.eod_id is not None else
                                            (tokenizer.eod if tokenizer is not None else None))
    out = Generator(loaded.model, state).generate(prompts, args.max_new_tokens, sampling, eod_id=eod, seed=args.seed)
    results = []
    for prompt, new in zip(prompts, out.tokens):
        item = {"prompt_ids": prompt, "new_ids": new}
        if tokenizer is not None:
            item["text"] = tokenizer.detokenize([t for t in new if t != eod])
        results.append(item)
    return {"checkpoint": loaded.path, "iteration": loaded.iteration, "eod_id": eod,
            "sequence_parallel_size": state.sp_size if state is not None else 1, "results": results}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist  # noqa: PLC0415

    rank0 = (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0
    if rank0:
        for i, r in enumerate(report["results"]):
            shown = r.get("text", " ".join(map(str, r["new_ids"])))
            print(f"[{i}] {shown}")
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
