"""Per-rank batch streams for the loop, from megatron.data's datasets (or synthetic tokens).

Every rank of an SP group draws the same sample indices (same DP rank) and reads only its
own `seq/SP` slice of each sample (megatron.data.sharding). The training stream resumes
at `consumed_samples`; validation and test use the same first `eval_iters` global batches
of their split at every evaluation, so successive validation losses are comparable.

`--mock-data` replaces the corpus with `MockGPTDataset`: deterministic synthetic documents
(runs of consecutive token ids from a random start, each ended by EOD), so a model can
learn them and loss curves fall, with no files at all. It has the dataset interface the
SP batch builder reads (`get_slice`, `eods_before`), so every data flag works with it.
"""

from __future__ import annotations

import itertools

import numpy as np

from megatron.config import RunConfig

_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


class MockGPTDataset:
    """`num_samples` synthetic samples of seq_length + 1 tokens (ids < vocab_size, EOD = eod)."""

    def __init__(self, name: str, num_samples: int, seq_length: int, vocab_size: int, eod: int, seed: int) -> None:
        self.name, self.num_samples, self.seq_length = name, int(num_samples), int(seq_length)
        self.vocab_size, self.eod, self.seed = int(vocab_size), int(eod), int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def _sample(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for mock {self.name} dataset of {self.num_samples}")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.name], idx])
        n, out, filled = self.seq_length + 1, np.empty(self.seq_length + 1, dtype=np.int64), 0
        while filled < n:
            length = int(rng.integers(1, max(2, self.seq_length // 2)))
            doc = (int(rng.integers(self.vocab_size)) + np.arange(length, dtype=np.int64)) % self.vocab_size
            doc = np.append(doc, self.eod)[: n - filled]
            out[filled:filled + len(doc)] = doc
            filled += len(doc)
        return out

    def get_slice(self, idx: int, start: int, stop: int) -> np.ndarray:
        return self._sample(int(idx))[start:stop]

    def eods_before(self, idx: int, pos: int, eod: int):
        where = np.flatnonzero(self._sample(int(idx))[:max(pos, 0)] == eod)
        return (len(where), int(where[-1])) if len(where) else (0, -1)

    def __getitem__(self, idx: int) -> dict:
        return {"text": self._sample(int(idx))}


def _datasets(cfg: RunConfig, eod: int, num_samples: tuple):
    d = cfg.data
    if d.mock_data:
        vocab = d.vocab_size if d.tokenizer_type == "NullTokenizer" else cfg.model.vocab_size - 1
        return tuple(MockGPTDataset(name, n, d.seq_length, vocab, eod, cfg.train.seed) if n else None
                     for name, n in zip(("train", "valid", "test"), num_samples))
    from megatron.data.gpt_dataset import build_train_valid_test_datasets  # noqa: PLC0415

    needs_eod = d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss
    return build_train_valid_test_datasets(list(d.data_path), d.split, d.seq_length, num_samples, cfg.train.seed,
                                           cache_dir=d.data_cache_path, eod_token=eod if needs_eod else None)


def build_data_iterators(cfg: RunConfig, parallel_state, consumed_samples: int):
    """(train iterator of micro-batch dicts, valid_batches(), test_batches()); the last two
    return a fresh list of global batches (lists of micro-batches) or are None."""
    from megatron.arguments import build_tokenizer  # noqa: PLC0415
    from megatron.data.sharding import sp_batch_iterator  # noqa: PLC0415

    d, t, ps = cfg.data, cfg.train, parallel_state
    eod = build_tokenizer(d).eod
    n_train = t.train_iters * t.global_batch_size
    n_eval = t.eval_iters * t.global_batch_size
    train_ds, valid_ds, test_ds = _datasets(cfg, eod, (n_train, n_eval, n_eval))
    stream = dict(micro_batch_size=t.micro_batch_size, data_parallel_rank=ps.dp_rank,
                  data_parallel_size=ps.dp_size, seq_length=d.seq_length, sp_rank=ps.sp_rank, sp_size=ps.sp_size,
                  eod_token=eod, reset_position_ids=d.reset_position_ids,
                  reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss,
                  ring_size=getattr(ps, "ring_size", 1))
    if train_ds is None or consumed_samples >= n_train:
        train = iter(())
    else:
        train = sp_batch_iterator(train_ds, consumed_samples=consumed_samples, total_samples=n_train, **stream)

    def eval_batches(ds):
        if ds is None or n_eval == 0:
            return None

        def batches():
            it = sp_batch_iterator(ds, consumed_samples=0, total_samples=n_eval, **stream)
            per_step = cfg.num_micro_batches
            return [list(itertools.islice(it, per_step)) for _ in range(t.eval_iters)]
        return batches

    return train, eval_batches(valid_ds), eval_batches(test_ds)
