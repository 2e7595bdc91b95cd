"""What both Hugging Face families share: errors, config (de)serialisation, vocab padding.

Checkpoints carry their `ModelConfig` as a plain dict (JSON- and DCP-friendly), so a
conversion tool reads the architecture from the checkpoint instead of asking the user
to repeat the training flags, which is where silent mismatches come from.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.checkpoint.format import CheckpointError
from megatron.config import ConfigError, ModelConfig

SUPPORTED_HF_MODEL_TYPES = ("gpt2", "llama", "gpt_neox")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


class ConversionError(CheckpointError, ValueError):
    """A checkpoint or config that cannot be converted; the message names the mismatch and the fix.
    A CheckpointError (so a UserError), and a ValueError as it always was."""


def model_config_to_dict(config: ModelConfig) -> dict:
    """Every `ModelConfig` field as plain Python values (ints, floats, strings, bools, None)."""
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `model_config_to_dict`; unknown keys (written by a newer version) are ignored.

    Missing fields take the dataclass defaults, so configs stored by an older version
    still load; fields without defaults must be present.
    """
    if isinstance(d, ModelConfig):
        return d
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    required = {f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(d))
    if missing:
        raise ConversionError(f"stored model config lacks {missing}; it must hold every ModelConfig field "
                              f"without a default (got keys {sorted(d)})")
    try:
        return ModelConfig(**{k: v for k, v in d.items() if k in names})
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"stored model config is invalid: {e}") from e


def _family_requirements(family: str, c: ModelConfig) -> list[str]:
    """The ways `c` differs from what the Hugging Face class `family` can express."""
    problems = []

    def need(field: str, want) -> None:
        if getattr(c, field) != want:
            problems.append(f"{field}={getattr(c, field)!r} (must be {want!r})")

    def need_one_of(field: str, allowed: tuple) -> None:
        if getattr(c, field) not in allowed:
            problems.append(f"{field}={getattr(c, field)!r} (must be one of {list(allowed)})")

    def multi_head_attention(cls: str) -> None:
        if c.num_query_groups != c.num_attention_heads:
            problems.append(f"num_query_groups={c.num_query_groups} ({cls} has no grouped-query attention: it must "
                            f"equal num_attention_heads={c.num_attention_heads}; export a GQA model in the Llama "
                            f"family instead)")
        if c.kv_channels * c.num_attention_heads != c.hidden_size:
            problems.append(f"kv_channels={c.kv_channels} ({cls} needs hidden_size / num_attention_heads = "
                            f"{c.hidden_size // c.num_attention_heads})")

    if family == "gpt2":
        need("normalization", "LayerNorm")
        need_one_of("activation", ("gelu", "gelu_tanh"))
        need("position_embedding_type", "learned_absolute")
        need("add_bias_linear", True)
        multi_head_attention("GPT2LMHeadModel")
    elif family == "gpt_neox":
        need("normalization", "LayerNorm")
        need_one_of("activation", ("gelu", "gelu_tanh"))
        need("position_embedding_type", "rope")
        need("add_bias_linear", True)
        multi_head_attention("GPTNeoXForCausalLM")
    else:
        need("normalization", "RMSNorm")
        need("activation", "swiglu")
        need("position_embedding_type", "rope")
        if c.rotary_percent != 1.0:
            problems.append(f"rotary_percent={c.rotary_percent} (transformers' LlamaForCausalLM rotates whole heads)")
    return problems


def hf_family(config: ModelConfig) -> str:
    """`"gpt2"`, `"llama"` or `"gpt_neox"`: the Hugging Face architecture that computes exactly what `config` does."""
    reasons = {}
    for family in ("gpt2", "llama", "gpt_neox"):
        problems = _family_requirements(family, config)
        if not problems:
            return family
        reasons[family] = problems
    detail = "; ".join(f"{HF_CLASSES[f]} needs {', '.join(p)}" for f, p in reasons.items())
    raise ConversionError(
        "unsupported architecture for Hugging Face export: the model is neither GPT-3 style "
        "(LayerNorm, gelu, learned_absolute positions, biases), GPT-NeoX style (the same with rope) nor Llama "
        f"style (RMSNorm, swiglu, full rope). {detail}. Train with the ModelConfig.gpt3() or ModelConfig.llama() "
        "settings, or export with convert_to_torch.py instead")


def pad_vocab_rows(weight: torch.Tensor, multiple: int | None) -> torch.Tensor:
    """Zero rows appended so the vocab dim is a multiple of `multiple` (Megatron's padded vocab).

    Zero rows leave every real token's embedding and logit unchanged; the padded ids are
    never produced by the tokenizer, so their values only matter if a user samples them.
    """
    if not multiple:
        return weight
    if multiple < 0:
        raise ConversionError(f"--make-vocab-size-divisible-by must be positive, got {multiple}")
    v = weight.shape[0]
    padded = -(-v // multiple) * multiple
    if padded == v:
        return weight
    extra = weight.new_zeros((padded - v, *weight.shape[1:]))
    return torch.cat([weight, extra], dim=0)  # [v, h] -> [padded, h]


def true_vocab_rows(weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The rows of real tokens of an embedding or output layer `[V padded, h]`: export drops the padding
    (`--make-vocab-size-divisible-by`), which no tokenizer produces and no softmax ever sees."""
    return weight[:config.output_vocab_size]  # [V padded, h] -> [V, h]


def check_keys(state_dict: dict, expected: set, what: str, fix: str) -> None:
    """Fail with the missing and unexpected names, because a silent partial load is a wrong model."""
    got = set(state_dict)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        def show(names):
            return f"{names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)})"
        raise ConversionError(f"{what} does not match its config: missing {show(missing)}, unexpected "
                              f"{show(unexpected)}. {fix}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{name} has shape {tuple(tensor.shape)} but the config implies {tuple(shape)}; "
                              f"the weights and the config come from different models")


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype`, contiguous and owning its storage: safetensors refuses views of one another
    (the q/k/v pieces of a fused qkv are views), and copying only views keeps peak memory low."""
    t = t.detach()
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype).contiguous()
    if not t.is_contiguous():
        return t.contiguous()
    return t.clone() if t._base is not None else t
