"""Pure mappings between `GPTModel` state dicts + `ModelConfig` and Hugging Face state dicts + config.json.

No file I/O lives here: the tools in `tools/checkpoint/` read and write checkpoints and
call these functions, and the tests call them directly. GPT-3 style models map to
`GPT2LMHeadModel`, GPT-3 style models with RoPE (full or partial) to `GPTNeoXForCausalLM`,
Llama style models to `LlamaForCausalLM`. RoPE scaling (linear, dynamic, yarn, llama3) is
read and written as transformers' `rope_parameters` / `rope_scaling` (rope.py).

Vocab: the project pads the vocab (`--make-vocab-size-divisible-by`) and records the true
size (`ModelConfig.true_vocab_size`); export drops the padding rows (they are never produced
by the tokenizer and never take part in a softmax), import pads to a multiple when asked.
"""

from __future__ import annotations

import torch

from megatron.checkpoint.hf import gpt2, gpt_neox, llama
from megatron.checkpoint.hf.common import (
    HF_CLASSES,
    SUPPORTED_HF_MODEL_TYPES,
    ConversionError,
    hf_family,
    model_config_from_dict,
    model_config_to_dict,
    pad_vocab_rows,
)
from megatron.config import ModelConfig

_FAMILIES = {"gpt2": gpt2, "llama": llama, "gpt_neox": gpt_neox}


def to_hf(state_dict: dict, config: ModelConfig, dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """(HF state dict, HF config.json dict) for a `GPTModel` state dict; `dtype=None` keeps each tensor's dtype."""
    family = _FAMILIES[hf_family(config)]
    if dtype is None:
        floats = {t.dtype for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()}
        stored = floats.pop() if len(floats) == 1 else None
    else:
        stored = dtype
    return family.to_hf_state_dict(state_dict, config, dtype), family.to_hf_config(config, stored)


def hf_model_type(hf_config: dict) -> str:
    """`"gpt2"`, `"llama"` or `"gpt_neox"` from config.json, or a ConversionError naming what is supported."""
    kind = hf_config.get("model_type")
    if kind is None:
        archs = hf_config.get("architectures") or []
        kind = {v: k for k, v in HF_CLASSES.items()}.get(archs[0] if archs else None)
    if kind not in SUPPORTED_HF_MODEL_TYPES:
        raise ConversionError(f"unsupported architecture: Hugging Face model_type={kind!r} "
                              f"(architectures={hf_config.get('architectures')}); supported model types are "
                              f"{list(SUPPORTED_HF_MODEL_TYPES)} ({', '.join(HF_CLASSES.values())})")
    return kind


def config_from_hf(hf_config: dict, rotary_base: float | None = None, accept_tanh_gelu: bool = False,
                   **overrides) -> ModelConfig:
    """The `ModelConfig` of an HF config.json (vocab not padded); `overrides` replace fields afterwards.
    (`accept_tanh_gelu` is accepted for old callers: tanh GeLU converts exactly now.)"""
    kind = hf_model_type(hf_config)
    if kind == "gpt2":
        if rotary_base is not None:
            raise ConversionError("--rotary-base applies to RoPE models only; this GPT-2 model uses learned "
                                  "absolute position embeddings. Drop --rotary-base")
        n_pos = hf_config.get("n_positions", hf_config.get("max_position_embeddings"))
        if overrides.get("max_position_embeddings", n_pos) != n_pos:
            raise ConversionError(f"--max-position-embeddings {overrides['max_position_embeddings']} cannot apply to "
                                  f"this GPT-2 model: its {n_pos} learned position embeddings are weights, not a "
                                  f"formula. Drop --max-position-embeddings")
        return gpt2.config_from_hf(hf_config, **overrides)
    if kind == "gpt_neox":
        return gpt_neox.config_from_hf(hf_config, rotary_base=rotary_base, **overrides)
    return llama.config_from_hf(hf_config, rotary_base=rotary_base, **overrides)


def from_hf(hf_state_dict: dict, hf_config: dict, *, rotary_base: float | None = None,
            make_vocab_size_divisible_by: int | None = None, dtype: torch.dtype | None = None,
            accept_tanh_gelu: bool = False, **overrides) -> tuple[dict, ModelConfig]:
    """(`GPTModel` state dict, `ModelConfig`) for an HF model.

    `rotary_base` sets a new RoPE base (long-context continued pretraining);
    `make_vocab_size_divisible_by` pads the vocab rows with zeros up to a multiple (the config
    then records the true size, so the padding never enters a softmax);
    `overrides` are `ModelConfig` fields such as `max_position_embeddings` or `hidden_dropout`.
    """
    config = config_from_hf(hf_config, rotary_base=rotary_base, accept_tanh_gelu=accept_tanh_gelu, **overrides)
    family = _FAMILIES[hf_model_type(hf_config)]
    sd = family.state_dict_from_hf(hf_state_dict, config, make_vocab_size_divisible_by, dtype)
    padded = sd["embedding.word_embeddings.weight"].shape[0]
    if padded == config.vocab_size:
        return sd, config
    return sd, config.replace(vocab_size=padded, true_vocab_size=config.vocab_size)


__all__ = [
    "ConversionError",
    "SUPPORTED_HF_MODEL_TYPES",
    "config_from_hf",
    "from_hf",
    "gpt2",
    "gpt_neox",
    "hf_family",
    "hf_model_type",
    "llama",
    "model_config_from_dict",
    "model_config_to_dict",
    "pad_vocab_rows",
    "to_hf",
]
