"""The GPU tests' comparison with the float64 reference (shared by tests/test_cuda_*.py)."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close_to_reference(got: Tensor, ref64: Tensor, dtype: torch.dtype, reduction: int) -> None:
    """got (dtype) vs the float64 reference: error bound ~ eps * sqrt(reduction) * scale."""
    assert got.dtype == dtype and got.shape == ref64.shape, (got.dtype, got.shape, ref64.shape)
    assert torch.isfinite(got).all()
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    tol = EPS[dtype] * 4 * max(1.0, reduction ** 0.5) * max(1.0, scale) + EPS[dtype]
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"
