"""What the Triton kernel tests share (tests/test_triton_bsr.py, tests/test_triton_ops.py): where the kernels
run (the interpreter on CPU under --triton-interpret, else a CUDA GPU), the skip marks that follow from it,
the comparison tolerances and the BSR test weights.

Import it after conftest has run (test modules are imported at collection, after --triton-interpret has set
TRITON_INTERPRET); it does not import triton.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparsekit.formats import BSR

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET or not HAS_CUDA else "cuda"

needs_runner = pytest.mark.skipif(
    not (INTERPRET or HAS_CUDA),
    reason="needs TRITON_INTERPRET=1 (pytest --triton-interpret) or a CUDA GPU to run Triton kernels")
# (without a GPU the conftest skips `cuda` tests with its own reason)
compiled_only = pytest.mark.skipif(INTERPRET and HAS_CUDA,
                                   reason="checks compiled GPU code; run without --triton-interpret")

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}


def close(got: torch.Tensor, expect: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """got == expect within TOL[dtype] (atol times ``scale``), compared in float64."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), expect.double(), atol=atol * scale, rtol=rtol)


def make_bsr(n: int, k: int, block: tuple[int, int], density: float, dtype: torch.dtype, seed: int = 0,
             empty_rows: tuple[int, ...] = (), empty_cols: tuple[int, ...] = (), device: str = DEVICE) -> BSR:
    """A validated BSR weight with about `density` of its blocks stored and the given block-rows and
    block-columns empty."""
    g = torch.Generator().manual_seed(seed)
    bn, bk = block
    keep = torch.rand(n // bn, k // bk, generator=g) < density
    for r in empty_rows:
        keep[r] = False
    for c in empty_cols:
        keep[:, c] = False
    dense = torch.randn(n, k, generator=g) * keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return BSR.from_dense(dense, block=block).to(device=device, dtype=dtype).validate()
