"""The public ops faces: correctness of every usable backend against the dense result, autograd, opcheck,
gradcheck, dispatch, and clear errors for bad input."""

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk
from sparsekit import _extension
from sparsekit.formats import BSR, CSR, NM
from sparsekit.ops._dispatch import BACKENDS, choose
from sparsekit.ops._library import has_kernel
from sparsekit.ops._schema import SCHEMAS

CPU_BACKENDS = ["reference"] + (["cpu"] if has_kernel("bsr_mm", "CPU") else [])


def _weight(n, k, family, density=0.4, block=(16, 16), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    if family == "bsr":
        bn, bk = block
        keep = torch.rand(n // bn, k // bk, generator=g) < density
        w = w * keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return w.to(dtype), BSR.from_dense(w.to(dtype), block)
    if family == "csr":
        w = w * (torch.rand(n, k, generator=g) < density)
        return w.to(dtype), CSR.from_dense(w.to(dtype))
    w = NM.prune(w, 2, 4)
    return w.to(dtype), NM.from_dense(w.to(dtype), 2, 4)


LINEAR = {"bsr": sk.ops.bsr_linear, "csr": sk.ops.csr_linear, "nm": sk.ops.nm_linear}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
@pytest.mark.parametrize("m", [1, 7, 0])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
def test_linear_matches_dense(backend, family, m, density):
    dense, w = _weight(48, 64, family, density)
    x = torch.randn(m, 64)
    bias = torch.randn(48)
    for b in (None, bias):
        y = LINEAR[family](x, w, b, backend=backend)
        torch.testing.assert_close(y, F.linear(x, dense, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision(backend, dtype, tol):
    """16-bit storage: compare against an fp32 computation of the same (rounded) weights."""
    dense, w = _weight(64, 96, "bsr", 0.5, dtype=dtype)
    x = torch.randn(5, 96).to(dtype)
    y = sk.ops.bsr_linear(x, w, backend=backend)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), F.linear(x.float(), dense.float()), rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_dims(backend):
    dense, w = _weight(32, 48, "bsr", 0.5)
    x = torch.randn(2, 3, 5, 48)
    torch.testing.assert_close(sk.ops.bsr_linear(x, w, backend=backend), F.linear(x, dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_gradients_match_dense(backend, family):
    dense, w = _weight(32, 48, family, 0.5)
    x = torch.randn(6, 48, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    values = w.values.detach().clone().requires_grad_()
    w_train = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "values": values})
    y = LINEAR[family](x, w_train, bias, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    x2 = x.detach().clone().requires_grad_()
    dense2 = dense.clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    F.linear(x2, dense2, bias2).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, bias2.grad)
    # values' gradient = the dense gradient on the pattern
    grad_w = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "values": values.grad}).to_dense()
    pattern = type(w)(**{**{f: getattr(w, f) for f in w.__dataclass_fields__},
                         "values": torch.ones_like(values)}).to_dense().bool()
    torch.testing.assert_close(grad_w, dense2.grad * pattern, rtol=1e-5, atol=1e-5)


def _op_args(family, w, x, bias):
    if family == "nm":
        return (x, w.values, w.indices, bias, w.n, w.m)
    return (x, w.crow_indices, w.col_indices, w.values, bias, w.shape[0])


@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_opcheck(family):
    _, w = _weight(32, 48, family, 0.5, dtype=torch.float64)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    w.values.requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    op = getattr(torch.ops.sparsekit, f"{family}_mm").default
    torch.library.opcheck(op, _op_args(family, w, x, bias))
    torch.library.opcheck(op, _op_args(family, w, x.detach(), None))


@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_gradcheck_float64(family):
    _, w = _weight(16, 24, family, 0.5, block=(8, 4), dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    values = w.values.detach().clone().requires_grad_()
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    op = getattr(torch.ops.sparsekit, f"{family}_mm")

    def f(x, values, bias):
        args = list(_op_args(family, w, x, bias))
        args[1 if family == "nm" else 3] = values
        return op(*args)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_schemas_match_the_cpp_definitions():
    for name, schema in SCHEMAS.items():
        got = str(getattr(torch.ops.sparsekit, name).default._schema)
        assert got == f"sparsekit::{name}{schema}", got


def test_every_schema_in_ops_cpp_is_mirrored_in_python():
    """csrc/ops.cpp and sparsekit/ops/_schema.py define the same ops (the Python copy registers them when the
    extension is not built), read from the source so that an op added to one file only is caught."""
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "csrc" / "ops.cpp").read_text()
    defs = ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)) for call in re.findall(r"m\.def\((.*?)\);", src, re.S)]
    cpp = {d[:d.index("(")]: d[d.index("("):] for d in defs}
    cpp.pop("cpu_kernel_isa")   # reports which SIMD kernels the C++ code runs: nothing to mirror without them
    assert cpp and set(cpp) == set(SCHEMAS), sorted(set(cpp) ^ set(SCHEMAS))
    squash = lambda t: re.sub(r"\s+", " ", t).strip()
    for name, schema in cpp.items():
        assert squash(schema) == squash(SCHEMAS[name]), name


def test_extension_kernels_registered_when_built():
    if not _extension.LOADED:
        pytest.skip(f"extension not built: {_extension.LOAD_ERROR}")
    for fam in ("bsr", "csr", "nm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekit::{fam}_mm", "CPU")


def test_dispatch_prefers_cpu_kernel_and_reference_is_always_there():
    _, w = _weight(32, 48, "bsr")
    x = torch.randn(2, 48)
    assert choose("bsr", x, w).name == ("cpu" if has_kernel("bsr_mm", "CPU") else "reference")
    assert choose("bsr", x, w, backend="reference").name == "reference"


def test_forced_backend_error_lists_every_backend():
    _, w = _weight(32, 48, "bsr")
    with pytest.raises(ValueError) as exc:
        sk.ops.bsr_linear(torch.randn(2, 48), w, backend="cuda")
    msg = str(exc.value)
    for name in BACKENDS:
        assert f"  {name}:" in msg
    assert "runs on cuda tensors" in msg


def test_torch_compile_fullgraph():
    dense, w = _weight(32, 48, "bsr")
    x = torch.randn(4, 48)
    fn = torch.compile(lambda x: sk.ops.bsr_linear(x, w), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), F.linear(x, dense), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,exc,match", [
    (lambda w: sk.ops.bsr_linear([[1.0]], w), TypeError, "x must be a torch.Tensor"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 47), w), ValueError, r"x must have shape \[\.\.\., 48\]"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48, dtype=torch.float64), w), TypeError, "dtype"),
    (lambda w: sk.ops.bsr_linear(torch.ones(2, 48, dtype=torch.int32), w), TypeError, "floating"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48), w.to_dense()), TypeError, r"w must be a BSR.*from_dense"),
    (lambda w: sk.ops.csr_linear(torch.randn(2, 48), w), TypeError, "w must be a CSR"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48), w, bias=torch.randn(31)), ValueError, r"bias must have shape"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48), w, bias=torch.randn(32).double()), TypeError, "bias has dtype"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48), w, bias=[0.0] * 32), TypeError, "bias must be a torch.Tensor"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48), w, backend="gpu"), ValueError, "backend must be one of"),
    (lambda w: sk.ops.bsr_linear(torch.randn(2, 48), w, backend=3), TypeError, "backend must be a str"),
    (lambda w: sk.ops.sparse_conv2d(torch.randn(2, 48), w), ValueError, "4-D"),
    (lambda w: sk.ops.sparse_conv2d(torch.randn(1, 5, 8, 8), w), ValueError, "C_in/groups"),
    (lambda w: sk.ops.sparse_conv2d(torch.randn(1, 3, 8, 8), w, stride=0), ValueError, "stride must be >= 1"),
    (lambda w: sk.ops.sparse_conv2d(torch.randn(1, 3, 8, 8), w, groups=2), ValueError, "groups=2 must divide"),
])
def test_bad_input(call, exc, match):
    _, w = _weight(32, 48, "bsr")
    with pytest.raises(exc, match=match):
        call(w)


def test_device_mismatch_is_reported():
    _, w = _weight(32, 48, "bsr")
    meta_x = torch.empty(2, 48, device="meta")
    with pytest.raises(ValueError, match="x is on meta but w is on cpu"):
        sk.ops.bsr_linear(meta_x, w)


def test_no_grad_calls_skip_the_autograd_layer_but_grad_calls_do_not():
    """call_op goes below autograd only when no gradient can flow; results are the same either way."""
    from sparsekit.ops._library import _needs_autograd_layer

    w = BSR.from_dense(torch.randn(32, 48) * (torch.rand(32, 48) > 0.5), (16, 16))
    x = torch.randn(5, 48)
    values = w.values.clone().requires_grad_()
    assert _needs_autograd_layer((x, values))
    with torch.no_grad():
        assert not _needs_autograd_layer((x, values))
        y0 = sk.ops.bsr_linear(x, BSR(values, w.crow_indices, w.col_indices, w.shape))
    assert y0.grad_fn is None
    y1 = sk.ops.bsr_linear(x, BSR(values, w.crow_indices, w.col_indices, w.shape))
    assert y1.grad_fn is not None
    y1.sum().backward()
    assert values.grad is not None and values.grad.shape == values.shape
    torch.testing.assert_close(y0, y1.detach())


# ------------------------------------------------------------------------- bad input: conv bias, dense weights
def _grouped_weights():
    dense = torch.randn(16, 36) * (torch.rand(16, 36) < 0.5)    # a 3x3 conv, 4 input channels per group
    return {"bsr": BSR.from_dense(dense, (8, 4)), "csr": CSR.from_dense(dense), "nm": NM.from_dense(
        NM.prune(dense, 2, 4), 2, 4), "dense": dense}


@pytest.mark.parametrize("family", ["bsr", "csr", "nm", "dense"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias, exc, match", [
    (torch.randn(20), ValueError, r"sparse_conv2d: bias must have shape \(16,\) \(C_out = w.shape\[0\]\), got \(20,\)"),
    (torch.randn(16, 1), ValueError, r"sparse_conv2d: bias must have shape \(16,\).*got \(16, 1\)"),
    (torch.randn(16, dtype=torch.float64), TypeError, "sparse_conv2d: bias has dtype torch.float64, expected "
                                                      "torch.float32"),
    ([0.0] * 16, TypeError, "sparse_conv2d: bias must be a torch.Tensor or None, got list"),
])
def test_conv_bias_is_checked_whole(family, groups, bias, exc, match):
    """The per-group paths slice the bias: a wrong one must be caught before (not truncated or cast)."""
    w = _grouped_weights()[family]
    x = torch.randn(2, 4 * groups, 7, 7)    # 4 channels per group, 3x3 kernel: K = 36
    with pytest.raises(exc, match=match):
        sk.ops.sparse_conv2d(x, w, bias, 1, 1, 1, groups)


@pytest.mark.parametrize("family", ["bsr", "csr", "dense"])
def test_conv_rejects_integer_x(family):
    w = _grouped_weights()[family]
    with pytest.raises(TypeError, match="sparse_conv2d: x must be a floating tensor, got torch.int64"):
        sk.ops.sparse_conv2d(torch.ones(2, 8, 7, 7, dtype=torch.int64), w, None, 1, 1, 1, 2)


def test_dense_weight_checks_backend_and_bias():
    """A dense weight runs F.linear / F.unfold whatever the backend, but a bad name or bias is still an error."""
    w, x, x4 = torch.randn(16, 32), torch.randn(3, 32), torch.randn(2, 8, 5, 5)
    names = r"\['cpu', 'cuda', 'cusparselt', 'reference', 'triton'\]"
    with pytest.raises(ValueError, match=rf"sparse_linear: backend must be one of {names} or None, got 'bogus'"):
        sk.ops.sparse_linear(x, w, backend="bogus")
    with pytest.raises(ValueError, match=rf"sparse_conv2d: backend must be one of {names} or None, got 'bogus'"):
        sk.ops.sparse_conv2d(x4, w, kernel_size=(2, 2), backend="bogus")
    with pytest.raises(TypeError, match="backend must be a str"):
        sk.ops.sparse_linear(x, w, backend=1)
    with pytest.raises(TypeError, match="sparse_linear: bias has dtype torch.float64"):
        sk.ops.sparse_linear(x.reshape(3, 1, 32), w, torch.randn(16, dtype=torch.float64))
    with pytest.raises(TypeError, match="sparse_conv2d: bias has dtype torch.float64"):
        sk.ops.sparse_conv2d(x4, w[:, :8], torch.randn(16, dtype=torch.float64))   # 1x1
    torch.testing.assert_close(sk.ops.sparse_linear(x, w, backend="cpu"), F.linear(x, w))   # a known name is fine


def test_channel_index_backend_message_names_what_it_accepts():
    from sparsekit.formats import ChannelIndex

    w = ChannelIndex.from_dense(torch.randn(16, 32) * (torch.arange(16) % 2)[:, None])
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match=r"backend must be one of \['reference'\] or None, got 'cpu'"):
        sk.ops.sparse_linear(x, w, backend="cpu")
    torch.testing.assert_close(sk.ops.sparse_linear(x, w, backend="reference"), F.linear(x, w.to_dense()))


def test_reference_mm_xt_and_conv2d_bias():
    from sparsekit.ops import reference as R
    torch.manual_seed(0)
    d = torch.randn(8, 12, dtype=torch.float64) * (torch.rand(8, 12) < 0.5)
    w = BSR.from_dense(d, (4, 4))
    xt, bias = torch.randn(2, 12, 5, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(R.bsr_mm_xt(xt, w.crow_indices, w.col_indices, w.values, bias, 8),
                               d @ xt + bias[:, None])
    dc = torch.randn(8, 4 * 9, dtype=torch.float64) * (torch.rand(8, 36) < 0.5)
    wc = BSR.from_dense(dc, (4, 4))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(R.bsr_conv2d(x, wc.crow_indices, wc.col_indices, wc.values, bias, [3, 3], [1, 1],
                                            [1, 1]),
                               torch.nn.functional.conv2d(x, dc.reshape(8, 4, 3, 3), bias, padding=1))


def test_dense_weight_path_names_a_bias_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"sparse_linear: bias must have shape \(3,\)"):
        sk.ops.sparse_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(5))


def _with_values(w, values):
    fields = {k: getattr(w, k) for k in w.__dataclass_fields__ if k != "values"}
    return type(w)(values=values, **fields)


@pytest.mark.parametrize("fmt", ["bsr", "csr", "nm"])
def test_second_order_gradients_through_the_cpu_kernels(fmt):
    """The backward ops are differentiable too: create_graph=True (Hessian-vector products, the hessian
    criterion) gives the reference's second-order gradients, not zeros."""
    torch.manual_seed(0)
    w = torch.randn(8, 12, dtype=torch.float64)
    w[torch.rand_like(w) < 0.5] = 0
    sparse = {"bsr": lambda: BSR.from_dense(w, block=(4, 4)), "csr": lambda: CSR.from_dense(w),
              "nm": lambda: NM.from_dense(NM.prune(w, 2, 4), 2, 4)}[fmt]()
    op = {"bsr": sk.ops.bsr_linear, "csr": sk.ops.csr_linear, "nm": sk.ops.nm_linear}[fmt]
    x = torch.randn(5, 12, dtype=torch.float64)
    xv, v = x.clone().requires_grad_(True), sparse.values.clone().requires_grad_(True)
    y = op(xv, _with_values(sparse, v), None, backend="cpu")
    (gx,) = torch.autograd.grad(y.square().sum(), xv, create_graph=True)
    g_v, g_x = torch.autograd.grad(gx.square().sum(), [v, xv])
    # plain torch on the dense weight: the same second-order gradients, dW on the pattern
    dense = sparse.to_dense().clone().requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    (gxd,) = torch.autograd.grad((xd @ dense.T).square().sum(), xd, create_graph=True)
    g_w, g_xd = torch.autograd.grad(gxd.square().sum(), [dense, xd])
    assert g_x.abs().max() > 0 and g_v.abs().max() > 0
    torch.testing.assert_close(g_x, g_xd)
    stored = _with_values(sparse, torch.ones_like(sparse.values)).to_dense() != 0     # (explicit zeros included)
    torch.testing.assert_close(_with_values(sparse, g_v).to_dense(), g_w * stored)
    inputs = (x[:3].clone().requires_grad_(True), sparse.values.clone().requires_grad_(True))
    assert torch.autograd.gradgradcheck(lambda xx, vv: op(xx, _with_values(sparse, vv), None, backend="cpu"), inputs)


def test_forward_mode_ad_is_refused_not_zero():
    w = CSR.from_dense(torch.eye(4, 6))
    x, t = torch.randn(3, 6), torch.randn(3, 6)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda a: sk.ops.csr_linear(a, w), (x,), (t,))
    head, th = torch.randn(3, 4), torch.randn(3, 4)       # a sparse op on inputs the primal does not reach runs
    _, tangent = torch.func.jvp(lambda h: h * 2 + sk.ops.csr_linear(x, w), (head,), (th,))
    torch.testing.assert_close(tangent, 2 * th)
    import torch.autograd.forward_ad as fwAD
    sk.ops.csr_linear(x, w)
    sk.ops.csr_linear(x, w)                         # remembered: the next call with x's layout is a repeat
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        sk.ops.csr_linear(fwAD.make_dual(x, t), w)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            sk.ops.csr_linear(fwAD.make_dual(x, t), w, backend="reference")
        assert sk.ops.csr_linear(x, w).shape == (3, 4)          # plain tensors inside a dual level run


def test_edge_inputs_of_the_linear_faces():
    y = sk.ops.bsr_linear(torch.randn(2, 3, 0), BSR.from_dense(torch.zeros(8, 0), block=(4, 1)))
    assert y.shape == (2, 3, 8) and not y.any()                      # K = 0 with a 3-D x, as F.linear
    bad = BSR.from_dense(torch.randn(8, 8), block=(4, 4))
    bad = BSR(values=bad.values.reshape(bad.values.shape[0], -1), crow_indices=bad.crow_indices,
              col_indices=bad.col_indices, shape=bad.shape)
    with pytest.raises(ValueError, match="inconsistent BSR"):
        sk.ops.bsr_linear(torch.randn(2, 8), bad)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        sk.ops.sparse_linear([[1.0] * 4], torch.randn(3, 4), torch.randn(3))
    with pytest.raises(TypeError, match="y must be a floating tensor"):
        sk.ops.channel_scatter(torch.ones(2, 3, dtype=torch.int64), torch.arange(3), 5)
    with pytest.raises(ValueError, match="n_out must be a non-negative int, got -1"):
        sk.ops.channel_scatter(torch.ones(2, 3), torch.arange(3), -1)
