"""Rotary position embeddings (RoPE) driven by explicit position ids, with the variants people load.

Under sequence parallelism every rank rotates its shard with the *global* positions
of its tokens (rank r holds `[r*N/P, (r+1)*N/P)`, or its zigzag chunks with a ring), so the
rotation is exactly the one a single process applies to the full sequence. The half-split
("rotate_half") convention is the one Hugging Face Llama and GPT-NeoX checkpoints use, so
converted weights need no permutation.

Variants, each with the definition of transformers' `modeling_rope_utils.py` (same float32
operations in the same order, so imported models match transformers to the last bits):

* partial rotary (`rotary_percent` < 1, GPT-NeoX / Megatron's `--rotary-percent`): only the
  first `int(head_dim * rotary_percent)` dims of each head rotate, the rest pass through;
* `linear`: every inverse frequency divided by `factor` (position interpolation);
* `dynamic` (NTK): the base grows with the sequence length L once L exceeds the original
  context: `base * (factor * L / original - (factor - 1)) ** (dim / (dim - 2))`;
* `yarn`: per-frequency blend of interpolation and extrapolation (ramp between `beta_fast`
  and `beta_slow` rotations over the original context) and cos/sin scaled by the attention
  factor (`0.1 ln(factor) + 1`, or the mscale ratio);
* `llama3`: low frequencies (wavelength > original / low_freq_factor) divided by `factor`,
  high ones (wavelength < original / high_freq_factor) kept, a smooth blend between.

`dynamic` is the one variant that depends on the sequence, not only on positions. Here L is
the length of the FULL sequence the tokens belong to (`GPTModel.forward(sequence_length=)`:
the token count on one process; the SP input hook passes shard length x SP size), so every
SP rank and a single process rotate identically. transformers uses `max(position_ids) + 1`
over the batch, which is the same number for unpacked sequences; with packed documents
(`--reset-position-ids`) the two differ (here: the packed length). In incremental decoding L
is the number of tokens so far, as in transformers' `generate()`: a cached key keeps the
rotation it got when it was computed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """`1 / base^(2i/dim)`, fp32 on the host, computed as transformers computes it."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))


def _yarn_inv_freq(base: float, dim: int, factor: float, original: int, beta_fast: float, beta_slow: float,
                   truncate: bool) -> torch.Tensor:
    # transformers' _compute_yarn_parameters, operation for operation
    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def _llama3_inv_freq(base: float, dim: int, factor: float, original: int, low_freq_factor: float,
                     high_freq_factor: float) -> torch.Tensor:
    # transformers' _compute_llama3_parameters, operation for operation
    inv_freq = default_inv_freq(base, dim)
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotation for given position ids. No buffers: nothing to shard, move or checkpoint
    (the inverse frequencies are computed on the host once per device and cached)."""

    def __init__(self, head_dim: int, base: float = 10000.0, *, rotary_percent: float = 1.0,
                 scaling_type: str | None = None, factor: float = 1.0, original_max_position_embeddings: int = 0,
                 yarn_beta_fast: float = 32.0, yarn_beta_slow: float = 1.0, yarn_mscale: float | None = None,
                 yarn_mscale_all_dim: float | None = None, yarn_truncate: bool = True,
                 attention_factor: float | None = None, llama3_low_freq_factor: float = 1.0,
                 llama3_high_freq_factor: float = 4.0) -> None:
        super().__init__()
        if scaling_type is not None and scaling_type not in SCALING_TYPES:
            raise ValueError(f"unknown RoPE scaling {scaling_type!r}; choose one of {SCALING_TYPES}")
        self.head_dim = head_dim
        self.dim = int(head_dim * rotary_percent)  # rotated dims, the first ones of each head
        self.base = float(base)
        self.scaling_type = scaling_type
        self.factor = float(factor)
        self.original = int(original_max_position_embeddings)
        if scaling_type in ("dynamic", "yarn", "llama3") and self.original <= 0:
            raise ValueError(f"RoPE scaling {scaling_type!r} needs original_max_position_embeddings")
        self.attention_scaling = 1.0
        if scaling_type == "yarn":
            self.attention_scaling = (attention_factor if attention_factor is not None
                                      else yarn_attention_factor(self.factor, yarn_mscale, yarn_mscale_all_dim))
            self._static = _yarn_inv_freq(self.base, self.dim, self.factor, self.original, yarn_beta_fast,
                                          yarn_beta_slow, yarn_truncate)
        elif scaling_type == "llama3":
            self._static = _llama3_inv_freq(self.base, self.dim, self.factor, self.original,
                                            llama3_low_freq_factor, llama3_high_freq_factor)
        elif scaling_type == "linear":
            self._static = default_inv_freq(self.base, self.dim) / self.factor
        else:  # plain RoPE; dynamic NTK is plain up to the original length
            self._static = default_inv_freq(self.base, self.dim)
        self._on_device: dict = {}

    @classmethod
    def from_config(cls, config) -> RotaryEmbedding:
        """From a `megatron.config.ModelConfig`."""
        c = config
        return cls(c.kv_channels, c.rotary_base, rotary_percent=c.rotary_percent, scaling_type=c.rope_scaling_type,
                   factor=c.rope_scaling_factor, original_max_position_embeddings=c.rope_original_length,
                   yarn_beta_fast=c.yarn_beta_fast, yarn_beta_slow=c.yarn_beta_slow, yarn_mscale=c.yarn_mscale,
                   yarn_mscale_all_dim=c.yarn_mscale_all_dim, yarn_truncate=c.yarn_truncate,
                   attention_factor=c.rope_attention_factor, llama3_low_freq_factor=c.llama3_low_freq_factor,
                   llama3_high_freq_factor=c.llama3_high_freq_factor)

    def inv_freq(self, sequence_length: int | None = None, device=None) -> torch.Tensor:
        """Inverse frequencies `[dim/2]` (fp32) on `device`; `sequence_length` matters for `dynamic` only."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.scaling_type == "dynamic" and sequence_length is not None and sequence_length > self.original:
            key = (device, int(sequence_length))
            if key not in self._on_device:
                self._on_device = {k: v for k, v in self._on_device.items() if len(k) == 1}  # one dynamic entry
                self._on_device[key] = self._dynamic(int(sequence_length)).to(device)
            return self._on_device[key]
        key = (device,)
        if key not in self._on_device:
            self._on_device[key] = self._static.to(device)
        return self._on_device[key]

    def _dynamic(self, seq_len: int) -> torch.Tensor:
        # transformers' _compute_dynamic_ntk_parameters as run from its forward: seq_len is a tensor
        # there, so the new base is computed in float32 tensor arithmetic; the same here
        length = torch.maximum(torch.tensor(seq_len, device="cpu"), torch.tensor(self.original, device="cpu"))
        base = self.base * ((self.factor * length / self.original) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float)
                              / self.dim))

    def forward(self, position_ids: torch.Tensor,
                sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape `[s, b, 1, rotary_dim]` (fp32) for position ids `[b, s]`.

        `sequence_length`: length of the full sequence these positions belong to (dynamic NTK only).
        """
        inv_freq = self.inv_freq(sequence_length, position_ids.device)
        freqs = position_ids.t().float()[..., None] * inv_freq  # [s, b, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [s, b, 1, dim]
        if self.attention_scaling != 1.0:
            return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        scaling = f", scaling={self.scaling_type}(factor={self.factor}, original={self.original})" \
            if self.scaling_type else ""
        return f"head_dim={self.head_dim}, rotary_dim={self.dim}, base={self.base}{scaling}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[s, b, h, d]` by the angles whose cos/sin are `[s, b, 1, r]`: the first r dims
    rotate (r = d: full RoPE), the others pass through unchanged."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]  # [s, b, h, r], [s, b, h, d - r]
    rf = rot.float()
    return torch.cat([(rf * cos + _rotate_half(rf) * sin).to(x.dtype), rest], dim=-1)
