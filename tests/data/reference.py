"""Slow, literal re-statements of Megatron's algorithms, used as test oracles.

Written as plainly as possible (loops over tokens and documents), independent of the
vectorised code under test.
"""

from __future__ import annotations

import numpy as np
import torch


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
