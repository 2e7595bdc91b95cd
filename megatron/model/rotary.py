"""Rotary position embeddings (RoPE) driven by explicit position ids.

Under sequence parallelism every rank rotates its shard with the *global* positions
of its tokens (rank r holds `[r*N/P, (r+1)*N/P)`), so the rotation is exactly the one a
single process applies to the full sequence. The half-split ("rotate_half") convention
is the one Hugging Face Llama checkpoints use, so converted weights need no permutation.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)  # no buffer: nothing to shard, move or checkpoint

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape `[s, b, 1, d]` (fp32) for position ids `[b, s]`."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                                      device=position_ids.device) / self.head_dim))
        freqs = position_ids.t().float()[..., None] * inv_freq  # [s, b, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [s, b, 1, d]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[s, b, h, d]` by the angles whose cos/sin are `[s, b, 1, d]`."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
