"""GPTModel with Ulysses x ring core attention equals the single-process GPTModel: per-token
losses, the global loss, every gradient and the parameters after two SGD steps (fp32,
relative error < 1e-5). `parallelize_gpt` picks `build_sp_attention`'s module from the
ParallelState; the test shards tokens, labels, loss mask and position ids with
`sequence_shard_indices`, and the parallelized model all-gathers segment_ids. Runtime: about
10 s (pools shared with the attention tests)."""

import pytest
import torch
import torch.distributed as dist

from megatron.config import ModelConfig, ParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.sequence_parallel import DistributedAttention, UlyssesRingAttention
from megatron.core.sequence_parallel.layout import sequence_shard_indices
from megatron.model import GPTModel
from megatron.parallel import parallelize_gpt
from megatron.training.loss import global_token_count, loss_for_backward
from tests.utils import rel_err

S, B, V = 16, 2, 96


def _config(family, heads, kv_heads):
    common = dict(num_layers=2, hidden_size=64, num_attention_heads=heads, vocab_size=V,
                  max_position_embeddings=S, hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gpt3":
        return ModelConfig.gpt3(**common)
    return ModelConfig.llama(num_query_groups=kv_heads, ffn_hidden_size=96, **common)


def _batch(step, masked):
    g = torch.Generator().manual_seed(200 + step)
    tokens = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    loss_mask = (torch.rand(B, S, generator=g) > 0.2).float()
    if not masked:
        return tokens, labels, loss_mask, torch.arange(S).expand(B, S), None
    seg = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):  # packed documents; positions restart per document
        for i, c in enumerate(sorted(torch.randperm(S - 1, generator=g)[:3].add(1).tolist())):
            seg[b, c:] = i + 1
    starts = torch.stack([torch.stack([(seg[b] == seg[b, t]).nonzero()[0, 0] for t in range(S)]) for b in range(B)])
    return tokens, labels, loss_mask, torch.arange(S).expand(B, S) - starts, seg


def _gpt_case(sp, ring, family, heads, kv_heads, masked, steps=2, recompute=None):
    state = ps.initialize_model_parallel(sequence_parallel_size=sp, ring_attention_size=ring)
    cfg = _config(family, heads, kv_heads)
    torch.manual_seed(4321)
    ref = GPTModel(cfg)
    torch.manual_seed(4321)
    plain = GPTModel(cfg)
    model = parallelize_gpt(plain, state, ParallelConfig(sequence_parallel_size=sp, ring_attention_size=ring,
                                                         recompute_granularity=recompute))
    expected = UlyssesRingAttention if ring > 1 else DistributedAttention
    assert all(type(layer.attention.core_attention) is expected for layer in plain.layers)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    idx = sequence_shard_indices(S, state)
    errs = {"out": 0.0, "loss": 0.0, "grad": 0.0, "param": 0.0}
    worst = None
    for step in range(steps):
        tokens, labels, mask, pos, seg = _batch(step, masked)
        opt_ref.zero_grad()
        ref_tok = ref(tokens, pos, labels=labels, segment_ids=seg)
        ref_loss = (ref_tok * mask).sum() / mask.sum()
        ref_loss.backward()
        opt_ref.step()
        opt.zero_grad()
        local = lambda t: None if t is None else t[:, idx].contiguous()  # noqa: E731
        per_tok = model(local(tokens), local(pos), labels=local(labels), segment_ids=local(seg))
        count = global_token_count(local(mask), state.sdp_group)
        loss = loss_for_backward(per_tok, local(mask), count, state.sdp_size)
        loss.backward()  # DDP averages the gradients over SP x DP
        total = loss.detach().clone()
        dist.all_reduce(total, group=state.sdp_group)
        total /= state.sdp_size
        errs["out"] = max(errs["out"], rel_err(per_tok, ref_tok[:, idx]))
        errs["loss"] = max(errs["loss"], rel_err(total, ref_loss))
        for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
            e = rel_err(p.grad, pr.grad)
            if e > errs["grad"]:
                errs["grad"], worst = e, name
        opt.step()
        for p, pr in zip(model.parameters(), ref.parameters()):
            errs["param"] = max(errs["param"], rel_err(p, pr))
    kind = type(plain.layers[0].attention.core_attention).__name__
    ps.destroy_model_parallel()
    return errs, worst, kind


@pytest.mark.parametrize("ulysses,ring,family,masked,recompute", [
    (2, 2, "llama", True, None), (2, 2, "gpt3", False, "full"), (1, 4, "llama", True, "selective"),
    (4, 1, "gpt3", True, None),
], ids=["u2xr2-llama-docs", "u2xr2-gpt3-causal-full-recompute", "u1xr4-llama-docs-selective", "u4xr1-gpt3-docs"])
def test_gpt_with_hybrid_attention_equals_single_process(ranks, ulysses, ring, family, masked, recompute):
    for errs, worst, kind in ranks(4, _gpt_case, ulysses * ring, ring, family, 8, 4, masked, 2, recompute):
        assert kind == ("DistributedAttention" if ring == 1 else "UlyssesRingAttention")
        assert max(errs.values()) < 1e-5, (errs, worst)


def test_gpt_4_heads_on_sp_8(ranks):
    """Llama with 4 query / 2 K/V heads on 8 SP ranks (Ulysses 4 x ring 2): beyond the head cap,
    with K/V heads replicated on the Ulysses axis, documents through the ring."""
    for errs, worst, _ in ranks(8, _gpt_case, 8, 2, "llama", 4, 2, True, 1):
        assert max(errs.values()) < 1e-5, (errs, worst)
