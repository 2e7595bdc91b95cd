"""`pretrain(cfg)`: initialise, build the model, parallelize it, train, evaluate, save.

The model and data are built by providers (`model_provider(cfg, parallel_state)` returns
the plain model, by default a `GPTModel` on the meta device; `data_provider(cfg,
parallel_state, consumed_samples)`) so that `pretrain_gpt.py` stays a few lines and tests
or new model types can swap either one. `parallelize_gpt` then applies SP, recompute,
tiling, offload and ZeRO and materialises this rank's shards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch

from megatron.checkpoint.manager import CheckpointManager
from megatron.config import RunConfig
from megatron.core import comm
from megatron.errors import peer_lost_error
from megatron.initialize import initialize_megatron, set_seed
from megatron.parallel import parallelize_gpt
from megatron.parallel.data_parallel import zero_formula_bytes
from megatron.parallel.parallelize import built_rank_facts
from megatron.training.metrics import RunLogger
from megatron.training.optimizer import build_optimizer
from megatron.training.training import Trainer


def default_model_provider(cfg: RunConfig, parallel_state) -> torch.nn.Module:
    """The plain GPT model on the meta device: no memory until parallelize_gpt allocates this
    rank's shards (a 30B model never exists whole on one GPU)."""
    from megatron.model import GPTModel  # noqa: PLC0415

    with torch.device("meta"):
        return GPTModel(cfg.model)


def default_data_provider(cfg: RunConfig, parallel_state, consumed_samples: int):
    from megatron.training.data_iterators import build_data_iterators  # noqa: PLC0415

    return build_data_iterators(cfg, parallel_state, consumed_samples)


def pretrain(cfg: RunConfig, model_provider: Callable | None = None,
             data_provider: Callable | None = None, trainer_hook: Callable | None = None) -> dict:
    """Train as configured; returns a summary (losses, memory, evaluation results).

    `trainer_hook(trainer)` runs after everything is built, before the first step
    (tests use it to inject gradient overflows).
    """
    start_time = time.time()
    ctx = initialize_megatron(cfg)
    ps, device = ctx.parallel_state, ctx.device
    logger = RunLogger(cfg.log, cfg.train.train_iters, enabled=ps.rank == 0)
    built = {}  # what _pretrain built so far (the trainer: how far training got when a peer is lost)
    try:
        return _pretrain(cfg, ps, device, logger, model_provider or default_model_provider,
                         data_provider or default_data_provider, trainer_hook, start_time, built)
    except Exception as e:
        # a collective failed because another rank is gone: say so, and how to resume
        trainer = built.get("trainer")
        lost = peer_lost_error(e, trainer.state.iteration if trainer is not None else None, cfg.checkpoint.save)
        if lost is None:
            raise
        raise lost from e
    finally:
        logger.close()
        from megatron.core.parallel_state import destroy_model_parallel  # noqa: PLC0415

        destroy_model_parallel()


def _pretrain(cfg, ps, device, logger, model_provider, data_provider, trainer_hook, start_time, built) -> dict:
    for note in cfg.notes:
        logger.print(note if note.startswith("WARNING") else f"note: {note}")
    logger.print(f"> {ps.describe()} | zero stage {cfg.parallel.zero_stage} | micro batch "
                 f"{cfg.train.micro_batch_size} x {cfg.num_micro_batches} accumulation x dp {ps.dp_size} = global "
                 f"batch {cfg.train.global_batch_size} | {cfg.tokens_per_step} tokens per step | "
                 f"{cfg.optim.dtype_name} | threads {torch.get_num_threads()}")
    # what to load, and whether --load / --save are safe, is settled before anything is built
    checkpoints = CheckpointManager(cfg.checkpoint, run_config=cfg, parallel_state=ps, log=logger.print)
    checkpoints.prepare()
    model = model_provider(cfg, ps)
    num_params = sum(p.numel() for p in model.parameters())
    # Same seed everywhere: every rank initialises (its shards of) identical replicas
    model = parallelize_gpt(model, ps, cfg.parallel, device=device, precision=cfg.optim.dtype_name)
    # from here on the RNG drives dropout, which must differ between ranks that hold
    # different tokens or heads
    set_seed(cfg.train.seed + 1 + ps.rank)
    optimizer, opt_name = build_optimizer(model, cfg.optim, cfg.parallel.zero_stage, ps)
    logger.print(f"> model: {num_params:,} parameters | optimizer: {opt_name} | attention backend: "
                 f"{cfg.parallel.attention_backend} | recompute: {cfg.parallel.recompute_granularity}")
    logger.event("config", world_size=cfg.world_size, sp=ps.sp_size, dp=ps.dp_size,
                 zero_stage=cfg.parallel.zero_stage, num_params=num_params, optimizer=opt_name,
                 train_iters=cfg.train.train_iters, global_batch_size=cfg.train.global_batch_size,
                 seq_length=cfg.data.seq_length, dtype=cfg.optim.dtype_name)
    # what was built, per rank (once, at start-up): the dry-run plan must predict exactly this
    facts = built_rank_facts(model, ps)
    logger.event("topology", ranks=comm.all_gather_object(facts) if cfg.world_size > 1 else [facts])
    trainer = Trainer(cfg=cfg, model=model, optimizer=optimizer, parallel_state=ps, device=device, logger=logger,
                      start_time=start_time)
    if cfg.train.long_context_eval_interval:
        from megatron.inference.hook import LongContextEvalHook  # noqa: PLC0415

        trainer.long_context_eval = LongContextEvalHook(cfg, ps, device, logger)
    built["trainer"] = trainer
    checkpoints.attach(model, optimizer, trainer.scaler, trainer.state)
    checkpoints.load()  # counters, data position, optimizer, scaler and RNG in place; no-op from scratch
    train_iter, valid_batches, test_batches = data_provider(cfg, ps, trainer.state.consumed_samples)
    if trainer_hook is not None:
        trainer_hook(trainer)

    def save(t: Trainer) -> None:  # the manager skips an iteration already on disk
        checkpoints.save(t.state.iteration)

    state = trainer.train(train_iter, valid_batches, save_fn=save if cfg.checkpoint.save else None)
    summary = {"iteration": state.iteration, "losses": state.history, "skipped_iters": state.skipped_iters}
    memory = trainer.memory_report()
    per_rank = comm.all_gather_object(memory, group=ps.sdp_group) if ps.sdp_size > 1 else [memory]
    expected = zero_formula_bytes(num_params, cfg.parallel.zero_stage, ps.sdp_size)
    summary["memory"], summary["memory_formula"] = memory, expected
    logger.event("memory", rank=ps.rank, **memory, **{f"formula_{k}": v for k, v in expected.items()},
                 per_rank=per_rank, largest_param_numel=max(p.numel() for p in model.parameters()))
    logger.print("> bytes per rank, max over ranks (measured / ZeRO formula): " + ", ".join(
        f"{k.replace('_bytes', '')} {max(m[k] for m in per_rank) / 2**20:.2f} / {expected[k] / 2**20:.2f} MiB"
        for k in memory))
    if state.exit_reason is not None:  # checkpoint written by the loop; leave quickly and cleanly
        logger.event("done", iteration=state.iteration, stopped_by_signal=state.stopped_by_signal,
                     exit_reason=state.exit_reason)
        return summary
    if test_batches is not None and cfg.train.eval_iters > 0:
        loss = trainer.evaluate(test_batches())
        summary["test_loss"] = loss
        logger.evaluation("test", state.iteration, loss, state.consumed_samples,
                          state.consumed_tokens)
    if cfg.checkpoint.save:
        save(trainer)
    logger.event("done", **{k: v for k, v in summary.items() if k != "losses"})
    logger.print("> done: " + json.dumps({"iterations": state.iteration, "skipped": state.skipped_iters,
                                           "final_lm_loss": state.history[-1] if state.history else None}))
    return summary
