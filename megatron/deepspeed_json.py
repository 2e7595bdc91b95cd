"""A DeepSpeed JSON config (`--deepspeed_config`), read the way Megatron-DeepSpeed users mean it.

Without `--deepspeed`, the JSON is one more source of settings for this framework: batch sizes, ZeRO stage,
precision, loss scaling and clipping, and a key that an explicit flag also sets must agree with it.

With `--deepspeed` (every upstream DeepSpeed example passes it) the JSON means what it means upstream, where
Megatron-DeepSpeed hands its model and a plain optimizer to DeepSpeed's engine: the engine clips and scales
losses as the JSON says (Megatron's --clip-grad and loss-scale flags are ignored), while Megatron's own batch
flags drive the micro-batch loop. Each decision is returned as a note, printed at start-up.
"""

from __future__ import annotations

import argparse
import json
import math

from megatron.config import ConfigError


def apply_deepspeed_config(args: argparse.Namespace, path: str, world_size: int) -> list:
    """Copy batch sizes, ZeRO stage, precision and clipping from a DeepSpeed JSON into `args`.

    Without `--deepspeed` the JSON is one more source of settings: a key that an explicit flag also sets must
    agree with it. With `--deepspeed` it means what it means to Megatron-DeepSpeed, which hands the optimizer to
    DeepSpeed's engine (see `_as_deepspeed_does`). "auto" values are skipped. Returns notes for the user.
    """
    try:
        with open(path) as f:
            ds = json.load(f)
    except OSError as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot read the file ({e}); fix the path") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from e

    def take(flag: str, dest: str, value, convert=lambda v: v) -> None:
        if value is None or value == "auto":
            return
        value = convert(value)
        given = getattr(args, dest)
        if given is not None and given != value:
            raise ConfigError(f"{flag} {given} conflicts with {value} in --deepspeed_config {path}; "
                              f"remove one of them or make them equal")
        setattr(args, dest, value)

    fp16, bf16 = ds.get("fp16", {}) or {}, ds.get("bf16", {}) or {}
    take("--zero-stage", "zero_stage", (ds.get("zero_optimization") or {}).get("stage"), int)
    # A disabled section says nothing unless a flag turned the mode on.
    if "enabled" in fp16 and (fp16["enabled"] or args.fp16):
        take("--fp16", "fp16", bool(fp16["enabled"]))
    if "enabled" in bf16 and (bf16["enabled"] or args.bf16):
        take("--bf16", "bf16", bool(bf16["enabled"]))
    if getattr(args, "deepspeed", False):
        notes = _as_deepspeed_does(args, ds, path, world_size)
    else:
        notes = []
        take("--global-batch-size", "global_batch_size", ds.get("train_batch_size"), int)
        take("--micro-batch-size", "micro_batch_size", ds.get("train_micro_batch_size_per_gpu"), int)
        take("--clip-grad", "clip_grad", ds.get("gradient_clipping"), float)
        if fp16.get("enabled"):
            if fp16.get("loss_scale", 0):
                take("--loss-scale", "loss_scale", fp16["loss_scale"], float)
            if "initial_scale_power" in fp16:
                take("--initial-loss-scale", "initial_loss_scale", 2.0 ** fp16["initial_scale_power"], float)
            take("--loss-scale-window", "loss_scale_window", fp16.get("loss_scale_window"), int)
            take("--hysteresis", "hysteresis", fp16.get("hysteresis"), int)
            take("--min-loss-scale", "min_loss_scale", fp16.get("min_loss_scale"), float)
        gas = ds.get("gradient_accumulation_steps")
        if gas not in (None, "auto") and args.micro_batch_size and args.global_batch_size:
            dp = max(1, world_size // max(1, args.ds_sequence_parallel_size))
            if args.micro_batch_size * int(gas) * dp != args.global_batch_size:
                raise ConfigError(
                    f"--deepspeed_config {path}: gradient_accumulation_steps={gas} x micro batch "
                    f"{args.micro_batch_size} x data-parallel size {dp} != global batch {args.global_batch_size}; "
                    f"fix gradient_accumulation_steps or drop it (it is derived from the batch sizes)")
    used = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "zero_optimization", "fp16", "bf16", "gradient_clipping"}
    known = {"zero_optimization": {"stage"}, "bf16": {"enabled"},
             "fp16": {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                      "min_loss_scale"}}
    ignored = [k for k in ds if k not in used] + \
        [f"{section}.{k}" for section, keys in known.items() for k in (ds.get(section) or {}) if k not in keys]
    return notes + [f"--deepspeed_config {path}: key '{k}' ignored (no meaning without the DeepSpeed engine)"
                    for k in ignored]


def _given(value) -> bool:
    return value not in (None, "auto")


def _as_deepspeed_does(args: argparse.Namespace, ds: dict, path: str, world_size: int) -> list:
    """What `--deepspeed` + JSON mean upstream, applied to `args`; one note per decision.

    Megatron-DeepSpeed builds its own data loader and micro-batch loop, and resets the engine's batch size to
    its own global batch every iteration, so the Megatron batch flags decide and the JSON's batch keys only have
    to be consistent at start-up. Its optimizer wrapper is not used under DeepSpeed, so Megatron's --clip-grad
    and loss-scale flags are ignored: the engine clips with the JSON's gradient_clipping (default 0: no
    clipping) and scales fp16 losses as its "fp16" section says (`deepspeed_loss_scaling`).
    """
    src, notes = f"--deepspeed_config {path}", []
    dp = max(1, world_size // max(1, args.ds_sequence_parallel_size))
    mbs_json, gbs_json = ds.get("train_micro_batch_size_per_gpu"), ds.get("train_batch_size")
    if args.micro_batch_size is None and _given(mbs_json):
        args.micro_batch_size = int(mbs_json)
    elif _given(mbs_json) and int(mbs_json) != args.micro_batch_size:
        notes.append(f"{src}: train_micro_batch_size_per_gpu {mbs_json} ignored under --deepspeed: --micro-batch-size "
                     f"{args.micro_batch_size} decides (upstream feeds the engine its own micro-batches)")
    mbs = args.micro_batch_size or 1
    gbs = args.global_batch_size if args.global_batch_size is not None else mbs * dp
    source = "--global-batch-size" if args.global_batch_size is not None else \
        f"--micro-batch-size x data-parallel size = {mbs} x {dp}, upstream's default"
    if _given(gbs_json) and int(gbs_json) != gbs:
        notes.append(f"{src}: train_batch_size {gbs_json} ignored under --deepspeed: the global batch is {gbs} "
                     f"({source}); Megatron-DeepSpeed resets the engine's batch size to it every iteration")
    gas = ds.get("gradient_accumulation_steps")
    if _given(gas) and mbs * int(gas) * dp != gbs:
        notes.append(f"{src}: gradient_accumulation_steps {gas} ignored under --deepspeed: a step accumulates "
                     f"{gbs} / ({mbs} x {dp}) micro-batches")

    clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
    if args.clip_grad is not None and args.clip_grad != clip:
        notes.append(f"--clip-grad {args.clip_grad}: ignored under --deepspeed (upstream leaves clipping to the "
                     f"DeepSpeed engine, which reads gradient_clipping from the JSON)")
    if "gradient_clipping" not in ds:
        notes.append(f"{src}: no gradient_clipping key, so gradients are not clipped (DeepSpeed's default is 0); "
                     f"add \"gradient_clipping\": 1.0 to the JSON to clip at norm 1")
    else:
        notes.append(f"{src}: gradients clipped at global norm {clip}" if clip > 0 else
                     f"{src}: gradient_clipping 0, gradients are not clipped")
    args.clip_grad = clip

    fp16 = ds.get("fp16", {}) or {}
    if fp16.get("enabled"):
        stage = (ds.get("zero_optimization") or {}).get("stage", 0)  # the engine's stage: the JSON's, default 0
        scaling = deepspeed_loss_scaling(fp16, int(stage) if _given(stage) else 0)
        ignored = [f"{flag} {getattr(args, dest)}" for flag, dest in _LOSS_SCALE_FLAGS
                   if getattr(args, dest) is not None and getattr(args, dest) != scaling[dest]]
        if ignored:
            notes.append(f"{', '.join(ignored)}: ignored under --deepspeed (DeepSpeed takes fp16 loss scaling from "
                         f"the JSON's fp16 section)")
        for _, dest in _LOSS_SCALE_FLAGS:
            setattr(args, dest, scaling[dest])
        notes.append(f"{src}: fp16 {_describe_scaling(scaling)}, as DeepSpeed's engine does with this fp16 section")
    elif args.fp16 and "enabled" not in fp16:
        notes.append(f"--fp16 with no fp16 section in {src}: upstream's DeepSpeed engine would scale no losses; "
                     f"here fp16 runs with the dynamic loss scaler of the Megatron flags (add an fp16 section to "
                     f"the JSON to choose DeepSpeed's)")
    return notes


_LOSS_SCALE_FLAGS = (("--loss-scale", "loss_scale"), ("--initial-loss-scale", "initial_loss_scale"),
                     ("--loss-scale-window", "loss_scale_window"), ("--hysteresis", "hysteresis"),
                     ("--min-loss-scale", "min_loss_scale"))


def deepspeed_loss_scaling(fp16: dict, zero_stage: int) -> dict:
    """The loss scaler DeepSpeed's engine builds from an enabled "fp16" JSON section (DeepSpeed 0.16).

    "loss_scale" > 0 is a static scale; 0 (the default) is dynamic. A dynamic scale starts at
    2**initial_scale_power (default 16), doubles after loss_scale_window (default 1000) overflow-free steps
    and halves on an overflow, not below min_loss_scale (default 1). Two details depend on the optimizer the
    engine wraps: without ZeRO (stage 0) the fp16 optimizer has no hysteresis (every overflow halves the
    scale); with ZeRO 1-3 the scaler honours "hysteresis" (default 2), but when the section sets none of
    the dynamic keys it falls back to its own constructor defaults: start 2**32, hysteresis 1.
    """
    static = fp16.get("loss_scale", 0)
    keys = ("initial_scale_power", "loss_scale_window", "min_loss_scale", "hysteresis", "consecutive_hysteresis")
    explicit = any(k in fp16 for k in keys)
    power = fp16.get("initial_scale_power", 16)
    out = dict(loss_scale=float(static) if _given(static) and static else None,
               initial_loss_scale=2.0 ** (power if _given(power) else 16),
               loss_scale_window=int(fp16.get("loss_scale_window", 1000)),
               min_loss_scale=float(fp16.get("min_loss_scale", 1)), hysteresis=int(fp16.get("hysteresis", 2)))
    if zero_stage == 0:
        out["hysteresis"] = 1
    elif not explicit:
        out.update(initial_loss_scale=2.0 ** 32, hysteresis=1)
    return out


def _describe_scaling(s: dict) -> str:
    if s["loss_scale"] is not None:
        return f"static loss scale {s['loss_scale']:g}"
    return (f"dynamic loss scaling from 2^{int(math.log2(s['initial_loss_scale']))}, doubled after "
            f"{s['loss_scale_window']} overflow-free steps, halved after {s['hysteresis']} overflow(s), not below "
            f"{s['min_loss_scale']:g}")
