"""The SIMD paths of the CPU kernels (csrc/cpu/spmm_kernels.inc) under every ISA this machine can run.

SPARSEKIT_CPU_ISA lowers the run-time choice (avx512 -> avx2 -> scalar), so one AVX-512 machine tests the code
that AVX2-only CPUs (and non-x86 builds) run (bsr_sddmm too: its fast path needs block_k a multiple of the
vector width, split into panels of up to 8 vectors). Shapes cover every path of bsr_mm: GEMV (2*M <= vector width),
N-vectorized (block rows a multiple of the vector width) and M-panel (1xk, kx1, odd blocks), with M tails,
empty block-rows, 0% and 100% sparsity.

Tolerances: float32 rtol=1e-5/atol=1e-4 against the float64 reference on the same inputs; bfloat16 rtol=atol=1e-2
(fp32 accumulation, one rounding of the output to bfloat16).
"""

from pathlib import Path

import pytest
import torch

import sparsekit.ops  # noqa: F401
from sparsekit import _extension
from sparsekit.formats import BSR

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"sparsekit._C not loaded: {_extension.LOAD_ERROR}")

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
BLOCKS = [(1, 4), (4, 1), (3, 5), (8, 16), (16, 16), (32, 32), (32, 16), (16, 8), (16, 20), (64, 64), (3, 32)]


def _weight(rows, cols, block, density, dtype, gen):
    bn, bk = block
    keep = torch.rand(rows, cols, generator=gen) < density
    if 0 < density < 1 and rows > 2:
        keep[1] = False
        keep[-1] = False
    mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return BSR.from_dense((torch.randn(rows * bn, cols * bk, generator=gen, dtype=torch.float64) * mask).to(dtype),
                          block)


def _block_rows(w):
    counts = w.crow_indices[1:] - w.crow_indices[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.long())


def _set_isa(monkeypatch, isa):
    """"best": SPARSEKIT_CPU_ISA unset (AMX, or AVX512-BF16 pair panels, for bfloat16 where the CPU has them)."""
    if isa == "best":
        monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)


# bfloat16 also unlowered ("best"): its AMX and AVX512-BF16 kernels run only then
ISA_DTYPES = [(isa, dtype) for isa in ("avx512", "avx2", "scalar")
              for dtype in (torch.float32, torch.bfloat16, torch.float16)] + [("best", torch.bfloat16)]


@pytest.mark.parametrize("isa,dtype", ISA_DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_bsr_simd_paths(isa, dtype, block, monkeypatch):
    _set_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(hash((isa, block)) % 10_000)
    bn, bk = block
    rows, cols = max(2, 96 // max(bn, 8)), max(2, 80 // max(bk, 8))
    n, k = rows * bn, cols * bk
    rtol, atol = TOL[dtype]
    for density in (0.0, 0.45, 1.0):
        w = _weight(rows, cols, block, density, dtype, gen)
        dense = w.to_dense().double()
        for m in (1, 3, 9, 26, 61):
            x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
            dy = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
            bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
            for b in (None, bias):
                y = torch.ops.sparsekit.bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, n)
                ref = x.double() @ dense.t() + (0 if b is None else b.double())
                torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
            dx = torch.ops.sparsekit.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, k)
            torch.testing.assert_close(dx.double(), dy.double() @ dense, rtol=rtol, atol=atol)
            # dW on the stored blocks: M is the contraction, the block's columns the vectors
            dw = torch.ops.sparsekit.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, bn, bk)
            full = dy.double().t() @ x.double()
            ref_blocks = full.reshape(rows, bn, cols, bk).transpose(1, 2)[_block_rows(w), w.col_indices.long()]
            torch.testing.assert_close(dw.double(), ref_blocks, rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa,dtype", [(isa, dtype) for isa in ("avx512", "avx2", "scalar")
                                       for dtype in (torch.float32, torch.bfloat16)] + [("best", torch.bfloat16)])
# the N-vectorized path: M >= 256 with K <= 1024, or M >= 512 (smaller M take the M-panel path, tested above;
# bf16 unlowered takes AMX or the pair panels instead where the CPU has them)
@pytest.mark.parametrize("m,cols", [(260, 3), (515, 40)])
def test_bsr_n_vectorized_path(isa, dtype, m, cols, monkeypatch):
    _set_isa(monkeypatch, isa)     # (bf16 under the "avx512" ISA name: no AMX, no AVX512-BF16)
    gen = torch.Generator().manual_seed(m)
    rtol, atol = TOL[dtype]
    for block in [(16, 16), (32, 32), (32, 16)]:
        bn, bk = block
        w = _weight(4, cols, block, 0.45, dtype, gen)
        dense = w.to_dense().double()
        x = torch.randn(m, cols * bk, generator=gen, dtype=torch.float64).to(dtype)
        bias = torch.randn(4 * bn, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.ops.sparsekit.bsr_mm(x, w.crow_indices, w.col_indices, w.values, bias, 4 * bn)
        torch.testing.assert_close(y.double(), x.double() @ dense.t() + bias.double(), rtol=rtol, atol=atol)


def test_isa_variable_is_case_insensitive_and_a_typo_keeps_the_best(monkeypatch):
    """A mistyped SPARSEKIT_CPU_ISA must not drop the machine to the portable kernels without a word."""
    best = torch.ops.sparsekit.cpu_kernel_isa()
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "SCALAR")
    assert torch.ops.sparsekit.cpu_kernel_isa() == "scalar"
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx-512")       # not a name: ignored, with a (once per process) warning
    assert torch.ops.sparsekit.cpu_kernel_isa() == best


def _bf16_dot_cpu(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
    return "+bf16dot" in torch.ops.sparsekit.cpu_kernel_isa()


@pytest.mark.parametrize("block", [(2, 2), (6, 4), (16, 16), (32, 32), (64, 8), (3, 32)])
def test_bf16_pair_panels_agree_with_the_widening_kernels(block, monkeypatch):
    """On an AVX512-BF16 CPU without AMX, bfloat16 BSR products run on vdpbf16ps pair panels (csrc/cpu/bf16_dot.cpp);
    SPARSEKIT_CPU_ISA=avx512 gives the fp32-widening kernels. Both accumulate in fp32, so they agree to the
    output's bfloat16 rounding (forward and the transposed product of the backward), for M that fill 1, 2 and 4
    vectors of the panel, tails included, with empty block-rows and bias."""
    if not _bf16_dot_cpu(monkeypatch) or "amx" in torch.ops.sparsekit.cpu_kernel_isa():
        pytest.skip("needs a CPU with AVX512-BF16 and without AMX (AMX takes these shapes)")
    gen = torch.Generator().manual_seed(block[0] * 100 + block[1])
    bn, bk = block
    rows, cols = max(3, 96 // bn), max(2, 128 // bk)
    w = _weight(rows, cols, block, 0.5, torch.bfloat16, gen)
    n, k = rows * bn, cols * bk
    bias = torch.randn(n, generator=gen).bfloat16()
    for m in (9, 16, 17, 40, 100):
        x = torch.randn(m, k, generator=gen).bfloat16()
        dy = torch.randn(m, n, generator=gen).bfloat16()
        monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
        y = torch.ops.sparsekit.bsr_mm(x, w.crow_indices, w.col_indices, w.values, bias, n)
        dx = torch.ops.sparsekit.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, k)
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx512")
        y_wide = torch.ops.sparsekit.bsr_mm(x, w.crow_indices, w.col_indices, w.values, bias, n)
        dx_wide = torch.ops.sparsekit.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, k)
        torch.testing.assert_close(y.float(), y_wide.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dx.float(), dx_wide.float(), rtol=1e-2, atol=1e-2)
        ref = x.double() @ w.to_dense().double().t() + bias.double()
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


def test_kernel_isa_names_the_bf16_dot_products_only_when_unlowered(monkeypatch):
    """"+bf16dot" in cpu_kernel_isa() means bfloat16 products take vdpbf16ps; lowering the ISA switches it off."""
    has = _bf16_dot_cpu(monkeypatch)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "avx512_bf16" not in cpuinfo.read_text():
        assert not has
    for lowered in ("avx512", "avx2", "scalar"):
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", lowered)
        assert "bf16dot" not in torch.ops.sparsekit.cpu_kernel_isa()
