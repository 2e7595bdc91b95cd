"""GPT-3 style `GPTModel` <-> Hugging Face `GPT2LMHeadModel`.

GPT-2 stores its linear layers as `Conv1D`, whose weight is `[in, out]`, the transpose
of `nn.Linear`. Its fused `c_attn` output is `[q | k | v]` with each head's dims
contiguous, the same order as the project's fused qkv, so only transposes are needed.
GeLU converts exactly either way: OpenAI's tanh approximation (`gelu_new`, also
`gelu_pytorch_tanh` / `gelu_fast`) is the project's `gelu_tanh`, exact `gelu` is `gelu`.
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
from megatron.config import ModelConfig

# transformers' names of the tanh approximation of GeLU (the same function; gelu_new is OpenAI's)
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}

# buffers that older GPT-2 checkpoints saved next to the weights (the causal mask)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# (project name, HF name, transposed) per layer; HF names are under transformer.h.{i}.
_LAYER_MAP = (
    ("input_norm.weight", "ln_1.weight", False),
    ("input_norm.bias", "ln_1.bias", False),
    ("attention.qkv.weight", "attn.c_attn.weight", True),
    ("attention.qkv.bias", "attn.c_attn.bias", False),
    ("attention.proj.weight", "attn.c_proj.weight", True),
    ("attention.proj.bias", "attn.c_proj.bias", False),
    ("post_attention_norm.weight", "ln_2.weight", False),
    ("post_attention_norm.bias", "ln_2.bias", False),
    ("mlp.fc1.weight", "mlp.c_fc.weight", True),
    ("mlp.fc1.bias", "mlp.c_fc.bias", False),
    ("mlp.fc2.weight", "mlp.c_proj.weight", True),
    ("mlp.fc2.bias", "mlp.c_proj.bias", False),
)
_TOP_MAP = (
    ("embedding.word_embeddings.weight", "transformer.wte.weight"),
    ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    ("final_norm.weight", "transformer.ln_f.weight"),
    ("final_norm.bias", "transformer.ln_f.bias"),
)


def to_hf_config(config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json of the equivalent `GPT2LMHeadModel` (the true vocab: padding rows are dropped)."""
    if hf_family(config) != "gpt2":
        raise ConversionError("GPT2LMHeadModel export needs a GPT-3 style model (LayerNorm, gelu, learned "
                              "positions, biases); use the Llama converter for this config")
    c = config
    out = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.output_vocab_size,
        "n_positions": c.max_position_embeddings,
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_attention_heads,
        "n_inner": c.ffn_hidden_size,
        "activation_function": HF_ACTIVATION[c.activation],
        "layer_norm_epsilon": c.norm_epsilon,
        "resid_pdrop": c.hidden_dropout,
        "embd_pdrop": c.hidden_dropout,
        "attn_pdrop": c.attention_dropout,
        "initializer_range": c.init_method_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not c.untie_embeddings_and_output_weights,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
    }
    if dtype is not None:
        # "dtype" for transformers >= 5, "torch_dtype" for older readers
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def _layer_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    names = [(p, h, False) for p, h in _TOP_MAP]
    for i in range(config.num_layers):
        names += [(f"layers.{i}.{p}", f"transformer.h.{i}.{h}", t) for p, h, t in _LAYER_MAP]
    if config.untie_embeddings_and_output_weights:
        names.append(("output_layer.weight", "lm_head.weight", False))
    return names


def to_hf_state_dict(state_dict: dict, config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """HF tensors for a GPT-3 style `GPTModel` state dict; `lm_head` is left out when tied, as HF saves it."""
    names = _layer_names(config)
    check_keys(state_dict, {p for p, _, _ in names}, "the project state dict",
               "Check that the checkpoint was written for this ModelConfig.")
    out = {}
    for p, h, transposed in names:
        t = state_dict[p]
        if p in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = true_vocab_rows(t, config)  # [V padded, h] -> [V, h]
        out[h] = cast(t.t() if transposed else t, dtype)  # Linear [out, in] -> Conv1D [in, out]
    return out


def config_from_hf(hf: dict, accept_tanh_gelu: bool = False, **overrides) -> ModelConfig:
    """The `ModelConfig` of an HF GPT-2 config.json; `overrides` replace any field afterwards.

    OpenAI's GPT-2 uses the tanh GeLU (`gelu_new`), which the project computes as `gelu_tanh`:
    the conversion is exact. (`accept_tanh_gelu` is accepted for old callers and changes nothing.)
    """
    act = hf.get("activation_function", "gelu_new")
    if act != "gelu" and act not in TANH_GELU_NAMES:
        raise ConversionError(f"activation_function={act!r} is not supported: the project computes GeLU, exact "
                              f"('gelu') or its tanh approximation ({', '.join(TANH_GELU_NAMES)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise ConversionError(f"GPT-2 configs with {flag}=true are not supported: the project model has no "
                                  f"such option")
    if hf.get("scale_attn_weights", True) is False:
        raise ConversionError("GPT-2 configs with scale_attn_weights=false are not supported: the project "
                              "always scales attention scores by 1/sqrt(head_dim)")
    h = hf.get("n_embd", hf.get("hidden_size"))
    fields = dict(
        num_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
        hidden_size=h,
        num_attention_heads=hf.get("n_head", hf.get("num_attention_heads")),
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("n_positions", hf.get("max_position_embeddings")),
        ffn_hidden_size=hf.get("n_inner") or 4 * h,
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        hidden_dropout=hf.get("resid_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1),
        init_method_std=hf.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
        activation="gelu" if act == "gelu" else "gelu_tanh",
    )
    fields.update(overrides)
    return ModelConfig.gpt3(**fields)


def state_dict_from_hf(hf_sd: dict, config: ModelConfig, make_vocab_size_divisible_by: int | None = None,
                       dtype: torch.dtype | None = None) -> dict:
    """Project tensors from HF GPT-2 tensors. `config` must describe the HF model (unpadded vocab);
    the word embedding (and output layer) rows are padded to `make_vocab_size_divisible_by`."""
    hf_sd = _normalise_names(hf_sd)
    if not config.untie_embeddings_and_output_weights:
        hf_sd.pop("lm_head.weight", None)  # tied: a copy of wte when a tool saved it anyway
    names = _layer_names(config)
    check_keys(hf_sd, {h for _, h, _ in names}, "the Hugging Face GPT-2 state dict",
               "Check that config.json belongs to these weights.")
    out = {}
    for p, h, transposed in names:
        t = hf_sd[h].t() if transposed else hf_sd[h]  # Conv1D [in, out] -> Linear [out, in]
        if p == "embedding.position_embeddings.weight":
            check_shape(h, t, (config.max_position_embeddings, config.hidden_size))
        if p in ("embedding.word_embeddings.weight", "output_layer.weight"):
            check_shape(h, t, (config.vocab_size, config.hidden_size))
            t = pad_vocab_rows(t, make_vocab_size_divisible_by)
        out[p] = cast(t, dtype)
    return out


def _normalise_names(hf_sd: dict) -> dict:
    """Accept both `GPT2LMHeadModel` names (`transformer.h.0...`) and bare `GPT2Model` names (`h.0...`)."""
    out = {}
    for k, v in hf_sd.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v
    return out
