"""A trained model, whatever layout it was trained with, as one plain `GPTModel`.

Training checkpoints are DCP directories written by every rank (any SP x DP size, ZeRO 0-3);
the single-process reader of the conversion tools (`load_project_checkpoint`: DCP's
`no_dist` load of the "model" entry plus the stored config) turns any of them into full
tensors, so generation and evaluation can run on one process or on a different number of
ranks than training used. Consolidated `.pt` files (convert_to_torch.py / convert_from_hf.py)
load the same way.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from megatron.config import ModelConfig


@dataclass
class LoadedModel:
    model: torch.nn.Module  # GPTModel, eval mode
    config: ModelConfig
    run_config: dict | None  # the training run's settings when the checkpoint stored them (tokenizer, data)
    iteration: int | None
    path: str


def _reader():
    # the reader lives with the conversion tools (repository root on the path when run from a checkout)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    from megatron.checkpoint.consolidated import check_against_model, load_project_checkpoint  # noqa: PLC0415

    return load_project_checkpoint, check_against_model


def load_model(path: str, iteration: int | None = None, device="cpu", dtype: torch.dtype | None = None,
               **config_changes) -> LoadedModel:
    """`path`: a `--save` directory (the tracker picks the iteration unless given), one `iter_XXXXXXX`
    directory, or a consolidated .pt file. `config_changes` replace ModelConfig fields that do not
    change the weights (e.g. dropout, or RoPE scaling to evaluate a model at a longer context)."""
    from megatron.model import GPTModel  # noqa: PLC0415

    load_project_checkpoint, check_against_model = _reader()
    ckpt = load_project_checkpoint(path, iteration)
    check_against_model(ckpt.state_dict, ckpt.config)
    config = ckpt.config.replace(hidden_dropout=0.0, attention_dropout=0.0, **config_changes)
    with torch.device("meta"):
        model = GPTModel(config)
    model.to_empty(device=device)
    model.load_state_dict(ckpt.state_dict, strict=True)
    if dtype is not None:
        model.to(dtype)
    return LoadedModel(model.eval(), config, ckpt.run_config, ckpt.iteration, ckpt.source)


def build_tokenizer_for(run_config: dict | None, flags: dict | None = None):
    """The tokenizer of `flags` (Megatron's tokenizer flag names, when `tokenizer_type` is set), else the one
    the checkpoint was trained with; None when neither can be built (the reason is printed)."""
    from types import SimpleNamespace  # noqa: PLC0415

    from megatron.config import ConfigError  # noqa: PLC0415
    from megatron.data.tokenizers import build_tokenizer  # noqa: PLC0415

    explicit = bool(flags and flags.get("tokenizer_type"))
    fields = dict(flags) if explicit else dict((run_config or {}).get("data") or {})
    if not fields.get("tokenizer_type"):
        return None
    try:
        return build_tokenizer(SimpleNamespace(**{**fields, "make_vocab_size_divisible_by": 1}))
    except Exception as e:  # noqa: BLE001 (files moved, wrong type: the caller decides whether that matters)
        if explicit:
            raise ConfigError(f"cannot build the tokenizer: {e}") from e
        print(f"note: the checkpoint's tokenizer cannot be built here ({e}); pass the tokenizer flags",
              file=sys.stderr)
        return None
