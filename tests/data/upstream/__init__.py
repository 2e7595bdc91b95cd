"""Megatron-DeepSpeed's own data code, runnable in a test without Megatron or DeepSpeed.

`megatron_deepspeed/` holds five files of microsoft/Megatron-DeepSpeed at commit
`UPSTREAM_COMMIT`, unmodified below a three-line provenance note (license: ./LICENSE).
`load()` executes them as private modules (nothing is added to `sys.modules`, so they
never meet this project's own `megatron` package) with their imports answered by small
stand-ins:

* `megatron` (get_args, print_rank_0, is_rank_0) and `megatron.core.mpu`: one process,
  one rank, the default flag values of the code paths used;
* `torch.distributed`: a world of one (`all_reduce` leaves its tensor alone);
* `deepspeed.accelerator.get_accelerator()`: CPU tensors;
* `megatron.data.helpers`, upstream's compiled C++ module: `build_sample_idx` is
  upstream's own Python `_build_sample_idx` from gpt_dataset.py (same walk, int32
  output) and `build_blending_indices` is the literal transcription in
  tests/data/reference.py (the C++ loop has no Python twin upstream).

Everything else (splits, weights, epochs, the separate last epoch, the shuffles,
blending sizes, the index cache, the `.bin/.idx` reader and writer, the sampler) is
upstream's code running as is.
"""

from __future__ import annotations

import builtins
import os
import types
from argparse import Namespace

import torch

from .. import reference

UPSTREAM_REPO = "microsoft/Megatron-DeepSpeed"
UPSTREAM_COMMIT = reference.UPSTREAM_COMMIT
_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_deepspeed")
_FILES = ("indexed_dataset", "blendable_dataset", "dataset_utils", "gpt_dataset", "data_samplers")


def default_args(**overrides) -> Namespace:
    """The flag values upstream's data code reads through get_args()."""
    args = Namespace(train_data_exact_num_epochs=None, train_desc_path=None, train_doc_idx_path=None,
                     train_sample_idx_path=None, train_shuffle_idx_path=None, use_dataset_only=False,
                     return_data_index=False, dataloader_type="single", micro_batch_size=1, num_workers=0,
                     repeated_dataloader=False, data_sharding=False, seed=1234)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


class _OneRankGroup:
    """mpu and torch.distributed for a single process."""

    def __getattr__(self, name):
        if name.endswith("_world_size"):
            return lambda *a, **k: 1
        if name.endswith("_rank") or name.endswith("_src_rank"):
            return lambda *a, **k: 0
        if name.endswith("_group"):
            return lambda *a, **k: None
        raise AttributeError(name)


class _Distributed(_OneRankGroup):
    @staticmethod
    def all_reduce(tensor, *args, **kwargs):
        return None

    @staticmethod
    def get_rank(*args, **kwargs):
        return 0

    @staticmethod
    def get_world_size(*args, **kwargs):
        return 1

    @staticmethod
    def is_initialized():
        return True


class _Torch(types.ModuleType):
    """Real torch, except `torch.distributed`."""

    def __init__(self):
        super().__init__("torch")
        self.distributed = _Distributed()

    def __getattr__(self, name):
        return getattr(torch, name)


class _Accelerator:
    @staticmethod
    def LongTensor(values):  # noqa: N802 (upstream's name)
        return torch.tensor(values, dtype=torch.long)


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def load(args: Namespace | None = None) -> types.SimpleNamespace:
    """Fresh private copies of upstream's modules: `.gpt_dataset`, `.blendable_dataset`,
    `.dataset_utils`, `.indexed_dataset`, `.data_samplers`, and `.args` (mutable)."""
    args = args if args is not None else default_args()
    quiet = lambda *a, **k: None  # noqa: E731
    helpers = _module("megatron.data.helpers")
    data_pkg = _module("megatron.data", helpers=helpers)
    mpu = _OneRankGroup()
    shims = {
        "megatron": _module("megatron", get_args=lambda: args, print_rank_0=quiet, print_rank_last=quiet,
                            is_rank_0=lambda: True, is_last_rank=lambda: True),
        "megatron.core": _module("megatron.core", mpu=mpu),
        "megatron.data": data_pkg,
        "deepspeed": _module("deepspeed"),
        "deepspeed.accelerator": _module("deepspeed.accelerator", get_accelerator=lambda: _Accelerator()),
        "deepspeed.runtime.dataloader": _module("deepspeed.runtime.dataloader", RepeatingLoader=object),
    }
    torch_shim = _Torch()

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch" and not fromlist:
            return torch_shim
        if name in shims:
            return shims[name] if fromlist else shims[name.split(".")[0]]
        return builtins.__import__(name, globals, locals, fromlist, level)

    env = dict(vars(builtins), __import__=_import, print=quiet)
    loaded = {}
    for name in _FILES:
        path = os.path.join(_HERE, name + ".py")
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        mod = types.ModuleType(f"upstream.megatron.data.{name}")
        mod.__dict__["__builtins__"] = env
        mod.__file__ = path
        shims[f"megatron.data.{name}"] = mod  # visible to the files loaded after it
        setattr(data_pkg, name, mod)
        exec(code, mod.__dict__)  # noqa: S102 (upstream's file, see the module docstring)
        loaded[name] = mod
    helpers.build_sample_idx = loaded["gpt_dataset"]._build_sample_idx
    helpers.build_blending_indices = reference.build_blending_indices_cpp
    return types.SimpleNamespace(args=args, **loaded)


__all__ = ["UPSTREAM_COMMIT", "UPSTREAM_REPO", "default_args", "load"]
