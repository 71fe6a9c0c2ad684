"""The C++ CPU kernels split their work over threads by nonzeros (block-rows, CSR rows, M tiles, conv images);
the other tests mostly run at this machine's 2 threads and at sizes that stay serial. Here: shapes large enough
to be split, at odd and large thread counts (more chunks than rows, some chunks empty), with skewed patterns
(a few dense block-rows, the rest empty), forward and backward, against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk
from sparsekit import _extension
from sparsekit.formats import BSR, CSR, NM

_NOT_BUILT = not _extension.LOADED and "No module named" in (_extension.LOAD_ERROR or "")
pytestmark = pytest.mark.skipif(_NOT_BUILT, reason=f"sparsekit._C not built: {_extension.LOAD_ERROR}")

LINEAR = {"bsr": sk.ops.bsr_linear, "csr": sk.ops.csr_linear, "nm": sk.ops.nm_linear}


@pytest.fixture(params=[3, 7, 16], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _weight(n: int, k: int, block: tuple[int, int], skewed: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bn, bk = block
    keep = torch.rand(n // bn, k // bk, generator=g) >= 0.8
    if skewed:          # every nonzero in 3 block-rows: the chunking has to balance by nonzeros
        keep[:] = False
        keep[torch.randperm(n // bn, generator=g)[:3]] = True
    return torch.randn(n, k, generator=g) * keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.float().abs().max().item()))


@pytest.mark.parametrize("fmt,block", [("bsr", (32, 32)), ("bsr", (1, 4)), ("bsr", (16, 32)), ("csr", (1, 1)),
                                       ("nm", (1, 1))])
@pytest.mark.parametrize("m", [1, 5, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skewed", [False, True], ids=["spread", "skewed"])
def test_linear_forward_backward(threads, fmt, block, m, dtype, skewed):
    dense = _weight(512, 384, block, skewed, seed=m)
    if fmt == "nm":
        w = NM.from_dense(NM.prune(dense, 2, 4), n=2, m=4)
    else:
        w = BSR.from_dense(dense, block) if fmt == "bsr" else CSR.from_dense(dense)
    w = w.to(dtype=dtype)
    x = torch.randn(m, 384, dtype=dtype, requires_grad=True)
    bias = torch.randn(512, dtype=dtype)
    dy = torch.randn(m, 512, dtype=dtype)
    grads = {}
    for backend in ("cpu", "reference"):
        w.values.requires_grad_(True)
        y = LINEAR[fmt](x, w, bias, backend=backend)
        (y * dy).sum().backward()
        grads[backend] = (y.detach(), x.grad, w.values.grad)
        x.grad, w.values.grad = None, None
        w.values.requires_grad_(False)
    for ours, ref in zip(grads["cpu"], grads["reference"]):
        _close(ours, ref, dtype)


@pytest.mark.parametrize("fmt,block", [("bsr", (32, 32)), ("bsr", (1, 4)), ("csr", (1, 1))])
@pytest.mark.parametrize("ksize,stride", [(1, 1), (3, 1), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv2d(threads, fmt, block, ksize, stride, dtype):
    cout, cin, batch = 128, 32, 3
    dense = _weight(cout, cin * ksize * ksize, block, skewed=stride == 2, seed=ksize)
    w = (BSR.from_dense(dense, block) if fmt == "bsr" else CSR.from_dense(dense)).to(dtype=dtype)
    x = torch.randn(batch, cin, 15, 15, dtype=dtype)
    bias = torch.randn(cout, dtype=dtype)
    y = sk.ops.sparse_conv2d(x, w, bias, stride=stride, padding=ksize // 2, backend="cpu")
    ref = F.conv2d(x.float(), dense.to(dtype).float().reshape(cout, cin, ksize, ksize), bias.float(), stride,
                   ksize // 2)
    _close(y, ref, dtype)
