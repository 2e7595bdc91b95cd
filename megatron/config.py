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
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")  # gelu: exact (erf); gelu_tanh: OpenAI's tanh approximation
ROPE_SCALING_TYPES = (None, "linear", "dynamic", "yarn", "llama3")  # transformers' rope_type names
ATTENTION_BACKENDS = ("classic", "sdpa", "flash-attn", "triton")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


class UserError(Exception):
    """An error the user can fix (bad flags, a damaged or mismatched checkpoint): the message says
    what is wrong and how to fix it, and the command line prints it once, without a traceback."""


class ConfigError(UserError, ValueError):
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
    # tokens the tokenizer can produce; rows >= it are padding (--make-vocab-size-divisible-by) and
    # never take part in a softmax. None: vocab_size (no padding)
    true_vocab_size: int | None = None
    # RoPE variants, with transformers' definitions (megatron/model/rotary.py)
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates (GPT-NeoX style)
    rope_scaling_type: str | None = None  # None (plain RoPE), "linear", "dynamic", "yarn", "llama3"
    rope_scaling_factor: float = 1.0
    original_max_position_embeddings: int | None = None  # context the model was pretrained at
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None
    yarn_truncate: bool = True
    rope_attention_factor: float | None = None  # yarn: scales cos/sin; None: from factor (and mscales)
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0

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
        if self.true_vocab_size is not None and not 0 < self.true_vocab_size <= self.vocab_size:
            raise ConfigError(f"true_vocab_size ({self.true_vocab_size}) must be in [1, vocab_size = "
                              f"{self.vocab_size}] (the padded vocabulary)")
        self._validate_rope()
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1)")

    def _validate_rope(self) -> None:
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        _choice("rope_scaling_type", self.rope_scaling_type, ROPE_SCALING_TYPES)
        rope = self.position_embedding_type == "rope"
        if not rope and (self.rotary_percent != 1.0 or self.rope_scaling_type is not None):
            raise ConfigError("--rotary-percent and --rope-scaling-type apply to RoPE only; add "
                              "--position-embedding-type rope (or --use-rotary-position-embeddings)")
        if rope and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ConfigError(f"--rotary-percent {self.rotary_percent} rotates int({self.kv_channels} x "
                              f"{self.rotary_percent}) = {self.rotary_dim} dims of each head; RoPE needs an even "
                              f"number >= 2: choose a percent that gives one")
        if self.rope_scaling_type is None:
            return
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"--rope-scaling-factor must be >= 1 (how many times longer the new context "
                              f"is), got {self.rope_scaling_factor}")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings <= 0:
            raise ConfigError("--original-max-position-embeddings must be positive")
        if self.rope_scaling_type == "llama3" and self.llama3_high_freq_factor <= self.llama3_low_freq_factor:
            raise ConfigError(f"--rope-llama3-high-freq-factor ({self.llama3_high_freq_factor}) must be larger "
                              f"than --rope-llama3-low-freq-factor ({self.llama3_low_freq_factor})")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones): int(head dim x rotary_percent)."""
        return int(self.kv_channels * self.rotary_percent)

    @property
    def rope_original_length(self) -> int:
        """The pretraining context that RoPE scaling starts from (transformers' default: max_position_embeddings)."""
        return self.original_max_position_embeddings or self.max_position_embeddings

    @property
    def output_vocab_size(self) -> int:
        """Tokens that take part in the softmax: the true (unpadded) vocabulary."""
        return self.true_vocab_size or self.vocab_size

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
    recompute_method: str = "uniform"  # full recompute: "uniform" chunks of layers, or "block": the first layers
    recompute_num_layers: int = 1  # layers per recomputed chunk (uniform) or recomputed layers (block)
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
        _choice("recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.recompute_num_layers < 1:
            raise ConfigError(f"--recompute-num-layers / --checkpoint-num-layers must be >= 1, got "
                              f"{self.recompute_num_layers}")
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


__all__ = ["UserError", "ConfigError", "ModelConfig", "ParallelConfig", "field"]


# --------------------------------------------------------------------------------------
# Run configuration: data, optimizer, training schedule, checkpoints, logging.
# Built by `megatron.arguments.parse_args`; every value is already resolved (iterations,
# not samples or tokens) so the training loop does no flag arithmetic of its own.
# --------------------------------------------------------------------------------------

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
OPTIMIZER_IMPLS = ("torch", "apex")


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
    optimizer_impl: str = "torch"  # --optimizer-impl: "torch" (fused AdamW) or "apex" (FusedAdam, asked for)

    def __post_init__(self) -> None:
        _choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
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
    # periodic long-context evaluation (megatron/inference/hook.py); 0: off
    long_context_eval_interval: int = 0
    long_context_eval_data: str | None = None  # a .bin/.idx prefix; None: the first --data-path prefix
    long_context_eval_documents: int = 4
    long_context_eval_passkey_lengths: tuple = ()

    def num_micro_batches(self, data_parallel_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go; written with torch.distributed.checkpoint (see megatron.checkpoint)."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_save_optim: bool = False
    no_load_optim: bool = False
    no_save_rng: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights only; iteration, samples, optimizer, scaler and RNG start fresh
    keep_last: int | None = None  # --keep-last-checkpoints: older iter_* directories are deleted after a save
    overwrite_checkpoints: bool = False  # --save may replace checkpoints this run did not start from
    load_fallback: bool = False  # a damaged --load checkpoint: load the newest complete one before it


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
            "RunConfig", "LR_DECAY_STYLES", "OPTIMIZER_IMPLS"]
