"""The periodic long-context evaluation of a training run (`--long-context-eval-interval N`).

Every N steps the training model itself (SP-sharded, DDP/FSDP-wrapped, under the run's autocast)
computes loss by position at `--seq-length` over a few held-out long documents and, with a text
tokenizer, passkey retrieval; the numbers go to the console, the JSON log (`long_context`
events) and TensorBoard / W&B as `long-context/*` scalars, the same tags the offline tool
writes (megatron/inference/reports.py).
"""

from __future__ import annotations

import time


class LongContextEvalHook:
    """`hook(trainer)`: evaluate `trainer.model` now and log the result at `trainer.state.iteration`."""

    def __init__(self, cfg, parallel_state, device, logger) -> None:
        from megatron.inference.long_context import long_documents  # noqa: PLC0415

        self.cfg, self.ps, self.device, self.logger = cfg, parallel_state, device, logger
        t = cfg.train
        n = cfg.data.seq_length
        self.documents = long_documents(t.long_context_eval_data, n + 1, t.long_context_eval_documents)
        self.task = None
        if t.long_context_eval_passkey_lengths:
            from megatron.data.tokenizers import build_tokenizer  # noqa: PLC0415
            from megatron.inference.long_context import PasskeyTask  # noqa: PLC0415

            self.task = PasskeyTask.from_tokenizer(build_tokenizer(cfg.data))
        logger.print(f"> long-context evaluation every {t.long_context_eval_interval} steps: loss by position at "
                     f"{n} tokens over {len(self.documents)} documents of {t.long_context_eval_data}"
                     + (f", passkey at {list(t.long_context_eval_passkey_lengths)}" if self.task else ""))

    def __call__(self, trainer) -> dict:
        from megatron.inference.long_context import LongContextEvaluator  # noqa: PLC0415
        from megatron.inference.reports import scalars  # noqa: PLC0415
        from megatron.training.precision import autocast_context  # noqa: PLC0415
        from megatron.training.training import _reshard_fsdp  # noqa: PLC0415

        cfg, it = self.cfg, trainer.state.iteration
        start = time.perf_counter()
        evaluator = LongContextEvaluator(trainer.model, self.ps, self.device, show_progress=False)
        with autocast_context(cfg.optim, self.device.type):
            result = {"loss_by_position": evaluator.loss_by_position(self.documents, cfg.data.seq_length)}
            if self.task is not None:
                result["passkey"] = evaluator.passkey(self.task, list(cfg.train.long_context_eval_passkey_lengths),
                                                      [0.0, 0.5, 1.0], trials=2, seed=it)
        _reshard_fsdp(trainer.model)
        for tag, value in scalars(result).items():
            self.logger.scalar(tag, value, it)
        lp = result["loss_by_position"]
        summary = {"loss": lp["overall_loss"], "loss_by_bucket": lp["mean_loss"], "bucket_edges": lp["bucket_edges"]}
        if "passkey" in result:
            summary["passkey_accuracy"] = result["passkey"]["mean_accuracy"]
        self.logger.event("long_context", iteration=it, **summary)
        first, last = lp["mean_loss"][0], lp["mean_loss"][-1]
        self.logger.print(f" long-context eval at iteration {it} | loss {lp['overall_loss']:.4f} | first bucket "
                          f"{first:.4f} | last bucket {last:.4f}"
                          + (f" | passkey {summary['passkey_accuracy']:.2f}" if "passkey" in result else "")
                          + f" | {time.perf_counter() - start:.1f} s")
        return result
