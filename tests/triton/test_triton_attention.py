"""Triton flash-attention backend vs the classic reference, under Triton's CPU interpreter.

The kernel cases run in one child process started with TRITON_INTERPRET=1 (the
interpreter is picked when triton is imported, and this pytest process may already
have imported it), shared by the tests of this folder: the `interpreted` fixture of
conftest.py, which runs _interpret_cases.py. The dropout cases are in
test_triton_dropout.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from megatron.model import triton_attention as ta
from tests.triton._interpret_cases import CASES
from tests.triton.conftest import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")

# fp32: online softmax vs one-shot softmax differ by rounding only (~3e-7 seen).
# fp16: inputs are the same fp16 values; the kernel's fp16 P/dS operands and output
# rounding (2^-11 relative) give ~3e-4 norm-wise against the fp32 reference.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


@needs_triton
def test_module_import_leaves_triton_alone(interpreted):
    header = interpreted["header"]
    assert header["triton_imported_by_module"] is False
    assert header["available"][0] is True and "interpreter" in header["available"][1]


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(interpreted, case):
    result = interpreted["cases"][case]
    tol = TOLERANCE[CASES[case][9]]
    bad = {k: e for k, e in result["errors"].items() if not e < tol}
    assert not bad, f"{case}: relative errors above {tol:.0e}: {bad} (all: {result['errors']})"
    assert result["dtype_kept"], f"{case}: output or gradients changed dtype"


EXPECTED_ERRORS = {
    "attention_mask": ("ValueError", "sdpa or classic"),
    "dropout_training_runs": ("no exception", ""),
    "dropout_out_of_range": ("ValueError", "[0, 1)"),
    "heads_not_multiple": ("ValueError", "multiple of key/value heads"),
    "head_dim_too_big": ("ValueError", "at most 128"),
    "dtype_mismatch": ("ValueError", "dtype"),
    "segment_shape": ("ValueError", "[batch, seq]"),
    "bad_tile": ("ValueError", "power of two"),
}


@needs_triton
@pytest.mark.parametrize("what", list(EXPECTED_ERRORS))
def test_error_cases(interpreted, what):
    kind, words = EXPECTED_ERRORS[what]
    got = interpreted["error_cases"][what]
    assert got.startswith(kind) and words in got, f"{what}: expected {kind} mentioning {words!r}, got {got!r}"


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    ok, reason = ta.triton_available()
    assert not ok and "pip install triton" in reason
    with pytest.raises(RuntimeError, match=r"pip install triton.*") as info:
        ta.TritonAttention()
    assert "--use-flash-attn-triton" in str(info.value)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible; the kernel can run")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = ta.triton_available()
    assert not ok and "no CUDA GPU" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as info:
        ta.TritonAttention()
    assert "--use-flash-attn-triton" in str(info.value) and "sdpa" in str(info.value)


def test_run_bounds_against_brute_force():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3],
                        [5, 5, 7, 7, 7, 5, 5, 5, 9, 9]])  # ids repeating in separate runs
    start, end = ta.run_bounds(seg)
    assert start.dtype == end.dtype == torch.int32
    for b in range(seg.shape[0]):
        for i in range(seg.shape[1]):
            lo = i
            while lo > 0 and seg[b, lo - 1] == seg[b, i]:
                lo -= 1
            hi = i + 1
            while hi < seg.shape[1] and seg[b, hi] == seg[b, i]:
                hi += 1
            assert (start[b, i].item(), end[b, i].item()) == (lo, hi), (b, i)
