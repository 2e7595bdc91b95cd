"""Export a project checkpoint as a Hugging Face model directory, on one process.

    python tools/checkpoint/convert_to_hf.py --load CKPT_DIR --output HF_DIR [--tokenizer-model tok.model]

GPT-3 style models become `GPT2LMHeadModel` (`GPTNeoXForCausalLM` with RoPE), Llama style
ones `LlamaForCausalLM` (safetensors + config.json + generation_config.json). The
architecture comes from the config stored in the checkpoint, so no model flags are needed.
The vocab padding of training (`--make-vocab-size-divisible-by`) is dropped: config.json
has the tokenizer's true vocab size. The tokenizer recorded in the checkpoint is copied,
and its end-of-document token becomes `eos_token_id` (and `pad_token_id` of generation), so
`generate()` stops at the end of a document with no extra argument.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script: make `megatron` and `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.checkpoint.format import CheckpointError
from megatron.checkpoint.hf import ConversionError, to_hf
from tools.checkpoint.convert_to_torch import (
    DTYPES,
    add_load_args,
    check_against_model,
    load_project_checkpoint,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"


def shard_state_dict(state_dict: dict, max_shard_bytes: int) -> list[dict]:
    """Consecutive groups of tensors of at most `max_shard_bytes` each (a bigger tensor gets its own)."""
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_hf_directory(out_dir: str, hf_state_dict: dict, hf_config: dict,
                       max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """safetensors (one file, or shards + index as `save_pretrained` writes) and config.json."""
    from safetensors.torch import save_file  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    shards = shard_state_dict(hf_state_dict, max_shard_bytes)
    written = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in hf_state_dict.values())
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(SAFETENSORS_INDEX)
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        written.append(name)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    written.append("config.json")
    return written


def copy_tokenizer(out_dir: str, tokenizer_model: str | None = None, tokenizer_json: str | None = None,
                   vocab_file: str | None = None, merge_file: str | None = None,
                   special_tokens: dict | None = None) -> list[str]:
    """Copy the tokenizer files under the names Hugging Face looks for, plus a tokenizer_config.json.

    The tokenizer class is only declared, not converted: a SentencePiece model is named
    LlamaTokenizer (which reads tokenizer.model), GPT-2 BPE files GPT2Tokenizer, and a
    tokenizer.json PreTrainedTokenizerFast.
    """
    copies, cls = [], None
    if tokenizer_model:
        copies.append((tokenizer_model, "tokenizer.model", "--tokenizer-model"))
        cls = "LlamaTokenizer"
    if vocab_file or merge_file:
        if not (vocab_file and merge_file):
            raise ConversionError("GPT-2 BPE tokenizers need both --vocab-file and --merge-file; pass both")
        copies += [(vocab_file, "vocab.json", "--vocab-file"), (merge_file, "merges.txt", "--merge-file")]
        cls = cls or "GPT2Tokenizer"
    if tokenizer_json:
        copies.append((tokenizer_json, "tokenizer.json", "--tokenizer-json"))
        cls = "PreTrainedTokenizerFast"  # the fast tokenizer is complete on its own; prefer it
    for src, _, flag in copies:
        if not os.path.isfile(src):
            raise ConversionError(f"{flag} {src} does not exist; pass the tokenizer file used for training")
    written = []
    for src, dst, _ in copies:
        shutil.copyfile(src, os.path.join(out_dir, dst))
        written.append(dst)
    if cls is not None:
        tok_config = {"tokenizer_class": cls, "add_bos_token": False, "add_eos_token": False}
        tok_config.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=2)
        written.append("tokenizer_config.json")
    return written


def special_tokens_from_run_config(run_config: dict | None) -> dict:
    """`eos_token_id` (the end-of-document token), `bos_token_id` and their strings, from the tokenizer the
    checkpoint was trained with; {} when it cannot be built here (files moved)."""
    data = (run_config or {}).get("data") or {}
    if not data.get("tokenizer_type"):
        return {}
    from types import SimpleNamespace  # noqa: PLC0415

    from megatron.data.tokenizers import build_tokenizer  # noqa: PLC0415

    try:
        tok = build_tokenizer(SimpleNamespace(**{**data, "make_vocab_size_divisible_by": 1}))
    except Exception as e:  # noqa: BLE001 (a tokenizer that cannot be rebuilt only costs the special ids)
        print(f"note: the checkpoint's tokenizer cannot be rebuilt here ({e}); pass --eos-token-id")
        return {}
    out = {"eos_token_id": tok.eod, "eos_token": _token_string(tok, tok.eod)}
    bos = _bos_id(tok)
    if bos is not None:
        out.update(bos_token_id=bos, bos_token=_token_string(tok, bos))
    return out


def _bos_id(tok) -> int | None:
    sp = getattr(tok, "_sp", None)
    if sp is not None and sp.bos_id() >= 0:
        return sp.bos_id()
    if type(tok).__name__ == "GPT2BPETokenizer":
        return tok.eod  # GPT-2's <|endoftext|> is its bos and eos
    return None


def _token_string(tok, token_id: int) -> str | None:
    for getter in (lambda: tok._tok.id_to_token(token_id), lambda: tok._inv_special[token_id],
                   lambda: tok._sp.id_to_piece(token_id)):
        try:
            value = getter()
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
        if isinstance(value, str):
            return value
    return None


def write_generation_config(out_dir: str, hf_config: dict) -> str:
    """generation_config.json: the special ids, so `generate()` stops at the end-of-document token."""
    eos = hf_config.get("eos_token_id")
    gen = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": eos, "pad_token_id": eos}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    return "generation_config.json"


def tokenizer_from_run_config(run_config: dict | None) -> dict:
    """Tokenizer paths recorded at training time, where they still exist on this machine."""
    data = (run_config or {}).get("data") or {}
    found = {}
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        path = data.get(key)
        if path and os.path.isfile(path):
            found[key] = path
    if data.get("tokenizer_type") == "HuggingFaceTokenizer" and "tokenizer_model" in found:
        found["tokenizer_json"] = found.pop("tokenizer_model")  # Megatron passes tokenizer.json there
    return found


def _parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(p)
    p.add_argument("--output", required=True, help="Hugging Face model directory to create (must be empty)")
    p.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                   help="dtype of the exported weights (default: as stored)")
    p.add_argument("--tokenizer-model", help="SentencePiece model to copy as tokenizer.model")
    p.add_argument("--tokenizer-json", help="Hugging Face tokenizer.json to copy")
    p.add_argument("--vocab-file", help="GPT-2 BPE vocab.json to copy")
    p.add_argument("--merge-file", help="GPT-2 BPE merges.txt to copy")
    p.add_argument("--bos-token-id", type=int,
                   help="written to config.json (default: the training tokenizer's, when it has one)")
    p.add_argument("--eos-token-id", type=int,
                   help="written to config.json (default: the end-of-document token of the training tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    args = p.parse_args(argv)
    try:
        written = export(args)
    except CheckpointError as e:  # ConversionError is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {', '.join(written)}")
    return 0


def export(args) -> list[str]:
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise ConversionError(f"--output {args.output} exists and is not empty; pass a new directory")
    ckpt = load_project_checkpoint(args.load, args.iteration)
    check_against_model(ckpt.state_dict, ckpt.config)
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    hf_sd, hf_config = to_hf(ckpt.state_dict, ckpt.config, dtype)
    special = special_tokens_from_run_config(ckpt.run_config)
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(args, key) is not None:
            special[key] = getattr(args, key)
            special.pop(key.replace("_id", ""), None)  # the string belongs to the tokenizer's id
        if special.get(key) is not None:
            hf_config[key] = special[key]
    if hf_config.get("eos_token_id") is None:
        print("note: no eos_token_id (the checkpoint records no tokenizer): generate() will not stop at the end "
              "of a document; pass --eos-token-id")
    tok = {k: getattr(args, k) for k in ("tokenizer_model", "tokenizer_json", "vocab_file", "merge_file")
           if getattr(args, k)}
    if not tok:
        tok = tokenizer_from_run_config(ckpt.run_config)
        if tok:
            print(f"copying the tokenizer recorded in the checkpoint: {tok}")
    for key, path in tok.items():  # before writing anything, so a typo leaves no half-written directory
        if not os.path.isfile(path):
            raise ConversionError(f"--{key.replace('_', '-')} {path} does not exist; pass the tokenizer file "
                                  f"used for training")
    written = write_hf_directory(args.output, hf_sd, hf_config, _parse_size(args.max_shard_size))
    written.append(write_generation_config(args.output, hf_config))
    written += copy_tokenizer(args.output, **tok, special_tokens={k: special.get(k) for k in ("eos_token", "bos_token")})
    n = sum(t.numel() for t in hf_sd.values())
    arch = hf_config["architectures"][0]
    padding = ckpt.config.vocab_size - hf_config["vocab_size"]
    print(f"{arch}: {n:,} parameters, vocab {hf_config['vocab_size']}"
          + (f" ({padding} padding rows of training dropped)" if padding else "")
          + f", eos_token_id {hf_config.get('eos_token_id')}, dtype {hf_config.get('dtype', 'mixed')}")
    return written


if __name__ == "__main__":
    sys.exit(main())
