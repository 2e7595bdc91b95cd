import numpy as np
import pytest
import torch

from megatron.core.documents import Documents
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron.data.sharding import (
    MegatronPretrainingSampler,
    get_sp_batch,
    sp_batch_iterator,
    sp_slice_bounds,
)

from .reference import ltor_masks_and_position_ids

EOD = 7
FLAGS = [dict(reset_position_ids=a, reset_attention_mask=b, eod_mask_loss=c)
         for a in (False, True) for b in (False, True) for c in (False, True)]


def make_data(tmp_path, kind, seed=0, seq=48, n=12):
    """kind: 'eod' (every document ends with EOD), 'none' (no EOD at all),
    'interior' (EODs also inside documents and some documents without one)."""
    rng = np.random.default_rng(seed)
    b = MMapIndexedDatasetBuilder(str(tmp_path / kind), dtype=np.uint16)
    for _ in range(40):
        doc = rng.integers(8, 30, size=rng.integers(1, 20))
        if kind == "interior":
            doc[rng.random(len(doc)) < 0.15] = EOD
            if rng.random() < 0.5:
                doc = np.append(doc, EOD)
        elif kind == "eod":
            doc = np.append(doc, EOD)
        b.add_item(doc)
        b.end_document()
    b.finalize()
    (train, _, _) = build_train_valid_test_datasets(str(tmp_path / kind), "1", seq, (n, 0, 0), seed,
                                                    cache_dir=str(tmp_path), eod_token=EOD)
    return train


@pytest.mark.parametrize("kind", ["eod", "none", "interior"])
@pytest.mark.parametrize("flags", FLAGS)
def test_sp_slices_concatenate_to_megatron_full_sample(tmp_path, kind, flags):
    seq = 48
    ds = make_data(tmp_path, kind, seq=seq)
    idx = list(range(len(ds)))
    full = torch.stack([torch.from_numpy(ds[i]["text"]) for i in idx])  # [b, seq + 1]
    tokens, labels = full[:, :-1], full[:, 1:]
    ref_mask, ref_loss, ref_pos = ltor_masks_and_position_ids(tokens, EOD, **flags)
    for p in (1, 2, 4, 8):
        parts = [get_sp_batch(ds, idx, seq, r, p, EOD, **flags) for r in range(p)]
        cat = {k: torch.cat([x[k] for x in parts], dim=1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        assert parts[0]["tokens"].shape == (len(idx), seq // p) and parts[0]["tokens"].dtype == torch.long
        assert parts[0]["loss_mask"].dtype == torch.float32
        assert torch.equal(cat["tokens"], tokens) and torch.equal(cat["labels"], labels)
        assert torch.equal(cat["loss_mask"], ref_loss)
        assert torch.equal(cat["position_ids"], ref_pos)
        if not flags["reset_attention_mask"]:
            assert all(x["segment_ids"] is None for x in parts)
            continue
        seg = torch.cat([x["segment_ids"] for x in parts], dim=1)  # what the model all-gathers
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        allowed = (j <= i) & (seg[:, :, None] == seg[:, None, :])  # [b, s, s]
        assert torch.equal(allowed, ~ref_mask[:, 0])
        # every rank's Documents (from the EOD index, no other rank's tokens) are the whole
        # sample's documents: the same mask, with no gather and no host sync in the model
        for x in parts:
            docs = x["documents"]
            assert docs.lengths == Documents.from_segment_ids(seg).lengths
            ids = docs.segment_ids
            assert torch.equal((j <= i) & (ids[:, :, None] == ids[:, None, :]), ~ref_mask[:, 0])


def test_hand_checked_slice(tmp_path):
    """seq 8, P 2, one sample  a b EOD c d EOD e f | g : rank 1 holds c..f after one EOD."""
    b = MMapIndexedDatasetBuilder(str(tmp_path / "h"), dtype=np.uint16)
    for doc in ([10, 11, EOD], [12, 13, EOD], [14, 15, 16, EOD]):
        b.add_item(np.array(doc))
        b.end_document()
    b.finalize()
    from megatron.data.gpt_dataset import GPTDataset
    from megatron.data.indexed_dataset import MMapIndexedDataset

    ds = GPTDataset("train", MMapIndexedDataset(str(tmp_path / "h")), np.arange(3), 1, 8, 0, cache_dir=str(tmp_path))
    ds.shuffle_idx = np.array([0])  # look at the unshuffled stream
    ds.doc_idx = np.array([0, 1, 2], dtype=np.int32)
    ds.sample_idx = np.array([[0, 0], [2, 2]])
    out = get_sp_batch(ds, [0], 8, 1, 2, EOD, True, True, True)
    assert out["tokens"].tolist() == [[13, EOD, 14, 15]]
    assert out["labels"].tolist() == [[EOD, 14, 15, 16]]
    assert out["position_ids"].tolist() == [[1, 2, 0, 1]]
    assert out["segment_ids"].tolist() == [[1, 1, 2, 2]]
    assert out["loss_mask"].tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_rank_reads_only_its_slice(tmp_path, monkeypatch):
    ds = make_data(tmp_path, "eod", seq=64)
    seen = []
    real = ds.indexed.tokens

    class Spy:
        def __getitem__(self, key):
            seen.append(key.stop - key.start)
            return real[key]

    monkeypatch.setattr(type(ds.indexed), "tokens", property(lambda self: Spy()))
    get_sp_batch(ds, [0, 1], 64, 3, 4, EOD, True, True, True)
    assert sum(seen) == 2 * (64 // 4 + 1)  # 16 inputs + 1 label token per sample, nothing else


def test_errors(tmp_path):
    ds = make_data(tmp_path, "eod", seq=48)
    with pytest.raises(ValueError, match="divisible by --ds-sequence-parallel-size 5"):
        get_sp_batch(ds, [0], 48, 0, 5, EOD)
    with pytest.raises(ValueError, match="--seq-length 48"):
        get_sp_batch(ds, [0], 96, 0, 2, EOD)
    with pytest.raises(ValueError, match="eod_token"):
        get_sp_batch(ds, [0], 48, 0, 2, None, eod_mask_loss=True)
    assert sp_slice_bounds(48, 2, 4) == (24, 36)


def test_sampler_megatron_semantics():
    s = MegatronPretrainingSampler(10, 0, 2, 1, 2)
    assert list(s) == [[2, 3], [6, 7]]  # global batches [0..3], [4..7]; 8, 9 dropped
    assert list(MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False)) == [[0, 1], [4, 5], [8, 9]]
    assert list(MegatronPretrainingSampler(10, 4, 2, 0, 2)) == [[4, 5]]
    with pytest.raises(ValueError, match="consumed_samples=10"):
        MegatronPretrainingSampler(10, 10, 2, 0, 2)
    with pytest.raises(ValueError, match="rank 2"):
        MegatronPretrainingSampler(10, 0, 2, 2, 2)


@pytest.mark.parametrize("dp_before,dp_after", [(2, 4), (4, 1), (3, 3)])
def test_resume_continues_exactly_for_any_dp(dp_before, dp_after):
    total, mbs, steps = 120, 2, 3
    def run(dp, consumed, n_steps):
        its = [iter(MegatronPretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
        order = []
        for _ in range(n_steps):
            for it in its:
                order.extend(next(it))
        return order
    first = run(dp_before, 0, steps)
    consumed = steps * mbs * dp_before
    resumed = run(dp_after, consumed, 2)
    uninterrupted = list(range(total))
    assert first + resumed == uninterrupted[: len(first) + len(resumed)]


def test_iterator_yields_rank_batches(tmp_path):
    ds = make_data(tmp_path, "eod", seq=48, n=20)
    it = sp_batch_iterator(ds, consumed_samples=4, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2,
                           seq_length=48, sp_rank=1, sp_size=2, eod_token=EOD, reset_attention_mask=True)
    first = next(it)
    assert set(first) == {"tokens", "labels", "loss_mask", "position_ids", "segment_ids", "documents"}
    assert torch.equal(first["tokens"], torch.from_numpy(np.stack([ds[i]["text"][24:48] for i in (6, 7)])))


def _dist_attention_case(prefix_dir):
    """Each rank builds its own SP batch, the model all-gathers segment_ids, DistributedAttention
    runs the classic backend on full sequences: output equals attention with Megatron's mask."""
    import torch.distributed as dist

    from megatron.core.sequence_parallel import DistributedAttention
    from megatron.model.attention_backends import build_local_attention

    p, r = dist.get_world_size(), dist.get_rank()
    seq, heads, dim = 32, 4, 8
    (ds, _, _) = build_train_valid_test_datasets(prefix_dir + "/interior", "1", seq, (4, 0, 0), 0,
                                                 cache_dir=prefix_dir, eod_token=EOD)
    idx = [0, 1]
    mine = get_sp_batch(ds, idx, seq, r, p, EOD, reset_attention_mask=True)
    gathered = [torch.empty_like(mine["segment_ids"]) for _ in range(p)]
    dist.all_gather(gathered, mine["segment_ids"])
    seg = torch.cat(gathered, dim=1)  # [b, s]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, len(idx), heads, dim, generator=g) for _ in range(3))  # [s, b, h, d]
    sl = seq // p
    attn = DistributedAttention(build_local_attention("classic", causal=True, layout="sbhd"), dist.group.WORLD)
    out = attn(q[r * sl:(r + 1) * sl], k[r * sl:(r + 1) * sl], v[r * sl:(r + 1) * sl], segment_ids=seg)
    full = torch.stack([torch.from_numpy(ds[i]["text"][:-1]) for i in idx])
    masked, _, _ = ltor_masks_and_position_ids(full, EOD, False, True, False)  # [b, 1, s, s] True = masked
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / dim ** 0.5
    ref = torch.einsum("bhst,tbhd->sbhd", scores.masked_fill(masked, float("-inf")).softmax(-1), v)
    return float((out - ref[r * sl:(r + 1) * sl]).abs().max())


def test_document_mask_through_distributed_attention(tmp_path, ranks):
    make_data(tmp_path, "interior", seq=32, n=4)  # writes the data and the caches
    for err in ranks(2, _dist_attention_case, str(tmp_path)):
        assert err < 1e-5


def _collective_build(prefix, cache_dir):
    """Every rank builds the datasets; only rank 0 may compute the index, the others load it."""
    import torch.distributed as dist

    import megatron.data.gpt_dataset as gd

    calls = []
    real = gd.build_index_mappings
    gd.build_index_mappings = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        (train, _, _) = gd.build_train_valid_test_datasets(prefix, "1", 16, (10, 0, 0), 3, cache_dir=cache_dir,
                                                           eod_token=EOD)
    finally:
        gd.build_index_mappings = real
    return dist.get_rank(), len(calls), np.asarray(train.shuffle_idx).tolist(), train[0]["text"].tolist()


def test_index_built_once_by_rank0_others_wait(tmp_path, ranks):
    ds = make_data(tmp_path, "eod", seq=48)
    out = ranks(2, _collective_build, ds.indexed.path_prefix, str(tmp_path / "shared_cache"))
    assert [(r, n) for r, n, _, _ in out] == [(0, 1), (1, 0)]
    assert out[0][2:] == out[1][2:]


def test_blended_dataset_sp_slices(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_data(tmp_path / "a", "interior", seed=1)
    b = make_data(tmp_path / "b", "eod", seed=2)
    (blend, _, _) = build_train_valid_test_datasets(["0.4", a.indexed.path_prefix, "0.6", b.indexed.path_prefix],
                                                    "1", 48, (10, 0, 0), 0, cache_dir=str(tmp_path), eod_token=EOD)
    idx = list(range(len(blend)))
    tokens = torch.stack([torch.from_numpy(blend[i]["text"][:-1]) for i in idx])
    _, ref_loss, ref_pos = ltor_masks_and_position_ids(tokens, EOD, True, True, True)
    parts = [get_sp_batch(blend, idx, 48, r, 4, EOD, True, True, True) for r in range(4)]
    assert torch.equal(torch.cat([x["position_ids"] for x in parts], 1), ref_pos)
    assert torch.equal(torch.cat([x["loss_mask"] for x in parts], 1), ref_loss)


@pytest.mark.parametrize("sp,ring", [(2, 2), (4, 2), (4, 4), (8, 2), (6, 3)])
def test_ring_zigzag_slices_match_sequence_shard_indices(tmp_path, sp, ring):
    """With a ring each rank reads its zigzag ranges; they equal the full sample indexed by
    the model's `sequence_shard_indices`, masks and positions included."""
    from megatron.core.sequence_parallel.layout import sequence_shard_indices
    from megatron.data.sharding import sp_token_ranges

    seq = 48
    flags = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    ds = make_data(tmp_path, "interior", seq=seq)
    idx = list(range(len(ds)))
    full = torch.stack([torch.from_numpy(ds[i]["text"]) for i in idx])
    tokens, labels = full[:, :-1], full[:, 1:]
    ref_mask, ref_loss, ref_pos = ltor_masks_and_position_ids(tokens, EOD, **flags)
    whole = get_sp_batch(ds, idx, seq, 0, 1, EOD, **flags)
    for r in range(sp):
        shard = sequence_shard_indices(seq, sp_size=sp, ring_size=ring, sp_rank=r)
        assert len(sp_token_ranges(seq, r, sp, ring)) <= 2
        got = get_sp_batch(ds, idx, seq, r, sp, EOD, ring_size=ring, **flags)
        assert torch.equal(got["tokens"], tokens[:, shard]) and torch.equal(got["labels"], labels[:, shard])
        assert torch.equal(got["loss_mask"], ref_loss[:, shard])
        assert torch.equal(got["position_ids"], ref_pos[:, shard])
        assert torch.equal(got["segment_ids"], whole["segment_ids"][:, shard])
