"""Incremental (KV-cache) generation with a `GPTModel`'s weights, on one process or an SP group.

The model stays pure: this module runs its submodules (embedding, each layer's norms,
`attention.qkv_heads`, `attention.proj`, `mlp`, the final norm and output weight) in an
inference forward of its own, so `GPTModel` gains no decoding flags and a checkpoint of any
training layout serves as is.

Prefill and decode:

* Prefill runs the prompts (left-padded to a common length; the padding is a document of its
  own, so real tokens never attend to it) through every layer at once and keeps each layer's
  rotated K and V.
* Decode feeds one token per sequence: its Q/K/V, the cached K/V, attention over them, the
  MLP. Positions continue each prompt's own (0-based, padding excluded), as transformers'
  `generate()` derives them from the attention mask, so greedy output equals transformers'
  token for token.

Sequence parallel prefill (a prompt longer than one device holds): the prompts are sharded
over the P ranks of an SP group in the training layout and every layer's attention is the same
Ulysses `DistributedAttention` as in training. Cache layout, chosen so decode never gathers the
cache: each rank keeps K/V *after* the all-to-all, i.e. the full sequence for its own heads
(the Ulysses head plan: H/P query heads and their K/V heads, replicated as in training when
there are fewer K/V heads than ranks). A decode step computes the new token's Q/K/V on every
rank (one token: cheap and identical everywhere), each rank attends with its heads over its
cache, and one all-reduce of `[b, H, d]` per layer assembles the heads; the MLP runs
replicated. Per token and layer that moves H x d x b values instead of a cache of N x Hkv x d,
and the cache of an N-token prompt is spread over the P ranks exactly as training spreads
attention. The sampled token is broadcast from SP rank 0 so every rank continues identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.config import ConfigError
from megatron.core import comm
from megatron.core.documents import Documents
from megatron.core.sequence_parallel.heads import plan_heads
from megatron.core.sequence_parallel.layer import DistributedAttention
from megatron.core.sequence_parallel.layout import sequence_shard_indices
from megatron.inference.sampling import SamplingConfig, choose_tokens
from megatron.model.attention_backends import build_local_attention


@dataclass
class GenerationOutput:
    """`tokens[i]`: the new tokens of prompt i (ending with the EOD token when it was produced);
    `first_logits`: the logits of the first new token `[b, V]` (what the prompt predicts)."""

    tokens: list
    first_logits: torch.Tensor
    steps: int = 0
    stats: dict = field(default_factory=dict)


class KVCache:
    """Per layer, K and V `[b, h_local, max_len, d]` (the rotated keys), filled left to right."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v `[s, b, h, d]` (the layout of the model's attention) at positions start..start+s-1."""
        s = k.shape[0]
        self.k[layer][:, :, start:start + s] = k.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]
        self.v[layer][:, :, start:start + s] = v.permute(1, 2, 0, 3)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class _CaptureKV(torch.nn.Module):
    """Local attention that also keeps the K/V it is given (after the Ulysses all-to-all: this rank's heads
    over the full sequence) in the cache."""

    def __init__(self, local, cache: KVCache, layer: int) -> None:
        super().__init__()
        self.local, self.cache, self.layer = local, cache, layer

    def forward(self, q, k, v, segment_ids=None):
        self.cache.store(self.layer, 0, k, v)  # [s, b, h_me, d]
        return self.local(q, k, v, segment_ids=segment_ids)


class Generator:
    """Generate with `model` (a plain, unparallelized `GPTModel`; only its weights are used).

    `parallel_state`: an SP group to prefill across (its ranks all hold the same weights and
    prompts); None or SP size 1 for one process. Ulysses only (ring attention is not used here).
    """

    def __init__(self, model, parallel_state=None, attention_backend: str = "sdpa") -> None:
        self.model = model.eval()
        self.config = model.config
        c = self.config
        self.ps = parallel_state if parallel_state is not None and parallel_state.sp_size > 1 else None
        self.local_attention = build_local_attention(attention_backend, causal=True, layout="sbhd")
        if self.ps is not None:
            if self.ps.ring_size > 1:
                raise ConfigError("generation prefills with Ulysses only: build the parallel state without "
                                  "--ring-attention-size (ring_attention_size=1)")
            plan = plan_heads(c.num_attention_heads, c.num_query_groups, self.ps.sp_size)
            me = self.ps.sp_rank
            self.q_heads, self.kv_heads = list(plan.q_heads[me]), list(plan.kv_heads[me])
        else:
            self.q_heads, self.kv_heads = list(range(c.num_attention_heads)), list(range(c.num_query_groups))

    @property
    def device(self) -> torch.device:
        return self.model.output_weight.device

    # ------------------------------------------------------------------ the public call

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int, sampling: SamplingConfig | None = None,
                 eod_id: int | None = None, seed: int = 0, pad_id: int = 0) -> GenerationOutput:
        """New tokens for each prompt (a list of token id lists), stopping a sequence at `eod_id`."""
        sampling = sampling or SamplingConfig()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        if self.config.position_embedding_type == "learned_absolute" and \
                longest + max_new_tokens - 1 > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"{self.config.max_position_embeddings} learned positions")
        cache, logits, key_valid = self._prefill(prompts, longest + max_new_tokens, pad_id)
        first = logits.clone()
        b = len(prompts)
        out = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        positions = torch.tensor(lengths, device=self.device)  # next position of every sequence
        for step in range(max_new_tokens):
            tokens = self._agree(choose_tokens(logits, sampling, generator))  # [b]
            host = tokens.tolist()  # one small copy per generated token (decoding is host-driven anyway)
            for i, t in enumerate(host):
                if not done[i]:
                    out[i].append(t)
                    if eod_id is not None and t == eod_id:
                        done[i] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self._decode(tokens, positions, cache, key_valid, sequence_length=longest + step + 1)
            positions = positions + 1
        return GenerationOutput(out, first, steps=step + 1, stats={"kv_cache_bytes": cache.bytes()})

    # ------------------------------------------------------------------ prefill

    def _prefill(self, prompts: list, max_len: int, pad_id: int):
        c, dev = self.config, self.device
        b, longest = len(prompts), max(len(p) for p in prompts)
        p = self.ps.sp_size if self.ps is not None else 1
        total = -(-longest // p) * p  # left-pad to a multiple of the SP size
        tokens = torch.full((b, total), pad_id, dtype=torch.long)
        positions = torch.zeros((b, total), dtype=torch.long)
        key_valid = torch.zeros((b, total - longest + max_len), dtype=torch.bool)
        doc_lengths = []
        for i, prompt in enumerate(prompts):
            pad = total - len(prompt)
            tokens[i, pad:] = torch.tensor(prompt)
            positions[i, pad:] = torch.arange(len(prompt))
            key_valid[i, pad:total] = True
            doc_lengths.append((pad, len(prompt)) if pad else (len(prompt),))
        tokens, positions, key_valid = tokens.to(dev), positions.to(dev), key_valid.to(dev)
        documents = Documents(doc_lengths, device=dev)
        cache = KVCache(c.num_layers, b, len(self.kv_heads), key_valid.shape[1], c.kv_channels,
                        self.model.output_weight.dtype, dev)
        if self.ps is not None:
            idx = sequence_shard_indices(total, self.ps, device=dev)  # this rank's tokens (global indices)
            tokens, positions = tokens[:, idx], positions[:, idx]
        x = self.model.embedding(tokens, positions)  # [s, b, h]
        rope = self._rope(positions, longest)
        for i, layer in enumerate(self.model.layers):
            attention = _CaptureKV(self.local_attention, cache, i)
            if self.ps is not None:
                attention = DistributedAttention(attention, self.ps.sp_group, check_shapes=False)
            s = x.shape[0]
            q, k, v = layer.attention.qkv_heads(layer.input_norm(x), rope)
            ctx = attention(q, k, v, segment_ids=documents)  # [s, b, hq, d]
            x = x + layer.attention.proj(ctx.reshape(s, b, -1))
            x = x + layer.mlp(layer.post_attention_norm(x))
        cache.length = total
        logits = self._last_logits(x, total)
        # the cache spans the padded prompt; decode appends after it
        return cache, logits, key_valid

    def _last_logits(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Logits of the last prompt position `[b, V]`, on every rank. In the Ulysses layout the last
        SP rank holds the last tokens; it computes the logits and broadcasts them."""
        if self.ps is None:
            return self._logits(x[-1])
        holder = self.ps.sp_size - 1
        logits = torch.empty(x.shape[1], self.config.output_vocab_size, dtype=torch.float32, device=x.device)
        if self.ps.sp_rank == holder:
            logits.copy_(self._logits(x[-1]))
        return comm.broadcast(logits, src=dist.get_global_rank(self.ps.sp_group, holder), group=self.ps.sp_group)

    # ------------------------------------------------------------------ decode

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, key_valid: torch.Tensor,
                sequence_length: int) -> torch.Tensor:
        c, b = self.config, tokens.shape[0]
        slot = cache.length
        key_valid[:, slot] = True
        pos = positions[:, None]  # [b, 1]
        x = self.model.embedding(tokens[:, None], pos)  # [1, b, h]
        rope = self._rope(pos, sequence_length)
        mask = key_valid[:, None, None, :slot + 1]  # [b, 1, 1, keys]
        for i, layer in enumerate(self.model.layers):
            q, k, v = layer.attention.qkv_heads(layer.input_norm(x), rope)  # [1, b, h, d]
            if self.ps is not None:  # my heads (the training head plan)
                q, k, v = q[:, :, self.q_heads], k[:, :, self.kv_heads], v[:, :, self.kv_heads]
            cache.store(i, slot, k, v)
            out = self._attend(q, cache.k[i][:, :, :slot + 1], cache.v[i][:, :, :slot + 1], mask)  # [1, b, h_me, d]
            if self.ps is not None:  # every rank's heads, in head order: [1, b, H, d]
                full = out.new_zeros(1, b, c.num_attention_heads, c.kv_channels)
                full[:, :, self.q_heads] = out
                out = comm.all_reduce(full, group=self.ps.sp_group, kind="all_reduce_decode")
            x = x + layer.attention.proj(out.reshape(1, b, -1))
            x = x + layer.mlp(layer.post_attention_norm(x))
        cache.length = slot + 1
        return self._logits(x[-1])

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query per sequence over its cached keys: q `[1, b, hq, d]`, k/v `[b, hkv, t, d]`."""
        q = q.permute(1, 2, 0, 3)  # [1, b, hq, d] -> [b, hq, 1, d]
        group = q.shape[1] // k.shape[1]
        if group > 1:  # the local backends' GQA rule: query head i reads K/V head i // group
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # [b, hq, 1, d]
        return out.permute(2, 0, 1, 3)  # -> [1, b, hq, d]

    # ------------------------------------------------------------------ pieces

    def _rope(self, positions: torch.Tensor, sequence_length: int):
        return self.model.rotary(positions, sequence_length) if self.model.rotary is not None else None

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """`[b, V]` fp32 logits over the true vocabulary from final hidden states `[b, h]`."""
        logits = F.linear(self.model.final_norm(h), self.model.output_weight).float()
        return logits[..., :self.config.output_vocab_size]

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every SP rank continues with SP rank 0's choice (identical already; this makes it certain)."""
        if self.ps is None:
            return tokens
        return comm.broadcast(tokens.contiguous(), src=dist.get_global_rank(self.ps.sp_group, 0),
                              group=self.ps.sp_group)


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, sampling: SamplingConfig | None = None,
             eod_id: int | None = None, seed: int = 0, parallel_state=None) -> GenerationOutput:
    """One-call form of `Generator(model, parallel_state).generate(...)`."""
    return Generator(model, parallel_state).generate(prompts, max_new_tokens, sampling, eod_id=eod_id, seed=seed)
