"""Slow, literal re-statements of Megatron's algorithms, used as test oracles.

Written as plainly as possible (loops over tokens and documents), independent of the
vectorised code under test. Each follows microsoft/Megatron-DeepSpeed at
`UPSTREAM_COMMIT` step by step, in the same arithmetic (float sums in the same order,
the same RandomState calls); the function it restates is named in its docstring.
"""

from __future__ import annotations

import math

import numpy as np
import torch

UPSTREAM_COMMIT = "f4157bea69f3df8c6cb66f2ebcda66ba03d1288e"  # microsoft/Megatron-DeepSpeed, Dec 2024


# -- splits and sizes --------------------------------------------------------------------------
def split_bounds(splits_string, size):
    """dataset_utils.get_train_valid_test_split_: document boundaries of train/valid/test."""
    if "," in splits_string:
        parts = [float(x) for x in splits_string.split(",")]
    elif "/" in splits_string:
        parts = [float(x) for x in splits_string.split("/")]
    else:
        parts = [float(splits_string)]
    while len(parts) < 3:
        parts.append(0.0)
    parts = parts[:3]
    total = sum(parts)
    parts = [p / total for p in parts]
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + int(round(p * float(size))))
    shift = bounds[-1] - size
    return [bounds[0]] + [b - shift for b in bounds[1:]]


def datasets_num_samples(train_iters, global_batch_size, eval_interval, eval_iters, train_samples=None):
    """training.build_train_valid_test_datasets: samples asked of train, valid and test.
    `train_iters` is upstream's args.train_iters (with --train-samples: train_samples // gbs)."""
    train = train_samples if train_samples else train_iters * global_batch_size
    valid_iters = (train_iters // eval_interval + 1) * eval_iters
    return [train, valid_iters * global_batch_size, eval_iters * global_batch_size]


def consumed_valid_samples_on_resume(iteration, global_batch_size, eval_interval, eval_iters):
    """training.build_train_valid_test_data_loaders: validation samples already used by a run
    resumed at `iteration` (what upstream's checkpoint stores when evaluation ran on schedule)."""
    return (iteration // eval_interval) * eval_iters * global_batch_size


def sampler_batches(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size):
    """data_samplers.MegatronPretrainingSampler: this DP rank's micro-batches, drop_last."""
    out, batch = [], []
    for i in range(consumed_samples, total_samples):
        batch.append(i)
        if len(batch) == micro_batch_size * dp_size:
            out.append(batch[dp_rank * micro_batch_size:(dp_rank + 1) * micro_batch_size])
            batch = []
    return out


# -- the GPT sample index ----------------------------------------------------------------------
def epochs_needed(tokens_per_epoch, seq_length, num_samples):
    """gpt_dataset._num_epochs: add epochs until they hold num_samples samples."""
    epochs, tokens = 0, 0
    while True:
        epochs += 1
        tokens += tokens_per_epoch
        if (tokens - 1) // seq_length >= num_samples:
            return epochs


def doc_idx_ref(documents, epochs, rng, separate_last_epoch):
    """gpt_dataset._build_doc_idx: the documents repeated per epoch, shuffled (last epoch alone
    when separate_last_epoch)."""
    if separate_last_epoch and epochs > 1:
        head = doc_idx_ref(documents, epochs - 1, rng, False)
        tail = doc_idx_ref(documents, 1, rng, False)
        return np.concatenate((head, tail))
    flat = []
    for _ in range(epochs):
        flat.extend(int(d) for d in documents)
    out = np.array(flat, dtype=np.int32)
    rng.shuffle(out)
    return out


def shuffle_idx_ref(num_samples, total_size, rng):
    """gpt_dataset._build_shuffle_idx: [0, num_samples) and [num_samples, total_size), each shuffled."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    rest = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(rest)
    return np.concatenate((first, rest))


def index_mappings_ref(documents, sizes, num_samples, seq_length, seed):
    """gpt_dataset._build_index_mappings (without the cache): doc_idx, sample_idx, shuffle_idx
    and whether the last epoch was shuffled separately."""
    tokens_per_epoch = int(np.sum(sizes[documents]))
    epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate = False
    before_last = None
    if epochs > 1:
        before_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        last = num_samples - before_last
        per_epoch = (tokens_per_epoch - 1) // seq_length
        assert 0 <= last <= per_epoch + 1
        separate = last < int(0.80 * per_epoch)
    doc_idx = doc_idx_ref(documents, epochs, rng, separate)
    sample_idx = sample_idx_loop(sizes, doc_idx, seq_length, epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    shuffle_idx = shuffle_idx_ref(before_last if separate else total, total, rng)
    return doc_idx, sample_idx, shuffle_idx, separate


# -- blending ----------------------------------------------------------------------------------
def weights_and_num_samples(data_prefix, num_samples):
    """dataset_utils.get_datasets_weights_and_num_samples: prefixes, weights divided by their
    Python float sum, and ceil(N * w * 1.005) samples per dataset for each N in num_samples."""
    weights = [float(data_prefix[i]) for i in range(0, len(data_prefix), 2)]
    prefixes = [data_prefix[i].strip() for i in range(1, len(data_prefix), 2)]
    total = 0.0
    for w in weights:
        total += w
    weights = [w / total for w in weights]
    per_dataset = [[int(math.ceil(n * w * 1.005)) for n in num_samples] for w in weights]
    return prefixes, weights, per_dataset


def build_blending_indices_cpp(dataset_index, dataset_sample_index, weights, num_datasets, size, verbose):
    """helpers.cpp build_blending_indices, statement by statement (fills the two arrays)."""
    current = [0] * num_datasets
    for i in range(size):
        s = max(float(i), 1.0)
        best = 0
        best_error = float(weights[0]) * s - float(current[0])
        for k in range(1, num_datasets):
            error = float(weights[k]) * s - float(current[k])
            if error > best_error:
                best_error, best = error, k
        dataset_index[i] = best
        dataset_sample_index[i] = current[best]
        current[best] += 1


def blending_indices_ref(weights, size):
    """blendable_dataset.BlendableDataset: the weights it is given divided by their np.sum,
    then the C++ greedy loop. Pass it step-1 weights (weights_and_num_samples) to get what a
    `--data-path` blend uses."""
    w = np.array(weights, dtype=np.float64)
    w /= np.sum(w)
    kinds = np.zeros(size, dtype=np.uint8)
    samples = np.zeros(size, dtype=np.int64)
    build_blending_indices_cpp(kinds, samples, w, len(w), size, False)
    return kinds, samples



def sample_idx_loop(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """Megatron's document walk: for each sample, consume seq_length + 1 tokens across
    documents; the next sample starts at the last token consumed."""
    n = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = [(0, 0)]
    d, off = 0, 0
    for _ in range(n):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[d]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                d += 1
                off = 0
        out.append((d, off))
    return np.array(out, dtype=np.int64)


def sample_tokens(indexed, doc_idx, sample_idx, j):
    """Sample j (unshuffled) the way Megatron's __getitem__ assembles it."""
    (d0, o0), (d1, o1) = sample_idx[j], sample_idx[j + 1]
    if d0 == d1:
        return np.array(indexed.get(int(doc_idx[d0]), int(o0), int(o1 - o0 + 1)), dtype=np.int64)
    parts = [indexed.get(int(doc_idx[d0]), int(o0))]
    parts += [indexed.get(int(doc_idx[i])) for i in range(d0 + 1, d1)]
    parts.append(indexed.get(int(doc_idx[d1]), 0, int(o1 + 1)))
    return np.concatenate(parts).astype(np.int64)


def blending_loop(weights, size):
    counts = [0] * len(weights)
    kinds, samples = [], []
    for i in range(size):
        s = max(float(i), 1.0)
        errors = [weights[k] * s - counts[k] for k in range(len(weights))]
        k = errors.index(max(errors))  # first maximum
        kinds.append(k)
        samples.append(counts[k])
        counts[k] += 1
    return np.array(kinds), np.array(samples)


def ltor_masks_and_position_ids(data, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron's get_ltor_masks_and_position_ids on full samples ([b, s] LongTensor).
    Returns (attention_mask [b, 1, s, s] with True = masked, loss_mask, position_ids)."""
    b, s = data.shape
    mask = torch.tril(torch.ones((b, s, s))).view(b, 1, s, s)
    loss_mask = torch.ones(data.shape, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[data == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand_as(data).clone()
    for row in range(b):
        prev = 0
        for i in range(s):
            if data[row, i] != eod:
                continue
            if reset_attention_mask:
                mask[row, 0, i + 1:, : i + 1] = 0
            if reset_position_ids:
                position_ids[row, i + 1:] -= i + 1 - prev
                prev = i + 1
    return mask < 0.5, loss_mask, position_ids
