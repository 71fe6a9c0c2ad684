"""Registers the sparsekit ops with torch.library: schemas (when the C++ extension did not), fake (meta)
implementations, autograd formulas, and the pure-PyTorch reference as the CompositeExplicitAutograd kernel
(used for any device that has no dedicated kernel, e.g. the backward ops on CUDA before those kernels land).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _extension
from . import reference
from ._schema import SCHEMAS

_extension.load()
_LIB_DEF = torch.library.Library("sparsekit", "FRAGMENT")  # defines only what C++ did not


def _op(name: str):
    return getattr(torch.ops.sparsekit, name).default


def _is_defined(name: str) -> bool:
    try:
        _op(name)
    except (AttributeError, RuntimeError):
        return False
    return True


_KERNELS: dict[tuple[str, str], bool] = {}


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when op `name` has a kernel registered for `dispatch_key` ("CPU", "CUDA") itself.

    Cached in a plain dict so the dispatcher stays traceable by torch.compile (registrations happen at import).
    """
    key = (name, dispatch_key)
    if key not in _KERNELS:
        _KERNELS[key] = _is_defined(name) and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"sparsekit::{name}", dispatch_key)
    return _KERNELS[key]


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def call_op(op, *args, eager: Callable | None = None):
    """``op(*args)``, below torch's (Python) autograd layer when no gradient can flow through the call.

    Every sparsekit op's autograd formula is registered from Python, so even under no_grad each call pays a
    Python autograd kernel (~5 µs, as much as a small kernel's work). Eager calls on plain tensors that need
    no gradient skip it; tracing (torch.compile / export: FakeTensors, subclasses) and functorch transforms
    take the ordinary path. ``eager``: the body of a Python-defined op (torch.library.custom_op), run directly
    on that fast path unless a torch function / dispatch mode is active (which must see the op): the custom-op
    layer alone costs tens of microseconds per call."""
    if _needs_autograd_layer(args) or torch.autograd.forward_ad._current_level >= 0:
        _refuse_forward_ad(op, args)
        return op(*args)
    if eager is not None and not _modes_active() and _all_plain(args):
        if torch.autograd._profiler_enabled():   # a trace still names the op
            with torch.autograd.profiler.record_function(getattr(op, "_qualname", None) or str(op)):
                return eager(*args)
        return eager(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _modes_active() -> bool:
    return torch._C._len_torch_function_stack() > 0 or torch._C._len_torch_dispatch_stack() > 0


def _all_plain(args: tuple) -> bool:
    # a tensor subclass anywhere (a weight or bias with __torch_function__ / __torch_dispatch__) must see the op
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor))


def _refuse_forward_ad(op, args: tuple) -> None:
    """sparsekit's ops have reverse-mode formulas only: under forward-mode AD (torch.func.jvp / jacfwd,
    torch.autograd.forward_ad dual tensors) their tangent would come out as zero or be dropped. Say so."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    jvp = False
    if torch._C._are_functorch_transforms_active():
        # a torch.func.jvp anywhere in the transform stack whose level some input carries (inputs that do not
        # depend on the primals have a zero tangent, correctly: they run)
        levels = {interp.level() for interp in torch._C._functorch.get_interpreter_stack() or ()
                  if interp.key() == torch._C._functorch.TransformType.Jvp}
        jvp = bool(levels) and any(_carries_level(t, levels) for t in tensors)
    elif torch.autograd.forward_ad._current_level >= 0:
        jvp = any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if jvp:
        raise NotImplementedError(f"{op}: forward-mode AD (torch.func.jvp / jacfwd, forward_ad dual tensors) is "
                                  "not supported by sparsekit's ops; use reverse mode (torch.autograd.grad, "
                                  "torch.func.grad / jacrev)")


def _carries_level(t: Tensor, levels: set[int]) -> bool:
    """Whether functorch wrapper ``t`` (or a wrapper inside it) belongs to one of ``levels``."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.maybe_get_level(t) in levels:
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def _needs_autograd_layer(args: tuple) -> bool:
    # args[0] is the activation: a FakeTensor / FunctionalTensor there means tracing (the weights are traced too)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
            or type(args[0]) not in _PLAIN_TENSORS:
        return True
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


for _name, _schema in SCHEMAS.items():
    if not _is_defined(_name):
        _LIB_DEF.define(_name + _schema)
    torch.library.impl(f"sparsekit::{_name}", "CompositeExplicitAutograd", lib=_LIB_DEF)(reference.REFERENCES[_name])


# ------------------------------------------------------------------------------------------------ fakes
def _fake_mm(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


def _fake_mm_t(dy: Tensor, crow: Tensor, col: Tensor, values: Tensor, k: int) -> Tensor:
    return dy.new_empty(dy.shape[0], k)


@torch.library.register_fake("sparsekit::bsr_sddmm")
def _fake_bsr_sddmm(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, block_n: int, block_k: int) -> Tensor:
    return dy.new_empty(col.shape[0], block_n, block_k)


@torch.library.register_fake("sparsekit::csr_sddmm")
def _fake_csr_sddmm(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    return dy.new_empty(col.shape[0])


@torch.library.register_fake("sparsekit::csr_bitmap_mm")
def _fake_csr_bitmap_mm(x: Tensor, crow: Tensor, col: Tensor, bitmap: Tensor, values: Tensor, bias: Tensor | None,
                        n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


@torch.library.register_fake("sparsekit::nm_mm")
def _fake_nm_mm(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, n: int, m: int) -> Tensor:
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.register_fake("sparsekit::nm_mm_t")
def _fake_nm_mm_t(dy: Tensor, values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    return dy.new_empty(dy.shape[0], values.shape[1] // n * m)


@torch.library.register_fake("sparsekit::nm_sddmm")
def _fake_nm_sddmm(dy: Tensor, x: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    return dy.new_empty(indices.shape)


def _fake_mm_xt(xt: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return xt.new_empty(xt.shape[0], n, xt.shape[2])


def _fake_mm_xt_tiled(xt: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int,
                      sizes: list[int], kernel: list[int]) -> Tensor:
    # the C++ op's checks (tap_tiling.h), so a traced call fails where the eager one would
    torch._check(1 <= len(sizes) <= 3 and len(kernel) == len(sizes), lambda: f"mm_xt_tiled: sizes and kernel must "
                 f"both have 1 to 3 entries (the spatial dims), got sizes={list(sizes)} and kernel={list(kernel)}")
    torch._check(all(k >= 1 for k in kernel), lambda: f"mm_xt_tiled: kernel must be >= 1 in every dim, got "
                 f"{list(kernel)}")
    for size in sizes:
        torch._check(size >= 0, lambda: f"mm_xt_tiled: sizes must be >= 0, got {list(sizes)}")
    taps = math.prod(kernel)
    torch._check(math.prod(sizes) == xt.shape[2], lambda: f"mm_xt_tiled: xt.size(2) must be prod(sizes) = "
                 f"{math.prod(sizes)}")
    torch._check(n % taps == 0, lambda: f"mm_xt_tiled: n must be a multiple of prod(kernel) = {taps}")
    return xt.new_empty(xt.shape[0], n // taps, *(s * k for s, k in zip(sizes, kernel)))


def _fake_conv(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, kernel_size: list[int],
               padding: list[int], dilation: list[int], stride: list[int] | None = None) -> Tensor:
    n = (crow.shape[0] - 1) * (values.shape[1] if values.dim() == 3 else 1)
    stride = stride or [1] * len(kernel_size)
    torch._check(x.dim() == len(kernel_size) + 2, lambda: f"conv: x has {x.dim()} dims for a {len(kernel_size)}-D conv")
    torch._check(all(s >= 1 for s in stride), lambda: f"conv: stride must be >= 1, got {list(stride)}")
    return x.new_empty(x.shape[0], n, *reference.conv_out_size(x.shape[2:], kernel_size, stride, padding, dilation))


for _fam in ("bsr", "csr"):
    torch.library.register_fake(f"sparsekit::{_fam}_conv2d")(_fake_conv)
    torch.library.register_fake(f"sparsekit::{_fam}_conv3d")(_fake_conv)
    torch.library.register_fake(f"sparsekit::{_fam}_mm")(_fake_mm)
    torch.library.register_fake(f"sparsekit::{_fam}_mm_t")(_fake_mm_t)
    torch.library.register_fake(f"sparsekit::{_fam}_mm_xt")(_fake_mm_xt)
    torch.library.register_fake(f"sparsekit::{_fam}_mm_xt_tiled")(_fake_mm_xt_tiled)


@torch.library.register_fake("sparsekit::channel_gather_conv2d")
def _fake_channel_gather_conv2d(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None,
                                out_idx: Tensor | None, n_out: int | None, stride: list[int], padding: list[int],
                                dilation: list[int], groups: int) -> Tensor:
    torch._check((out_idx is None) == (n_out is None),
                 lambda: "channel_gather_conv2d: out_idx and n_out must be given together")
    out = reference.conv_out_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    width = weight.shape[0] if out_idx is None else n_out
    return torch.empty((x.shape[0], width, *out), dtype=x.dtype, device=x.device,
                       memory_format=reference.channel_conv_memory_format(x))


# --------------------------------------------------------------------------------------------- autograd
# Forward y = x @ W^T + b.  dx = dy @ W (the *_mm_t op), dW = dy^T @ x on W's pattern (the *_sddmm op).
def setup_indexed(ctx, inputs, output) -> None:
    x, crow, col, values, bias, _n = inputs
    ctx.save_for_backward(x, crow, col, values)
    ctx.has_bias = bias is not None


def _sparse_grads(dy: Tensor, x, crow: Tensor, col: Tensor, values: Tensor, k: int, need_x: bool,
                  need_v: bool) -> tuple[Tensor | None, Tensor | None]:
    """For y = x @ W^T in row layout (dy [M, N]): dx = dy @ W and dW = dy^T @ x on W's pattern, through the
    *_mm_t / *_sddmm ops of W's family (BSR values are 3-D, CSR values 1-D). ``x`` may be a callable, so a
    caller builds it only when dW is needed."""
    family = "bsr" if values.dim() == 3 else "csr"
    dx = call_op(_op(f"{family}_mm_t"), dy, crow, col, values, k) if need_x else None
    dv = None
    if need_v:
        x = x() if callable(x) else x
        blocks = (values.shape[1], values.shape[2]) if family == "bsr" else ()
        dv = call_op(_op(f"{family}_sddmm"), dy, x, crow, col, *blocks)
    return dx, dv


def _indexed_grads(ctx, dy: Tensor, need_x: bool, need_v: bool, need_b: bool) -> tuple:
    x, crow, col, values = ctx.saved_tensors
    dy = dy.contiguous()
    dx, dv = _sparse_grads(dy, x, crow, col, values, x.shape[1], need_x, need_v)
    db = dy.sum(0) if ctx.has_bias and need_b else None
    return dx, dv, db


def indexed_backward(ctx, dy: Tensor):
    """Backward of bsr_mm / csr_mm."""
    need_x, _, _, need_v, need_b, _ = ctx.needs_input_grad
    dx, dv, db = _indexed_grads(ctx, dy, need_x, need_v, need_b)
    return dx, None, None, dv, db, None



# The backward ops are differentiable too (second-order gradients: create_graph=True, Hessian-vector products).
# z = dy @ W (*_mm_t): d dy = dz @ W^T (*_mm), dW = dy^T @ dz on the pattern (*_sddmm).
# v = (dy^T @ x) on the pattern (*_sddmm), V the sparse matrix of v: d dy = x @ dV^T (*_mm), dx = dy @ dV (*_mm_t).
def _mm_t_setup(ctx, inputs, output) -> None:
    dy, crow, col, values, _k = inputs
    ctx.save_for_backward(dy, crow, col, values)


def _mm_t_backward(ctx, dz: Tensor):
    dy, crow, col, values = ctx.saved_tensors
    family = "bsr" if values.dim() == 3 else "csr"
    need_dy, _, _, need_v, _ = ctx.needs_input_grad
    dz = dz.contiguous()
    d_dy = call_op(_op(f"{family}_mm"), dz, crow, col, values, None, dy.shape[1]) if need_dy else None
    blocks = (values.shape[1], values.shape[2]) if family == "bsr" else ()
    d_v = call_op(_op(f"{family}_sddmm"), dy, dz, crow, col, *blocks) if need_v else None
    return d_dy, None, None, d_v, None


def _sddmm_setup(ctx, inputs, output) -> None:
    dy, x, crow, col, *blocks = inputs
    ctx.save_for_backward(dy, x, crow, col)
    ctx.blocks = tuple(blocks)


def _sddmm_backward(ctx, dv: Tensor):
    dy, x, crow, col = ctx.saved_tensors
    family = "bsr" if ctx.blocks else "csr"
    need_dy, need_x = ctx.needs_input_grad[:2]
    dv = dv.contiguous()
    d_dy = call_op(_op(f"{family}_mm"), x, crow, col, dv, None, dy.shape[1]) if need_dy else None
    d_x = call_op(_op(f"{family}_mm_t"), dy, crow, col, dv, x.shape[1]) if need_x else None
    return (d_dy, d_x, None, None) + (None,) * len(ctx.blocks)


def _nm_pair_setup(ctx, inputs, output) -> None:
    """nm_mm_t (dy, values, indices, n, m) and nm_sddmm (dy, x, indices, n, m): three tensors and the pattern."""
    a, b, indices, n, m = inputs
    ctx.save_for_backward(a, b, indices)
    ctx.nm = (n, m)


def _nm_t_backward(ctx, dz: Tensor):
    dy, values, indices = ctx.saved_tensors
    n, m = ctx.nm
    need_dy, need_v = ctx.needs_input_grad[:2]
    dz = dz.contiguous()
    d_dy = call_op(_op("nm_mm"), dz, values, indices, None, n, m) if need_dy else None
    d_v = call_op(_op("nm_sddmm"), dy, dz, indices, n, m) if need_v else None
    return d_dy, d_v, None, None, None


def _nm_sddmm_backward(ctx, dv: Tensor):
    dy, x, indices = ctx.saved_tensors
    n, m = ctx.nm
    need_dy, need_x = ctx.needs_input_grad[:2]
    dv = dv.contiguous()
    d_dy = call_op(_op("nm_mm"), x, dv, indices, None, n, m) if need_dy else None
    d_x = call_op(_op("nm_mm_t"), dy, dv, indices, n, m) if need_x else None
    return d_dy, d_x, None, None, None


def _bitmap_setup(ctx, inputs, output) -> None:
    x, crow, col, _bitmap, values, bias, n = inputs
    setup_indexed(ctx, (x, crow, col, values, bias, n), output)


def _bitmap_backward(ctx, dy: Tensor):
    """Backward of csr_bitmap_mm: csr_mm's (the bitmap only changes how the forward reads the pattern)."""
    need_x, _, _, _, need_v, need_b, _ = ctx.needs_input_grad
    dx, dv, db = _indexed_grads(ctx, dy, need_x, need_v, need_b)
    return dx, None, None, None, dv, db, None


def _xt_backward(ctx, dyt: Tensor):
    """y^T = W @ x^T per image: the row-layout backward ops on [B*M, .] views (dy = dyt^T, x = xt^T)."""
    xt, crow, col, values = ctx.saved_tensors
    b, k, m = xt.shape
    n = dyt.shape[1]
    need_x, _, _, need_v, need_b = ctx.needs_input_grad[:5]
    dy = dyt.transpose(1, 2).reshape(b * m, n).contiguous()
    db = None
    dx, dv = _sparse_grads(dy, lambda: xt.transpose(1, 2).reshape(b * m, k).contiguous(), crow, col, values, k,
                           need_x, need_v)
    if dx is not None:
        dx = dx.reshape(b, m, k).transpose(1, 2)
    if ctx.has_bias and need_b:
        db = dyt.sum((0, 2))
    return dx, None, None, dv, db, None


def _xt_tiled_setup(ctx, inputs, output) -> None:
    setup_indexed(ctx, inputs[:6], output)
    ctx.tiles = (tuple(inputs[6]), tuple(inputs[7]))


def _xt_tiled_backward(ctx, dy: Tensor):
    """*_mm_xt_tiled = tile_taps(*_mm_xt): dy's taps untiled back into columns, then *_mm_xt's backward."""
    return _xt_backward(ctx, reference.untile_taps(dy, *ctx.tiles)) + (None, None)


def _conv_setup(ctx, inputs, output) -> None:
    x, crow, col, values, bias, kernel_size, padding, dilation, *stride = inputs
    ctx.save_for_backward(x, crow, col, values)
    ctx.has_bias = bias is not None
    nd = len(kernel_size)
    ctx.conv = (tuple(kernel_size), tuple(padding), tuple(dilation), tuple(stride[0]) if stride else (1,) * nd)


def _col2im(dcols: Tensor, x_shape: torch.Size, out: Sequence[int], kernel: tuple[int, ...],
            padding: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """The adjoint of the patch matrix: dcols [B, L = prod(out), C*prod(kernel)] summed back into the input's
    positions (F.fold in 2-D; in 3-D one strided add into the padded input per kernel tap)."""
    from torch.nn.functional import fold

    b, c = x_shape[:2]
    if len(kernel) == 2:
        return fold(dcols.transpose(1, 2), tuple(x_shape[2:]), kernel, dilation, padding, stride)
    padded = [n + 2 * p for n, p in zip(x_shape[2:], padding)]
    taps = dcols.reshape(b, *out, c, *kernel)                       # columns ordered (c, kd, kh, kw)
    dx = dcols.new_zeros(b, c, *padded)
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out))
        dx[(slice(None), slice(None), *window)] += taps[(..., *tap)].movedim(-1, 1)
    return dx[(slice(None), slice(None), *(slice(p, p + n) for n, p in zip(x_shape[2:], padding)))]


def _conv_backward(ctx, dy: Tensor):
    """conv = W @ im2col(x) per image: dx = col2im(W^T @ dy), dW = dy @ im2col(x)^T on W's pattern."""
    from .conv import _patches

    x, crow, col, values = ctx.saved_tensors
    ks, pad, dil, st = ctx.conv
    b, c = x.shape[:2]
    n, length, k = dy.shape[1], math.prod(dy.shape[2:]), c * math.prod(ks)
    need_x, _, _, need_v, need_b = ctx.needs_input_grad[:5]
    dy2 = dy.reshape(b, n, length).transpose(1, 2).reshape(b * length, n).contiguous()
    db = None
    dcols, dv = _sparse_grads(dy2, lambda: _patches(x, ks, dil, pad, st).reshape(b * length, k).contiguous(),
                              crow, col, values, k, need_x, need_v)
    dx = None if dcols is None else _col2im(dcols.reshape(b, length, k), x.shape, dy.shape[2:], ks, pad, dil, st)
    if ctx.has_bias and need_b:
        db = dy.sum((0, *range(2, dy.dim())))
    # one entry per input: the dispatcher drops a trailing stride equal to its default before autograd sees it
    return (dx, None, None, dv, db) + (None,) * (len(ctx.needs_input_grad) - 5)


def _nm_setup(ctx, inputs, output) -> None:
    x, values, indices, bias, n, m = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.has_bias = bias is not None
    ctx.nm = (n, m)


def _nm_backward(ctx, dy: Tensor):
    x, values, indices = ctx.saved_tensors
    n, m = ctx.nm
    dy = dy.contiguous()
    need_x, need_v, _, need_b, _, _ = ctx.needs_input_grad
    dx = call_op(_op("nm_mm_t"), dy, values, indices, n, m) if need_x else None
    dv = call_op(_op("nm_sddmm"), dy, x, indices, n, m) if need_v else None
    db = dy.sum(0) if ctx.has_bias and need_b else None
    return dx, dv, None, db, None, None


def _channel_conv_setup(ctx, inputs, output) -> None:
    x, in_idx, weight, bias, out_idx, _n_out, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, in_idx, weight, out_idx)
    ctx.has_bias = bias is not None
    ctx.conv = (list(stride), list(padding), list(dilation), groups)


def _channel_conv_backward(ctx, dy: Tensor):
    """y = conv2d(x[:, in_idx], weight, bias): torch's convolution_backward on the gathered operand, dx scattered
    back with index_add (a repeated in_idx entry sums). The gathered x is built only when dweight is needed."""
    x, in_idx, weight, out_idx = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    if out_idx is not None:
        dy = dy.index_select(1, out_idx)
    shape = (x.shape[0], in_idx.shape[0], x.shape[2], x.shape[3])
    xs = x.index_select(1, in_idx) if need_w else dy.new_empty(1).expand(shape)
    dxs, dw, db = torch.ops.aten.convolution_backward(
        dy, xs, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0], groups,
        [need_x, need_w, need_b])
    dx = x.new_zeros(x.shape).index_add(1, in_idx, dxs) if need_x else None
    return dx, None, dw, db if need_b else None, None, None, None, None, None, None


torch.library.register_autograd("sparsekit::bsr_mm", indexed_backward, setup_context=setup_indexed)
torch.library.register_autograd("sparsekit::csr_mm", indexed_backward, setup_context=setup_indexed)
torch.library.register_autograd("sparsekit::csr_bitmap_mm", _bitmap_backward, setup_context=_bitmap_setup)
torch.library.register_autograd("sparsekit::bsr_mm_xt", _xt_backward, setup_context=setup_indexed)
torch.library.register_autograd("sparsekit::csr_mm_xt", _xt_backward, setup_context=setup_indexed)
for _fam in ("bsr", "csr"):
    torch.library.register_autograd(f"sparsekit::{_fam}_mm_xt_tiled", _xt_tiled_backward,
                                    setup_context=_xt_tiled_setup)
for _fam in ("bsr", "csr"):
    for _nd in (2, 3):
        torch.library.register_autograd(f"sparsekit::{_fam}_conv{_nd}d", _conv_backward, setup_context=_conv_setup)
torch.library.register_autograd("sparsekit::nm_mm", _nm_backward, setup_context=_nm_setup)
for _fam in ("bsr", "csr"):
    torch.library.register_autograd(f"sparsekit::{_fam}_mm_t", _mm_t_backward, setup_context=_mm_t_setup)
    torch.library.register_autograd(f"sparsekit::{_fam}_sddmm", _sddmm_backward, setup_context=_sddmm_setup)
torch.library.register_autograd("sparsekit::nm_mm_t", _nm_t_backward, setup_context=_nm_pair_setup)
torch.library.register_autograd("sparsekit::nm_sddmm", _nm_sddmm_backward, setup_context=_nm_pair_setup)
torch.library.register_autograd("sparsekit::channel_gather_conv2d", _channel_conv_backward,
                                setup_context=_channel_conv_setup)

@torch.library.register_fake("sparsekit::rnn_cell")
def _fake_rnn_cell(gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    hidden = gi.shape[1] // (4 if mode == 0 else 3 if mode == 1 else 1)
    return gi.new_empty(gi.shape[0], hidden), gi.new_empty((gi.shape[0], hidden) if mode == 0 else (0,))


def _rnn_cell_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:3], inputs[3] if inputs[3] is not None else None)
    ctx.mode = inputs[4]


def _rnn_cell_backward(ctx, dh: Tensor, dc: Tensor):
    # the gates are recomputed by the reference under autograd (a pointwise step: cheap next to the products); a
    # second-order graph (create_graph) is built from the saved inputs themselves, else from detached copies
    saved = ctx.saved_tensors
    create = torch.is_grad_enabled()
    need = ctx.needs_input_grad[:4]
    if create:
        ins = list(saved)
    else:
        ins = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(saved, need)]
    with torch.enable_grad():
        outs = reference.rnn_cell(*ins, ctx.mode)
    pairs = [(o, g) for o, g in zip(outs, (dh, dc)) if g is not None and o.numel() and o.requires_grad]
    wrt = [t for t, n in zip(ins, need) if n and t is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                     create_graph=create) if pairs and wrt else [None] * len(wrt))
    return (*(next(grads) if n and t is not None else None for t, n in zip(ins, need)), None)


torch.library.register_autograd("sparsekit::rnn_cell", _rnn_cell_backward, setup_context=_rnn_cell_setup)

for _name in SCHEMAS:  # fill the cache now, outside any torch.compile trace
    for _key in ("CPU", "CUDA"):
        has_kernel(_name, _key)
