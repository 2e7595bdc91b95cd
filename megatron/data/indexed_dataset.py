"""Memory-mapped token store, byte-compatible with Megatron's `MMapIndexedDataset`.

A dataset is a pair of files sharing a prefix:

* `{prefix}.bin`: the tokens of every sequence, back to back, in one integer dtype.
* `{prefix}.idx`: little-endian header and three arrays::

      b"MMIDIDX\\x00\\x00"          9 bytes magic
      version                      uint64, always 1
      dtype code                   uint8 (see DTYPE_CODES)
      number of sequences  S       uint64
      number of doc indices D      uint64  (documents + 1)
      sequence lengths             int32[S]
      sequence byte pointers       int64[S]  (exclusive cumsum of lengths * itemsize)
      document indices             int64[D]  (doc i = sequences [doc_idx[i], doc_idx[i+1]))

Files written here load in Megatron-LM and Megatron-DeepSpeed and the reverse, so
users keep their preprocessed corpora. Reads are zero-copy views into the memory map:
a sequence-parallel rank touches only the pages of its own slice.

The builder writes temporary files and renames them into place only in `finalize`
(`.bin` first, `.idx` last), so a killed preprocessing run never leaves a pair that
looks complete; the reader also cross-checks the pair so that a truncated or mixed-up
`.bin` is reported instead of silently returning garbage. One known-broken layout is read
(with a warning) the way Megatron reads it: the files Megatron-DeepSpeed's
preprocess_data.py --append-eod writes, whose index leaves out each document's EOD.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import warnings

import numpy as np

from megatron.config import UserError

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"  # Megatron's old "lazy"/"cached" IndexedDataset
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, num sequences, num doc indices

# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py); codes 1-5 and 8
# are what Megatron-DeepSpeed uses too.
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


class IndexedDatasetError(UserError, ValueError):
    """A `.bin`/`.idx` pair that cannot be read; the message names the file and the problem."""


class DatasetFileNotFoundError(IndexedDatasetError, FileNotFoundError):
    """A `.bin` or `.idx` file of a dataset prefix is missing (also a FileNotFoundError)."""


def best_dtype(vocab_size: int | None):
    """Smallest token dtype Megatron would pick: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise ValueError(f"token dtype {dt} has no Megatron code; use one of {sorted(map(str, _CODE_OF))}")
    return _CODE_OF[dt]


def _strip_suffix_hint(prefix: str) -> str:
    if prefix.endswith((".bin", ".idx")):
        return f" (pass the prefix without the extension: {prefix[:-4]!r})"
    return ""


def _missing_file_message(prefix: str, path: str, what: str) -> str:
    """Why `path` (the .bin or .idx of `prefix`) is not there, and what to pass instead."""
    if os.path.isdir(prefix):
        inside = sorted(n[:-4] for n in os.listdir(prefix) if n.endswith(".idx"))[:3]
        example = f", e.g. {os.path.join(prefix, inside[0])!r}" if inside else ""
        return (f"dataset prefix {prefix!r} is a directory; pass the path of a .bin/.idx pair without the "
                f"extension (what tools/preprocess_data.py printed{example})")
    if os.path.isdir(path):
        return f"{what} file {path} of dataset prefix {prefix!r} is a directory, not a file"
    hint = _strip_suffix_hint(prefix)
    if not hint:
        hint = "; check the path, or run tools/preprocess_data.py to make the .bin/.idx pair"
    return f"{what} file {path} of dataset prefix {prefix!r} does not exist{hint}"


class MMapIndexedDataset:
    """Read-only view of a `.bin/.idx` pair.

    `ds[i]` / `ds.get(i, offset, length)` return numpy views of sequence i (no copy);
    `ds.sizes`, `ds.pointers`, `ds.doc_idx` are views of the index. `skip_warmup` is
    accepted for Megatron compatibility; nothing is ever pre-read.
    """

    def __init__(self, path_prefix: str, skip_warmup: bool = True) -> None:
        self._prefix = str(path_prefix)
        self._open()

    # -- opening and validation ---------------------------------------------------------
    def _open(self) -> None:
        prefix = self._prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        code, n_seq, n_doc = _read_header(prefix)
        self._dtype = DTYPE_CODES[code]
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self._sizes = np.frombuffer(self._idx_mmap, dtype=np.int32, count=n_seq, offset=off)
        off += self._sizes.nbytes
        self._pointers = np.frombuffer(self._idx_mmap, dtype=np.int64, count=n_seq, offset=off)
        off += self._pointers.nbytes
        self._doc_idx = np.frombuffer(self._idx_mmap, dtype=np.int64, count=n_doc, offset=off)
        self._check_index(idx_path)

        item = self._dtype.itemsize
        want = int(self._pointers[-1]) + int(self._sizes[-1]) * item if n_seq else 0
        have = os.path.getsize(bin_path)
        self.unindexed_eods = False
        if have != want:
            if have > want and self._has_unindexed_eods(bin_path, have - want):
                self._warn_unindexed_eods(bin_path, idx_path)
            else:
                raise IndexedDatasetError(
                    f"{bin_path} has {have} bytes but {idx_path} describes {want} bytes "
                    f"({self.num_tokens} tokens of {self._dtype}): the .bin is "
                    f"{'truncated' if have < want else 'longer than its index'} or the pair comes from different "
                    "runs")
        if have:
            try:
                with open(bin_path, "rb") as f:
                    self._bin_mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise IndexedDatasetError(f"cannot read {bin_path}: {e.strerror}") from e
            self._tokens = np.frombuffer(self._bin_mmap, dtype=self._dtype, count=want // item)
        else:  # mmap of an empty file is an error on Linux
            self._bin_mmap = None
            self._tokens = np.empty(0, dtype=self._dtype)

    def _has_unindexed_eods(self, bin_path: str, surplus_bytes: int, probes: int = 1000) -> bool:
        """Is the surplus one token after every non-empty document, all with the same value
        (the EOD)? Checked on up to `probes` documents spread over the file."""
        item = self._dtype.itemsize
        has_tokens = np.diff(self._doc_idx) > 0  # [documents]
        if surplus_bytes != item * int(has_tokens.sum()):
            return False
        ends = np.concatenate(([0], np.cumsum(self._sizes, dtype=np.int64)))[self._doc_idx]  # [documents + 1]
        doc_tokens = np.diff(ends)[has_tokens] + 1  # with the unindexed EOD
        eod_at = np.cumsum(doc_tokens) - 1  # where each EOD really is in the .bin
        pick = np.unique(np.linspace(0, len(eod_at) - 1, min(probes, len(eod_at))).astype(np.int64))
        with open(bin_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            values = np.frombuffer(data, dtype=self._dtype)[eod_at[pick]]  # a copy: the map can close
        return bool(np.all(values == values[0]))

    def _warn_unindexed_eods(self, bin_path: str, idx_path: str) -> None:
        """A `.bin` longer than its index by exactly one token per non-empty document is what
        Megatron-DeepSpeed's tools/preprocess_data.py writes with --append-eod (since June
        2023: the EOD is written but not counted in the sequence length; Megatron-LM fixed it
        in Aug 2023). Megatron reads such a pair by its index, ignoring the surplus, so the
        sequences are shifted against the documents; we read it the same way, so that samples
        stay Megatron's, and say so."""
        self.unindexed_eods = True
        warnings.warn(
            f"{bin_path} holds one token per document more than {idx_path} counts: the signature of "
            "Megatron-DeepSpeed's preprocess_data.py --append-eod, which leaves each EOD out of the index. "
            "Reading it by the index, exactly as Megatron does (same samples as upstream, but documents are "
            "shifted against their EODs); re-run tools/preprocess_data.py to get correct files.",
            stacklevel=4)

    def _check_index(self, idx_path: str) -> None:
        sizes, ptr, doc = self._sizes, self._pointers, self._doc_idx
        if len(sizes) and sizes.min() < 0:
            raise IndexedDatasetError(f"{idx_path} holds negative sequence lengths: corrupt index")
        if len(sizes):
            # pointers must be the exclusive cumsum of lengths * itemsize (checked in full:
            # one pass over the index, far cheaper than a wrong token read later).
            nbytes = sizes.astype(np.int64) * self._dtype.itemsize
            if ptr[0] != 0 or not np.array_equal(ptr[1:], np.cumsum(nbytes[:-1])):
                raise IndexedDatasetError(
                    f"{idx_path}: sequence pointers do not match the sequence lengths (dtype {self._dtype}): "
                    "corrupt index"
                )
        if len(doc) == 0 or doc[0] != 0 or doc[-1] != len(sizes) or (len(doc) > 1 and np.any(np.diff(doc) < 0)):
            raise IndexedDatasetError(
                f"{idx_path}: document indices must rise from 0 to the number of sequences ({len(sizes)}): "
                "corrupt index"
            )

    # -- pickling (DataLoader workers reopen the maps instead of copying them) ---------
    def __getstate__(self):
        return {"_prefix": self._prefix}

    def __setstate__(self, state):
        self._prefix = state["_prefix"]
        self._open()

    # -- reading ------------------------------------------------------------------------
    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))

    @property
    def path_prefix(self) -> str:
        return self._prefix

    @property
    def dtype(self):
        return self._dtype.type

    @property
    def sizes(self) -> np.ndarray:
        """int32 length of every sequence (a view of the index)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in the `.bin`."""
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """int64 document boundaries in sequence units (Megatron-DeepSpeed's name)."""
        return self._doc_idx

    document_indices = doc_idx  # Megatron-LM core's name

    @property
    def token_offsets(self) -> np.ndarray:
        """int64 offset of every sequence in token (element) units."""
        return self._pointers // self._dtype.itemsize

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one zero-copy array (for scans)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def __len__(self) -> int:
        return len(self._sizes)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence `idx` as a view of the memory map."""
        size = int(self._sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self._prefix}: tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {size}"
            )
        start = int(self._pointers[idx]) // self._dtype.itemsize + offset
        return self._tokens[start:start + length]

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self.get(int(idx))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous")
            return [self.get(i) for i in range(start, stop)]
        raise TypeError(f"index must be an int or a slice, got {type(idx).__name__}")

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences are adjacent in the `.bin`)."""
        first, last = int(self._doc_idx[doc]), int(self._doc_idx[doc + 1])
        if first == last:
            return self._tokens[:0]
        start = int(self._pointers[first]) // self._dtype.itemsize
        return self._tokens[start:start + int(self._sizes[first:last].sum(dtype=np.int64))]



def _read_header(prefix: str) -> tuple[int, int, int]:
    """(dtype code, sequences, document indices) of `prefix`'s index, after the checks that cost O(1):
    both files exist, the header is a version-1 Megatron mmap header, the .idx has the size it announces."""
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    for path, what in ((idx_path, "index"), (bin_path, "data")):
        if not os.path.isfile(path):
            raise DatasetFileNotFoundError(_missing_file_message(prefix, path, what))
    idx_bytes = os.path.getsize(idx_path)
    try:
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise IndexedDatasetError(f"cannot read {idx_path}: {e.strerror}") from e
    if head[:8] == LEGACY_MAGIC:
        raise IndexedDatasetError(
            f"{idx_path} is Megatron's legacy 'lazy/cached' IndexedDataset; only the mmap format is "
            "supported: re-run tools/preprocess_data.py (Megatron's --dataset-impl mmap)"
        )
    if len(head) < _HEADER.size:
        raise IndexedDatasetError(
            f"{idx_path} is truncated: {idx_bytes} bytes, shorter than the {_HEADER.size}-byte header"
        )
    magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if magic != MAGIC:
        raise IndexedDatasetError(f"{idx_path} is not a Megatron mmap index: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path} has index version {version}; only version {VERSION} is supported")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path} has unknown dtype code {code}; known: {sorted(DTYPE_CODES)}")
    expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
    # Megatron-LM's multimodal variant appends one int8 "mode" per sequence.
    if idx_bytes not in (expected, expected + n_seq):
        state = "truncated" if idx_bytes < expected else "longer than its header says"
        raise IndexedDatasetError(
            f"{idx_path} is {state}: {idx_bytes} bytes, header announces {n_seq} sequences and "
            f"{n_doc} document indices ({expected} bytes)"
        )
    return code, n_seq, n_doc



class _Growable:
    """An int64 array that grows by doubling (a Python list of ints costs ~4x the memory)."""

    def __init__(self, first=None) -> None:
        self._buf = np.empty(1024, dtype=np.int64)
        self._n = 0
        if first is not None:
            self.extend(np.asarray([first]))

    def extend(self, values: np.ndarray) -> None:
        need = self._n + len(values)
        if need > len(self._buf):
            new = np.empty(max(need, 2 * len(self._buf)), dtype=np.int64)
            new[: self._n] = self._buf[: self._n]
            self._buf = new
        self._buf[self._n:need] = values
        self._n = need

    def append(self, value: int) -> None:
        self.extend(np.asarray([value]))

    def __len__(self) -> int:
        return self._n

    def view(self) -> np.ndarray:
        return self._buf[: self._n]


def _remove_stale_temporaries(prefix: str) -> None:
    """Delete `{prefix}.bin/.idx.tmp.PID` left by builders that were killed (PID gone)."""
    folder = os.path.dirname(os.path.abspath(prefix))
    base = os.path.basename(prefix)
    for name in os.listdir(folder):
        for ext in (".bin.tmp.", ".idx.tmp."):
            if name.startswith(base + ext) and name[len(base + ext):].isdigit():
                pid = int(name[len(base + ext):])
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os.remove(os.path.join(folder, name))
                except PermissionError:
                    pass  # alive, owned by someone else


def _split_out_file(out_file) -> tuple[str, str]:
    """(data path, prefix) of a builder's `out_file`: Megatron's `.bin` path, or a bare prefix."""
    path = os.fspath(out_file)
    if path.endswith(".bin"):
        return path, path[:-4]
    if path.endswith(".idx"):
        raise ValueError(f"{path!r} is an index path; a builder takes the data file ({path[:-4]}.bin, as "
                         f"Megatron's preprocess_data.py passes it) or the bare prefix ({path[:-4]!r})")
    return data_file_path(path), path


class MMapIndexedDatasetBuilder:
    """Write a `.bin/.idx` pair; nothing appears under the final names before `finalize()`.

    Megatron's interface: `MMapIndexedDatasetBuilder(out_file, dtype)` takes the `.bin`
    path (a bare prefix works too: `x` means `x.bin`), and `finalize(index_file)` the
    `.idx` path (default: the `.bin` path with `.idx`). The default dtype is int64, as in
    Megatron-DeepSpeed; `make_builder` picks the smallest one for a vocabulary.

    Two ways to add data: Megatron's `add_item(tokens)` + `end_document()` (or
    `add_doc(tokens, lengths)`: one document made of several sequences), and
    `add_documents(tokens, lengths)`: many one-sequence documents at once, which is
    what the preprocessing workers send. A zero-length document gets no sequence but
    still a document boundary, as in Megatron's preprocessing of an empty text.
    """

    def __init__(self, out_file: str, dtype=np.int64) -> None:
        self._data_path, self._prefix = _split_out_file(out_file)
        self._dtype = np.dtype(dtype)
        dtype_code(self._dtype)  # fail early on a dtype Megatron cannot read
        if self._dtype.kind not in "iu":
            raise ValueError(f"token dtype must be an integer type, got {self._dtype}")
        self._info = np.iinfo(self._dtype)
        os.makedirs(os.path.dirname(os.path.abspath(self._prefix)), exist_ok=True)
        _remove_stale_temporaries(self._prefix)
        self._tag = f".tmp.{os.getpid()}"
        self._bin_tmp = self._data_path + self._tag
        self._idx_tmp = None  # next to the index file, once finalize() knows its path
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = _Growable()
        self._doc_idx = _Growable(0)
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    def _write(self, tokens) -> int:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)  # Megatron passes 1-D tensors; accept any shape flattened
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(
                    f"token ids [{lo}, {hi}] do not fit the dataset dtype {self._dtype}; "
                    "build it with a wider dtype (best_dtype(vocab_size))"
                )
        self._bin.write(arr.astype(self._dtype, copy=False).tobytes())
        return arr.size

    def add_item(self, tokens) -> None:
        """Append one sequence (call `end_document()` after the last sequence of a document)."""
        if hasattr(tokens, "numpy"):
            tokens = tokens.numpy()
        self._sizes.append(self._write(tokens))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_doc(self, tokens, lengths) -> None:
        """Append one document made of sequences of `lengths` (concatenated in `tokens`)."""
        if hasattr(tokens, "numpy"):
            tokens = tokens.numpy()
        lengths = np.asarray(lengths, dtype=np.int64)
        n = self._write(tokens)
        if int(lengths.sum()) != n:
            raise ValueError(f"add_doc: lengths sum to {int(lengths.sum())} but {n} tokens were given")
        self._sizes.extend(lengths)
        self._doc_idx.append(len(self._sizes))

    def add_documents(self, tokens, lengths) -> None:
        """Append many one-sequence documents; `lengths[i]` tokens each, concatenated in `tokens`."""
        lengths = np.asarray(lengths, dtype=np.int64)
        n = self._write(tokens)
        if int(lengths.sum()) != n:
            raise ValueError(f"add_documents: lengths sum to {int(lengths.sum())} but {n} tokens were given")
        nonempty = lengths > 0
        base = len(self._sizes)
        self._sizes.extend(lengths[nonempty])
        self._doc_idx.extend(base + np.cumsum(nonempty))

    def merge_file_(self, other_prefix: str) -> None:
        """Append a whole existing dataset (same dtype) after what was written so far."""
        other = MMapIndexedDataset(other_prefix)
        if np.dtype(other.dtype) != self._dtype:
            raise IndexedDatasetError(
                f"cannot merge {other_prefix}: its tokens are {np.dtype(other.dtype)}, this dataset's are "
                f"{self._dtype}; all inputs of a merge must share one dtype"
            )
        base = len(self._sizes)
        self._sizes.extend(other.sizes)
        self._doc_idx.extend(base + other.doc_idx[1:])
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    def finalize(self, index_file: str | None = None) -> None:
        """Write the index to `index_file` (default: the `.bin` path with `.idx`) and move
        both files to their final names (`.idx` last)."""
        if self._done:
            raise RuntimeError(f"builder for {self._data_path} is already finalized")
        index_file = os.fspath(index_file) if index_file is not None else index_file_path(self._prefix)
        if index_file.endswith(".bin"):
            raise ValueError(f"finalize({index_file!r}): that is a data path; pass the index path "
                             f"({index_file[:-4]}.idx) or nothing")
        os.makedirs(os.path.dirname(os.path.abspath(index_file)), exist_ok=True)
        self._idx_tmp = index_file + self._tag
        sizes = self._sizes.view()
        if len(sizes) and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be stored in the int32 index")
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        nbytes = sizes * self._dtype.itemsize
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(nbytes[:-1], out=pointers[1:])
        doc_idx = self._doc_idx.view()
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, dtype_code(self._dtype), len(sizes), len(doc_idx)))
            f.write(sizes.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.astype(np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self._data_path)
        os.replace(self._idx_tmp, index_file)
        self._done = True

    def abort(self) -> None:
        """Drop everything written; the final paths are left untouched."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.exists(path):
                os.remove(path)
        self._done = True


def make_builder(out_file: str, impl: str = "mmap", vocab_size: int | None = None):
    """Megatron's helper: a builder of `out_file` (the `.bin` path, or a bare prefix) with the
    best dtype for `vocab_size`; finish it with `finalize(index_file)`."""
    if impl != "mmap":
        raise ValueError(f"only --dataset-impl mmap is supported, got {impl!r}")
    return MMapIndexedDatasetBuilder(out_file, dtype=best_dtype(vocab_size))


def make_dataset(path_prefix: str, impl: str = "mmap", skip_warmup: bool = True) -> MMapIndexedDataset:
    """Megatron's helper; `impl` must be 'mmap' or 'infer'."""
    if impl not in ("mmap", "infer"):
        raise ValueError(f"only --data-impl mmap is supported, got {impl!r}")
    return MMapIndexedDataset(path_prefix, skip_warmup)


__all__ = [
    "DTYPE_CODES",
    "DatasetFileNotFoundError",
    "IndexedDatasetError",
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "best_dtype",
    "data_file_path",
    "index_file_path",
    "make_builder",
    "make_dataset",
]
