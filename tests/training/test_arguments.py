"""Every invalid flag combination fails before any process group starts, with one clear message."""

import json

import pytest

from megatron.arguments import parse_args
from megatron.config import ConfigError

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 "
        "--train-iters 10 --mock-data --vocab-size 100").split()


def cfg(extra="", world=1, base=BASE, **kw):
    return parse_args(list(base) + extra.split(), world_size=world, padded_vocab_size=128, **kw)


def error(extra="", world=1, base=BASE, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(extra, world, base, **kw)
    return str(e.value)


def test_defaults_and_resolution():
    c = cfg("--ds-sequence-parallel-size 2 --micro-batch-size 2 --global-batch-size 8", world=4)
    assert (c.world_size, c.data_parallel_size, c.num_micro_batches) == (4, 2, 2)
    assert c.parallel.sequence_parallel_size == 2 and c.parallel.zero_stage == 0
    assert c.model.vocab_size == 128 and c.model.max_position_embeddings == 64
    assert c.optim.lr_decay_steps == 10 and c.optim.lr_warmup_steps == 0 and c.optim.clip_grad == 1.0
    assert c.tokens_per_step == 8 * 64 and c.optim.dtype_name == "fp32"
    assert cfg(world=2).train.global_batch_size == 2  # defaults to micro x dp


def test_train_length_from_samples_and_tokens():
    b = [a for a in BASE if a not in ("--train-iters", "10")]
    assert cfg("--global-batch-size 4 --train-samples 40", base=b).train.train_iters == 10
    assert cfg("--global-batch-size 4 --train-tokens 2561", base=b).train.train_iters == 11  # ceil
    # Megatron-DeepSpeed scripts pass both: training stops at whichever limit comes first
    assert cfg("--global-batch-size 4 --train-samples 400 --train-tokens 2560", base=b).train.train_iters == 10


def test_warmup_and_decay_resolution():
    assert cfg("--lr-warmup-fraction 0.2 --lr-decay-iters 50").optim.lr_warmup_steps == 10
    c = cfg("--global-batch-size 2 --lr-warmup-tokens 1280 --lr-decay-tokens 6400")
    assert (c.optim.lr_warmup_steps, c.optim.lr_decay_steps) == (10, 50)
    assert cfg("--global-batch-size 2 --lr-warmup-samples 5 --lr-decay-samples 9").optim.lr_decay_steps == 5


def test_hybrid_uneven_and_overlap_resolve():
    c = cfg("--ds-sequence-parallel-size 8 --ring-attention-size 2 --attention-dropout 0", world=8)
    assert (c.parallel.sequence_parallel_size, c.parallel.ring_attention_size) == (8, 2)
    # fewer K/V heads than SP ranks: replicated by DistributedAttention, not an error
    assert cfg("--ds-sequence-parallel-size 2 --group-query-attention --num-query-groups 1",
               world=2).model.num_query_groups == 1
    assert cfg("--ds-sequence-parallel-size 2 --ulysses-overlap-chunks 2", world=2).parallel.ulysses_overlap_chunks == 2


def test_model_families():
    g = cfg()
    assert (g.model.normalization, g.model.activation, g.model.position_embedding_type) == \
        ("LayerNorm", "gelu_tanh", "learned_absolute")  # upstream's default fused bias-GeLU is the tanh one
    ll = cfg("--normalization rmsnorm --swiglu --position-embedding-type rotary --untie-embeddings-and-output-weights "
             "--disable-bias-linear --group-query-attention --num-query-groups 2 --rotary-base 500000")
    m = ll.model
    assert (m.normalization, m.activation, m.position_embedding_type, m.num_query_groups) == \
        ("RMSNorm", "swiglu", "rope", 2)
    assert m.ffn_hidden_size == 128 and not m.add_bias_linear and m.untie_embeddings_and_output_weights
    assert m.rotary_base == 500000
    assert cfg("--num-key-value-heads 1").model.num_query_groups == 1
    assert cfg("--checkpoint-activations").parallel.recompute_granularity == "full"
    assert cfg("--recompute-granularity selective").parallel.recompute_granularity == "selective"


@pytest.mark.parametrize("extra, world, needle", [
    ("--global-batch-size 6 --micro-batch-size 4", 1, "--global-batch-size (6) must be divisible by --micro-batch-size (4)"),
    ("--global-batch-size 3 --ds-sequence-parallel-size 2", 4, "data-parallel size (2"),
    ("--ds-sequence-parallel-size 8 --num-attention-heads 4", 8,
     "--num-attention-heads (4) must be >= the Ulysses degree (--ds-sequence-parallel-size / "
     "--ring-attention-size = 8): each Ulysses rank attends with at least one head; add --ring-attention-size 2"),
    ("--ds-sequence-parallel-size 4 --ring-attention-size 3", 4, "--ring-attention-size (3) must divide"),
    ("--ds-sequence-parallel-size 4 --ring-attention-size 2", 4, "does not support attention dropout"),
    ("--ds-sequence-parallel-size 2 --ulysses-overlap-chunks 4", 2, "needs --ring-attention-size 1 and both"),
    ("--ds-sequence-parallel-size 4 --seq-length 66 --max-position-embeddings 66", 4,
     "--seq-length (66) must be divisible by 4 (--ds-sequence-parallel-size 4)"),
    ("--ds-sequence-parallel-size 4 --ring-attention-size 2 --attention-dropout 0 --seq-length 68 "
     "--max-position-embeddings 68", 4, "--seq-length (68) must be divisible by 8 (2 x --ds-sequence-parallel-size 4)"),
    ("--fp16 --bf16", 1, "--fp16 and --bf16 are mutually exclusive"),
    ("--ds-sequence-parallel-size 4", 2, "--ds-sequence-parallel-size (4) is larger than the world size (2)"),
    ("--ds-sequence-parallel-size 2", 3, "--ds-sequence-parallel-size (2) must divide the world size (3)"),
    ("--zero-stage 4", 1, "--zero-stage must be 0, 1, 2 or 3"),
    ("--tensor-model-parallel-size 2", 2, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be 1"),
    ("--train-samples 10", 1, "--train-iters and --train-samples are mutually exclusive"),
    ("--lr-warmup-iters 2 --lr-warmup-fraction 0.1", 1, "--lr-warmup-iters and --lr-warmup-fraction"),
    ("--lr-decay-iters 5 --lr-decay-tokens 100", 1, "--lr-decay-iters and --lr-decay-tokens"),
    ("--lr-warmup-iters 20", 1, "warmup (20 steps) is longer than decay (10 steps)"),
    ("--min-lr 1", 1, "--min-lr (1.0) must be <= --lr (0.001)"),
    ("--seq-length 128 --max-position-embeddings 64", 1, "--seq-length (128) must be <= --max-position-embeddings (64)"),
    ("--checkpoint-activations --recompute-granularity selective", 1, "pass only one of them"),
    ("--rampup-batch-size 1 1 10", 1, "--rampup-batch-size is not supported"),
    ("--use-flash-attn-v2 --attention-backend classic", 1, "contradicts the flash-attention flag"),
    ("--num-key-value-heads 2 --num-query-groups 1", 1, "name the same thing and disagree"),
    ("--hidden-size 66", 1, "--hidden-size (66) must be divisible by --num-attention-heads (4)"),
])
def test_invalid_combinations(extra, world, needle):
    assert needle in error(extra, world)


def test_missing_required():
    assert "--lr is required" in error(base=[a for a in BASE if a not in ("--lr", "1e-3")])
    assert "one of --train-iters, --train-samples or --train-tokens" in error(
        base=[a for a in BASE if a not in ("--train-iters", "10")])
    assert "--data-path is required" in error(base=[a for a in BASE if a != "--mock-data"])
    assert "--hidden-size is required" in error(base=["--num-layers", "2"])


def test_flash_attention_needs_package_and_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = error("--use-flash-attn-v2")
    assert "flash_attn package and a CUDA GPU" in msg and "drop the flag" in msg
    assert "need triton and a CUDA GPU" in error("--use-flash-attn-triton")
    # a dry run on a login node validates everything else and skips machine checks
    assert cfg("--use-flash-attn-v2 --bf16", check_environment=False).parallel.attention_backend == "flash-attn"
    # ... but not what the run itself would refuse: flash-attn kernels take bf16/fp16 only
    assert "needs --bf16 or --fp16" in error("--use-flash-attn-v2", check_environment=False)


def test_tensor_parallel_sequence_parallel_is_a_note_at_tensor_parallel_1():
    # upstream switches Megatron's --sequence-parallel off when tensor parallelism is 1 (this used to be an error)
    notes = " ".join(cfg("--sequence-parallel").notes)
    assert "--sequence-parallel: accepted, no effect" in notes and "--ds-sequence-parallel-size" in notes


def test_deepspeed_only_flags_are_accepted_with_a_note():
    c = cfg("--deepspeed --no-pipeline-parallel --deepspeed-activation-checkpointing --data-impl mmap")
    notes = " ".join(c.notes)
    for flag in ("--deepspeed:", "--no-pipeline-parallel", "--deepspeed-activation-checkpointing", "--data-impl"):
        assert flag in notes


def _ds(tmp_path, obj) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return str(p)


def test_deepspeed_config_sets_values(tmp_path):
    path = _ds(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                          "zero_optimization": {"stage": 3}, "gradient_clipping": 0.5, "steps_per_print": 10,
                          "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                                   "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 2}})
    c = cfg(f"--deepspeed_config {path} --ds-sequence-parallel-size 2", world=4)
    assert (c.train.global_batch_size, c.train.micro_batch_size, c.parallel.zero_stage) == (8, 2, 3)
    o = c.optim
    assert o.fp16 and o.loss_scale is None and o.initial_loss_scale == 2.0 ** 12
    assert (o.loss_scale_window, o.hysteresis, o.min_loss_scale, o.clip_grad) == (500, 3, 2.0, 0.5)
    assert any("steps_per_print" in n for n in c.notes)
    bf = cfg(f"--deepspeed_config {_ds(tmp_path, {'bf16': {'enabled': True}})}")
    assert bf.optim.bf16 and not bf.optim.fp16


def test_deepspeed_config_conflicts(tmp_path):
    path = _ds(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 1,
                          "zero_optimization": {"stage": 1}, "fp16": {"enabled": False}})
    assert "--global-batch-size 4 conflicts with 8 in --deepspeed_config" in error(f"--deepspeed_config {path} "
                                                                               "--global-batch-size 4")
    assert "--zero-stage 3 conflicts with 1" in error(f"--deepspeed_config {path} --zero-stage 3")
    assert "--fp16 True conflicts with False" in error(f"--deepspeed_config {path} --fp16")
    # equal values are fine
    assert cfg(f"--deepspeed_config {path} --zero-stage 1 --global-batch-size 8").parallel.zero_stage == 1
    bad = _ds(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4})
    assert "gradient_accumulation_steps=4" in error(f"--deepspeed_config {bad}", world=1)
    assert "cannot read the file" in error("--deepspeed_config /nonexistent.json")
    both = _ds(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "--fp16 and --bf16 are mutually exclusive" in error(f"--deepspeed_config {both}")


def test_recompute_methods_and_chunks():
    c = cfg("--checkpoint-activations --checkpoint-num-layers 2")
    assert (c.parallel.recompute_granularity, c.parallel.recompute_method, c.parallel.recompute_num_layers) == \
        ("full", "uniform", 2)
    c = cfg("--recompute-granularity full --recompute-method block --recompute-num-layers 1")
    assert (c.parallel.recompute_method, c.parallel.recompute_num_layers) == ("block", 1)
    assert cfg("--recompute-granularity full --recompute-method block").parallel.recompute_num_layers == 2  # all
    assert "apply to full recompute" in error("--checkpoint-num-layers 2")
    assert "must be in [1, --num-layers 2]" in error("--checkpoint-activations --checkpoint-num-layers 3")
    assert "name the same thing" in error("--checkpoint-activations --checkpoint-num-layers 2 --recompute-num-layers 1")


def test_fpdt_flags_map_onto_tiling_and_say_so():
    base = list(BASE)
    base[base.index("--seq-length") + 1] = "256"
    c = cfg("--ds-sequence-parallel-size 2 --ds-sequence-parallel-fpdt "
            "--ds-sequence-parallel-fpdt-chunk-size 64 --ds-sequence-parallel-fpdt-offloading "
            "--max-position-embeddings 256", world=2, base=base)
    p = c.parallel
    assert (p.mlp_tiles, p.loss_tile_tokens, p.ulysses_overlap_chunks, p.offload_activations) == (4, 32, 2, True)
    assert any("--ds-sequence-parallel-fpdt (chunks of 64 tokens, 4 per sequence): mapped onto --tiled-mlp-tiles 4"
               in n for n in c.notes)
    # explicit tiling flags win over the mapping
    c = cfg("--max-position-embeddings 256 --ds-sequence-parallel-fpdt "
            "--ds-sequence-parallel-fpdt-chunk-size 64 --tiled-mlp-tiles 2", base=base)
    assert c.parallel.mlp_tiles == 2 and c.parallel.loss_tile_tokens == 64
    assert "needs --ds-sequence-parallel-fpdt" in error("--ds-sequence-parallel-fpdt-offloading")
