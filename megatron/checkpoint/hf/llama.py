"""Llama style `GPTModel` <-> Hugging Face `LlamaForCausalLM`.

The project's fused qkv rows are `[all Q heads | all K heads | all V heads]` and its
SwiGLU fc1 rows are `[gate | up]`, so HF's separate projections are row slices and
concatenations. Both sides rotate with the half-split ("rotate_half") RoPE convention,
so the q/k rows need no permutation (the logits test would catch one).
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
from megatron.checkpoint.hf.rope import (
    hf_max_position_embeddings,
    hf_rope_entries,
    rope_base_from_hf,
    rope_fields_from_hf,
)
from megatron.config import ModelConfig

# buffers that older Llama checkpoints saved next to the weights
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def to_hf_config(config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json of the equivalent `LlamaForCausalLM` (the true vocab: padding rows are dropped).

    RoPE (base and scaling) is written inside `rope_parameters` (transformers >= 5) and as the
    legacy top-level `rope_theta` / `rope_scaling` (older transformers, serving stacks).
    """
    if hf_family(config) != "llama":
        raise ConversionError("LlamaForCausalLM export needs a Llama style model (RMSNorm, swiglu, rope); "
                              "use the GPT-2 converter for this config")
    c = config
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.output_vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_query_groups,
        "head_dim": c.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": hf_max_position_embeddings(c),
        "rms_norm_eps": c.norm_epsilon,
        **hf_rope_entries(c),
        "attention_bias": c.add_bias_linear,
        "mlp_bias": c.add_bias_linear,
        "attention_dropout": c.attention_dropout,
        "initializer_range": c.init_method_std,
        "tie_word_embeddings": not c.untie_embeddings_and_output_weights,
        "pretraining_tp": 1,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
    }
    if dtype is not None:
        # "dtype" for transformers >= 5, "torch_dtype" for older readers
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def _expected_hf_names(config: ModelConfig) -> set:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    kinds = ["weight", "bias"] if config.add_bias_linear else ["weight"]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        names |= {pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"}
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names |= {f"{pre}{lin}.{k}" for k in kinds}
    if config.untie_embeddings_and_output_weights:
        names.add("lm_head.weight")
    return names


def _expected_project_names(config: ModelConfig) -> set:
    names = {"embedding.word_embeddings.weight", "final_norm.weight"}
    kinds = ["weight", "bias"] if config.add_bias_linear else ["weight"]
    for i in range(config.num_layers):
        pre = f"layers.{i}."
        names |= {pre + "input_norm.weight", pre + "post_attention_norm.weight"}
        for lin in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"):
            names |= {f"{pre}{lin}.{k}" for k in kinds}
    if config.untie_embeddings_and_output_weights:
        names.add("output_layer.weight")
    return names


def to_hf_state_dict(state_dict: dict, config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """HF tensors for a Llama style `GPTModel` state dict; `lm_head` is left out when tied, vocab padding dropped."""
    c = config
    check_keys(state_dict, _expected_project_names(c), "the project state dict",
               "Check that the checkpoint was written for this ModelConfig.")
    q_rows, kv_rows = c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
    kinds = ["weight", "bias"] if c.add_bias_linear else ["weight"]
    out = {"model.embed_tokens.weight": cast(true_vocab_rows(state_dict["embedding.word_embeddings.weight"], c), dtype),
           "model.norm.weight": cast(state_dict["final_norm.weight"], dtype)}
    for i in range(c.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = cast(state_dict[src + "input_norm.weight"], dtype)
        out[dst + "post_attention_layernorm.weight"] = cast(state_dict[src + "post_attention_norm.weight"], dtype)
        for k in kinds:
            qkv = state_dict[f"{src}attention.qkv.{k}"]
            check_shape(f"{src}attention.qkv.{k}", qkv[:, 0] if k == "weight" else qkv, (q_rows + 2 * kv_rows,))
            q, kk, v = qkv.split([q_rows, kv_rows, kv_rows], dim=0)  # [(hq + 2 hkv) d, ...] -> 3 pieces
            out[f"{dst}self_attn.q_proj.{k}"] = cast(q, dtype)
            out[f"{dst}self_attn.k_proj.{k}"] = cast(kk, dtype)
            out[f"{dst}self_attn.v_proj.{k}"] = cast(v, dtype)
            out[f"{dst}self_attn.o_proj.{k}"] = cast(state_dict[f"{src}attention.proj.{k}"], dtype)
            gate, up = state_dict[f"{src}mlp.fc1.{k}"].chunk(2, dim=0)  # [2 f, ...] -> [f, ...] twice
            out[f"{dst}mlp.gate_proj.{k}"] = cast(gate, dtype)
            out[f"{dst}mlp.up_proj.{k}"] = cast(up, dtype)
            out[f"{dst}mlp.down_proj.{k}"] = cast(state_dict[f"{src}mlp.fc2.{k}"], dtype)
    if c.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = cast(true_vocab_rows(state_dict["output_layer.weight"], c), dtype)
    return out


def config_from_hf(hf: dict, rotary_base: float | None = None, **overrides) -> ModelConfig:
    """The `ModelConfig` of an HF Llama config.json; `overrides` replace any field afterwards.

    RoPE scaling (`linear`, `dynamic`, `yarn`, `llama3`) converts exactly. `rotary_base` replaces
    the RoPE base, the usual first step of long-context continued pretraining; for a scaling the
    project lacks (e.g. longrope) it is the way to convert anyway, with plain RoPE.
    """
    try:
        rope = rope_fields_from_hf(hf, "the Hugging Face config")
    except ConversionError:
        if rotary_base is None:
            raise
        rope = {}  # an explicit new base: continue with plain RoPE
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor={partial}: transformers' LlamaForCausalLM rotates the whole "
                              f"head with plain RoPE (it ignores the factor) and fails with a scaled one, so the "
                              f"config is ambiguous; partial rotary converts as GPTNeoXForCausalLM")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf['hidden_act']!r} is not supported: the project's SwiGLU uses silu")
    if (hf.get("pretraining_tp") or 1) != 1:
        raise ConversionError(f"pretraining_tp={hf['pretraining_tp']} is not supported: re-save the model with "
                              f"pretraining_tp=1 (the weights are the same, only the matmul order differs)")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise ConversionError(f"attention_bias={hf.get('attention_bias')} with mlp_bias={hf.get('mlp_bias')} is "
                              f"not supported: the project's add_bias_linear covers both, so they must be equal")
    heads = hf["num_attention_heads"]
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        ffn_hidden_size=hf["intermediate_size"],
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rotary_base=rope_base_from_hf(hf) if rotary_base is None else float(rotary_base),
        **rope,
        add_bias_linear=bool(hf.get("attention_bias", False)),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        hidden_dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        init_method_std=hf.get("initializer_range", 0.02),
    )
    fields.update(overrides)
    return ModelConfig.llama(**fields)


def state_dict_from_hf(hf_sd: dict, config: ModelConfig, make_vocab_size_divisible_by: int | None = None,
                       dtype: torch.dtype | None = None) -> dict:
    """Project tensors from HF Llama tensors. `config` must describe the HF model (unpadded vocab);
    the word embedding (and output layer) rows are padded to `make_vocab_size_divisible_by`."""
    c = config
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if not c.untie_embeddings_and_output_weights:
        hf_sd.pop("lm_head.weight", None)  # tied: a copy of embed_tokens when a tool saved it anyway
    check_keys(hf_sd, _expected_hf_names(c), "the Hugging Face Llama state dict",
               "Check that config.json belongs to these weights.")
    kinds = ["weight", "bias"] if c.add_bias_linear else ["weight"]
    emb = hf_sd["model.embed_tokens.weight"]
    check_shape("model.embed_tokens.weight", emb, (c.vocab_size, c.hidden_size))
    out = {"embedding.word_embeddings.weight": cast(pad_vocab_rows(emb, make_vocab_size_divisible_by), dtype),
           "final_norm.weight": cast(hf_sd["model.norm.weight"], dtype)}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "input_norm.weight"] = cast(hf_sd[src + "input_layernorm.weight"], dtype)
        out[dst + "post_attention_norm.weight"] = cast(hf_sd[src + "post_attention_layernorm.weight"], dtype)
        for k in kinds:
            q, kk, v = (hf_sd[f"{src}self_attn.{n}_proj.{k}"] for n in "qkv")
            check_shape(f"{src}self_attn.k_proj.{k}", kk[:, 0] if k == "weight" else kk,
                        (c.num_query_groups * c.kv_channels,))
            out[f"{dst}attention.qkv.{k}"] = cast(torch.cat([q, kk, v], dim=0), dtype)  # -> [(hq + 2 hkv) d, ...]
            out[f"{dst}attention.proj.{k}"] = cast(hf_sd[f"{src}self_attn.o_proj.{k}"], dtype)
            gate, up = hf_sd[f"{src}mlp.gate_proj.{k}"], hf_sd[f"{src}mlp.up_proj.{k}"]
            out[f"{dst}mlp.fc1.{k}"] = cast(torch.cat([gate, up], dim=0), dtype)  # -> [2 f, ...] as [gate | up]
            out[f"{dst}mlp.fc2.{k}"] = cast(hf_sd[f"{src}mlp.down_proj.{k}"], dtype)
    if c.untie_embeddings_and_output_weights:
        head = hf_sd["lm_head.weight"]
        check_shape("lm_head.weight", head, (c.vocab_size, c.hidden_size))
        out["output_layer.weight"] = cast(pad_vocab_rows(head, make_vocab_size_divisible_by), dtype)
    return out
