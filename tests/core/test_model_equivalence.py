"""The sequence-parallel GPT equals the single-process GPT: outputs, losses, every gradient,
and the parameters after three AdamW steps, for several topologies, both model families,
causal and document-masked attention."""

import pytest
import torch
import torch.distributed as dist

from megatron.config import ModelConfig, ParallelConfig
from megatron.core import parallel_state as ps
from megatron.model import GPTModel
from megatron.parallel import parallelize_gpt
from megatron.training.loss import global_token_count, loss_for_backward
from tests.utils import rel_err

S, B_PER_DP, V = 16, 2, 96


def make_config(family, **extra):
    common = dict(**extra, num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=V,
                  max_position_embeddings=S, hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gpt3":
        return ModelConfig.gpt3(**common)
    return ModelConfig.llama(num_query_groups=4, ffn_hidden_size=96, **common)


def make_batch(step, batch, masked):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, V, (batch, S), generator=g)
    labels = torch.randint(0, V, (batch, S), generator=g)
    loss_mask = (torch.rand(batch, S, generator=g) > 0.2).float()
    if not masked:
        pos = torch.arange(S).expand(batch, S)
        return tokens, labels, loss_mask, pos, None
    # packed documents of random lengths; positions restart per document
    seg = torch.zeros(batch, S, dtype=torch.long)
    pos = torch.zeros(batch, S, dtype=torch.long)
    for b in range(batch):
        cuts = sorted(torch.randperm(S - 1, generator=g)[:3].add(1).tolist())
        for i, c in enumerate(cuts):
            seg[b, c:] = i + 1
        for t in range(S):
            pos[b, t] = t - (seg[b] == seg[b, t]).nonzero()[0, 0]
    return tokens, labels, loss_mask, pos, seg


def _equivalence(sp, family, masked, backend="sdpa", recompute=None, steps=3, extra=None, meta=False):
    state = ps.initialize_model_parallel(sequence_parallel_size=sp)
    dp = state.dp_size
    cfg = make_config(family)
    strategy = ParallelConfig(sequence_parallel_size=sp, attention_backend=backend, recompute_granularity=recompute,
                              **(extra or {}))
    torch.manual_seed(1234)
    ref = GPTModel(cfg)
    torch.manual_seed(1234)
    if meta:  # built without memory, materialised (and initialised) by parallelize_gpt
        with torch.device("meta"):
            plain = GPTModel(cfg)
    else:
        plain = GPTModel(cfg)
    model = parallelize_gpt(plain, state, strategy)  # DDP over SP x DP: averages the gradients
    same_init = all(torch.equal(a, _full(b)) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    # SGD with momentum: its update is linear in the gradient, so fp32 rounding stays at
    # rounding level. (Adam's g/sqrt(v) turns rounding noise on ~0 gradients into
    # lr-sized differences, which would test Adam, not sequence parallelism.)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    sl = S // sp
    rows = slice(state.dp_rank * B_PER_DP, (state.dp_rank + 1) * B_PER_DP)
    cols = slice(state.sp_rank * sl, (state.sp_rank + 1) * sl)
    errs = {"out": 0.0, "loss": 0.0, "grad": 0.0, "param": 0.0}
    worst_grad = None
    for step in range(steps):
        tokens, labels, mask, pos, seg = make_batch(step, B_PER_DP * dp, masked)
        # single-process reference on the whole global batch
        opt_ref.zero_grad()
        ref_tok = ref(tokens, pos, labels=labels, segment_ids=seg)
        ref_loss = (ref_tok * mask).sum() / mask.sum()
        ref_loss.backward()
        opt_ref.step()
        # this rank's shard
        opt.zero_grad()
        local = lambda t: None if t is None else t[rows, cols].contiguous()  # noqa: E731
        per_tok = model(local(tokens), local(pos), labels=local(labels), segment_ids=local(seg))
        count = global_token_count(local(mask), state.sdp_group)
        loss = loss_for_backward(per_tok, local(mask), count, state.sdp_size)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=state.sdp_group)
        total /= state.sdp_size
        errs["out"] = max(errs["out"], rel_err(per_tok, ref_tok[rows, cols]))
        errs["loss"] = max(errs["loss"], rel_err(total, ref_loss))
        for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
            e = rel_err(_full(p.grad), pr.grad)
            if e > errs["grad"]:
                errs["grad"], worst_grad = e, name
        opt.step()
        for p, pr in zip(model.parameters(), ref.parameters()):
            errs["param"] = max(errs["param"], rel_err(_full(p), pr))
    n_grads = sum(p.grad is not None for p in model.parameters())
    ps.destroy_model_parallel()
    return errs, worst_grad, same_init, n_grads, len(list(model.parameters()))


def _full(t):
    """The whole tensor of a (possibly FSDP-sharded) parameter or gradient."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


TOPOLOGIES = [(2, 2), (4, 4), (4, 2)]  # (world, sp): P=2, P=4, DP 2 x SP 2


@pytest.mark.parametrize("world,sp", TOPOLOGIES, ids=["sp2", "sp4", "dp2xsp2"])
@pytest.mark.parametrize("family", ["gpt3", "llama"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_sequence_parallel_model_equals_single_process(ranks, world, sp, family, masked):
    for errs, worst, same_init, n_grads, n_params in ranks(world, _equivalence, sp, family, masked):
        assert same_init, "identically seeded ranks must build identical replicas"
        assert n_grads == n_params, "every parameter must receive a gradient"
        assert max(errs.values()) < 1e-5, (errs, worst)


@pytest.mark.parametrize("backend,recompute,extra", [
    ("classic", None, None), ("sdpa", "full", None), ("sdpa", "selective", None),
    ("sdpa", None, {"ulysses_overlap_chunks": 2}),
    ("sdpa", "full", {"loss_tile_tokens": 3, "mlp_tiles": 2, "ulysses_overlap_chunks": 2}),
    ("sdpa", "full", {"zero_stage": 3, "loss_tile_tokens": 5}),
    ("sdpa", "full", {"recompute_num_layers": 2}),  # one recomputed chunk of both layers
    ("sdpa", "full", {"recompute_method": "block", "recompute_num_layers": 1}),  # only the first layer
])
def test_backends_recompute_tiling_overlap_keep_equivalence(ranks, backend, recompute, extra):
    for errs, worst, *_ in ranks(4, _equivalence, 2, "llama", True, backend, recompute, 2, extra):
        assert max(errs.values()) < 1e-5, (errs, worst)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_meta_built_model_starts_from_the_reference_weights(ranks, zero_stage):
    """Built on the meta device, sharded (ZeRO-3) or not, then materialised rank by rank: the
    parameters are bit-identical to the single-process model's and training stays equal."""
    for errs, worst, same_init, n_grads, n_params in ranks(4, _equivalence, 2, "gpt3", True, "sdpa", None, 2,
                                                          {"zero_stage": zero_stage}, True):
        assert same_init
        assert n_grads == n_params
        assert max(errs.values()) < 1e-5, (errs, worst)


def test_parameter_count_formula():
    for family in ("gpt3", "llama"):
        cfg = make_config(family)
        assert sum(p.numel() for p in GPTModel(cfg).parameters()) == cfg.num_parameters()


def test_rope_positions_are_global_under_sp():
    """A shard rotated with its global positions equals the same rows of the full rotation."""
    from megatron.model.rotary import RotaryEmbedding, apply_rotary
    rot = RotaryEmbedding(8, base=500.0)
    x = torch.randn(S, 1, 2, 8)
    full = apply_rotary(x, *rot(torch.arange(S)[None]))
    shard = apply_rotary(x[8:], *rot(torch.arange(8, S)[None]))
    assert torch.allclose(shard, full[8:], atol=1e-6)
    assert not torch.allclose(apply_rotary(x[8:], *rot(torch.arange(8)[None])), full[8:], atol=1e-3)


def test_tiled_loss_and_mlp_equal_untiled():
    """Tiling changes memory, not numbers: losses and every gradient match (fp32)."""
    torch.manual_seed(0)
    base = make_config("llama")
    tokens, labels, mask, pos, seg = make_batch(0, 2, True)
    results = []
    for tiles in ({}, {"loss_tile_tokens": 5, "mlp_tiles": 3}, {"loss_tile_tokens": 64, "mlp_tiles": 16}):
        torch.manual_seed(7)
        model = parallelize_gpt(GPTModel(base), None, ParallelConfig(**tiles))
        loss = model(tokens, pos, labels=labels, segment_ids=seg)
        (loss * mask).sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        assert rel_err(loss, results[0][0]) < 1e-6
        for name, g in grads.items():
            assert rel_err(g, results[0][1][name]) < 1e-5, name


def test_tiled_cross_entropy_never_builds_full_logits():
    from megatron.model.tiling import tiled_cross_entropy
    h, w = torch.randn(40, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="none")
    got = tiled_cross_entropy(h, w, labels, 7)
    g = torch.randn(40)
    ref_grads = torch.autograd.grad(ref, (h, w), g)
    got_grads = torch.autograd.grad(got, (h, w), g)
    assert rel_err(got, ref) < 1e-6
    for a, b in zip(got_grads, ref_grads):
        assert rel_err(a, b) < 1e-5
