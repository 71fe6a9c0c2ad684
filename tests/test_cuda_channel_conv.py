"""sparsekit::channel_gather_conv2d: y = conv2d(x[:, in_idx], weight, bias, stride, padding, dilation, groups)
(optionally scattered into channels out_idx of n_out), the CUDA kernel of csrc/cuda/channel_conv.cu and the
Python face sparsekit.ops.channel_gather_conv2d (backend "cuda").

The CPU tests check the parts that need no GPU: the schema, the pure-PyTorch reference (the CPU kernel),
the fake (meta) implementation, the autograd formula (gradcheck, opcheck) and the face's backend choice and
errors. The `cuda` tests (skipped without a GPU) run the kernel, both paths (the generic CUDA-core kernel with
SPARSEKIT_CHANNEL_CONV_TC=0 and the tensor-core one with =force, for fp16/bf16), against the float64
reference on odd shapes, and check that the tensor-core path's first-use self-check passes on this GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_reference as _close
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsekit as sk
from sparsekit.ops import reference
from sparsekit.ops._library import has_kernel
from sparsekit.ops._schema import SCHEMAS
from sparsekit.ops.channel import conv_backend, cuda_conv_reasons

OP = "channel_gather_conv2d"
ENV = "SPARSEKIT_CHANNEL_CONV_TC"


def _op():
    return getattr(torch.ops.sparsekit, OP).default


def _kept(c: int, kind: str, count: int, g: torch.Generator) -> torch.Tensor:
    if kind == "all":
        return torch.arange(c)
    if kind == "one":
        return torch.tensor([c - 1])
    if kind == "repeat":   # a channel read twice (allowed: the gather does not need distinct channels)
        idx = torch.randperm(c, generator=g)[: count - 1]
        return torch.cat([idx, idx[:1]])
    return torch.randperm(c, generator=g)[:count]


# (C_in, kept kind, kept count, C_out, kernel, stride, padding, dilation, groups, (H, W), batch)
CASES = [
    (3, "all", 3, 5, (1, 1), 1, 0, 1, 1, (7, 9), 1),
    (3, "one", 1, 4, (3, 3), 1, 1, 1, 1, (5, 5), 3),
    (17, "some", 9, 33, (3, 3), 2, 1, 1, 1, (11, 13), 3),
    (70, "some", 41, 65, (5, 5), 1, 2, 1, 1, (9, 8), 1),
    (70, "all", 70, 70, (1, 1), 2, 0, 1, 1, (15, 16), 3),
    (40, "some", 23, 96, (3, 3), 1, 2, 2, 1, (12, 10), 1),
    (33, "repeat", 12, 17, (3, 1), (2, 1), (1, 0), 1, 1, (9, 7), 3),
    (64, "some", 30, 66, (3, 3), 1, 1, 1, 2, (10, 9), 1),
    (32, "all", 32, 32, (3, 3), 1, 1, 1, 32, (8, 8), 3),
    (48, "some", 37, 130, (1, 1), 1, 0, 1, 1, (28, 28), 2),
    (256, "some", 200, 128, (3, 3), 1, 1, 1, 1, (14, 14), 1),
    (20, "some", 8, 64, (5, 5), 3, 0, (1, 2), 1, (23, 19), 1),
]
IDS = [f"c{c[0]}-{c[1]}{c[2]}-o{c[3]}-k{c[4][0]}x{c[4][1]}-s{c[5]}-p{c[6]}-d{c[7]}-g{c[8]}-b{c[10]}" for c in CASES]


def _problem(case, dtype=torch.float64, device="cpu", seed=0, bias=True):
    c, kind, count, cout, ks, stride, padding, dilation, groups, (h, w), batch = case
    g = torch.Generator().manual_seed(seed)
    idx = _kept(c, kind, count, g)
    x = torch.randn(batch, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(cout, idx.numel() // groups, *ks, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)
    conv = (pair(stride), pair(padding), pair(dilation), groups)
    to = lambda t: None if t is None else t.to(device, dtype)
    return to(x), idx.to(device), to(wt), to(b), conv


def _ref(x, idx, w, b, conv, out_idx=None, n_out=None):
    stride, padding, dilation, groups = conv
    y = F.conv2d(x.double()[:, idx.long()], w.double(), None if b is None else b.double(), stride, padding,
                 dilation, groups)
    if out_idx is not None:
        full = y.new_zeros(y.shape[0], n_out, *y.shape[2:])
        full[:, out_idx.long()] = y
        y = full
    return y


# ------------------------------------------------------------------------------------------------------ CPU
def test_schema_is_registered_in_cpp_and_python():
    assert OP in SCHEMAS
    assert str(_op()._schema) == f"sparsekit::{OP}{SCHEMAS[OP]}"
    assert OP in reference.REFERENCES


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_the_gathered_conv(case):
    x, idx, w, b, conv = _problem(case)
    torch.testing.assert_close(_op()(x, idx, w, b, None, None, *conv), _ref(x, idx, w, b, conv))
    out_idx = torch.randperm(w.shape[0] + 3, generator=torch.Generator().manual_seed(1))[: w.shape[0]]
    got = _op()(x, idx.int(), w, None, out_idx, w.shape[0] + 3, *conv)
    torch.testing.assert_close(got, _ref(x, idx, w, None, conv, out_idx, w.shape[0] + 3))


def test_reference_with_no_kept_channel_is_the_bias():
    """F.conv2d returns zero output channels for zero input channels; the op returns the bias."""
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    y = _op()(x, torch.zeros(0, dtype=torch.long), torch.randn(4, 0, 3, 3, dtype=torch.float64), b, None, None,
              [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(y, b[None, :, None, None].expand(2, 4, 6, 6))


def _fmt(x):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fake_and_meta_match_the_reference(case, channels_last):
    x, idx, w, b, conv = _problem(case, dtype=torch.float32)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for out_idx, n_out in ((None, None), (torch.arange(w.shape[0]).flip(0), w.shape[0] + 2)):
        real = _op()(x, idx, w, b, out_idx, n_out, *conv)
        canonical = torch.empty(real.shape, memory_format=_fmt(x)).stride()
        assert real.is_contiguous(memory_format=_fmt(x))
        with FakeTensorMode() as mode:
            args = [None if t is None else mode.from_tensor(t) for t in (x, idx, w, b, out_idx)]
            fake = _op()(*args, n_out, *conv)
        assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == canonical
        meta = _op()(*[None if t is None else t.to("meta") for t in (x, idx, w, b, out_idx)], n_out, *conv)
        assert meta.shape == real.shape and meta.stride() == canonical


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[7]], ids=[IDS[2], IDS[6], IDS[7]])
def test_opcheck(case):
    x, idx, w, b, conv = _problem(case)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(_op(), (x, idx, w, b, None, None, *conv))
    out_idx = torch.arange(w.shape[0], dtype=torch.int32).flip(0)
    torch.library.opcheck(_op(), (x.detach().to(memory_format=torch.channels_last), idx.int(), w.detach(), None,
                                  out_idx, w.shape[0] + 1, *conv))


@pytest.mark.parametrize("scatter", [False, True], ids=["compact", "scatter"])
def test_gradcheck_float64(scatter):
    """The autograd formula (convolution_backward on the gathered x, index_add back), repeated channel, groups."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([5, 0, 3, 3, 6, 1])
    w = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    out_idx, n_out = (torch.tensor([6, 1, 0, 3]), 8) if scatter else (None, None)
    f = lambda x, w, b: _op()(x, idx, w, b, out_idx, n_out, [2, 1], [1, 0], [1, 2], 2)
    assert torch.autograd.gradcheck(f, (x, w, b))
    # only some inputs need a gradient (the gathered x is built only for dweight)
    assert torch.autograd.gradcheck(lambda x: f(x, w.detach(), None), (x,))
    assert torch.autograd.gradcheck(lambda w: f(x.detach(), w, b.detach()), (w,))


def test_torch_compile_fullgraph():
    x, idx, w, b, conv = _problem(CASES[2], dtype=torch.float32)
    fn = torch.compile(lambda x: _op()(x, idx, w, b, None, None, *conv), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), _ref(x, idx, w, b, conv).float(), rtol=1e-4, atol=1e-4)


def test_face_on_cpu_takes_the_reference_and_explains_cuda():
    x, idx, w, b, conv = _problem(CASES[2], dtype=torch.float32)
    stride, padding, dilation, groups = conv
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert conv_backend(x, idx, w, b, **kw) == "reference"
    torch.testing.assert_close(sk.ops.channel_gather_conv2d(x, idx, w, b, **kw), _ref(x, idx, w, b, conv).float(),
                               rtol=1e-4, atol=1e-4)
    reasons = cuda_conv_reasons(x)
    assert any("runs on cuda tensors, got cpu" in r for r in reasons)
    if not has_kernel(OP, "CUDA"):
        assert any("no CUDA kernel for channel_gather_conv2d" in r for r in reasons)
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call: .*runs on cuda tensors"):
        sk.ops.channel_gather_conv2d(x, idx, w, b, backend="cuda", **kw)
    assert any("dtype torch.int32 not supported" in r for r in cuda_conv_reasons(torch.zeros(1, dtype=torch.int32)))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"backend": "gpu"}, ValueError, r"backend must be one of \['cuda', 'triton', 'reference'\]"),
    ({"backend": 1}, TypeError, "backend must be a str"),
    ({"groups": 2}, ValueError, "in_idx has 3 entries, expected weight.shape"),
    ({"groups": 3}, ValueError, "groups must be a positive int dividing"),
    ({"groups": 0}, ValueError, "groups must be a positive int dividing"),
    ({"stride": 0}, ValueError, "stride and dilation must be >= 1"),
    ({"padding": -1}, ValueError, "padding >= 0"),
    ({"dilation": 4}, ValueError, r"the \(dilated\) kernel 9x9 is larger than the padded input 5x5"),
    ({"n_out": 6}, ValueError, "n_out is only meaningful with out_idx"),
    ({"out_idx": torch.tensor([0, 1, 2, 2]), "n_out": 6}, ValueError, "out_idx must not repeat"),
    ({"out_idx": torch.tensor([0, 1, 2, 6]), "n_out": 6}, ValueError, r"out_idx entries must lie in \[0, 6\)"),
    ({"bias": torch.randn(5)}, ValueError, r"bias must have shape \(4,\)"),
])
def test_face_errors(kwargs, exc, match):
    x, w = torch.randn(1, 6, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(exc, match=match):
        sk.ops.channel_gather_conv2d(x, torch.tensor([0, 2, 4]), w, **kwargs)


def test_other_channel_helpers_have_no_cuda_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \['triton', 'reference'\]"):
        sk.ops.channel_scatter(torch.randn(2, 2), torch.tensor([0, 1]), 4, backend="cuda")


def test_op_rejects_n_out_without_out_idx():
    x, w = torch.randn(1, 6, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="out_idx and n_out must be given together"):
        _op()(x, torch.tensor([0, 2, 4]), w, None, None, 7, [1, 1], [0, 0], [1, 1], 1)


# ------------------------------------------------------------------------------------------------------ GPU
DEV = "cuda"


def _cuda_op():
    if not has_kernel(OP, "CUDA"):
        pytest.fail(f"sparsekit._C has no CUDA kernel for {OP}: build on a CUDA machine "
                    "(pip install --no-build-isolation -e .) or with FORCE_CUDA=1")
    return _op()


PATHS = [("fp32", torch.float32, None), ("fp64", torch.float64, None),
         ("fp16-generic", torch.float16, "0"), ("fp16-tc", torch.float16, "force"),
         ("bf16-generic", torch.bfloat16, "0"), ("bf16-tc", torch.bfloat16, "force")]


@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_matches_reference(monkeypatch, case, path):
    _, dtype, env = path
    if env is not None:
        monkeypatch.setenv(ENV, env)
    op = _cuda_op()
    for bias in (True, False):
        x, idx, w, b, conv = _problem(case, dtype=dtype, device=DEV, bias=bias)
        reduction = w.shape[1] * w.shape[2] * w.shape[3]
        for index_dtype in (torch.int64, torch.int32):
            got = op(x, idx.to(index_dtype), w, b, None, None, *conv)
            assert got.is_contiguous()
            _close(got, _ref(x, idx, w, b, conv), dtype, reduction)


@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("case", [CASES[2], CASES[7], CASES[11]], ids=[IDS[2], IDS[7], IDS[11]])
def test_cuda_layouts_and_scatter(monkeypatch, case, path):
    """channels_last x (-> channels_last y), a non-contiguous slice of a wider tensor, the fused scatter."""
    _, dtype, env = path
    if env is not None:
        monkeypatch.setenv(ENV, env)
    op = _cuda_op()
    x, idx, w, b, conv = _problem(case, dtype=dtype, device=DEV)
    reduction = w.shape[1] * w.shape[2] * w.shape[3]
    ref = _ref(x, idx, w, b, conv)
    xcl = x.to(memory_format=torch.channels_last)
    got = op(xcl, idx, w, b, None, None, *conv)
    assert got.is_contiguous(memory_format=_fmt(xcl))   # (channels_last unless x is degenerate: C or H*W of 1)
    _close(got, ref, dtype, reduction)
    wide = torch.randn(x.shape[0], x.shape[1] + 3, x.shape[2] + 2, x.shape[3] * 2, device=DEV).to(dtype)
    wide[:, 1:-2, 1:-1, ::2] = x
    view = wide[:, 1:-2, 1:-1, ::2]
    assert not view.is_contiguous()
    _close(op(view, idx, w, b, None, None, *conv), ref, dtype, reduction)
    n_out = w.shape[0] + 5
    out_idx = torch.randperm(n_out, generator=torch.Generator().manual_seed(2))[: w.shape[0]].to(DEV)
    for oi in (out_idx, out_idx.int()):
        got = op(x, idx, w, b, oi, n_out, *conv)
        _close(got, _ref(x, idx, w, b, conv, out_idx, n_out), dtype, reduction)


@pytest.mark.cuda
def test_cuda_empty_and_degenerate():
    op = _cuda_op()
    x = torch.randn(2, 5, 6, 6, device=DEV)
    b = torch.randn(4, device=DEV)
    y = op(x, torch.zeros(0, dtype=torch.long, device=DEV), torch.randn(4, 0, 3, 3, device=DEV), b, None, None,
           [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(y, b[None, :, None, None].expand(2, 4, 6, 6))
    y = op(x[:0], torch.tensor([1, 2], device=DEV), torch.randn(3, 2, 1, 1, device=DEV), None, None, None,
           [1, 1], [0, 0], [1, 1], 1)
    assert y.shape == (0, 3, 6, 6)
    y = op(x, torch.tensor([1, 2], device=DEV), torch.randn(0, 2, 1, 1, device=DEV), None, None, None,
           [1, 1], [0, 0], [1, 1], 1)
    assert y.shape == (2, 0, 6, 6)
    with pytest.raises(RuntimeError, match="out_idx and n_out must be given together"):
        op(x, torch.tensor([1, 2], device=DEV), torch.randn(3, 2, 1, 1, device=DEV), None, None, 4,
           [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        op(x, torch.tensor([1, 2], device=DEV), torch.randn(3, 2, 7, 1, device=DEV), None, None, None,
           [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_autograd_matches_reference(dtype):
    x, idx, w, b, conv = _problem(CASES[7], dtype=dtype, device=DEV)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = sk.ops.channel_gather_conv2d(x, idx, w, b, stride=conv[0], padding=conv[1], dilation=conv[2],
                                     groups=conv[3], backend="cuda")
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    _ref(x2, idx, w2, b2, conv).backward(dy.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for got, ref in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()))


@pytest.mark.cuda
def test_cuda_face_picks_the_kernel():
    x, idx, w, b, conv = _problem(CASES[2], dtype=torch.float16, device=DEV)
    kw = dict(stride=conv[0], padding=conv[1], dilation=conv[2], groups=conv[3])
    assert cuda_conv_reasons(x) == []
    assert conv_backend(x, idx, w, b, **kw) == "cuda"
    assert conv_backend(x, idx, w, b, backend="reference", **kw) == "reference"
    got = sk.ops.channel_gather_conv2d(x, idx, w, b, **kw)
    _close(got, _ref(x, idx, w, b, conv), torch.float16, w[0].numel())
    x1, w1 = x[:, :, :4, :4].contiguous(), torch.randn(5, idx.numel(), 1, 1, device=DEV, dtype=torch.float16)
    assert conv_backend(x1, idx, w1) == "cuda"   # also for 1x1 kernels, ahead of the Triton path


_PROBE_CALL = """
import warnings, torch, sparsekit
warnings.simplefilter("always")
x = torch.randn(2, 20, 9, 9, device="cuda", dtype=torch.{dtype})
w = torch.randn(24, 7, 3, 3, device="cuda", dtype=torch.{dtype})
idx = torch.tensor([1, 4, 5, 9, 11, 12, 19], device="cuda")
torch.ops.sparsekit.channel_gather_conv2d(x, idx, w, None, None, None, [1, 1], [1, 1], [1, 1], 1)
torch.cuda.synchronize()
"""


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensor_core_probe_passes_on_this_gpu(dtype):
    """The first-use self-check (selfcheck.cuh) of the tensor-core path agrees with the generic kernel here
    (a failing probe would switch the path off with a warning, so the other tests would not notice)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.run([sys.executable, "-c", _PROBE_CALL.format(dtype=dtype)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert ENV not in proc.stderr, f"the {ENV} self-check failed on this GPU:\n{proc.stderr}"
