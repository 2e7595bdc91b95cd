"""GPT-3 style `GPTModel` with RoPE (full or partial, `--rotary-percent`) <-> Hugging Face `GPTNeoXForCausalLM`.

transformers' Llama rotates whole heads (it ignores `partial_rotary_factor` for plain RoPE), so
partial rotary, Megatron's `--rotary-percent` and GPT-NeoX's `rotary_pct`, converts through
GPT-NeoX: LayerNorm, GeLU (exact or tanh), biases everywhere, multi-head attention, RoPE on
the first `int(head_dim * partial_rotary_factor)` dims with the same rotate_half convention.
The layers must be sequential (`use_parallel_residual=false`): the project has no parallel
residual, so Pythia-style checkpoints (parallel residual) are refused by name.

GPT-NeoX's fused `query_key_value` rows are per head `[q_h | k_h | v_h]`; the project's are
`[all Q heads | all K heads | all V heads]`, so the rows are permuted both ways.
"""

from __future__ import annotations

import torch

from megatron.checkpoint.hf.common import (
    ConversionError,
    cast,
    check_keys,
    check_shape,
    hf_family,
    pad_vocab_rows,
    true_vocab_rows,
)
from megatron.checkpoint.hf.gpt2 import HF_ACTIVATION, TANH_GELU_NAMES
from megatron.checkpoint.hf.rope import (
    hf_max_position_embeddings,
    hf_rope_entries,
    rope_fields_from_hf,
    rope_parameters_from_hf,
)
from megatron.config import ModelConfig

# (project name, HF name) per layer; HF names are under gpt_neox.layers.{i}.
_LAYER_MAP = (
    ("input_norm", "input_layernorm"),
    ("attention.qkv", "attention.query_key_value"),
    ("attention.proj", "attention.dense"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("mlp.fc1", "mlp.dense_h_to_4h"),
    ("mlp.fc2", "mlp.dense_4h_to_h"),
)
_IGNORED_SUFFIXES = (".attention.rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")


def to_hf_config(config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json of the equivalent `GPTNeoXForCausalLM` (the true vocab: padding rows are dropped)."""
    if hf_family(config) != "gpt_neox":
        raise ConversionError("GPTNeoXForCausalLM export needs a GPT-3 style model with RoPE (LayerNorm, gelu, "
                              "biases, rope); use the GPT-2 or Llama converter for this config")
    c = config
    rope = hf_rope_entries(c, partial_rotary=True)
    out = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": c.output_vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "hidden_act": HF_ACTIVATION[c.activation],
        "max_position_embeddings": hf_max_position_embeddings(c),
        "layer_norm_eps": c.norm_epsilon,
        "use_parallel_residual": False,
        "attention_bias": True,
        **rope,
        # the names transformers 4 reads
        "rotary_pct": float(c.rotary_percent),
        "rotary_emb_base": rope["rope_theta"],
        "hidden_dropout": c.hidden_dropout,
        "attention_dropout": c.attention_dropout,
        "initializer_range": c.init_method_std,
        "tie_word_embeddings": not c.untie_embeddings_and_output_weights,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
    }
    del out["rope_theta"]  # GPT-NeoX's legacy name is rotary_emb_base
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def _names(config: ModelConfig) -> list[tuple[str, str]]:
    names = [("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight"),
             ("final_norm.weight", "gpt_neox.final_layer_norm.weight"),
             ("final_norm.bias", "gpt_neox.final_layer_norm.bias")]
    for i in range(config.num_layers):
        for p, h in _LAYER_MAP:
            names += [(f"layers.{i}.{p}.{k}", f"gpt_neox.layers.{i}.{h}.{k}") for k in ("weight", "bias")]
    if config.untie_embeddings_and_output_weights:
        names.append(("output_layer.weight", "lm_head.weight"))
    return names


def _qkv_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    # [3 H d, ...] as [all Q | all K | all V] -> [H 3 d, ...] as [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
    return t.unflatten(0, (3, heads, -1)).transpose(0, 1).flatten(0, 2)


def _qkv_from_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    # [H 3 d, ...] -> [3 H d, ...]
    return t.unflatten(0, (heads, 3, -1)).transpose(0, 1).flatten(0, 2)


def to_hf_state_dict(state_dict: dict, config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """HF tensors for a GPT-NeoX style `GPTModel` state dict; `lm_head` left out when tied, vocab padding dropped."""
    names = _names(config)
    check_keys(state_dict, {p for p, _ in names}, "the project state dict",
               "Check that the checkpoint was written for this ModelConfig.")
    out = {}
    for p, h in names:
        t = state_dict[p]
        if p in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = true_vocab_rows(t, config)
        if ".attention.qkv." in p:
            t = _qkv_to_hf(t, config.num_attention_heads)
        out[h] = cast(t, dtype)
    return out


def config_from_hf(hf: dict, rotary_base: float | None = None, **overrides) -> ModelConfig:
    """The `ModelConfig` of an HF GPT-NeoX config.json; `overrides` replace any field afterwards."""
    if hf.get("use_parallel_residual", True):
        raise ConversionError("use_parallel_residual=true (GPT-NeoX's and Pythia's default) is not supported: the "
                              "project's layers add attention and MLP sequentially (pre-norm, as GPT-3 and Llama); "
                              "only GPT-NeoX configs with use_parallel_residual=false convert")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu" and act not in TANH_GELU_NAMES:
        raise ConversionError(f"hidden_act={act!r} is not supported: the project computes GeLU, exact ('gelu') or "
                              f"its tanh approximation ({', '.join(TANH_GELU_NAMES)})")
    if not hf.get("attention_bias", True):
        raise ConversionError("attention_bias=false is not supported: GPT-NeoX's MLP always has biases and the "
                              "project's add_bias_linear covers attention and MLP together")
    params = rope_parameters_from_hf(hf)
    partial = params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))  # transformers' default: 0.25
    base = params.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    try:
        rope = rope_fields_from_hf(hf, "the Hugging Face config")
    except ConversionError:
        if rotary_base is None:
            raise
        rope = {}
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=h,
        num_attention_heads=heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        ffn_hidden_size=hf.get("intermediate_size") or 4 * h,
        norm_epsilon=hf.get("layer_norm_eps", 1e-5),
        position_embedding_type="rope",
        rotary_base=float(base) if rotary_base is None else float(rotary_base),
        rotary_percent=float(partial),
        activation="gelu" if act == "gelu" else "gelu_tanh",
        hidden_dropout=float(hf.get("hidden_dropout") or 0.0),
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        init_method_std=hf.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        **rope,
    )
    fields.update(overrides)
    return ModelConfig.gpt3(**fields)


def state_dict_from_hf(hf_sd: dict, config: ModelConfig, make_vocab_size_divisible_by: int | None = None,
                       dtype: torch.dtype | None = None) -> dict:
    """Project tensors from HF GPT-NeoX tensors (`config` describes the HF model, unpadded vocab)."""
    hf_sd = {("lm_head." + k.removeprefix("embed_out.") if k.startswith("embed_out.") else k): v
             for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if not config.untie_embeddings_and_output_weights:
        hf_sd.pop("lm_head.weight", None)  # tied: a copy of embed_in when a tool saved it anyway
    names = _names(config)
    check_keys(hf_sd, {h for _, h in names}, "the Hugging Face GPT-NeoX state dict",
               "Check that config.json belongs to these weights.")
    out = {}
    for p, h in names:
        t = hf_sd[h]
        if p in ("embedding.word_embeddings.weight", "output_layer.weight"):
            check_shape(h, t, (config.vocab_size, config.hidden_size))
            t = pad_vocab_rows(t, make_vocab_size_divisible_by)
        if ".attention.qkv." in p:
            t = _qkv_from_hf(t, config.num_attention_heads)
        out[p] = cast(t, dtype)
    return out
