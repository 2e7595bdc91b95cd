"""Cheap checks of preprocessed data, run before the first step (most before any process group).

* `check_dataset_prefix`: a `--data-path` prefix is a readable, consistent `.bin/.idx` pair
  that holds tokens; O(1) reads whatever the size of the data (the header and a few index
  entries), so `megatron.arguments` runs it on every prefix while validating flags.
* `check_token_ids`: the data's ids fit the model's vocabulary, from a deterministic sample
  of the tokens (a few hundred kilobytes read), once per dataset when it is built. The
  batches are then checked exactly as they are read (`megatron.data.sharding`), on the
  host, where a bad id costs a comparison and not a CUDA device-side assert.
"""

from __future__ import annotations

import os

import numpy as np

from megatron.config import UserError
from megatron.data.indexed_dataset import (
    _HEADER,
    DTYPE_CODES,
    IndexedDatasetError,
    MMapIndexedDataset,
    _read_header,
    data_file_path,
    index_file_path,
)


class TokenIdError(UserError, ValueError):
    """Token ids outside the model's vocabulary: data made with another tokenizer, or a wrong --vocab-size."""


def check_dataset_prefix(prefix: str) -> dict:
    """Cheap checks of a `--data-path` prefix before any process group starts (reads the header
    and a few entries of the index, whatever the size of the data); raises IndexedDatasetError.

    What this cannot see without reading the whole index (inconsistent pointers, a shuffled
    document index) `MMapIndexedDataset` reports when the datasets are built.
    Returns {"sequences", "documents", "tokens_bytes"}.
    """
    prefix = str(prefix)
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    code, n_seq, n_doc = _read_header(prefix)
    item = DTYPE_CODES[code].itemsize
    with open(idx_path, "rb") as f:
        def read(offset: int, dtype, count: int = 1) -> np.ndarray:
            f.seek(offset)
            return np.frombuffer(f.read(np.dtype(dtype).itemsize * count), dtype=dtype)
        sizes_at = _HEADER.size
        pointers_at = sizes_at + 4 * n_seq
        doc_at = pointers_at + 8 * n_seq
        doc_ends = read(doc_at, np.int64, 1).tolist() + read(doc_at + 8 * (n_doc - 1), np.int64, 1).tolist() \
            if n_doc else []
        if not doc_ends or doc_ends[0] != 0 or doc_ends[-1] != n_seq:
            raise IndexedDatasetError(
                f"{idx_path}: document indices must rise from 0 to the number of sequences ({n_seq}): corrupt index")
        want = 0
        if n_seq:
            last_size, last_pointer = int(read(sizes_at + 4 * (n_seq - 1), np.int32)[0]), \
                int(read(pointers_at + 8 * (n_seq - 1), np.int64)[0])
            if last_size < 0 or last_pointer < 0:
                raise IndexedDatasetError(f"{idx_path} holds negative sequence lengths or pointers: corrupt index")
            want = last_pointer + last_size * item
    have = os.path.getsize(bin_path)
    if have < want:  # (a longer .bin may be Megatron-DeepSpeed's --append-eod layout: the full open decides)
        raise IndexedDatasetError(
            f"{bin_path} has {have} bytes but {idx_path} describes {want} bytes: the .bin is truncated or the "
            "pair comes from different runs; re-run tools/preprocess_data.py")
    if want == 0:
        raise IndexedDatasetError(
            f"dataset {prefix!r} holds no tokens ({max(n_doc - 1, 0)} documents, all empty): nothing to train on; "
            "check the input of tools/preprocess_data.py (--json-keys names the field that holds the text)")
    return {"sequences": n_seq, "documents": n_doc - 1, "tokens_bytes": want}


def check_token_ids(indexed: MMapIndexedDataset, vocab_size: int, windows: int = 64,
                    window_tokens: int = 4096) -> None:
    """Raise TokenIdError when ids >= `vocab_size` (or < 0) are seen in `indexed`.

    Looks at `windows` evenly spaced runs of `window_tokens` tokens (256k tokens, a few hundred
    kilobytes read, however large the data), enough to catch data made with another tokenizer
    before the first step; the batches themselves are checked exactly as they are read
    (megatron.data.sharding). Nothing is read when the token dtype cannot hold a bad id.
    """
    dtype = np.dtype(indexed.dtype)
    info = np.iinfo(dtype)
    tokens = indexed.tokens
    if (info.max < vocab_size and info.min >= 0) or len(tokens) == 0:
        return
    starts = np.unique(np.linspace(0, max(len(tokens) - window_tokens, 0), windows).astype(np.int64))
    lo, hi, seen = None, None, 0
    for s in starts:
        chunk = tokens[s:s + window_tokens]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
        seen += len(chunk)
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise TokenIdError(token_id_message(f"dataset {indexed.path_prefix!r}", bad, vocab_size,
                                            f"largest id {hi} in {seen} tokens sampled"))


def token_id_message(where: str, bad_id: int, vocab_size: int, detail: str = "") -> str:
    """The one explanation of a token id the model cannot embed."""
    what = "is negative" if bad_id < 0 else f"is >= the model's vocabulary size {vocab_size}"
    return (f"{where} holds token id {bad_id}{f' ({detail})' if detail else ''}, which {what}: the data was "
            f"preprocessed with another tokenizer, or --vocab-size / the tokenizer flags do not match it. Pass the "
            f"tokenizer the data was made with (--tokenizer-type, --vocab-file/--merge-file, --tokenizer-model, "
            f"--vocab-size), or re-run tools/preprocess_data.py with this one")


__all__ = ["TokenIdError", "check_dataset_prefix", "check_token_ids", "token_id_message"]
