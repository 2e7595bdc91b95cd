"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

The filters are transformers' logits warpers (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`), applied in the order `generate()` applies them, so a seeded sampler sees
the same distribution as transformers would (tests compare the filtered logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.config import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """`temperature` 0 (the default) is greedy decoding; otherwise sample from softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and to the smallest set whose probability
    reaches `top_p` (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Logits `[b, V]` (fp32) after temperature, top-k and top-p; filtered-out tokens are -inf."""
    logits = logits.float()
    if config.temperature not in (0.0, 1.0):
        logits = logits / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        # as transformers: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p,
        # always keeping the most likely one
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - config.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `[b]` from logits `[b, V]`."""
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
