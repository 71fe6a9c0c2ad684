"""The SIMD CSR kernels (csr_mm, csr_mm_t) and the transposed-layout ops behind CPU convolutions
(bsr_mm_xt, csr_mm_xt, their *_tiled forms for transposed convs, sparse_conv2d) under every ISA this machine can
run (SPARSEKIT_CPU_ISA lowers the choice).

Tolerances as in test_cpu_simd.py: fp32 against a float64 reference; 16-bit types accumulate in fp32.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk
import sparsekit.ops  # noqa: F401
from sparsekit import _extension
from sparsekit.formats import BSR, CSR

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"sparsekit._C not loaded: {_extension.LOAD_ERROR}")

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 2e-3),
       torch.float64: (1e-10, 1e-10)}
ISAS = ["avx512", "avx2", "scalar"]


def _csr(n, k, density, dtype, gen, index_dtype=None):
    d = torch.randn(n, k, generator=gen, dtype=torch.float64) * (torch.rand(n, k, generator=gen) < density)
    if 0 < density < 1 and n > 3:
        d[1] = 0
        d[-1] = 0
    w = CSR.from_dense(d.to(dtype))
    if index_dtype is not None:
        w = CSR(values=w.values, crow_indices=w.crow_indices, col_indices=w.col_indices.to(index_dtype),
                shape=w.shape)
    return w


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_csr_simd_paths(isa, dtype, index_dtype, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(7)
    rtol, atol = TOL[dtype]
    for n, k in ((37, 53), (200, 130)):
        for density in (0.0, 0.3, 1.0):
            w = _csr(n, k, density, dtype, gen, index_dtype)
            dense = w.to_dense().double()
            for m in (0, 1, 2, 3, 4, 8, 9, 17, 70):   # (2-8: the panel path since M = 1 alone takes the dot)
                x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
                bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for b in (None, bias):
                    y = torch.ops.sparsekit.csr_mm(x, w.crow_indices, w.col_indices, w.values, b, n)
                    ref = x.double() @ dense.t() + (0 if b is None else b.double())
                    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
                dy = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
                dx = torch.ops.sparsekit.csr_mm_t(dy, w.crow_indices, w.col_indices, w.values, k)
                torch.testing.assert_close(dx.double(), dy.double() @ dense, rtol=rtol, atol=atol)
                dw = torch.ops.sparsekit.csr_sddmm(dy, x, w.crow_indices, w.col_indices)   # dW on the pattern
                rows = torch.repeat_interleave(torch.arange(n), (w.crow_indices[1:] - w.crow_indices[:-1]).long())
                ref = (dy.double().t() @ x.double())[rows, w.col_indices.long()]
                torch.testing.assert_close(dw.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_mm_xt_matches_reference(isa, dtype, fmt, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(11)
    rtol, atol = TOL[dtype]
    for block in ((32, 32), (16, 8), (1, 4), (3, 5)):
        bn, bk = block
        n, k = 4 * bn, 5 * bk
        for density in (0.0, 0.4, 1.0):
            keep = torch.rand(n // bn, k // bk, generator=gen) < density
            mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
            d = (torch.randn(n, k, generator=gen, dtype=torch.float64) * mask).to(dtype)
            w = BSR.from_dense(d, block) if fmt == "bsr" else CSR.from_dense(d)
            for b_, m in ((1, 1), (2, 7), (3, 40), (0, 5), (2, 0)):
                xt = torch.randn(b_, k, m, generator=gen, dtype=torch.float64).to(dtype)
                bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for bb in (None, bias):
                    y = getattr(torch.ops.sparsekit, f"{fmt}_mm_xt")(xt, w.crow_indices, w.col_indices, w.values, bb, n)
                    ref = d.double() @ xt.double() + (0 if bb is None else bb.double()[:, None])
                    assert y.shape == (b_, n, m)
                    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
            if fmt == "csr":
                break  # CSR has no block shape


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_mm_xt_gradcheck_and_opcheck(fmt):
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(8, 12, generator=gen, dtype=torch.float64) * (torch.rand(8, 12, generator=gen) < 0.5)
    w = BSR.from_dense(d, (4, 4)) if fmt == "bsr" else CSR.from_dense(d)
    op = getattr(torch.ops.sparsekit, f"{fmt}_mm_xt")
    xt = torch.randn(2, 12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_(True)
    bias = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, vv, bb: op(a, w.crow_indices, w.col_indices, vv, bb, 8), (xt, v, bias))
    torch.library.opcheck(op, (xt.detach().float(), w.crow_indices, w.col_indices, w.values.float(), None, 8))


def _tiled_reference(d, xt, bias, sizes, kernel):
    """torch's conv_transpose*d with stride = kernel, the weight [n = C_out * taps, C_in] as its own
    [C_in, C_out, *kernel]: the transposed conv the tiled ops compute."""
    nd, c_in = len(sizes), d.shape[1]
    w = d.double().reshape(-1, *kernel, c_in).movedim(-1, 0)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = conv(xt.double().reshape(xt.shape[0], c_in, *sizes), w, None, kernel)
    if bias is not None:    # one bias per row (c, *tap) of W, as *_mm_xt takes it
        y = y + sk.ops.reference.tile_taps(bias.double()[None, :, None].expand(xt.shape[0], -1, xt.shape[2]),
                                           sizes, kernel)
    return y


TILED_CASES = [  # (sizes, kernel): 1-D to 3-D, odd sizes, rectangular kernels, a 1-tap kernel
    ((7,), (3,)), ((5, 3), (2, 2)), ((4, 9), (3, 1)), ((1, 1), (2, 2)), ((3, 2, 5), (2, 1, 2)), ((6, 5), (1, 1)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_mm_xt_tiled_matches_conv_transpose(isa, dtype, fmt, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(13)
    rtol, atol = TOL[dtype]
    op = getattr(torch.ops.sparsekit, f"{fmt}_mm_xt_tiled")
    for sizes, kernel in TILED_CASES:
        taps = math.prod(kernel)
        block = (taps * 2, 4)              # rows of a block span several channels' taps
        n, k = 3 * block[0], 3 * block[1]
        for density in (0.0, 0.5, 1.0):
            keep = torch.rand(n // block[0], k // block[1], generator=gen) < density
            if 0 < density < 1:
                keep[1] = False            # an empty block-row
            mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
            d = (torch.randn(n, k, generator=gen, dtype=torch.float64) * mask).to(dtype)
            w = BSR.from_dense(d, block) if fmt == "bsr" else CSR.from_dense(d)
            for b_ in (0, 1, 3):
                xt = torch.randn(b_, k, math.prod(sizes), generator=gen, dtype=torch.float64).to(dtype)
                bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for bb in (None, bias):
                    y = op(xt, w.crow_indices, w.col_indices, w.values, bb, n, list(sizes), list(kernel))
                    assert y.shape == (b_, n // taps, *(s * t for s, t in zip(sizes, kernel)))
                    ref = _tiled_reference(d, xt, bb, sizes, kernel)
                    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol,
                                               msg=f"{sizes} {kernel} {density} {b_} bias={bb is not None}")


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_mm_xt_tiled_gradcheck_opcheck_and_errors(fmt):
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(8, 12, generator=gen, dtype=torch.float64) * (torch.rand(8, 12, generator=gen) < 0.5)
    w = BSR.from_dense(d, (4, 4)) if fmt == "bsr" else CSR.from_dense(d)
    op = getattr(torch.ops.sparsekit, f"{fmt}_mm_xt_tiled")
    xt = torch.randn(2, 12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_(True)
    bias = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, vv, bb: op(a, w.crow_indices, w.col_indices, vv, bb, 8, [2, 3], [2, 2]),
                             (xt, v, bias))
    for args in ((xt.detach().float(), w.crow_indices, w.col_indices, w.values.float(), None, 8, [3, 2], [2, 2]),
                 (xt.detach().float(), w.crow_indices, w.col_indices, w.values.float(), bias.detach().float(), 8,
                  [6], [4])):
        torch.library.opcheck(op, args)
    x32, v32 = xt.detach().float(), w.values.float()
    with pytest.raises(RuntimeError, match=r"xt.size\(2\) \(M=6\) must be the product of sizes"):
        op(x32, w.crow_indices, w.col_indices, v32, None, 8, [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match=r"n \(8\) must be a multiple of the kernel's taps"):
        op(x32, w.crow_indices, w.col_indices, v32, None, 8, [6], [3])
    with pytest.raises(RuntimeError, match="kernel must be >= 1"):
        op(x32, w.crow_indices, w.col_indices, v32, None, 8, [6], [0])
    with pytest.raises(RuntimeError, match="sizes and kernel must both have 1 to 3 entries"):
        op(x32, w.crow_indices, w.col_indices, v32, None, 8, [2, 3], [2])


CONV_CASES = [  # (c_in, c_out, hw, kernel, stride, padding, dilation, groups)
    (8, 16, 9, 3, 1, 1, 1, 1),
    (8, 16, 10, 3, 2, 0, 1, 1),
    (8, 16, 11, 3, 1, 2, 2, 1),
    (8, 16, 9, 3, 1, 1, 1, 2),
    (16, 32, 7, 1, 1, 0, 1, 1),
    (16, 32, 8, 1, 2, 0, 1, 1),
    (4, 8, 6, (1, 3), 1, (0, 1), 1, 1),
]


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_sparse_conv2d_cpu_matches_conv2d(isa, fmt, case, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    c_in, c_out, hw, kernel, stride, padding, dilation, groups = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(c_out, c_in // groups, kh, kw, generator=gen)
    flat = weight.reshape(c_out, -1)
    flat = flat * (torch.rand(flat.shape, generator=gen) < 0.4)
    w = BSR.from_dense(flat, (4, 1)) if fmt == "bsr" else CSR.from_dense(flat)
    dense_w = w.to_dense().reshape(weight.shape)
    x = torch.randn(3, c_in, hw, hw, generator=gen, requires_grad=True)
    bias = torch.randn(c_out, generator=gen, requires_grad=True)
    values = w.values.detach().requires_grad_(True)
    wv = type(w)(values=values, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    y = sk.ops.sparse_conv2d(x, wv, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             kernel_size=(kh, kw))
    ref = F.conv2d(x, dense_w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn(ref.shape, generator=gen)
    gx, gb, gv = torch.autograd.grad(y, (x, bias, values), g)
    dw_ref = dense_w.clone().requires_grad_(True)
    ref = F.conv2d(x, dw_ref, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    rx, rb, rw = torch.autograd.grad(ref, (x, bias, dw_ref), g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)
    rw = rw.reshape(c_out, -1)
    expect = rw[w.to_dense() != 0] if fmt == "csr" else None
    if fmt == "csr":
        torch.testing.assert_close(gv[w.values != 0], expect, rtol=1e-4, atol=1e-4)
    else:
        dense_gv = BSR(values=gv, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape).to_dense()
        mask = BSR(values=torch.ones_like(gv), crow_indices=w.crow_indices, col_indices=w.col_indices,
                   shape=w.shape).to_dense() != 0
        torch.testing.assert_close(dense_gv[mask], rw[mask], rtol=1e-4, atol=1e-4)


def test_sparse_conv2d_cpu_takes_the_cpu_ops():
    from sparsekit.ops import conv

    x = torch.randn(1, 4, 5, 5)
    w = BSR.from_dense(torch.randn(8, 4 * 9), (4, 4))
    assert conv._cpu_family(x, w, None, 2) == "bsr"
    assert conv._cpu_family(x, CSR.from_dense(torch.randn(8, 36)), None, 2) == "csr"
    assert conv._cpu_family(x, w, "reference", 2) is None
    assert conv._cpu_family(x.double(), w, None, 2) is None  # dtype mismatch: the generic path raises


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv2d_op_matches_reference(isa, dtype, fmt, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(13)
    rtol, atol = TOL[dtype]
    for c, n, hw, ks, pad, dil, block, st in ((8, 16, 9, (3, 3), (1, 1), (1, 1), (8, 8), (1, 1)),
                                             (8, 16, 9, (3, 3), (1, 1), (1, 1), (8, 8), (2, 2)),
                                             (4, 6, (7, 10), (3, 2), (0, 2), (2, 1), (2, 4), (1, 1)),
                                             (4, 6, (7, 10), (3, 2), (0, 2), (2, 1), (2, 4), (2, 3)),
                                             (3, 5, 1, (1, 1), (2, 1), (1, 1), (1, 3), (3, 1)),
                                             (4, 8, (1, 23), (1, 3), (0, 1), (1, 2), (4, 4), (1, 2)),
                                             (16, 32, 14, (3, 3), (1, 1), (1, 1), (32, 16), (1, 1)),
                                             (16, 32, (15, 9), (3, 3), (1, 1), (1, 1), (32, 16), (2, 2))):
        h, w_ = (hw, hw) if isinstance(hw, int) else hw
        k = c * ks[0] * ks[1]
        for density in (0.0, 0.4, 1.0):
            bn, bk = block
            keep = torch.rand(n // bn, k // bk, generator=gen) < density
            mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
            d = (torch.randn(n, k, generator=gen, dtype=torch.float64) * mask).to(dtype)
            w = BSR.from_dense(d, block) if fmt == "bsr" else CSR.from_dense(d)
            for b_ in (0, 1, 3):
                x = torch.randn(b_, c, h, w_, generator=gen, dtype=torch.float64).to(dtype)
                bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for bb in (None, bias):
                    y = getattr(torch.ops.sparsekit, f"{fmt}_conv2d")(x, w.crow_indices, w.col_indices, w.values, bb,
                                                                      list(ks), list(pad), list(dil), list(st))
                    ref = F.conv2d(x.double(), d.double().reshape(n, c, *ks), None if bb is None else bb.double(),
                                   stride=st, padding=pad, dilation=dil)
                    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv2d_op_gradcheck_and_opcheck(fmt):
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(4, 18, generator=gen, dtype=torch.float64) * (torch.rand(4, 18, generator=gen) < 0.5)
    w = BSR.from_dense(d, (2, 3)) if fmt == "bsr" else CSR.from_dense(d)
    op = getattr(torch.ops.sparsekit, f"{fmt}_conv2d")
    x = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_(True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    for stride in ([1, 1], [2, 3]):   # the default stride, which the dispatcher drops before autograd, and not
        torch.autograd.gradcheck(
            lambda a, vv, bb, st=stride: op(a, w.crow_indices, w.col_indices, vv, bb, [3, 3], [1, 0], [1, 1], st),
            (x, v, bias))
        torch.library.opcheck(op, (x.detach().float(), w.crow_indices, w.col_indices, w.values.float(), None, [3, 3],
                                   [1, 0], [1, 1], stride))
    torch.autograd.gradcheck(lambda a, vv: op(a, w.crow_indices, w.col_indices, vv, None, [3, 3], [1, 0], [1, 1]),
                             (x, v))


def test_mm_xt_tiled_refuses_sizes_whose_output_overflows():
    """A kernel whose products wrap int64 must be refused, not turned into wild output offsets."""
    xt = torch.randn(1, 4, 3)
    w = BSR.from_dense(torch.ones(4, 4), (4, 4))
    for sizes, kernel in (([1, 1], [2**32, 2**32]), ([1, 3], [3, 6148914691236517206])):
        with pytest.raises(RuntimeError, match="more elements than int64 holds"):
            torch.ops.sparsekit.bsr_mm_xt_tiled(xt[..., :1] if sizes == [1, 1] else xt, w.crow_indices,
                                                w.col_indices, w.values, None, 4, sizes, kernel)


def test_csr_conv_checks_the_pattern_of_an_empty_batch_too():
    x = torch.randn(0, 2, 5, 5)
    crow = torch.tensor([0, 3, 1], dtype=torch.int32)          # not monotone
    col = torch.tensor([99, -5, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="crow_indices|col_indices"):
        torch.ops.sparsekit.csr_conv2d(x, crow, col, torch.randn(3), None, [3, 3], [1, 1], [1, 1])


def test_duplicate_entries_count_twice_in_every_kernel_and_the_reference():
    """A column (or block) stored twice in a row is summed, by the kernels and by to_dense / the reference."""
    x = torch.randn(3, 8, dtype=torch.float64)
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([1, 1, 4], dtype=torch.int32)
    values = torch.tensor([2.0, 3.0, 7.0], dtype=torch.float64)
    csr = CSR(values=values, crow_indices=crow, col_indices=col, shape=(2, 8))
    dense = csr.to_dense()
    assert dense[0, 1] == 5.0
    torch.testing.assert_close(torch.ops.sparsekit.csr_mm(x, crow, col, values, None, 2), x @ dense.t())
    bvals = torch.randn(2, 2, 4, dtype=torch.float64)
    bsr = BSR(values=bvals, crow_indices=torch.tensor([0, 2], dtype=torch.int32),
              col_indices=torch.tensor([1, 1], dtype=torch.int32), shape=(2, 8))
    torch.testing.assert_close(bsr.to_dense()[:, 4:], bvals[0] + bvals[1])
    torch.testing.assert_close(torch.ops.sparsekit.bsr_mm(x, bsr.crow_indices, bsr.col_indices, bvals, None, 2),
                               x @ bsr.to_dense().t())
