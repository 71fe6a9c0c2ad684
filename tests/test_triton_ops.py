"""Triton kernels beyond the BSR forward: split-K decode path, BSR backward (dx via the transposed
pattern, SDDMM for dW) through autograd, N:M x dense, and the channel gather/scatter helpers.

Interpreter runs: `pytest -m triton --triton-interpret tests/test_triton_ops.py` (fp32/fp16, small odd
shapes). On a GPU machine run without --triton-interpret: the same tests run compiled plus the `cuda` ones.
"""

from __future__ import annotations

import pytest
import torch
from _triton import DEVICE, INTERPRET, close, compiled_only, make_bsr, needs_runner

import sparsekit as sk
from sparsekit.formats import BSR, NM
from sparsekit.ops import reference as R

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.float16]
DT_IDS = ["fp32", "fp16"]


def randn(*shape, dtype=torch.float32, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ split-K forward
@needs_runner
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_split_k_matches_reference(dtype, m, split_k):
    from sparsekit.kernels import k_bsr_mm

    w = make_bsr(64, 128, (16, 32), 0.6, dtype, empty_rows=(1,))
    x, b = randn(m, 128, dtype=dtype), randn(64, dtype=dtype, seed=2)
    y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, 64, split_k=split_k)
    assert y.dtype == dtype and y.shape == (m, 64)
    close(y, R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), b.double(), 64), dtype)
    y0 = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 64, split_k=split_k)
    assert y0[:, 16:32].eq(0).all()   # empty block-row


def test_split_k_choice():
    from sparsekit.kernels._configs import bsr_mm_split_k

    assert bsr_mm_split_k(1, 8, 8 * 64, 32, 32, sms=132) > 1          # decode: few programs, long rows
    assert bsr_mm_split_k(128, 8, 8 * 64, 32, 32, sms=132) == 1       # M > 64: plain kernel
    assert bsr_mm_split_k(1, 4096, 4096 * 8, 32, 32, sms=132) == 1    # enough block-rows already
    assert bsr_mm_split_k(1, 8, 8, 32, 32, sms=132) == 1              # one block per row: nothing to split
    assert bsr_mm_split_k(1, 8, 0, 32, 32, sms=132) == 1
    assert bsr_mm_split_k(4, 1, 10_000, 32, 32, sms=132) <= 16


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test, the previous setting restored after it."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_default_splits_are_1_under_deterministic_algorithms(deterministic):
    """split-K and the SDDMM split of M add fp32 partials with atomics (the order varies run to run): the defaults
    do not split under torch.use_deterministic_algorithms(True)."""
    from sparsekit.kernels._configs import bsr_mm_split_k, bsr_sddmm_config

    h100 = (9, 227 * 1024)
    assert bsr_mm_split_k(1, 8, 8 * 64, 32, 32, sms=132) == 1
    assert bsr_sddmm_config(4096, 8, 32, 32, torch.float16, arch=h100).split == 1
    torch.use_deterministic_algorithms(False)   # the same shapes split otherwise
    assert bsr_mm_split_k(1, 8, 8 * 64, 32, 32, sms=132) > 1
    assert bsr_sddmm_config(4096, 8, 32, 32, torch.float16, arch=h100).split > 1


@needs_runner
def test_forced_splits_follow_torchs_deterministic_rule(deterministic):
    """A forced split under deterministic algorithms raises as torch's nondeterministic ops do (a warning with
    warn_only=True); split None and 1 run."""
    from sparsekit.kernels import k_bsr_mm, k_bsr_sddmm

    w = make_bsr(64, 128, (16, 32), 0.6, torch.float32)
    x, dy = randn(40, 128), randn(40, 64, seed=2)
    args = (w.crow_indices, w.col_indices, w.values, None, 64)
    expect = R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 64)
    for split_k in (None, 1):
        close(k_bsr_mm.bsr_mm(x, *args, split_k=split_k), expect, torch.float32)
    with pytest.raises(RuntimeError, match=r"bsr_mm with split_k=2 .*atomics.*use_deterministic_algorithms\(True\)"):
        k_bsr_mm.bsr_mm(x, *args, split_k=2)
    sddmm = (dy, x, w.crow_indices, w.col_indices, 16, 32)
    ref = k_bsr_sddmm.bsr_sddmm(*sddmm)
    with pytest.raises(RuntimeError, match=r"bsr_sddmm with split=2 .*use_deterministic_algorithms\(True\)"):
        k_bsr_sddmm.bsr_sddmm(*sddmm, split=2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="bsr_mm with split_k=2"):
        close(k_bsr_mm.bsr_mm(x, *args, split_k=2), expect, torch.float32)
    with pytest.warns(UserWarning, match="bsr_sddmm with split=2"):
        close(k_bsr_sddmm.bsr_sddmm(*sddmm, split=2), ref, torch.float32)


@needs_runner
def test_split_k_argument_checked():
    from sparsekit.kernels import k_bsr_mm

    w = make_bsr(32, 32, (16, 16), 1.0, torch.float32)
    with pytest.raises(ValueError, match="split_k"):
        k_bsr_mm.bsr_mm(randn(2, 32), w.crow_indices, w.col_indices, w.values, None, 32, split_k=0)
    # a grid dimension (CUDA: <= 65535) and a constexpr (one compiled kernel per value): bounded
    with pytest.raises(ValueError, match=r"split_k must be None or an int in \[1, 64\], got 100000"):
        k_bsr_mm.bsr_mm(randn(2, 32), w.crow_indices, w.col_indices, w.values, None, 32, split_k=100000)
    from sparsekit.kernels import k_bsr_sddmm

    with pytest.raises(ValueError, match=r"split must be None or an int in \[1, 64\], got 65"):
        k_bsr_sddmm.bsr_sddmm(randn(2, 32), randn(2, 32), w.crow_indices, w.col_indices, 16, 16, split=65)
    y = k_bsr_mm.bsr_mm(randn(2, 32), w.crow_indices, w.col_indices, w.values, None, 32, split_k=64)
    close(y, R.bsr_mm(randn(2, 32).double(), w.crow_indices, w.col_indices, w.values.double(), None, 32),
          torch.float32)


# ----------------------------------------------------------------------------------- transposed metadata
def test_transpose_meta_matches_dense_transpose():
    from sparsekit.kernels._transpose import bsr_transpose_meta

    w = make_bsr(80, 96, (16, 32), 0.5, torch.float32, seed=7, empty_rows=(2,), empty_cols=(1,), device="cpu")
    t_crow, t_row, t_perm = bsr_transpose_meta(w.crow_indices, w.col_indices, 5, 3)
    wt = BSR.from_dense(w.to_dense().t().contiguous(), block=(32, 16))
    assert torch.equal(t_crow, wt.crow_indices) and torch.equal(t_row, wt.col_indices)
    assert torch.equal(w.values[t_perm.long()].transpose(1, 2), wt.values)
    assert t_crow.dtype == t_row.dtype == t_perm.dtype == torch.int32


def test_transpose_meta_cache_hits_and_invalidates():
    from sparsekit.kernels import _transpose

    _transpose.clear_cache()
    w = make_bsr(64, 64, (16, 16), 0.5, torch.float32, seed=8, device="cpu")
    crow, col = w.crow_indices.clone(), w.col_indices.clone()
    a = _transpose.cached_transpose_meta(crow, col, 4, 4)
    assert _transpose.cached_transpose_meta(crow, col, 4, 4) is a
    col.add_(0)   # in-place edit bumps the version counter: recomputed
    assert _transpose.cached_transpose_meta(crow, col, 4, 4) is not a


def test_transpose_meta_is_not_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """Captured ops are recorded, not run: metadata computed during capture must not reach the cache (a later eager
    call would read uninitialised tensors), and a cached entry is not handed to the graph (an eviction would free
    memory the graph keeps reading)."""
    from sparsekit.kernels import _transpose

    _transpose.clear_cache()
    w = make_bsr(64, 64, (16, 16), 0.5, torch.float32, seed=8, device="cpu")
    crow, col = w.crow_indices.clone(), w.col_indices.clone()
    expect = _transpose.bsr_transpose_meta(crow, col, 4, 4)
    monkeypatch.setattr(_transpose, "_capturing", lambda t: True)
    a = _transpose.cached_transpose_meta(crow, col, 4, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, expect))
    assert not _transpose._cache and _transpose.cached_transpose_meta(crow, col, 4, 4) is not a
    monkeypatch.setattr(_transpose, "_capturing", lambda t: False)
    eager = _transpose.cached_transpose_meta(crow, col, 4, 4)
    assert _transpose.cached_transpose_meta(crow, col, 4, 4) is eager and len(_transpose._cache) == 1
    monkeypatch.setattr(_transpose, "_capturing", lambda t: True)
    assert _transpose.cached_transpose_meta(crow, col, 4, 4) is not eager
    _transpose.clear_cache()


def test_transpose_capture_check_asks_cuda_for_cuda_tensors_only(monkeypatch):
    from sparsekit.kernels import _transpose
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with FakeTensorMode():   # a CUDA tensor without a GPU
        on_gpu = torch.zeros(3, dtype=torch.int32, device="cuda")
    assert _transpose._capturing(on_gpu) and not _transpose._capturing(torch.zeros(3, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not _transpose._capturing(on_gpu)


def test_kernels_are_not_specialised_on_m():
    """Triton compiles separate binaries for an int argument == 1 or divisible by 16; for the row count M that
    meant a compile per batch-size class (and a failure inside CUDA-graph capture). Every kernel taking M opts out,
    and the JIT's binder then gives M = 1, 16 and 17 the same specialisation."""
    from sparsekit.kernels import k_bsr_mm, k_bsr_mm_t, k_bsr_sddmm, k_channel, k_nm_mm
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernels = (k_bsr_mm._bsr_mm_kernel, k_bsr_mm._bsr_mm_splitk_kernel, k_bsr_mm_t._bsr_mm_t_kernel,
               k_bsr_sddmm._bsr_sddmm_kernel, k_nm_mm._nm_mm_kernel, k_channel._channel_mm_kernel)
    for kernel in kernels:
        # under TRITON_INTERPRET=1 the module holds an interpreter object: build the JIT function it stands for
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        assert [p.name for p in jit.params if p.do_not_specialize] == ["M"], jit.fn.__name__
        if kernel is k_bsr_mm._bsr_mm_kernel:
            binder = create_function_from_signature(jit.signature, jit.params, CUDABackend)
            t, i = torch.zeros(16), torch.zeros(16, dtype=torch.int32)
            specs = {m: binder(t, i, i, t, None, t, m, 64, 64, HAS_BIAS=False, BLOCK_M=16, BN=16, BK=16, GROUP_M=8,
                               INPUT_PRECISION="ieee")[1] for m in (1, 16, 17)}
            assert specs[1] == specs[16] == specs[17] and specs[1][6] == ("i32", None)   # M: argument 6


def test_transpose_meta_empty():
    from sparsekit.kernels._transpose import bsr_transpose_meta

    crow = torch.zeros(4, dtype=torch.int32)
    t_crow, t_row, t_perm = bsr_transpose_meta(crow, torch.zeros(0, dtype=torch.int32), 3, 5)
    assert t_crow.tolist() == [0] * 6 and t_row.numel() == 0 and t_perm.numel() == 0


# --------------------------------------------------------------------------------------- BSR backward
@needs_runner
@pytest.mark.parametrize("block", [(16, 32), (32, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [1, 19])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_mm_t_and_sddmm_match_reference(dtype, m, block):
    from sparsekit.kernels import k_bsr_mm_t, k_bsr_sddmm

    w = make_bsr(64, 96, block, 0.5, dtype, seed=m, empty_rows=(0,), empty_cols=(1,))
    dy, x = randn(m, 64, dtype=dtype), randn(m, 96, dtype=dtype, seed=3)
    dx = k_bsr_mm_t.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, 96)
    close(dx, R.bsr_mm_t(dy.double(), w.crow_indices, w.col_indices, w.values.double(), 96), dtype)
    assert dx[:, block[1]:2 * block[1]].eq(0).all()   # empty block-column writes zeros
    for split in (1, 2):
        dv = k_bsr_sddmm.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, *block, split=split)
        assert dv.shape == w.values.shape and dv.dtype == dtype
        close(dv, R.bsr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices, *block), dtype)


@needs_runner
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["sparsity100", "sparsity0"])
def test_backward_sparsity_extremes(density):
    from sparsekit.kernels import k_bsr_mm_t, k_bsr_sddmm

    w = make_bsr(32, 48, (16, 16), density, torch.float32)
    dy, x = randn(5, 32), randn(5, 48, seed=4)
    dx = k_bsr_mm_t.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, 48)
    close(dx, R.bsr_mm_t(dy.double(), w.crow_indices, w.col_indices, w.values.double(), 48), torch.float32)
    dv = k_bsr_sddmm.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, 16, 16)
    assert dv.shape == w.values.shape
    close(dv, R.bsr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices, 16, 16), torch.float32)


@needs_runner
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_bsr_linear_triton_autograd(dtype):
    w = make_bsr(48, 64, (16, 32), 0.6, dtype, seed=5, empty_rows=(1,))
    values = w.values.clone().requires_grad_()
    wt = BSR(values=values, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    x = randn(3, 5, 64, dtype=dtype).requires_grad_()
    b = randn(48, dtype=dtype, seed=6).requires_grad_()
    y = sk.ops.bsr_linear(x, wt, b, backend="triton")
    g = randn(3, 5, 48, dtype=dtype, seed=9)
    y.backward(g)

    xr, vr, br = (t.detach().double().requires_grad_() for t in (x, values, b))
    yr = R.bsr_mm(xr.reshape(-1, 64), w.crow_indices, w.col_indices, vr, br, 48).reshape(3, 5, 48)
    yr.backward(g.double())
    close(y, yr, dtype)
    close(x.grad, xr.grad, dtype)
    close(values.grad, vr.grad, dtype, scale=2.0)
    close(b.grad, br.grad, dtype, scale=2.0)


@needs_runner
def test_triton_backward_uses_triton_ops(monkeypatch):
    from sparsekit.ops import _triton_ops

    called = []
    for name in ("bsr_mm_t_triton", "bsr_sddmm_triton"):
        fn = getattr(_triton_ops, name)
        monkeypatch.setattr(_triton_ops, name, lambda *a, _fn=fn, _n=name: called.append(_n) or _fn(*a))
    w = make_bsr(32, 32, (16, 16), 1.0, torch.float32)
    values = w.values.clone().requires_grad_()
    x = randn(4, 32).requires_grad_()
    y = _triton_ops.bsr_mm_triton(x, w.crow_indices, w.col_indices, values, None, 32)
    y.sum().backward()
    assert called == ["bsr_mm_t_triton", "bsr_sddmm_triton"]


def test_backward_ops_have_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = BSR.from_dense(torch.randn(32, 48), block=(16, 16))
    nmw = NM.from_dense(NM.prune(torch.randn(8, 16), 2, 4))
    with FakeTensorMode() as mode:
        dy, x = mode.from_tensor(torch.randn(3, 32)), mode.from_tensor(torch.randn(3, 48))
        crow, col, vals = (mode.from_tensor(t) for t in (w.crow_indices, w.col_indices, w.values))
        assert torch.ops.sparsekit.bsr_mm_t_triton(dy, crow, col, vals, 48).shape == (3, 48)
        assert torch.ops.sparsekit.bsr_sddmm_triton(dy, x, crow, col, 16, 16).shape == tuple(w.values.shape)
        v, i = mode.from_tensor(nmw.values), mode.from_tensor(nmw.indices)
        assert torch.ops.sparsekit.nm_mm_triton(mode.from_tensor(torch.randn(3, 16)), v, i, None, 2, 4).shape == (3, 8)


# -------------------------------------------------------------------------------------------------- N:M
@needs_runner
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (2, 3)], ids=lambda p: f"{p[0]}of{p[1]}")
@pytest.mark.parametrize("m", [1, 18])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nm_mm_matches_reference(dtype, m, nm):
    from sparsekit.kernels import k_nm_mm

    n_, m_ = nm
    k = m_ * 7   # K not a multiple of the K tile: masked tail
    w = NM.from_dense(NM.prune(randn(21, k, device="cpu"), n_, m_), n_, m_).to(device=DEVICE, dtype=dtype)
    x, b = randn(m, k, dtype=dtype, seed=2), randn(21, dtype=dtype, seed=3)
    y = k_nm_mm.nm_mm(x, w.values, w.indices, b, n_, m_)
    assert y.shape == (m, 21) and y.dtype == dtype
    close(y, R.nm_mm(x.double(), w.values.double(), w.indices, b.double(), n_, m_), dtype)


@needs_runner
def test_non_contiguous_format_tensors_are_a_reason_not_a_launch_error():
    w = make_bsr(32, 64, (16, 16), 0.5, torch.float32)
    strided = w.values.transpose(1, 2).contiguous().transpose(1, 2)     # same shape, not contiguous
    loose = BSR(values=strided, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    assert "non-contiguous values" in " ".join(sk.ops.all_reasons("bsr", randn(2, 64), loose)["triton"])
    assert not sk.ops.all_reasons("bsr", randn(2, 64), w)["triton"]


@needs_runner
def test_nm_linear_triton_autograd_and_dispatch():
    dense = NM.prune(randn(24, 32, device="cpu"), 2, 4)
    w = NM.from_dense(dense, 2, 4).to(device=DEVICE)
    assert not sk.ops.all_reasons("nm", randn(2, 32), w)["triton"]
    values = w.values.clone().requires_grad_()
    wt = NM(values=values, indices=w.indices, shape=w.shape, n=2, m=4)
    x = randn(2, 3, 32).requires_grad_()
    y = sk.ops.nm_linear(x, wt, backend="triton")
    y.sum().backward()
    xr, vr = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    yr = R.nm_mm(xr.reshape(-1, 32), vr, w.indices, None, 2, 4).reshape(2, 3, 24)
    yr.sum().backward()
    close(y, yr, torch.float32)
    close(x.grad, xr.grad, torch.float32)
    close(values.grad, vr.grad, torch.float32)


@needs_runner
def test_nm_all_zero_weight():
    from sparsekit.kernels import k_nm_mm

    w = NM.from_dense(torch.zeros(16, 16), 2, 4).to(device=DEVICE)
    y = k_nm_mm.nm_mm(randn(3, 16), w.values, w.indices, None, 2, 4)
    assert y.eq(0).all()


def test_nm_bad_inputs_raise():
    from sparsekit.kernels import k_nm_mm

    w = NM.from_dense(NM.prune(torch.randn(8, 16), 2, 4))
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="indices must be uint8"):
        k_nm_mm.nm_mm(x, w.values, w.indices.long(), None, 2, 4)
    with pytest.raises(ValueError, match="values must be"):
        k_nm_mm.nm_mm(x, w.values, w.indices, None, 1, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        k_nm_mm.nm_mm(torch.randn(3, 15), w.values, w.indices, None, 2, 4)
    with pytest.raises(TypeError, match="values dtype"):
        k_nm_mm.nm_mm(x, w.values.half(), w.indices, None, 2, 4)


# ---------------------------------------------------------------------------------------------- channel
@needs_runner
@pytest.mark.parametrize("scatter", [False, True], ids=["compact", "scatter"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_channel_gather_linear(dtype, scatter):
    x = randn(3, 7, 40, dtype=dtype)
    in_idx = torch.tensor([0, 3, 4, 9, 11, 19, 20, 38, 39], device=DEVICE)
    w, b = randn(13, 9, dtype=dtype, seed=2), randn(13, dtype=dtype, seed=3)
    kw = {"out_idx": torch.randperm(30, generator=torch.Generator().manual_seed(0))[:13].to(DEVICE),
          "n_out": 30} if scatter else {}
    ref = sk.ops.channel_gather_linear(x.double(), in_idx, w.double(), b.double(), backend="reference", **kw)
    got = sk.ops.channel_gather_linear(x, in_idx, w, b, backend="triton", **kw)
    assert got.shape == ref.shape and got.dtype == dtype
    close(got, ref, dtype)


@needs_runner
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_gather_conv1x1(channels_last):
    x = randn(2, 20, 5, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    in_idx = torch.tensor([1, 2, 5, 7, 19], device=DEVICE, dtype=torch.int32)
    w, b = randn(6, 5, 1, 1, seed=2), randn(6, seed=3)
    out_idx = torch.tensor([0, 2, 3, 7, 8, 9], device=DEVICE)
    for kw in ({}, {"out_idx": out_idx, "n_out": 11}):
        # float64 reference: on a GPU an fp32 one runs cuDNN, TF32 by default
        ref = sk.ops.channel_gather_conv2d(x.double(), in_idx, w.double(), b.double(), backend="reference", **kw)
        got = sk.ops.channel_gather_conv2d(x, in_idx, w, b, backend="triton", **kw)
        close(got, ref, torch.float32)
        # the same memory format as the reference and the CUDA kernel: channels_last in, channels_last out
        assert got.stride() == ref.stride()
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_runner
@pytest.mark.parametrize("dim", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_channel_scatter(dtype, dim):
    y = randn(2, 5, 3, 6, dtype=dtype) if dim == 1 else randn(4, 3, 5, dtype=dtype)
    out_idx = torch.tensor([6, 0, 2, 9, 4], device=DEVICE)
    for bias in (None, randn(10, dtype=dtype, seed=4)):
        ref = sk.ops.channel_scatter(y, out_idx, 10, bias, dim=dim, backend="reference")
        got = sk.ops.channel_scatter(y, out_idx, 10, bias, dim=dim, backend="triton")
        assert got.shape == ref.shape
        close(got, ref, dtype)


@needs_runner
def test_non_contiguous_bias_and_x_on_the_triton_backend():
    """The Triton kernels need dense row-major x and bias; the ops (and so a forced backend) take any layout,
    as the C++ kernels do."""
    w = make_bsr(64, 64, (16, 16), 0.5, torch.float32)
    nmw = NM.from_dense(NM.prune(randn(64, 64, device="cpu"), 2, 4), 2, 4).to(device=DEVICE)
    bias = randn(128, seed=2)[::2]
    x = randn(64, 5, seed=3).t()   # [5, 64], not contiguous
    assert not bias.is_contiguous() and not x.is_contiguous()
    for linear, wt in ((sk.ops.bsr_linear, w), (sk.ops.nm_linear, nmw)):
        expect = x.double() @ wt.to_dense().double().t() + bias.double()
        close(linear(x, wt, bias, backend="triton"), expect, torch.float32)
    # the ops themselves, through autograd (the backward's SDDMM reads the saved, non-contiguous x)
    from sparsekit.ops import _triton_ops

    xg = x.detach().requires_grad_()
    values = w.values.clone().requires_grad_()
    y = _triton_ops.bsr_mm_triton(xg, w.crow_indices, w.col_indices, values, bias, 64)
    close(y, x.double() @ w.to_dense().double().t() + bias.double(), torch.float32)
    y.sum().backward()
    close(values.grad, R.bsr_sddmm(torch.ones(5, 64, dtype=torch.float64, device=DEVICE), x.double(),
                                   w.crow_indices, w.col_indices, 16, 16), torch.float32)
    y = _triton_ops.nm_mm_triton(x, nmw.values, nmw.indices, bias, 2, 4)
    close(y, x.double() @ nmw.to_dense().double().t() + bias.double(), torch.float32)


# ----------------------------------------------------------------------- channel helpers: measured choice
@pytest.fixture
def measure_cpu(monkeypatch):
    """backend=None measured on CPU (the interpreter standing in for the GPU), few runs, nothing remembered
    before or after."""
    from sparsekit.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_MEASURE", set(_dispatch._MEASURE))
    monkeypatch.setattr(_dispatch, "_NO_MEASURE", set(_dispatch._NO_MEASURE))
    monkeypatch.setattr(_dispatch, "MEASURE_WARMUP", 1)
    monkeypatch.setattr(_dispatch, "MEASURE_REPS", 1)
    _dispatch.set_measure("cpu", True)
    yield _dispatch
    _dispatch.clear_choices()


def _spy_channel_kernels(monkeypatch) -> list[str]:
    from sparsekit.kernels import k_channel

    called: list[str] = []
    for name in ("channel_mm", "channel_scatter"):
        real = getattr(k_channel, name)
        monkeypatch.setattr(k_channel, name, lambda *a, _r=real, _n=name, **k: called.append(_n) or _r(*a, **k))
    return called


@needs_runner
def test_channel_backend_none_is_measured_once_per_shape(measure_cpu, monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the CPU stand-in for the GPU's measurement")
    dispatch = measure_cpu
    called = _spy_channel_kernels(monkeypatch)
    x, in_idx, w = randn(2, 6, 3, 4), torch.tensor([0, 2, 5]), randn(4, 3, 1, 1, seed=2)
    ref = sk.ops.channel_gather_conv2d(x, in_idx, w, backend="reference")
    close(sk.ops.channel_gather_conv2d(x, in_idx, w), ref, torch.float32)   # measured: both paths ran
    (key, rec), = dispatch.MEASUREMENTS.items()
    assert key[0] == "channel_gather_conv2d" and set(rec["ms"]) == {"triton", "reference"}, rec
    assert sk.ops.channel.conv_backend(x, in_idx, w) == rec["chosen"]
    n = len(called)
    monkeypatch.setattr(dispatch, "_time_candidates", lambda *a: pytest.fail("measured twice"))
    close(sk.ops.channel_gather_conv2d(x, in_idx, w), ref, torch.float32)
    assert len(called) == n + (rec["chosen"] == "triton")


@needs_runner
@pytest.mark.parametrize("winner", ["triton", "reference"])
def test_channel_backend_none_runs_the_measured_winner(measure_cpu, monkeypatch, winner):
    if DEVICE != "cpu":
        pytest.skip("the CPU stand-in for the GPU's measurement")
    dispatch = measure_cpu
    timings = {"triton": 1.0, "reference": 2.0} if winner == "triton" else {"triton": 2.0, "reference": 1.0}
    monkeypatch.setattr(dispatch, "_time_candidates", lambda calls, device: ({n: timings[n] for n in calls}, {}))
    called = _spy_channel_kernels(monkeypatch)
    x, in_idx, w, b = randn(3, 10), torch.tensor([1, 4, 9]), randn(5, 3, seed=2), randn(5, seed=3)
    for _ in range(2):
        got = sk.ops.channel_gather_linear(x, in_idx, w, b)
        close(got, sk.ops.channel_gather_linear(x, in_idx, w, b, backend="reference"), torch.float32)
    y, out_idx = randn(2, 3, 4), torch.tensor([5, 0, 2])
    got = sk.ops.channel_scatter(y, out_idx, 6, dim=1)
    close(got, sk.ops.channel_scatter(y, out_idx, 6, dim=1, backend="reference"), torch.float32)
    assert called == (["channel_mm"] * 2 + ["channel_scatter"] if winner == "triton" else [])
    assert [r["chosen"] for r in dispatch.MEASUREMENTS.values()] == [winner, winner]


@needs_runner
def test_channel_backend_none_takes_the_unfused_path_when_not_measured(monkeypatch):
    from sparsekit.ops import _dispatch

    if _dispatch.measure_enabled(DEVICE):
        pytest.skip(f"measuring is on for {DEVICE} here")
    called = _spy_channel_kernels(monkeypatch)
    monkeypatch.setattr(_dispatch, "_time_candidates", lambda *a: pytest.fail("measured"))
    x, in_idx, w = randn(3, 10), torch.tensor([1, 4, 9], device=DEVICE), randn(5, 3, seed=2)
    sk.ops.channel_gather_linear(x, in_idx, w)
    sk.ops.channel_gather_conv2d(randn(1, 6, 2, 2), in_idx[:2], randn(4, 2, 1, 1))
    assert called == [] and sk.ops.channel.conv_backend(randn(1, 6, 2, 2), in_idx[:2], randn(4, 2, 1, 1)) == \
        "reference"


def test_channel_backend_none_measures_nothing_when_autograd_needs_the_unfused_path(measure_cpu, monkeypatch):
    monkeypatch.setattr(measure_cpu, "_time_candidates", lambda *a: pytest.fail("measured"))
    x, in_idx, w = torch.randn(3, 10), torch.tensor([1, 4, 9]), torch.randn(5, 3, requires_grad=True)
    sk.ops.channel_gather_linear(x, in_idx, w).sum().backward()
    assert w.grad is not None and not measure_cpu.MEASUREMENTS


def test_channel_helpers_reference_and_errors():
    x, w = torch.randn(4, 10), torch.randn(3, 2)
    idx = torch.tensor([1, 8])
    torch.testing.assert_close(sk.ops.channel_gather_linear(x, idx, w, backend="reference"), x[:, [1, 8]] @ w.t())
    with pytest.raises(ValueError, match="in_idx entries must lie"):
        sk.ops.channel_gather_linear(x, torch.tensor([1, 10]), w)
    with pytest.raises(ValueError, match="in_idx has 3 entries"):
        sk.ops.channel_gather_linear(x, torch.tensor([1, 2, 3]), w)
    with pytest.raises(ValueError, match="out_idx must not repeat"):
        sk.ops.channel_scatter(torch.randn(2, 2), torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.ops.channel_scatter(torch.randn(2, 2), torch.tensor([0, 1]), 4, backend="cuda")
    with pytest.raises(TypeError, match="weight has dtype"):
        sk.ops.channel_gather_linear(x, idx, w.double())
    y = sk.ops.channel_gather_conv2d(torch.randn(1, 6, 5, 5), torch.tensor([0, 2, 4]), torch.randn(4, 3, 3, 3),
                                     padding=1, backend="reference")
    assert y.shape == (1, 4, 5, 5)
    if not INTERPRET:
        with pytest.raises(ValueError, match="backend='triton' cannot run"):
            sk.ops.channel_scatter(torch.randn(2, 2), torch.tensor([0, 1]), 4, backend="triton")


@needs_runner
def test_channel_triton_rejects_unsupported_conv_and_grad():
    x = randn(1, 6, 5, 5)
    with pytest.raises(ValueError, match="only 1x1 kernels"):
        sk.ops.channel_gather_conv2d(x, torch.tensor([0, 2, 4], device=DEVICE), randn(4, 3, 3, 3), backend="triton")
    w = randn(3, 2).requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        sk.ops.channel_gather_linear(randn(4, 10), torch.tensor([1, 8], device=DEVICE), w, backend="triton")


# --------------------------------------------------------------------------------------- GPU (compiled)
@pytest.mark.cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (128, 128), (32, 128)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [1, 8, 64, 300])
@pytest.mark.parametrize("precision", [None, "tf32"])   # fp32 dots: torch's default (ieee), and TF32 (wgmma tf32)
def test_cuda_split_k_and_backward(m, block, dtype, precision):
    from sparsekit.kernels import k_bsr_mm, k_bsr_mm_t, k_bsr_sddmm

    if precision is not None and dtype != torch.float32:
        pytest.skip("input_precision concerns fp32 dots only")
    p = {} if precision is None else {"input_precision": precision}
    w = make_bsr(1024, 1024, block, 0.3, dtype, seed=m, empty_rows=(0,), device="cuda")
    x, dy = randn(m, 1024, dtype=dtype, device="cuda"), randn(m, 1024, dtype=dtype, seed=2, device="cuda")
    tol_dtype = torch.float16 if precision == "tf32" else dtype    # (TF32 keeps fp16's 10 mantissa bits)
    scale = 1.0 if tol_dtype == torch.float32 else 6.0
    expect = R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 1024)
    for split_k in (None, 1, 4):
        y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 1024, split_k=split_k, **p)
        close(y, expect, tol_dtype, scale)
    close(k_bsr_mm_t.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, 1024, **p),
          R.bsr_mm_t(dy.double(), w.crow_indices, w.col_indices, w.values.double(), 1024), tol_dtype, scale)
    for split in (None, 1, 4):
        close(k_bsr_sddmm.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, *block, split=split, **p),
              R.bsr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices, *block), tol_dtype,
              scale * (m ** 0.5))


@pytest.mark.cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_training_step(dtype):
    w = make_bsr(512, 256, (32, 32), 0.4, dtype, device="cuda")
    values = w.values.clone().requires_grad_()
    wt = BSR(values=values, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    x = randn(4, 64, 256, dtype=dtype, device="cuda").requires_grad_()
    bias = randn(512, dtype=dtype, seed=4, device="cuda").requires_grad_()
    ref_values = w.values.double().requires_grad_()
    ref_w = BSR(values=ref_values, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    ref_x, ref_bias = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    for _ in range(2):   # the second step hits the transposed-metadata cache; gradients accumulate over both
        sk.ops.bsr_linear(x, wt, bias, backend="triton").float().square().mean().backward()
        sk.ops.bsr_linear(ref_x, ref_w, ref_bias, backend="reference").square().mean().backward()
    # (a mean over 4*64*512 outputs: gradients are small; compared relative to their own scale)
    for got, ref in ((values.grad, ref_values.grad), (x.grad, ref_x.grad), (bias.grad, ref_bias.grad)):
        assert got is not None and got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)


@pytest.mark.cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)], ids=lambda p: f"{p[0]}of{p[1]}")
@pytest.mark.parametrize("m", [1, 33, 1000])
@pytest.mark.parametrize("precision", [None, "tf32"])
def test_cuda_nm(m, nm, dtype, precision):
    from sparsekit.kernels import k_nm_mm

    if precision is not None and dtype != torch.float32:
        pytest.skip("input_precision concerns fp32 dots only")
    p = {} if precision is None else {"input_precision": precision}
    w = NM.from_dense(NM.prune(torch.randn(1000, 1024), *nm), *nm).to(device="cuda", dtype=dtype)
    x, b = randn(m, 1024, dtype=dtype, device="cuda"), randn(1000, dtype=dtype, seed=3, device="cuda")
    tol_dtype = torch.float16 if precision == "tf32" else dtype    # (TF32 keeps fp16's 10 mantissa bits)
    close(k_nm_mm.nm_mm(x, w.values, w.indices, b, *nm, **p),
          R.nm_mm(x.double(), w.values.double(), w.indices, b.double(), *nm), tol_dtype,
          1.0 if tol_dtype == torch.float32 else 6.0)


@pytest.mark.cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_cuda_channel(dtype, tf32):
    if tf32 and dtype != torch.float32:
        pytest.skip("TF32 concerns fp32 dots only")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")  # the kernel's fp32 dots follow it
    try:
        _channel_case(dtype, tf32)
    finally:
        torch.set_float32_matmul_precision(saved)


def _channel_case(dtype, tf32):
    in_idx = torch.randperm(256, device="cuda")[:160].sort().values
    out_idx = torch.randperm(384, device="cuda")[:200]
    x = randn(8, 256, 14, 14, dtype=dtype, device="cuda")
    w, b = randn(200, 160, 1, 1, dtype=dtype, seed=2, device="cuda"), randn(200, dtype=dtype, seed=3, device="cuda")
    # float64 reference: an fp32 one would run cuDNN, which uses TF32 by default (torch.backends.cudnn.conv), while
    # the Triton kernel's fp32 dots follow the cuBLAS setting (ieee by default): ~1e-2 apart at K = 160
    ref = sk.ops.channel_gather_conv2d(x.double(), in_idx, w.double(), b.double(), out_idx=out_idx, n_out=384,
                                       backend="reference")
    got = sk.ops.channel_gather_conv2d(x, in_idx, w, b, out_idx=out_idx, n_out=384, backend="triton")
    tol_dtype = torch.float16 if tf32 else dtype    # (TF32 keeps fp16's 10 mantissa bits)
    close(got, ref, tol_dtype, 1.0 if tol_dtype == torch.float32 else 6.0)
    y = randn(8, 200, 14, 14, dtype=dtype, device="cuda")
    bb = randn(384, dtype=dtype, seed=5, device="cuda")
    close(sk.ops.channel_scatter(y, out_idx, 384, bb, dim=1, backend="triton"),
          sk.ops.channel_scatter(y, out_idx, 384, bb, dim=1, backend="reference"), dtype)


def test_check_grid_names_the_launch_limits():
    """A launch past CUDA's grid limits is a ValueError naming the op, not the driver's 'invalid argument'."""
    from sparsekit.kernels._launch import check_grid

    check_grid("ok", (2**31 - 1, 65535, 65535))
    for grid in ((2**31, 1), (1, 65536), (1, 1, 65536)):
        with pytest.raises(ValueError, match=r"channel_mm: the problem is too large for one launch"):
            check_grid("channel_mm", grid)


# ------------------------------------------------------------------------------------------ eager fast path
@needs_runner
@pytest.mark.parametrize("family", ["bsr", "nm"])
def test_eager_calls_skip_the_custom_op_layer_only_where_nothing_must_see_it(monkeypatch, family):
    """An eager call that needs no gradient runs the Triton op's body directly (the custom-op layer costs tens of
    microseconds per call); a gradient, or a torch dispatch mode watching the ops, takes the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparsekit.ops import _triton_ops

    if family == "bsr":
        w, face = make_bsr(64, 96, (16, 32), 0.5, torch.float32), sk.ops.bsr_linear
    else:
        w, face = NM.from_dense(NM.prune(randn(64, 96), 2, 4), 2, 4).to(DEVICE), sk.ops.nm_linear
    x, b = randn(5, 96), randn(64, seed=3)
    body = _triton_ops.EAGER[family]
    calls = []
    monkeypatch.setitem(_triton_ops.EAGER, family, lambda *a: (calls.append(1), body(*a))[1])
    expected = torch.nn.functional.linear(x, w.to_dense(), b)
    close(face(x, w, b, backend="triton"), expected, torch.float32)
    assert len(calls) == 1

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        close(face(x, w, b, backend="triton"), expected, torch.float32)
    assert len(calls) == 1 and any(f"{family}_mm_triton" in op for op in Seen.ops), Seen.ops

    class Sub(torch.Tensor):   # a bias subclass with its own __torch_function__ sees the op too
        pass

    got = face(x, w, b.as_subclass(Sub), backend="triton")
    assert len(calls) == 1 and type(got) is Sub
    close(got.as_subclass(torch.Tensor), expected, torch.float32)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        close(face(x, w, b, backend="triton"), expected, torch.float32)
    assert len(calls) == 2 and f"sparsekit::{family}_mm_triton" in {e.name for e in prof.events()}

    xg = x.clone().requires_grad_()
    face(xg, w, b, backend="triton").sum().backward()
    assert len(calls) == 2 and xg.grad is not None and torch.isfinite(xg.grad).all()
