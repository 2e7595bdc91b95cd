"""Start (long-context) continued pretraining from a local Hugging Face checkpoint.

    python tools/checkpoint/convert_from_hf.py --hf-dir HF_DIR --dcp CKPT_DIR \\
        [--output model.pt] [--rotary-base 500000] [--max-position-embeddings 32768]

Reads a `GPT2LMHeadModel` or `LlamaForCausalLM` directory (config.json + safetensors or
pytorch_model.bin, sharded or not) and writes a consolidated .pt file (`--output`) and/or
a DCP checkpoint directory (`--dcp`) that `pretrain_gpt.py --load CKPT_DIR --finetune`
reads. It prints the model flags to train it with. Nothing is downloaded: fetch hub
models first (`huggingface-cli download NAME --local-dir HF_DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `megatron` and `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

from megatron.checkpoint.format import CheckpointError
from megatron.checkpoint.hf import ConversionError, from_hf, hf_model_type
from megatron.config import ModelConfig
from tools.checkpoint.convert_to_torch import (
    DTYPES,
    check_against_model,
    save_dcp_checkpoint,
    save_torch_checkpoint,
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def read_hf_config(hf_dir: str) -> dict:
    """config.json of a local Hugging Face model directory."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir} is not a directory: pass a local Hugging Face model directory "
                              f"(download hub models first: huggingface-cli download NAME --local-dir DIR)")
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of a local Hugging Face model directory (one file or shards + index)."""
    present = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if not present:
        raise ConversionError(f"{hf_dir} has config.json but no weights: expected one of {list(_WEIGHT_FILES)}")
    name = present[0]
    if name.endswith(".index.json"):
        with open(os.path.join(hf_dir, name)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [name]
    state = {}
    for fname in files:
        state.update(_read_weights(os.path.join(hf_dir, fname)))
    return state


def read_hf_directory(hf_dir: str) -> tuple[dict, dict]:
    """(state dict, config.json dict) of a local Hugging Face model directory."""
    config = read_hf_config(hf_dir)
    return read_hf_weights(hf_dir), config


def _read_weights(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def megatron_flags(config: ModelConfig) -> list[str]:
    """The `pretrain_gpt.py` model flags that build `config` (the vocab comes from the tokenizer flags)."""
    c = config
    flags = ["--num-layers", c.num_layers, "--hidden-size", c.hidden_size, "--ffn-hidden-size", c.ffn_hidden_size,
             "--num-attention-heads", c.num_attention_heads,
             "--max-position-embeddings", c.max_position_embeddings, "--norm-epsilon", c.norm_epsilon,
             "--normalization", c.normalization, "--position-embedding-type", c.position_embedding_type]
    if c.num_query_groups != c.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", c.num_query_groups]
    if c.kv_channels * c.num_attention_heads != c.hidden_size:
        flags += ["--kv-channels", c.kv_channels]
    if c.position_embedding_type == "rope":
        flags += ["--rotary-base", c.rotary_base]
    if c.activation == "swiglu":
        flags.append("--swiglu")
    if not c.add_bias_linear:
        flags.append("--disable-bias-linear")
    if c.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    flags += ["--hidden-dropout", c.hidden_dropout, "--attention-dropout", c.attention_dropout]
    return [str(f) for f in flags]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="local Hugging Face model directory")
    p.add_argument("--output", help="consolidated .pt file to write")
    p.add_argument("--dcp", metavar="DIR", help="write a DCP checkpoint directory for --load DIR --finetune")
    p.add_argument("--rotary-base", type=float,
                   help="new RoPE base for long-context continued pretraining (default: the model's)")
    p.add_argument("--max-position-embeddings", type=int,
                   help="new maximum sequence length (RoPE models only; default: the model's)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocab with zero rows to a multiple of this (use the value you train with)")
    p.add_argument("--hidden-dropout", type=float, help="stored in the config (default: the model's)")
    p.add_argument("--attention-dropout", type=float, help="stored in the config (default: the model's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32: master weights for training)")
    p.add_argument("--accept-tanh-gelu", action="store_true",
                   help="convert GPT-2 models trained with tanh GeLU (gelu_new) although the project uses exact GeLU")
    args = p.parse_args(argv)
    if not (args.output or args.dcp):
        p.error("pass --output FILE.pt, --dcp DIR, or both")
    try:
        config = convert(args)
    except CheckpointError as e:  # ConversionError is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("train it with:\n  " + " ".join(megatron_flags(config)) +
          f" --make-vocab-size-divisible-by {args.make_vocab_size_divisible_by or 1}"
          + (f" --load {args.dcp} --finetune" if args.dcp else ""))
    return 0


def convert(args) -> ModelConfig:
    hf_config = read_hf_config(args.hf_dir)
    hf_model_type(hf_config)  # an unsupported model fails before gigabytes of weights are read
    hf_sd = read_hf_weights(args.hf_dir)
    overrides = {k: getattr(args, k) for k in ("max_position_embeddings", "hidden_dropout", "attention_dropout")
                 if getattr(args, k) is not None}
    sd, config = from_hf(hf_sd, hf_config, rotary_base=args.rotary_base,
                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                         dtype=DTYPES[args.dtype], accept_tanh_gelu=args.accept_tanh_gelu, **overrides)
    check_against_model(sd, config)
    if args.output:
        save_torch_checkpoint(args.output, sd, config, iteration=0,
                              source={"hf_dir": os.path.abspath(args.hf_dir),
                                      "architecture": (hf_config.get("architectures") or ["?"])[0]})
        print(f"wrote {args.output}")
    if args.dcp:
        path = save_dcp_checkpoint(args.dcp, sd, config, iteration=0)
        print(f"wrote {path}")
    n = sum(t.numel() for t in sd.values())
    print(f"{n:,} parameters, vocab {config.vocab_size}, rotary_base {config.rotary_base}, "
          f"max_position_embeddings {config.max_position_embeddings}")
    return config


if __name__ == "__main__":
    sys.exit(main())
