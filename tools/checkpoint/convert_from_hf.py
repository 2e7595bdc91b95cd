"""Start (long-context) continued pretraining from a local Hugging Face checkpoint.

    python tools/checkpoint/convert_from_hf.py --hf-dir HF_DIR --dcp CKPT_DIR \\
        [--output model.pt] [--rotary-base 500000] [--max-position-embeddings 32768] \\
        [--rope-scaling-type yarn --rope-scaling-factor 4 --original-max-position-embeddings 8192]

Reads a `GPT2LMHeadModel`, `GPTNeoXForCausalLM` or `LlamaForCausalLM` directory (config.json + safetensors or
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
        if c.rotary_percent != 1.0:
            flags += ["--rotary-percent", c.rotary_percent]
    flags += rope_scaling_flags(c)
    if c.activation == "swiglu":
        flags.append("--swiglu")
    elif c.activation == "gelu_tanh":
        flags.append("--openai-gelu")
    elif c.add_bias_linear:
        flags.append("--no-bias-gelu-fusion")  # exact GeLU (upstream's default with biases is the tanh one)
    if not c.add_bias_linear:
        flags.append("--disable-bias-linear")
    if c.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    flags += ["--hidden-dropout", c.hidden_dropout, "--attention-dropout", c.attention_dropout]
    return [str(f) for f in flags]


def rope_scaling_flags(config: ModelConfig) -> list:
    """The `--rope-scaling-*` flags of `config` (none without scaling)."""
    c = config
    if c.rope_scaling_type is None:
        return []
    flags = ["--rope-scaling-type", c.rope_scaling_type, "--rope-scaling-factor", c.rope_scaling_factor]
    if c.rope_scaling_type != "linear":
        flags += ["--original-max-position-embeddings", c.rope_original_length]
    if c.rope_scaling_type == "yarn":
        flags += ["--rope-yarn-beta-fast", c.yarn_beta_fast, "--rope-yarn-beta-slow", c.yarn_beta_slow]
        for flag, value in (("--rope-yarn-mscale", c.yarn_mscale), ("--rope-yarn-mscale-all-dim", c.yarn_mscale_all_dim),
                            ("--rope-attention-factor", c.rope_attention_factor)):
            if value is not None:
                flags += [flag, value]
        if not c.yarn_truncate:
            flags.append("--rope-yarn-no-truncate")
    if c.rope_scaling_type == "llama3":
        flags += ["--rope-llama3-low-freq-factor", c.llama3_low_freq_factor,
                  "--rope-llama3-high-freq-factor", c.llama3_high_freq_factor]
    return flags


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
    p.add_argument("--rope-scaling-type", choices=["linear", "dynamic", "yarn", "llama3"],
                   help="RoPE scaling to add for context extension (default: the model's own, read from config.json)")
    p.add_argument("--rope-scaling-factor", type=float, help="with --rope-scaling-type: new context / original")
    p.add_argument("--original-max-position-embeddings", type=int,
                   help="with --rope-scaling-type dynamic/yarn/llama3: the pretraining context (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocab with zero rows to a multiple of this (use the value you train with)")
    p.add_argument("--hidden-dropout", type=float, help="stored in the config (default: the model's)")
    p.add_argument("--attention-dropout", type=float, help="stored in the config (default: the model's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32: master weights for training)")
    p.add_argument("--flags-file", help="also write the model flags to train it with (one line) to this file, for scripts")
    p.add_argument("--accept-tanh-gelu", action="store_true",
                   help="no effect (kept for old scripts): tanh GeLU (gelu_new) converts exactly now")
    args = p.parse_args(argv)
    if not (args.output or args.dcp):
        p.error("pass --output FILE.pt, --dcp DIR, or both")
    try:
        config = convert(args)
    except CheckpointError as e:  # ConversionError is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags = megatron_flags(config) + ["--make-vocab-size-divisible-by", str(args.make_vocab_size_divisible_by or 1)]
    print("train it with:\n  " + " ".join(flags) + (f" --load {args.dcp} --finetune" if args.dcp else ""))
    if args.flags_file:
        with open(args.flags_file, "w") as f:
            f.write(" ".join(flags) + "\n")
    return 0


def _rope_overrides(args, hf_config: dict) -> dict:
    if args.rope_scaling_type is None:
        if args.rope_scaling_factor is not None or args.original_max_position_embeddings is not None:
            raise ConversionError("--rope-scaling-factor and --original-max-position-embeddings need "
                                  "--rope-scaling-type")
        return {}
    if args.rope_scaling_factor is None:
        raise ConversionError(f"--rope-scaling-type {args.rope_scaling_type} needs --rope-scaling-factor")
    original = args.original_max_position_embeddings or hf_config.get("max_position_embeddings")
    return {"rope_scaling_type": args.rope_scaling_type, "rope_scaling_factor": args.rope_scaling_factor,
            "original_max_position_embeddings": None if args.rope_scaling_type == "linear" else original}


def convert(args) -> ModelConfig:
    hf_config = read_hf_config(args.hf_dir)
    hf_model_type(hf_config)  # an unsupported model fails before gigabytes of weights are read
    hf_sd = read_hf_weights(args.hf_dir)
    overrides = {k: getattr(args, k) for k in ("max_position_embeddings", "hidden_dropout", "attention_dropout")
                 if getattr(args, k) is not None}
    overrides.update(_rope_overrides(args, hf_config))
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
    scaling = (f", RoPE scaling {config.rope_scaling_type} x{config.rope_scaling_factor}"
               if config.rope_scaling_type else "")
    print(f"{n:,} parameters, vocab {config.vocab_size}, rotary_base {config.rotary_base}{scaling}, "
          f"max_position_embeddings {config.max_position_embeddings}")
    return config


if __name__ == "__main__":
    sys.exit(main())
