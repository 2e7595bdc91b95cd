"""Where the EOD tokens of an indexed dataset are, so that a sequence-parallel rank can
compute document boundaries of its slice without reading other ranks' tokens.

Megatron's `--reset-position-ids` / `--reset-attention-mask` look at token *values*:
a token equal to EOD ends a document, wherever it sits. Rank r of an SP group holds
tokens [r*N/P, (r+1)*N/P) of a sample; its own EODs it sees, but its first position id
and segment number depend on the EODs in front of its slice, which other ranks hold.
This module answers that from a sorted array of the global token offsets of all EODs:
two binary searches per document piece of the sample, no token read.

Two ways to get that array, both cached on disk next to the data:

* `mode="scan"` (default, always exact): one pass over the `.bin` (about 1 s per GB).
* `mode="doc-ends"`: reads only the last token of every document (cheap for any size).
  Exact under the assumption that EOD appears only as the last token of a document,
  which holds for `tools/preprocess_data.py --append-eod` output unless a text itself
  tokenizes to the EOD id (e.g. a literal "<|endoftext|>" with HuggingFaceTokenizer).
  Data without any EOD (no --append-eod) is handled exactly by both modes: there are
  no boundaries, as in Megatron.
"""

from __future__ import annotations

import os

import numpy as np

from megatron.data.cache import cached_arrays, describe_file
from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path

EOD_MODES = ("scan", "doc-ends")
_VERSION = 1
_CHUNK = 1 << 26  # tokens per scan step (128 MiB of uint16): bounded memory on any corpus
_memo: dict = {}


def scan_eod_positions(indexed: MMapIndexedDataset, eod: int) -> np.ndarray:
    """Sorted int64 offsets of every token equal to `eod` (full pass over the tokens)."""
    tokens = indexed.tokens
    found = []
    for start in range(0, len(tokens), _CHUNK):
        hits = np.flatnonzero(tokens[start:start + _CHUNK] == eod)
        if len(hits):
            found.append(hits.astype(np.int64) + start)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def doc_end_eod_positions(indexed: MMapIndexedDataset, eod: int) -> np.ndarray:
    """Sorted int64 offsets of sequence-final tokens equal to `eod` (one read per sequence)."""
    sizes = indexed.sizes
    last = (indexed.token_offsets + sizes - 1)[sizes > 0]
    return last[indexed.tokens[last] == eod].astype(np.int64)


def get_eod_positions(indexed: MMapIndexedDataset, eod: int, mode: str = "scan",
                      cache_dir: str | None = None, collective: bool = False) -> np.ndarray:
    """The EOD offset table of `indexed`, from memory, the disk cache, or built now."""
    if mode not in EOD_MODES:
        raise ValueError(f"EOD mode must be one of {EOD_MODES}, got {mode!r}")
    prefix = indexed.path_prefix
    memo_key = (os.path.realpath(prefix), int(eod), mode)
    if memo_key in _memo:
        return _memo[memo_key]
    description = {
        "kind": "eod_positions", "version": _VERSION, "eod": int(eod), "mode": mode,
        "bin": describe_file(data_file_path(prefix)), "idx": describe_file(index_file_path(prefix)),
    }
    folder = cache_dir if cache_dir is not None else (os.path.dirname(os.path.abspath(prefix)))

    def build():
        fn = scan_eod_positions if mode == "scan" else doc_end_eod_positions
        return {"eod_positions": fn(indexed, int(eod))}

    stem = f"{os.path.basename(prefix)}_eod"
    arrays = cached_arrays(folder, stem, description, ("eod_positions",), build, collective=collective)
    _memo[memo_key] = np.asarray(arrays["eod_positions"])
    return _memo[memo_key]


def count_in_ranges(eod_positions: np.ndarray, starts: np.ndarray, stops: np.ndarray):
    """For global token ranges [starts[p], stops[p]): number of EODs in each and the
    offset of the last one (-1 where none)."""
    lo = np.searchsorted(eod_positions, starts, side="left")
    hi = np.searchsorted(eod_positions, stops, side="left")
    counts = hi - lo
    last = np.where(counts > 0, eod_positions[np.maximum(hi - 1, 0)] if len(eod_positions) else -1, -1)
    return counts, last


__all__ = ["EOD_MODES", "count_in_ranges", "doc_end_eod_positions", "get_eod_positions", "scan_eod_positions"]
