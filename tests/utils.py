"""Small helpers shared by tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(a, b, tol=1e-5, what=""):
    err = rel_err(a, b)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"
