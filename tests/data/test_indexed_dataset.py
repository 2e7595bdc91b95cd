import os
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
)


def _build(prefix, seqs, dtype=np.uint16, docs=None):
    """Write `seqs`; `docs` = number of sequences per document (default one each)."""
    b = MMapIndexedDatasetBuilder(str(prefix), dtype=dtype)
    docs = docs or [1] * len(seqs)
    it = iter(seqs)
    for n in docs:
        for _ in range(n):
            b.add_item(np.asarray(next(it)))
        b.end_document()
    b.finalize()
    return str(prefix)


def test_best_dtype():
    assert best_dtype(50257) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(None) is np.int32


def test_exact_bytes_on_disk(tmp_path):
    """The layout Megatron reads, written out by hand for a 2-document dataset."""
    prefix = _build(tmp_path / "d", [[1, 2, 3], [7], [9, 9]], docs=[2, 1])
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 3)
                + struct.pack("<Q", 3) + np.array([3, 1, 2], np.int32).tobytes()
                + np.array([0, 6, 8], np.int64).tobytes() + np.array([0, 2, 3], np.int64).tobytes())
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == np.array([1, 2, 3, 7, 9, 9], np.uint16).tobytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip_and_zero_copy(tmp_path, dtype):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 200, size=rng.integers(0, 50)) for _ in range(30)]
    prefix = _build(tmp_path / "d", seqs, dtype=dtype, docs=[3] * 10)
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 30 and ds.num_documents == 10 and np.dtype(ds.dtype) == np.dtype(dtype)
    assert list(ds.doc_idx) == list(range(0, 31, 3))
    for i, s in enumerate(seqs):
        assert np.array_equal(ds[i], s)
        if len(s) > 3:
            part = ds.get(i, offset=1, length=2)
            assert np.array_equal(part, s[1:3])
            assert not part.flags.owndata and not part.flags.writeable  # a view of the map
    assert np.array_equal(ds.document(2), np.concatenate(seqs[6:9]))
    assert [len(x) for x in ds[3:6]] == [len(s) for s in seqs[3:6]]
    with pytest.raises(IndexError):
        ds.get(0, offset=0, length=len(seqs[0]) + 1)


def test_add_documents_and_add_doc(tmp_path):
    b = MMapIndexedDatasetBuilder(str(tmp_path / "d"), dtype=np.int32)
    b.add_documents(np.array([1, 2, 3, 4, 5]), [2, 0, 3])  # an empty document gets no sequence
    b.add_doc(np.array([6, 7, 8]), [1, 2])  # one document made of two sequences
    b.finalize()
    ds = MMapIndexedDataset(str(tmp_path / "d"))
    assert list(ds.sizes) == [2, 3, 1, 2] and list(ds.doc_idx) == [0, 1, 1, 2, 4]
    assert ds.document(1).size == 0 and list(ds.document(3)) == [6, 7, 8]


def test_dtype_overflow_is_an_error(tmp_path):
    b = MMapIndexedDatasetBuilder(str(tmp_path / "d"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        b.add_item(np.array([70000]))
    b.abort()


def test_nothing_visible_before_finalize(tmp_path):
    prefix = str(tmp_path / "d")
    b = MMapIndexedDatasetBuilder(prefix, dtype=np.uint16)
    b.add_item(np.arange(10))
    b.end_document()
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    b.abort()
    assert os.listdir(tmp_path) == []
    with MMapIndexedDatasetBuilder(prefix, dtype=np.uint16) as b:  # context manager finalizes
        b.add_item(np.arange(4))
        b.end_document()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_merge(tmp_path):
    a = _build(tmp_path / "a", [[1, 2], [3]])
    b = _build(tmp_path / "b", [[4, 5, 6]], docs=[1])
    out = MMapIndexedDatasetBuilder(str(tmp_path / "ab"), dtype=np.uint16)
    out.merge_file_(a)
    out.merge_file_(b)
    out.finalize()
    ds = MMapIndexedDataset(str(tmp_path / "ab"))
    assert [list(x) for x in ds[0:3]] == [[1, 2], [3], [4, 5, 6]] and list(ds.doc_idx) == [0, 1, 2, 3]
    _build(tmp_path / "c", [[1]], dtype=np.int32)
    bad = MMapIndexedDatasetBuilder(str(tmp_path / "x"), dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match="dtype"):
        bad.merge_file_(str(tmp_path / "c"))
    bad.abort()


# -- clear errors ----------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path):
    return _build(tmp_path / "d", [[1, 2, 3], [4, 5]])


def test_missing_files(tmp_path, good):
    with pytest.raises(FileNotFoundError, match="without the extension"):
        MMapIndexedDataset(good + ".bin")
    os.remove(good + ".bin")
    with pytest.raises(FileNotFoundError, match=r"data file .*d\.bin"):
        MMapIndexedDataset(good)
    with pytest.raises(FileNotFoundError, match=r"index file .*nothing\.idx"):
        MMapIndexedDataset(str(tmp_path / "nothing"))


def test_truncated_bin(good):
    with open(good + ".bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(IndexedDatasetError, match=r"d\.bin has 6 bytes .* 10 bytes.*truncated"):
        MMapIndexedDataset(good)


def test_mismatched_pair(tmp_path, good):
    other = _build(tmp_path / "e", [[1, 2, 3, 4, 5, 6, 7]])
    os.replace(other + ".bin", good + ".bin")
    with pytest.raises(IndexedDatasetError, match="longer than its index|different runs"):
        MMapIndexedDataset(good)


def test_truncated_idx(good):
    data = open(good + ".idx", "rb").read()
    open(good + ".idx", "wb").write(data[:-5])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx is truncated"):
        MMapIndexedDataset(good)
    open(good + ".idx", "wb").write(data[:10])
    with pytest.raises(IndexedDatasetError, match="header"):
        MMapIndexedDataset(good)


def test_corrupt_idx(good):
    data = bytearray(open(good + ".idx", "rb").read())
    open(good + ".idx", "wb").write(b"XXXXXXXXX" + data[9:])
    with pytest.raises(IndexedDatasetError, match="not a Megatron mmap index"):
        MMapIndexedDataset(good)
    open(good + ".idx", "wb").write(b"TNTIDX\x00\x00" + data[8:])
    with pytest.raises(IndexedDatasetError, match="legacy"):
        MMapIndexedDataset(good)
    bad_version = data[:9] + struct.pack("<Q", 2) + data[17:]
    open(good + ".idx", "wb").write(bad_version)
    with pytest.raises(IndexedDatasetError, match="version 2"):
        MMapIndexedDataset(good)
    bad_code = data[:17] + bytes([42]) + data[18:]
    open(good + ".idx", "wb").write(bad_code)
    with pytest.raises(IndexedDatasetError, match="dtype code 42"):
        MMapIndexedDataset(good)
    # pointers that disagree with the lengths
    bad_ptr = bytearray(data)
    off = 9 + 8 + 1 + 16 + 2 * 4 + 8  # second pointer
    bad_ptr[off:off + 8] = struct.pack("<q", 2)
    open(good + ".idx", "wb").write(bad_ptr)
    with pytest.raises(IndexedDatasetError, match="pointers"):
        MMapIndexedDataset(good)


def test_pickle_reopens(good):
    import pickle

    ds = pickle.loads(pickle.dumps(MMapIndexedDataset(good)))
    assert list(ds[1]) == [4, 5]


# -- Megatron's builder interface -------------------------------------------------------------
def _documents(seed=0, n=30, vocab=50257):
    """Documents as Megatron's preprocess_data.py sees them: lists of tokenized sentences,
    some empty (which contribute no sequence), and a few empty documents."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, size=int(rng.integers(0, 25))) for _ in range(int(rng.integers(0, 4)))]
            for _ in range(n)]


def _write_megatron_style(module, out_stem, docs, vocab):
    """What Megatron's tools/preprocess_data.py does with `module.make_builder` (upstream's or ours)."""
    builder = module.make_builder(out_stem + ".bin", impl="mmap", vocab_size=vocab)
    for sentences in docs:
        ids = [int(t) for s in sentences for t in s]
        builder.add_doc(ids, [len(s) for s in sentences if len(s)])
    builder.finalize(out_stem + ".idx")


def _read(stem):
    return open(stem + ".bin", "rb").read(), open(stem + ".idx", "rb").read()


@pytest.mark.parametrize("vocab", [50257, 128000])
def test_megatron_style_builder_calls_write_identical_files(tmp_path, vocab):
    import torch

    from megatron.data import indexed_dataset as ours

    from .upstream import load

    up = load().indexed_dataset
    docs = _documents(vocab=vocab)
    _write_megatron_style(ours, str(tmp_path / "ours_text_document"), docs, vocab)
    _write_megatron_style(up, str(tmp_path / "upstream_text_document"), docs, vocab)
    # our own style: a prefix, add_item + end_document, finalize() without arguments
    b = ours.MMapIndexedDatasetBuilder(str(tmp_path / "prefix_style"), dtype=ours.best_dtype(vocab))
    for sentences in docs:
        for s in sentences:
            if len(s):
                b.add_item(torch.from_numpy(s))
        b.end_document()
    b.finalize()
    expected = _read(str(tmp_path / "upstream_text_document"))
    assert _read(str(tmp_path / "ours_text_document")) == expected
    assert _read(str(tmp_path / "prefix_style")) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(f"{s}.{e}" for s in ("ours_text_document", "prefix_style",
                                                                       "upstream_text_document")
                                                   for e in ("bin", "idx"))  # no x.bin.bin
    # upstream's reader reads what we wrote, document for document
    theirs = up.MMapIndexedDataset(str(tmp_path / "ours_text_document"), skip_warmup=True)
    mine = MMapIndexedDataset(str(tmp_path / "ours_text_document"))
    assert np.array_equal(theirs.doc_idx, mine.doc_idx) and np.array_equal(theirs.sizes, mine.sizes)
    assert all(np.array_equal(theirs[i], mine[i]) for i in range(len(mine)))


def test_builder_default_dtype_and_paths_as_megatron(tmp_path):
    """`MMapIndexedDatasetBuilder(out_file)` defaults to int64 as upstream; the index may go
    anywhere; a bare prefix still works; an index path given as the data file is refused."""
    import torch

    from .upstream import load

    up = load().indexed_dataset
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([70000]), torch.tensor([1])]
    for module, stem in ((up, "u"), (None, "o")):
        builder = (module.MMapIndexedDatasetBuilder if module else MMapIndexedDatasetBuilder)(
            str(tmp_path / f"{stem}.bin"))
        for s in seqs:
            builder.add_item(s)
            builder.end_document()
        builder.finalize(str(tmp_path / "idx" / f"{stem}.idx") if module is None else str(tmp_path / f"{stem}.idx"))
    assert open(tmp_path / "o.bin", "rb").read() == open(tmp_path / "u.bin", "rb").read()
    assert open(tmp_path / "idx" / "o.idx", "rb").read() == open(tmp_path / "u.idx", "rb").read()
    assert MMapIndexedDataset(str(tmp_path / "u")).dtype is np.int64
    with pytest.raises(ValueError, match=r"index path.*x\.bin"):
        MMapIndexedDatasetBuilder(str(tmp_path / "x.idx"))
    b = MMapIndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match=r"data path.*y\.idx"):
        b.finalize(str(tmp_path / "y.bin"))
    b.abort()


def _write_like_megatron_deepspeed_append_eod(up, stem, docs, eod):
    """Megatron-DeepSpeed's tools/preprocess_data.py --append-eod (at the pinned commit): the
    EOD is written after each non-empty document but left out of the sentence lengths."""
    builder = up.make_builder(stem + ".bin", impl="mmap", vocab_size=50257)
    for sentences in docs:
        ids = [int(t) for s in sentences for t in s]
        lens = [len(s) for s in sentences if len(s)]
        if ids:
            ids.append(eod)
        builder.add_doc(ids, lens)
    builder.finalize(stem + ".idx")


def test_reads_megatron_deepspeed_append_eod_files_as_megatron_does(tmp_path):
    from .upstream import load

    up = load().indexed_dataset
    stem = str(tmp_path / "ds_text_document")
    _write_like_megatron_deepspeed_append_eod(up, stem, _documents(seed=3), eod=50256)
    theirs = up.MMapIndexedDataset(stem, skip_warmup=True)
    with pytest.warns(UserWarning, match="append-eod"):
        mine = MMapIndexedDataset(stem)
    assert mine.unindexed_eods and len(mine) == len(theirs)
    assert all(np.array_equal(mine[i], theirs[i]) for i in range(len(mine)))
    assert len(mine.tokens) == mine.num_tokens  # the surplus tail is not part of the dataset
    # any other surplus is still an error
    with open(stem + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match="longer than its index"):
        MMapIndexedDataset(stem)
