"""The CUDA C++ kernels (csrc/cuda) against the pure-PyTorch reference, on a GPU.

Every test here carries the `cuda` marker: the conftest skips them without a GPU. On a GPU machine, after
`pip install --no-build-isolation -e .` (which builds csrc/cuda into sparsekit._C), run `pytest -m cuda tests`.
A missing CUDA kernel there is a failure, not a skip: it means the extension was built without CUDA.

The reference runs in float64 on the same inputs; tolerances scale with the reduction length and the dtype.
Shapes cover the kernels' paths: M <= 8 (csr row-dot kernel), M > 8 (Sputnik-style tiled kernel, every
subwarp width), M <= 32 and M > 32 (the two SDDMM kernels), odd sizes, empty rows, 0% and 100% density,
int16 and int32 column indices (K > 32768), misaligned values (scalar strip loads).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_reference as _close

import sparsekit as sk
from sparsekit.formats import BSR, CSR, NM
from sparsekit.ops import reference
from sparsekit.ops._dispatch import choose
from sparsekit.ops._library import has_kernel

pytestmark = pytest.mark.cuda

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OPS = ["bsr_mm", "bsr_mm_t", "bsr_sddmm", "csr_mm", "csr_mm_t", "csr_sddmm", "nm_mm", "nm_mm_t", "nm_sddmm"]


def _op(name):
    if not has_kernel(name, "CUDA"):
        pytest.fail(f"sparsekit._C has no CUDA kernel for {name}: build on a CUDA machine "
                    "(pip install --no-build-isolation -e .) or with FORCE_CUDA=1")
    return getattr(torch.ops.sparsekit, name)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)


def _shifted(t):
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    buf[1:] = t
    return buf[1:]


def _csr(n, k, density, dtype, seed=0, empty_rows=(), col_dtype=None, misalign=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * (torch.rand(n, k, generator=g) < density)
    for r in empty_rows:
        if r < n:
            w[r] = 0
    w = w.to(dtype)
    c = CSR.from_dense(w).to(DEV)
    col = c.col_indices if col_dtype is None else c.col_indices.to(col_dtype)
    values = c.values
    if misalign:  # contiguous views one element into their storage: the kernels' scalar (unaligned) path
        values, col = _shifted(values), _shifted(col)
    return CSR(values=values, crow_indices=c.crow_indices, col_indices=col, shape=c.shape)


# the specialised paths (tensor-core BSR, skinny CSR, 2:4 on sparse tensor cores) take these calls once their
# probes pass; "generic" turns them off so the generic kernels are compared with the reference too
_SWITCHES = ("SPARSEKIT_BSR_TC", "SPARSEKIT_CSR_SKINNY", "SPARSEKIT_NM_SP")


@pytest.fixture(params=["default", "generic"])
def kernel_paths(request, monkeypatch):
    if request.param == "generic":
        for switch in _SWITCHES:
            monkeypatch.setenv(switch, "0")
    return request.param


# ------------------------------------------------------------------------------------------------- CSR
CSR_CASES = [  # (M, N, K, density)
    (1, 37, 45, 0.3), (5, 70, 33, 0.5), (8, 128, 256, 0.1), (9, 37, 45, 0.3), (13, 50, 61, 0.2),
    (31, 64, 100, 1.0), (40, 20, 30, 0.0), (64, 300, 200, 0.02), (100, 9, 140, 0.7), (257, 129, 513, 0.15),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CSR_CASES)
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_csr_ops_match_reference(case, dtype, col_dtype, kernel_paths):
    M, N, K, density = case
    w = _csr(N, K, density, dtype, seed=M, empty_rows=(0, N // 2), col_dtype=col_dtype)
    x, dy, bias = _rand(M, K, seed=1, dtype=dtype), _rand(M, N, seed=2, dtype=dtype), _rand(N, seed=3, dtype=dtype)
    args64 = (w.crow_indices, w.col_indices, w.values.double())
    y = _op("csr_mm")(x, w.crow_indices, w.col_indices, w.values, bias, N)
    _close(y, reference.csr_mm(x.double(), *args64, bias.double(), N), dtype, K)
    y0 = _op("csr_mm")(x, w.crow_indices, w.col_indices, w.values, None, N)
    _close(y0, reference.csr_mm(x.double(), *args64, None, N), dtype, K)
    dx = _op("csr_mm_t")(dy, w.crow_indices, w.col_indices, w.values, K)
    _close(dx, reference.csr_mm_t(dy.double(), *args64, K), dtype, N)
    dv = _op("csr_sddmm")(dy, x, w.crow_indices, w.col_indices)
    _close(dv, reference.csr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices), dtype, M)


@pytest.mark.parametrize("m", [3, 20, 70])
def test_csr_int32_columns_beyond_int16(m):
    N, K = 24, 40000
    w = _csr(N, K, 0.01, torch.float32, seed=m)
    assert w.col_indices.dtype == torch.int32
    x, dy = _rand(m, K, seed=4), _rand(m, N, seed=5)
    args64 = (w.crow_indices, w.col_indices, w.values.double())
    _close(_op("csr_mm")(x, w.crow_indices, w.col_indices, w.values, None, N),
           reference.csr_mm(x.double(), *args64, None, N), torch.float32, K)
    _close(_op("csr_mm_t")(dy, w.crow_indices, w.col_indices, w.values, K),
           reference.csr_mm_t(dy.double(), *args64, K), torch.float32, N)
    _close(_op("csr_sddmm")(dy, x, w.crow_indices, w.col_indices),
           reference.csr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices), torch.float32, m)


@pytest.mark.parametrize("col_dtype", [None, torch.int16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [4, 17, 50])
def test_csr_misaligned_values(monkeypatch, m, dtype, col_dtype):
    monkeypatch.setenv("SPARSEKIT_CSR_SKINNY", "0")   # the tiled kernel's scalar strips (skinny M loads no vectors)
    N, K = 77, 91
    w = _csr(N, K, 0.4, dtype, seed=m, col_dtype=col_dtype, misalign=True)
    x = _rand(m, K, seed=6, dtype=dtype)
    y = _op("csr_mm")(x, w.crow_indices, w.col_indices, w.values, None, N)
    _close(y, reference.csr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, N), dtype, K)


def test_csr_empty_shapes():
    w = _csr(16, 24, 0.5, torch.float32)
    assert _op("csr_mm")(_rand(0, 24), w.crow_indices, w.col_indices, w.values, None, 16).shape == (0, 16)
    assert _op("csr_mm_t")(_rand(0, 16), w.crow_indices, w.col_indices, w.values, 24).shape == (0, 24)
    dv = _op("csr_sddmm")(_rand(0, 16), _rand(0, 24), w.crow_indices, w.col_indices)
    assert dv.shape == (w.nnz,) and not dv.any()


# ------------------------------------------------------------------------- CSR kernel variants (dispatcher)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 8, 16, 64, 100])
def test_csr_mm_variant_runs_each_kernel(m, dtype):
    """sparsekit::csr_mm_variant: csr_mm on a named kernel, what the dispatcher times per shape. Each variant the
    dispatcher offers for (M, dtype, GPU) matches the reference; the others refuse with a reason."""
    from sparsekit.ops._dispatch import CSR_VARIANT_OP, csr_mm_variants

    op = _op(CSR_VARIANT_OP)
    N, K = 96, 200
    w = _csr(N, K, 0.2, dtype, seed=m)   # density 0.2: inside the skinny kernel's default window too
    x, b = _rand(m, K, seed=1, dtype=dtype), _rand(N, seed=2, dtype=dtype)
    ref = reference.csr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), b.double(), N)
    offered = csr_mm_variants(m, dtype, torch.cuda.get_device_capability())
    for variant in ("auto", "skinny", "rowdot", "tiled"):
        if variant in offered or variant == "auto":
            _close(op(x, w.crow_indices, w.col_indices, w.values, b, N, variant), ref, dtype, K)
        else:
            with pytest.raises(RuntimeError, match=f"the {variant} kernel"):
                op(x, w.crow_indices, w.col_indices, w.values, b, N, variant)
    with pytest.raises(RuntimeError, match="variant must be one of"):
        op(x, w.crow_indices, w.col_indices, w.values, b, N, "fastest")


def test_dispatcher_measures_the_csr_kernels_and_runs_the_winner():
    from sparsekit.ops import _dispatch

    if not _dispatch.measure_enabled("cuda"):
        pytest.skip(f"{_dispatch.MEASURE_ENV} turned measuring off on cuda")
    _dispatch.clear_choices()
    try:
        w = _csr(512, 1024, 0.2, torch.float16, seed=3)
        x = _rand(16, 1024, seed=4, dtype=torch.float16)
        y = sk.ops.csr_linear(x, w)
        rec, = _dispatch.MEASUREMENTS.values()
        cuda_labels = {label for label in set(rec["ms"]) | set(rec["errors"]) if label.startswith("cuda")}
        assert cuda_labels == {"cuda:skinny", "cuda:tiled"}, rec
        assert rec["chosen"] in rec["ms"]
        chosen = choose("csr", x, w)
        assert chosen.label == rec["chosen"]
        _close(y, reference.csr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 512),
               torch.float16, 1024)
        xg = x.clone().requires_grad_()   # autograd: csr_mm (the variant op has no backward), same key
        sk.ops.csr_linear(xg, w).float().sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
    finally:
        _dispatch.clear_choices()


# -------------------------------------------------------------------------------------------------- NM
NM_CASES = [  # (M, N, K, n, m)
    (1, 70, 64, 2, 4), (7, 128, 256, 2, 4), (33, 65, 96, 2, 4), (40, 20, 48, 1, 3), (5, 9, 300, 7, 100),
    (3, 130, 40, 4, 8), (2, 8, 512, 3, 256), (100, 96, 128, 1, 4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NM_CASES)
def test_nm_ops_match_reference(case, dtype, kernel_paths):
    M, N, K, n, m = case
    g = torch.Generator().manual_seed(M)
    w = NM.from_dense(NM.prune(torch.randn(N, K, generator=g, dtype=torch.float64), n, m).to(dtype), n, m).to(DEV)
    x, dy, bias = _rand(M, K, seed=1, dtype=dtype), _rand(M, N, seed=2, dtype=dtype), _rand(N, seed=3, dtype=dtype)
    v64 = w.values.double()
    _close(_op("nm_mm")(x, w.values, w.indices, bias, n, m),
           reference.nm_mm(x.double(), v64, w.indices, bias.double(), n, m), dtype, K)
    _close(_op("nm_mm_t")(dy, w.values, w.indices, n, m), reference.nm_mm_t(dy.double(), v64, w.indices, n, m),
           dtype, N)
    _close(_op("nm_sddmm")(dy, x, w.indices, n, m), reference.nm_sddmm(dy.double(), x.double(), w.indices, n, m),
           dtype, M)


# ------------------------------------------------------------------------------------------------- BSR
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (1, 4), (4, 1), (16, 32)])
@pytest.mark.parametrize("M", [1, 37, 130])
def test_bsr_ops_match_reference(block, M, dtype, kernel_paths):
    N, K = 192, 256
    bn, bk = block
    g = torch.Generator().manual_seed(M)
    keep = torch.rand(N // bn, K // bk, generator=g) < 0.3
    keep[0] = False  # an empty block-row
    dense = torch.randn(N, K, generator=g, dtype=torch.float64) * keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    w = BSR.from_dense(dense.to(dtype), block).to(DEV)
    x, dy, bias = _rand(M, K, seed=1, dtype=dtype), _rand(M, N, seed=2, dtype=dtype), _rand(N, seed=3, dtype=dtype)
    idx = (w.crow_indices, w.col_indices)
    v64 = w.values.double()
    _close(_op("bsr_mm")(x, *idx, w.values, bias, N), reference.bsr_mm(x.double(), *idx, v64, bias.double(), N),
           dtype, K)
    _close(_op("bsr_mm_t")(dy, *idx, w.values, K), reference.bsr_mm_t(dy.double(), *idx, v64, K), dtype, N)
    _close(_op("bsr_sddmm")(dy, x, *idx, bn, bk), reference.bsr_sddmm(dy.double(), x.double(), *idx, bn, bk),
           dtype, M)


# -------------------------------------------------------------------------------------- through sk.ops
def _weight(family, n, k, dtype, density=0.5):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    if family == "csr":
        w = (w * (torch.rand(n, k, generator=g) < density)).to(dtype)
        return w.to(DEV), CSR.from_dense(w).to(DEV)
    if family == "nm":
        w = NM.prune(w, 2, 4).to(dtype)
        return w.to(DEV), NM.from_dense(w, 2, 4).to(DEV)
    keep = (torch.rand(n // 16, k // 16, generator=g) < density).repeat_interleave(16, 0).repeat_interleave(16, 1)
    w = (w * keep).to(dtype)
    return w.to(DEV), BSR.from_dense(w, (16, 16)).to(DEV)


LINEAR = {"bsr": sk.ops.bsr_linear, "csr": sk.ops.csr_linear, "nm": sk.ops.nm_linear}


@pytest.mark.parametrize("family", ["csr", "nm", "bsr"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("m", [1, 6, 45])
def test_gradients_through_linear(family, dtype, tol, m):
    dense, w = _weight(family, 64, 96, dtype)
    x = _rand(m, 96, seed=1, dtype=dtype).requires_grad_()
    bias = _rand(64, seed=2, dtype=dtype).requires_grad_()
    values = w.values.detach().clone().requires_grad_()
    w_train = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "values": values})
    y = LINEAR[family](x, w_train, bias, backend="cuda")
    dy = _rand(*y.shape, seed=3, dtype=dtype)
    y.backward(dy)

    x2, dense2, bias2 = (t.detach().double().requires_grad_() for t in (x, dense, bias))
    y2 = F.linear(x2, dense2, bias2)
    y2.backward(dy.double())
    torch.testing.assert_close(y.double(), y2, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(bias.grad.double(), bias2.grad, rtol=tol, atol=tol)
    pattern = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__},
                         "values": torch.ones_like(values)}).to_dense().bool()
    grad_w = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "values": values.grad}).to_dense()
    torch.testing.assert_close(grad_w.double(), dense2.grad * pattern, rtol=tol, atol=tol)


@pytest.mark.parametrize("family", ["csr", "nm", "bsr"])
def test_gradcheck_float64(family):
    _, w = _weight(family, 32, 48, torch.float64)
    x = _rand(5, 48, seed=1, dtype=torch.float64).requires_grad_()
    values = w.values.detach().clone().requires_grad_()
    bias = _rand(32, seed=2, dtype=torch.float64).requires_grad_()

    def f(x, values, bias):
        w_train = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "values": values})
        return LINEAR[family](x, w_train, bias, backend="cuda")

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("family", ["csr", "nm"])
def test_opcheck(family):
    _, w = _weight(family, 32, 48, torch.float32)
    x = _rand(9, 48, seed=1)
    bias = _rand(32, seed=2)
    if family == "nm":
        args = (x, w.values, w.indices, bias, w.n, w.m)
    else:
        args = (x, w.crow_indices, w.col_indices, w.values, bias, 32)
    torch.library.opcheck(getattr(torch.ops.sparsekit, f"{family}_mm").default, args)


def test_every_op_has_a_cuda_kernel_and_the_dispatcher_uses_it():
    missing = [op for op in OPS if not has_kernel(op, "CUDA")]
    assert not missing, f"no CUDA kernel for {missing}"
    x = _rand(4, 96)
    _, w = _weight("csr", 64, 96, torch.float32)
    assert choose("csr", x, w).name == "cuda"  # triton has no csr kernel: the CUDA one (one of its kernels)
    for family in ("csr", "nm", "bsr"):
        _, w = _weight(family, 64, 96, torch.float32)
        assert choose(family, x, w, backend="cuda").name == "cuda"
