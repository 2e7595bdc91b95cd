"""Megatron-style GPT pretraining with DeepSpeed-Ulysses sequence parallelism."""

__version__ = "0.1.0"
