"""GPT language model, pure single-device torch.

`GPTModel(config)` takes tokens `[b, s]` (and optionally their position ids and documents)
and returns per-token losses (or logits). It knows nothing about ranks: sequence
parallelism, recompute, tiling, offload and ZeRO are applied to a built model by
`megatron.parallel.parallelize_gpt`, which keeps every parameter name, so a checkpoint or a
Hugging Face conversion sees the same model either way. This plain model is also the
reference every sequence-parallel test compares against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import ModelConfig
from megatron.core.documents import as_documents
from megatron.model.loss import LanguageModelLoss
from megatron.model.rotary import RotaryEmbedding
from megatron.model.transformer import TransformerLayer, build_norm, norm_init_plan, normal_init


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_embedding_type == "learned_absolute" else None)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)  # [b, s, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return x.transpose(0, 1)  # [b, s, h] -> [s, b, h]


class GPTModel(nn.Module):
    """Decoder-only transformer; the layout inside is `[s, b, h]` as in Megatron."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        device = torch.get_default_device()  # "meta" inside `with torch.device("meta")`
        # Submodules are created without memory (skipping torch's default inits, which would
        # consume RNG draws a sharded build cannot reproduce), then allocated and initialised
        # once, from `init_plan`: the same draws whether built here or materialised by shards.
        with torch.device("meta"):
            self.embedding = Embedding(config)
            self.rotary = RotaryEmbedding.from_config(config) if config.position_embedding_type == "rope" else None
            self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
            self.final_norm = build_norm(config)
            self.output_layer = (nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                                 if config.untie_embeddings_and_output_weights else None)
        self.loss = LanguageModelLoss()  # no parameters; parallelize_gpt may swap in the tiled one
        if device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()

    def init_plan(self) -> list[tuple[nn.Parameter, callable]]:
        """Every parameter with the function that initialises a full tensor of its shape, in
        the fixed order that consumes the RNG. Ranks seeded identically therefore produce
        identical values, whether they initialise whole parameters (here) or materialise a
        model built on the meta device shard by shard (megatron.parallel.init)."""
        std = self.config.init_method_std
        plan = [(self.embedding.word_embeddings.weight, normal_init(std))]
        if self.embedding.position_embeddings is not None:
            plan.append((self.embedding.position_embeddings.weight, normal_init(std)))
        for layer in self.layers:
            plan += layer.init_plan(self.config)
        plan += norm_init_plan(self.final_norm)
        if self.output_layer is not None:
            plan.append((self.output_layer.weight, normal_init(std)))
        return plan

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter from the current torch RNG, in the order of `init_plan`."""
        for param, init in self.init_plan():
            if param.device.type != "meta":
                init(param)

    def run_layers(self, x: torch.Tensor, rope, documents) -> torch.Tensor:
        """The transformer layers in order (parallelize_gpt may recompute them in chunks)."""
        for layer in self.layers:
            x = layer(x, rope, documents)
        return x

    @property
    def output_weight(self) -> torch.Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.embedding.word_embeddings.weight

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, segment_ids=None, sequence_length: int | None = None):
        """tokens, position_ids, labels: `[b, s]`; segment_ids: documents of the sequences
        (`[b, s]` ids or a `megatron.core.documents.Documents`), turning on document-causal
        attention. `sequence_length`: length of the full sequences these tokens belong to (only
        dynamic NTK RoPE reads it; default `s`, and the SP input hook passes `s x` SP size).

        Returns per-token cross-entropy `[b, s]` (fp32) when `labels` is given, else logits
        `[b, s, V]` over the true vocabulary (`config.output_vocab_size`): padding rows of a
        padded vocabulary never take part in a softmax.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if position_ids is None:
            b, s = tokens.shape
            position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        documents = as_documents(segment_ids)
        x = self.embedding(tokens, position_ids)  # [s, b, h]
        if self.training and self.config.hidden_dropout > 0:
            x = F.dropout(x, p=self.config.hidden_dropout)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(position_ids, sequence_length if sequence_length is not None else tokens.shape[1])
        x = self.run_layers(x, rope, documents)
        x = self.final_norm(x)
        true_vocab = self.config.true_vocab_size
        padded = true_vocab is not None and true_vocab < self.config.vocab_size
        if labels is None:
            logits = F.linear(x, self.output_weight)  # [s, b, V padded]
            if padded:
                logits = logits[..., :true_vocab]  # [s, b, V padded] -> [s, b, V]
            return logits.transpose(0, 1)  # [s, b, V] -> [b, s, V]
        if padded:  # padding columns take no part in the softmax
            return self.loss(x, self.output_weight, labels, vocab_size=true_vocab)  # [b, s]
        return self.loss(x, self.output_weight, labels)  # [b, s]
