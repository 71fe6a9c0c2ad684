"""bfloat16 BSR on AMX tiles (csrc/cpu/amx.cpp), on CPUs that have AMX-BF16 (Sapphire Rapids and later), and on
AVX512-BF16 pair panels (csrc/cpu/bf16_dot.cpp: the same packed row pairs of x^T for convolutions, vdpbf16ps
instead of tiles) on CPUs that have those but no AMX (AMD Zen 4 / 5): the tests marked needs_fast_bf16 run on
either, against the float64 reference and the plain AVX-512 kernels.

bsr_mm (and bsr_mm_t, which runs it over the transposed blocks), bsr_sddmm (dW on the blocks, any M), bsr_mm_xt
(1x1 and strided convolutions) and bsr_conv2d (stride-1 convolutions, the im2col matrix packed straight from the
image) take the AMX path for bf16 activations and values when both block sides are multiples of 16 and M (pixels
per image for convolutions) is at least 6 (kAmxMinRows); every other case runs the SIMD kernels
(tests/test_cpu_simd.py).
Shapes cover both tile slabs (16 and 32 output columns), both k-steps (16 and 32), several k-steps per block,
partial last row tiles (M not a multiple of 32), empty block-rows, 0% and 100% density, a bias, and convolutions
with padding, dilation, strides, non-square kernels and output rows wider than one 32-column chunk.

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
needs_fast_bf16 = pytest.mark.skipif(
    not _extension.LOADED or not ("amx" in _isa() or "bf16dot" in _isa()),
    reason="this CPU has neither AMX-BF16 tiles nor AVX512-BF16: bfloat16 runs the widening AVX-512 / AVX2 kernels")


def _weight(rows, cols, block, density, gen):
    bn, bk = block
    keep = torch.rand(rows, cols, generator=gen) < density
    if 0 < density < 1 and rows > 2:
        keep[1] = False      # an empty block-row inside
        keep[-1] = False     # and the last one
    mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    w = torch.randn(rows * bn, cols * bk, generator=gen, dtype=torch.float64) * mask
    return BSR.from_dense(w.to(torch.bfloat16), block)


@needs_fast_bf16
@pytest.mark.parametrize("block", BLOCKS)
def test_amx_matches_reference_and_avx512(block, monkeypatch):
    gen = torch.Generator().manual_seed(hash(block) % 10_000)
    bn, bk = block
    rows, cols = max(3, 96 // bn), max(2, 160 // bk)
    for density in (0.0, 0.45, 1.0):
        w = _weight(rows, cols, block, density, gen)
        dense = w.to_dense().double()
        for m in (6, 9, 16, 31, 32, 33, 70):     # (6: kAmxMinRows, the fewest rows that run on AMX)
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


@needs_fast_bf16
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


@needs_fast_bf16
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


CONVS = [  # (C_in, C_out, kernel, stride, padding, dilation, H, W, batch)
    (32, 64, (1, 1), 1, 0, 1, 7, 9, 2),      # 1x1: NCHW pixels are x^T (bsr_mm_xt)
    (16, 32, (1, 1), 2, 0, 1, 11, 11, 1),    # strided 1x1: subsampled pixels
    (32, 32, (3, 3), 1, 1, 1, 14, 14, 2),    # stride 1: the implicit im2col packed from the image
    (16, 48, (3, 3), 1, 0, 1, 9, 40, 1),     # no padding; Wo = 38 > 32: two column chunks
    (16, 32, (3, 3), 1, 2, 2, 10, 7, 3),     # dilation 2
    (32, 16, (5, 5), 1, 2, 1, 6, 6, 1),      # kh*kw*C_in = 800
    (32, 32, (3, 1), 1, (1, 0), 1, 8, 5, 2),  # non-square kernel
    (16, 32, (3, 3), 2, 1, 1, 13, 13, 2),    # strided: unfold + bsr_mm_xt
]


@needs_fast_bf16
@pytest.mark.parametrize("conv", CONVS, ids=[f"{c[2][0]}x{c[2][1]}s{c[3]}p{c[4]}d{c[5]}" for c in CONVS])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 32)])
def test_amx_conv_matches_reference_and_avx512(conv, block, monkeypatch):
    import torch.nn.functional as F

    c_in, c_out, (kh, kw), stride, padding, dilation, h, w_, batch = conv
    bn, bk = block
    k = c_in * kh * kw
    if c_out % bn or k % bk:
        pytest.skip(f"block {block} does not divide the weight [{c_out}, {k}]")
    gen = torch.Generator().manual_seed(hash((conv, block)) % 10_000)
    for density in (0.0, 0.5, 1.0):
        w = _weight(c_out // bn, k // bk, block, density, gen)
        x = torch.randn(batch, c_in, h, w_, generator=gen).to(torch.bfloat16)
        bias = torch.randn(c_out, generator=gen).to(torch.bfloat16)
        monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
        y = sk.ops.sparse_conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation,
                                 kernel_size=(kh, kw), backend="cpu")
        ref = F.conv2d(x.double(), w.to_dense().double().reshape(c_out, c_in, kh, kw), bias.double(),
                       stride=stride, padding=padding, dilation=dilation)
        assert y.dtype == torch.bfloat16 and y.shape == ref.shape
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2, msg=f"density {density}")
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx512")
        y_simd = sk.ops.sparse_conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation,
                                      kernel_size=(kh, kw), backend="cpu")
        torch.testing.assert_close(y.double(), y_simd.double(), rtol=1e-2, atol=2e-2)


CONVS_3D = [  # (C_in, C_out, kernel, stride, padding, dilation, (D, H, W), batch)
    (16, 32, (3, 3, 3), 1, 1, 1, (5, 6, 7), 2),
    (32, 16, (1, 3, 3), 1, (0, 1, 1), 1, (3, 9, 9), 1),
    (16, 32, (3, 3, 3), 2, 1, 1, (7, 7, 7), 1),       # strided: phases (AMX: the direct SIMD kernel)
]


@needs_fast_bf16
@pytest.mark.parametrize("conv", CONVS_3D, ids=["3x3x3", "1x3x3", "3x3x3s2"])
def test_bf16_conv3d_matches_reference_and_avx512(conv, monkeypatch):
    import torch.nn.functional as F

    c_in, c_out, kernel, stride, padding, dilation, size, batch = conv
    k = c_in * kernel[0] * kernel[1] * kernel[2]
    gen = torch.Generator().manual_seed(len(size) + c_in)
    for density in (0.0, 0.5, 1.0):
        w = _weight(c_out // 16, k // 16, (16, 16), density, gen)
        x = torch.randn(batch, c_in, *size, generator=gen).to(torch.bfloat16)
        bias = torch.randn(c_out, generator=gen).to(torch.bfloat16)
        monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
        y = sk.ops.sparse_conv3d(x, w, bias, stride=stride, padding=padding, dilation=dilation, kernel_size=kernel,
                                 backend="cpu")
        ref = F.conv3d(x.double(), w.to_dense().double().reshape(c_out, c_in, *kernel), bias.double(),
                       stride=stride, padding=padding, dilation=dilation)
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2, msg=f"density {density}")
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx512")
        y_simd = sk.ops.sparse_conv3d(x, w, bias, stride=stride, padding=padding, dilation=dilation,
                                      kernel_size=kernel, backend="cpu")
        torch.testing.assert_close(y.double(), y_simd.double(), rtol=1e-2, atol=2e-2)


@needs_amx
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (32, 16), (16, 32), (48, 16), (64, 64)])
def test_amx_sddmm_matches_reference_and_avx512(block, monkeypatch):
    gen = torch.Generator().manual_seed(sum(block))
    bn, bk = block
    rows, cols = max(3, 96 // bn), max(2, 160 // bk)
    for density in (0.0, 0.5, 1.0):
        w = _weight(rows, cols, block, density, gen)
        stored_rows = torch.repeat_interleave(torch.arange(rows), (w.crow_indices[1:] - w.crow_indices[:-1]).long())
        for m in (1, 5, 33, 70):                  # M padded to 32 inside, with zeros
            x = torch.randn(m, cols * bk, generator=gen).to(torch.bfloat16)
            dy = torch.randn(m, rows * bn, generator=gen).to(torch.bfloat16)
            monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
            dw = torch.ops.sparsekit.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, bn, bk)
            full = dy.double().t() @ x.double()
            ref = full.reshape(rows, bn, cols, bk).transpose(1, 2)[stored_rows, w.col_indices.long()]
            torch.testing.assert_close(dw.double(), ref, rtol=1e-2, atol=2e-2)
            monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx512")
            dw_simd = torch.ops.sparsekit.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, bn, bk)
            torch.testing.assert_close(dw.double(), dw_simd.double(), rtol=1e-2, atol=2e-2)


@needs_fast_bf16
def test_a_batch_of_large_images_is_packed_in_groups():
    """Images whose packed im2col passes the packing cap (64 MiB at once) are packed a group at a time: a
    batch of three ~37 MB images runs as three groups and matches the dense conv (it used to pack the whole
    batch: ~0.9 GB for a ResNet-50 layer1 conv at batch 256)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64 * 9, generator=gen)
    w = w * (torch.rand(2, 18, generator=gen) > 0.5).repeat_interleave(32, 0).repeat_interleave(32, 1)
    x = torch.randn(3, 64, 180, 180, generator=gen).bfloat16()
    y = sk.ops.sparse_conv2d(x, BSR.from_dense(w.bfloat16(), block=(32, 32)), None, 1, 1)
    ref = F.conv2d(x.float(), w.bfloat16().float().reshape(64, 64, 3, 3), None, 1, 1)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=0.05 * float(ref.abs().max()) / 10)


@needs_amx
@pytest.mark.parametrize("sizes,kernel", [((7, 5), (2, 2)), ((3, 4, 2), (2, 2, 2))])
def test_amx_tiled_transposed_conv_matches_reference_and_avx512(sizes, kernel, monkeypatch):
    """bsr_mm_xt_tiled on AMX (y^T from the AMX kernel, then rearranged) against the float64 reference and the
    AVX-512 path, which stores through the tiling offsets."""
    import math

    gen = torch.Generator().manual_seed(len(sizes))
    taps = math.prod(kernel)
    w = _weight(3, 4, (32, 32), 0.5, gen)                     # [96 = 12 channels * taps, 128]
    xt = torch.randn(2, 128, math.prod(sizes), generator=gen).to(torch.bfloat16)
    bias = torch.randn(96, generator=gen).to(torch.bfloat16)
    args = (xt, w.crow_indices, w.col_indices, w.values, bias, 96, list(sizes), list(kernel))
    monkeypatch.delenv("SPARSEKIT_CPU_ISA", raising=False)
    y = torch.ops.sparsekit.bsr_mm_xt_tiled(*args)
    ref = sk.ops.reference.tile_taps(w.to_dense().double() @ xt.double() + bias.double()[:, None], sizes, kernel)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 96 // taps, *(s * k for s, k in zip(sizes, kernel)))
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2)
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx512")
    torch.testing.assert_close(y.double(), torch.ops.sparsekit.bsr_mm_xt_tiled(*args).double(), rtol=1e-2, atol=2e-2)
