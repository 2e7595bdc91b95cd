"""Tiny models of both families shared by the conversion tests (built in milliseconds)."""

import torch

from megatron.config import ModelConfig
from megatron.model import GPTModel

V, S = 128, 24
FAMILIES = ("gpt3", "llama")


def tiny_config(family: str, **kw) -> ModelConfig:
    # std 0.2 (not 0.02) gives logits of order 1, so a wrong mapping shows up far above 1e-4
    common = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=V, max_position_embeddings=32,
                  hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.2)
    common.update(kw)
    if family == "gpt3":
        return ModelConfig.gpt3(**common)
    return ModelConfig.llama(**{"num_query_groups": 2, "ffn_hidden_size": 96, "rotary_base": 500.0, **common})


def tiny_model(family: str, seed: int = 0, **kw) -> GPTModel:
    """A GPTModel whose norms and biases are random too, so that a swapped weight or bias changes the logits."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config(family, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_tokens(batch: int = 2, seq: int = S, vocab: int = V, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def project_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)  # [b, s, V]


def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits  # [b, s, V]
