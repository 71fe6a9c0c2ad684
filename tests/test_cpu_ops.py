"""The C++ CPU kernels (csrc/cpu) against the pure-PyTorch reference (sparsekit.ops.reference), op by op.

Tolerances: float32 rtol=1e-5/atol=1e-4 and float64 1e-10 against the reference in the same dtype. 16-bit
dtypes are compared with the reference evaluated in float64 on the same (already rounded) inputs; the kernels
accumulate in fp32 and round once, so the error is about one output ulp: bfloat16 rtol=atol=1e-2 (8-bit
mantissa), float16 rtol=atol=2e-3 (11-bit mantissa).
"""

import pytest
import torch

import sparsekit.ops  # noqa: F401  (sets up the sparsekit library and loads the C++ kernels)
from sparsekit import _extension
from sparsekit.formats import BSR, CSR, NM
from sparsekit.ops import reference

# Skipped only when the extension was not built at all (SPARSEKIT_BUILD_EXT=0); one that was built but fails
# to load makes every test here fail instead of quietly comparing the reference with itself.
_NOT_BUILT = not _extension.LOADED and "No module named" in (_extension.LOAD_ERROR or "")
pytestmark = pytest.mark.skipif(_NOT_BUILT, reason=f"sparsekit._C not built: {_extension.LOAD_ERROR}")

OPS = ["bsr_mm", "bsr_mm_t", "bsr_sddmm", "csr_mm", "csr_mm_t", "csr_sddmm", "nm_mm", "nm_mm_t", "nm_sddmm"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (1e-2, 1e-2),
       torch.float16: (2e-3, 2e-3)}
MS = [0, 1, 7, 33]
DENSITIES = [0.0, 0.4, 1.0]  # 100%, partial (with forced empty rows / block-rows), 0% sparsity


def _op(name):
    return getattr(torch.ops.sparsekit, name)


def _check(name, args, dtype, scale=1.0):
    """Run the C++ op and the reference on the same args; 16-bit against the reference in float64. ``scale``
    widens the tolerance for long reductions (fp32 rounding grows with the length summed)."""
    out = _op(name)(*args)
    assert out.dtype == dtype
    if dtype in (torch.bfloat16, torch.float16):
        args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    expected = reference.REFERENCES[name](*args)
    rtol, atol = (t * scale for t in TOL[dtype])
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _mask(rows, cols, density, gen):
    keep = torch.rand(rows, cols, generator=gen) < density
    if 0 < density < 1 and rows > 2:
        keep[1] = False  # an empty row / block-row in the middle
        keep[-1] = False
    return keep


# -------------------------------------------------------------------------------------------- registered
@pytest.mark.parametrize("name", OPS)
def test_cpu_kernel_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekit::{name}", "CPU"), _extension.LOAD_ERROR


# -------------------------------------------------------------------------------------------------- BSR
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(1, 4), (4, 1), (16, 16), (32, 32), (16, 32), (1, 1), (16, 1)])
def test_bsr_ops(block, dtype):
    gen = torch.Generator().manual_seed(hash(block) % 1000)
    bn, bk = block
    rows, cols = (5, 7) if bn * bk < 64 else (4, 3)
    n, k = rows * bn, cols * bk
    for density in DENSITIES:
        keep = _mask(rows, cols, density, gen).repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        w = BSR.from_dense(_randn(n, k, dtype=dtype, gen=gen) * keep, block)
        crow, col, values = w.crow_indices, w.col_indices, w.values
        assert density > 0 or w.nnzb == 0
        for m in MS:
            x, dy = _randn(m, k, dtype=dtype, gen=gen), _randn(m, n, dtype=dtype, gen=gen)
            for bias in (None, _randn(n, dtype=dtype, gen=gen)):
                _check("bsr_mm", (x, crow, col, values, bias, n), dtype)
            _check("bsr_mm_t", (dy, crow, col, values, k), dtype)
            _check("bsr_sddmm", (dy, x, crow, col, bn, bk), dtype)


def test_bsr_full_size_block():
    gen = torch.Generator().manual_seed(1)
    w = BSR.from_dense(_randn(256, 128, dtype=torch.float32, gen=gen), (128, 128))
    x, dy = _randn(9, 128, dtype=torch.float32, gen=gen), _randn(9, 256, dtype=torch.float32, gen=gen)
    _check("bsr_mm", (x, w.crow_indices, w.col_indices, w.values, None, 256), torch.float32)
    _check("bsr_mm_t", (dy, w.crow_indices, w.col_indices, w.values, 128), torch.float32)
    _check("bsr_sddmm", (dy, x, w.crow_indices, w.col_indices, 128, 128), torch.float32)


# -------------------------------------------------------------------------------------------------- CSR
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_csr_ops(dtype, col_dtype):
    gen = torch.Generator().manual_seed(2)
    n, k = 37, 53
    for density in DENSITIES:
        w = CSR.from_dense(_randn(n, k, dtype=dtype, gen=gen) * _mask(n, k, density, gen))
        crow, col, values = w.crow_indices, w.col_indices.to(col_dtype), w.values
        for m in MS:
            x, dy = _randn(m, k, dtype=dtype, gen=gen), _randn(m, n, dtype=dtype, gen=gen)
            for bias in (None, _randn(n, dtype=dtype, gen=gen)):
                _check("csr_mm", (x, crow, col, values, bias, n), dtype)
            _check("csr_mm_t", (dy, crow, col, values, k), dtype)
            _check("csr_sddmm", (dy, x, crow, col), dtype)


# --------------------------------------------------------------------------------------------------- NM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_nm_ops(nm, dtype):
    gen = torch.Generator().manual_seed(3)
    n_keep, m_group = nm
    rows, k = 19, m_group * 7
    for density in DENSITIES:
        dense = NM.prune(_randn(rows, k, dtype=torch.float64, gen=gen), n_keep, m_group)
        dense = (dense * _mask(rows, k, density, gen) if density < 1 else dense).to(dtype)
        w = NM.from_dense(dense, n_keep, m_group)
        for m in MS:
            x, dy = _randn(m, k, dtype=dtype, gen=gen), _randn(m, rows, dtype=dtype, gen=gen)
            for bias in (None, _randn(rows, dtype=dtype, gen=gen)):
                _check("nm_mm", (x, w.values, w.indices, bias, n_keep, m_group), dtype)
            _check("nm_mm_t", (dy, w.values, w.indices, n_keep, m_group), dtype)
            _check("nm_sddmm", (dy, x, w.indices, n_keep, m_group), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_wide_k_and_unordered_positions(dtype):
    """fp32/bf16/fp16 n:m runs as CSR (int32 columns once K > 32767); positions inside a group in any order."""
    gen = torch.Generator().manual_seed(5)
    rows, k = 5, 4 * 8200                                  # K = 32800 > int16 range
    w = NM.from_dense(NM.prune(_randn(rows, k, dtype=torch.float64, gen=gen), 2, 4).to(dtype), 2, 4)
    x, dy = _randn(9, k, dtype=dtype, gen=gen), _randn(9, rows, dtype=dtype, gen=gen)
    _check("nm_mm", (x, w.values, w.indices, None, 2, 4), dtype, scale=10)  # sums of 16400 products
    _check("nm_mm_t", (dy, w.values, w.indices, 2, 4), dtype)
    # the same weight with each group's two values stored in the opposite order
    vals = w.values.reshape(rows, -1, 2).flip(-1).reshape(rows, -1).contiguous()
    idx = w.indices.reshape(rows, -1, 2).flip(-1).reshape(rows, -1).contiguous()
    x = x[:, :64].contiguous()
    vals, idx = vals[:, :32].contiguous(), idx[:, :32].contiguous()
    _check("nm_mm", (x, vals, idx, None, 2, 4), dtype)
    _check("nm_mm_t", (dy, vals, idx, 2, 4), dtype)


# ----------------------------------------------------------------------------------- parallel splitting
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_large_enough_to_split_across_threads(dtype):
    """Enough work per op that at::parallel_for splits it into several chunks (task boundaries, tails)."""
    gen = torch.Generator().manual_seed(6)
    n, k = 256, 320
    dense = _randn(n, k, dtype=torch.float64, gen=gen)
    bsr = BSR.from_dense((dense * _mask(16, 20, 0.5, gen).repeat_interleave(16, 0).repeat_interleave(16, 1))
                         .to(dtype), (16, 16))
    csr = CSR.from_dense((dense * _mask(n, k, 0.3, gen)).to(dtype))
    nm = NM.from_dense(NM.prune(dense, 2, 4).to(dtype), 2, 4)
    bias = _randn(n, dtype=dtype, gen=gen)
    for m in (5, 45):  # 45: three M tiles of 16 with a tail; 5: the small-M paths
        x, dy = _randn(m, k, dtype=dtype, gen=gen), _randn(m, n, dtype=dtype, gen=gen)
        _check("bsr_mm", (x, bsr.crow_indices, bsr.col_indices, bsr.values, bias, n), dtype)
        _check("bsr_mm_t", (dy, bsr.crow_indices, bsr.col_indices, bsr.values, k), dtype)
        _check("bsr_sddmm", (dy, x, bsr.crow_indices, bsr.col_indices, 16, 16), dtype)
        _check("csr_mm", (x, csr.crow_indices, csr.col_indices, csr.values, bias, n), dtype)
        _check("csr_mm_t", (dy, csr.crow_indices, csr.col_indices, csr.values, k), dtype)
        _check("csr_sddmm", (dy, x, csr.crow_indices, csr.col_indices), dtype)
        _check("nm_mm", (x, nm.values, nm.indices, bias, 2, 4), dtype)
        _check("nm_mm_t", (dy, nm.values, nm.indices, 2, 4), dtype)
        _check("nm_sddmm", (dy, x, nm.indices, 2, 4), dtype)


# ------------------------------------------------------------------------------------------ layout/misc
def test_non_contiguous_activations():
    gen = torch.Generator().manual_seed(4)
    w = BSR.from_dense(_randn(32, 48, dtype=torch.float32, gen=gen), (16, 16))
    x = _randn(48, 5, dtype=torch.float32, gen=gen).t()  # [5, 48], not contiguous
    dy = _randn(32, 5, dtype=torch.float32, gen=gen).t()
    assert not x.is_contiguous()
    _check("bsr_mm", (x, w.crow_indices, w.col_indices, w.values, None, 32), torch.float32)
    _check("bsr_mm_t", (dy, w.crow_indices, w.col_indices, w.values, 48), torch.float32)
    _check("bsr_sddmm", (dy, x, w.crow_indices, w.col_indices, 16, 16), torch.float32)
    c = CSR.from_dense(_randn(32, 48, dtype=torch.float32, gen=gen))
    _check("csr_sddmm", (dy, x, c.crow_indices, c.col_indices), torch.float32)


@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_opcheck_backward_ops(family):
    """The *_mm_t and *_sddmm kernels agree with their fakes (tests/test_ops.py opchecks the *_mm ops)."""
    gen = torch.Generator().manual_seed(7)
    dense = _randn(32, 48, dtype=torch.float32, gen=gen)
    x, dy = _randn(5, 48, dtype=torch.float32, gen=gen), _randn(5, 32, dtype=torch.float32, gen=gen)
    if family == "bsr":
        w = BSR.from_dense(dense * _mask(2, 3, 0.5, gen).repeat_interleave(16, 0).repeat_interleave(16, 1), (16, 16))
        calls = [("bsr_mm_t", (dy, w.crow_indices, w.col_indices, w.values, 48)),
                 ("bsr_sddmm", (dy, x, w.crow_indices, w.col_indices, 16, 16))]
    elif family == "csr":
        w = CSR.from_dense(dense * _mask(32, 48, 0.3, gen))
        calls = [("csr_mm_t", (dy, w.crow_indices, w.col_indices, w.values, 48)),
                 ("csr_sddmm", (dy, x, w.crow_indices, w.col_indices))]
    else:
        w = NM.from_dense(NM.prune(dense, 2, 4), 2, 4)
        calls = [("nm_mm_t", (dy, w.values, w.indices, 2, 4)), ("nm_sddmm", (dy, x, w.indices, 2, 4))]
    for name, args in calls:
        torch.library.opcheck(_op(name).default, args)


@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_gradcheck_through_cpu_kernels(family):
    """The registered autograd formulas (mm_t for dx, sddmm for dvalues) on the CPU kernels, in float64."""
    gen = torch.Generator().manual_seed(5)
    dense = _randn(8, 12, dtype=torch.float64, gen=gen)
    x = _randn(3, 12, dtype=torch.float64, gen=gen).requires_grad_()
    bias = _randn(8, dtype=torch.float64, gen=gen).requires_grad_()
    if family == "bsr":
        w = BSR.from_dense(dense * _mask(2, 3, 0.5, gen).repeat_interleave(4, 0).repeat_interleave(4, 1), (4, 4))
        fn = lambda x, v, b: _op("bsr_mm")(x, w.crow_indices, w.col_indices, v, b, 8)
    elif family == "csr":
        w = CSR.from_dense(dense * _mask(8, 12, 0.5, gen))
        fn = lambda x, v, b: _op("csr_mm")(x, w.crow_indices, w.col_indices, v, b, 8)
    else:
        w = NM.from_dense(NM.prune(dense, 2, 4), 2, 4)
        fn = lambda x, v, b: _op("nm_mm")(x, v, w.indices, b, 2, 4)
    assert torch.autograd.gradcheck(fn, (x, w.values.clone().requires_grad_(), bias))


# ------------------------------------------------------------------------------------------------ errors
def _bsr_args():
    w = BSR.from_dense(torch.randn(32, 48), (16, 16))
    return torch.randn(4, 48), w.crow_indices, w.col_indices, w.values


@pytest.mark.parametrize("case,match", [
    ("x_1d", r"x must be 2-D"),
    ("values_dtype", r"values must have the dtype of x \(torch.float32\), got torch.float64"),
    ("crow_int64", r"crow_indices must have dtype torch.int32, got torch.int64"),
    ("col_int16", r"col_indices must have dtype torch.int32, got torch.int16"),
    ("x_int", r"x must be float32, float64, float16 or bfloat16, got torch.int64"),
    ("k_mismatch", r"x.size\(1\) \(K=50\) must be a multiple of block_k=16"),
    ("col_out_of_range", r"col_indices must lie in \[0, K/block_k = 2\)"),
    ("bias_size", r"bias must have n=32 entries, got 31"),
    ("values_strided", r"values must be contiguous"),
])
def test_bsr_mm_errors(case, match):
    x, crow, col, values = _bsr_args()
    bias, n = None, 32
    if case == "x_1d":
        x = x[0]
    elif case == "values_dtype":
        values = values.double()
    elif case == "crow_int64":
        crow = crow.long()
    elif case == "col_int16":
        col = col.short()
    elif case == "x_int":
        x, values = x.long(), values.long()
    elif case == "k_mismatch":
        x = torch.randn(4, 50)
    elif case == "col_out_of_range":
        x = torch.randn(4, 32)
    elif case == "bias_size":
        bias = torch.randn(31)
    elif case == "values_strided":
        values = values.transpose(1, 2)
    with pytest.raises(RuntimeError, match=match):
        _op("bsr_mm")(x, crow, col, values, bias, n)


def test_conv_ops_reject_empty_crow_indices():
    """An empty crow_indices gave bsr_conv2d N = -block_n and a read of a null pointer (a crash)."""
    e = torch.empty(0, dtype=torch.int32)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match=r"bsr_conv2d: crow_indices must have N/block_n \+ 1 >= 1 entries"):
        torch.ops.sparsekit.bsr_conv2d(x, e, e, torch.empty(0, 2, 4), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"csr_conv2d: crow_indices must have"):
        torch.ops.sparsekit.csr_conv2d(x, e, e, torch.empty(0), None, [1, 1], [0, 0], [1, 1])


def test_conv_geometry_too_large_to_address_raises():
    """A huge padding with a huge stride gives a tiny output but a padded image whose size overflowed (a write
    outside the scratch buffer): such geometry is refused by name."""
    x = torch.randn(1, 1, 2, 2)
    crow, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"csr_conv2d: kernel_size, padding, dilation and stride must be < 2\^31"):
        torch.ops.sparsekit.csr_conv2d(x, crow, col, torch.randn(1), None, [1, 1], [2**31 - 1] * 2, [1, 1], [2**32] * 2)
    with pytest.raises(RuntimeError, match="bsr_conv3d: the padded input .* is too large to address"):
        torch.ops.sparsekit.bsr_conv3d(x[None], crow, col, torch.randn(1, 1, 1), None, [1, 1, 1], [2**30] * 3,
                                       [1, 1, 1], [2**30] * 3)


def test_sddmm_row_mismatch_errors():
    x, crow, col, _ = _bsr_args()
    with pytest.raises(RuntimeError, match=r"bsr_sddmm: x and dy must have the same number of rows M"):
        _op("bsr_sddmm")(torch.randn(5, 32), x, crow, col, 16, 16)
    with pytest.raises(RuntimeError, match=r"bsr_mm_t: dy.size\(1\) \(N=30\) must be a multiple of block_n=16"):
        _op("bsr_mm_t")(torch.randn(4, 30), crow, col, _bsr_args()[3], 48)


def test_csr_errors():
    w = CSR.from_dense(torch.randn(8, 10))
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"col_indices must have dtype torch.int16 or torch.int32, got torch.int64"):
        _op("csr_mm")(x, w.crow_indices, w.col_indices.long(), w.values, None, 8)
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, K=6\)"):
        _op("csr_mm")(torch.randn(3, 6), w.crow_indices, w.col_indices, w.values, None, 8)
    with pytest.raises(RuntimeError, match=r"crow_indices must have n \+ 1 = 10 entries, got 9"):
        _op("csr_mm")(x, w.crow_indices, w.col_indices, w.values, None, 9)
    with pytest.raises(RuntimeError, match=r"csr_mm_t: values must have the dtype of dy \(torch.float32\), got"):
        _op("csr_mm_t")(torch.randn(3, 8), w.crow_indices, w.col_indices, w.values.half(), 10)


def test_nm_errors():
    w = NM.from_dense(NM.prune(torch.randn(6, 16), 2, 4), 2, 4)
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match=r"indices must have dtype torch.uint8, got torch.int32"):
        _op("nm_mm")(x, w.values, w.indices.int(), None, 2, 4)
    with pytest.raises(RuntimeError, match=r"x.size\(1\) must be K = values.size\(1\) / n \* m = 16, got 12"):
        _op("nm_mm")(torch.randn(3, 12), w.values, w.indices, None, 2, 4)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, m=4\)"):
        _op("nm_mm")(x, w.values, w.indices + 4, None, 2, 4)
    with pytest.raises(RuntimeError, match=r"nm_sddmm: dy.size\(1\) must be N = indices.size\(0\) = 6, got 5"):
        _op("nm_sddmm")(torch.randn(3, 5), x, w.indices, 2, 4)
