"""Frozen, typed configuration.

The model and the parallel machinery read only these objects, never flags or globals,
so a model can be built in a test, a conversion tool or a notebook without argparse.
`megatron.arguments` turns Megatron-DeepSpeed flags into these dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
ATTENTION_BACKENDS = ("classic", "sdpa", "flash-attn", "triton")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT model: what `GPTModel(config)` builds, nothing about how it runs.

    Two families are first class because Hugging Face export needs both:
    `ModelConfig.gpt3(...)` (LayerNorm, GeLU, learned positions, biases, tied
    embeddings; what the 1.3B/30B scripts train) and `ModelConfig.llama(...)`
    (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied output).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # already padded (see megatron.data.tokenizers)
    max_position_embeddings: int
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    num_query_groups: int | None = None  # K/V heads; None means = num_attention_heads
    kv_channels: int | None = None  # head dim; default hidden_size // heads
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu"
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"--hidden-size ({self.hidden_size}) must be divisible by "
                    f"--num-attention-heads ({self.num_attention_heads}), or set --kv-channels"
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        self.validate()

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "ffn_hidden_size", "num_query_groups",
                     "kv_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--num-query-groups ({self.num_query_groups})"
            )
        _choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("activation", self.activation, ACTIVATIONS)
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ConfigError(f"RoPE needs an even head dim, got kv_channels={self.kv_channels}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Exact parameter count of `GPTModel(self)` (checked against the model in tests)."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        d, nq, nkv = self.kv_channels, self.num_attention_heads, self.num_query_groups
        b = 1 if self.add_bias_linear else 0
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        qkv = h * (nq + 2 * nkv) * d + b * (nq + 2 * nkv) * d
        proj = nq * d * h + b * h
        fc1_out = 2 * f if self.activation == "swiglu" else f
        mlp = h * fc1_out + b * fc1_out + f * h + b * h
        layer = 2 * norm + qkv + proj + mlp
        emb = v * h
        if self.position_embedding_type == "learned_absolute":
            emb += self.max_position_embeddings * h
        out = v * h if self.untie_embeddings_and_output_weights else 0
        return emb + L * layer + norm + out

    @classmethod
    def gpt3(cls, **kw) -> ModelConfig:
        base = dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                    activation="gelu", add_bias_linear=True,
                    untie_embeddings_and_output_weights=False)
        base.update(kw)
        return cls(**base)

    @classmethod
    def llama(cls, **kw) -> ModelConfig:
        base = dict(position_embedding_type="rope", normalization="RMSNorm", norm_epsilon=1e-6,
                    activation="swiglu", add_bias_linear=False,
                    untie_embeddings_and_output_weights=True)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class ParallelConfig:
    """How a model runs: the rank layout, ZeRO, and what `parallelize_gpt` applies to it.

    `sequence_parallel_size` is Ulysses (--ds-sequence-parallel-size). The rest is strategy,
    never shape: the local attention kernel, recompute, sequence tiling, activation offload,
    head-chunk overlap. The model itself (`GPTModel(ModelConfig)`) knows none of it.
    """

    sequence_parallel_size: int = 1
    ring_attention_size: int = 1  # R of the Ulysses (SP/R) x ring (R) hybrid
    zero_stage: int = 0
    distributed_backend: str = "gloo"
    distributed_timeout_minutes: float = 10.0
    attention_backend: str = "sdpa"
    recompute_granularity: str | None = None  # "full": every layer's activations; "selective": core attention
    loss_tile_tokens: int = 0  # > 0: logits + cross-entropy in tiles of this many tokens
    mlp_tiles: int = 1  # > 1: MLP over this many sequence tiles, recomputed per tile
    # > 1: every token-local part of a layer (norms, QKV projection + RoPE, output projection,
    # residual adds; the MLP in mlp_tiles tiles) over this many sequence tiles, and the final norm
    projection_tiles: int = 1
    attention_head_chunks: int = 1  # > 1: the local attention kernel runs over this many head chunks
    offload_activations: bool = False  # keep recomputed layers' inputs in host memory (GPU)
    ulysses_overlap_chunks: int = 1  # > 1: pipeline the all-to-alls with attention over head chunks
    # under --bf16/--fp16 the residual stream (embedding output, every layer's input and output)
    # is in the training precision, as upstream's Float16Module makes it; True keeps it fp32
    # (upstream's --fp32-residual-connection). No effect in fp32.
    fp32_residual_connection: bool = False

    def __post_init__(self) -> None:
        if self.sequence_parallel_size < 1:
            raise ConfigError("--ds-sequence-parallel-size must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        if self.loss_tile_tokens < 0 or self.mlp_tiles < 1:
            raise ConfigError("--tiled-loss-tokens must be >= 0 and --tiled-mlp-tiles >= 1")
        if self.projection_tiles < 1 or self.attention_head_chunks < 1:
            raise ConfigError(f"--tiled-projection-tiles and --attention-head-chunks must be >= 1, got "
                              f"{self.projection_tiles} and {self.attention_head_chunks}")
        if self.ulysses_overlap_chunks < 1:
            raise ConfigError(f"--ulysses-overlap-chunks must be >= 1, got {self.ulysses_overlap_chunks}")

    def replace(self, **changes) -> ParallelConfig:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {list(allowed)}, got {value!r}")


__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "field"]


# --------------------------------------------------------------------------------------
# Run configuration: data, optimizer, training schedule, checkpoints, logging.
# Built by `megatron.arguments.parse_args`; every value is already resolved (iterations,
# not samples or tokens) so the training loop does no flag arithmetic of its own.
# --------------------------------------------------------------------------------------

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from. `data_path` keeps Megatron's "[weight] prefix ..." list as given."""

    seq_length: int = 2048
    data_path: tuple = ()
    split: str = "969,30,1"
    tokenizer_type: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # unpadded, for NullTokenizer / mock data
    vocab_extra_ids: int = 0
    make_vocab_size_divisible_by: int = 128
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    data_cache_path: str | None = None
    mock_data: bool = False
    num_workers: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, its schedule (in optimizer steps) and the numeric precision of training.

    Warmup and decay lengths are resolved to steps: with a constant global batch,
    Megatron's sample- and token-based schedules are step-based schedules in disguise.
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_steps: int = 0
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still computed and logged)
    fp16: bool = False
    bf16: bool = False
    loss_scale: float | None = None  # static scale; None means dynamic (fp16 only)
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    def __post_init__(self) -> None:
        _choice("lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are mutually exclusive: pass at most one of them")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must be <= --lr ({self.lr})")

    @property
    def dtype_name(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"


@dataclass(frozen=True)
class TrainConfig:
    """Batch geometry and the iteration schedule. `train_iters` is resolved from samples/tokens."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: int = 0
    eval_interval: int = 1000
    eval_iters: int = 10
    seed: int = 1234
    exit_interval: int | None = None
    exit_signal_handler: bool = False  # on SIGTERM: finish the iteration, save, exit 0
    exit_duration_in_mins: float | None = None  # stop (save, exit 0) once this much wall time has passed
    # Dataset sizing as in Megatron (megatron.data.gpt_dataset.train_valid_test_num_samples):
    train_samples: int | None = None  # --train-samples as given; sizes the training set when set
    dataset_train_iters: int | None = None  # --train-iters or --train-samples // gbs, before the
    # --train-tokens cap (Megatron's args.train_iters); None: train_iters

    def num_micro_batches(self, data_parallel_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go; written with torch.distributed.checkpoint (see megatron.training.checkpointing)."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_save_optim: bool = False
    no_load_optim: bool = False
    no_save_rng: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights only; iteration, samples, optimizer, scaler and RNG start fresh
    keep_last: int | None = None  # --keep-last-checkpoints: older iter_* directories are deleted after a save


@dataclass(frozen=True)
class LogConfig:
    """What the loop reports and where."""

    log_interval: int = 100
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1
    log_timers_to_tensorboard: bool = False
    log_json: str | None = None  # one JSON object per line, for tests and tools
    timing_log_level: int = 0
    wandb_project: str = ""  # Weights & Biases logging is on when a project or a run name is set
    wandb_exp_name: str = ""
    wandb_save_dir: str | None = None  # None: wandb's default directory
    wandb_config: tuple = ()  # (flag, value) pairs: the W&B run's config, as upstream records its args


@dataclass(frozen=True)
class RunConfig:
    """Everything one `pretrain_gpt.py` run needs, validated against the world size."""

    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    world_size: int = 1
    notes: tuple = ()  # flags accepted without effect, with the reason (printed at start-up)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.parallel.sequence_parallel_size

    @property
    def num_micro_batches(self) -> int:
        return self.train.num_micro_batches(self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_length

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


__all__ += ["DataConfig", "OptimConfig", "TrainConfig", "CheckpointConfig", "LogConfig",
            "RunConfig", "LR_DECAY_STYLES"]
