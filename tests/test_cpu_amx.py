"""bfloat16 BSR on AMX tiles (csrc/cpu/amx.cpp), on CPUs that have AMX-BF16 (Sapphire Rapids and later).

bsr_mm (and bsr_mm_t, which runs it over the transposed blocks) takes the AMX path for bf16 activations and
values when both block sides are multiples of 16 and M is above the GEMV size; every other case runs the SIMD
kernels (tests/test_cpu_simd.py). Shapes cover both tile slabs (16 and 32 output columns), both k-steps (16 and
32), several k-steps per block, partial last row tiles (M not a multiple of 32), empty block-rows, 0% and 100%
density and a bias.

Tolerance: rtol=atol=1e-2 against the float64 reference on the same bf16 inputs (fp32 accumulation, one
rounding of the output to bf16), and the AMX result against the AVX-512 path on the same inputs.
"""

from pathlib import Path

import pytest
import torch

import sparsekit as sk
from sparsekit import _extension
from sparsekit.formats import BSR

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"sparsekit._C not loaded: {_extension.LOAD_ERROR}")

BLOCKS = [(16, 16), (32, 32), (64, 64), (16, 32), (32, 16), (48, 16), (16, 48), (64, 32), (128, 128)]


def _isa() -> str:
    return torch.ops.sparsekit.cpu_kernel_isa()


needs_amx = pytest.mark.skipif(not _extension.LOADED or "amx" not in _isa(),
                               reason="this CPU (or OS) gives no AMX-BF16 tiles: the AMX path cannot run here")


def _weight(rows, cols, block, density, gen):
    bn, bk = block
    keep = torch.rand(rows, cols, generator=gen) < density
    if 0 < density < 1 and rows > 2:
        keep[1] = False      # an empty block-row inside
        keep[-1] = False     # and the last one
    mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    w = torch.randn(rows * bn, cols * bk, generator=gen, dtype=torch.float64) * mask
    return BSR.from_dense(w.to(torch.bfloat16), block)


@needs_amx
@pytest.mark.parametrize("block", BLOCKS)
def test_amx_matches_reference_and_avx512(block, monkeypatch):
    gen = torch.Generator().manual_seed(hash(block) % 10_000)
    bn, bk = block
    rows, cols = max(3, 96 // bn), max(2, 160 // bk)
    for density in (0.0, 0.45, 1.0):
        w = _weight(rows, cols, block, density, gen)
        dense = w.to_dense().double()
        for m in (9, 16, 31, 32, 33, 70):
            x = torch.randn(m, cols * bk, generator=gen).to(torch.bfloat16)
            bias = torch.randn(rows * bn, generator=gen).to(torch.bfloat16)
            monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
            y = sk.ops.bsr_linear(x, w, bias, backend="cpu")
            ref = x.double() @ dense.T + bias.double()
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2, msg=f"{block} m={m} d={density}")
            monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx512")
            y_simd = sk.ops.bsr_linear(x, w, bias, backend="cpu")
            torch.testing.assert_close(y.double(), y_simd.double(), rtol=1e-2, atol=1e-2)


@needs_amx
def test_amx_backward_dx_and_values():
    gen = torch.Generator().manual_seed(7)
    w = _weight(6, 5, (32, 32), 0.5, gen)
    x = torch.randn(40, 160, generator=gen).to(torch.bfloat16).requires_grad_()
    values = w.values.clone().requires_grad_()
    wv = BSR(values=values, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    y = sk.ops.bsr_linear(x, wv, backend="cpu")
    dy = torch.randn(y.shape, generator=gen).to(torch.bfloat16)
    y.backward(dy)
    dense = w.to_dense().double()
    torch.testing.assert_close(x.grad.double(), dy.double() @ dense, rtol=1e-2, atol=2e-2)
    # dW on the stored blocks only
    full = dy.double().T @ x.detach().double()
    ref_blocks = torch.stack([full[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
                              for r in range(6) for c in w.col_indices[w.crow_indices[r]:w.crow_indices[r + 1]]])
    torch.testing.assert_close(values.grad.double(), ref_blocks, rtol=1e-2, atol=5e-2)


@needs_amx
def test_amx_propagates_nan_and_inf():
    w = BSR.from_dense(torch.ones(32, 32, dtype=torch.bfloat16), (32, 32))
    x = torch.ones(32, 32, dtype=torch.bfloat16)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    y = sk.ops.bsr_linear(x, w, backend="cpu")
    assert torch.isnan(y[3]).all() and torch.isinf(y[7]).all()
    assert torch.equal(y[0], torch.full((32,), 32.0, dtype=torch.bfloat16))


def test_isa_override_turns_amx_off(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx2")
    assert "amx" not in _isa()
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "scalar")
    assert _isa() == "scalar"
    monkeypatch.delenv("SPARSEKIT_CPU_ISA")
    cpuinfo = Path("/proc/cpuinfo")
    cpu_flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if "amx" in _isa():      # reported only where the hardware really has it
        assert "amx_bf16" in cpu_flags and "amx_tile" in cpu_flags
