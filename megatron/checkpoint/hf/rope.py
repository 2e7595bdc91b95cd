"""RoPE settings <-> Hugging Face config.json (`rope_parameters` in transformers >= 5, `rope_scaling` and
`rope_theta` before), shared by the Llama and GPT-NeoX mappings.

The project implements transformers' definitions of `linear`, `dynamic`, `yarn` and `llama3`
(megatron/model/rotary.py), so a scaled model converts exactly both ways. One convention differs:
transformers' `dynamic` scales from `max_position_embeddings` (it has no other field for the original
context), so export writes the original context there; the project keeps it in
`original_max_position_embeddings`.
"""

from __future__ import annotations

from megatron.checkpoint.hf.common import ConversionError
from megatron.config import ModelConfig

SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")


def rope_parameters_to_hf(config: ModelConfig, partial_rotary: bool = False) -> dict:
    """transformers' `rope_parameters` dict for `config` (rope_type "default" without scaling)."""
    c = config
    out = {"rope_type": c.rope_scaling_type or "default", "rope_theta": float(c.rotary_base)}
    if partial_rotary:
        out["partial_rotary_factor"] = float(c.rotary_percent)
    kind = c.rope_scaling_type
    if kind is None:
        return out
    out["factor"] = float(c.rope_scaling_factor)
    if kind in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = int(c.rope_original_length)
    if kind == "yarn":
        out.update(beta_fast=float(c.yarn_beta_fast), beta_slow=float(c.yarn_beta_slow))
        if c.yarn_mscale is not None:
            out["mscale"] = float(c.yarn_mscale)
        if c.yarn_mscale_all_dim is not None:
            out["mscale_all_dim"] = float(c.yarn_mscale_all_dim)
        if c.rope_attention_factor is not None:
            out["attention_factor"] = float(c.rope_attention_factor)
        if not c.yarn_truncate:
            out["truncate"] = False
    if kind == "llama3":
        out.update(low_freq_factor=float(c.llama3_low_freq_factor), high_freq_factor=float(c.llama3_high_freq_factor))
    return out


def hf_max_position_embeddings(config: ModelConfig) -> int:
    """config.json's max_position_embeddings: for `dynamic`, the context where scaling starts."""
    if config.rope_scaling_type == "dynamic":
        return int(config.rope_original_length)
    return int(config.max_position_embeddings)


def hf_rope_entries(config: ModelConfig, partial_rotary: bool = False) -> dict:
    """Every RoPE key of config.json: `rope_parameters` (transformers >= 5), and for older readers the
    top-level `rope_theta` and, when scaled, `rope_scaling`."""
    params = rope_parameters_to_hf(config, partial_rotary)
    out = {"rope_parameters": params, "rope_theta": params["rope_theta"]}
    if config.rope_scaling_type is not None:
        out["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_theta"},
                               "type": params["rope_type"]}
    return out


def rope_parameters_from_hf(hf: dict) -> dict:
    """The RoPE dict of a config.json of any transformers version (rope_parameters, else rope_scaling)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    return params


def rope_base_from_hf(hf: dict, default: float = 10000.0) -> float:
    """The RoPE base of a config.json written by transformers 4 (`rope_theta`) or 5 (`rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", default))


def rope_fields_from_hf(hf: dict, what: str) -> dict:
    """`ModelConfig` fields for the RoPE scaling of a config.json; ConversionError for what the project lacks."""
    params = rope_parameters_from_hf(hf)
    kind = params["rope_type"]
    if kind == "default":
        return {}
    if kind not in SCALING_TYPES:
        raise ConversionError(f"{what} uses RoPE scaling {kind!r}, which the project does not implement (it has "
                              f"{', '.join(SCALING_TYPES)}). Pass --rotary-base to continue pretraining with plain "
                              f"RoPE at a new base (the model then computes something different until it has adapted)")
    max_pos = hf.get("max_position_embeddings")
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if kind == "dynamic":
        original = max_pos  # transformers' dynamic NTK scales from max_position_embeddings
    elif kind in ("yarn", "llama3") and original is None:
        original = max_pos  # transformers' default when the key is absent
    if factor is None and kind == "yarn":
        factor = max_pos / original
    if factor is None:
        raise ConversionError(f"{what}: rope_scaling {kind!r} without a factor; add \"factor\" to its RoPE parameters")
    fields = dict(rope_scaling_type=kind, rope_scaling_factor=float(factor))
    if kind != "linear":
        fields["original_max_position_embeddings"] = int(original)
    if kind == "yarn":
        fields.update(yarn_beta_fast=float(params.get("beta_fast") or 32), yarn_beta_slow=float(params.get("beta_slow") or 1),
                      yarn_mscale=params.get("mscale"), yarn_mscale_all_dim=params.get("mscale_all_dim"),
                      yarn_truncate=bool(params.get("truncate", True)),
                      rope_attention_factor=params.get("attention_factor"))
    if kind == "llama3":
        fields.update(llama3_low_freq_factor=float(params["low_freq_factor"]),
                      llama3_high_freq_factor=float(params["high_freq_factor"]))
    return fields
