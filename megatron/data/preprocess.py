"""JSONL -> `.bin/.idx`: the engine behind tools/preprocess_data.py and tools/build_corpus.py.

The main process reads the input (plain or gzip) in batches of lines, worker processes
parse and tokenize them, and the main process writes the results in input order, so
the files on disk are byte-identical whatever `--workers` is. At most a few batches per
worker are in flight, which keeps memory flat on inputs of any size.

A line that is not JSON, lacks a `--json-keys` key or holds a non-string value stops
the run with its line number; with `skip_invalid` it is counted and skipped for every
key (the datasets of several keys stay document-aligned). Blank lines are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import itertools
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections.abc import Sequence

import numpy as np

from megatron.config import UserError
from megatron.data.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron.data.tokenizers import build_tokenizer


class PreprocessError(UserError, ValueError):
    """Bad input; the message carries the file and line number."""


@dataclasses.dataclass
class PreprocessConfig:
    input: str
    output_prefix: str
    tokenizer_type: str
    json_keys: Sequence[str] = ("text",)
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    vocab_extra_ids: int = 0
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 1000
    skip_invalid: bool = False
    batch_bytes: int = 1 << 20  # lines are grouped into batches of about this many bytes
    quiet: bool = False

    def tokenizer_kwargs(self) -> dict:
        return dict(vocab_file=self.vocab_file, merge_file=self.merge_file, tokenizer_model=self.tokenizer_model,
                    vocab_size=self.vocab_size, vocab_extra_ids=self.vocab_extra_ids)


@dataclasses.dataclass
class PreprocessStats:
    documents: int = 0
    skipped: int = 0
    skipped_lines: list = dataclasses.field(default_factory=list)  # first few line numbers
    input_bytes: int = 0
    tokens: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    outputs: dict = dataclasses.field(default_factory=dict)  # key -> prefix


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: `{prefix}_{key}_document` for whole-document datasets."""
    return f"{output_prefix}_{key}_document"


# -- worker side -------------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_type: str, tok_kwargs: dict, keys: Sequence[str], append_eod: bool, dtype) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _W["tok"] = build_tokenizer(tokenizer_type, **tok_kwargs)
    _W["keys"] = tuple(keys)
    _W["eod"] = _W["tok"].eod if append_eod else None
    _W["dtype"] = np.dtype(dtype)


def _encode_batch(batch):
    """[(line_no, raw bytes)] -> ({key: (tokens, lengths)}, errors, number of docs)."""
    tok, keys, eod, dtype = _W["tok"], _W["keys"], _W["eod"], _W["dtype"]
    per_key = {k: ([], []) for k in keys}
    errors = []
    docs = 0
    for line_no, raw in batch:
        try:
            obj = json.loads(raw)
        except ValueError as e:
            errors.append((line_no, f"invalid JSON ({e})"))
            continue
        if not isinstance(obj, dict):
            errors.append((line_no, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        texts = []
        for k in keys:
            if k not in obj:
                errors.append((line_no, f"missing key {k!r} (keys present: {sorted(obj)[:10]})"))
                break
            if not isinstance(obj[k], str):
                errors.append((line_no, f"key {k!r} holds {type(obj[k]).__name__}, expected a string"))
                break
            texts.append(obj[k])
        else:
            try:
                encoded = [tok.tokenize(text) for text in texts]
            except ValueError as e:
                errors.append((line_no, f"cannot tokenize: {e}"))
                continue
            for k, ids in zip(keys, encoded):
                if ids and eod is not None:  # Megatron appends EOD to non-empty documents only
                    ids.append(eod)
                per_key[k][0].append(ids)
                per_key[k][1].append(len(ids))
            docs += 1
    out = {}
    for k, (id_lists, lengths) in per_key.items():
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=sum(lengths))
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
            raise PreprocessError(f"token ids up to {flat.max()} do not fit {dtype}")
        out[k] = (flat.astype(dtype), np.asarray(lengths, dtype=np.int64))
    return out, errors, docs


# -- main side ---------------------------------------------------------------------------
def _open_input(path: str):
    if os.path.isdir(path):
        raise PreprocessError(f"--input {path} is a directory; pass one JSONL file (.jsonl or .jsonl.gz). For "
                              "many files, run once per file and join the outputs with tools/merge_datasets.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path} does not exist")
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        return gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise PreprocessError(f"--input {path}: cannot read it ({e.strerror or e})") from e


def _check_output_prefix(output_prefix: str) -> None:
    """The folder of --output-prefix exists or can be made, and is writable."""
    folder = os.path.dirname(os.path.abspath(output_prefix))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PreprocessError(f"--output-prefix {output_prefix}: {existing} is a file, so the folder {folder} "
                              "cannot be made; choose an output path in a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".preprocess-write-test.{os.getpid()}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise PreprocessError(f"--output-prefix {output_prefix}: cannot write in {folder} "
                              f"({e.strerror or e}); choose a writable output path") from e


def _batches(f, batch_bytes: int, counter: list, path: str = "--input"):
    try:
        yield from _read_batches(f, batch_bytes, counter)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise PreprocessError(f"{path}: cannot read it past byte {counter[0]} of its text ({e}): a truncated or "
                              "corrupt file; re-download or re-compress it") from e


def _read_batches(f, batch_bytes: int, counter: list):
    batch, size = [], 0
    for line_no, raw in enumerate(f, start=1):
        counter[0] += len(raw)
        if not raw.strip():
            continue
        batch.append((line_no, raw))
        size += len(raw)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def preprocess(cfg: PreprocessConfig) -> PreprocessStats:
    """Tokenize `cfg.input` into one dataset per JSON key. Returns counts and output prefixes."""
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {cfg.workers}")
    tok = build_tokenizer(cfg.tokenizer_type, **cfg.tokenizer_kwargs())
    _check_output_prefix(cfg.output_prefix)
    dtype = np.dtype(best_dtype(tok.vocab_size))
    keys = list(cfg.json_keys)
    stats = PreprocessStats(tokens={k: 0 for k in keys},
                            outputs={k: output_prefix_for(cfg.output_prefix, k) for k in keys})
    init_args = (cfg.tokenizer_type, cfg.tokenizer_kwargs(), keys, cfg.append_eod, dtype)
    log = (lambda *a: None) if cfg.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    # Megatron's calling convention: the builder gets the .bin path, finalize() the .idx path
    builders = {k: MMapIndexedDatasetBuilder(data_file_path(stats.outputs[k]), dtype=dtype) for k in keys}
    counter = [0]
    t0 = time.perf_counter()
    next_log = cfg.log_interval
    pool = None
    try:
        with _open_input(cfg.input) as f:
            batches = _batches(f, cfg.batch_bytes, counter, cfg.input)
            if cfg.workers == 1:
                _init_worker(*init_args)
                results = map(_encode_batch, batches)
            else:
                ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=init_args)
                results = _ordered_bounded(pool, batches, window=4 * cfg.workers)
            for out, errors, docs in results:
                if errors:
                    if not cfg.skip_invalid:
                        line_no, msg = errors[0]
                        raise PreprocessError(
                            f"{cfg.input}:{line_no}: {msg}. Fix the line or pass --skip-invalid to skip such lines"
                        )
                    stats.skipped += len(errors)
                    room = 20 - len(stats.skipped_lines)
                    stats.skipped_lines.extend(n for n, _ in errors[:max(room, 0)])
                for k in keys:
                    tokens, lengths = out[k]
                    builders[k].add_documents(tokens, lengths)
                    stats.tokens[k] += int(tokens.size)
                stats.documents += docs
                if cfg.log_interval and stats.documents >= next_log:
                    dt = time.perf_counter() - t0
                    log(f"processed {stats.documents} documents ({stats.documents / dt:.0f} docs/s, "
                        f"{counter[0] / dt / 1e6:.2f} MB/s)")
                    next_log = (stats.documents // cfg.log_interval + 1) * cfg.log_interval
        for k, b in builders.items():
            b.finalize(index_file_path(stats.outputs[k]))
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.input_bytes = counter[0]
    stats.seconds = time.perf_counter() - t0
    dt = max(stats.seconds, 1e-9)
    log(f"done: {stats.documents} documents, {stats.input_bytes / 1e6:.1f} MB in {stats.seconds:.1f} s "
        f"({stats.documents / dt:.0f} docs/s, {stats.input_bytes / dt / 1e6:.2f} MB/s, {cfg.workers} workers)")
    if stats.skipped:
        log(f"skipped {stats.skipped} invalid lines (first: {stats.skipped_lines[:10]})")
    for k in keys:
        log(f"  {k}: {stats.tokens[k]} tokens ({dtype}) -> {stats.outputs[k]}.bin/.idx")
    return stats


def _ordered_bounded(pool, batches, window: int):
    """`pool.imap` with at most `window` batches in flight (imap reads its whole input eagerly)."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_batch, (batch,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def merge_datasets(input_prefixes: Sequence[str], output_prefix: str) -> MMapIndexedDataset:
    """Concatenate datasets (same dtype) in the order given into one `.bin/.idx` pair."""
    if not input_prefixes:
        raise PreprocessError("merge needs at least one input prefix")
    first = MMapIndexedDataset(input_prefixes[0])
    builder = MMapIndexedDatasetBuilder(data_file_path(output_prefix), dtype=first.dtype)
    try:
        for prefix in input_prefixes:
            builder.merge_file_(prefix)
    except BaseException:
        builder.abort()
        raise
    builder.finalize(index_file_path(output_prefix))
    return MMapIndexedDataset(output_prefix)


def find_prefixes(directory: str) -> list[str]:
    """All `.bin/.idx` prefixes in a directory, sorted (what Megatron's merge tool does)."""
    names = sorted(n[:-4] for n in os.listdir(directory) if n.endswith(".idx"))
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n + ".bin"))]


__all__ = ["PreprocessConfig", "PreprocessError", "PreprocessStats", "find_prefixes", "merge_datasets",
           "output_prefix_for", "preprocess"]
