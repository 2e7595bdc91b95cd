import os

import numpy as np
import pytest

from megatron.data.gpt_dataset import (
    BlendedDataset,
    DatasetTooSmallError,
    build_train_valid_test_datasets,
    parse_data_prefix,
    train_valid_test_num_samples,
)
from megatron.data.index_mapping import build_index_mappings, get_train_valid_test_split
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

from .reference import blending_loop, sample_idx_loop, sample_tokens

EOD = 999


def make_dataset(prefix, num_docs=60, max_len=40, seed=0, eod_terminated=True, vocab=50):
    rng = np.random.default_rng(seed)
    b = MMapIndexedDatasetBuilder(str(prefix), dtype=np.uint16)
    for _ in range(num_docs):
        doc = rng.integers(0, vocab, size=rng.integers(1, max_len)).tolist()
        b.add_item(np.array(doc + [EOD] if eod_terminated else doc))
        b.end_document()
    b.finalize()
    return str(prefix)


def check_against_reference(ds, indexed, documents, num_samples, seq, seed):
    doc_idx, _, shuffle_idx, info = build_index_mappings(documents, indexed.sizes, num_samples, seq, seed)
    ref_sample_idx = sample_idx_loop(indexed.sizes, doc_idx, seq, info["num_epochs"], info["tokens_per_epoch"])
    assert np.array_equal(ds.doc_idx, doc_idx) and np.array_equal(ds.shuffle_idx, shuffle_idx)
    assert np.array_equal(ds.sample_idx, ref_sample_idx)
    assert len(ds) >= num_samples
    for i in range(len(ds)):
        ref = sample_tokens(indexed, doc_idx, ref_sample_idx, int(shuffle_idx[i]))
        got = ds[i]["text"]
        assert got.dtype == np.int64 and len(got) == seq + 1
        assert np.array_equal(got, ref)


def test_single_dataset_splits_match_megatron(tmp_path):
    prefix = make_dataset(tmp_path / "d")
    indexed = MMapIndexedDataset(prefix)
    nums = (30, 6, 3)
    train, valid, test = build_train_valid_test_datasets([prefix], "8,1,1", 16, nums, 1234, cache_dir=str(tmp_path / "c"))
    bounds = get_train_valid_test_split("8,1,1", len(indexed))
    for ds, n, i in ((train, nums[0], 0), (valid, nums[1], 1), (test, nums[2], 2)):
        check_against_reference(ds, indexed, np.arange(bounds[i], bounds[i + 1]), n, 16, 1234)


def test_multi_epoch_and_document_spanning_samples(tmp_path):
    prefix = make_dataset(tmp_path / "d", num_docs=5, max_len=6)
    indexed = MMapIndexedDataset(prefix)
    (train, _, _) = build_train_valid_test_datasets(prefix, "1", 7, (40, 0, 0), 3, cache_dir=str(tmp_path))
    assert train.num_epochs > 2
    check_against_reference(train, indexed, np.arange(5), 40, 7, 3)


def test_get_slice_equals_full_sample(tmp_path):
    prefix = make_dataset(tmp_path / "d")
    (train, _, _) = build_train_valid_test_datasets(prefix, "1", 32, (20, 0, 0), 5, cache_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    for i in range(len(train)):
        full = train[i]["text"]
        a = int(rng.integers(0, 33))
        b = int(rng.integers(a, 34))
        assert np.array_equal(train.get_slice(i, a, b), full[a:b])
        starts, lengths = train.pieces(i)
        assert lengths.sum() == 33
        tokens = MMapIndexedDataset(prefix).tokens
        assert np.array_equal(np.concatenate([tokens[s:s + n] for s, n in zip(starts, lengths)]), full)
    with pytest.raises(IndexError):
        train.get_slice(0, 0, 34)
    with pytest.raises(IndexError):
        train.get_slice(len(train), 0, 1)


@pytest.mark.parametrize("eod_terminated", [True, False])
@pytest.mark.parametrize("mode", ["scan", "doc-ends"])
def test_eods_before_matches_scan_of_the_sample(tmp_path, eod_terminated, mode):
    prefix = make_dataset(tmp_path / "d", eod_terminated=eod_terminated, vocab=1000)  # may contain 999 inside
    (train, _, _) = build_train_valid_test_datasets(prefix, "1", 24, (30, 0, 0), 0, cache_dir=str(tmp_path),
                                                    eod_token=EOD, eod_mode=mode)
    indexed = MMapIndexedDataset(prefix)
    interior = any((indexed[i][:-1] == EOD).any() for i in range(len(indexed)))
    for i in range(len(train)):
        full = train[i]["text"]
        for pos in (0, 1, 7, 12, 24):
            hits = np.flatnonzero(full[:pos] == EOD)
            expected = (len(hits), int(hits[-1]) if len(hits) else -1)
            got = train.eods_before(i, pos, EOD)
            if mode == "scan" or not interior or not eod_terminated:
                if mode == "doc-ends" and not eod_terminated and interior:
                    continue  # doc-ends mode only promises EOD-terminated data
                assert got == expected


def test_cache_files_reused_and_keyed(tmp_path):
    prefix = make_dataset(tmp_path / "d")
    cache = tmp_path / "cache"
    build_train_valid_test_datasets(prefix, "1", 16, (10, 0, 0), 1, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all("train_indexmap_10ns_16sl_1s" in f for f in files)
    (again, _, _) = build_train_valid_test_datasets(prefix, "1", 16, (10, 0, 0), 1, cache_dir=str(cache))
    assert sorted(os.listdir(cache)) == files and isinstance(again.doc_idx, np.memmap)  # loaded, not rebuilt
    build_train_valid_test_datasets(prefix, "1", 16, (10, 0, 0), 2, cache_dir=str(cache))  # another seed
    build_train_valid_test_datasets(prefix, "1", 8, (10, 0, 0), 1, cache_dir=str(cache))  # another length
    assert len(os.listdir(cache)) == 12
    # by default the cache lives next to the data
    build_train_valid_test_datasets(prefix, "1", 16, (10, 0, 0), 1)
    assert any("indexmap" in f for f in os.listdir(tmp_path))


def test_blending_weights_and_exact_counts(tmp_path):
    a = make_dataset(tmp_path / "a", seed=1)
    b = make_dataset(tmp_path / "b", seed=2)
    n = 50
    train, valid, test = build_train_valid_test_datasets(["0.3", a, "0.7", b], "9,1,0", 16, (n, 10, 0), 7,
                                                         cache_dir=str(tmp_path / "c"))
    # as in Megatron, a blend holds the sum of what its components were built for (ceil(N * w * 1.005))
    assert isinstance(train, BlendedDataset) and test is None and len(train) == 16 + 36 and len(valid) == 4 + 8
    kinds, samples = blending_loop([0.3, 0.7], len(train))
    assert np.array_equal(train.dataset_index, kinds) and np.array_equal(train.dataset_sample_index, samples)
    assert np.bincount(train.dataset_index[:n]).tolist() == [15, 35]
    # each component was built for ceil(w * N * 1.005) samples (Megatron's margin)
    assert [d.name for d in train.datasets] == ["train", "train"]
    (a_alone, _, _) = build_train_valid_test_datasets(a, "9,1,0", 16, (16, 0, 0), 7, cache_dir=str(tmp_path / "c"))
    for i in range(n):
        src = train.datasets[kinds[i]]
        assert np.array_equal(train[i]["text"], src[samples[i]]["text"])
        assert np.array_equal(train.get_slice(i, 3, 9), src[samples[i]]["text"][3:9])
    first_a = int(np.flatnonzero(kinds == 0)[0])
    assert np.array_equal(train[first_a]["text"], a_alone[0]["text"])  # ceil(.3*50*1.005)=16 samples asked


def test_too_small_and_empty_splits(tmp_path):
    prefix = make_dataset(tmp_path / "d", num_docs=10, max_len=5)
    # a split shorter than one sample is repeated over as many epochs as needed (as in Megatron)
    (tiny, _, _) = build_train_valid_test_datasets(prefix, "1", 4096, (2, 0, 0), 1, cache_dir=str(tmp_path))
    indexed = MMapIndexedDataset(prefix)
    assert tiny.num_epochs > 100 and len(tiny) >= 2
    check_against_reference(tiny, indexed, np.arange(10), 2, 4096, 1)
    # a split without a single token cannot: named error
    b = MMapIndexedDatasetBuilder(str(tmp_path / "empty"), dtype=np.uint16)
    for _ in range(3):
        b.add_item(np.array([], dtype=np.int64))
        b.end_document()
    b.finalize()
    with pytest.raises(DatasetTooSmallError, match=r"train split .*empty \(3 documents\) holds no tokens"):
        build_train_valid_test_datasets(str(tmp_path / "empty"), "1", 8, (1, 0, 0), 1, cache_dir=str(tmp_path))
    train, valid, test = build_train_valid_test_datasets(prefix, "1", 4, (5, 5, 5), 1, cache_dir=str(tmp_path))
    assert valid is None and test is None  # no documents in those splits
    # blended: all components lack a valid split -> None; only some lack it -> error
    assert build_train_valid_test_datasets(["1", prefix, "1", prefix], "1", 4, (5, 5, 0), 1,
                                           cache_dir=str(tmp_path))[1] is None
    big = make_dataset(tmp_path / "big", num_docs=100, max_len=5)
    with pytest.raises(DatasetTooSmallError, match=r"valid split is empty for \[.*/d'\]"):
        build_train_valid_test_datasets(["1", prefix, "1", big], "95,5,0", 4, (5, 5, 0), 1, cache_dir=str(tmp_path))


def test_parse_data_prefix_and_sample_counts():
    assert parse_data_prefix(["x"]) == ([1.0], ["x"])
    assert parse_data_prefix("x") == ([1.0], ["x"])
    assert parse_data_prefix(["0.3", "a", "0.7", "b"]) == ([0.3, 0.7], ["a", "b"])
    with pytest.raises(ValueError, match="alternate"):
        parse_data_prefix(["0.3", "a", "b"])
    with pytest.raises(ValueError, match="not a weight"):
        parse_data_prefix(["a", "0.3"])
    assert train_valid_test_num_samples(100, 8, 10, 2) == (800, 11 * 2 * 8, 16)
