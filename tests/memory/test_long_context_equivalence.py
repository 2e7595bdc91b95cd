"""Every long-context memory trick keeps the SP model equal to the single-process model
(losses, every gradient, parameters after two SGD steps; fp32, rel < 1e-5), with the
harness of tests/core/test_model_equivalence.py: GPTModel(cfg) against
parallelize_gpt(GPTModel(cfg), ...) on SP 2 x DP 2, document-masked attention."""

from __future__ import annotations

import pytest
import torch

from megatron.config import ParallelConfig
from megatron.model import GPTModel
from megatron.model.sequence_tiling import head_chunks, tiled_map
from megatron.parallel import parallelize_gpt
from tests.core.test_model_equivalence import _equivalence, make_batch, make_config
from tests.utils import rel_err

EVERYTHING = {"projection_tiles": 3, "mlp_tiles": 2, "attention_head_chunks": 4, "loss_tile_tokens": 3,
              "offload_activations": True}


@pytest.mark.parametrize("recompute,extra", [
    ("full", EVERYTHING),
    ("full", {**EVERYTHING, "zero_stage": 3}),
    (None, {"projection_tiles": 2, "attention_head_chunks": 2, "ulysses_overlap_chunks": 2}),
    ("selective", {"attention_head_chunks": 8, "offload_activations": True}),
], ids=["all-tricks", "all-tricks-zero3", "tiles-no-recompute", "chunks-selective-offload"])
def test_long_context_tricks_keep_equivalence(ranks, recompute, extra):
    for errs, worst, *_ in ranks(4, _equivalence, 2, "llama", True, "sdpa", recompute, 2, extra):
        assert max(errs.values()) < 1e-5, (errs, worst)


def test_tiled_layer_with_dropout_and_gpt3_equals_untiled():
    """GeLU/LayerNorm/biases/learned positions, and hidden dropout (the residual adds are then unfused;
    the same RNG draws either way), in one process."""
    cfg = make_config("gpt3").replace(hidden_dropout=0.1)
    tokens, labels, mask, pos, seg = make_batch(0, 2, True)
    results = []
    for extra in ({}, {"projection_tiles": 4, "mlp_tiles": 3, "attention_head_chunks": 3}):
        torch.manual_seed(5)
        model = parallelize_gpt(GPTModel(cfg), None, ParallelConfig(**extra)).train()
        torch.manual_seed(11)
        loss = model(tokens, pos, labels=labels, segment_ids=seg)
        (loss * mask).sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert rel_err(results[1][0], results[0][0]) < 1e-6
    for name, g in results[1][1].items():
        assert rel_err(g, results[0][1][name]) < 1e-5, name


def test_tiled_map_fuses_the_residual_and_sums_weight_gradients():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(13, 2, 8, requires_grad=True)
    r = torch.randn(13, 2, 8, requires_grad=True)
    ref = r + lin(x).relu()
    got = tiled_map(lambda rows, t: lin(t).relu(), (x,), list(lin.parameters()), 4, residual=r)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, r, lin.weight, lin.bias), g)
    have = torch.autograd.grad(got, (x, r, lin.weight, lin.bias), g)
    assert rel_err(got, ref) < 1e-6
    for a, b in zip(have, want):
        assert rel_err(a, b) < 1e-6


def test_head_chunks_follow_the_gqa_groups():
    # 8 query heads reading 2 K/V heads: chunks never straddle a group
    assert head_chunks(8, 2, 8) == [(slice(i, i + 1), slice(i // 4, i // 4 + 1)) for i in range(8)]
    assert head_chunks(8, 2, 3) == [(slice(0, 2), slice(0, 1)), (slice(2, 4), slice(0, 1)),
                                    (slice(4, 6), slice(1, 2)), (slice(6, 8), slice(1, 2))]
    assert head_chunks(8, 2, 1) == [(slice(0, 8), slice(0, 2))]
    assert head_chunks(4, 4, 2) == [(slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4))]
