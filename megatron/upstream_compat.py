"""Megatron-DeepSpeed flags that this framework does not implement, each with what happens instead.

The promise to users is that an upstream GPT launch script runs unchanged: every flag of upstream's
`megatron/arguments.py` (inventoried in tests/upstream/upstream_flags.json) is either implemented by
`megatron.arguments.build_parser`, or listed here as

- NO_EFFECT: accepted, and a note printed at start-up says why it changes nothing here (it tunes a
  kernel, a DeepSpeed engine detail, a logging toggle whose value is always logged, or belongs to a model
  family or tool that `pretrain_gpt.py` never builds, as upstream's `pretrain_gpt.py` also ignores it);
- REJECTED: accepted by the parser, then refused with an error that names the flag and the alternative,
  unless its value means what happens here anyway (upstream's default, or a value listed in `same_here`).

It also resolves upstream's names for implemented flags (`resolve_upstream_names`) and words the error for a
flag nobody knows (`unknown_flags_message`, with the closest known flag), so argparse's bare "unrecognized
arguments" is never the answer to an upstream flag. The rule for
choosing: a flag whose upstream effect this framework reproduces, or which has no effect on the trained
model, is NO_EFFECT; a flag that would change the model, the optimizer or the data in a way that is not
implemented is REJECTED, because silently training something else would break the promise.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from megatron.config import ConfigError

IMPLEMENTED = "implemented"
NO_EFFECT = "no effect"
REJECTED = "rejected"
NOT_YET = "not implemented yet"  # parsed with upstream's type and default; a non-default value is refused

# Notes printed for implemented flags whose upstream meaning is kept in substance.
DEEPSPEED_NOTE = ("the DeepSpeed engine is replaced by torch-native DDP/ZeRO/FSDP2 (--zero-stage); its JSON "
                  "is read the way DeepSpeed reads it (batch from the Megatron flags, loss scaling and clipping "
                  "from the JSON)")
FLASH_V1_NOTE = ("upstream runs FlashAttention v1 kernels for this flag; here it selects the flash-attn backend "
                 "(FlashAttention 2): the same exact attention, faster")
FLASH_BUILDER_NOTE = ("upstream builds DeepSpeed's FlashAttention op for non-CUDA accelerators; here it selects the "
                      "flash-attn backend: the same exact attention")
FPDT_NOTE = ("DeepSpeed's FPDT cuts the sequence into chunks of --ds-sequence-parallel-fpdt-chunk-size tokens "
             "inside Ulysses attention and the MLP/loss, for memory, with the same maths; here that is head-chunk "
             "overlap (--ulysses-overlap-chunks), tiled MLP (--tiled-mlp-tiles) and tiled logits + loss "
             "(--tiled-loss-tokens) with the same number of chunks (explicit values of those flags win)")
SEQUENCE_PARALLEL_NOTE = (
    "Megatron's tensor-parallel sequence parallelism needs --tensor-model-parallel-size > 1, and upstream also "
    "switches it off at tensor parallel 1; Ulysses sequence parallelism is --ds-sequence-parallel-size N")
_NO_TP_PP = ("values other than 1 are refused: tensor and pipeline parallelism are not implemented; this framework "
             "parallelises with Ulysses sequence parallelism (--ds-sequence-parallel-size) x ZeRO data "
             "parallelism (--zero-stage)")

# Upstream flags that megatron/arguments.py implements, but whose upstream meaning holds only in part or with a
# note: their status in docs/flags.md. Every other implemented upstream flag means what it means upstream.
PARTIAL = {
    "--tensor-model-parallel-size": (REJECTED, _NO_TP_PP),
    "--pipeline-model-parallel-size": (REJECTED, _NO_TP_PP),
    "--rampup-batch-size": (REJECTED, "batch-size ramp-up is not implemented; use a constant --global-batch-size"),
    "--sequence-parallel": (NO_EFFECT, SEQUENCE_PARALLEL_NOTE),
    "--attention-softmax-in-fp32": (NO_EFFECT, "softmax always runs in fp32 here"),
    "--rotary-percent": (IMPLEMENTED, "GPT-NeoX style partial rotary: the first int(head dim x percent) dims rotate "
                         "(upstream's rotary_dim)"),
    "--no-bias-gelu-fusion": (IMPLEMENTED, "upstream's default GPT MLP (with biases) runs a fused bias-GeLU kernel "
                              "that computes the tanh approximation of GeLU; the default here computes the same "
                              "tanh GeLU, and this flag selects the exact (erf) GeLU, as upstream"),
    "--openai-gelu": (IMPLEMENTED, "the tanh approximation of GeLU (OpenAI GPT-2's gelu_new)"),
    "--ds-sequence-parallel-fpdt": (IMPLEMENTED, FPDT_NOTE),
    "--ds-sequence-parallel-fpdt-chunk-size": (IMPLEMENTED, "the chunk length the mapped tiling uses (see "
                                               "--ds-sequence-parallel-fpdt)"),
    "--ds-sequence-parallel-fpdt-offloading": (IMPLEMENTED, "FPDT's host offloading: mapped onto "
                                               "--offload-activations"),
    "--use-flash-attn": (IMPLEMENTED, FLASH_V1_NOTE),
    "--use-flash-attn-v1": (IMPLEMENTED, FLASH_V1_NOTE),
    "--use-flash-attn-builder": (IMPLEMENTED, FLASH_BUILDER_NOTE),
    "--use-flash-attn-triton": (IMPLEMENTED, "this framework's Triton FlashAttention kernel"),
    "--deepspeed": (IMPLEMENTED, DEEPSPEED_NOTE),
    "--deepscale": (IMPLEMENTED, "DeepSpeed's old name for --deepspeed"),
    "--deepscale_config": (IMPLEMENTED, "DeepSpeed's old name for --deepspeed_config"),
    "--deepspeed_config": (IMPLEMENTED, "read as DeepSpeed reads it under --deepspeed (docs/flags.md, 'DeepSpeed "
                           "JSON'); without --deepspeed its values must agree with the flags"),
    "--loss-scale": (IMPLEMENTED, "under --deepspeed ignored, as upstream: the JSON's fp16 section decides"),
    "--initial-loss-scale": (IMPLEMENTED, "under --deepspeed ignored, as upstream: the JSON's fp16 section decides"),
    "--min-loss-scale": (IMPLEMENTED, "under --deepspeed ignored, as upstream: the JSON's fp16 section decides"),
    "--loss-scale-window": (IMPLEMENTED, "under --deepspeed ignored, as upstream: the JSON's fp16 section decides"),
    "--hysteresis": (IMPLEMENTED, "under --deepspeed ignored, as upstream: the JSON's fp16 section decides"),
    "--clip-grad": (IMPLEMENTED, "under --deepspeed ignored, as upstream: the JSON's gradient_clipping decides "
                    "(absent: no clipping)"),
    "--optimizer": (IMPLEMENTED, "adam (AdamW, as upstream); sgd is refused"),
    "--distributed-backend": (IMPLEMENTED, "nccl or gloo; ccl and hccl (Intel, Habana) are refused"),
    "--tokenizer-type": (IMPLEMENTED, "HFTokenizer = HuggingFaceTokenizer (a local tokenizer.json); the BERT "
                         "WordPiece tokenizers are refused"),
    "--encoder-num-layers": (IMPLEMENTED, "alias of --num-layers"),
    "--encoder-seq-length": (IMPLEMENTED, "alias of --seq-length"),
    "--rotary-position-embeddings-theta": (IMPLEMENTED, "alias of --rotary-base"),
    "--checkpoint-in-cpu": (IMPLEMENTED, "= --offload-activations (GPU runs)"),
}


@dataclass(frozen=True)
class CompatFlag:
    flags: tuple  # option strings, the first is the name used in messages
    status: str  # NO_EFFECT or REJECTED
    why: str  # the note or the error: why, and what to use instead
    nargs: int | str | None = 0  # 0: a switch; None: one value; "*" / "+": a list (as upstream parses it)
    type: Callable = str
    default: object = None  # upstream's default (a REJECTED flag given this value means the same here)
    same_here: tuple = ()  # further values that mean what happens here anyway

    @property
    def name(self) -> str:
        return self.flags[0]

    @property
    def dest(self) -> str:
        return "compat_" + self.name.lstrip("-").replace("-", "_")

    def given(self, value) -> bool:
        return value not in (None, False)

    def refused(self, value) -> bool:
        if self.status != REJECTED or not self.given(value):
            return False
        return self.nargs == 0 or (value != self.default and value not in self.same_here)


def _switches(status: str, why: str, *flags: str) -> list:
    return [CompatFlag((f,), status, why) for f in flags]


def _values(status: str, why: str, *flags: str, nargs=None, type=str, default=None) -> list:
    return [CompatFlag((f,), status, why, nargs=nargs, type=type, default=default) for f in flags]


# Reasons shared by families of flags.
_KERNEL = "selects a fused CUDA kernel or buffer layout upstream; the math is the same here"
_PIPELINE = ("only acts with pipeline parallelism, which is not implemented here "
             "(--pipeline-model-parallel-size must be 1)")
_TENSOR = "only acts with tensor parallelism, which is not implemented here (--tensor-model-parallel-size must be 1)"
_MOE = "only acts with --num-experts > 1 (Mixture of Experts), which is not implemented here"
_FP8 = "only acts with --fp8-e4m3/--fp8-hybrid (Transformer Engine FP8), which is not implemented here"
_KD = "only acts with --kd/--mos (knowledge distillation), which is not implemented here"
_RETRO = "only acts with --retro-add-retriever (Retro), which is not implemented here"
_VISION = "belongs to upstream's vision models (pretrain_vit.py); pretrain_gpt.py ignores it upstream too"
_BIENCODER = "belongs to upstream's ICT/REALM biencoder tools; pretrain_gpt.py ignores it upstream too"
_BERT_T5 = "belongs to upstream's BERT/T5 models or datasets; pretrain_gpt.py ignores it upstream too"
_INFERENCE = "belongs to upstream's text-generation server; it does not change training"
_UNREAD = "is not read by upstream's training code at this commit (a leftover flag)"
_DS_JSON = ("DeepSpeed reads ZeRO settings from the --deepspeed_config JSON, not from this flag; ZeRO here is "
            "--zero-stage (torch FSDP2)")
_LOGGED = "always logged here (console, TensorBoard, --log-json)"

FLAGS: list[CompatFlag] = [
    # ------------------------------------------------------------------ DeepSpeed engine and pipeline details
    *_switches(NO_EFFECT, "pipeline parallelism is not implemented; every run is non-pipelined", "--no-pipeline-parallel"),
    *_switches(NO_EFFECT, "activation checkpointing is done by torch.utils.checkpoint "
               "(--checkpoint-activations / --recompute-granularity)", "--deepspeed-activation-checkpointing"),
    *_switches(NO_EFFECT, "DeepSpeed activation partitioning spreads checkpoints over tensor-parallel ranks, "
               "which do not exist here", "--partition-activations"),
    *_switches(NO_EFFECT, "DeepSpeed's contiguous checkpoint buffers are a memory-layout detail",
               "--contigious-checkpointing"),
    *_switches(NO_EFFECT, "DeepSpeed checkpointing synchronisation is not needed", "--synchronize-each-layer"),
    *_switches(NO_EFFECT, "DeepSpeed backward profiling is not implemented; use the torch profiler",
               "--profile-backward"),
    *_switches(NO_EFFECT, _TENSOR, "--no-async-tensor-model-parallel-allreduce", "--enable-expert-tensor-parallelism",
               "--distribute-checkpointed-activations"),
    *_switches(NO_EFFECT, _KERNEL, "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
               "--no-bias-dropout-fusion", "--no-persist-layer-norm",
               "--disable-mem-efficient-ln", "--ds_fused_adam", "--no-contiguous-buffers-in-local-ddp"),
    *_switches(NO_EFFECT, "query-key layer scaling only guards fp16 softmax overflow; softmax runs in fp32 here",
               "--no-query-key-layer-scaling", "--apply-query-key-layer-scaling"),
    *_switches(NO_EFFECT, "the learning-rate schedule always comes from the flags (an unchanged schedule resumes "
               "where the checkpoint's iteration left it)", "--override-opt_param-scheduler",
               "--use-checkpoint-opt_param-scheduler"),
    *_switches(NO_EFFECT, "gradients are always accumulated and reduced in fp32",
               "--accumulate-allreduce-grads-in-fp32"),
    *_switches(NO_EFFECT, "the cross-entropy always runs in fp32 here (at least as accurate)",
               "--fp16-lm-cross-entropy"),
    *_switches(NO_EFFECT, "there is one model implementation", "--use-mcore-models"),
    *_switches(NO_EFFECT, _PIPELINE, "--overlap-p2p-communication", "--no-scatter-gather-tensors-in-pipeline",
               "--use-ring-exchange-p2p", "--standalone-embedding-stage"),
    *_values(NO_EFFECT, _PIPELINE, "--pipeline-model-parallel-split-rank"),
    *_values(NO_EFFECT, "gradient reduction is torch DDP or FSDP2, chosen by --zero-stage", "--DDP-impl"),
    *_switches(NO_EFFECT, "optimizer-state sharding is --zero-stage 1/2/3 here (the math is the same)",
               "--use-distributed-optimizer"),
    *_switches(NO_EFFECT, _DS_JSON, "--zero-reduce-scatter", "--zero-contigious-gradients"),
    *_values(NO_EFFECT, _DS_JSON, "--zero-reduce-bucket-size", "--zero-allgather-bucket-size"),
    *_switches(NO_EFFECT, "only acts with --remote-device cpu/nvme (parameter offload), which is not implemented",
               "--use-pin-memory"),
    *_switches(NO_EFFECT, "large models are built on the meta device and materialized after sharding",
               "--use-cpu-initialization"),
    *_values(NO_EFFECT, "the process group is created by megatron.initialize from torchrun's environment",
             "--lazy-mpu-init"),
    *_values(NO_EFFECT, "PyTorch's caching allocator is left alone", "--empty-unused-memory-level"),
    *_switches(NO_EFFECT, "only acts with --cpu-optimizer, which is not implemented", "--cpu_torch_adam"),
    *_values(NO_EFFECT, "only acts with --optimizer sgd, which is not implemented", "--sgd-momentum"),
    *_switches(NO_EFFECT, "with --ds-sequence-parallel-size 1 the Ulysses all-to-alls are the identity; "
               "the math is the same", "--force-ds-sequence-parallel"),
    *_switches(NO_EFFECT, "DeepSpeed's inference engine is not used in training", "--ds-inference"),
    # ------------------------------------------------------------------ recompute and memory
    *_switches(NO_EFFECT, _UNREAD, "--scattered-embeddings", "--memory-centric-tiled-linear"),
    *_values(NO_EFFECT, _UNREAD, "--tile-factor"),
    *_switches(NO_EFFECT, "splitting transformer layers for DeepSpeed checkpointing is a memory detail",
               "--split-transformers"),
    # ------------------------------------------------------------------ data loading
    *_values(NO_EFFECT, "only the mmap .bin/.idx format exists", "--data-impl"),
    *_values(NO_EFFECT, "batches are assembled in the training process", "--num-workers"),
    *_switches(NO_EFFECT, "index files are memory-mapped lazily; nothing to warm up", "--mmap-warmup"),
    *_switches(NO_EFFECT, "the dataset already spans as many epochs as training needs", "--repeated-dataloader"),
    *_switches(NO_EFFECT, "sample indices are not part of a GPT batch here; they do not change training",
               "--return-data-index"),
    *_switches(NO_EFFECT, "the HFTokenizer reads a local tokenizer.json; no remote code is run",
               "--trust-remote-code"),
    # ------------------------------------------------------------------ logging and profiling
    *_values(NO_EFFECT, "the TensorBoard writer uses its default queue", "--tensorboard-queue-size"),
    *_switches(NO_EFFECT, "the global batch size is " + _LOGGED, "--log-batch-size-to-tensorboard"),
    *_switches(NO_EFFECT, "validation perplexity is " + _LOGGED, "--log-validation-ppl-to-tensorboard"),
    *_switches(NO_EFFECT, "the learning rate is " + _LOGGED, "--no-log-learnig-rate-to-tensorboard"),
    *_switches(NO_EFFECT, "the loss scale is " + _LOGGED, "--no-log-loss-scale-to-tensorboard"),
    *_switches(NO_EFFECT, "peak memory is " + _LOGGED, "--log-memory-to-tensorboard"),
    *_switches(NO_EFFECT, "the world size is printed at start-up and in the dry-run plan",
               "--log-world-size-to-tensorboard"),
    *_switches(NO_EFFECT, "optimizer-state statistics are not logged", "--log-optimizer-states-to-tensorboard"),
    *_switches(NO_EFFECT, "the parameter norm is not logged", "--log-params-norm"),
    *_switches(NO_EFFECT, "zeros in the gradient are not counted", "--log-num-zeros-in-grad"),
    *_switches(NO_EFFECT, "timers do not add barriers here", "--no-barrier-with-level-1-timing"),
    *_values(NO_EFFECT, "timers report rank 0's times", "--timing-log-option"),
    *_values(NO_EFFECT, "upstream's built-in profiler is not implemented; wrap the run in torch.profiler or "
             "nsys instead", "--profile", "--profile_steps"),
    *_values(NO_EFFECT, "upstream's built-in profiler is not implemented", "--profile-ranks", nargs="+"),
    # ------------------------------------------------------------------ ranks and checkpoints
    *_values(NO_EFFECT, "ranks come from torchrun's environment (RANK, LOCAL_RANK)", "--local_rank", "--local-rank"),
    *_switches(NO_EFFECT, "weights are initialized, then overwritten by --load; skipping the initialization "
               "would only save start-up time", "--no-initialization"),
    *_switches(NO_EFFECT, "checkpoints here load under any SP/DP layout (torch.distributed.checkpoint "
               "reshards); a DeepSpeed universal checkpoint directory itself cannot be read",
               "--universal-checkpoint"),
    *_values(NO_EFFECT, "only acts with --adlr-autoresume, which is not implemented", "--adlr-autoresume-interval"),
    # ------------------------------------------------------------------ model families pretrain_gpt.py never builds
    *_switches(NO_EFFECT, _BERT_T5, "--bert-no-binary-head", "--output-bert-embeddings"),
    *_values(NO_EFFECT, _BERT_T5, "--bert-embedder-type", "--decoder-num-layers", "--decoder-seq-length",
             "--retriever-seq-length", "--sample-rate", "--mask-prob", "--short-seq-prob"),
    *_values(NO_EFFECT, "ONNX export is not part of training; as upstream, a value selects the exact (erf) GeLU "
             "instead of the fused tanh kernel", "--onnx-safe"),
    *_values(NO_EFFECT, _INFERENCE, "--inference-batch-times-seqlen-threshold", "--max-tokens-to-oom"),
    *_switches(NO_EFFECT, _BIENCODER, "--biencoder-shared-query-context-model", "--use-one-sent-docs",
               "--retriever-score-scaling"),
    *_values(NO_EFFECT, _BIENCODER, "--ict-head-size", "--biencoder-projection-dim", "--ict-load", "--bert-load",
             "--titles-data-path", "--query-in-block-prob", "--evidence-data-path", "--block-data-path",
             "--embedding-path", "--indexer-batch-size", "--indexer-log-interval"),
    *_values(NO_EFFECT, _BIENCODER, "--retriever-report-topk-accuracies", nargs="+"),
    *_switches(NO_EFFECT, _VISION, "--no-data-sharding", "--vision-pretraining", "--dino-norm-last-layer"),
    *_values(NO_EFFECT, _VISION, "--num-classes", "--img-h", "--img-w", "--num-channels", "--patch-dim",
             "--classes-fraction", "--data-per-class-fraction", "--head-lr-mult", "--vision-pretraining-type",
             "--vision-backbone-type", "--swin-backbone-type", "--mask-type", "--mask-factor", "--iter-per-epoch",
             "--dino-local-img-size", "--dino-local-crops-number", "--dino-head-hidden-size",
             "--dino-bottleneck-size", "--dino-freeze-last-layer", "--dino-warmup-teacher-temp",
             "--dino-teacher-temp", "--dino-warmup-teacher-temp-epochs"),
    *_switches(NO_EFFECT, _RETRO, "--retro-return-doc-ids"),
    *_values(NO_EFFECT, _RETRO, "--retro-workdir", "--retro-cyclic-train-iters", "--retro-encoder-layers",
             "--retro-encoder-hidden-dropout", "--retro-encoder-attention-dropout", "--retro-num-neighbors",
             "--retro-num-retrieved-chunks"),
    *_switches(NO_EFFECT, _MOE, "--disable-moe-token-dropping", "--create-moe-param-group",
               "--disable-moe-top2-2nd-expert-sampling", "--use-tutel"),
    *_values(NO_EFFECT, _MOE, "--mlp-type", "--topk", "--expert-interval", "--moe-train-capacity-factor",
             "--moe-eval-capacity-factor", "--moe-min-capacity", "--moe-loss-coeff", "--moe-expert-parallel-size"),
    *_switches(NO_EFFECT, _FP8, "--no-fp8-wgrad"),
    *_values(NO_EFFECT, _FP8, "--fp8-margin", "--fp8-interval", "--fp8-amax-history-len", "--fp8-amax-compute-algo"),
    *_values(NO_EFFECT, _KD, "--num-layers-teacher", "--hidden-size-teacher", "--num-attention-heads-teacher",
             "--kd-alpha-ce", "--kd-beta-ce", "--kd-temp", "--load-teacher"),
    *_values(NO_EFFECT, _KD, "--num-experts-teacher", nargs="+"),

    # ================================================================== REJECTED: would train something else
    *_values(REJECTED, "Mixture-of-Experts layers are not implemented; train a dense model (drop the flag or "
             "pass 1)", "--num-experts", nargs="+", type=int, default=[1]),
    *_values(REJECTED, "Switch-Transformer experts are not implemented; drop the flag", "--num-experts-switch",
             type=int),
    *_switches(REJECTED, "FP8 training through Transformer Engine is not implemented; use --bf16",
               "--fp8-e4m3", "--fp8-hybrid"),
    CompatFlag(("--transformer-impl",), REJECTED, "Transformer Engine layers are not implemented; drop the flag "
               "(the built-in implementation is upstream's 'local')", nargs=None, default="local"),
    *_switches(REJECTED, "knowledge distillation is not implemented; train without a teacher", "--kd", "--mos"),
    *_switches(REJECTED, "Retro (retrieval-augmented) layers are not implemented; drop the flag",
               "--retro-add-retriever"),
    *_switches(REJECTED, "zero-centered LayerNorm weights (LayerNorm-1p) are not implemented; drop the flag",
               "--apply-layernorm-1p"),
    *_switches(REJECTED, "post-LayerNorm residual ordering (original BERT) is not implemented; the model is "
               "pre-LayerNorm like upstream's GPT default; drop the flag",
               "--apply-residual-connection-post-layernorm"),
    *_switches(REJECTED, "squared-ReLU MLPs are not implemented; use the default GeLU or --swiglu",
               "--squared-relu"),
    *_switches(REJECTED, "fp32 embedding weights under bf16/fp16 are not implemented; drop the flag",
               "--embedding-weights-in-fp32"),
    *_switches(REJECTED, "Xavier-uniform initialization is not implemented; drop the flag (normal init with "
               "--init-method-std)", "--init-method-xavier-uniform"),
    *_switches(REJECTED, "different initial weights per data-parallel rank are not implemented; drop the flag",
               "--data-parallel-random-init"),
    *_values(REJECTED, "a weight-decay schedule is not implemented; use a constant --weight-decay",
             "--start-weight-decay", "--end-weight-decay", type=float),
    CompatFlag(("--weight-decay-incr-style",), REJECTED, "a weight-decay schedule is not implemented; use a "
               "constant --weight-decay", nargs=None, default="constant"),
    *_switches(REJECTED, "random layer-token drop (random-LTD) is not implemented; drop the flag", "--random-ltd"),
    *_switches(REJECTED, "DeepSpeed curriculum learning is not implemented; drop the flag",
               "--data-efficiency-curriculum-learning"),
    CompatFlag(("--dataloader-type",), REJECTED, "only upstream's default 'single' sampler (consecutive samples of the "
               "dataset's shuffled order, resumable) is implemented; drop the flag or pass 'single'", nargs=None, same_here=("single",)),
    *_values(REJECTED, "separate train/valid/test datasets are not implemented; pass one --data-path and --split",
             "--train-data-path", "--valid-data-path", "--test-data-path", nargs="*"),
    *_values(REJECTED, "index files are built and cached from --data-path (see --data-cache-path); precomputed "
             "index paths are not read", "--train-idx-path", "--train-desc-path", "--train-doc-idx-path",
             "--train-sample-idx-path", "--train-shuffle-idx-path"),
    *_values(REJECTED, "forcing an exact number of epochs is not implemented; size the run with --train-iters/"
             "--train-samples/--train-tokens", "--train-data-exact-num-epochs", type=int),
    *_values(REJECTED, "data paths are not rewritten; write the full paths in --data-path",
             "--aml-data-download-path"),
    *_values(REJECTED, "building datasets without a model (upstream's data-analysis mode) is not part of "
             "pretrain_gpt.py; drop the flag", "--use-dataset-only", type=bool, default=False),
    *_switches(REJECTED, "the CPU optimizer (ZeRO-Offload) is not implemented; use --zero-stage 3 to shard "
               "optimizer state across ranks", "--cpu-optimizer"),
    CompatFlag(("--remote-device",), REJECTED, "parameter offload to CPU/NVMe is not implemented; use --zero-stage 3 "
               "to shard parameters across ranks", nargs=None, default="none"),
    *_switches(REJECTED, "an inference-only mode is not part of pretrain_gpt.py; drop the flag",
               "--inference"),
    *_switches(REJECTED, "evaluation-only runs are not implemented; drop the flag", "--skip-train"),
    *_switches(REJECTED, "the zero-bubble pipeline schedule needs pipeline parallelism, which is not implemented; "
               "use --ds-sequence-parallel-size and --zero-stage", "--enable-zbh1-pipeline",
               "--enable-zbh1-exact-semantics"),
    *_values(REJECTED, "interleaved pipeline stages need pipeline parallelism, which is not implemented; use "
             "--ds-sequence-parallel-size and --zero-stage", "--num-layers-per-virtual-pipeline-stage", type=int),
    *_switches(REJECTED, "distributing recomputed activations needs tensor parallelism, which is not implemented; "
               "drop the flag", "--distribute-saved-activations"),
    *_values(REJECTED, "upstream removed this flag (it fails there too); use --tensor-model-parallel-size",
             "--model-parallel-size", type=int),
    *_values(REJECTED, "upstream removed this flag (it fails there too); use --micro-batch-size", "--batch-size",
             type=int),
    *_values(REJECTED, "upstream removed this flag (it fails there too); use --lr-warmup-fraction or "
             "--lr-warmup-iters", "--warmup", type=int),
    *_values(REJECTED, "loading a named checkpoint tag is not implemented; --load reads the newest iteration "
             "(edit latest_checkpointed_iteration.txt in the --load directory to pick another)", "--load-tag"),
    *_switches(REJECTED, "restarting the learning-rate schedule on load is not implemented (the schedule continues "
               "from the checkpoint's iteration); use --finetune to start iteration, optimizer and schedule "
               "afresh", "--no-load-lr-state"),
    *_switches(REJECTED, "resetting the iteration count alone is not implemented; use --finetune (weights only, "
               "everything else starts afresh)", "--reset-iteration"),
    *_switches(REJECTED, "model flags are not read from the checkpoint; pass them on the command line",
               "--use-checkpoint-args"),
    *_values(REJECTED, "a kill-switch file is not watched; send SIGTERM with --exit-signal-handler, or use "
             "--exit-duration-in-mins / --exit-interval", "--kill-switch-file"),
    *_switches(REJECTED, "ADLR autoresume is not implemented; use --exit-signal-handler or --exit-duration-in-mins "
               "and resubmit with the same --save/--load", "--adlr-autoresume"),
]

BY_FLAG = {f: c for c in FLAGS for f in c.flags}


def classify(flag: str) -> tuple:
    """(status, why) of an upstream flag that the parser accepts; why is "" for a plain implementation."""
    if flag in BY_FLAG:
        return BY_FLAG[flag].status, BY_FLAG[flag].why
    return PARTIAL.get(flag, (IMPLEMENTED, ""))


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    """Register every flag of FLAGS (not given -> None, so that giving it can be noticed)."""
    groups = {NO_EFFECT: parser.add_argument_group("Megatron-DeepSpeed flags accepted without effect (a note "
                                                   "says why)"),
              REJECTED: parser.add_argument_group("Megatron-DeepSpeed flags refused (the error names the "
                                                  "alternative)")}
    for c in FLAGS:
        kw = dict(dest=c.dest, help=c.why, default=None)
        if c.nargs == 0:
            groups[c.status].add_argument(*c.flags, action="store_true", **kw)
        else:
            groups[c.status].add_argument(*c.flags, nargs=c.nargs, type=c.type, metavar=_metavar(c), **kw)


def _metavar(c: CompatFlag) -> str:
    return {int: "INT", float: "FLOAT"}.get(c.type, "VALUE")


def review(args: argparse.Namespace) -> list:
    """Notes for the flags of FLAGS that were given; a ConfigError listing every refused one."""
    notes, refused = [], []
    for c in FLAGS:
        value = getattr(args, c.dest, None)
        if c.refused(value):
            shown = " ".join(map(str, value)) if isinstance(value, list) else "" if value is True else value
            refused.append(f"{c.name} {shown}".rstrip() + f": {c.why}")
        elif c.given(value) and c.status == NO_EFFECT:
            notes.append(f"{c.name}: accepted, no effect ({c.why})")
    if refused:
        head = "this Megatron-DeepSpeed flag is not supported" if len(refused) == 1 else \
            "these Megatron-DeepSpeed flags are not supported"
        raise ConfigError(f"{head}:\n  " + "\n  ".join(refused))
    return notes


# ------------------------------------------------------------------ upstream names of implemented flags

# Flags parsed with upstream's type and default so that scripts run; features other parts of the code will
# implement. A non-default value is refused until then (rather than silently training something else).
NOT_YET_DEFAULTS: dict = {}


def map_fpdt(a: argparse.Namespace) -> list:
    """--ds-sequence-parallel-fpdt(-chunk-size, -offloading) onto this framework's memory tiling; the note
    says exactly what was set. Needs the model and SP flags resolved."""
    if not a.ds_sequence_parallel_fpdt:
        if a.ds_sequence_parallel_fpdt_offloading:
            raise ConfigError("--ds-sequence-parallel-fpdt-offloading needs --ds-sequence-parallel-fpdt")
        return []
    chunk, sp = a.ds_sequence_parallel_fpdt_chunk_size, a.ds_sequence_parallel_size
    if chunk < 1:
        raise ConfigError(f"--ds-sequence-parallel-fpdt-chunk-size must be >= 1, got {chunk}")
    chunks = max(1, -(-a.seq_length // chunk))  # FPDT's number of sequence chunks
    set_ = []
    if a.tiled_mlp_tiles == 1 and chunks > 1:
        a.tiled_mlp_tiles = chunks
        set_.append(f"--tiled-mlp-tiles {chunks}")
    if a.tiled_loss_tokens == 0:
        a.tiled_loss_tokens = max(1, min(chunk, a.seq_length) // sp)  # a chunk's tokens on one rank
        set_.append(f"--tiled-loss-tokens {a.tiled_loss_tokens}")
    heads, kv = a.num_attention_heads, a.num_query_groups or a.num_attention_heads
    if a.ulysses_overlap_chunks == 1 and a.ring_attention_size == 1 and sp > 1 and heads % sp == 0 and kv % sp == 0:
        per_rank = math.gcd(heads // sp, kv // sp)
        overlap = max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= chunks)
        if overlap > 1:
            a.ulysses_overlap_chunks = overlap
            set_.append(f"--ulysses-overlap-chunks {overlap}")
    if a.ds_sequence_parallel_fpdt_offloading and not a.offload_activations:
        a.offload_activations = True
        set_.append("--offload-activations")
    return [f"--ds-sequence-parallel-fpdt (chunks of {chunk} tokens, {chunks} per sequence): mapped onto "
            f"{', '.join(set_) or 'the tiling already requested'} ({FPDT_NOTE})"]


def resolve_upstream_names(a: argparse.Namespace) -> list:
    """Resolve Megatron-DeepSpeed's names and switches that map onto implemented flags; notes for the user."""
    notes = []
    for alias, flag in (("encoder_num_layers", "num_layers"), ("encoder_seq_length", "seq_length")):
        value, given = getattr(a, alias), getattr(a, flag)
        if value is not None and given is not None and value != given:
            raise ConfigError(f"--{alias.replace('_', '-')} ({value}) and --{flag.replace('_', '-')} ({given}) "
                              f"name the same thing and disagree; pass one of them")
        if given is None:
            setattr(a, flag, value)
    for dest, default in NOT_YET_DEFAULTS.items():
        if getattr(a, dest) != default:
            flag = "--" + dest.replace("_", "-")
            shown = flag if isinstance(default, bool) else f"{flag} {getattr(a, dest)}"
            raise ConfigError(f"{shown}: not implemented yet ({PARTIAL[flag][1]}); drop the flag "
                              f"to train without it")
    if a.use_flash_attn_v1:
        notes.append(f"--use-flash-attn-v1 / --use-flash-attn: accepted ({FLASH_V1_NOTE})")
    if a.use_flash_attn_builder:
        notes.append(f"--use-flash-attn-builder: accepted ({FLASH_BUILDER_NOTE})")
    if a.sequence_parallel and a.tensor_model_parallel_size == 1:
        notes.append(f"--sequence-parallel: accepted, no effect ({SEQUENCE_PARALLEL_NOTE})")
        a.sequence_parallel = False
    if a.optimizer == "sgd":
        raise ConfigError("--optimizer sgd is not implemented; use --optimizer adam (AdamW, as upstream's adam)")
    if a.distributed_backend in ("ccl", "hccl"):
        raise ConfigError(f"--distributed-backend {a.distributed_backend} (Intel/Habana accelerators) is not "
                          f"supported; use nccl on NVIDIA GPUs or gloo on CPU, or drop the flag (chosen from the "
                          f"machine)")
    return notes


def unknown_flags_message(parser: argparse.ArgumentParser, unknown: list) -> str:
    """Name each unknown argument and the closest flag that exists (argparse would only print usage)."""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    parts, after_unknown_flag = [], False
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-") or flag[1:2].isdigit():
            if not after_unknown_flag:  # otherwise: the unknown flag's own value
                parts.append(f"unexpected value {arg!r} (the flag before it takes no value, or a flag is missing)")
            continue
        after_unknown_flag = True
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        parts.append(f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else ""))
    return ("; ".join(parts) + ". docs/flags.md lists every flag (all of Megatron-DeepSpeed's are accepted: "
            "implemented, ignored with a note, or refused with the alternative)")
