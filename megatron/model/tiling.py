"""Sequence tiling: compute token-local work in tiles so its peak memory stops growing with N.

At long sequence lengths two token-local tensors dominate the activation memory of a
rank: the logits `[N/P, vocab]` (in fp32 for the loss, twice over with their gradient)
and the MLP's `[N/P, ffn]` intermediate. Both are computed tile by tile here:

* `tiled_cross_entropy`: output projection + cross-entropy forward *and* backward in
  tiles of tokens, never holding more than `[tile, vocab]` logits; it keeps only the
  log-sum-exp per token between forward and backward.
* `tiled_apply`: the MLP applied per tile under activation checkpointing, so the backward
  recomputes one tile's intermediate at a time.

Both are exact: they change the order of nothing but independent rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the logits matmul runs in: autocast's when it is on (as for the untiled
    loss's F.linear), else the hidden states'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _TiledLinearCrossEntropy(torch.autograd.Function):
    """Forward and backward both compute the logits in `ctx.dtype` with autocast off, so the
    probabilities the backward rebuilds, exp(logits - lse), are exactly the forward's."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tile: int,
                vocab_size: int | None = None):
        # hidden [n, h], weight [V, h], labels [n]; columns >= vocab_size (padding) are -inf
        dtype = _compute_dtype(hidden)
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, n, tile):
                logits = _mask_padding((hidden[i:i + tile].to(dtype) @ w.t()).float(), vocab_size)  # [t, V]
                lse[i:i + tile] = torch.logsumexp(logits, dim=-1)
                target = logits.gather(1, labels[i:i + tile, None]).squeeze(1)
                losses[i:i + tile] = lse[i:i + tile] - target
                del logits, target  # one tile's logits at a time, not two
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tile, ctx.dtype, ctx.vocab_size = tile, dtype, vocab_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        tile, dtype = ctx.tile, ctx.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, hidden.shape[0], tile):
                h = hidden[i:i + tile].to(dtype)
                logits = _mask_padding((h @ w.t()).float(), ctx.vocab_size)  # [t, V], exactly the forward's
                # d loss_i / d logits_i = softmax(logits_i) - onehot(label_i), scaled by the incoming
                # grad; computed in place so a tile costs one [t, V] buffer
                probs = logits.sub_(lse[i:i + tile, None]).exp_()
                probs[torch.arange(h.shape[0], device=h.device), labels[i:i + tile]] -= 1.0
                probs *= grad_losses[i:i + tile, None].float()
                g = probs.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[i:i + tile] = (g @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += g.t() @ h  # promoted to fp32 in place: no fp32 [V, h] temporary
                del logits, probs, g, h  # one tile's buffers at a time
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _mask_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Padding columns (>= the true vocab) to -inf, in place: out of logsumexp, zero probability."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    return logits


def tiled_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        tile_tokens: int, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` against `labels`, `[n]` fp32.

    hidden `[n, h]`, weight `[vocab, h]`, labels `[n]`; peak extra memory `[tile_tokens, vocab]`.
    `vocab_size`: the true vocab of a padded one; columns >= it are -inf before the logsumexp.
    """
    if tile_tokens <= 0:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
    return _TiledLinearCrossEntropy.apply(hidden, weight, labels, tile_tokens, vocab_size)


class TiledLanguageModelLoss(nn.Module):
    """`LanguageModelLoss` computed in tiles of `tile_tokens` tokens (forward and backward)."""

    def __init__(self, tile_tokens: int) -> None:
        super().__init__()
        if tile_tokens <= 0:
            raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
        self.tile_tokens = tile_tokens

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                vocab_size: int | None = None) -> torch.Tensor:
        s, b, h = hidden.shape
        losses = tiled_cross_entropy(hidden.reshape(s * b, h), weight, labels.t().reshape(s * b),
                                     self.tile_tokens, vocab_size)  # [s * b]
        return losses.view(s, b).t()  # [s, b] -> [b, s]

    def extra_repr(self) -> str:
        return f"tile_tokens={self.tile_tokens}"


def tiled_apply(module: nn.Module, x: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """`module(x)` computed on `num_tiles` slices of dim 0 (the sequence), each recomputed in
    backward, so only one tile's intermediate activations are alive at a time."""
    if num_tiles < 1:
        raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
    if num_tiles == 1 or not torch.is_grad_enabled():
        return module(x)
    tiles = x.tensor_split(num_tiles, dim=0)  # [s, b, h] -> num_tiles x [~s/T, b, h]
    return torch.cat([checkpoint(module, t, use_reentrant=False) for t in tiles], dim=0)
