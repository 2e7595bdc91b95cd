"""The planner's long-context terms against exact measurements.

Small scale, real tensors: one training step of the real model with every trick on (sequence
tiling of every layer part, head-chunked attention, tiled loss, full recompute, activation
offload, ZeRO-3 through FSDP2 with bf16 gathers, bf16 residual stream), measured by
MemoryTracker on two gloo ranks (SP 2), the same harness as the full-scale estimate
(megatron.planning.measure.measure_step). The device peak, the peak of each moment of the
step (forward, loss backward, layers' backward) and the bytes the offloader keeps in host
memory must agree with `estimate_memory` (15 %, the host bytes exactly).

Reduced full scale, fake tensors: the Llama-3-8B shape with 2 layers at 512k tokens, one rank of
SP 8 / ZeRO-3 through torch's fake process group (benchmarks/long_context_full_scale.py
runs all 32 layers at 1M and 4M tokens; docs/long-context-memory.md has its numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron.config import ModelConfig, ParallelConfig
from megatron.planning.measure import measure_step
from megatron.planning.memory_estimate import estimate_memory

TOLERANCE = 0.15
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig.llama(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=192,
                        vocab_size=512, max_position_embeddings=1 << 16, hidden_dropout=0.0, attention_dropout=0.0)
TRICKS = dict(projection_tiles=4, mlp_tiles=4, attention_head_chunks=4, loss_tile_tokens=128,
              recompute_granularity="full", offload_activations=True)


def _moments(est: dict) -> dict:
    ph, st = est["phases"], est["static"]
    return {"forward": max(ph["forward_end"], ph.get("first_forward", 0)) - st,
            "loss_backward": ph["loss_backward"] - st,
            "layers_backward": max(ph["layer_forward"], ph["layer_backward"]) - st}


def assert_plan_matches(measured: dict, cfg, seq, parallel, precision, world=1, what=""):
    est = estimate_memory(cfg, seq, precision=precision, device="cpu", parallel=parallel,
                          data_parallel_size=world // parallel.sequence_parallel_size)
    pairs = [("peak", est["peak_above_states"], measured["peak_above_states"])]
    pairs += [(k, v, measured["moments"][k]) for k, v in _moments(est).items()]
    for name, e, m in pairs:
        err = (e - m) / m
        assert abs(err) <= TOLERANCE, f"{what} {name}: planned {e / 2**20:.2f} MiB, measured {m / 2**20:.2f} MiB " \
                                      f"({100 * err:+.1f} %)"
    assert est["host_activations"] == measured["host_peak"], (est["host_activations"], measured["host_peak"])
    assert est["static"] == measured["static"] or abs(est["static"] - measured["static"]) < 0.01 * est["static"]


def _step(seq, precision, fields):
    import torch.distributed as dist  # noqa: PLC0415

    par = ParallelConfig(sequence_parallel_size=dist.get_world_size(), **fields)
    return measure_step(CFG, seq, par, precision=precision, fake=False)


@pytest.mark.parametrize("precision,fields", [
    ("fp32", {**TRICKS, "zero_stage": 3}),
    ("bf16", {**TRICKS, "zero_stage": 3}),
    ("fp32", {**TRICKS, "recompute_granularity": None, "offload_activations": False}),
], ids=["fp32-zero3", "bf16-zero3", "tiled-no-recompute"])
def test_every_trick_on_two_ranks_matches_the_plan(ranks, precision, fields):
    seq = 4096
    results = ranks(2, _step, seq, precision, fields)
    worst = max(results, key=lambda r: r["peak_above_states"])
    assert_plan_matches(worst, CFG, seq, ParallelConfig(sequence_parallel_size=2, **fields), precision, world=2,
                        what=f"SP 2 {precision} {fields}")


def test_single_device_every_trick_matches_the_plan():
    """SP 1 (what the one-GPU check runs): the tiled layer around a plain local attention."""
    seq, fields = 2048, {**TRICKS, "zero_stage": 0}
    par = ParallelConfig(**fields)
    measured = measure_step(CFG, seq, par, precision="fp32", fake=False)
    assert_plan_matches(measured, CFG, seq, par, "fp32", what="SP 1")


def test_reduced_full_scale_under_fake_tensors_matches_the_plan():
    """Llama-3-8B's shape (2 of its 32 layers) at 512k tokens, one rank of SP 8 / ZeRO-3, bf16."""
    out = subprocess.run([sys.executable, "-m", "megatron.planning.measure", "--preset", "llama3-8b",
                          "--num-layers", "2", "--world-size", "8", "--seq-length", str(1 << 19), "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True, timeout=300)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    from megatron.planning.measure import PRESETS  # noqa: PLC0415

    cfg = PRESETS["llama3-8b"]().replace(num_layers=2)
    par = ParallelConfig(**measured["parallel"])
    assert_plan_matches(measured, cfg, 1 << 19, par, "bf16", world=8, what="Llama-3-8B x2 layers, 512k, SP 8")


def test_ulysses_ring_hybrid_under_fake_tensors_matches_the_plan():
    """The tiled layer around Ulysses (2) x ring (2) attention: the generic path and ring.py's fp32
    accumulators, one rank of SP 4 / ZeRO-3, bf16, under fake tensors."""
    model = dict(num_layers=3, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=512,
                 vocab_size=512, max_position_embeddings=1 << 20, hidden_dropout=0.0, attention_dropout=0.0)
    fields = dict(sequence_parallel_size=4, ring_attention_size=2, zero_stage=3, projection_tiles=4, mlp_tiles=4,
                  attention_head_chunks=2, loss_tile_tokens=256, recompute_granularity="full",
                  offload_activations=True, attention_backend="sdpa")
    out = subprocess.run([sys.executable, "-m", "megatron.planning.measure", "--model-json", json.dumps(model),
                          "--parallel", json.dumps(fields), "--world-size", "4", "--seq-length", "65536", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True, timeout=300)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert_plan_matches(measured, ModelConfig.llama(**model), 65536, ParallelConfig(**fields), "bf16", world=4,
                        what="Ulysses 2 x ring 2")
