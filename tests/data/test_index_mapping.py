import numpy as np
import pytest

from megatron.data.index_mapping import (
    blending_num_samples,
    build_blending_indices,
    build_blending_indices_loop,
    build_doc_idx,
    build_index_mappings,
    build_sample_idx,
    get_train_valid_test_split,
    num_epochs,
)

from .reference import blending_loop, sample_idx_loop


def test_split_hand_checked():
    assert get_train_valid_test_split("949,50,1", 1000) == [0, 949, 999, 1000]
    # 9.49 -> 9, 0.5 -> 0 (round half to even), 0.01 -> 0; the missing document shifts every boundary
    assert get_train_valid_test_split("949,50,1", 10) == [0, 10, 10, 10]
    assert get_train_valid_test_split("98,2,0", 100) == [0, 98, 100, 100]
    assert get_train_valid_test_split("1", 7) == [0, 7, 7, 7]
    assert get_train_valid_test_split("80/10/10", 15) == [0, 11, 13, 15]  # 12, 2, 2 sum to 16: all shift by -1
    assert get_train_valid_test_split("1,1,1", 10) == [0, 4, 7, 10]  # 3, 3, 3 sum to 9: all shift by +1
    with pytest.raises(ValueError, match="--split"):
        get_train_valid_test_split("a,b", 10)


def test_num_epochs():
    # 10 tokens/epoch, seq 4: one epoch gives (10-1)//4 = 2 samples, two give 4, three give 7
    assert [num_epochs(10, 4, n) for n in (0, 1, 2, 3, 4, 5, 7, 8)] == [1, 1, 1, 2, 2, 3, 3, 4]


def test_sample_idx_hand_checked():
    """Documents of 5, 3 and 7 tokens, seq_length 4: samples are stream windows
    [0,5), [4,9), [8,13): the first ends inside doc 0 at its last token, the second
    spans docs 0..2, the third lies in doc 2."""
    sizes = np.array([5, 3, 7], dtype=np.int32)
    doc_idx = np.array([0, 1, 2], dtype=np.int32)
    got = build_sample_idx(sizes, doc_idx, 4, 1, 15)
    expected = np.array([[0, 0], [0, 4], [2, 0], [2, 4]])
    assert np.array_equal(got, expected)
    assert np.array_equal(got, sample_idx_loop(sizes, doc_idx, 4, 1, 15))


def test_sample_idx_spanning_many_documents_and_epochs():
    sizes = np.array([2, 1, 3, 0, 2], dtype=np.int32)  # includes an empty document
    doc_idx = np.array([0, 1, 2, 3, 4, 4, 2, 1, 0, 3], dtype=np.int32)  # two epochs, shuffled
    got = build_sample_idx(sizes, doc_idx, 3, 2, 8)
    # stream (doc_idx positions): 0 0 1 2 2 2 4 4 | 5 5 6 6 6 7 8 8 ; starts at 0,3,6,9,12,15
    expected = np.array([[0, 0], [2, 0], [4, 0], [5, 1], [6, 2], [8, 1]])
    assert np.array_equal(got, expected)
    assert np.array_equal(got, sample_idx_loop(sizes, doc_idx, 3, 2, 8))


@pytest.mark.parametrize("seed", range(6))
def test_sample_idx_matches_loop_random(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 20, size=rng.integers(1, 30)).astype(np.int32)
    sizes[0] = max(sizes[0], 1)
    seq = int(rng.integers(1, 25))
    tpe = int(sizes.sum())
    if tpe < 2:
        return
    epochs = int(rng.integers(1, 4))
    doc_idx = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    assert np.array_equal(build_sample_idx(sizes, doc_idx, seq, epochs, tpe),
                          sample_idx_loop(sizes, doc_idx, seq, epochs, tpe))


def test_doc_idx_matches_megatron_shuffle():
    docs = np.arange(3, 8)
    rng = np.random.RandomState(5)
    got = build_doc_idx(docs, 3, rng, separate_last_epoch=False)
    ref = np.tile(docs, 3).astype(np.int32)
    np.random.RandomState(5).shuffle(ref)
    assert np.array_equal(got, ref) and got.dtype == np.int32
    got = build_doc_idx(docs, 3, np.random.RandomState(5), separate_last_epoch=True)
    r = np.random.RandomState(5)
    a = np.tile(docs, 2).astype(np.int32)
    r.shuffle(a)
    b = docs.astype(np.int32).copy()
    r.shuffle(b)
    assert np.array_equal(got, np.concatenate([a, b]))
    assert sorted(got[-5:]) == list(docs)  # the last epoch stays within its own documents


def test_index_mappings_epochs_and_separate_last_epoch():
    sizes = np.full(10, 10, dtype=np.int32)  # 100 tokens per epoch, seq 10 -> 9 samples per epoch
    docs = np.arange(10)
    # 20 samples: 3 epochs; the first two give (200-1)//10 = 19, the last must give 1 < 80% of 9
    doc_idx, sample_idx, shuffle_idx, info = build_index_mappings(docs, sizes, 20, 10, seed=1)
    assert info["num_epochs"] == 3 and info["separate_last_epoch"]
    assert len(doc_idx) == 30 and sample_idx.shape == ((300 - 1) // 10 + 1, 2)
    # shuffle_idx: [0, 19) shuffled, then [19, 29) shuffled separately
    assert sorted(shuffle_idx[:19]) == list(range(19)) and sorted(shuffle_idx[19:]) == list(range(19, 29))
    # 25 samples: last epoch gives 25 - 19 = 6 < int(0.8 * 9) = 7 -> separated (the boundary case)
    assert build_index_mappings(docs, sizes, 25, 10, seed=1)[3]["separate_last_epoch"]
    # 26 samples: last epoch gives 26 - 19 = 7 >= int(0.8 * 9) = 7 -> not separated
    _, _, shuffle_idx, info = build_index_mappings(docs, sizes, 26, 10, seed=1)
    assert info["num_epochs"] == 3 and not info["separate_last_epoch"]
    assert sorted(shuffle_idx) == list(range(29))
    # same seed, same arrays; another seed, another order
    a = build_index_mappings(docs, sizes, 26, 10, seed=1)
    b = build_index_mappings(docs, sizes, 26, 10, seed=2)
    assert np.array_equal(a[0], build_index_mappings(docs, sizes, 26, 10, seed=1)[0])
    assert not np.array_equal(a[0], b[0])


def test_index_mappings_rng_stream_order():
    """doc_idx shuffle first, then shuffle_idx, from one RandomState(seed)."""
    sizes = np.array([4, 6, 5], dtype=np.int32)
    doc_idx, sample_idx, shuffle_idx, info = build_index_mappings(np.arange(3), sizes, 3, 4, seed=7)
    r = np.random.RandomState(7)
    ref_doc = np.arange(3, dtype=np.int32)
    r.shuffle(ref_doc)
    ref_shuffle = np.arange(len(sample_idx) - 1, dtype=np.uint32)
    r.shuffle(ref_shuffle)
    assert info["num_epochs"] == 1
    assert np.array_equal(doc_idx, ref_doc) and np.array_equal(shuffle_idx, ref_shuffle)


def test_blending_hand_checked():
    kinds, samples = build_blending_indices([0.5, 0.3, 0.2], 10)
    assert kinds.tolist() == [0, 1, 2, 0, 1, 0, 2, 0, 1, 0]
    assert samples.tolist() == [0, 0, 0, 1, 1, 2, 1, 3, 2, 4]
    assert kinds.dtype == np.int16 and samples.dtype == np.int64


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_blending_vectorised_equals_loop(k):
    rng = np.random.default_rng(k)
    for size in (1, 5, 700, 5000):
        w = rng.random(k) ** 2
        w = w / w.sum()
        ref = blending_loop(list(w), size)
        loop = build_blending_indices_loop(w, size)
        fast = build_blending_indices(w, size, window=128, warmup=16)
        for got in (loop, fast):
            assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_blending_exact_counts():
    w = [0.3, 0.7]
    kinds, _ = build_blending_indices(w, 1000)
    assert np.bincount(kinds).tolist() == [300, 700]
    assert blending_num_samples([0.3, 0.7], 1000) == [302, 704]  # ceil(w * N * 1.005)
    assert blending_num_samples([3, 7], 1000) == [302, 704]  # weights are normalised first
