"""Inference with a trained (or imported) model: KV-cache generation with a sequence-parallel
prefill, and long-context evaluation.

    sampling.py      greedy / temperature / top-k / top-p, as transformers' logits warpers
    generation.py    Generator: prefill (one process or Ulysses SP) + incremental decoding
    checkpoint.py    load_model: any training checkpoint (any SP/DP/ZeRO layout) into one plain GPTModel
    long_context.py  LongContextEvaluator: loss by position, passkey retrieval (SP-distributed, forward only)
    reports.py       results as JSON, PNG plots, TensorBoard scalars
    hook.py          the periodic evaluation of a training run (--long-context-eval-interval)
"""

from megatron.inference.generation import GenerationOutput, Generator, KVCache, generate
from megatron.inference.sampling import SamplingConfig, choose_tokens, filter_logits

__all__ = ["GenerationOutput", "Generator", "KVCache", "SamplingConfig", "choose_tokens", "filter_logits",
           "generate"]
