"""Consolidate a project checkpoint into one plain torch file, on one process.

    python tools/checkpoint/convert_to_torch.py --load CKPT_DIR --output model.pt

The output is `{"model": state_dict, "config": ModelConfig-as-dict, "iteration": N}`,
the format every conversion tool reads and writes. The reading and writing live in
megatron/checkpoint/consolidated.py (inference and evaluation use them too); the names are
re-exported here for the other tools and for existing imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `megatron` and `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.checkpoint.consolidated import (  # noqa: E402, F401 (re-exported for the tools)
    DTYPES,
    ProjectCheckpoint,
    cast_state_dict,
    check_against_model,
    find_model_config,
    load_project_checkpoint,
    read_dcp,
    resolve_checkpoint,
    save_dcp_checkpoint,
    save_torch_checkpoint,
    strip_wrapper_prefixes,
)
from megatron.checkpoint.format import CheckpointError  # noqa: E402
from megatron.checkpoint.hf import ConversionError, model_config_from_dict  # noqa: E402, F401 (re-exported)

# ------------------------------------------------------------------------------ command line


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True,
                   help="the --save directory of a run, one iter_XXXXXXX directory, or a consolidated .pt file")
    p.add_argument("--iteration", type=int, help="iteration to read (default: the latest, from the tracker file)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(p)
    p.add_argument("--output", required=True, help="the .pt file to write")
    p.add_argument("--dtype", choices=["keep", *DTYPES], default="keep", help="cast floating point weights")
    args = p.parse_args(argv)
    try:
        ckpt = load_project_checkpoint(args.load, args.iteration)
        check_against_model(ckpt.state_dict, ckpt.config)
        extra = {"run_config": ckpt.run_config} if ckpt.run_config is not None else {}
        save_torch_checkpoint(args.output, cast_state_dict(ckpt.state_dict, args.dtype), ckpt.config,
                              iteration=ckpt.iteration or 0, **_json_safe(extra))
    except CheckpointError as e:  # ConversionError is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in ckpt.state_dict.values())
    print(f"wrote {args.output}: {n:,} parameters from {ckpt.source} (iteration {ckpt.iteration})")
    return 0


def _json_safe(obj):
    """Round-trip through JSON so the file stays loadable with torch.load(weights_only=True)."""
    return json.loads(json.dumps(obj, default=str))


if __name__ == "__main__":
    sys.exit(main())
