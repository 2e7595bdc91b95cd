"""Attention dropout inside the Triton kernel, under the interpreter (cases in _dropout_cases.py).

The kernel's keep mask is compared, not sampled: `dropout_keep_mask(seed, ...)` returns
the mask the kernels derive from a seed, the kernel's output is checked against a plain
fp32 attention that applies exactly that mask, and the mask is also read back from the
kernel's own output and dV where that is exact.
"""

from __future__ import annotations

import pytest

from tests.triton._dropout_cases import DROPOUT_CASES

# as in test_triton_attention.py: fp32 differs from the one-shot reference by rounding
# (~3e-7 seen); fp16 by the kernel's fp16 operands (~4e-4 seen)
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_matches_reference_with_the_same_mask(interpreted, case):
    result = interpreted["dropout_cases"][case]
    p, tol = DROPOUT_CASES[case][10], TOLERANCE[DROPOUT_CASES[case][9]]
    bad = {k: e for k, e in result["errors"].items() if not e < tol}
    assert not bad, f"{case}: relative errors above {tol:.0e}: {bad} (max abs {result['max_abs']})"
    assert abs(result["keep_rate"] - (1 - p)) < 0.05, result["keep_rate"]  # a few thousand draws


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_kernel_mask_read_back_exactly(interpreted, causal):
    """O = P * Z and dV = (P * Z)^T with uniform P and identity V and dO: the forward and the
    dK/dV kernel apply exactly dropout_keep_mask (up to fp32 rounding of k / s, far below 1)."""
    r = interpreted["dropout_checks"]["read_back_causal" if causal else "read_back_noncausal"]
    assert r["fwd_max_dev"] < 1e-4 and r["dv_max_dev"] < 1e-4, r
    assert 0 < r["kept"] < r["pairs"], r


@pytest.mark.parametrize("check", ["p0_equal_plain", "eval_equal_plain", "p0_eval_rng_untouched"])
def test_no_dropout_is_the_plain_kernel(interpreted, check):
    """dropout_p=0 and eval mode run the kernel without dropout, bit for bit, and draw no seed."""
    assert interpreted["dropout_checks"][check] is True


@pytest.mark.parametrize("check", ["same_torch_seed_same_output", "next_call_differs", "dropout_changes_output",
                                   "explicit_seed_reproducible"])
def test_seed_reproducibility(interpreted, check):
    assert interpreted["dropout_checks"][check] is True


def test_keep_rate_and_independence(interpreted):
    checks = interpreted["dropout_checks"]
    for p, rate in checks["keep_rates"].items():  # 32768 draws each: sd of the rate <= 0.003
        assert abs(rate - (1 - float(p))) < 0.015, (p, rate)
    # p = 0.5: two independent masks agree on half of the draws; a head or seed ignored -> 1.0
    assert abs(checks["head_agreement"] - 0.5) < 0.03, checks["head_agreement"]
    assert abs(checks["seed_agreement"] - 0.5) < 0.015, checks["seed_agreement"]


def test_recompute_under_checkpoint_is_identical(interpreted):
    """torch.utils.checkpoint (use_reentrant=False, as the project's recompute) restores the RNG
    state, so the recomputed forward redraws the seed: output and gradients equal those without
    recompute, bit for bit."""
    assert interpreted["dropout_checks"]["checkpoint_identical"] is True
