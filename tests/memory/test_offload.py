"""Activation offload, measured: the bytes that leave the compute device are counted by the
saved-tensor hooks themselves (on CPU the "host" copies are tensors no memory tracker sees),
the device memory they free is measured by MemoryTracker, and the model is unchanged."""

from __future__ import annotations

import torch

from megatron.config import ModelConfig, ParallelConfig
from megatron.model import GPTModel
from megatron.parallel import parallelize_gpt
from megatron.planning.memory_tracker import MemoryTracker

L, N = 4, 256
CFG = ModelConfig.llama(num_layers=L, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                        vocab_size=128, max_position_embeddings=N, hidden_dropout=0.0, attention_dropout=0.0)
LAYER_INPUT = N * CFG.hidden_size * 4  # one [N, 1, h] fp32 layer input


def _step(offload: bool, recompute="full"):
    torch.manual_seed(0)
    model = parallelize_gpt(GPTModel(CFG), None, ParallelConfig(recompute_granularity=recompute,
                                                                offload_activations=offload), data_parallel=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tokens = torch.randint(0, CFG.vocab_size, (1, N), generator=torch.Generator().manual_seed(1))
    with MemoryTracker() as mem:
        loss = model(tokens, labels=tokens)
        forward_end = mem.live
        host_at_forward_end = model.activation_offloader.host_bytes if offload else 0
        loss.sum().backward()
        del loss
    return model, forward_end, host_at_forward_end, mem.peak


def test_offloaded_layer_inputs_leave_the_device_and_come_back_prefetched():
    plain, live_plain, _, peak_plain = _step(False)
    model, live, host, peak = _step(True)
    off = model.activation_offloader
    s = off.stats()
    # every layer input but the last one's left the device, exactly once, and came back ahead of need
    assert s["bytes_offloaded"] == (L - 1) * LAYER_INPUT and s["tensors_offloaded"] == L - 1
    assert s["bytes_prefetched"] == (L - 1) * LAYER_INPUT and s["bytes_fetched_on_demand"] == 0
    assert host == s["host_peak"] == (L - 1) * LAYER_INPUT
    assert s["host_bytes"] == 0  # host copies are released with the graph
    assert live_plain - live == (L - 1) * LAYER_INPUT  # measured on the device at the end of forward
    assert peak <= peak_plain
    # a pure copy: the model computes the same numbers, bit for bit
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_without_recompute_every_saved_activation_but_shared_ones_is_offloaded():
    _, live_plain, _, _ = _step(False, recompute=None)
    model, live, host, _ = _step(True, recompute=None)
    # RoPE's cos/sin (shared by all layers) and the parameters stay; the rest of L-1 layers goes
    # (views saved separately are copied separately, so the host may hold a little more)
    assert host >= live_plain - live > 2 * (L - 1) * LAYER_INPUT
    assert model.activation_offloader.stats()["bytes_fetched_on_demand"] == 0
