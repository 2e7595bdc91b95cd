"""GPT language model over a sequence shard.

`GPTModel(config, parallel_state)` takes this rank's tokens `[b, s/p]` and their
global position ids, and returns per-token losses (or logits) for the same shard.
With `parallel_state=None` (or SP size 1) it is an ordinary single-process GPT, the
reference every sequence-parallel test compares against.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.config import ModelConfig
from megatron.core import comm
from megatron.core.sequence_parallel import check_same_local_shape
from megatron.core.sequence_parallel.hybrid import sequence_shard_indices
from megatron.model.rotary import RotaryEmbedding
from megatron.model.tiling import tiled_cross_entropy
from megatron.model.transformer import TransformerLayer, build_norm, init_layer_


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_embedding_type == "learned_absolute" else None)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)  # [b, s/p, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return x.transpose(0, 1)  # [b, s/p, h] -> [s/p, b, h]


class GPTModel(nn.Module):
    """Decoder-only transformer; the layout inside is `[s/p, b, h]` as in Megatron."""

    def __init__(self, config: ModelConfig, parallel_state=None) -> None:
        super().__init__()
        self.config = config
        self.parallel_state = parallel_state
        self.sp_size = parallel_state.sp_size if parallel_state is not None else 1
        self.sp_rank = parallel_state.sp_rank if parallel_state is not None else 0
        sp_group = parallel_state.sp_group if self.sp_size > 1 else None
        self._sp_group = sp_group
        self.embedding = Embedding(config)
        self.rotary = (RotaryEmbedding(config.kv_channels, config.rotary_base)
                       if config.position_embedding_type == "rope" else None)
        self.layers = nn.ModuleList(TransformerLayer(config, parallel_state if self.sp_size > 1 else None)
                                    for _ in range(config.num_layers))
        self.final_norm = build_norm(config)
        self.output_layer = (nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                             if config.untie_embeddings_and_output_weights else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter from the current torch RNG, in a fixed order.

        Ranks seeded identically build identical replicas, which is what makes the
        sequence-parallel model comparable with the single-process one.
        """
        std = self.config.init_method_std
        nn.init.normal_(self.embedding.word_embeddings.weight, mean=0.0, std=std)
        if self.embedding.position_embeddings is not None:
            nn.init.normal_(self.embedding.position_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers:
            init_layer_(layer, self.config)
        self.final_norm.reset_parameters()
        if self.output_layer is not None:
            nn.init.normal_(self.output_layer.weight, mean=0.0, std=std)

    def _layers(self, x, rope, segment_ids):
        full_recompute = self.config.recompute_granularity == "full" and self.training
        for layer in self.layers:
            if full_recompute:
                x = checkpoint(layer, x, rope, segment_ids, use_reentrant=False)
            else:
                x = layer(x, rope, segment_ids)
        return x

    def _activation_offload(self, x: torch.Tensor):
        """Keep saved activations (with full recompute: just the layer inputs) in host memory.

        Only meaningful on an accelerator; on CPU the tensors are already in host memory and
        this is a no-op (the training log says so).
        """
        if self.config.offload_activations and x.is_cuda and self.training:
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.embedding.word_embeddings.weight

    def default_position_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global positions of this rank's shard: with plain Ulysses rank r holds
        `[r*s/p, (r+1)*s/p)`; with a ring the zigzag chunks of `sequence_shard_indices`."""
        b, sl = tokens.shape
        if getattr(self.parallel_state, "ring_size", 1) > 1:
            idx = sequence_shard_indices(sl * self.sp_size, self.parallel_state, device=tokens.device)
            return idx.unsqueeze(0).expand(b, sl)
        start = self.sp_rank * sl
        return torch.arange(start, start + sl, device=tokens.device).unsqueeze(0).expand(b, sl)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None):
        """tokens, position_ids, labels, segment_ids: `[b, s/p]` for this rank's shard.

        Returns per-token cross-entropy `[b, s/p]` (fp32) when `labels` is given, else logits
        `[b, s/p, vocab]`. `segment_ids` turns on document-causal attention.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, local_seq], got shape {tuple(tokens.shape)}")
        if position_ids is None:
            position_ids = self.default_position_ids(tokens)
        if self._sp_group is not None:
            check_same_local_shape(tokens.shape[1], self._sp_group)
            if segment_ids is not None:  # attention sees the full sequence: gather the ids
                segment_ids = comm.all_gather_along(segment_ids.contiguous(), 1, self._sp_group)  # [b, s]
        x = self.embedding(tokens, position_ids)  # [s/p, b, h]
        if self.training and self.config.hidden_dropout > 0:
            x = F.dropout(x, p=self.config.hidden_dropout)
        rope = self.rotary(position_ids) if self.rotary is not None else None
        with self._activation_offload(x):
            x = self._layers(x, rope, segment_ids)
        x = self.final_norm(x)
        if labels is not None and self.config.loss_tile_tokens > 0:
            s, b, h = x.shape
            losses = tiled_cross_entropy(x.reshape(s * b, h), self.output_weight, labels.t().reshape(s * b),
                                         self.config.loss_tile_tokens)  # [s/p * b]
            return losses.view(s, b).t()  # [s/p, b] -> [b, s/p]
        logits = F.linear(x, self.output_weight)  # [s/p, b, V]
        if labels is None:
            return logits.transpose(0, 1)  # [b, s/p, V]
        return token_cross_entropy(logits, labels)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss `[b, s/p]` (fp32) from logits `[s/p, b, V]` and labels `[b, s/p]`."""
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.float().reshape(s * b, v), labels.t().reshape(s * b), reduction="none")
    return loss.view(s, b).t()  # [s/p, b] -> [b, s/p]
