"""What a run reports: Megatron-style iteration lines, TensorBoard and W&B scalars, a JSON-lines log.

Only rank 0 writes. Values are already global (the loss is the mean over every token of
the global batch, the gradient norm is the full norm), so rank 0 speaks for everyone;
peak memory is the maximum over ranks, gathered by the loop. The JSON log holds one
object per iteration (not only per --log-interval) so tests and tools can read exact
loss curves without parsing text.

Weights & Biases (`--wandb-project` / `--wandb-exp-name`, as in Megatron-DeepSpeed) receives the same scalars
as TensorBoard under the same names; the "... vs samples" / "... vs tokens" series are plotted against their
own x axis ("samples", "tokens"), declared with `wandb.define_metric`. The optional `wandb` package is imported
only when asked for; `megatron.arguments` refuses the flags when it is missing.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a GPU; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RunLogger:
    def __init__(self, log_cfg, train_iters: int, enabled: bool, stream=None) -> None:
        self.cfg = log_cfg
        self.train_iters = train_iters
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._tb = None
        self._wandb = None  # the wandb Run, once started
        self._wandb_axes: set = set()
        self._wandb_step = 0  # the latest iteration logged to W&B
        self._json = None
        self._acc: dict[str, float] = {}
        self._count = 0
        if not enabled:
            return
        if log_cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional, slow import)

            self._tb = SummaryWriter(log_dir=log_cfg.tensorboard_dir, max_queue=1000)
        if getattr(log_cfg, "wandb_project", "") or getattr(log_cfg, "wandb_exp_name", ""):
            self._start_wandb(log_cfg)
        if log_cfg.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(log_cfg.log_json)), exist_ok=True)
            self._json = open(log_cfg.log_json, "a")  # noqa: SIM115 (closed in close())

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def event(self, kind: str, **values) -> None:
        """One JSON object in the --log-json file."""
        if self._json is not None:
            self._json.write(json.dumps({"event": kind, **values}) + "\n")
            self._json.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            axis = next((a for a in ("samples", "tokens") if tag.endswith(f" vs {a}")), None)
            if axis is None:
                self._wandb.log({tag: value}, step=step)
                self._wandb_step = max(self._wandb_step, step)
            else:  # W&B steps must not go back: plot against a declared axis, at the current iteration
                if tag not in self._wandb_axes:
                    self._wandb.define_metric(axis)
                    self._wandb.define_metric(tag, step_metric=axis)
                    self._wandb_axes.add(tag)
                self._wandb.log({tag: value, axis: step}, step=self._wandb_step)

    def _start_wandb(self, log_cfg) -> None:
        import wandb  # noqa: PLC0415 (optional package; arguments.py checked that it is installed)

        kwargs = dict(project=log_cfg.wandb_project or None, name=log_cfg.wandb_exp_name or None,
                      config=dict(log_cfg.wandb_config))
        if log_cfg.wandb_save_dir:
            os.makedirs(log_cfg.wandb_save_dir, exist_ok=True)
            kwargs["dir"] = log_cfg.wandb_save_dir
        self._wandb = wandb.init(**kwargs)

    # ---------------------------------------------------------------- training iterations

    def iteration(self, it: int, stats: dict, timers: dict | None = None) -> None:
        """Record one iteration; print the averaged line every --log-interval iterations."""
        if not self.enabled:
            return
        self.event("train", iteration=it, **stats, **({"timers": timers} if timers else {}))
        if it % self.cfg.tensorboard_log_interval == 0:
            self._tensorboard(it, stats, timers)
        for k in ("lm_loss", "elapsed_ms", "tokens_per_sec", "tflops_per_rank", "mfu", "grad_norm"):
            if stats.get(k) is not None and math.isfinite(stats[k]):
                self._acc[k] = self._acc.get(k, 0.0) + stats[k]
        self._acc.setdefault("_timers", {})
        for k, v in (timers or {}).items():
            self._acc["_timers"][k] = self._acc["_timers"].get(k, 0.0) + v
        self._count += 1
        if it % self.cfg.log_interval == 0 or it == self.train_iters:
            self._print_line(it, stats)

    def _print_line(self, it: int, s: dict) -> None:
        n = max(self._count, 1)
        avg = {k: v / n for k, v in self._acc.items() if k != "_timers"}
        timers = {k: v / n for k, v in self._acc.get("_timers", {}).items()}
        self._acc, self._count = {}, 0
        parts = [
            f" iteration {it:8d}/{self.train_iters:8d}",
            f"consumed samples: {s['consumed_samples']:12d}",
            f"consumed tokens: {s['consumed_tokens']:14d}",
            f"elapsed time per iteration (ms): {avg.get('elapsed_ms', 0.0):.1f}",
            f"learning rate: {s['lr']:.3E}",
            f"global batch size: {s['global_batch_size']:5d}",
            f"lm loss: {avg.get('lm_loss', float('nan')):.6E}",
            f"loss scale: {s['loss_scale']:.1f}",
            f"grad norm: {avg.get('grad_norm', float('nan')):.3f}",
            f"number of skipped iterations: {s['skipped_iters']:3d}",
            f"tokens per second: {avg.get('tokens_per_sec', 0.0):.1f}",
            f"TFLOP/s per rank: {avg.get('tflops_per_rank', 0.0):.4f}",
            *([f"MFU: {100 * avg['mfu']:.1f}%"] if "mfu" in avg else []),
            f"peak memory (MB, max over ranks): {s['peak_memory_bytes'] / 2**20:.0f}",
        ]
        self.print(" | ".join(parts) + " |")
        if timers:
            self.print("    time (ms) | " + " | ".join(f"{k}: {1000 * v:.1f}" for k, v in sorted(timers.items())))

    def _tensorboard(self, it: int, s: dict, timers: dict | None) -> None:
        if self._tb is None and self._wandb is None:
            return
        samples = s["consumed_samples"]
        for tag, key in (("learning-rate", "lr"), ("batch-size", "global_batch_size"), ("lm loss", "lm_loss"),
                         ("loss-scale", "loss_scale"), ("grad-norm", "grad_norm"),
                         ("skipped-iterations", "skipped_iters"), ("tokens-per-second", "tokens_per_sec"),
                         ("tflops-per-rank", "tflops_per_rank"), ("mfu", "mfu"), ("iteration-time-ms", "elapsed_ms"),
                         ("consumed-tokens", "consumed_tokens"),
                         ("peak-memory-bytes", "peak_memory_bytes")):
            v = s.get(key)
            if v is not None and math.isfinite(float(v)):
                self.scalar(tag, float(v), it)
        if math.isfinite(s["lm_loss"]):
            self.scalar("lm loss vs samples", s["lm_loss"], samples)
            self.scalar("lm loss vs tokens", s["lm_loss"], s["consumed_tokens"])
        if timers and self.cfg.log_timers_to_tensorboard:
            for k, v in timers.items():
                self.scalar(f"{k}-time-ms", 1000 * v, it)

    # ---------------------------------------------------------------- evaluation

    def evaluation(self, split: str, it: int, loss: float, consumed_samples: int, consumed_tokens: int) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        label = "validation" if split == "valid" else "test"
        bar = "-" * 100
        self.print(bar)
        self.print(f" {label} loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |")
        self.print(bar)
        self.event(split, iteration=it, lm_loss=loss, ppl=ppl, consumed_samples=consumed_samples)
        self.scalar(f"lm loss {label}", loss, it)
        self.scalar(f"lm loss {label} ppl", ppl, it)
        self.scalar(f"lm loss {label} vs samples", loss, consumed_samples)
        self.scalar(f"lm loss {label} ppl vs samples", ppl, consumed_samples)
        self.scalar(f"lm loss {label} vs tokens", loss, consumed_tokens)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._json is not None:
            self._json.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
