"""Our data pipeline against Megatron-DeepSpeed, on grids of configurations.

Two oracles, both pinned to microsoft/Megatron-DeepSpeed at reference.UPSTREAM_COMMIT:

* tests/data/reference.py: literal, loop-by-loop restatements of upstream's algorithms
  (split boundaries, epochs, doc_idx / sample_idx / shuffle_idx with the separate last
  epoch, the two weight normalisations and the greedy blend, dataset sizing, the
  sampler). Cheap, so the grids are large.
* tests/data/upstream: upstream's own Python files (gpt_dataset.py, blendable_dataset.py,
  dataset_utils.py, indexed_dataset.py, data_samplers.py) run on synthetic `.bin/.idx`
  files; only the compiled C++ helpers are stood in for (see its docstring).

Each test counts the configurations it compared (printed with -s).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron.data.gpt_dataset import (
    BlendedDataset,
    DatasetTooSmallError,
    GPTDataset,
    build_train_valid_test_datasets,
    train_valid_test_num_samples,
)
from megatron.data.index_mapping import (
    blend_weights,
    blending_num_samples,
    build_blending_indices,
    build_index_mappings,
    get_train_valid_test_split,
    normalize_data_path_weights,
    normalize_weights,
)
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron.data.samplers import MegatronPretrainingSampler

from . import reference as ref
from . import upstream


def _report(name, n):
    print(f"{name}: {n} configurations compared with Megatron-DeepSpeed@{ref.UPSTREAM_COMMIT[:10]}")


# -- against the restatements --------------------------------------------------------------------
SPLITS = ("949,50,1", "969,30,1", "98,2,0", "8,1,1", "1", "80/10/10", "1,1,1", "100,0,0", "0,1,0", "0,0,1",
          "0.5,0.3,0.2", "1/0/0", "3,3,3,1", "99.9,0.1,0", "7,2")


def test_split_boundaries_grid():
    n = 0
    for split, size in itertools.product(SPLITS, (1, 2, 3, 5, 7, 10, 15, 99, 100, 101, 1001, 12345)):
        assert get_train_valid_test_split(split, size) == ref.split_bounds(split, size), (split, size)
        n += 1
    _report("split boundaries", n)


def _mapping_configs():
    """(sizes, documents, num_samples, seq_length, seed): random corpora, and for each the
    sample counts where the epoch logic changes (epoch edges, the 80% rule, per_epoch + 1,
    splits shorter than one sample)."""
    rng = np.random.default_rng(2024)
    for case in range(70):
        num_docs = int(rng.integers(1, 25))
        sizes = rng.integers(0 if case % 3 == 0 else 1, 12 if case % 4 == 0 else 40, size=num_docs).astype(np.int32)
        if sizes.sum() == 0:
            sizes[-1] = 1
        start = int(rng.integers(0, max(1, num_docs // 3)))
        documents = np.arange(start, num_docs, dtype=np.int32)
        tokens = int(sizes[documents].sum())
        if tokens == 0:
            continue
        seq = int(rng.choice([1, 2, 3, 7, 16, 33, 64, 200] if case % 5 else [tokens + 5, 2 * tokens, 97]))
        per_epoch = (tokens - 1) // seq
        counts = {0, 1, per_epoch, per_epoch + 1, 3 * per_epoch + 2, int(rng.integers(1, 60))}
        for epochs in (2, 3, 5):
            before_last = ((epochs - 1) * tokens - 1) // seq
            edge = int(0.8 * per_epoch)
            counts |= {before_last + 1, before_last + edge - 1, before_last + edge, before_last + edge + 1,
                       (epochs * tokens - 1) // seq}
        for n in sorted(c for c in counts if 0 <= c <= 400):
            yield sizes, documents, n, seq, int(rng.integers(0, 2**31 - 1))


def test_index_mappings_grid():
    n, separate, multi, tiny, last_full = 0, 0, 0, 0, 0
    for sizes, documents, num_samples, seq, seed in _mapping_configs():
        doc_idx, sample_idx, shuffle_idx, info = build_index_mappings(documents, sizes, num_samples, seq, seed)
        r_doc, r_sample, r_shuffle, r_separate = ref.index_mappings_ref(documents, sizes, num_samples, seq, seed)
        what = (sizes.tolist(), documents[0], num_samples, seq, seed)
        assert info["separate_last_epoch"] == r_separate, what
        assert doc_idx.dtype == r_doc.dtype and np.array_equal(doc_idx, r_doc), what
        assert np.array_equal(sample_idx, r_sample), what
        assert shuffle_idx.dtype == r_shuffle.dtype and np.array_equal(shuffle_idx, r_shuffle), what
        tokens = int(sizes[documents].sum())
        n += 1
        separate += r_separate
        multi += info["num_epochs"] > 1
        tiny += tokens < seq + 1
        if info["num_epochs"] > 1:
            before_last = ((info["num_epochs"] - 1) * tokens - 1) // seq
            last_full += num_samples - before_last == (tokens - 1) // seq + 1
    assert separate > 20 and multi > 100 and tiny > 20 and last_full > 5, (separate, multi, tiny, last_full)
    _report(f"index mappings ({multi} multi-epoch, {separate} separate last epoch, {tiny} tiny splits, "
            f"{last_full} with per_epoch + 1 samples in the last epoch)", n)


WEIGHT_SETS = (
    [0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.3, 0.7], [1.0, 0.0], [0.0, 1.0], [0.0, 0.5, 0.5], [0.2, 0.0, 0.8],
    [1.0, 1.0, 1.0], [0.1] * 10, [3.0, 2.0, 1.0], [1e-3, 1 - 1e-3], [0.15, 0.25, 0.6], [0.333, 0.333, 0.334],
    [0.6, 0.3, 0.1], [0.45, 0.45, 0.1], [0.25, 0.25, 0.25, 0.25], [2.5, 7.5], [0.9, 0.05, 0.05], [1.0],
)


def _weight_sets():
    rng = np.random.default_rng(7)
    yield from WEIGHT_SETS
    for k in (2, 3, 4, 5, 8):
        for _ in range(3):
            w = np.round(rng.random(k), int(rng.integers(1, 4)))
            w[0] = max(w[0], 0.05)
            yield [float(x) for x in w]


def test_blending_grid():
    n, flips = 0, 0
    for weights in _weight_sets():
        prefix = list(itertools.chain.from_iterable((str(w), f"p{i}") for i, w in enumerate(weights)))
        for num in (1, 2, 3, 10, 97, 1500):
            _, step1, per_dataset = ref.weights_and_num_samples(prefix, [num])
            assert normalize_data_path_weights(weights) == step1
            assert blending_num_samples(weights, num) == [p[0] for p in per_dataset]
            size = sum(p[0] for p in per_dataset)  # upstream's blend length
            kinds, samples = build_blending_indices(blend_weights(weights), size)
            r_kinds, r_samples = ref.blending_indices_ref(step1, size)
            assert np.array_equal(kinds, r_kinds) and np.array_equal(samples, r_samples), (weights, num)
            once, _ = build_blending_indices(normalize_weights(weights), size)  # a single normalisation
            flips += not np.array_equal(once, r_kinds)
            n += 1
    assert flips > 0  # near-ties exist in this grid (e.g. .7/.2/.1): one normalisation is not enough
    _report(f"blends ({flips} would differ with one normalisation)", n)


def test_zero_weight_component_gets_one_sample():
    kinds, samples = ref.blending_indices_ref(normalize_data_path_weights([0.0, 1.0]), 50)
    assert np.bincount(kinds).tolist() == [1, 49] and kinds[1] == 0
    assert np.array_equal(build_blending_indices(blend_weights([0.0, 1.0]), 50)[0], kinds)


def test_dataset_sizing_grid():
    n = 0
    for iters, gbs, interval, evals, samples in itertools.product((1, 7, 100, 1000), (1, 8, 512), (1, 10, 1000),
                                                                  (0, 1, 10), (None, 1, 4100)):
        upstream_iters = samples // gbs if samples else iters  # update_train_iters
        got = train_valid_test_num_samples(upstream_iters, gbs, interval, evals, train_samples=samples)
        assert list(got) == ref.datasets_num_samples(upstream_iters, gbs, interval, evals, samples)
        n += 1
    _report("dataset sizes", n)


# -- against upstream's own code -------------------------------------------------------------------
@pytest.fixture(scope="module")
def up():
    return upstream.load()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Synthetic datasets: name -> prefix. `empties` has empty documents, `short` fewer tokens
    than most sequence lengths, `multi` documents of several sequences."""
    root = tmp_path_factory.mktemp("upstream_corpora")
    rng = np.random.default_rng(11)
    out = {}
    for name, docs, lo, hi in (("a", 60, 1, 40), ("b", 45, 1, 90), ("c", 30, 1, 12), ("empties", 40, 0, 20),
                               ("short", 6, 1, 4), ("multi", 25, 1, 30)):
        prefix = str(root / name)
        b = MMapIndexedDatasetBuilder(prefix, dtype=np.uint16)
        for _ in range(docs):
            for _ in range(int(rng.integers(1, 4)) if name == "multi" else 1):
                b.add_item(rng.integers(0, 500, size=int(rng.integers(lo, hi))))
            b.end_document()
        b.finalize()
        out[name] = prefix
    # written by upstream's builder the way its preprocess_data.py --append-eod writes (the EOD
    # of each document is in the .bin but not in the index): read by the index, as upstream does
    docs = [[rng.integers(0, 500, size=int(rng.integers(1, 30)))] for _ in range(40)]
    builder = upstream.load().indexed_dataset.make_builder(str(root / "eodbug.bin"), impl="mmap", vocab_size=501)
    for (sentence,) in docs:
        builder.add_doc(sentence.tolist() + [500], [len(sentence)])
    builder.finalize(str(root / "eodbug.idx"))
    out["eodbug"] = str(root / "eodbug")
    return out


def _compare_gpt(mine, theirs, what, check_tokens):
    assert isinstance(mine, GPTDataset), what
    assert len(mine) == len(theirs), what
    assert np.array_equal(mine.doc_idx, theirs.doc_idx), what
    assert np.array_equal(mine.sample_idx, theirs.sample_idx), what
    assert np.array_equal(mine.shuffle_idx, theirs.shuffle_idx), what
    for i in check_tokens(len(mine)):
        assert np.array_equal(mine[i]["text"], theirs[i]["text"]), (what, i)


def _compare(mine, theirs, what):
    def some(n):  # first, last and a few in between
        return sorted({0, n - 1, *range(1, n, max(1, n // 5))}) if n else []

    if theirs is None:
        assert mine is None, what
        return
    if not hasattr(theirs, "datasets"):
        _compare_gpt(mine, theirs, what, some)
        return
    assert isinstance(mine, BlendedDataset) and len(mine) == len(theirs), what
    assert np.array_equal(mine.dataset_index, theirs.dataset_index), what
    assert np.array_equal(mine.dataset_sample_index, theirs.dataset_sample_index), what
    assert len(mine.datasets) == len(theirs.datasets), what
    for a, b in zip(mine.datasets, theirs.datasets):
        _compare_gpt(a, b, what, lambda n: [0] if n else [])
    for i in some(len(mine)):
        assert np.array_equal(mine[i]["text"], theirs[i]["text"]), (what, i)


def _data_paths(c):
    return {
        "single": [c["a"]],
        "weighted one": ["1.0", c["b"]],
        "two": ["0.3", c["a"], "0.7", c["b"]],
        "near tie": ["0.7", c["a"], "0.2", c["b"], "0.1", c["c"]],
        "zero weight": ["0", c["b"], "0.5", c["a"], "0.5", c["multi"]],  # first: the greedy loop takes one
        "zero weight 2": ["0.5", c["a"], "0", c["c"], "0.5", c["multi"]],
        "empty docs": ["2", c["empties"], "1", c["a"]],
        "short": [c["short"]],
        "short blend": ["0.9", c["short"], "0.1", c["c"]],
        "append-eod files": ["0.5", c["eodbug"], "0.5", c["a"]],
    }


GRID = [  # (data path, split, seq_length, (train, valid, test) samples, seed)
    (path, split, seq, nums, seed)
    for path in ("single", "weighted one", "two", "near tie", "zero weight", "zero weight 2", "empty docs", "short",
                 "short blend", "append-eod files")
    for split, seq, nums, seed in (
        ("949,50,1", 16, (40, 12, 4), 1234),  # one epoch (a test split of 0 or 1 documents)
        ("8,1,1", 7, (300, 60, 30), 3),  # several epochs
        ("80/10/10", 33, (25, 9, 9), 99),  # 80% rule territory
        ("1", 64, (100, 0, 0), 0),  # one split, long samples
        ("90,5,5", 128, (3, 2, 2), 5),  # splits shorter than one sample
    )
]


@pytest.mark.filterwarnings("ignore:.*append-eod")
@pytest.mark.parametrize("path,split,seq,nums,seed", GRID, ids=[f"{g[0]}-{g[1]}-{g[2]}" for g in GRID])
def test_datasets_match_upstream_code(up, corpora, tmp_path, path, split, seq, nums, seed):
    data_path = _data_paths(corpora)[path]
    try:
        theirs = up.gpt_dataset.build_train_valid_test_datasets(
            data_path, "mmap", split, list(nums), seq, seed, True, data_cache_path=str(tmp_path / "upstream"))
    except AssertionError:
        # A zero-weight component whose split yields no sample: upstream drops it (an empty
        # dataset is falsy) and then finds one weight too many. We refuse with a message if
        # the blend would read from it, and otherwise build the blend (it never reads it).
        try:
            mine = build_train_valid_test_datasets(data_path, split, seq, nums, seed,
                                                   cache_dir=str(tmp_path / "ours"))
        except DatasetTooSmallError as e:
            assert "built with 0" in str(e) or "split is empty" in str(e)
            return
        empty = [(ds, k, n) for ds, n in zip(mine, nums) if isinstance(ds, BlendedDataset)
                 for k, d in enumerate(ds.datasets) if len(d) == 0]
        assert empty and all(k not in ds.dataset_index[:n] for ds, k, n in empty)
        return
    mine = build_train_valid_test_datasets(data_path, split, seq, nums, seed, cache_dir=str(tmp_path / "ours"))
    for s, name in enumerate(("train", "valid", "test")):
        if nums[s] == 0:  # upstream still builds a dataset nobody reads; we return None
            assert mine[s] is None
            continue
        _compare(mine[s], theirs[s], (path, split, seq, nums, seed, name))


def test_sampler_matches_upstream_code(up):
    n = 0
    for total, consumed, mbs, dp in itertools.product((1, 7, 64, 100), (0, 3, 8, 40), (1, 2, 4), (1, 2, 3)):
        if consumed >= total:
            continue
        for rank in range(dp):
            theirs = list(up.data_samplers.MegatronPretrainingSampler(total, consumed, mbs, rank, dp))
            mine = list(MegatronPretrainingSampler(total, consumed, mbs, rank, dp))
            assert mine == theirs == ref.sampler_batches(total, consumed, mbs, rank, dp)
            n += 1
    _report("sampler streams", n)
