"""Project checkpoints on one process: read any layout into full tensors, write plain or DCP ones.

What the conversion tools, inference and evaluation share on top of megatron.checkpoint's
reader and atomic writer: finding the model config in whatever a checkpoint stored, reading a
training checkpoint directory (`<save>/latest_checkpointed_iteration.txt` + `<save>/iter_XXXXXXX/`,
written by torch.distributed.checkpoint from any number of ranks, checksums verified) without
torch.distributed, and writing a consolidated `{"model", "config", "iteration"}` torch file or
a DCP checkpoint that training loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch

from megatron.checkpoint import format as fmt
from megatron.checkpoint.format import TRACKER
from megatron.checkpoint.hf import ConversionError, model_config_from_dict, model_config_to_dict
from megatron.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# entries of a checkpoint that usually hold the configuration, in order of preference (any other
# tensor-free entry is searched too)
_CONFIG_KEYS = ("config", "model_config", "run_config", "args")
# files next to a checkpoint that may hold the run config as JSON
_CONFIG_FILES = ("config.json", "model_config.json", "run_config.json")
# prefixes that wrappers add to parameter names (DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ProjectCheckpoint:
    """A project model read into memory: full (unsharded) tensors and the config that built them."""

    state_dict: dict
    config: ModelConfig
    iteration: int | None = None
    run_config: dict | None = None  # the stored run config when it had more than the model part
    source: str = ""


# ------------------------------------------------------------------------------ reading


def resolve_checkpoint(path: str, iteration: int | None = None) -> tuple[str, str, int | None]:
    """(kind, path, iteration) with kind "torch" (a plain file) or "dcp" (one DCP directory).

    `path` may be a plain file, a `--save` root (the tracker file picks the iteration unless
    `iteration` is given) or one `iter_XXXXXXX` directory.
    """
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint {path} does not exist: pass the --save directory of a run, one of its "
                              f"iter_XXXXXXX directories, or a file written by convert_to_torch.py")
    if os.path.isfile(path):
        return "torch", path, None
    if os.path.isfile(os.path.join(path, fmt.METADATA)):
        return "dcp", path, fmt.iteration_of(path)
    if iteration is None and os.path.isfile(os.path.join(path, TRACKER)):
        iteration = fmt.read_tracker(path)  # CheckpointError if it is not a number
    if iteration is not None:
        sub = fmt.checkpoint_dir(path, iteration)
        if os.path.isfile(os.path.join(sub, fmt.METADATA)):
            return "dcp", sub, iteration
        raise ConversionError(f"{sub} is not a DCP checkpoint (no .metadata file); {fmt.found(path)}. "
                              f"Pass --iteration with one of them")
    newest = fmt.newest_complete(path)
    if newest is not None:  # a --save directory that lost its tracker
        print(f"note: {os.path.join(path, TRACKER)} is missing; reading the newest complete checkpoint, "
              f"iteration {newest}", file=sys.stderr)
        return "dcp", fmt.checkpoint_dir(path, newest), newest
    raise ConversionError(f"{path} is not a checkpoint: it has neither {TRACKER} (a --save directory) nor "
                          f".metadata (an iter_XXXXXXX directory). Point --load at the directory given to --save")


def read_dcp(path: str, roots: set | None = None) -> dict:
    """The nested state dict of one DCP directory, restricted to the top-level keys in `roots`
    (megatron.checkpoint's reader: full tensors on one process, checksums verified)."""
    from megatron.checkpoint.storage import read_full  # noqa: PLC0415 (slow import, only for DCP inputs)

    return read_full(path, roots)


def _dcp_roots(path: str) -> dict:
    """Top-level keys of a DCP checkpoint -> whether any tensor lives under them."""
    from megatron.checkpoint.storage import top_level_keys  # noqa: PLC0415

    return top_level_keys(fmt.read_metadata(path))


def find_model_config(obj) -> ModelConfig | None:
    """The ModelConfig inside whatever a checkpoint stored: the object itself, a RunConfig,
    `asdict(ModelConfig)`, `asdict(RunConfig)` (model under "model") or a JSON string of those."""
    if isinstance(obj, ModelConfig):
        return obj
    if isinstance(getattr(obj, "model", None), ModelConfig):
        return obj.model
    if isinstance(obj, (str, bytes)):
        try:
            return find_model_config(json.loads(obj))
        except ValueError:
            return None
    if isinstance(obj, dict):
        if "num_layers" in obj and "hidden_size" in obj:
            return model_config_from_dict(obj)
        if isinstance(obj.get("model"), (dict, ModelConfig)):
            return find_model_config(obj["model"])
    return None


def _as_plain(obj):
    """A RunConfig or other dataclass as a JSON-friendly dict (tokenizer paths live in its "data" part)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (str, bytes)):
        try:
            return json.loads(obj)
        except ValueError:
            return None
    return obj if isinstance(obj, dict) else None


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_project_checkpoint(path: str, iteration: int | None = None) -> ProjectCheckpoint:
    """Read a training checkpoint or a consolidated file on one process, without torch.distributed."""
    kind, resolved, it = resolve_checkpoint(path, iteration)
    if kind == "torch":
        try:
            blob = torch.load(resolved, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises several types for "not a torch file")
            raise ConversionError(f"{resolved} is not a checkpoint torch.load can read safely ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); expected a file written by "
                                  f"convert_to_torch.py or convert_from_hf.py") from e
        if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
            raise ConversionError(f"{resolved} is not a project checkpoint: expected a dict with a 'model' state "
                                  f"dict and a 'config' dict, got {type(blob).__name__}"
                                  f"{' with keys ' + str(sorted(blob)) if isinstance(blob, dict) else ''}")
        candidates, it = [blob.get(k) for k in _CONFIG_KEYS], blob.get("iteration")
    else:
        roots = _dcp_roots(resolved)
        if "model" not in roots:
            raise ConversionError(f"{resolved} is a DCP checkpoint without a 'model' entry (top-level keys "
                                  f"{sorted(roots)}); it was not written by this project's training")
        # the weights plus every tensor-free entry (counters, configs: small); never the optimizer state
        blob = read_dcp(resolved, {"model", *(r for r, has_tensors in roots.items() if not has_tensors)})
        candidates = [blob.get(k) for k in _CONFIG_KEYS]
        candidates += [v for k, v in blob.items() if k not in (*_CONFIG_KEYS, "model")]
        candidates += [_read_json(os.path.join(d, f)) for d in (resolved, os.path.dirname(os.path.normpath(resolved)))
                       for f in _CONFIG_FILES]
        it = blob.get("iteration", it)
    config = next((c for c in map(find_model_config, candidates) if c is not None), None)
    if config is None:
        if kind == "dcp":
            fix = (f"write the ModelConfig fields the run was trained with as JSON to "
                   f"{os.path.join(resolved, 'config.json')} (the tools read it from there)")
        else:
            fix = "add them to the file as a 'config' dict of ModelConfig fields"
        raise ConversionError(f"{resolved} holds no model config: none of its entries (nor a config.json next to a "
                              f"DCP directory) has the ModelConfig fields; {fix}")
    run_config = next((r for r in map(_as_plain, candidates) if isinstance(r, dict) and "model" in r), None)
    sd = strip_wrapper_prefixes({k: v for k, v in blob["model"].items() if torch.is_tensor(v)})
    return ProjectCheckpoint(sd, config, None if it is None else int(it), run_config, resolved)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_against_model(state_dict: dict, config: ModelConfig) -> None:
    """Fail now, with names, if the tensors are not exactly what `GPTModel(config)` holds."""
    from megatron.checkpoint.hf.common import check_keys, check_shape  # noqa: PLC0415
    from megatron.model import GPTModel  # noqa: PLC0415

    with torch.device("meta"):  # shapes only
        model = GPTModel(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(state_dict, set(expected), "the checkpoint's model state dict",
               "The stored config and weights disagree; was the checkpoint edited by hand?")
    for k, shape in expected.items():
        check_shape(k, state_dict[k], tuple(shape))


# ------------------------------------------------------------------------------ writing


def save_torch_checkpoint(path: str, state_dict: dict, config: ModelConfig, iteration: int = 0, **extra) -> None:
    """One plain file: `{"model", "config", "iteration", ...extra}`, readable with `weights_only=True`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = {"model": state_dict, "config": model_config_to_dict(config), "iteration": iteration, **extra}
    torch.save(blob, path)


def save_dcp_checkpoint(root: str, state_dict: dict, config: ModelConfig, iteration: int = 0,
                        run_config: dict | None = None) -> str:
    """A `--save`-style directory (`iter_XXXXXXX/` + tracker) that `--load` reads, written by one
    process with the training's own atomic writer (checksums and config.json included).
    `run_config`: more of the run's settings for config.json (e.g. its "data" part: the tokenizer).

    It holds the model and the counters only (no optimizer state): load it with
    `--finetune` or `--no-load-optim`.
    """
    from megatron import __version__  # noqa: PLC0415
    from megatron.checkpoint.storage import write_checkpoint  # noqa: PLC0415

    path = fmt.checkpoint_dir(root, iteration)
    if os.path.exists(path) and os.listdir(path):
        raise ConversionError(f"{path} already exists and is not empty; choose another --dcp directory or "
                              f"remove it first")
    if os.path.isdir(path):
        os.rmdir(path)
    state = {"model": state_dict, "iteration": iteration, "consumed_samples": 0,
             "config": model_config_to_dict(config)}
    return write_checkpoint(root, iteration, state, config={**(run_config or {}), "model": model_config_to_dict(config),
                                                            "version": __version__},
                            no_dist=True, log=lambda *_: None)


def cast_state_dict(state_dict: dict, dtype_name: str | None) -> dict:
    if dtype_name in (None, "keep"):
        return state_dict
    dtype = DTYPES[dtype_name]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
