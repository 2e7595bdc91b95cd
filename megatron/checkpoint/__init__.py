"""Checkpoints: one format, one writer, one reader, one manager, and the Hugging Face mapping.

    format.py    names on disk (tracker, iter_XXXXXXX, config.json, checksums.json), completeness
    storage.py   the atomic writer and the reader (also used by tools/checkpoint/*), checksums
    state.py     the parts a checkpoint holds (model, optimizer, scaler, train state, data position, RNG)
    compat.py    does a checkpoint fit the flags (config.json and shapes, before reading)
    manager.py   CheckpointManager: load-or-start, save, and the safety rules
    hf/          pure state-dict mappings to and from Hugging Face GPT-2, GPT-NeoX and Llama (RoPE scaling: rope.py)

Heavy modules (torch.distributed.checkpoint) load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib

from megatron.checkpoint.format import (
    PAUSE_ENV,
    TRACKER,
    CheckpointError,
    DamagedCheckpoint,
    checkpoint_dir,
    iteration_dirs,
    read_tracker,
)

_LAZY = {
    "CheckpointManager": "megatron.checkpoint.manager",
    "Loaded": "megatron.checkpoint.manager",
    "load_checkpoint": "megatron.checkpoint.manager",
    "write_checkpoint": "megatron.checkpoint.storage",
    "read_full": "megatron.checkpoint.storage",
    "verify_checksums": "megatron.checkpoint.storage",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron.checkpoint' has no attribute {name!r}")


__all__ = ["PAUSE_ENV", "TRACKER", "CheckpointError", "DamagedCheckpoint", "checkpoint_dir", "iteration_dirs",
           "read_tracker", *_LAZY]
