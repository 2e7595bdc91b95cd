"""Per-rank batch streams for the loop, from megatron.data's datasets (or synthetic tokens).

Every rank of an SP group draws the same sample indices (same DP rank) and reads only its
own `seq/SP` slice of each sample (megatron.data.sharding). `--mock-data` replaces the
corpus with `megatron.data.mock.MockGPTDataset`.

Sizes and order are Megatron-DeepSpeed's (its training.build_train_valid_test_datasets and
build_train_valid_test_data_loaders), so a run sees upstream's samples in upstream's order:

* Sizes (`megatron.data.gpt_dataset.train_valid_test_num_samples`): train holds
  `--train-samples`, else train_iters x gbs; valid (train_iters // eval_interval + 1) x
  eval_iters x gbs; test eval_iters x gbs. train_iters is `--train-iters` (or
  `--train-samples // gbs`), not the `--train-tokens` cap, which only stops training.
* Training resumes at `consumed_samples`.
* Validation walks through its split: every evaluation reads the next window of
  E = eval_iters x gbs samples. Upstream's validation iterator advances one window per
  evaluation (one every eval_interval steps, one after the last step) and a resumed run
  starts at (iteration // eval_interval) x E. Here the window is a function of the
  iteration the evaluation runs at, max(0, (iteration - 1) // eval_interval): for every
  evaluation upstream runs it is upstream's window (the one at k x eval_interval reads
  window k - 1, the one after training window train_iters // eval_interval); the extra
  evaluation our loop runs before the first step reads window 0, which the evaluation at
  eval_interval reads again, as upstream's first does; and a resumed run reads the same
  windows as an uninterrupted one, with no counter in the checkpoint (consumed validation
  samples = (iteration // eval_interval) x E, upstream's formula for resuming).
  The iteration is the training stream's: `consumed_samples` at start plus what the
  training iterator has handed out, since the loop evaluates between steps;
  `valid_batches(iteration=i)` names it explicitly.
* Test: the first window of its split (upstream evaluates it once, from sample 0).
"""

from __future__ import annotations

import itertools

from megatron.config import RunConfig
from megatron.data.gpt_dataset import DatasetTooSmallError, train_valid_test_num_samples
from megatron.data.mock import MockGPTDataset
from megatron.data.tokenizers import build_tokenizer


def dataset_num_samples(cfg: RunConfig) -> tuple:
    """(train, valid, test) samples to build for this run, as Megatron sizes them."""
    t = cfg.train
    iters = t.train_iters if t.dataset_train_iters is None else t.dataset_train_iters
    return train_valid_test_num_samples(iters, t.global_batch_size, t.eval_interval, t.eval_iters,
                                        train_samples=t.train_samples)


def _datasets(cfg: RunConfig, eod: int, num_samples: tuple):
    d = cfg.data
    if d.mock_data:
        vocab = d.vocab_size if d.tokenizer_type == "NullTokenizer" else cfg.model.vocab_size - 1
        return tuple(MockGPTDataset(name, n, d.seq_length, vocab, eod, cfg.train.seed) if n else None
                     for name, n in zip(("train", "valid", "test"), num_samples))
    from megatron.data.gpt_dataset import build_train_valid_test_datasets  # noqa: PLC0415

    needs_eod = d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss
    return build_train_valid_test_datasets(list(d.data_path), d.split, d.seq_length, num_samples, cfg.train.seed,
                                           cache_dir=d.data_cache_path, eod_token=eod if needs_eod else None,
                                           vocab_size=cfg.model.vocab_size)


class TrainStream:
    """The training iterator: micro-batches for this rank; counts the samples handed out
    over all DP ranks (`consumed_samples`), which places validation windows."""

    def __init__(self, batches, consumed_samples: int, samples_per_micro_batch: int) -> None:
        self._batches = batches
        self.consumed_samples = consumed_samples
        self._step = samples_per_micro_batch

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self._batches)
        except StopIteration:
            raise DatasetTooSmallError(
                f"the training data ran out after {self.consumed_samples} samples: the train split was built for "
                "fewer samples than this run trains (was --train-iters/--train-samples raised on resume?); "
                "check --train-iters/--train-samples and --split") from None
        self.consumed_samples += self._step
        return batch


class EvalBatches:
    """`batches(iteration=None)` -> the evaluation's global batches (lists of micro-batches).

    `window=None` (validation): the window of `iteration` (default: the training stream's),
    see the module docstring; an int: always that window (test)."""

    def __init__(self, cfg: RunConfig, dataset, stream: dict, train: TrainStream | None, window: int | None) -> None:
        self.cfg, self.dataset, self.stream, self.train, self.window = cfg, dataset, stream, train, window
        self.samples_per_eval = cfg.train.eval_iters * cfg.train.global_batch_size

    def window_of(self, iteration: int) -> int:
        return max(0, (iteration - 1) // self.cfg.train.eval_interval)

    def __call__(self, iteration: int | None = None) -> list:
        from megatron.data.sharding import sp_batch_iterator  # noqa: PLC0415

        t = self.cfg.train
        if self.window is not None:
            window = self.window
        else:
            if iteration is None:
                iteration = self.train.consumed_samples // t.global_batch_size if self.train is not None else 0
            window = self.window_of(iteration)
        start = window * self.samples_per_eval
        stop = start + self.samples_per_eval
        if stop > len(self.dataset):
            raise DatasetTooSmallError(
                f"evaluation at iteration {iteration} needs {self.dataset.name} samples [{start}, {stop}) but the "
                f"split was built with {len(self.dataset)}; it is sized for --train-iters {t.train_iters} / "
                f"--eval-interval {t.eval_interval}: raise --train-iters (or --train-samples)")
        it = sp_batch_iterator(self.dataset, consumed_samples=start, total_samples=stop, **self.stream)
        per_step = self.cfg.num_micro_batches
        return [list(itertools.islice(it, per_step)) for _ in range(t.eval_iters)]


def build_data_iterators(cfg: RunConfig, parallel_state, consumed_samples: int):
    """(train iterator of micro-batch dicts, valid_batches, test_batches); the last two are
    `EvalBatches` (call for an evaluation's global batches) or None."""
    from megatron.data.sharding import sp_batch_iterator  # noqa: PLC0415

    d, t, ps = cfg.data, cfg.train, parallel_state
    eod = build_tokenizer(d).eod
    n_train, n_valid, n_test = dataset_num_samples(cfg)
    train_ds, valid_ds, test_ds = _datasets(cfg, eod, (n_train, n_valid, n_test))
    stream = dict(micro_batch_size=t.micro_batch_size, data_parallel_rank=ps.dp_rank,
                  data_parallel_size=ps.dp_size, seq_length=d.seq_length, sp_rank=ps.sp_rank, sp_size=ps.sp_size,
                  eod_token=eod, reset_position_ids=d.reset_position_ids,
                  reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss,
                  ring_size=getattr(ps, "ring_size", 1), vocab_size=cfg.model.vocab_size)
    if train_ds is None and n_train > 0 and consumed_samples < n_train:
        raise DatasetTooSmallError(
            f"the train split of --data-path {' '.join(d.data_path)} is empty: --split {d.split} gives it no "
            "documents; give training a positive share of --split (e.g. 949,50,1) or use more data")
    if train_ds is None or consumed_samples >= n_train:
        batches = iter(())
    else:
        batches = sp_batch_iterator(train_ds, consumed_samples=consumed_samples, total_samples=n_train, **stream)
    train = TrainStream(batches, consumed_samples, t.micro_batch_size * ps.dp_size)
    evals = t.eval_iters * t.global_batch_size > 0
    valid = EvalBatches(cfg, valid_ds, stream, train, None) if valid_ds is not None and evals else None
    test = EvalBatches(cfg, test_ds, stream, None, 0) if test_ds is not None and evals else None
    return train, valid, test


__all__ = ["EvalBatches", "MockGPTDataset", "TrainStream", "build_data_iterators", "dataset_num_samples"]
