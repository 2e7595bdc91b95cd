"""GPT pretraining datasets with Megatron's semantics, readable one slice at a time.

`build_train_valid_test_datasets` takes Megatron's `--data-path` list (one prefix, or
`weight prefix weight prefix ...`), `--split`, `--seq-length`, the per-split sample
counts and `--seed`, and returns train/valid/test datasets (None for an empty split).

A dataset is a sequence of samples of seq_length + 1 tokens. Besides Megatron's
`ds[i] -> {"text": int64[seq_length + 1]}` it offers what a sequence-parallel rank needs
to read only its own part of a sample:

* `get_slice(idx, start, stop)`: tokens [start, stop) of sample idx, read from the
  memory map piece by piece (the rest of the sample is never touched);
* `pieces(idx)`: the (global token offset, length) of each document piece that makes up
  the sample, from the index arrays alone;
* `eods_before(idx, pos, eod)`: how many EOD tokens the sample has before position
  `pos`, and where the last one is, answered from `pieces` and the EOD offset table
  (megatron.data.eod_index) without reading tokens.

Index arrays (doc_idx, sample_idx, shuffle_idx, blending indices) are cached as `.npy`
next to the data (or in `cache_dir`) under a hash of everything that determines them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from megatron.config import ConfigError, UserError
from megatron.data.cache import _dist, cached_arrays, describe_file
from megatron.data.checks import check_token_ids
from megatron.data.eod_index import count_in_ranges, get_eod_positions
from megatron.data.index_mapping import (
    blending_num_samples,
    build_blending_indices,
    build_index_mappings,
    get_train_valid_test_split,
    normalize_data_path_weights,
    normalize_weights,
)
from megatron.data.indexed_dataset import MMapIndexedDataset, index_file_path

INDEX_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")


class DatasetTooSmallError(UserError, ValueError):
    """A split (or blend) that cannot supply the samples asked of it."""


def _log(msg: str) -> None:
    dist = _dist()
    if dist is None or dist.get_rank() == 0:
        print(msg, flush=True)


class GPTDataset:
    """Samples of `seq_length + 1` tokens over `documents` (sequence ids) of `indexed`."""

    def __init__(self, name: str, indexed: MMapIndexedDataset, documents: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, *, cache_dir: str | None = None, eod_mode: str = "scan",
                 collective: bool = True) -> None:
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) == 0:
            raise DatasetTooSmallError(f"the {name} split of {indexed.path_prefix} has no documents: use more data "
                                       "or give this split a larger share of --split")
        if documents.min() < 0 or documents.max() >= len(indexed):
            raise ValueError(f"{name}: document ids out of range [0, {len(indexed)})")
        if seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {seq_length}")
        self.name = name
        self.indexed = indexed
        self.seq_length = int(seq_length)
        self.cache_dir = cache_dir
        self.eod_mode = eod_mode
        if num_samples < 0:
            raise ValueError(f"{name}: num_samples must be >= 0, got {num_samples}")
        tokens_per_epoch = int(indexed.sizes[documents].sum(dtype=np.int64))
        if tokens_per_epoch == 0:
            # Megatron would loop forever looking for enough epochs
            raise DatasetTooSmallError(
                f"the {name} split of {indexed.path_prefix} ({len(documents)} documents) holds no tokens, so it "
                "can never fill a sample: use more data or give this split a larger share of --split")
        # A split shorter than one sample (seq_length + 1 tokens) is repeated over as many
        # epochs as needed, as in Megatron.
        description = {
            "kind": "gpt_index", "version": INDEX_VERSION, "name": name, "idx": describe_file(index_file_path(
                indexed.path_prefix)), "documents": [int(documents[0]), int(documents[-1]), len(documents),
                                                     hashlib.md5(documents.tobytes()).hexdigest()],
            "num_samples": int(num_samples), "seq_length": int(seq_length), "seed": int(seed),
        }
        folder = cache_dir if cache_dir is not None else os.path.dirname(os.path.abspath(indexed.path_prefix))
        stem = f"{os.path.basename(indexed.path_prefix)}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
        info = {}

        def build():
            doc_idx, sample_idx, shuffle_idx, meta = build_index_mappings(
                documents, indexed.sizes, int(num_samples), int(seq_length), int(seed))
            info.update(meta)
            return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

        arrays = cached_arrays(folder, stem, description, ("doc_idx", "sample_idx", "shuffle_idx"), build,
                               collective=collective, log=_log)
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]
        self.num_epochs = -(-len(self.doc_idx) // len(documents))
        if info:
            _log(f" > {name}: {len(self)} samples of {seq_length + 1} tokens over {info['num_epochs']} epochs "
                 f"of {len(documents)} documents ({tokens_per_epoch} tokens each)"
                 f"{', last epoch shuffled separately' if info['separate_last_epoch'] else ''}")

    def __len__(self) -> int:
        # sample i spans sample_idx[i] .. sample_idx[i + 1], hence the -1
        return self.sample_idx.shape[0] - 1

    def _check(self, idx: int) -> int:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
        return int(self.shuffle_idx[idx])

    def source(self, idx: int) -> str:
        """Where sample `idx` comes from, for error messages."""
        return f"sample {idx} of the {self.name} split of {self.indexed.path_prefix!r}"

    def pieces(self, idx: int):
        """(global token offsets int64[m], lengths int64[m]) of the document pieces that,
        concatenated, form sample `idx` (after shuffling). Index arrays only."""
        j = self._check(idx)
        d0, o0 = (int(x) for x in self.sample_idx[j])
        d1, o1 = (int(x) for x in self.sample_idx[j + 1])
        docs = self.doc_idx[d0:d1 + 1]
        lengths = self.indexed.sizes[docs].astype(np.int64)
        lengths[-1] = o1 + 1  # the last piece ends at the sample's last token (inclusive)
        lengths[0] -= o0  # the first piece starts o0 tokens into its document
        starts = self.indexed.pointers[docs] // np.dtype(self.indexed.dtype).itemsize
        starts[0] += o0
        return starts, lengths

    def get_slice(self, idx: int, start: int, stop: int) -> np.ndarray:
        """int64 tokens [start, stop) of sample idx; only those tokens are read."""
        if not 0 <= start <= stop <= self.seq_length + 1:
            raise IndexError(f"slice [{start}, {stop}) outside a sample of {self.seq_length + 1} tokens")
        starts, lengths = self.pieces(idx)
        ends = np.cumsum(lengths)  # sample position one past each piece
        begins = ends - lengths
        out = np.empty(stop - start, dtype=np.int64)
        tokens = self.indexed.tokens
        for p in np.flatnonzero((begins < stop) & (ends > start)):
            a, b = max(start, int(begins[p])), min(stop, int(ends[p]))
            g = int(starts[p]) + a - int(begins[p])
            out[a - start:b - start] = tokens[g:g + b - a]
        return out

    def eods_before(self, idx: int, pos: int, eod: int):
        """(number of EOD tokens at sample positions < pos, position of the last one or -1),
        from the index and the EOD table only (see megatron.data.eod_index)."""
        if pos <= 0:
            return 0, -1
        table = get_eod_positions(self.indexed, eod, self.eod_mode, self.cache_dir)
        starts, lengths = self.pieces(idx)
        begins = np.cumsum(lengths) - lengths
        keep = begins < pos
        starts, lengths, begins = starts[keep], lengths[keep], begins[keep]
        stops = starts + np.minimum(lengths, pos - begins)
        counts, last = count_in_ranges(table, starts, stops)
        total = int(counts.sum())
        if total == 0:
            return 0, -1
        p = int(np.flatnonzero(counts)[-1])
        return total, int(begins[p] + last[p] - starts[p])

    def eod_positions(self, idx: int, stop: int, eod: int) -> np.ndarray:
        """Sample positions < stop that hold an EOD token (int64, ascending), from the index and
        the EOD table only: what a rank needs for the document boundaries of the whole sample."""
        table = get_eod_positions(self.indexed, eod, self.eod_mode, self.cache_dir)
        starts, lengths = self.pieces(idx)
        begins = np.cumsum(lengths) - lengths
        keep = begins < stop
        starts, lengths, begins = starts[keep], lengths[keep], begins[keep]
        stops = starts + np.minimum(lengths, stop - begins)
        lo = np.searchsorted(table, starts, side="left")
        hi = np.searchsorted(table, stops, side="left")
        return np.concatenate([table[a:b] - s + o for a, b, s, o in zip(lo, hi, starts, begins)]
                              or [np.zeros(0, dtype=np.int64)]).astype(np.int64)

    def prepare_eod(self, eod: int, collective: bool = True) -> None:
        """Build (or load) the EOD table now, rank 0 first, instead of lazily in a step."""
        get_eod_positions(self.indexed, eod, self.eod_mode, self.cache_dir, collective=collective)

    def __getitem__(self, idx: int) -> dict:
        return {"text": self.get_slice(int(idx), 0, self.seq_length + 1)}


class BlendedDataset:
    """Samples drawn from several datasets in Megatron's greedy proportions."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, *, cache_dir: str | None = None,
                 collective: bool = True, check_samples: int | None = None) -> None:
        """`weights` are normalised by their np.sum here, as Megatron's BlendableDataset does;
        `build_train_valid_test_datasets` passes the `--data-path` weights already divided by
        their Python sum, so that the greedy loop sees Megatron's weights to the last bit.
        The first `check_samples` samples (default: all) are checked to exist now; a later
        one that does not raises IndexError when read."""
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset")
        if len(datasets) >= 32767:
            raise ConfigError("at most 32766 datasets can be blended (int16 dataset index); merge some prefixes "
                              "with tools/merge_datasets.py")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.seq_length = self.datasets[0].seq_length
        description = {"kind": "blend", "version": INDEX_VERSION, "weights": [float(w) for w in self.weights],
                       "size": self.size,
                       "datasets": [[d.name, os.path.realpath(d.indexed.path_prefix), len(d)] for d in datasets]}
        first = self.datasets[0].indexed.path_prefix
        folder = cache_dir if cache_dir is not None else os.path.dirname(os.path.abspath(first))
        stem = f"blend_{self.datasets[0].name}_{self.size}ns"

        def build():
            kinds, samples = build_blending_indices(self.weights, self.size)
            return {"dataset_index": kinds, "dataset_sample_index": samples}

        arrays = cached_arrays(folder, stem, description, ("dataset_index", "dataset_sample_index"), build,
                               collective=collective, log=_log)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self.counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        self.check_readable(self.size if check_samples is None else min(int(check_samples), self.size))
        _log(f" > blended {self.datasets[0].name}: {self.size} samples, per dataset {self.counts.tolist()} "
             f"(weights {np.round(self.weights, 4).tolist()})")

    def check_readable(self, num_samples: int) -> None:
        """Raise unless blend samples [0, num_samples) all exist in their datasets."""
        counts = np.bincount(self.dataset_index[:num_samples], minlength=len(self.datasets))
        for k, d in enumerate(self.datasets):
            if counts[k] > len(d):
                raise DatasetTooSmallError(
                    f"the first {num_samples} samples of the blend need {counts[k]} samples from "
                    f"{d.indexed.path_prefix} ({d.name} split) but it was built with {len(d)}: give that dataset "
                    "more documents in this split (--split), or build it for more samples (a zero-weight dataset "
                    "of a --data-path blend still supplies a sample when it comes first among ties)")

    def __len__(self) -> int:
        return self.size

    def _where(self, idx: int):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size} samples")
        return self.datasets[int(self.dataset_index[idx])], int(self.dataset_sample_index[idx])

    def get_slice(self, idx: int, start: int, stop: int) -> np.ndarray:
        ds, i = self._where(idx)
        return ds.get_slice(i, start, stop)

    def source(self, idx: int) -> str:
        ds, i = self._where(idx)
        return f"{ds.source(i)} (sample {idx} of the blend)"

    def pieces(self, idx: int):
        ds, i = self._where(idx)
        return ds.pieces(i)

    def eods_before(self, idx: int, pos: int, eod: int):
        ds, i = self._where(idx)
        return ds.eods_before(i, pos, eod)

    def eod_positions(self, idx: int, stop: int, eod: int) -> np.ndarray:
        ds, i = self._where(idx)
        return ds.eod_positions(i, stop, eod)

    def prepare_eod(self, eod: int, collective: bool = True) -> None:
        for d in self.datasets:
            d.prepare_eod(eod, collective)

    def __getitem__(self, idx: int) -> dict:
        ds, i = self._where(int(idx))
        return {"dataset_id": self.dataset_index[idx], **ds[i]}


def parse_data_prefix(data_prefix: str | Sequence[str]):
    """Megatron's `--data-path`: `[prefix]` or `[w1, prefix1, w2, prefix2, ...]` -> (weights, prefixes)."""
    items = [data_prefix] if isinstance(data_prefix, str) else [str(x) for x in data_prefix]
    if len(items) == 1:
        return [1.0], items
    if len(items) % 2:
        raise ConfigError(f"--data-path with several datasets must alternate weight and prefix ('W1 PREFIX1 W2 "
                          f"PREFIX2 ...'), got {len(items)} words: {items}; give every prefix a weight, or pass "
                          "a single prefix")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(w))
        except ValueError as e:
            raise ConfigError(f"--data-path: {w!r} is not a weight (expected 'weight prefix' pairs, e.g. "
                              f"--data-path 0.7 {w} 0.3 OTHER_PREFIX)") from e
        prefixes.append(p.strip())
    normalize_data_path_weights(weights)  # validates
    return weights, prefixes


def _split_datasets(prefix, split, seq_length, num_samples, seed, cache_dir, eod_mode, build_empty=False,
                    vocab_size=None):
    """GPTDataset per split of one prefix; None for a split without documents, or (unless
    `build_empty`, which blend components need) one asked for no samples."""
    indexed = MMapIndexedDataset(prefix)
    if vocab_size is not None:
        check_token_ids(indexed, vocab_size)
    bounds = get_train_valid_test_split(split, len(indexed))
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        n = num_samples[i]
        if bounds[i + 1] <= bounds[i] or n is None or (n <= 0 and not build_empty):
            out.append(None)
            continue
        docs = np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
        out.append(GPTDataset(name, indexed, docs, n, seq_length, seed, cache_dir=cache_dir, eod_mode=eod_mode))
    return out


def build_train_valid_test_datasets(data_prefix, split: str, seq_length: int,
                                    train_valid_test_num_samples: Sequence[int], seed: int, *,
                                    cache_dir: str | None = None, eod_token: int | None = None,
                                    eod_mode: str = "scan", vocab_size: int | None = None):
    """(train, valid, test) datasets for Megatron's `--data-path`, `--split`, `--seq-length`, `--seed`.

    A split is None when it has no documents or 0 samples are asked of it. With several
    weighted prefixes, each builds ceil(N * w * 1.005) samples per split (a zero weight
    builds one epoch: the greedy blend still takes a sample from it) and, as in Megatron,
    the blend holds the sum of those, a little more than N; its first N samples are
    checked to exist. `eod_token` builds the EOD tables now (needed for
    reset_position_ids / reset_attention_mask under sequence parallelism) so that no
    training step pays for it. `vocab_size` checks a sample of each dataset's tokens against the
    model's vocabulary (megatron.data.checks.check_token_ids). Call on every rank: rank 0
    builds caches, others wait.
    """
    items = [data_prefix] if isinstance(data_prefix, str) else [str(x) for x in data_prefix]
    weights, prefixes = parse_data_prefix(items)
    nums = list(train_valid_test_num_samples)
    if len(nums) != 3:
        raise ValueError("train_valid_test_num_samples must have three entries")
    if len(items) == 1:
        result = _split_datasets(prefixes[0], split, seq_length, nums, seed, cache_dir, eod_mode,
                                 vocab_size=vocab_size)
    else:  # a blend, even of one weighted prefix ("1.0 PREFIX" builds 1.005 N samples, as in Megatron)
        weights = normalize_data_path_weights(weights)  # Megatron's first normalisation
        per_dataset = [blending_num_samples(weights, n or 0) for n in nums]  # [split][dataset]
        parts = [_split_datasets(p, split, seq_length, [per_dataset[s][k] if nums[s] else None for s in range(3)],
                                 seed, cache_dir, eod_mode, build_empty=True, vocab_size=vocab_size)
                 for k, p in enumerate(prefixes)]
        result = []
        for s, name in enumerate(SPLIT_NAMES):
            comps = [parts[k][s] for k in range(len(prefixes))]
            if not nums[s] or all(c is None for c in comps):
                result.append(None)
                continue
            missing = [prefixes[k] for k, c in enumerate(comps) if c is None]
            if missing:
                raise DatasetTooSmallError(
                    f"the {name} split is empty for {missing} under --split {split}; every blended dataset "
                    "needs documents in each split that is used")
            result.append(BlendedDataset(comps, weights, sum(per_dataset[s]), cache_dir=cache_dir,
                                         check_samples=nums[s]))
    if eod_token is not None:
        for ds in result:
            if ds is not None:
                ds.prepare_eod(eod_token)
    return tuple(result)


def train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int,
                                 eval_iters: int, train_samples: int | None = None) -> tuple:
    """The samples Megatron asks of each split (its training.build_train_valid_test_datasets):

    * train: `--train-samples` when given, else train_iters * gbs;
    * valid: (train_iters // eval_interval + 1) * eval_iters * gbs, one window of
      eval_iters global batches per evaluation (every eval_interval, and one at the end);
    * test: eval_iters * gbs.

    `train_iters` is Megatron's: `--train-iters`, or `--train-samples // gbs`.
    """
    evals = (train_iters // eval_interval + 1) * eval_iters
    train = train_samples if train_samples else train_iters * global_batch_size
    return train, evals * global_batch_size, eval_iters * global_batch_size


__all__ = ["BlendedDataset", "DatasetTooSmallError", "GPTDataset", "build_train_valid_test_datasets",
           "parse_data_prefix", "train_valid_test_num_samples"]
