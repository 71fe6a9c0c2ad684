"""The ``cusparselt`` backend (2:4 NM through torch's semi-structured sparsity): its reasons everywhere, its
cache and autograd on CPU with torch's kernels stood in for by dense ones, and (marked `cuda`) the real thing
against the reference in fp16/bf16, gradients included."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk
from sparsekit.formats import NM
from sparsekit.ops import _cusparselt, _dispatch
from sparsekit.ops._dispatch import BACKENDS, all_reasons, choose

CUSPARSELT = BACKENDS["cusparselt"]


def _nm(n, k, n_keep=2, m=4, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = NM.prune(torch.randn(n, k, generator=g, dtype=torch.float64), n_keep, m).to(dtype)
    w = NM.from_dense(dense, n_keep, m)
    return dense.to(device), w.to(device=device)


def _x(m, k, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64).to(device, dtype)


@pytest.fixture(autouse=True)
def _fresh_choices():
    _dispatch.clear_choices()
    yield
    _dispatch.clear_choices()


# ------------------------------------------------------------------------------------------ reasons (CPU)
def test_registered_and_in_cuda_priority():
    assert "cusparselt" in BACKENDS and CUSPARSELT.families == ("nm",)
    assert "cusparselt" in _dispatch.PRIORITY["cuda"]
    assert "cusparselt" not in _dispatch.PRIORITY["cpu"]


def test_reasons_on_cpu_tensors():
    _, w = _nm(32, 64, dtype=torch.float16)
    reasons = all_reasons("nm", _x(4, 64, torch.float16), w)["cusparselt"]
    assert any("runs on cuda tensors, got cpu" in r for r in reasons), reasons
    if torch.version.cuda is None:
        assert any("CPU build" in r for r in reasons), reasons


def test_reasons_name_pattern_dtype_and_shape():
    _, w14 = _nm(32, 64, n_keep=1, m=4)
    reasons = CUSPARSELT.not_supported_reasons("nm", _x(4, 64), w14)
    assert any("dtype torch.float32 not supported" in r for r in reasons), reasons
    assert any("n:m = 1:4 is not 2:4" in r for r in reasons), reasons
    _, w = _nm(24, 40, dtype=torch.float16)   # N = 24, K = 40: multiples of neither 16 nor 32/64
    reasons = CUSPARSELT.not_supported_reasons("nm", _x(4, 40, torch.float16), w)
    assert any(r.startswith("N = 24 (w.shape[0]) must be a positive multiple of") for r in reasons), reasons
    assert any(r.startswith("K = 40 (w.shape[1]) must be a positive multiple of") for r in reasons), reasons
    rows, cols = _cusparselt.min_shape(torch.float16)
    assert (rows, cols) in ((16, 16), (32, 64))   # cuSPARSELt / CUTLASS, from torch's own table
    _, w_ok = _nm(rows, cols, dtype=torch.bfloat16)
    assert not _cusparselt.shape_reasons(rows, cols, torch.bfloat16)
    reasons = CUSPARSELT.not_supported_reasons("nm", _x(3, cols, torch.bfloat16), w_ok)
    assert not any("multiple of" in r or "is not 2:4" in r or "dtype" in r for r in reasons), reasons  # M = 3 free


def test_other_families_are_refused():
    w = sk.formats.BSR.from_dense(torch.randn(32, 32), (16, 16))
    assert CUSPARSELT.not_supported_reasons("bsr", torch.randn(2, 32), w) == [
        "has no bsr kernel (supports: nm)"]


def test_reason_while_compiling(monkeypatch):
    assert not _cusparselt.tracing_reasons()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert any("torch.compile" in r for r in _cusparselt.tracing_reasons())


def test_never_chosen_on_cpu():
    _, w = _nm(32, 64, dtype=torch.float16)
    assert choose("nm", _x(4, 64, torch.float16), w).name != "cusparselt"


def test_forced_backend_error_lists_every_backend():
    _, w = _nm(32, 64, dtype=torch.float16)
    with pytest.raises(ValueError) as exc:
        sk.ops.nm_linear(_x(4, 64, torch.float16), w, backend="cusparselt")
    msg = str(exc.value)
    assert "backend='cusparselt' cannot run this nm call" in msg
    for name in BACKENDS:
        assert f"  {name}:" in msg
    assert "runs on cuda tensors, got cpu" in msg


def test_info_lists_backend_and_measuring():
    from sparsekit.info import format_info, info

    d = info()
    assert "cusparselt" in d["backends"]
    text = format_info(d)
    assert "cusparselt" in text and "dispatcher (backend=None):" in text
    if _dispatch.measure_enabled("cuda"):
        assert "cuda: measures every usable backend" in text


# ---------------------------------------------------- cache + autograd on CPU (torch's kernels stood in for)
@pytest.fixture
def dense_standin(monkeypatch):
    """torch's compress / sparse mm replaced by dense ones, so the backend's own logic runs on CPU."""
    built = []

    def compress(dense):
        built.append(tuple(dense.shape))
        return dense.clone()

    monkeypatch.setattr(_cusparselt, "_compress", compress)
    monkeypatch.setattr(_cusparselt, "_mm", lambda x, ws, bias: F.linear(x, ws, bias))
    return built


def test_compressed_weight_is_built_once_and_follows_in_place_updates(dense_standin):
    dense, w = _nm(32, 64)
    x = _x(5, 64)
    before = _cusparselt.cache_size()
    y1 = CUSPARSELT.mm("nm", x, w, None)
    y2 = CUSPARSELT.mm("nm", x, w, None)
    torch.testing.assert_close(y1, F.linear(x, dense))
    torch.testing.assert_close(y2, y1)
    assert dense_standin == [(32, 64)]
    assert _cusparselt.cache_size() == before + 1
    with torch.no_grad():
        w.values.mul_(2.0)   # e.g. an optimizer step: the version counter moves, the entry is rebuilt
    torch.testing.assert_close(CUSPARSELT.mm("nm", x, w, None), F.linear(x, 2.0 * dense))
    assert len(dense_standin) == 2
    w2 = NM(values=w.values, indices=w.indices.clone(), shape=w.shape, n=2, m=4)   # other indices tensor
    CUSPARSELT.mm("nm", x, w2, None)
    assert len(dense_standin) == 3
    _cusparselt.forget(w2)
    assert _cusparselt.cache_size() == before
    CUSPARSELT.mm("nm", x, w, None)
    del w, w2
    gc.collect()
    assert _cusparselt.cache_size() == before   # keyed weakly on the values tensor: gone with it


def test_gradients_match_the_reference(dense_standin):
    _, w = _nm(32, 64)
    x = _x(6, 64)
    bias = torch.randn(32)
    dy = torch.randn(6, 32)
    grads = {}
    for backend in ("reference", "cusparselt"):
        xv = x.clone().requires_grad_(True)
        vv = w.values.clone().requires_grad_(True)
        bv = bias.clone().requires_grad_(True)
        wv = NM(values=vv, indices=w.indices, shape=w.shape, n=2, m=4)
        y = BACKENDS[backend].mm("nm", xv, wv, bv)
        y.backward(dy)
        grads[backend] = (y.detach(), xv.grad, vv.grad, bv.grad)
    for got, ref in zip(grads["cusparselt"], grads["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_no_autograd_node_without_grad(dense_standin):
    _, w = _nm(32, 64)
    y = CUSPARSELT.mm("nm", _x(2, 64), w, None)
    assert y.grad_fn is None
    y = CUSPARSELT.mm("nm", _x(2, 64).requires_grad_(True), w, None)
    assert type(y.grad_fn).__name__.startswith("_SemiStructuredLinear")


def test_measurement_loser_drops_its_compressed_copy(dense_standin, monkeypatch):
    """When measuring picks another backend, the dispatcher calls release(): no compressed copy stays."""
    _, w = _nm(32, 64)
    CUSPARSELT.mm("nm", _x(2, 64), w, None)
    before = _cusparselt.cache_size()
    CUSPARSELT.release("nm", w)
    assert _cusparselt.cache_size() == before - 1


# ------------------------------------------------------------------------------------------------ CUDA
def _usable_here(dtype):
    _, w = _nm(64, 128, dtype=dtype, device="cuda")
    reasons = all_reasons("nm", _x(4, 128, dtype, "cuda"), w)["cusparselt"]
    if reasons:
        pytest.skip(f"cusparselt cannot run here: {reasons}")


def _ref(x, dense, bias):
    return F.linear(x.double(), dense.double(), None if bias is None else bias.double())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (7, 64, 128), (64, 128, 256), (200, 256, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_forward_matches_reference(dtype, m, n, k, with_bias):
    _usable_here(dtype)
    dense, w = _nm(n, k, dtype=dtype, device="cuda")
    x = _x(m, k, dtype, "cuda")
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    y = sk.ops.nm_linear(x, w, bias, backend="cusparselt")
    assert y.shape == (m, n) and y.dtype == dtype
    ref = _ref(x, dense, bias)
    tol = (2e-2 if dtype == torch.float16 else 8e-2) * max(1.0, ref.abs().max().item())
    assert (y.double() - ref).abs().max().item() <= tol


@pytest.mark.cuda
def test_cuda_leading_dims_and_cache():
    _usable_here(torch.float16)
    dense, w = _nm(64, 128, dtype=torch.float16, device="cuda")
    x = _x(2 * 3 * 5, 128, torch.float16, "cuda").reshape(2, 3, 5, 128)
    before = _cusparselt.cache_size()
    y = sk.ops.nm_linear(x, w, backend="cusparselt")
    sk.ops.nm_linear(x, w, backend="cusparselt")
    assert _cusparselt.cache_size() == before + 1
    torch.testing.assert_close(y.double(), F.linear(x.double(), dense.double()), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        w.values.mul_(-1)
    y2 = sk.ops.nm_linear(x, w, backend="cusparselt")
    torch.testing.assert_close(y2.double(), -F.linear(x.double(), dense.double()), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gradients_match_reference(dtype):
    _usable_here(dtype)
    _, w = _nm(64, 128, dtype=dtype, device="cuda")
    x = _x(24, 128, dtype, "cuda")
    bias = torch.randn(64, device="cuda").to(dtype)
    dy = torch.randn(24, 64, device="cuda").to(dtype)
    out = {}
    for backend in ("reference", "cusparselt"):
        xv = x.clone().requires_grad_(True)
        vv = w.values.clone().requires_grad_(True)
        bv = bias.clone().requires_grad_(True)
        wv = NM(values=vv, indices=w.indices, shape=w.shape, n=2, m=4)
        y = sk.ops.nm_linear(xv, wv, bv, backend=backend)
        y.backward(dy)
        out[backend] = (y, xv.grad, vv.grad, bv.grad)
    tol = 3e-2 if dtype == torch.float16 else 1e-1
    for got, ref in zip(out["cusparselt"], out["reference"]):
        scale = max(1.0, ref.abs().max().item())
        assert (got.double() - ref.double()).abs().max().item() <= tol * scale


@pytest.mark.cuda
def test_cuda_forced_backend_errors_list_reasons():
    _usable_here(torch.float16)
    _, w14 = _nm(64, 128, n_keep=1, m=4, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="n:m = 1:4 is not 2:4"):
        sk.ops.nm_linear(_x(4, 128, torch.float16, "cuda"), w14, backend="cusparselt")
    _, w24 = _nm(24, 128, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError) as exc:
        sk.ops.nm_linear(_x(4, 128, torch.float16, "cuda"), w24, backend="cusparselt")
    assert "N = 24 (w.shape[0]) must be a positive multiple of" in str(exc.value)
    for name in BACKENDS:
        assert f"  {name}:" in str(exc.value)
    _, w = _nm(64, 128, device="cuda")
    with pytest.raises(ValueError, match="dtype torch.float32 not supported"):
        sk.ops.nm_linear(_x(4, 128, torch.float32, "cuda"), w, backend="cusparselt")


@pytest.mark.cuda
def test_cuda_not_chosen_under_compile():
    _usable_here(torch.float16)
    dense, w = _nm(64, 128, dtype=torch.float16, device="cuda")
    x = _x(16, 128, torch.float16, "cuda")
    picked = []
    real_pick = _dispatch._pick

    def spy(family, x, w, backend):
        b = real_pick(family, x, w, backend)
        picked.append(b.name)
        return b

    fn = torch.compile(lambda x: sk.ops.nm_linear(x, w), fullgraph=True, backend="eager")
    import unittest.mock

    with unittest.mock.patch.object(_dispatch, "_pick", spy):
        y = fn(x)
    assert picked and "cusparselt" not in picked
    torch.testing.assert_close(y.double(), F.linear(x.double(), dense.double()), rtol=2e-2, atol=2e-2)
