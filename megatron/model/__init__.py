"""GPT model (two families: GPT-3 style and Llama style), attention backends and loss."""

from megatron.model.attention_backends import available_backends, build_local_attention
from megatron.model.gpt_model import GPTModel

__all__ = ["GPTModel", "available_backends", "build_local_attention"]
