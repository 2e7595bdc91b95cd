"""Dataset sizing and the validation stream of megatron.training.data_iterators, against
Megatron-DeepSpeed's training.py (restated in reference.py)."""

from __future__ import annotations

import ast
import itertools
import os
import types

import numpy as np
import pytest

import megatron
from megatron.arguments import parse_args
from megatron.data.mock import MockGPTDataset
from megatron.training.data_iterators import build_data_iterators, dataset_num_samples

from . import reference as ref

BASE = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 16 --max-position-embeddings 16 "
        "--mock-data --vocab-size 100 --lr 1e-3 --micro-batch-size 1 --seed 5").split()


def _cfg(extra: str, world: int = 1):
    return parse_args(BASE + extra.split(), world_size=world, padded_vocab_size=128)


def _state(dp_rank=0, dp_size=1):
    return types.SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size, sp_rank=0, sp_size=1, ring_size=1)


def test_sizes_as_upstream():
    # --train-iters: train_iters x gbs; valid (iters // interval + 1) x eval_iters x gbs; test eval_iters x gbs
    cfg = _cfg("--train-iters 100 --global-batch-size 8 --eval-interval 10 --eval-iters 2")
    assert dataset_num_samples(cfg) == (800, 11 * 2 * 8, 2 * 8)
    # --train-samples sizes the training set (not a multiple of gbs: upstream keeps it as given)
    cfg = _cfg("--train-samples 1001 --global-batch-size 8 --eval-interval 10 --eval-iters 2")
    assert cfg.train.train_samples == 1001 and cfg.train.train_iters == 125
    assert dataset_num_samples(cfg) == (1001, (125 // 10 + 1) * 2 * 8, 16)
    # --train-tokens stops training earlier but does not change what the datasets hold
    cfg = _cfg("--train-iters 100 --train-tokens 1280 --global-batch-size 8 --eval-interval 10 --eval-iters 2")
    assert cfg.train.train_iters == 10 and cfg.train.dataset_train_iters == 100
    assert dataset_num_samples(cfg) == (800, 11 * 2 * 8, 16)
    # --train-tokens alone: nothing upstream to follow; sized by the iterations it gives
    cfg = _cfg("--train-tokens 1280 --global-batch-size 8 --eval-interval 4 --eval-iters 1")
    assert cfg.train.dataset_train_iters is None and dataset_num_samples(cfg) == (80, 3 * 8, 8)
    for iters, gbs, interval, evals in itertools.product((3, 40), (2, 6), (1, 7), (0, 3)):
        cfg = _cfg(f"--train-iters {iters} --global-batch-size {gbs} --eval-interval {interval} --eval-iters {evals}")
        assert list(dataset_num_samples(cfg)) == ref.datasets_num_samples(iters, gbs, interval, evals)


def _upstream_windows(train_iters, interval, eval_iters, gbs, resume_iteration):
    """{iteration: first validation sample} of every evaluation upstream runs: its iterator
    continues from the resumed count, one window per evaluation, the last after training."""
    consumed = ref.consumed_valid_samples_on_resume(resume_iteration, gbs, interval, eval_iters)
    out = {}
    for it in range(resume_iteration + 1, train_iters + 1):
        if it % interval == 0:
            out.setdefault(it, []).append(consumed)
            consumed += eval_iters * gbs
    out.setdefault(train_iters, []).append(consumed)  # evaluate_and_print_results after train()
    return out


def test_validation_windows_follow_upstream_grid():
    """Our loop evaluates at 0, every eval_interval and at the last iteration once; each of
    those evaluations must read the window upstream reads at that iteration."""
    n = 0
    for iters, interval, eval_iters, gbs in itertools.product((1, 5, 12, 30), (1, 3, 5, 12), (1, 2), (1, 4)):
        cfg = _cfg(f"--train-iters {iters} --global-batch-size {gbs} --eval-interval {interval} "
                   f"--eval-iters {eval_iters}")
        _, valid, _ = build_data_iterators(cfg, _state(), 0)
        size = len(valid.dataset)
        for resume in sorted(r for r in {0, interval, iters // 2, iters - 1} if r < iters):  # our loop's resumes
            upstream = _upstream_windows(iters, interval, eval_iters, gbs, resume)
            for it, starts in upstream.items():
                mine = valid.window_of(it) * eval_iters * gbs
                # where upstream evaluates twice at the last iteration (in the loop and after
                # it) our loop evaluates once, and reads the first of the two windows
                assert mine == starts[0], (iters, interval, eval_iters, gbs, resume, it)
                assert mine + eval_iters * gbs <= size  # the split was sized for it
                n += 1
    print(f"validation windows: {n} evaluations compared")


def _tokens(batches):
    return np.concatenate([mb["tokens"].numpy().ravel() for step in batches for mb in step])


def test_validation_continues_and_resumes(tmp_path):
    cfg = _cfg("--train-iters 9 --global-batch-size 4 --eval-interval 3 --eval-iters 2", world=2)
    eval_samples = 2 * 4
    train, valid, test = build_data_iterators(cfg, _state(0, 2), 0)
    ds = valid.dataset
    assert isinstance(ds, MockGPTDataset) and len(ds) == (9 // 3 + 1) * eval_samples

    def expected(window, rank=0):  # this DP rank's samples of a window, in sampler order
        idx = [i for i in range(window * eval_samples, (window + 1) * eval_samples) if (i % 2) == rank]
        return np.concatenate([ds[i]["text"][:16] for i in idx])

    seen = {}
    for it in range(0, 10):
        if it:
            for _ in range(cfg.num_micro_batches):
                next(train)
        assert train.consumed_samples == it * 4
        if it == 0 or it % 3 == 0 or it == 9:
            seen[it] = _tokens(valid())  # the iteration comes from the training stream
            assert np.array_equal(seen[it], _tokens(valid(iteration=it)))
    assert np.array_equal(seen[0], expected(0)) and np.array_equal(seen[3], expected(0))
    assert np.array_equal(seen[6], expected(1)) and np.array_equal(seen[9], expected(2))
    # the other DP rank reads the other half of the same window
    _, valid1, _ = build_data_iterators(cfg, _state(1, 2), 0)
    assert np.array_equal(_tokens(valid1(iteration=6)), expected(1, rank=1))
    # a run resumed at iteration 6 reads the windows an uninterrupted run reads
    train_r, valid_r, _ = build_data_iterators(cfg, _state(0, 2), 6 * 4)
    for _ in range(3 * cfg.num_micro_batches):
        next(train_r)
    assert np.array_equal(_tokens(valid_r()), seen[9])
    # test: always the first window of its split
    assert len(test.dataset) == eval_samples
    assert np.array_equal(_tokens(test()), _tokens(test()))
    with pytest.raises(ValueError, match="raise --train-iters"):
        valid(iteration=100)


def _megatron_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("megatron"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron"):
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_data_iterators_do_not_import_the_flag_module():
    """No import of megatron.arguments from data_iterators or anything of ours it imports
    (statically, at any depth: a fresh interpreter would cost seconds)."""
    import megatron.training.data_iterators as start

    root = os.path.dirname(os.path.dirname(os.path.abspath(megatron.__file__)))
    todo, seen = [start.__name__], set()
    while todo:
        name = todo.pop()
        path = os.path.join(root, *name.split(".")) + ".py"
        if name in seen or not os.path.isfile(path):
            continue
        seen.add(name)
        for imported in _megatron_imports(path):
            assert imported != "megatron.arguments", f"{name} imports megatron.arguments"
            todo.append(imported)
    assert "megatron.data.mock" in seen and "megatron.data.tokenizers" in seen
