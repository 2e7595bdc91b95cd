"""Per-rank batches for Ulysses sequence parallelism, read straight from the memory map.

Rank r of an SP group of size P owns tokens [r*N/P, (r+1)*N/P) of every sample
(N = seq_length). `get_sp_batch` reads only tokens [r*N/P, (r+1)*N/P + 1) of each
sample (inputs plus the one extra token its last label needs) and computes, for that
slice alone, what Megatron's `get_ltor_masks_and_position_ids` computes on the full
sample:

* loss_mask: 0 at input positions holding EOD when eod_mask_loss;
* position_ids: global positions r*N/P + i, restarting at 0 after every EOD when
  reset_position_ids (the EOD itself keeps its document's numbering);
* segment_ids (reset_attention_mask): the number of EOD tokens strictly before each
  position. "Query i may attend key j iff j <= i and segment_ids[i] == segment_ids[j]"
  is then exactly Megatron's mask (no EOD e with j <= e < i). The ids count from the
  start of the sample, so every rank gives the same id to the same document; after the
  all-to-all of DistributedAttention each rank holds the full sequence, all-gathers
  segment_ids, and applies the document-causal mask exactly.
* documents (reset_attention_mask): the document boundaries of the WHOLE sample as a
  `megatron.core.documents.Documents`, from the EOD index alone (no token of another rank is
  read). The model uses it instead of gathering segment_ids: no collective, and no layer
  waits for the GPU to learn document lengths (flash-attn varlen and SDPA need them on the host).

The EODs in front of the slice are counted from the index (`dataset.eods_before`), so
no rank reads, materialises or receives another rank's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron.core.documents import Documents
from megatron.core.sequence_parallel.layout import token_ranges
from megatron.data.samplers import MegatronPretrainingSampler


def sp_slice_bounds(seq_length: int, sp_rank: int, sp_size: int) -> tuple:
    """[start, stop) of the input tokens this SP rank owns (plain Ulysses)."""
    return token_ranges(seq_length, sp_size, sp_rank)[0]


def sp_token_ranges(seq_length: int, sp_rank: int, sp_size: int, ring_size: int = 1) -> list:
    """This rank's tokens as contiguous `(start, stop)` ranges of the sample, in local order.

    Plain Ulysses: one block. With a ring (`--ring-attention-size R`), the zigzag layout: at
    most two blocks. The layout itself is megatron.core.sequence_parallel.layout's.
    """
    return token_ranges(seq_length, sp_size, sp_rank, ring_size)


def get_sp_batch(dataset, sample_indices: Sequence[int], seq_length: int, sp_rank: int, sp_size: int,
                 eod_token: int | None, reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 eod_mask_loss: bool = False, ring_size: int = 1, vocab_size: int | None = None) -> dict:
    """The micro-batch `sample_indices` as this SP rank's tensors (see module docstring).

    Returns tokens, labels, position_ids (LongTensor [b, s/p]), loss_mask (FloatTensor
    [b, s/p]), segment_ids (LongTensor [b, s/p], or None unless reset_attention_mask) and
    documents (the whole samples' `Documents`, or None unless reset_attention_mask).
    With `ring_size > 1` the rank's tokens are its zigzag ranges, concatenated.
    `vocab_size`: raise TokenIdError for an id the model cannot embed (checked here, on the
    host copy, so a bad id never reaches the embedding: on a GPU it would be a device-side
    assert that poisons the CUDA context).
    """
    ds_seq = getattr(dataset, "seq_length", seq_length)
    if ds_seq != seq_length:
        raise ValueError(f"dataset was built for --seq-length {ds_seq}, batch asked for {seq_length}")
    needs_eod = eod_mask_loss or reset_position_ids or reset_attention_mask
    if needs_eod and eod_token is None:
        raise ValueError("eod_token is required with eod_mask_loss / reset_position_ids / reset_attention_mask")
    parts = [_range_batch(dataset, sample_indices, start, stop, eod_token, needs_eod, reset_position_ids,
                          reset_attention_mask, eod_mask_loss, vocab_size)
             for start, stop in sp_token_ranges(seq_length, sp_rank, sp_size, ring_size)]
    cat = lambda key: np.ascontiguousarray(np.concatenate([p[key] for p in parts], axis=1))  # noqa: E731
    documents = None
    if reset_attention_mask:
        documents = Documents([_document_lengths(dataset.eod_positions(int(i), seq_length, eod_token), seq_length)
                               for i in sample_indices])
    return {
        "documents": documents,
        "tokens": torch.from_numpy(cat("tokens")),
        "labels": torch.from_numpy(cat("labels")),
        "loss_mask": torch.from_numpy(cat("loss_mask")),
        "position_ids": torch.from_numpy(cat("position_ids")),
        "segment_ids": torch.from_numpy(cat("segment_ids")) if reset_attention_mask else None,
    }


def _document_lengths(eods: np.ndarray, seq_length: int) -> np.ndarray:
    """Document lengths of a sample's inputs [0, N): a document ends at each EOD (inclusive)."""
    cuts = np.concatenate([[0], eods[eods < seq_length - 1] + 1, [seq_length]])
    return np.diff(cuts)


def _range_batch(dataset, sample_indices, start, stop, eod_token, needs_eod, reset_position_ids,
                 reset_attention_mask, eod_mask_loss, vocab_size=None) -> dict:
    """Numpy arrays `[b, stop - start]` for tokens [start, stop) of each sample."""
    b, n = len(sample_indices), stop - start
    window = np.empty((b, n + 1), dtype=np.int64)  # inputs [start, stop) and one more for the last label
    for row, idx in enumerate(sample_indices):
        window[row] = dataset.get_slice(int(idx), start, stop + 1)
    if vocab_size is not None and window.size and (window.max() >= vocab_size or window.min() < 0):
        _raise_token_id_error(dataset, sample_indices, window, start, vocab_size)
    tokens, labels = window[:, :-1], window[:, 1:]
    is_eod = tokens == eod_token if needs_eod else None

    loss_mask = np.ones((b, n), dtype=np.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = np.broadcast_to(np.arange(start, stop, dtype=np.int64), (b, n))
    segment_ids = None
    if reset_position_ids or reset_attention_mask:
        before = [dataset.eods_before(int(idx), start, eod_token) for idx in sample_indices]
        count_before = np.array([c for c, _ in before], dtype=np.int64)  # [b]
        last_before = np.array([p for _, p in before], dtype=np.int64)  # [b], -1 if none
        if reset_attention_mask:
            # EODs strictly before each position: exclusive cumsum along the slice
            segment_ids = count_before[:, None] + np.cumsum(is_eod, axis=1) - is_eod
        if reset_position_ids:
            eod_at = np.where(is_eod, positions, -1)  # [b, n]
            last_upto = np.maximum.accumulate(eod_at, axis=1)  # last EOD at or before each position
            last_strictly = np.concatenate([last_before[:, None], last_upto[:, :-1]], axis=1)
            last_strictly = np.maximum(last_strictly, last_before[:, None])
            positions = positions - (last_strictly + 1)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions,
            "segment_ids": segment_ids}


def _raise_token_id_error(dataset, sample_indices, window: np.ndarray, start: int, vocab_size: int) -> None:
    from megatron.data.checks import TokenIdError, token_id_message  # noqa: PLC0415

    bad = (window >= vocab_size) | (window < 0)  # [b, n + 1]
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    col = int(np.flatnonzero(bad[row])[0])
    idx = int(sample_indices[row])
    where = dataset.source(idx) if hasattr(dataset, "source") else f"sample {idx}"
    value = int(window[row, col])
    raise TokenIdError(token_id_message(where, value, vocab_size, f"at position {start + col}; largest id in this "
                                                                   f"batch {int(window.max())}"))


def sp_batch_iterator(dataset, *, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                      data_parallel_size: int, seq_length: int, sp_rank: int, sp_size: int,
                      eod_token: int | None, reset_position_ids: bool = False,
                      reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                      total_samples: int | None = None, ring_size: int = 1, vocab_size: int | None = None):
    """Endless-until-exhausted stream of this rank's batches, resuming at `consumed_samples`.

    Every rank of an SP group gets the same sample indices (same DP rank) and reads its
    own slice of them. Reading a slice costs well under a millisecond even at 128k
    tokens (benchmarks/bench_data.py), so no DataLoader worker processes are used.
    """
    sampler = MegatronPretrainingSampler(total_samples if total_samples is not None else len(dataset),
                                         consumed_samples, micro_batch_size, data_parallel_rank,
                                         data_parallel_size)
    for indices in sampler:
        yield get_sp_batch(dataset, indices, seq_length, sp_rank, sp_size, eod_token,
                           reset_position_ids, reset_attention_mask, eod_mask_loss, ring_size, vocab_size)


__all__ = ["MegatronPretrainingSampler", "get_sp_batch", "sp_batch_iterator", "sp_slice_bounds", "sp_token_ranges"]
