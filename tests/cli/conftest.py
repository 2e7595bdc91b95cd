"""Fixtures of the CLI error tests: a tiny dataset, damaged copies of it, tokenizer files."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

VOCAB = 100  # NullTokenizer --vocab-size: ids 0..99, EOD 100
_HEADER = struct.Struct("<9sQBQQ")


def write_dataset(prefix: str, docs: list, dtype=np.uint16) -> str:
    with MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype) as b:
        for d in docs:
            b.add_item(np.asarray(d, dtype=np.int64))
            b.end_document()
    return prefix


def _docs(n: int, seed: int, vocab: int = VOCAB) -> list:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, vocab, rng.integers(20, 80))) + [vocab] for _ in range(n)]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _copy(src: str, dst: str) -> str:
    for ext in (".bin", ".idx"):
        shutil.copyfile(src + ext, dst + ext)
    return dst


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    """Prefixes by name: "good" (60 documents), "tiny" (1 document), "wide" (ids up to 299),
    "empty" (no tokens), and damaged copies of "good" named after the damage."""
    d = str(tmp_path_factory.mktemp("cli_data"))
    p = {"dir": d}
    p["good"] = write_dataset(os.path.join(d, "good"), _docs(60, 0))
    p["tiny"] = write_dataset(os.path.join(d, "tiny"), _docs(1, 1))
    p["wide"] = write_dataset(os.path.join(d, "wide"), _docs(60, 2, vocab=299))
    p["empty"] = write_dataset(os.path.join(d, "empty"), [[]])
    good = p["good"]
    n_seq, n_doc = 60, 61
    sizes_at, pointers_at = _HEADER.size, _HEADER.size + 4 * n_seq
    doc_at = pointers_at + 8 * n_seq

    def damaged(name: str, damage) -> None:
        p[name] = _copy(good, os.path.join(d, name))
        damage(p[name])

    damaged("idx_header_cut", lambda q: os.truncate(q + ".idx", 10))
    damaged("idx_cut", lambda q: os.truncate(q + ".idx", os.path.getsize(q + ".idx") - 8))
    damaged("idx_long", lambda q: open(q + ".idx", "ab").write(b"\0" * 8))
    damaged("bad_magic", lambda q: _patch(q + ".idx", 0, b"NOTANIDX\0"))
    damaged("bad_version", lambda q: _patch(q + ".idx", 9, struct.pack("<Q", 7)))
    damaged("bad_dtype", lambda q: _patch(q + ".idx", 17, bytes([99])))
    damaged("legacy", lambda q: _patch(q + ".idx", 0, b"TNTIDX\0\0"))
    damaged("bin_cut", lambda q: os.truncate(q + ".bin", os.path.getsize(q + ".bin") - 10))
    damaged("bin_long", lambda q: open(q + ".bin", "ab").write(b"\1\2\3"))
    damaged("bad_pointers", lambda q: _patch(q + ".idx", pointers_at + 8, struct.pack("<q", 3)))
    damaged("negative_size", lambda q: _patch(q + ".idx", sizes_at + 4 * (n_seq - 1), struct.pack("<i", -5)))
    damaged("bad_doc_end", lambda q: _patch(q + ".idx", doc_at + 8 * (n_doc - 1), struct.pack("<q", n_seq + 4)))
    damaged("bad_doc_order", lambda q: _patch(q + ".idx", doc_at + 8 * 5, struct.pack("<q", 50)))
    damaged("no_bin", lambda q: os.remove(q + ".bin"))
    # a .bin/.idx pair from different runs: the index of "good", the tokens of "tiny"
    damaged("mixed_pair", lambda q: shutil.copyfile(p["tiny"] + ".bin", q + ".bin"))
    return p


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory) -> dict:
    from tests.upstream.scripts import write_tokenizer_files

    d = str(tmp_path_factory.mktemp("cli_tokenizers"))
    files = write_tokenizer_files(d)
    files["not_json"] = os.path.join(d, "not-json-vocab.json")
    with open(files["not_json"], "w") as f:
        f.write("Ġ 0\nt 1\n")  # a vocabulary, but not JSON
    files["dir"] = d
    return files
