"""The language-model head's loss: per-token cross-entropy of `hidden @ W^T` against labels.

A parameter-free module, so `parallelize_gpt` can swap in the tiled version
(megatron.model.tiling.TiledLanguageModelLoss) without touching parameter names.
How per-token losses become the step's loss (masking, the global token mean under SP x DP)
is the training loop's business: megatron.training.loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss `[b, s]` (fp32) from logits `[s, b, V]` and labels `[b, s]`.

    `vocab_size`: the true vocabulary; columns at and beyond it (padding of a padded vocab) are
    left out of the softmax, as if their logits were -inf.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]  # [s, b, V padded] -> [s, b, V]
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.float().reshape(s * b, v), labels.t().reshape(s * b), reduction="none")
    return loss.view(s, b).t()  # [s, b] -> [b, s]


class LanguageModelLoss(nn.Module):
    """hidden `[s, b, h]`, output weight `[V, h]`, labels `[b, s]` -> per-token loss `[b, s]` (fp32).

    `vocab_size` (the true vocab of a padded one): logit columns >= it take no part in the softmax.
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                vocab_size: int | None = None) -> torch.Tensor:
        return token_cross_entropy(F.linear(hidden, weight), labels, vocab_size)  # logits [s, b, V]
