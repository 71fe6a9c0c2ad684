"""3-D sparse convolution: the bsr_conv3d / csr_conv3d ops (direct CPU kernels, any stride) against F.conv3d,
their gradients and fakes, sparsekit.ops.sparse_conv3d's other paths, and nn.Conv3d -> SparseConv3d through
convert_modules, sparsify, save / load, training and torch.compile.

Tolerances as in test_cpu_csr_conv.py: fp32 against a float64 reference; 16-bit types accumulate in fp32.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk
from sparsekit import _extension
from sparsekit.formats import BSR, CSR
from sparsekit.nn import SparseConv3d

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 2e-3),
       torch.float64: (1e-10, 1e-10)}
needs_ext = pytest.mark.skipif(not _extension.LOADED, reason=f"sparsekit._C not loaded: {_extension.LOAD_ERROR}")

# (C, N, (D, H, W), kernel, padding, dilation, stride, block)
CASES = [
    (4, 8, (5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (4, 4)),
    (4, 8, (5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), (2, 2, 2), (4, 4)),
    (3, 6, (4, 9, 5), (2, 3, 1), (0, 2, 1), (2, 1, 1), (1, 3, 2), (2, 3)),
    (2, 4, (1, 1, 1), (1, 1, 1), (1, 0, 2), (1, 1, 1), (3, 1, 2), (2, 2)),
    (16, 32, (3, 10, 9), (1, 3, 3), (0, 1, 1), (1, 1, 1), (1, 2, 2), (32, 16)),
    # 16-multiple blocks at stride 1: bfloat16 runs on AMX tiles where the CPU has them
    (16, 32, (3, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (32, 16)),
    (16, 32, (5, 4, 5), (2, 3, 1), (1, 0, 1), (2, 1, 1), (1, 1, 1), (16, 16)),
]


def _weight(n, k, block, density, dtype, fmt, gen):
    bn, bk = block
    keep = torch.rand(n // bn, k // bk, generator=gen) < density
    mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    d = (torch.randn(n, k, generator=gen, dtype=torch.float64) * mask).to(dtype)
    return d, (BSR.from_dense(d, block) if fmt == "bsr" else CSR.from_dense(d))


@needs_ext
@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2", "scalar"])   # amx: the best the CPU has (bf16 on AMX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv3d_op_matches_conv3d(isa, dtype, fmt, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(7)
    rtol, atol = TOL[dtype]
    op = getattr(torch.ops.sparsekit, f"{fmt}_conv3d")
    for c, n, size, ks, pad, dil, st, block in CASES:
        k = c * ks[0] * ks[1] * ks[2]
        for density in (0.0, 0.4, 1.0):
            d, w = _weight(n, k, block, density, dtype, fmt, gen)
            for b in (0, 2):
                x = torch.randn(b, c, *size, generator=gen, dtype=torch.float64).to(dtype)
                bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for bb in (None, bias):
                    y = op(x, w.crow_indices, w.col_indices, w.values, bb, list(ks), list(pad), list(dil), list(st))
                    ref = F.conv3d(x.double(), d.double().reshape(n, c, *ks), None if bb is None else bb.double(),
                                   st, pad, dil)
                    assert y.dtype == dtype
                    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv3d_op_gradcheck_and_opcheck(fmt):
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(4, 24, generator=gen, dtype=torch.float64) * (torch.rand(4, 24, generator=gen) < 0.5)
    w = BSR.from_dense(d, (2, 3)) if fmt == "bsr" else CSR.from_dense(d)
    op = getattr(torch.ops.sparsekit, f"{fmt}_conv3d")
    x = torch.randn(2, 2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_(True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    for stride in ([1, 1, 1], [2, 1, 3]):   # the default (dropped by the dispatcher before autograd) and not
        torch.autograd.gradcheck(
            lambda a, vv, bb, st=stride: op(a, w.crow_indices, w.col_indices, vv, bb, [2, 3, 2], [1, 0, 1],
                                            [1, 1, 2], st), (x, v, bias))
        torch.library.opcheck(op, (x.detach().float(), w.crow_indices, w.col_indices, w.values.float(), None,
                                   [2, 3, 2], [1, 0, 1], [1, 1, 2], stride))


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("fmt", ["bsr", "csr", "nm"])
@pytest.mark.parametrize("groups,kernel,stride,padding", [(1, 3, 1, 1), (2, (1, 3, 3), (1, 2, 2), (0, 1, 1)),
                                                          (1, 1, 2, 0), (2, 1, 1, 0)])
def test_sparse_conv3d_matches_conv3d_with_gradients(backend, fmt, groups, kernel, stride, padding):
    """Every path of the face: the direct CPU ops, the 1x1x1 pixel path, per-group weights, and the generic patch
    matrix (strided views) into sparse_linear that other backends take; gradients for x, values and bias."""
    gen = torch.Generator().manual_seed(11)
    c_in, c_out = 8, 16
    ks = (kernel,) * 3 if isinstance(kernel, int) else kernel
    w4 = torch.randn(c_out, c_in // groups, *ks, generator=gen)
    flat = w4.reshape(c_out, -1)
    if fmt == "nm":
        w = sk.formats.NM.from_dense(sk.formats.NM.prune(flat, 2, 4), 2, 4) if flat.shape[1] % 4 == 0 else None
        if w is None:
            pytest.skip("K not a multiple of 4")
    else:
        flat = flat * (torch.rand(flat.shape, generator=gen) < 0.4)
        w = BSR.from_dense(flat, (4, 1)) if fmt == "bsr" else CSR.from_dense(flat)
    dense_w = w.to_dense().reshape(w4.shape)
    x = torch.randn(2, c_in, 4, 7, 6, generator=gen, requires_grad=True)
    bias = torch.randn(c_out, generator=gen, requires_grad=True)
    values = w.values.detach().requires_grad_(True)
    wv = copy.copy(w)
    wv.values = values
    y = sk.ops.sparse_conv3d(x, wv, bias, stride, padding, 1, groups, kernel_size=ks, backend=backend)
    ref = F.conv3d(x, dense_w, bias, stride, padding, 1, groups)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn(ref.shape, generator=gen)
    gx, gb, gv = torch.autograd.grad(y, (x, bias, values), g)
    dense_leaf = dense_w.clone().requires_grad_(True)
    ref = F.conv3d(x, dense_leaf, bias, stride, padding, 1, groups)
    rx, rb, rw = torch.autograd.grad(ref, (x, bias, dense_leaf), g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)
    grad_fmt, ones = copy.copy(w), copy.copy(w)   # dW on the stored entries = the dense gradient there
    grad_fmt.values, ones.values = gv, torch.ones_like(gv)
    stored = ones.to_dense() != 0
    torch.testing.assert_close(grad_fmt.to_dense()[stored], rw.reshape(c_out, -1)[stored], rtol=1e-4, atol=1e-4)


def test_empty_batch_backward_and_op_arity():
    w = BSR.from_dense(torch.randn(4, 16) * (torch.rand(4, 16) < 0.5), (2, 2))
    x = torch.randn(0, 2, 4, 4, 4, requires_grad=True)
    sk.ops.sparse_conv3d(x, w, None, 2, 1, 1, kernel_size=2).sum().backward()
    assert x.grad.shape == x.shape
    if _extension.LOADED:   # each op takes its own number of spatial dims
        with pytest.raises(RuntimeError, match="bsr_conv2d: kernel_size, padding, dilation and stride must have 2"):
            torch.ops.sparsekit.bsr_conv2d(x.detach(), w.crow_indices, w.col_indices, w.values, None, [2, 2, 2],
                                           [1, 1, 1], [1, 1, 1], [1, 1, 1])
        with pytest.raises(RuntimeError, match="bsr_conv3d: x must be 5-D"):
            torch.ops.sparsekit.bsr_conv3d(x.detach()[:, :, 0], w.crow_indices, w.col_indices, w.values, None,
                                           [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1])


def test_sparse_conv3d_built_directly_defaults_its_geometry_to_three_dims():
    w = BSR.from_dense(torch.randn(8, 4 * 27), (4, 4))
    layer = SparseConv3d(w, None, "bsr", 4, (3, 3, 3))
    assert layer.stride == (1, 1, 1) and layer.padding == (0, 0, 0) and layer.dilation == (1, 1, 1)
    with pytest.raises(ValueError, match=r"stride must have 3 entries like kernel_size \(3, 3, 3\), got \(1, 1\)"):
        SparseConv3d(w, None, "bsr", 4, (3, 3, 3), stride=(1, 1))
    with pytest.raises(TypeError, match="conv must be an nn.Conv3d, got Conv2d"):
        SparseConv3d.from_dense(nn.Conv2d(4, 8, 3))
    x = torch.randn(1, 4, 5, 5, 5)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-4)


def test_sparse_conv3d_errors_name_the_argument():
    w = BSR.from_dense(torch.randn(8, 4 * 27), (4, 4))
    with pytest.raises(ValueError, match=r"sparse_conv3d: x must be 5-D \[B, C_in, D, H, W\]"):
        sk.ops.sparse_conv3d(torch.randn(1, 4, 5, 5), w)
    with pytest.raises(TypeError, match="sparse_conv3d: stride must be an int or a triple of ints"):
        sk.ops.sparse_conv3d(torch.randn(1, 4, 5, 5, 5), w, stride=(1, 2))
    with pytest.raises(ValueError, match="sparse_conv3d: cannot infer a cubic kernel"):
        sk.ops.sparse_conv3d(torch.randn(1, 4, 5, 5, 5), BSR.from_dense(torch.randn(8, 4 * 18), (4, 4)))
    with pytest.raises(ValueError, match=r"sparse_conv3d: w has K=108 columns but C_in/groups\*kd\*kh\*kw"):
        sk.ops.sparse_conv3d(torch.randn(1, 4, 5, 5, 5), w, kernel_size=(1, 3, 3))
    with pytest.raises(ValueError, match="sparse_conv3d: output would be empty"):
        sk.ops.sparse_conv3d(torch.randn(1, 4, 2, 5, 5), w)


class Video(nn.Module):
    """A small 3-D CNN: stem, a strided 3x3x3 conv, a grouped one and a pointwise head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 32, 3, padding=1)
        self.down = nn.Conv3d(32, 64, 3, stride=2, padding=1)
        self.grouped = nn.Conv3d(64, 64, (1, 3, 3), padding=(0, 1, 1), groups=2)
        self.head = nn.Conv3d(64, 32, 1)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.relu(self.down(torch.relu(self.stem(x)))))))


def _pruned_video():
    torch.manual_seed(0)
    net = Video().eval()
    x = torch.randn(2, 3, 6, 12, 12)
    pruner = sk.prune.Pruner(net, x, granularity="block", block=(32, 32), sparsity=0.75, ignore=[net.stem])
    pruner.step()
    pruner.bake()
    return net, x


@needs_ext
def test_sparsify_save_load_and_convert_conv3d(tmp_path):
    net, x = _pruned_video()
    ref = net(x)
    fast, report = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    assert {d.name for d in report.layers} == {"down", "grouped", "head"}
    assert all(isinstance(getattr(fast, d.name), SparseConv3d) for d in report.layers if d.choice != "dense")
    torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4)
    sk.save(fast, tmp_path / "video")
    loaded = sk.load(tmp_path / "video", Video().eval())
    for d in report.layers:
        assert type(getattr(loaded, d.name)) is type(getattr(fast, d.name))
    torch.testing.assert_close(loaded(x), ref, rtol=1e-4, atol=1e-4)
    conv = sk.nn.convert_modules(copy.deepcopy(net), format="csr")
    assert isinstance(conv.down, SparseConv3d) and conv.sparsekit_skipped == {"stem": "no zeros"}
    torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.down(x[0, :, :, :, :].new_zeros(32, 6, 12, 12)),
                               net.down(x.new_zeros(1, 32, 6, 12, 12))[0], rtol=1e-4, atol=1e-4)   # unbatched


def test_sparse_conv3d_module_trains_like_the_masked_dense_one():
    net, x = _pruned_video()
    sparse = copy.deepcopy(net)
    sparse.down = SparseConv3d.from_dense(net.down, format="bsr", block=32)
    assert isinstance(sparse.down.to_dense(), nn.Conv3d)
    opt_d = torch.optim.SGD(net.parameters(), lr=0.05)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05)
    mask = net.down.weight.detach() != 0
    for _ in range(3):
        for model, opt in ((net, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        with torch.no_grad():
            net.down.weight.mul_(mask)   # the pattern stays fixed, as in the sparse module
    torch.testing.assert_close(sparse.down.to_dense().weight, net.down.weight, rtol=1e-4, atol=1e-5)


@needs_ext
def test_sparsified_conv3d_compiles_fullgraph():
    net, x = _pruned_video()
    fast = sk.nn.convert_modules(copy.deepcopy(net), format="bsr", block=32)
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), fast(x), rtol=1e-5, atol=1e-5)
