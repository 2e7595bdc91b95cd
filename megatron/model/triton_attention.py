"""Core attention backend on the project's own Triton flash-attention kernel (--use-flash-attn-triton).

Why it exists next to `flash-attn`: the kernel (megatron/model/triton_kernels/
flash_attention.py) needs only a CUDA build of triton, takes GQA without repeating K/V
and packed documents (segment ids) in a single call, and is our code, so it can be
read, tested and changed. On a machine without a GPU it runs under Triton's
interpreter (TRITON_INTERPRET=1 set before triton is imported): slow, meant for
correctness tests at small sizes.

Importing this module never imports triton; `triton_available()` and the constructor
of `TritonAttention` do.
"""

from __future__ import annotations

import importlib
import os

import torch

from megatron.model.attention_backends import LocalAttention

FLAG_HINT = "--use-flash-attn-triton (--attention-backend triton)"
MAX_HEAD_DIM = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> tuple[bool, str]:
    """(usable, reason): triton importable and either a CUDA GPU or TRITON_INTERPRET=1."""
    try:
        import triton
    except ImportError as e:
        return False, f"triton is not installed ({e}); pip install triton"
    if _interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors, slow)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, (f"triton {triton.__version__} is installed but no CUDA GPU is visible and "
                   "TRITON_INTERPRET=1 is not set")


def _kernels():
    """The kernel module, imported on first use (its import runs `import triton`)."""
    return importlib.import_module("megatron.model.triton_kernels.flash_attention")


def run_bounds(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [b, s] first position and one-past-last position of each token's run of equal ids.

    The kernels mask and skip key blocks with these bounds instead of comparing ids, so
    a document is a run of equal ids (as in the sdpa and flash-attn backends); ids that
    repeat in separate runs are separate documents.
    """
    b, s = segment_ids.shape
    pos = torch.arange(s, device=segment_ids.device).expand(b, s)  # [s] -> [b, s]
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # [b, s-1], True where a new run starts
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = change
    ends = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)  # True at a run's last token
    ends[:, :-1] = change
    run_start = torch.where(starts, pos, 0).cummax(dim=1).values
    # one past the last token, propagated leftwards: reverse cummin over positions
    run_end = torch.where(ends, pos + 1, s).flip(1).cummin(dim=1).values.flip(1)
    return run_start.to(torch.int32).contiguous(), run_end.to(torch.int32).contiguous()


class TritonAttention(LocalAttention):
    """FlashAttention-2 style attention in the project's Triton kernel; causal, GQA, documents, dropout.

    Attention dropout (dropout_p, in training mode only) is applied inside the kernel as
    FlashAttention does: the mask comes from Philox keyed by a seed drawn from the
    generator of q's device at each forward (so torch.utils.checkpoint recomputes the
    same mask) and is regenerated, not stored, in backward.

    Extra keyword arguments exist for tuning and for the interpreter tests: tile sizes
    (powers of two >= 16; the tests need small ones), warps and pipeline stages, and
    int64 row indexing (chosen automatically when a tensor is too large for int32
    offsets; forcing it lets the tests cover that path). The defaults are meant for
    A100/H100-class GPUs and are not tuned yet.

    `allow_tf32` concerns fp32 inputs only: None (default) multiplies them on TF32 tensor
    cores on NVIDIA GPUs (Ampere and newer; IEEE fp32 on ROCm and under the
    interpreter, which has no TF32), False forces IEEE fp32 dots, True asks for TF32.
    See `dot_precision` in the kernel module.
    """

    name = "triton"

    def __init__(self, *, causal: bool = True, dropout_p: float = 0.0, softmax_scale: float | None = None,
                 layout: str = "sbhd", block_m: int | None = None, block_n: int | None = None,
                 bwd_block_m: int | None = None, bwd_block_n: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None,
                 allow_tf32: bool | None = None, int64_index: bool = False) -> None:
        super().__init__(causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale, layout=layout)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1) (--attention-dropout), got {dropout_p}")
        ok, reason = triton_available()
        if not ok:
            raise RuntimeError(
                f"{FLAG_HINT} needs triton with a CUDA GPU: {reason}. Install it with `pip install triton` "
                "on a GPU machine (PyTorch's CUDA wheels already ship it), or drop the flag and use "
                "--attention-backend sdpa (or flash-attn). On CPU the kernel runs only under Triton's "
                "interpreter, for tests: set TRITON_INTERPRET=1 before Python starts")
        for name, val in (("block_m", block_m), ("block_n", block_n), ("bwd_block_m", bwd_block_m),
                          ("bwd_block_n", bwd_block_n)):
            if val is not None and (val < 16 or val & (val - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        self._tiles = dict(block_m=block_m, block_n=block_n, bwd_block_m=bwd_block_m, bwd_block_n=bwd_block_n,
                           num_warps=num_warps, num_stages=num_stages, int64_index=int64_index)
        self.allow_tf32 = allow_tf32
        self._fa = _kernels()

    def forward(self, q, k, v, attention_mask=None, segment_ids=None):
        if attention_mask is not None:
            raise ValueError("the triton attention backend takes no explicit attention_mask, only causal "
                             "masking and segment_ids (document masks); for arbitrary masks use "
                             "--attention-backend sdpa or classic")
        self._check_inputs(q, k, v)
        q, k, v = self._to_bhsd(q), self._to_bhsd(k), self._to_bhsd(v)  # [.., h, ..] -> [b, h, s, d] views
        b, hq, s, d = q.shape
        run_start = run_end = None
        if segment_ids is not None:
            if hasattr(segment_ids, "lengths"):  # a megatron.core.documents.Documents
                segment_ids = segment_ids.to(q.device).segment_ids
            if tuple(segment_ids.shape) != (b, s):
                raise ValueError(f"segment_ids must be [batch, seq] = [{b}, {s}] (the full sequence), "
                                 f"got {list(segment_ids.shape)}")
            run_start, run_end = run_bounds(segment_ids.to(q.device))
        fa = self._fa
        cfg = fa.KernelConfig(d, dtype=q.dtype, allow_tf32=self.allow_tf32, device=q.device, **self._tiles)
        dropout_p = self.dropout_p if self.training else 0.0
        out = fa.flash_attention(q, k, v, run_start, run_end, causal=self.causal, sm_scale=self._scale(d),
                                 cfg=cfg, dropout_p=dropout_p)
        return self._from_bhsd(out)  # [b, hq, s, d] -> q's layout

    def _check_inputs(self, q, k, v) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be 4-D ({self.layout}), got shapes "
                             f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        seq_dim = 0 if self.layout == "sbhd" else 1
        if q.shape[seq_dim] != k.shape[seq_dim] or q.shape[1 - seq_dim] != k.shape[1 - seq_dim]:
            raise ValueError(f"the triton backend does self-attention: q and k need the same sequence and "
                             f"batch sizes ({self.layout}), got {list(q.shape)} and {list(k.shape)}")
        if k.shape[3] != d or not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"head dim must be the same for q, k, v and at most {MAX_HEAD_DIM} for the "
                             f"triton kernel, got {q.shape[3]}, {k.shape[3]}; use --attention-backend sdpa")
        kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in kernel_dtypes:
            raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; got "
                             f"{q.dtype}, {k.dtype}, {v.dtype}")
        if _interpreting():
            if q.is_cuda:
                raise RuntimeError("TRITON_INTERPRET=1 runs the kernel on CPU tensors; unset it to use "
                                   "the GPU")
        elif not q.is_cuda:
            raise RuntimeError(f"{FLAG_HINT} runs on CUDA tensors, got {q.device}; on CPU use --attention-"
                               "backend sdpa (TRITON_INTERPRET=1 runs the kernel slowly, for tests)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tiles={self._tiles}"
