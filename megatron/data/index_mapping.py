"""Megatron's sample-index algorithms, vectorised with numpy.

Pure functions, no I/O. Each reproduces the corresponding Megatron step exactly (same
random stream, same arrays) so that a run started from a Megatron-DeepSpeed config sees
the same samples in the same order:

* `get_train_valid_test_split`: `--split 949,50,1` -> document boundaries.
* `num_epochs`, `build_doc_idx`, `build_sample_idx`, `build_shuffle_idx`,
  `build_index_mappings`: the GPT sample index (Megatron's `_build_index_mappings`,
  whose sample index is built by a C++ helper there; one `searchsorted` here).
* `build_blending_indices`: the greedy blend of several datasets by weight.

Samples are windows of the token stream obtained by concatenating the documents in
`doc_idx` order: sample i covers stream tokens [i*seq, i*seq + seq + 1), so consecutive
samples share one token (the last label of one is the first input of the next).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from megatron.config import ConfigError


def get_train_valid_test_split(splits_string: str, size: int) -> list[int]:
    """Document boundaries [0, a, b, size] of train/valid/test for `--split` ("949,50,1").

    Same rounding as Megatron: each part is round(fraction * size), then every
    boundary is shifted by the rounding excess so that the last one equals `size`.
    """
    sep = "," if "," in splits_string else ("/" if "/" in splits_string else None)
    try:
        parts = [float(s) for s in splits_string.split(sep)] if sep else [float(splits_string)]
    except ValueError as e:
        raise ConfigError(f"--split {splits_string!r} must be numbers separated by ',' or '/', e.g. 949,50,1") from e
    parts = (parts + [0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--split {splits_string!r} must be non-negative with a positive sum, e.g. 949,50,1")
    total = sum(parts)
    fractions = [p / total for p in parts]
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * float(size))))
    excess = bounds[-1] - size
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    assert len(bounds) == 4 and bounds[-1] == size
    return bounds


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs E with (E * tokens_per_epoch - 1) // seq_length >= num_samples.

    The -1: a sample needs seq_length + 1 tokens but shares its last one with the next.
    """
    if tokens_per_epoch < 1:
        raise ValueError("a split whose documents hold no tokens can never produce a sample")
    need = num_samples * seq_length + 1  # (E*T - 1)//seq >= N  <=>  E*T >= N*seq + 1
    return max(1, -(-need // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState,
                  separate_last_epoch: bool) -> np.ndarray:
    """`epochs` copies of `documents`, shuffled as one array (int32).

    With `separate_last_epoch`, the first epochs-1 copies are shuffled together and the
    last copy on its own afterwards, so that a partly used last epoch does not pull
    documents of later epochs forward.
    """
    if not separate_last_epoch or epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), epochs)  # [epochs * D]
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """[num_samples + 1, 2] int64: (position in doc_idx, token offset in that document) of
    the first token of every sample, plus the end of the last one.

    Megatron walks the documents in a C++ loop; the start of sample i is stream token
    i*seq, so one searchsorted over the cumulative document lengths finds every start
    at once. Empty documents are skipped exactly as the loop skips them (except the
    very first entry, which the loop always sets to (0, 0)).
    """
    n = (epochs * tokens_per_epoch - 1) // seq_length
    lengths = np.asarray(sizes)[doc_idx].astype(np.int64)  # [epochs * D]
    ends = np.cumsum(lengths)  # stream position one past each document
    if ends[-1] != epochs * tokens_per_epoch:
        raise ValueError("tokens_per_epoch does not match the document sizes of doc_idx")
    starts = np.arange(n + 1, dtype=np.int64) * seq_length  # [n + 1]
    which = np.searchsorted(ends, starts, side="right")  # first document ending after the token
    offset = starts - (ends[which] - lengths[which])
    sample_idx = np.stack([which, offset], axis=1)  # [n + 1, 2]
    sample_idx[0] = 0  # the loop starts at (0, 0) even when the first document is empty
    return sample_idx


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Shuffled [0, num_samples) followed by shuffled [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_index_mappings(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
                         seed: int):
    """(doc_idx, sample_idx, shuffle_idx, info) exactly as Megatron's `_build_index_mappings`.

    One RandomState(seed) is drawn from in order: doc_idx shuffle(s), then shuffle_idx.
    If more than one epoch is needed and the last one supplies fewer than 80% of an
    epoch's samples, that epoch is shuffled separately (doc_idx and shuffle_idx). A split
    shorter than one sample is simply repeated over as many epochs as the samples need.
    """
    documents = np.asarray(documents)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate_last_epoch = False
    from_full_epochs = 0
    if epochs > 1:
        from_full_epochs = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_samples = num_samples - from_full_epochs
        per_epoch = (tokens_per_epoch - 1) // seq_length
        # the last epoch can supply one sample more than per_epoch: its first sample may start
        # on the token the previous epochs' last sample ended on (Megatron checks `<=` too)
        assert 0 <= last_epoch_samples <= per_epoch + 1, (last_epoch_samples, per_epoch)
        separate_last_epoch = last_epoch_samples < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng, separate_last_epoch)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_idx(from_full_epochs if separate_last_epoch else total, total, rng)
    info = dict(tokens_per_epoch=tokens_per_epoch, num_epochs=epochs, separate_last_epoch=separate_last_epoch,
                num_samples=total)
    return doc_idx, sample_idx, shuffle_idx, info


# -- blending -----------------------------------------------------------------------------
# Megatron normalises blend weights twice, and the greedy loop below is sensitive to the
# last bit of a weight (near-ties flip), so both steps are reproduced as Megatron does them:
# 1. `--data-path` parsing divides by a Python float sum (added left to right from 0.0);
# 2. the blended dataset divides those weights again by their `np.sum` (float64).
def _check_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        bad = [float(x) for x in np.ravel(w) if not np.isfinite(x) or x < 0]
        why = f"{bad[0]} is not a finite non-negative number" if bad else "they sum to 0"
        raise ConfigError(f"blend weights must be finite and non-negative with a positive sum, got {list(weights)} "
                          f"({why}); fix the weights of --data-path 'W1 PREFIX1 W2 PREFIX2 ...'")
    return w


def normalize_data_path_weights(weights: Sequence[float]) -> list[float]:
    """Step 1: the weights of `--data-path` divided by their Python float sum."""
    _check_weights(weights)
    total = 0.0
    for w in weights:
        total += float(w)
    return [float(w) / total for w in weights]


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Step 2: float64 weights divided by their `np.sum` (what the blended dataset does)."""
    w = _check_weights(weights).copy()
    w /= np.sum(w)
    return w


def blend_weights(weights: Sequence[float]) -> np.ndarray:
    """The weights the greedy loop of a `--data-path` blend runs on: step 1, then step 2."""
    return normalize_weights(normalize_data_path_weights(weights))


def blending_num_samples(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples to build per dataset for a blend of `num_samples`: ceil(N * w * 1.005) with w
    from step 1, the 0.5% margin Megatron adds so the greedy blend never runs a dataset dry.
    Megatron's blend then holds the sum of these, a little more than N."""
    return [int(math.ceil(num_samples * w * 1.005)) for w in normalize_data_path_weights(weights)]


def _greedy_steps(w: list, counts: list, first: int, steps: int, kinds: np.ndarray, sample: np.ndarray) -> None:
    """Megatron's loop for steps [first, first+steps): give each step to the dataset whose
    count lags its target weight * max(step, 1) the most (first one on ties)."""
    K = len(w)
    for t in range(steps):
        i = first + t
        s = float(i) if i > 1 else 1.0
        best, best_err = 0, w[0] * s - counts[0]
        for k in range(1, K):
            err = w[k] * s - counts[k]
            if err > best_err:
                best, best_err = k, err
        kinds[i] = best
        sample[i] = counts[best]
        counts[best] += 1


def build_blending_indices_loop(weights: Sequence[float], size: int):
    """The straightforward greedy loop (reference; O(size * K) Python steps)."""
    w = [float(x) for x in weights]
    kinds = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    _greedy_steps(w, [0] * len(w), 0, size, kinds, sample)
    return kinds, sample


def build_blending_indices(weights: Sequence[float], size: int, window: int = 1024, warmup: int = 64):
    """(dataset_index int16, dataset_sample_index int64) identical to Megatron's greedy loop.

    The loop is sequential, but its state (the per-dataset counts at step i) forgets
    where it came from within a few steps: started from any nearby state, it falls onto
    the true trajectory. So the steps are cut into windows, every window is simulated at
    once (numpy over windows) from a guessed state `warmup` steps before its start, and
    the result is then checked: window j is exact iff its state at its start equals the
    exact end state of window j-1. Windows that fail are simulated again from that exact
    state until all agree, so the output never depends on the guess, only the speed does.
    """
    w = np.asarray(weights, dtype=np.float64)
    K = len(w)
    kinds = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    head = min(size, window)
    counts = [0] * K
    _greedy_steps([float(x) for x in w], counts, 0, head, kinds, sample)
    if size <= head:
        return kinds, sample
    starts = np.arange(head, size, window, dtype=np.int64)  # official first step of windows 1..
    # Guess the counts `warmup` steps before each window: largest-remainder share of the steps.
    origin = starts - warmup
    quota = w[None, :] * origin[:, None].astype(np.float64)  # [n_win, K]
    guess = np.floor(quota)
    short = origin - guess.sum(axis=1).astype(np.int64)  # steps not yet given to anyone
    rank = np.argsort(np.argsort(-(quota - guess), axis=1, kind="stable"), axis=1, kind="stable")
    guess += rank < short[:, None]
    start_state, end_state = _simulate_windows(w, origin, guess, warmup, window, size, kinds, sample)
    exact_before = np.asarray(counts, dtype=np.float64)  # exact state at starts[0]
    todo = np.arange(len(starts))
    while True:
        prev_end = np.vstack([exact_before[None, :], end_state[:-1]])  # [n_win, K]
        bad = np.flatnonzero(np.any(start_state != prev_end, axis=1))
        if len(bad) == 0:
            return kinds, sample
        todo = bad
        s0, s1 = _simulate_windows(w, starts[todo], prev_end[todo].copy(), 0, window, size, kinds, sample)
        start_state[todo], end_state[todo] = s0, s1


def _simulate_windows(w, origin, state, warmup, window, size, kinds, sample):
    """Run the greedy from `state` at steps `origin` for warmup+window steps, all windows
    in lockstep; write the steps after the warm-up. Returns the states at the first
    written step and after the last one ([n, K] each, float64 counts)."""
    n, K = state.shape
    rows = np.arange(n)
    at_start = state.copy()
    for t in range(warmup + window):
        step = origin + t  # [n]
        if t == warmup:
            at_start = state.copy()
        live = step < size
        if not live.any():
            break
        err = w[None, :] * np.maximum(step, 1).astype(np.float64)[:, None] - state  # [n, K]
        pick = np.argmax(err, axis=1)
        before = state[rows, pick]
        state[rows[live], pick[live]] += 1.0
        if t >= warmup:
            kinds[step[live]] = pick[live]
            sample[step[live]] = before[live]
    return at_start, state


__all__ = [
    "blend_weights",
    "blending_num_samples",
    "build_blending_indices",
    "build_blending_indices_loop",
    "build_doc_idx",
    "build_index_mappings",
    "build_sample_idx",
    "build_shuffle_idx",
    "get_train_valid_test_split",
    "normalize_data_path_weights",
    "normalize_weights",
    "num_epochs",
]
