"""Megatron-DeepSpeed command-line flags -> one validated `RunConfig`.

Users bring their launch scripts, so flag names are Megatron-LM's and Megatron-DeepSpeed's.
Everything is checked here, before any process group starts: a wrong combination should
cost a second and say which flag to change, not a hung NCCL job ten minutes later.
Flags that only mean something to DeepSpeed's engine or to pipeline code are accepted and
recorded as notes, so existing scripts run unchanged. The DeepSpeed JSON config
(`--deepspeed_config`) is read for the values it can set; a value that disagrees with an
explicit flag is an error rather than a silent override.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
from collections.abc import Callable, Sequence

from megatron import upstream_compat
from megatron.checkpoint.format import holds_checkpoint
from megatron.config import (
    ATTENTION_BACKENDS,
    LR_DECAY_STYLES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megatron.core.topology import Topology
from megatron.data.tokenizers import build_tokenizer  # build_tokenizer(data_config) -> tokenizer
from megatron.deepspeed_json import apply_deepspeed_config
from megatron.parallel.parallelize import validate_strategy

# Megatron-DeepSpeed's tokenizer names -> this framework's.
_TOKENIZER_ALIASES = {"HFTokenizer": "HuggingFaceTokenizer"}
_BERT_TOKENIZERS = ("BertWordPieceLowerCase", "BertWordPieceCase")

_POSITION_ALIASES = {"learned_absolute": "learned_absolute", "absolute": "learned_absolute",
                     "rope": "rope", "rotary": "rope", "none": "none"}
_NORM_ALIASES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}


class _Parser(argparse.ArgumentParser):
    """argparse, except that a malformed flag value raises ConfigError (printed once per job by
    pretrain_gpt.py) instead of printing the usage on every rank and exiting, and that a negative
    number in exponent form (--adam-eps -1e-8) is read as a value, not as a flag, as Python 3.13's
    argparse does (so that validation can say what is wrong with it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")

    def error(self, message: str):
        raise ConfigError(f"{message} (pretrain_gpt.py --help lists the flags)")


def build_parser(extra_args_provider: Callable | None = None) -> argparse.ArgumentParser:
    """All supported flags. Values a DeepSpeed config may also set default to None (= not given)."""
    p = _Parser(description="GPT pretraining with DeepSpeed-Ulysses sequence parallelism", allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, help="transformer layers (required)")
    g.add_argument("--encoder-num-layers", type=int, help="upstream's alias of --num-layers (used when it is absent)")
    g.add_argument("--hidden-size", type=int, help="model width (required)")
    g.add_argument("--ffn-hidden-size", type=int,
                   help="MLP width (default 4 x hidden; with --swiglu 2/3 of that, rounded down to a multiple of 64)")
    g.add_argument("--num-attention-heads", type=int, help="query heads (required; >= the Ulysses degree)")
    g.add_argument("--kv-channels", type=int, help="head dimension (default hidden / heads)")
    g.add_argument("--num-key-value-heads", type=int, help="Megatron-DeepSpeed's name for K/V heads")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention (with --num-query-groups; 1 group if that is absent)")
    g.add_argument("--num-query-groups", type=int,
                   help="K/V heads for grouped-query attention (Megatron-LM's name)")
    g.add_argument("--seq-length", type=int,
                   help="tokens per sample (required; divisible by --ds-sequence-parallel-size)")
    g.add_argument("--encoder-seq-length", type=int, help="upstream's alias of --seq-length (used when it is absent)")
    g.add_argument("--max-position-embeddings", type=int,
                   help="learned position table size (default --seq-length)")
    g.add_argument("--position-embedding-type", default="learned_absolute", choices=sorted(_POSITION_ALIASES),
                   help="learned_absolute (GPT-3), rope (Llama) or none")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="= --position-embedding-type rope")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base (theta)")
    g.add_argument("--rope-theta", "--rotary-position-embeddings-theta", type=float, dest="rotary_base",
                   help="aliases of --rotary-base (--rotary-position-embeddings-theta is Megatron-DeepSpeed's name)")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="fraction of each head's dimensions that RoPE rotates (GPT-NeoX style partial rotary: the "
                        "first int(head dim x percent) dims, which must be even)")
    g.add_argument("--rope-scaling-type", choices=["linear", "dynamic", "yarn", "llama3"],
                   help="RoPE scaling as transformers' rope_scaling defines it: linear (position interpolation), "
                        "dynamic (NTK, grows with the sequence length), yarn, llama3 (Llama 3.1)")
    g.add_argument("--rope-scaling-factor", type=float,
                   help="RoPE scaling factor: new context / original context (required with --rope-scaling-type)")
    g.add_argument("--original-max-position-embeddings", type=int,
                   help="the context the model was pretrained at, where RoPE scaling starts (required with "
                        "--rope-scaling-type dynamic, yarn, llama3)")
    g.add_argument("--rope-yarn-beta-fast", type=float, default=32.0, help="yarn: beta_fast (rotations)")
    g.add_argument("--rope-yarn-beta-slow", type=float, default=1.0, help="yarn: beta_slow (rotations)")
    g.add_argument("--rope-yarn-mscale", type=float, help="yarn: mscale (with --rope-yarn-mscale-all-dim)")
    g.add_argument("--rope-yarn-mscale-all-dim", type=float, help="yarn: mscale_all_dim")
    g.add_argument("--rope-yarn-no-truncate", action="store_false", dest="rope_yarn_truncate",
                   help="yarn: do not round the correction range to whole dims (transformers' truncate=False)")
    g.add_argument("--rope-attention-factor", type=float,
                   help="yarn: scale of cos/sin (default 0.1 ln(factor) + 1, or the mscale ratio)")
    g.add_argument("--rope-llama3-low-freq-factor", type=float, default=1.0, help="llama3: low_freq_factor")
    g.add_argument("--rope-llama3-high-freq-factor", type=float, default=4.0, help="llama3: high_freq_factor")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding",
                   help="no learned absolute position embedding (= --position-embedding-type none unless RoPE)")
    g.add_argument("--normalization", default="LayerNorm", type=lambda s: _NORM_ALIASES.get(s.lower(), s),
                   choices=["LayerNorm", "RMSNorm"], help="LayerNorm or RMSNorm (case-insensitive)")
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=float, default=1e-5,
                   help="epsilon of LayerNorm/RMSNorm (--layernorm-epsilon is upstream's name)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GeLU (Llama)")
    g.add_argument("--openai-gelu", action="store_true",
                   help="the tanh approximation of GeLU (OpenAI GPT-2's gelu_new), with or without biases")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion",
                   help="exact (erf) GeLU. Without it a GeLU MLP with biases computes the tanh approximation, as "
                        "upstream's default fused bias-GeLU kernel does")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output projection instead of the input embedding")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="no biases in the linear layers (Llama)")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="standard deviation of the normal weight initialization")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="dropout after attention and MLP")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="dropout of attention probabilities")
    g.add_argument("--attention-softmax-in-fp32", action="store_true", default=True,
                   help="always on here: softmax runs in fp32")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int,
                   help="samples per rank per forward pass (default 1, or the DeepSpeed JSON's)")
    g.add_argument("--global-batch-size", type=int,
                   help="samples per optimizer step (default micro batch x data-parallel size)")
    g.add_argument("--rampup-batch-size", nargs="*", help="batch-size ramp-up (refused: not implemented)")
    g.add_argument("--train-iters", type=int, help="optimizer steps to train")
    g.add_argument("--train-samples", type=int, help="samples to train (steps = samples / global batch)")
    g.add_argument("--train-tokens", type=int,
                   help="tokens to train; with --train-iters/--train-samples, the first limit reached stops the run")
    g.add_argument("--exit-interval", type=int,
                   help="save (with --save) and exit 0 at an iteration divisible by this")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="after this many minutes of training, save a checkpoint to --save and exit 0")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, finish the current iteration, save a checkpoint to --save and exit 0")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"],
                   help="adam and adamw are both AdamW (decoupled weight decay, as upstream's adam); sgd is refused")
    g.add_argument("--optimizer-impl", default="torch", choices=["torch", "apex"],
                   help="torch: torch.optim.AdamW (fused kernel, foreach under FSDP); apex: NVIDIA apex "
                        "FusedAdam (CUDA, ZeRO stage 0 or 1 only)")
    g.add_argument("--lr", type=float, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style", default="linear", choices=LR_DECAY_STYLES,
                   help="learning-rate decay after warmup")
    g.add_argument("--lr-decay-iters", type=int, help="decay length in steps (default: the whole run)")
    g.add_argument("--lr-decay-samples", type=int, help="decay length in samples")
    g.add_argument("--lr-decay-tokens", type=int, help="decay length in tokens")
    g.add_argument("--lr-warmup-iters", type=int, help="linear warmup length in steps (default 0)")
    g.add_argument("--lr-warmup-fraction", type=float, help="warmup length as a fraction of the decay length")
    g.add_argument("--lr-warmup-samples", type=int, help="warmup length in samples")
    g.add_argument("--lr-warmup-tokens", type=int, help="warmup length in tokens")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float,
                   help="clip the global gradient norm to this (default 1.0; 0: no clipping)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, dropout, data order)")

    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true", default=None,
                   help="fp16 mixed precision with a loss scaler")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    g.add_argument("--fp32-residual-connection", action="store_true",
                   help="under --bf16/--fp16 keep the residual stream (layer inputs and outputs) in fp32; by "
                        "default it is in the training precision, as upstream")
    g.add_argument("--loss-scale", type=float, help="static fp16 loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, help="first dynamic fp16 loss scale (default 2^32)")
    g.add_argument("--min-loss-scale", type=float, help="lowest dynamic fp16 loss scale (default 1)")
    g.add_argument("--loss-scale-window", type=_int_like,
                   help="overflow-free steps before the dynamic scale doubles (default 1000)")
    g.add_argument("--hysteresis", type=int,
                   help="overflows tolerated before the dynamic scale halves (default 2)")

    g = p.add_argument_group("parallelism and memory")
    g.add_argument("--ds-sequence-parallel-size", type=int, default=1,
                   help="Ulysses sequence-parallel degree: ranks that share each sample's tokens")
    g.add_argument("--ring-attention-size", type=int, default=1,
                   help="ring degree R inside the SP group: Ulysses over SP/R ranks x ring attention over R "
                        "(lifts the heads >= SP cap; R = SP is pure ring attention)")
    g.add_argument("--ulysses-overlap-chunks", type=int, default=1,
                   help="pipeline Ulysses over this many head chunks so all-to-alls overlap attention")
    g.add_argument("--zero-stage", type=int,
                   help="0: DDP; 1: sharded optimizer state; 2: and gradients (FSDP2); 3: and parameters (FSDP2)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="must be 1 (tensor parallelism is not implemented)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="must be 1 (pipeline parallelism is not implemented)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's tensor-parallel sequence parallelism: a note at tensor parallel 1, where "
                        "upstream turns it off too (Ulysses is --ds-sequence-parallel-size)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo", "ccl", "hccl"],
                   help="nccl (GPUs) or gloo (CPU); upstream's ccl/hccl (Intel, Habana) are refused")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="timeout of collective operations")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute every layer in the backward pass (= --recompute-granularity full)")
    g.add_argument("--checkpoint-num-layers", type=int, default=1,
                   help="layers per recomputed chunk with --checkpoint-activations (= --recompute-method uniform "
                        "--recompute-num-layers N): a chunk keeps only its input, backward recomputes N layers")
    g.add_argument("--recompute-method", choices=["uniform", "block"],
                   help="with full recompute: 'uniform' recomputes chunks of --recompute-num-layers layers, 'block' "
                        "recomputes only the first --recompute-num-layers layers (Megatron-LM)")
    g.add_argument("--recompute-num-layers", type=int,
                   help="layers per chunk (uniform) or recomputed layers (block); default 1 (uniform) / all (block)")
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="full: recompute whole layers; selective: recompute core attention only")
    g.add_argument("--use-flash-attn-v2", dest="use_flash_attn", action="store_true",
                   help="= --attention-backend flash-attn")
    g.add_argument("--use-flash-attn", "--use-flash-attn-v1", dest="use_flash_attn_v1", action="store_true",
                   help="upstream's FlashAttention v1 flag: selects the flash-attn backend (with a note)")
    g.add_argument("--use-flash-attn-builder", action="store_true",
                   help="upstream's DeepSpeed FlashAttention op: selects the flash-attn backend (with a note)")
    g.add_argument("--use-flash-attn-triton", action="store_true",
                   help="= --attention-backend triton (this framework's Triton FlashAttention kernel)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   help="core attention kernel (default sdpa: torch scaled_dot_product_attention)")
    g.add_argument("--deepspeed", "--deepscale", dest="deepspeed", action="store_true",
                   help="read --deepspeed_config as DeepSpeed does (loss scaling and clipping from the JSON, batch "
                        "sizes from the Megatron flags); no DeepSpeed engine is used")
    g.add_argument("--deepspeed_config", "--deepspeed-config", "--deepscale_config", dest="deepspeed_config",
                   help="a DeepSpeed JSON config (see 'DeepSpeed JSON' in docs/flags.md)")
    g.add_argument("--ds-sequence-parallel-fpdt", action="store_true",
                   help="DeepSpeed FPDT (sequence chunks through Ulysses attention, for memory): mapped onto head-chunk "
                        "overlap, tiled MLP and tiled loss with the same chunking (printed at start-up)")
    g.add_argument("--ds-sequence-parallel-fpdt-chunk-size", type=int, default=65536,
                   help="FPDT chunk length in tokens: sets how many chunks the mapped tiling uses")
    g.add_argument("--ds-sequence-parallel-fpdt-offloading", action="store_true",
                   help="FPDT host offloading: mapped onto --offload-activations")
    g.add_argument("--tiled-loss-tokens", type=int, default=0,
                   help="compute logits + cross-entropy in tiles of this many tokens (0: off)")
    g.add_argument("--tiled-mlp-tiles", type=int, default=1, help="run each MLP over this many sequence tiles")
    g.add_argument("--tiled-projection-tiles", type=int, default=1,
                   help="run every token-local part of a layer (norms, QKV projection + RoPE, output projection, "
                        "residual adds; the MLP in --tiled-mlp-tiles tiles) over this many sequence tiles, forward "
                        "and backward")
    g.add_argument("--attention-head-chunks", type=int, default=1,
                   help="run the local attention kernel over this many head chunks (one chunk's kernel workspace "
                        "at a time)")
    g.add_argument("--offload-activations", "--checkpoint-in-cpu", dest="offload_activations",
                   action="store_true", help="keep saved activations in host memory (GPU only)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[],
                   help="a preprocessed prefix (.bin/.idx), or 'W1 P1 W2 P2 ...' to blend")
    g.add_argument("--split", default="969, 30, 1",
                   help="train, validation, test proportions of the documents")
    g.add_argument("--tokenizer-type", help="default GPT2BPETokenizer (upstream's default); HFTokenizer is "
                   "upstream's name for HuggingFaceTokenizer")
    g.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt")
    g.add_argument("--tokenizer-model",
                   help="SentencePiece model, or a local tokenizer.json / its directory (HuggingFaceTokenizer)")
    g.add_argument("--vocab-size", type=int, help="vocabulary size of the NullTokenizer (synthetic data)")
    g.add_argument("--vocab-extra-ids", type=int, default=0,
                   help="extra sentinel tokens added to SentencePieceTokenizer")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart after each end-of-document token")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="attention does not cross end-of-document tokens")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--data-cache-path", help="directory for the index files built from --data-path")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens instead of --data-path")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100,
                   help="print an averaged iteration line every this many steps")
    g.add_argument("--eval-interval", type=int, default=1000,
                   help="evaluate on the validation split every this many steps")
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches per evaluation")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="TensorBoard (and W&B) scalars every this many steps")
    g.add_argument("--log-timers-to-tensorboard", action="store_true", help="also log the timers")
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                   help="0: iteration time; 1: plus per-phase timers; 2: finer timers")
    g.add_argument("--log-json", help="append one JSON object per logged event to this file")
    g.add_argument("--long-context-eval-interval", type=int, default=0,
                   help="every this many steps: loss by position (and passkey retrieval) at --seq-length, "
                        "distributed like training, logged as long-context/* scalars (0: off)")
    g.add_argument("--long-context-eval-data",
                   help="a .bin/.idx prefix with documents of at least --seq-length + 1 tokens (default: the last "
                        "documents of the first --data-path prefix)")
    g.add_argument("--long-context-eval-documents", type=int, default=4, help="documents per long-context evaluation")
    g.add_argument("--long-context-eval-passkey-lengths", type=int, nargs="*",
                   help="passkey context lengths (default: --seq-length with a text tokenizer; none with "
                        "--mock-data / NullTokenizer)")
    g.add_argument("--wandb-project", default="", help="log to this Weights & Biases project (needs the wandb "
                   "package; WANDB_MODE=offline works without a network)")
    g.add_argument("--wandb-exp-name", default="", help="the W&B run name (also turns W&B logging on)")
    g.add_argument("--wandb-save-dir", default="", help="local W&B directory (default: --save/wandb)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--load", help="resume from this checkpoint directory (usually the same as --save)")
    g.add_argument("--save-interval", type=int, help="save a checkpoint every this many steps")
    g.add_argument("--no-save-optim", action="store_true", help="checkpoints without optimizer state")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer state")
    g.add_argument("--no-save-rng", action="store_true", help="checkpoints without RNG state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG state")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model weights from --load; iteration, optimizer, scaler and RNG start fresh")
    g.add_argument("--keep-last-checkpoints", type=int, metavar="K",
                   help="after each save, delete all but the K newest iter_* directories under --save")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="refuse to start when --load holds no checkpoint (instead of training from scratch)")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="let this run replace checkpoints under --save that it did not start from (those "
                        "newer than the loaded iteration); without it such a run stops before training")
    g.add_argument("--load-fallback", action="store_true",
                   help="if the checkpoint to load is damaged or incomplete, load the newest complete one "
                        "before it (the damaged directory is renamed *.damaged, never deleted)")

    upstream_compat.add_to_parser(p)
    if extra_args_provider is not None:
        p = extra_args_provider(p)
    return p


def world_size_from_env() -> int:
    """World size as torchrun or Slurm will set it (or of the process group that already
    exists, when runs share processes); 1 for a plain `python pretrain_gpt.py`."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None,
               extra_args_provider: Callable | None = None, check_environment: bool = True,
               padded_vocab_size: int | None = None) -> RunConfig:
    """Parse and validate flags; raise `ConfigError` naming the flag and the fix.

    `check_environment=False` skips checks of the local machine (flash-attn installed, GPU
    present) so that a dry run on a login node validates a GPU cluster's configuration.
    `padded_vocab_size` skips building the tokenizer (tests of flag logic).
    """
    parser = build_parser(extra_args_provider)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(upstream_compat.unknown_flags_message(parser, unknown))
    return config_from_args(args, world_size if world_size is not None else world_size_from_env(),
                            check_environment=check_environment, padded_vocab_size=padded_vocab_size)


def config_from_args(args: argparse.Namespace, world_size: int, check_environment: bool = True,
                     padded_vocab_size: int | None = None) -> RunConfig:
    notes = upstream_compat.review(args)
    notes += upstream_compat.resolve_upstream_names(args)
    if args.deepspeed:
        notes.append(f"--deepspeed: accepted ({upstream_compat.DEEPSPEED_NOTE})")
    if args.deepspeed_config:
        notes += apply_deepspeed_config(args, args.deepspeed_config, world_size)
    args.notes = notes
    _fill_defaults(args)
    _validate_parallel(args, world_size)
    _validate_model_flags(args)
    dp = world_size // args.ds_sequence_parallel_size
    _resolve_batch(args, dp)
    _validate_precision_and_backend(args, check_environment)
    _validate_optimizer_flags(args)
    _validate_optimizer_impl(args, check_environment)
    data = _data_config(args, check_environment)
    train = _train_config(args)
    optim = _optim_config(args, train)
    vocab, true_vocab = (padded_vocab_size, None) if padded_vocab_size is not None else _vocab_sizes(data)
    model = _model_config(args, vocab, true_vocab)
    if model.activation == "gelu_tanh" and not args.openai_gelu:
        notes.append("GeLU: the tanh approximation, as upstream's default fused bias-GeLU kernel computes it; "
                      "--no-bias-gelu-fusion selects the exact GeLU")
    parallel = ParallelConfig(sequence_parallel_size=args.ds_sequence_parallel_size,
                              ring_attention_size=args.ring_attention_size,
                              zero_stage=args.zero_stage, distributed_backend=args.distributed_backend,
                              distributed_timeout_minutes=args.distributed_timeout_minutes,
                              attention_backend=args.attention_backend,
                              recompute_granularity=args.recompute_granularity,
                              recompute_method=args.recompute_method or "uniform",
                              recompute_num_layers=args.recompute_num_layers,
                              loss_tile_tokens=args.tiled_loss_tokens, mlp_tiles=args.tiled_mlp_tiles,
                              projection_tiles=args.tiled_projection_tiles,
                              attention_head_chunks=args.attention_head_chunks,
                              offload_activations=args.offload_activations,
                              ulysses_overlap_chunks=args.ulysses_overlap_chunks,
                              fp32_residual_connection=args.fp32_residual_connection)
    # everything the run itself would refuse (heads vs SP, sequence layout, kernels vs precision)
    _, strategy_notes = validate_strategy(model, parallel, world_size=world_size, seq_length=data.seq_length,
                                          precision=optim.dtype_name,
                                          device_type=None if not check_environment else
                                          ("cuda" if args.distributed_backend == "nccl" else "cpu"))
    notes += strategy_notes
    ckpt = _checkpoint_config(args, check_environment)
    log = LogConfig(log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
                    tensorboard_log_interval=args.tensorboard_log_interval,
                    log_timers_to_tensorboard=args.log_timers_to_tensorboard, log_json=args.log_json,
                    timing_log_level=args.timing_log_level, **_wandb_settings(args, check_environment))
    return RunConfig(model=model, parallel=parallel, data=data, optim=optim, train=train,
                     checkpoint=ckpt, log=log, world_size=world_size, notes=tuple(notes))


# ----------------------------------------------------------------------------- validation

def _fill_defaults(a: argparse.Namespace) -> None:
    """Defaults for flags a DeepSpeed config may set (they parse as None so conflicts are visible)."""
    defaults = dict(zero_stage=0, clip_grad=1.0, fp16=False, bf16=False, initial_loss_scale=2.0 ** 32,
                    min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2, micro_batch_size=1)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.distributed_backend is None:
        a.distributed_backend = "nccl" if _cuda_available() else "gloo"


def _validate_parallel(a: argparse.Namespace, world: int) -> None:
    sp = a.ds_sequence_parallel_size
    if a.tensor_model_parallel_size != 1 or a.pipeline_model_parallel_size != 1:
        raise ConfigError(
            "--tensor-model-parallel-size and --pipeline-model-parallel-size must be 1: this framework "
            "parallelises with Ulysses SP x ZeRO data parallelism; use --ds-sequence-parallel-size and "
            "--zero-stage instead")
    Topology(world, sp, a.ring_attention_size, overlap_chunks=a.ulysses_overlap_chunks)  # sizes only; raises
    if a.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {a.zero_stage}")
    if a.rampup_batch_size is not None:
        raise ConfigError("--rampup-batch-size is not supported: drop it and use a constant --global-batch-size")


def _validate_model_flags(a: argparse.Namespace) -> None:
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(a, flag) is None:
            raise ConfigError(f"--{flag.replace('_', '-')} is required")
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(a, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
    if a.max_position_embeddings is None:
        a.max_position_embeddings = a.seq_length
    if a.use_rotary_position_embeddings:
        a.position_embedding_type = "rope"
    a.position_embedding_type = _POSITION_ALIASES[a.position_embedding_type]
    if not a.add_position_embedding and a.position_embedding_type == "learned_absolute":
        a.position_embedding_type = "none"  # upstream's --no-position-embedding: no learned positions
    if a.position_embedding_type == "learned_absolute" and a.seq_length > a.max_position_embeddings:
        raise ConfigError(f"--seq-length ({a.seq_length}) must be <= --max-position-embeddings "
                          f"({a.max_position_embeddings}) with learned absolute positions; raise "
                          f"--max-position-embeddings")
    if a.num_key_value_heads is not None and a.num_query_groups is not None \
            and a.num_key_value_heads != a.num_query_groups:
        raise ConfigError(f"--num-key-value-heads ({a.num_key_value_heads}) and --num-query-groups "
                          f"({a.num_query_groups}) name the same thing and disagree; pass one of them")
    groups = a.num_key_value_heads if a.num_key_value_heads is not None else a.num_query_groups
    if groups is None and a.group_query_attention:
        groups = 1  # Megatron-LM's default for --group-query-attention alone
    a.num_query_groups = groups
    if a.checkpoint_activations and a.recompute_granularity == "selective" or \
            a.recompute_activations and a.recompute_granularity == "full":
        raise ConfigError("--checkpoint-activations means --recompute-granularity full and "
                          "--recompute-activations means selective; pass only one of them")
    if a.checkpoint_activations:
        a.recompute_granularity = "full"
    elif a.recompute_activations:
        a.recompute_granularity = "selective"
    _resolve_recompute_layers(a)
    a.notes += upstream_compat.map_fpdt(a)


def _resolve_recompute_layers(a: argparse.Namespace) -> None:
    """--checkpoint-num-layers (Megatron-DeepSpeed) and --recompute-method/--recompute-num-layers
    (Megatron-LM) into one (method, layers) pair."""
    if a.checkpoint_num_layers != 1 and a.recompute_num_layers not in (None, a.checkpoint_num_layers):
        raise ConfigError(f"--checkpoint-num-layers ({a.checkpoint_num_layers}) and --recompute-num-layers "
                          f"({a.recompute_num_layers}) name the same thing and disagree; pass one of them")
    if a.checkpoint_num_layers != 1 and a.recompute_method == "block":
        raise ConfigError("--checkpoint-num-layers chunks layers uniformly; with --recompute-method block use "
                          "--recompute-num-layers")
    if a.recompute_num_layers is None:
        a.recompute_num_layers = a.checkpoint_num_layers if a.recompute_method != "block" else a.num_layers
    if (a.recompute_method is not None or a.recompute_num_layers != 1) and a.recompute_granularity != "full":
        raise ConfigError("--recompute-method / --recompute-num-layers / --checkpoint-num-layers apply to full "
                          "recompute: add --checkpoint-activations (or --recompute-granularity full)")
    if a.recompute_num_layers < 1 or a.recompute_num_layers > a.num_layers:
        raise ConfigError(f"--recompute-num-layers / --checkpoint-num-layers must be in [1, --num-layers "
                          f"{a.num_layers}], got {a.recompute_num_layers}")


def _resolve_batch(a: argparse.Namespace, dp: int) -> None:
    mbs = a.micro_batch_size
    if mbs < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {mbs}")
    if a.global_batch_size is None:
        a.global_batch_size = mbs * dp
    if a.global_batch_size % (mbs * dp):
        raise ConfigError(
            f"--global-batch-size ({a.global_batch_size}) must be divisible by --micro-batch-size ({mbs}) x "
            f"data-parallel size ({dp} = world / --ds-sequence-parallel-size) = {mbs * dp}; e.g. use "
            f"--global-batch-size {max(1, a.global_batch_size // (mbs * dp)) * mbs * dp}")
    gbs, tokens = a.global_batch_size, a.global_batch_size * a.seq_length
    if a.train_iters is not None and a.train_samples is not None:
        raise ConfigError("--train-iters and --train-samples are mutually exclusive; pass one of them")
    limits = [x for x in (a.train_iters,
                          None if a.train_samples is None else a.train_samples // gbs,
                          None if a.train_tokens is None else math.ceil(a.train_tokens / tokens)) if x is not None]
    if not limits:
        raise ConfigError("one of --train-iters, --train-samples or --train-tokens is required")
    # Megatron sizes the datasets by --train-iters (or --train-samples // gbs), not the token cap
    a.dataset_train_iters = limits[0] if a.train_iters is not None or a.train_samples is not None else None
    a.train_iters = min(limits)  # with --train-tokens, training stops at whichever limit comes first
    if a.train_iters < 1:
        raise ConfigError(f"the run would train {a.train_iters} iterations; raise --train-iters/"
                          f"--train-samples/--train-tokens (one step is {gbs} samples, {tokens} tokens)")
    decay = [(f, v) for f, v in (("--lr-decay-iters", a.lr_decay_iters),
                                 ("--lr-decay-samples", _ceil_div(a.lr_decay_samples, gbs)),
                                 ("--lr-decay-tokens", _ceil_div(a.lr_decay_tokens, tokens))) if v is not None]
    if len(decay) > 1:
        raise ConfigError(f"{' and '.join(f for f, _ in decay)} all set the decay length; pass one of them")
    a.lr_decay_steps = decay[0][1] if decay else a.train_iters
    for flag in ("lr_warmup_iters", "lr_warmup_samples"):
        if getattr(a, flag) == 0:
            setattr(a, flag, None)  # upstream's default: 0 says "no warmup from this flag", not a conflict
    warm = [(f, v) for f, v in (("--lr-warmup-iters", a.lr_warmup_iters),
                                ("--lr-warmup-fraction", None if a.lr_warmup_fraction is None
                                 else int(a.lr_warmup_fraction * a.lr_decay_steps)),
                                ("--lr-warmup-samples", _ceil_div(a.lr_warmup_samples, gbs)),
                                ("--lr-warmup-tokens", _ceil_div(a.lr_warmup_tokens, tokens))) if v is not None]
    if len(warm) > 1:
        raise ConfigError(f"{' and '.join(f for f, _ in warm)} all set the warmup length; pass one of them")
    a.lr_warmup_steps = warm[0][1] if warm else 0
    if a.lr_decay_style != "constant" and a.lr_warmup_steps > a.lr_decay_steps:
        raise ConfigError(f"warmup ({a.lr_warmup_steps} steps) is longer than decay ({a.lr_decay_steps} "
                          f"steps); shorten the warmup or lengthen --lr-decay-iters/-samples/-tokens")


def _validate_precision_and_backend(a: argparse.Namespace, check_environment: bool) -> None:
    if a.fp16 and a.bf16:
        raise ConfigError("--fp16 and --bf16 are mutually exclusive: pass at most one of them")
    if a.lr is None:
        raise ConfigError("--lr is required (the peak learning rate, e.g. --lr 3e-4)")
    backend = a.attention_backend
    flash = a.use_flash_attn or a.use_flash_attn_v1 or a.use_flash_attn_builder
    wanted = "flash-attn" if flash else "triton" if a.use_flash_attn_triton else None
    if flash and a.use_flash_attn_triton:
        raise ConfigError("--use-flash-attn(-v1/-v2/-builder) and --use-flash-attn-triton choose different kernels; "
                          "pass one")
    if wanted and backend and backend != wanted:
        raise ConfigError(f"--attention-backend {backend} contradicts the flash-attention flag (which means "
                          f"--attention-backend {wanted}); pass one of them")
    a.attention_backend = wanted or backend or "sdpa"
    if not check_environment:
        return
    if a.attention_backend == "flash-attn" and not (_has_module("flash_attn") and _cuda_available()):
        raise ConfigError("--use-flash-attn / --use-flash-attn-v2 / --attention-backend flash-attn need the "
                          "flash_attn package and a CUDA GPU "
                          f"(flash_attn installed: {_has_module('flash_attn')}, GPU: {_cuda_available()}); "
                          "install flash-attn on a GPU node or drop the flag (the default sdpa backend "
                          "runs everywhere)")
    if a.attention_backend == "triton":
        from megatron.model.triton_attention import triton_available  # noqa: PLC0415

        usable, why = triton_available()
        if not usable:
            raise ConfigError(f"--use-flash-attn-triton / --attention-backend triton need triton and a CUDA GPU "
                              f"(or TRITON_INTERPRET=1 for a slow CPU check): {why}; drop the flag to use the "
                              f"default sdpa backend")
    if a.distributed_backend == "nccl" and not _cuda_available():
        raise ConfigError("--distributed-backend nccl needs CUDA GPUs; use --distributed-backend gloo on CPU")
    if (a.fp16 or a.bf16) and not _cuda_available():
        pass  # allowed (tests exercise it); it is slow: CPU half-precision matmul is ~250x slower than fp32


def _data_config(a: argparse.Namespace, check_environment: bool = True) -> DataConfig:
    if not a.mock_data and not a.data_path:
        raise ConfigError("--data-path is required (a preprocessed prefix, or 'W1 P1 W2 P2' to blend); "
                          "use --mock-data for synthetic tokens")
    if a.mock_data and a.data_path:
        raise ConfigError("--mock-data and --data-path both given: --mock-data trains on synthetic tokens and would "
                          "ignore --data-path; drop one of them")
    _validate_data_path(a)
    if a.tokenizer_type in _BERT_TOKENIZERS:
        raise ConfigError(f"--tokenizer-type {a.tokenizer_type}: BERT WordPiece tokenizers are not supported for GPT "
                          f"pretraining; use GPT2BPETokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer or "
                          f"HFTokenizer")
    a.tokenizer_type = _TOKENIZER_ALIASES.get(a.tokenizer_type, a.tokenizer_type)
    synthetic = a.mock_data and a.vocab_file is None and a.tokenizer_model is None
    if a.tokenizer_type is None and not synthetic:
        a.tokenizer_type = "GPT2BPETokenizer"  # Megatron-DeepSpeed's default: its GPT examples never pass the flag
    if a.mock_data and a.tokenizer_type is None and a.vocab_size is None:
        raise ConfigError("--mock-data without --tokenizer-type needs --vocab-size (NullTokenizer)")
    return DataConfig(seq_length=a.seq_length, data_path=tuple(a.data_path), split=a.split,
                      tokenizer_type=a.tokenizer_type or "NullTokenizer", vocab_file=a.vocab_file,
                      merge_file=a.merge_file, tokenizer_model=a.tokenizer_model, vocab_size=a.vocab_size,
                      vocab_extra_ids=a.vocab_extra_ids, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                      reset_position_ids=a.reset_position_ids, reset_attention_mask=a.reset_attention_mask,
                      eod_mask_loss=a.eod_mask_loss, data_cache_path=a.data_cache_path, mock_data=a.mock_data)


def _validate_data_path(a: argparse.Namespace) -> None:
    """--data-path and --split syntax (the files are checked by `check_paths`)."""
    from megatron.data.index_mapping import get_train_valid_test_split  # noqa: PLC0415

    get_train_valid_test_split(a.split, 1000)  # raises ConfigError naming --split
    if a.data_path:
        from megatron.data.gpt_dataset import parse_data_prefix  # noqa: PLC0415

        parse_data_prefix(list(a.data_path))  # raises ConfigError naming --data-path


def _validate_optimizer_flags(a: argparse.Namespace) -> None:
    """Values the optimizer, the loss scaler or the process group would take without complaint and
    then misbehave with (a beta of 1.5, a negative epsilon or weight decay, a negative timeout)."""
    def check(flag: str, value, ok: bool, must: str, fix: str = "") -> None:
        if value is not None and not ok:  # comparisons with NaN are False, so NaN fails `ok` too
            raise ConfigError(f"{flag} must be {must}, got {value}{'; ' + fix if fix else ''}")

    check("--lr", a.lr, a.lr >= 0, ">= 0", "e.g. --lr 3e-4")
    check("--min-lr", a.min_lr, a.min_lr >= 0, ">= 0")
    check("--weight-decay", a.weight_decay, a.weight_decay >= 0, ">= 0 (0 disables weight decay)")
    for flag in ("adam_beta1", "adam_beta2"):
        v = getattr(a, flag)
        check(f"--{flag.replace('_', '-')}", v, 0 <= v < 1, "in [0, 1)",
              "typical values are --adam-beta1 0.9 --adam-beta2 0.95 (or 0.999)")
    check("--adam-eps", a.adam_eps, a.adam_eps >= 0, ">= 0", "the usual value is 1e-8")
    check("--clip-grad", a.clip_grad, a.clip_grad >= 0, ">= 0 (0 disables clipping)")
    check("--init-method-std", a.init_method_std, a.init_method_std >= 0, ">= 0", "GPT-3 uses 0.02")
    check("--loss-scale", a.loss_scale, a.loss_scale is None or a.loss_scale > 0, "positive",
          "drop it for dynamic loss scaling")
    check("--initial-loss-scale", a.initial_loss_scale, a.initial_loss_scale > 0, "positive")
    check("--min-loss-scale", a.min_loss_scale, a.min_loss_scale > 0, "positive")
    check("--distributed-timeout-minutes", a.distributed_timeout_minutes, a.distributed_timeout_minutes > 0,
          "positive", "the default is 10")
    check("--global-batch-size", a.global_batch_size, a.global_batch_size >= 1, ">= 1")
    if a.lr == 0:
        a.notes.append("WARNING: --lr 0: the weights never change (a learning rate of 0 at the peak); pass the "
                       "peak learning rate, e.g. --lr 3e-4, unless you mean to train nothing (throughput runs)")


def _train_config(a: argparse.Namespace) -> TrainConfig:
    for flag in ("eval_interval", "log_interval"):
        if getattr(a, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {a.eval_iters}")
    lc = _long_context_eval(a)
    return TrainConfig(**lc, micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
                       train_iters=a.train_iters, eval_interval=a.eval_interval, eval_iters=a.eval_iters,
                       train_samples=a.train_samples, dataset_train_iters=getattr(a, "dataset_train_iters", None),
                       seed=a.seed, exit_interval=a.exit_interval, exit_signal_handler=a.exit_signal_handler,
                       exit_duration_in_mins=a.exit_duration_in_mins)


def _long_context_eval(a: argparse.Namespace) -> dict:
    interval = a.long_context_eval_interval or 0
    if interval < 0 or a.long_context_eval_documents < 1:
        raise ConfigError("--long-context-eval-interval must be >= 0 and --long-context-eval-documents >= 1")
    if not interval:
        return {}
    data = a.long_context_eval_data
    if data is None:
        prefixes = [x for x in a.data_path if not _is_number(x)]
        if not prefixes:
            raise ConfigError("--long-context-eval-interval needs documents: pass --long-context-eval-data PREFIX "
                              "(a .bin/.idx prefix; --mock-data has none)")
        data = prefixes[0]
    lengths = a.long_context_eval_passkey_lengths
    if lengths is None:
        text = a.tokenizer_type not in (None, "NullTokenizer") and not (a.mock_data and a.tokenizer_type is None)
        lengths = [a.seq_length] if text else []
    from megatron.core.sequence_parallel.layout import check_seq_len  # noqa: PLC0415

    for n in lengths:
        check_seq_len(n, a.ds_sequence_parallel_size, a.ring_attention_size)
    return dict(long_context_eval_interval=interval, long_context_eval_data=data,
                long_context_eval_documents=a.long_context_eval_documents,
                long_context_eval_passkey_lengths=tuple(lengths))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _checkpoint_config(a: argparse.Namespace, check_environment: bool) -> CheckpointConfig:
    for flag in ("save_interval", "keep_last_checkpoints", "exit_interval"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.exit_duration_in_mins is not None and a.exit_duration_in_mins < 0:
        raise ConfigError(f"--exit-duration-in-mins must be >= 0, got {a.exit_duration_in_mins}")
    if a.finetune and not a.load:
        raise ConfigError("--finetune loads weights from --load; pass --load DIR (a --save directory or the "
                          "output of tools/checkpoint/convert_from_hf.py --dcp DIR)")
    # A resubmitted job passes the same directory to --save and --load, which does not exist on
    # its first run; any other missing --load is a typo that must not silently train from scratch.
    if check_environment and a.load and not os.path.exists(a.load) and \
            os.path.abspath(a.load) != os.path.abspath(a.save or ""):
        raise ConfigError(f"--load {a.load}: no such directory; pass the --save directory of an earlier run "
                          f"(it holds latest_checkpointed_iteration.txt), or drop --load to start from scratch")
    if check_environment and a.exit_on_missing_checkpoint and a.load and not holds_checkpoint(a.load):
        raise ConfigError(f"--exit-on-missing-checkpoint: --load {a.load} holds no checkpoint "
                          f"(no latest_checkpointed_iteration.txt, iter_XXXXXXX directory or .metadata); pass the "
                          f"--save directory of an earlier run, or drop --exit-on-missing-checkpoint to start from "
                          f"scratch")
    return CheckpointConfig(save=a.save, load=a.load, save_interval=a.save_interval, no_save_optim=a.no_save_optim,
                            no_load_optim=a.no_load_optim, no_save_rng=a.no_save_rng, no_load_rng=a.no_load_rng,
                            finetune=a.finetune, keep_last=a.keep_last_checkpoints,
                            overwrite_checkpoints=a.overwrite_checkpoints, load_fallback=a.load_fallback)


def _wandb_settings(a: argparse.Namespace, check_environment: bool) -> dict:
    """LogConfig's W&B fields. Logging is on when a project or a run name is given (as upstream)."""
    if not (a.wandb_project or a.wandb_exp_name):
        return {}
    if check_environment and not _has_module("wandb"):
        raise ConfigError("--wandb-project / --wandb-exp-name need the wandb package, which is not installed: "
                          "pip install wandb (WANDB_MODE=offline logs without a network), or drop the flags")
    save_dir = a.wandb_save_dir or (os.path.join(a.save, "wandb") if a.save else None)
    # upstream hands W&B every parsed flag as the run's config; so do we (JSON-able values only)
    flags = tuple(sorted((k, v) for k, v in vars(a).items()
                         if isinstance(v, (str, int, float, bool, type(None))) and not k.startswith("compat_")))
    return dict(wandb_project=a.wandb_project, wandb_exp_name=a.wandb_exp_name, wandb_save_dir=save_dir,
                wandb_config=flags)


def _optim_config(a: argparse.Namespace, train: TrainConfig) -> OptimConfig:
    if a.fp16 and a.loss_scale is None and a.initial_loss_scale < a.min_loss_scale:
        raise ConfigError(f"--initial-loss-scale ({a.initial_loss_scale}) must be >= --min-loss-scale "
                          f"({a.min_loss_scale})")
    if a.hysteresis < 1 or a.loss_scale_window < 1:
        raise ConfigError("--hysteresis and --loss-scale-window must be >= 1")
    return OptimConfig(lr=a.lr, min_lr=a.min_lr, lr_decay_style=a.lr_decay_style,
                       lr_decay_steps=a.lr_decay_steps, lr_warmup_steps=a.lr_warmup_steps,
                       weight_decay=a.weight_decay, adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2,
                       adam_eps=a.adam_eps, clip_grad=a.clip_grad, fp16=a.fp16, bf16=a.bf16,
                       loss_scale=a.loss_scale, initial_loss_scale=a.initial_loss_scale,
                       min_loss_scale=a.min_loss_scale, loss_scale_window=a.loss_scale_window,
                       hysteresis=a.hysteresis, optimizer_impl=a.optimizer_impl)


def _validate_optimizer_impl(a: argparse.Namespace, check_environment: bool) -> None:
    """apex FusedAdam only when asked for, only where it works (plain-tensor stages, CUDA, a CUDA build)."""
    if a.optimizer_impl != "apex":
        return
    if a.zero_stage not in (0, 1):
        raise ConfigError(f"--optimizer-impl apex works with --zero-stage 0 or 1 (plain parameters), got "
                          f"--zero-stage {a.zero_stage}, whose FSDP parameters apex cannot step; drop "
                          f"--optimizer-impl apex (the default torch AdamW is fused too)")
    if check_environment:
        from megatron.training import optimizer  # noqa: PLC0415 (imports torch; keep --help fast)

        optimizer.apex_fused_adam()  # raises ConfigError naming what is missing


def _activation(a: argparse.Namespace) -> str:
    """The MLP activation upstream's ParallelMLP computes for these flags: --openai-gelu (tanh), --onnx-safe
    (exact), --swiglu, else F.gelu or, with biases and without --no-bias-gelu-fusion, the fused bias-GeLU
    kernel, which computes the tanh approximation."""
    if a.swiglu and a.openai_gelu:
        raise ConfigError("--openai-gelu and --swiglu choose different MLPs; pass one of them")
    if a.swiglu:
        return "swiglu"
    if a.openai_gelu:
        return "gelu_tanh"
    if getattr(a, "compat_onnx_safe", None) or a.disable_bias_linear or not a.bias_gelu_fusion:
        return "gelu"
    return "gelu_tanh"


def _rope_fields(a: argparse.Namespace) -> dict:
    kind = a.rope_scaling_type
    fields = dict(rotary_percent=a.rotary_percent)
    if kind is None:
        given = [f for f, v in (("--rope-scaling-factor", a.rope_scaling_factor),
                                ("--original-max-position-embeddings", a.original_max_position_embeddings))
                 if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} only act with --rope-scaling-type (linear, dynamic, yarn or "
                              f"llama3); add it or drop them")
        return fields
    if a.position_embedding_type != "rope":
        raise ConfigError(f"--rope-scaling-type {kind} needs rotary position embeddings: add "
                          f"--position-embedding-type rope (or --use-rotary-position-embeddings)")
    if a.rope_scaling_factor is None:
        raise ConfigError(f"--rope-scaling-type {kind} needs --rope-scaling-factor (new context / original context, "
                          f"e.g. 4 to train at 4x the pretraining length)")
    if kind != "linear" and a.original_max_position_embeddings is None:
        raise ConfigError(f"--rope-scaling-type {kind} needs --original-max-position-embeddings: the context the "
                          f"model was pretrained at (where the scaling starts)")
    return fields | dict(rope_scaling_type=kind, rope_scaling_factor=a.rope_scaling_factor,
                         original_max_position_embeddings=a.original_max_position_embeddings,
                         yarn_beta_fast=a.rope_yarn_beta_fast, yarn_beta_slow=a.rope_yarn_beta_slow,
                         yarn_mscale=a.rope_yarn_mscale, yarn_mscale_all_dim=a.rope_yarn_mscale_all_dim,
                         yarn_truncate=a.rope_yarn_truncate, rope_attention_factor=a.rope_attention_factor,
                         llama3_low_freq_factor=a.rope_llama3_low_freq_factor,
                         llama3_high_freq_factor=a.rope_llama3_high_freq_factor)


def _model_config(a: argparse.Namespace, vocab_size: int, true_vocab_size: int | None = None) -> ModelConfig:
    ffn = a.ffn_hidden_size
    if ffn is None and a.swiglu:
        ffn = int(4 * a.hidden_size * 2 / 3 / 64) * 64 or 4 * a.hidden_size  # Megatron-LM's SwiGLU width
    return ModelConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        vocab_size=vocab_size, max_position_embeddings=a.max_position_embeddings, ffn_hidden_size=ffn,
        num_query_groups=a.num_query_groups, kv_channels=a.kv_channels,
        position_embedding_type=a.position_embedding_type, rotary_base=a.rotary_base,
        normalization=a.normalization, norm_epsilon=a.norm_epsilon,
        activation=_activation(a), add_bias_linear=not a.disable_bias_linear,
        untie_embeddings_and_output_weights=a.untie_embeddings_and_output_weights,
        init_method_std=a.init_method_std, hidden_dropout=a.hidden_dropout,
        attention_dropout=a.attention_dropout,
        true_vocab_size=true_vocab_size if true_vocab_size is not None and true_vocab_size < vocab_size else None,
        **_rope_fields(a))


def _vocab_sizes(data: DataConfig) -> tuple[int, int]:
    """(padded, true) vocabulary sizes of the tokenizer."""
    from megatron.data.tokenizers import TokenizerError  # noqa: PLC0415 (only when a vocab is needed)

    try:
        tokenizer = build_tokenizer(data)
        return tokenizer.padded_vocab_size, tokenizer.vocab_size
    except (TokenizerError, OSError) as e:
        raise ConfigError(str(e)) from e


def _padded_vocab_size(data: DataConfig) -> int:
    return _vocab_sizes(data)[0]


def _int_like(text: str) -> int:
    """An int that may be written as a float ("1000.0"): upstream parses --loss-scale-window as a float."""
    value = float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def _ceil_div(x: int | None, d: int) -> int | None:
    return None if x is None else math.ceil(x / d)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    import torch  # noqa: PLC0415 (keep `--help` fast)

    return torch.cuda.is_available()
