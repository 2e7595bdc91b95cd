"""The residual stream's dtype: the training precision under --bf16/--fp16 (upstream's
Float16Module semantics), fp32 with --fp32-residual-connection, untouched in fp32."""

from __future__ import annotations

import pytest
import torch

from megatron.arguments import parse_args
from megatron.config import ModelConfig, ParallelConfig
from megatron.core import parallel_state as ps
from megatron.model import GPTModel
from megatron.parallel import parallelize_gpt

CFG = ModelConfig.llama(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                        vocab_size=64, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)


def _layer_input_dtypes(model) -> list:
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    return seen


def test_fp32_runs_are_bit_identical_to_the_plain_model():
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for wrap in (False, True):
        torch.manual_seed(3)
        model = GPTModel(CFG)
        if wrap:
            model = parallelize_gpt(model, None, ParallelConfig(), precision="fp32")
            assert not hasattr(model, "residual_cast")
        loss = model(tokens, labels=tokens)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("fp32_residual,expected", [(False, torch.bfloat16), (True, torch.float32)])
def test_bf16_residual_stream_unless_fp32_residual_connection(fp32_residual, expected):
    torch.manual_seed(0)
    model = parallelize_gpt(GPTModel(CFG), None, ParallelConfig(fp32_residual_connection=fp32_residual),
                            precision="bf16")
    seen = _layer_input_dtypes(model)
    tokens = torch.randint(0, CFG.vocab_size, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        loss = model(tokens, labels=tokens)
    loss.sum().backward()
    assert seen == [expected] * CFG.num_layers
    assert loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_the_flag_reaches_the_parallel_config():
    base = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 --train-iters 1 "
            "--mock-data --vocab-size 100 --bf16").split()
    assert parse_args(base, world_size=1, padded_vocab_size=128).parallel.fp32_residual_connection is False
    cfg = parse_args(base + ["--fp32-residual-connection"], world_size=1, padded_vocab_size=128)
    assert cfg.parallel.fp32_residual_connection is True


def _fsdp_layer_dtypes(fp32_residual):
    state = ps.initialize_model_parallel(sequence_parallel_size=2)
    torch.manual_seed(0)
    model = parallelize_gpt(GPTModel(CFG), state, ParallelConfig(sequence_parallel_size=2, zero_stage=3,
                                                                 fp32_residual_connection=fp32_residual),
                            precision="bf16")
    seen = _layer_input_dtypes(model)
    tokens = torch.randint(0, CFG.vocab_size, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        model(tokens, labels=tokens).sum().backward()
    ps.destroy_model_parallel()
    return [str(d) for d in seen]


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_fsdp_bf16_gathers_do_not_decide_the_residual_dtype(ranks, fp32_residual):
    """FSDP2 gathers bf16 weights, so the embedding returns bf16 either way; the hook decides."""
    want = "torch.float32" if fp32_residual else "torch.bfloat16"
    for seen in ranks(2, _fsdp_layer_dtypes, fp32_residual):
        assert seen == [want] * CFG.num_layers
