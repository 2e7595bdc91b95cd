"""Write docs/flags.md from the parser: every flag, its default and meaning, and for Megatron-DeepSpeed's
flags what happens to them here (implemented / no effect + why / refused + the alternative).

    python tools/flags_doc.py > docs/flags.md        (tests/upstream/test_flags_doc.py checks it is current)

Sources: megatron.arguments.build_parser (flags, defaults, help), megatron.upstream_compat (the status of
upstream flags) and tests/upstream/upstream_flags.json (the upstream inventory and its commit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron import upstream_compat as uc  # noqa: E402
from megatron.arguments import build_parser  # noqa: E402

INVENTORY = os.path.join(ROOT, "tests", "upstream", "upstream_flags.json")

NOT_SUPPORTED = """\
- **Tensor and pipeline parallelism** (`--tensor-model-parallel-size`, `--pipeline-model-parallel-size` > 1,
  virtual pipeline stages, zero-bubble schedules). This framework scales long sequences with Ulysses sequence
  parallelism (`--ds-sequence-parallel-size`, optionally with ring attention, `--ring-attention-size`) times
  ZeRO data parallelism (`--zero-stage`, torch FSDP2). Parameters are replicated across a sequence-parallel
  group and sharded by ZeRO-3 across all ranks, which covers the model sizes of the upstream SP examples
  (30B at 32k) without splitting layers. Scripts that set TP or PP > 1 fail before launch with a named error.
- **Mixture of Experts** (`--num-experts` > 1 and the `--moe-*` / `--topk` family): the model is dense.
- **FP8 / Transformer Engine** (`--fp8-*`, `--transformer-impl transformer_engine`): bf16 and fp16 only.
- **Knowledge distillation, Retro, random-LTD, curriculum learning**: not part of GPT pretraining here.
- **CPU/NVMe offload of optimizer state or parameters** (`--cpu-optimizer`, `--remote-device`): ZeRO-3
  shards them across ranks instead; activations can go to host memory (`--offload-activations`,
  upstream's `--checkpoint-in-cpu`).
- **BERT, T5, vision, biencoder models**: their flags are accepted without effect, as upstream's
  `pretrain_gpt.py` ignores them too.
- **Not implemented yet, parsed already**: multi-layer recompute chunks
  (`--checkpoint-num-layers`) and FPDT (`--ds-sequence-parallel-fpdt*`). Their defaults are accepted; any other
  value is refused as "not implemented yet" rather than silently ignored.
"""

DEEPSPEED_JSON = """\
Every upstream DeepSpeed example passes `--deepspeed --deepspeed_config FILE`. No DeepSpeed engine runs here;
the JSON is read so that the run means what it meant upstream, and every decision is printed as a note:

- **Batch**: Megatron-DeepSpeed runs its own micro-batch loop and resets the engine's batch size to
  `--global-batch-size` every iteration, so `--micro-batch-size` and `--global-batch-size` decide (without
  `--global-batch-size`: micro batch x data-parallel size). The JSON's `train_batch_size`,
  `train_micro_batch_size_per_gpu` and `gradient_accumulation_steps` only fill a missing `--micro-batch-size`;
  other disagreements are printed and ignored.
- **Gradient clipping**: upstream's optimizer wrapper is not used under DeepSpeed, so `--clip-grad` is ignored;
  the engine clips with the JSON's `gradient_clipping`, whose default is 0. **A JSON without
  `gradient_clipping` therefore means no clipping**, even with `--clip-grad 1.0` (the plain DeepSpeed example
  does this); the note says so and how to clip.
- **fp16 loss scaling**: `--loss-scale`, `--initial-loss-scale`, `--min-loss-scale`, `--loss-scale-window` and
  `--hysteresis` are ignored (with a note when they differ); the JSON's `fp16` section decides as DeepSpeed's
  engine builds its scaler: `loss_scale` > 0 is static, 0 (default) dynamic, starting at
  2^`initial_scale_power` (default 16, not Megatron's 2^32), doubling after `loss_scale_window` (1000) clean
  steps, halving on overflow, not below `min_loss_scale` (1). Without ZeRO (stage 0) DeepSpeed's fp16 optimizer
  has no hysteresis; with ZeRO 1-3 `hysteresis` (default 2) applies, and a section that sets none of the
  dynamic keys gets ZeRO's own defaults (start 2^32, hysteresis 1).
- **ZeRO stage and precision** (`zero_optimization.stage`, `fp16.enabled`, `bf16.enabled`) are taken from the
  JSON and must agree with `--zero-stage`, `--fp16`, `--bf16` when those are given.
- Other keys (`steps_per_print`, `prescale_gradients`, `wall_clock_breakdown`, ...) are listed as ignored.

Without `--deepspeed` (not an upstream usage: upstream ignores the JSON then) the JSON is one more source of
settings: batch sizes, ZeRO stage, precision, loss scaling and clipping are taken from it and must agree with
the flags that are also given.
"""

KNOWN_DIFFERENCES = """\
- GeLU is upstream's, kernel choice included: a GeLU MLP with biases computes the **tanh approximation**
  (upstream's default fused bias-GeLU kernel), `--no-bias-gelu-fusion`, `--disable-bias-linear` and
  `--onnx-safe` give the exact (erf) GeLU, `--openai-gelu` the tanh one. (Runs of this framework before
  that rule computed the exact GeLU whatever the flags; a checkpoint stores which one it was trained with.)
- Padded vocabulary (`--make-vocab-size-divisible-by`): upstream's cross-entropy runs over the padded
  vocabulary, so the padding ids take part in the softmax. Here they never do (loss, tiled loss, evaluation,
  generation), and Hugging Face export drops the padding rows; losses are lower by the padding's share of
  the softmax.
- Upstream logs to TensorBoard/W&B from the last rank; here rank 0 logs values that are already global.
"""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.nargs == 0:  # a switch: what the run does without the flag
        return "off" if isinstance(action, argparse._StoreFalseAction) or not action.default else "on"
    if action.default in (None, "", []):
        return ""
    return f"`{action.default}`"


def _flags(action: argparse.Action) -> str:
    return ", ".join(f"`{o}`" for o in action.option_strings)


def _upstream_status(action: argparse.Action, upstream: set) -> str:
    names = [o for o in action.option_strings if o in upstream]
    if not names:
        return ""
    status, why = uc.classify(names[0])
    return status if not why else f"{status}: {why}"


def _record_status(rec: dict) -> str:
    status, _ = uc.classify(rec["flags"][0])
    return status


def render() -> str:
    with open(INVENTORY) as f:
        inv = json.load(f)
    upstream = {f for rec in inv["flags"] for f in rec["flags"]}
    src = inv["sources"]["megatron-deepspeed"]
    counts = {s: 0 for s in (uc.IMPLEMENTED, uc.NO_EFFECT, uc.REJECTED, uc.NOT_YET)}
    for rec in inv["flags"]:
        counts[_record_status(rec)] += 1
    parser = build_parser()
    out = [
        "# Flags",
        "",
        "<!-- Generated by tools/flags_doc.py from the parser; do not edit. Regenerate with",
        "     python tools/flags_doc.py > docs/flags.md -->",
        "",
        "`pretrain_gpt.py` takes Megatron-DeepSpeed's flags, so an upstream GPT launch script runs unchanged: every",
        f"flag of upstream's `megatron/arguments.py` ({src['repo']} at `{src['commit'][:12]}`, plus DeepSpeed's",
        "`--deepspeed`/`--deepspeed_config`) is implemented, accepted with a printed note saying why it has no",
        "effect here, or rejected with an error that names it and the alternative. A flag that neither knows is",
        "an error that suggests the closest known flag.",
        "",
        "| upstream flags | count | what happens |",
        "|---|---|---|",
        f"| implemented | {counts[uc.IMPLEMENTED]} | same meaning as upstream (a few print a note on how) |",
        f"| no effect | {counts[uc.NO_EFFECT]} | accepted; a note printed at start-up says why |",
        f"| rejected | {counts[uc.REJECTED]} | an error names the flag and the alternative; upstream's default "
        f"value is accepted |",
        f"| not implemented yet | {counts[uc.NOT_YET]} | parsed with upstream's type and default; another value "
        f"is refused until the feature lands |",
        f"| total | {len(inv['flags'])} | (aliases of one flag count once) |",
        "",
        "Contents: [flags of this framework](#flags-of-this-framework) ·",
        "[accepted without effect](#megatron-deepspeed-flags-accepted-without-effect) ·",
        "[rejected](#megatron-deepspeed-flags-rejected) · [DeepSpeed JSON](#deepspeed-json) ·",
        "[not supported, and why](#not-supported-and-why) · [known differences](#known-differences)",
        "",
        "## Flags of this framework",
        "",
        "The last column is empty for flags of this framework only, and says what happens to an upstream flag.",
    ]
    compat_titles = {g.title for g in parser._action_groups if g.title.startswith("Megatron-DeepSpeed")}
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions or group.title in compat_titles:
            continue
        out += ["", f"### {group.title}", "", "| flag | default | meaning | upstream |", "|---|---|---|---|"]
        for a in actions:
            out.append(f"| {_flags(a)} | {_cell(_default(a))} | {_cell(a.help or '')} | "
                       f"{_cell(_upstream_status(a, upstream))} |")
    for status, title in ((uc.NO_EFFECT, "Megatron-DeepSpeed flags accepted without effect"),
                          (uc.REJECTED, "Megatron-DeepSpeed flags rejected")):
        out += ["", f"## {title}", ""]
        if status == uc.REJECTED:
            out += ["A value equal to upstream's default (shown) means what happens here anyway and is accepted.", ""]
        rejected = status == uc.REJECTED
        out += ["| flag | upstream default | why |" if rejected else "| flag | why |",
                "|---|---|---|" if rejected else "|---|---|"]
        for c in sorted((c for c in uc.FLAGS if c.status == status), key=lambda c: c.name.lstrip("-").lower()):
            flags = ", ".join(f"`{f}`" for f in c.flags)
            default = "" if c.nargs == 0 or c.default is None else f"`{c.default}`"
            out.append(f"| {flags} | {_cell(default)} | {_cell(c.why)} |" if rejected else f"| {flags} | {_cell(c.why)} |")
    out += ["", "## DeepSpeed JSON", "", DEEPSPEED_JSON.rstrip(), "", "## Not supported, and why", "",
            NOT_SUPPORTED.rstrip(), "", "## Known differences", "", KNOWN_DIFFERENCES.rstrip(), ""]
    return "\n".join(out)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
