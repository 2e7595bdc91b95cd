"""Model FLOPs by hand, and the dry-run plan's rank layout."""

from megatron.arguments import parse_args
from megatron.config import ModelConfig
from megatron.planning.flops import attention_flops_per_sequence, flops_per_step, matmul_flops_per_token
from megatron.planning.plan import describe_plan


def test_flops_by_hand():
    # 1 layer, h=4, 2 heads of d=2, ffn 16, vocab 10, GeLU MLP
    m = ModelConfig.gpt3(num_layers=1, hidden_size=4, num_attention_heads=2, vocab_size=10,
                         max_position_embeddings=8)
    # qkv 4x12 + proj 4x4 + fc1 4x16 + fc2 16x4 + logits 4x10 = 48+16+64+64+40 = 232 MACs/token
    assert matmul_flops_per_token(m) == 2 * 232
    # causal pairs for s=3: 6; per pair and head: QK^T and PV, d=2 MACs each -> 2*2*2 flops x 2 heads
    assert attention_flops_per_sequence(m, 3) == 6 * 2 * 2 * 2 * 2
    assert flops_per_step(m, 3, 5) == 3 * 5 * (3 * 2 * 232 + 6 * 16)
    swiglu = m.replace(activation="swiglu", ffn_hidden_size=8, num_query_groups=1)
    # qkv 4x(2+2)*2=32, proj 16, fc1 4x16 (gate|up), fc2 8x4, logits 40 -> 32+16+64+32+40
    assert matmul_flops_per_token(swiglu) == 2 * 184


def test_plan_layout():
    cfg = parse_args("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 "
                     "--train-iters 10 --mock-data --vocab-size 100 --ds-sequence-parallel-size 2 "
                     "--global-batch-size 4 --zero-stage 3".split(), world_size=8, padded_vocab_size=128)
    text = describe_plan(cfg, gpus_per_node=4)
    assert "world size 8 (2 node(s) x 4 rank(s)) = data parallel 4 x sequence parallel (Ulysses) 2" in text
    assert "micro 1 x accumulation 1 x dp 4 = global 4" in text
    rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and "[" in ln]
    # rank 5: node 1, local 1, dp_rank 2, sp_rank 1, SP group [4, 5], DP group [1, 3, 5, 7]
    assert rows[5][:5] == ["5", "1", "1", "2", "1"] and "[4, 5] / [1, 3, 5, 7]" in " ".join(rows[5])


def test_plan_of_a_hybrid_with_few_heads():
    """SP 8 = Ulysses 4 x ring 2 with 4 query / 2 K/V heads: one query head and one (replicated)
    K/V head per rank over half the sequence (the plan once printed "0 (K/V 0)")."""
    cfg = parse_args("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
                     "--num-query-groups 2 --seq-length 64 --lr 1e-3 --train-iters 2 --mock-data --vocab-size 100 "
                     "--ds-sequence-parallel-size 8 --ring-attention-size 2 --attention-dropout 0".split(),
                     world_size=8, padded_vocab_size=128)
    text = describe_plan(cfg)
    assert "sequence parallel 8 = Ulysses 4 x ring 2" in text
    assert "heads per rank in attention 1 (K/V 1) over 32 tokens" in text
    from megatron.planning.plan import planned_ranks

    r5 = planned_ranks(cfg)[5]
    assert (r5["ring_rank"], r5["ulysses_rank"], r5["ulysses_group"], r5["ring_group"]) == (1, 1, [4, 5, 6, 7], [1, 5])
