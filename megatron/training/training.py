"""The training loop: micro-batches -> one optimizer step, evaluation, logging, checkpoint.

One step takes `global_batch / (micro_batch x DP)` micro-batches on every rank. Each
rank's loss share is `sum(per-token loss x mask) x R / T` (R = SP x DP ranks, T = the
unmasked tokens of the whole global batch, counted before the first forward), so that
the gradient averaging of DDP/FSDP over the SDP group produces the gradient of the
global-batch mean, independent of how sequences and batches were split. The logged loss
is the same global mean. The learning-rate schedule advances only on applied steps:
an fp16 step skipped for overflow leaves the schedule where it was (Megatron's rule).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron.config import RunConfig
from megatron.core import comm
from megatron.core.documents import Documents
from megatron.parallel.data_parallel import grad_sync_context, grads_are_sharded, memory_breakdown
from megatron.planning.flops import device_peak_tflops, flops_per_step
from megatron.training.loss import check_tokens, global_token_count, loss_for_backward, masked_loss_sum
from megatron.training.lr_schedule import LRSchedule
from megatron.training.metrics import RunLogger, peak_memory_bytes
from megatron.training.optimizer import clip_gradients_, global_grad_norm, zero_grad
from megatron.training.precision import autocast_context, build_loss_scaler, local_grads, unscale_
from megatron.training.timers import Timers


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    applied_steps: int = 0  # steps the optimizer took (the schedule's clock)
    skipped_iters: int = 0
    stopped_by_signal: bool = False
    exit_reason: str | None = None  # "signal" or "duration": the loop saved already and the run ends now
    history: list = field(default_factory=list)  # lm loss per iteration (rank-local copy of the global value)


@dataclass
class Trainer:
    """Everything a step needs, built once by `megatron.training.pretrain`."""

    cfg: RunConfig
    model: torch.nn.Module
    optimizer: object
    parallel_state: object
    device: torch.device
    logger: RunLogger
    state: TrainState = field(default_factory=TrainState)
    start_time: float = field(default_factory=time.time)  # --exit-duration-in-mins counts from here
    long_context_eval: object = None  # fn(trainer) every --long-context-eval-interval steps (inference/hook.py)

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.schedule = LRSchedule.from_config(self.cfg.optim)
        self.scaler = build_loss_scaler(self.cfg.optim)
        self.timers = Timers(enabled=self.cfg.log.timing_log_level >= 1 or self.cfg.log.log_timers_to_tensorboard,
                             device=self.device)
        self.sharded_grads = grads_are_sharded(self.cfg.parallel.zero_stage, self.parallel_state.sdp_size)
        self.flops_per_step = flops_per_step(self.cfg.model, self.cfg.data.seq_length,
                                             self.cfg.train.global_batch_size)
        # MFU against this GPU's peak (planning/flops.py's table); none on CPU, where no fair peak exists
        self.peak_tflops = (device_peak_tflops(torch.cuda.get_device_name(self.device), self.cfg.optim.dtype_name)
                            if self.device.type == "cuda" else None)
        self.grad_hook = None  # tests inject overflows through this: fn(iteration, grads)

    # ------------------------------------------------------------------ one step

    def _to_device(self, mb: dict) -> dict:
        """Move a micro-batch to the training device. On a GPU the host tensors are pinned first so
        the copies are truly asynchronous (a non_blocking copy from pageable memory is not)."""
        cuda = self.device.type == "cuda"

        def move(v):
            if isinstance(v, Documents):
                return v.to(self.device)
            if not torch.is_tensor(v):
                return v
            if cuda and v.device.type == "cpu":
                return v.pin_memory().to(self.device, non_blocking=True)
            return v.to(self.device)
        return {k: move(v) for k, v in mb.items()}

    def _global_token_count(self, micro_batches: list) -> torch.Tensor:
        """Unmasked tokens of the whole global batch (all micro-batches, all ranks), before any
        forward, as a device tensor (NCCL cannot reduce CPU tensors; nothing waits for it)."""
        return global_token_count([mb["loss_mask"] for mb in micro_batches], self.parallel_state.sdp_group)

    def _forward(self, mb: dict) -> torch.Tensor:
        with autocast_context(self.cfg.optim, self.device.type):
            # the data path's Documents (whole-sample boundaries) spare the model a collective and
            # a host sync per micro-batch; shard ids are the fallback for other data providers
            docs = mb.get("documents")
            return self.model(mb["tokens"], mb.get("position_ids"), labels=mb["labels"],
                              segment_ids=docs if docs is not None else mb.get("segment_ids"))

    def train_step(self, micro_batches: list) -> dict:
        ps, cfg, timers = self.parallel_state, self.cfg, self.timers
        micro_batches = [self._to_device(mb) for mb in micro_batches]
        num_tokens = self._global_token_count(micro_batches)
        scale = self.scaler.scale
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            with grad_sync_context(self.model, cfg.parallel.zero_stage, i == len(micro_batches) - 1):
                with timers("forward"):
                    per_token = self._forward(mb)
                    loss = loss_for_backward(per_token, mb["loss_mask"], num_tokens, ps.sdp_size)
                with timers("backward"):
                    (loss * scale if scale != 1.0 else loss).backward()
            loss_sum += masked_loss_sum(per_token.detach(), mb["loss_mask"]).double()
        with timers("optimizer"):
            grads = local_grads(self.params)
            if self.grad_hook is not None:
                self.grad_hook(self.state.iteration + 1, grads)
            unscale_(grads, scale)
            grad_norm = global_grad_norm(self.params, self.sharded_grads, ps.sdp_group)
            found_inf = not math.isfinite(grad_norm)
            if cfg.optim.fp16 and not self.sharded_grads and ps.sdp_size > 1:
                # replicated grads overflow on every rank alike; agreeing costs one scalar and
                # guarantees that no rank ever steps while another skips
                flag = torch.tensor([float(found_inf)], device=self.device)
                comm.all_reduce(flag, group=ps.sdp_group, op=dist.ReduceOp.MAX, kind="all_reduce_found_inf")
                found_inf = bool(flag.item())
            lr = self.schedule(self.state.applied_steps + 1)
            if not found_inf:
                clip_gradients_(self.params, cfg.optim.clip_grad, grad_norm)
                self.schedule.apply(self.optimizer, self.state.applied_steps + 1)
                self.optimizer.step()
                self.state.applied_steps += 1
            self.scaler.update(found_inf)
            self.memory = memory_breakdown(self.model, self.optimizer)  # grads still held: the peak at rest
            zero_grad(self.optimizer)  # apex FusedAdam.zero_grad() takes no set_to_none
        if ps.sdp_size > 1:
            comm.all_reduce(loss_sum, group=ps.sdp_group, kind="all_reduce_loss")
        tokens = float(num_tokens.item())  # the step's one read of the loss (logging needs it anyway)
        check_tokens(tokens)
        return {"lm_loss": float(loss_sum.item() / tokens), "grad_norm": grad_norm,
                "skipped": found_inf, "lr": lr, "loss_scale": scale}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean loss over every unmasked token of `batches` (lists of micro-batches), all ranks."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss sum, token count]
        for micro_batches in batches:
            for mb in micro_batches:
                mb = self._to_device(mb)
                per_token = self._forward(mb)
                totals[0] += masked_loss_sum(per_token, mb["loss_mask"]).double()
                totals[1] += mb["loss_mask"].double().sum()
        self.model.train()
        _reshard_fsdp(self.model)
        if self.parallel_state.sdp_size > 1:
            comm.all_reduce(totals, group=self.parallel_state.sdp_group, kind="all_reduce_eval")
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    # ------------------------------------------------------------------ the loop

    def train(self, train_batches, valid_batches=None, save_fn=None) -> TrainState:
        """Run until --train-iters (or --exit-interval). `valid_batches()` returns a fresh
        iterable of eval batches (the same ones every time, so validation curves compare)."""
        cfg, st = self.cfg, self.state
        if valid_batches is not None and cfg.train.eval_iters > 0 and st.iteration == 0:
            self.logger.evaluation("valid", 0, self.evaluate(valid_batches()), 0, 0)
        a2a_before = comm.seconds("all_to_all")
        with _SignalFlag(enabled=cfg.train.exit_signal_handler) as sigterm:
            self._loop(train_batches, valid_batches, save_fn, sigterm, a2a_before)
        return st

    def _loop(self, train_batches, valid_batches, save_fn, sigterm, a2a_before) -> None:
        cfg, st = self.cfg, self.state
        tokens_per_step = cfg.tokens_per_step
        while st.iteration < cfg.train.train_iters:
            start, cpu_start = time.perf_counter(), time.process_time()
            micro_batches = [next(train_batches) for _ in range(cfg.num_micro_batches)]
            out = self.train_step(micro_batches)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start  # this rank's CPU time: wall minus descheduling
            st.iteration += 1
            st.consumed_samples += cfg.train.global_batch_size
            st.consumed_tokens += tokens_per_step
            st.skipped_iters += int(out["skipped"])
            st.history.append(out["lm_loss"])
            a2a_now = comm.seconds("all_to_all")
            timers = self.timers.pop_all()
            if self.timers.enabled:
                timers["all-to-all"] = a2a_now - a2a_before
            stats = {
                "lm_loss": out["lm_loss"], "grad_norm": out["grad_norm"], "lr": out["lr"],
                "loss_scale": out["loss_scale"], "skipped": out["skipped"], "skipped_iters": st.skipped_iters,
                "consumed_samples": st.consumed_samples, "consumed_tokens": st.consumed_tokens,
                "global_batch_size": cfg.train.global_batch_size, "elapsed_ms": 1000 * elapsed,
                "cpu_ms": 1000 * cpu_seconds,
                "tokens_per_sec": tokens_per_step / elapsed,
                "tflops_per_rank": self.flops_per_step / elapsed / cfg.world_size / 1e12,
                "mfu": (self.flops_per_step / elapsed / cfg.world_size / 1e12 / self.peak_tflops
                        if self.peak_tflops else None),
                "a2a_seconds": a2a_now - a2a_before,
                "peak_memory_bytes": self._max_over_ranks(peak_memory_bytes(self.device)),
            }
            a2a_before = a2a_now
            self.logger.iteration(st.iteration, stats, timers)
            last = st.iteration == cfg.train.train_iters
            if valid_batches is not None and cfg.train.eval_iters > 0 and \
                    (st.iteration % cfg.train.eval_interval == 0 or last):
                self.logger.evaluation("valid", st.iteration, self.evaluate(valid_batches()),
                                       st.consumed_samples, st.consumed_tokens)
            if self.long_context_eval is not None and st.iteration % cfg.train.long_context_eval_interval == 0:
                self.long_context_eval(self)
            if save_fn is not None and cfg.checkpoint.save_interval and \
                    st.iteration % cfg.checkpoint.save_interval == 0 and not last:
                save_fn(self)
            if cfg.train.exit_interval and st.iteration % cfg.train.exit_interval == 0:
                self.logger.print(f"exiting at iteration {st.iteration} (--exit-interval)")
                break
            reason = self._exit_reason(sigterm)
            if reason is not None:
                self.logger.print(f"{'SIGTERM received' if reason == 'signal' else '--exit-duration-in-mins reached'}"
                                  f": saving and stopping after iteration {st.iteration}")
                st.exit_reason, st.stopped_by_signal = reason, reason == "signal"
                if save_fn is not None:
                    save_fn(self)
                else:
                    self.logger.print(f"warning: stopping on {reason} without --save: nothing is saved")
                break

    def _exit_reason(self, sigterm) -> str | None:
        """One decision for all ranks (whichever rank the signal reached, whichever clock ran
        late), so every rank saves and stops after the same iteration."""
        minutes = self.cfg.train.exit_duration_in_mins
        if not sigterm.enabled and minutes is None:
            return None
        flags = torch.tensor([float(sigterm.received),
                              float(minutes is not None and time.time() - self.start_time >= 60 * minutes)],
                             device=self.device)
        if self.parallel_state.sdp_size > 1:
            comm.all_reduce(flags, group=self.parallel_state.sdp_group, op=dist.ReduceOp.MAX, kind="all_reduce_stats")
        return "signal" if flags[0] > 0 else "duration" if flags[1] > 0 else None

    def _max_over_ranks(self, value: int) -> int:
        if self.parallel_state.sdp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        comm.all_reduce(t, group=self.parallel_state.sdp_group, op=dist.ReduceOp.MAX, kind="all_reduce_stats")
        return int(t.item())

    def memory_report(self) -> dict:
        """Parameter, gradient and optimizer bytes of this rank, measured after the last step."""
        return getattr(self, "memory", None) or memory_breakdown(self.model, self.optimizer)


class _SignalFlag:
    """Record SIGTERM instead of dying (--exit-signal-handler); restores the old handler on exit."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.received, self._previous = enabled, False, None

    def _handler(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> _SignalFlag:
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)


def _reshard_fsdp(model: torch.nn.Module) -> None:
    """Free parameters that a no-grad forward left gathered (ZeRO-2 keeps them for a backward)."""
    for m in model.modules():
        if hasattr(m, "reshard") and type(m).__name__.startswith("FSDP"):
            m.reshard()
