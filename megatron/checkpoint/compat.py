"""Does a checkpoint fit this run? Checked before anything is read, with every difference listed.

Two checks: the saving run's config.json against the flags (model shape, vocabulary,
tokenizer: cheap, before the model is even built), and the global shapes in DCP's index
against the model (for checkpoints without config.json). Fields that may change on resume
or for continued pretraining (dropout, RoPE base, attention backend, recompute, a longer
context with RoPE) are not compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from megatron.checkpoint.format import CONFIG_FILE, CheckpointError

# ModelConfig fields that change parameter shapes or what the parameters mean
MODEL_FIELDS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups", "kv_channels": "--kv-channels", "ffn_hidden_size": "--ffn-hidden-size",
    "vocab_size": "the padded vocabulary (tokenizer, --vocab-size, --make-vocab-size-divisible-by)",
    "position_embedding_type": "--position-embedding-type", "normalization": "--normalization",
    "activation": "--swiglu", "add_bias_linear": "--disable-bias-linear",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
}
_TOKENIZER_FILES = ("vocab_file", "merge_file", "tokenizer_model")


def tokenizer_fingerprint(data) -> dict:
    """The tokenizer's type and the sha256 of its files' contents (paths may differ between clusters)."""
    files = {}
    for name in _TOKENIZER_FILES:
        path = getattr(data, name, None)
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()
    return {"type": data.tokenizer_type, "files": files}


def config_for_checkpoint(run_config, version: str) -> dict:
    """What config.json holds: the run's whole config, the version, and the tokenizer fingerprint."""
    return {**json.loads(json.dumps(dataclasses.asdict(run_config), default=str)), "version": version,
            "tokenizer": tokenizer_fingerprint(run_config.data)}


def read_config(path: str) -> dict | None:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is damaged") from e


def differences(saved: dict, run_config) -> list[str]:
    """Lines `name: checkpoint X, flags Y (flag)` for every model-shape or tokenizer difference."""
    out = []
    model = saved.get("model") if isinstance(saved.get("model"), dict) else None
    if model is None and "num_layers" in saved:  # a bare ModelConfig dict
        model = saved
    if model is not None:
        fields = dict(MODEL_FIELDS)
        if model.get("position_embedding_type", "learned_absolute") == "learned_absolute":
            fields["max_position_embeddings"] = "--max-position-embeddings (learned position embeddings)"
        for name, flag in fields.items():
            if name in model and model[name] != getattr(run_config.model, name):
                out.append(f"  {name}: checkpoint {model[name]!r}, flags {getattr(run_config.model, name)!r} ({flag})")
    mine = tokenizer_fingerprint(run_config.data)
    theirs = saved.get("tokenizer")
    if theirs is None and isinstance(saved.get("data"), dict) and "tokenizer_type" in saved["data"]:
        theirs = {"type": saved["data"]["tokenizer_type"], "files": {}}
    if theirs is not None:
        if theirs.get("type") != mine["type"]:
            out.append(f"  tokenizer: checkpoint {theirs.get('type')!r}, flags {mine['type']!r} (--tokenizer-type)")
        for name, digest in (theirs.get("files") or {}).items():
            if name in mine["files"] and mine["files"][name] != digest:
                out.append(f"  tokenizer {name}: the file given to --{name.replace('_', '-')} "
                           f"({getattr(run_config.data, name)}) has other contents than the one the checkpoint "
                           f"was trained with")
    return out


def check_config(path: str, run_config) -> None:
    """CheckpointError listing every difference between the checkpoint's config.json and the flags."""
    saved = read_config(path)
    if saved is None or run_config is None:
        return
    diffs = differences(saved, run_config)
    if diffs:
        raise CheckpointError(f"{path} was trained with another model or tokenizer than these flags describe "
                              f"(from {os.path.join(path, CONFIG_FILE)}):\n" + "\n".join(diffs)
                              + "\nUse the flags of the run that saved it, or another --load.")


def check_model_shapes(model_sd: dict, metadata, path: str) -> None:
    """Compare global shapes before DCP loads anything, and name every parameter that differs."""
    saved = {k.removeprefix("model."): m for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
    problems = []
    for name, value in model_sd.items():
        meta = saved.get(name)
        if meta is None:
            problems.append(f"  {name}: shape {tuple(value.shape)} from the flags, absent from the checkpoint")
        elif hasattr(meta, "size") and tuple(meta.size) != tuple(value.shape):
            problems.append(f"  {name}: checkpoint {tuple(meta.size)} vs flags {tuple(value.shape)}")
    problems += [f"  {name}: in the checkpoint, not in the model built from the flags"
                 for name in sorted(set(saved) - set(model_sd))]
    if problems:
        hint = ""
        cfg_file = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(cfg_file):
            hint = f" (the saving run's flags are in {cfg_file}, under \"model\")"
        raise CheckpointError(f"{path} does not match the model of these flags:\n" + "\n".join(problems[:30])
                              + ("\n  ..." if len(problems) > 30 else "")
                              + f"\nUse the model flags of the run that saved it{hint}.")
