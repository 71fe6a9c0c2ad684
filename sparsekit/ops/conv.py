"""Sparse 2-D and 3-D convolution: a sparse weight over [C_out, C_in/groups * prod(kernel)] times im2col patches.

On CPU with a BSR/CSR weight, 1x1(x1) convolutions without padding read the (subsampled) NCHW / NCDHW pixels as
x^T [B, C_in, L] for *_mm_xt, which writes y^T = [B, C_out, L] directly; all others run the direct ops
sparsekit::{bsr,csr}_conv2d / _conv3d (im2col panels read from a padded copy of the image inside the kernel; a
strided convolution as a stride-1 one over the image's stride phases): no unfold, no transposes of patches or
outputs. bfloat16 BSR with blocks of 16-multiples runs on AMX tiles where the CPU has them (csrc/cpu/amx.h; the
stride-1 im2col matrix packed straight from the image, strided 2-D ones through im2col; 3-D ones only stride-1
and up to 24 MiB of packed im2col per image, the rest on the SIMD direct kernel).
Elsewhere, 1x1(x1) convolutions without padding go straight to the sparse GEMM over channels-last pixels;
the general case builds the patch matrix (F.unfold in 2-D, strided views in 3-D) and runs the sparse GEMM per
group. Gradients flow through the sparse ops' autograd (x, the format's values and bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import BSR, CSR, NM, ChannelIndex
from ._dispatch import check_backend
from ._library import call_op, has_kernel
from .linear import BACKEND_NAMES, _check_structure, check_bias, sparse_linear
from .reference import conv_out_size

_Pair = int | tuple[int, int]
_Triple = int | tuple[int, int, int]
_ARITY = {2: "a pair", 3: "a triple"}


def _ntuple(fn: str, name: str, v: object, minimum: int, nd: int) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,) * nd
    if (not isinstance(v, (tuple, list)) or len(v) != nd
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{fn}: {name} must be an int or {_ARITY[nd]} of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {tuple(v)}")
    return tuple(int(i) for i in v)


def _kernel_size(fn: str, w, c_in: int, groups: int, kernel_size: object, nd: int) -> tuple[int, ...]:
    per_group = c_in // groups
    k = w.shape[1]
    dims = "*".join(("kd", "kh", "kw")[3 - nd:])
    if kernel_size is not None:
        ks = _ntuple(fn, "kernel_size", kernel_size, 1, nd)
        if per_group * math.prod(ks) != k:
            raise ValueError(f"{fn}: w has K={k} columns but C_in/groups*{dims} = "
                             f"{per_group}*{'*'.join(map(str, ks))} = {per_group * math.prod(ks)}")
        return ks
    if k % per_group:
        raise ValueError(f"{fn}: w has K={k} columns, not a multiple of C_in/groups={per_group} "
                         f"(x has {c_in} channels, groups={groups}); w must be over [C_out, C_in/groups*{dims}]")
    taps = k // per_group
    side = round(taps ** (1 / nd))
    if side ** nd != taps:
        shape = "square" if nd == 2 else "cubic"
        raise ValueError(f"{fn}: cannot infer a {shape} kernel from K={k} and C_in/groups={per_group}; "
                         f"pass kernel_size=({', '.join(dims.split('*'))})")
    return (side,) * nd


def group_starts(w: BSR | CSR, groups: int) -> tuple[int, ...]:
    """Where each of ``groups`` equal row groups of ``w`` starts in w.values / w.col_indices, plus nnz at the end
    (groups + 1 Python ints, read from w.crow_indices: eager only)."""
    unit = w.block[0] if isinstance(w, BSR) else 1
    n_g = w.shape[0] // groups
    if n_g % unit:
        raise ValueError(f"sparse_conv: with groups, each group's C_out ({n_g}) must be a multiple "
                         f"of the block rows ({unit})")
    return tuple(int(v) for v in w.crow_indices[::n_g // unit].tolist()) if n_g else (0,) * (groups + 1)


def _entry_starts(w: object, groups: int) -> tuple[int, ...] | None:
    """group_starts for a BSR/CSR weight (None for the others, whose groups are plain row slices). A trace
    (torch.export, torch.compile) cannot read tensor data, so it takes the offsets SparseConv2d computed when it
    was built or loaded, kept on w as ``_group_starts = (groups, starts)``."""
    if not isinstance(w, (BSR, CSR)):
        return None
    hint = w.__dict__.get("_group_starts")
    if torch.compiler.is_compiling() and hint is not None and hint[0] == groups \
            and hint[1][-1] == w.values.shape[0]:
        return hint[1]
    return group_starts(w, groups)


def _rows(w, start: int, stop: int, entries: tuple[int, int] | None = None):
    """The sub-weight of output rows [start, stop), sharing (and differentiable through) w's values; for BSR/CSR
    ``entries`` is (first, end) of those rows' entries in w.values (from _entry_starts)."""
    if isinstance(w, Tensor):
        return w[start:stop]
    if isinstance(w, NM):
        return NM(values=w.values[start:stop], indices=w.indices[start:stop], shape=(stop - start, w.shape[1]),
                  n=w.n, m=w.m)
    if isinstance(w, (BSR, CSR)):
        unit = w.block[0] if isinstance(w, BSR) else 1
        crow = w.crow_indices[start // unit:stop // unit + 1]
        lo, hi = entries
        return type(w)(values=w.values[lo:hi], crow_indices=(crow - lo).contiguous(),
                       col_indices=w.col_indices[lo:hi], shape=(stop - start, w.shape[1]))
    raise ValueError(f"sparse_conv: groups > 1 is not supported for a {type(w).__name__} weight")


_XT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def conv_windows(x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """The taps every output position of a convolution reads, as a view of the (already padded) input
    ``[N, C, *spatial]``: ``[N, C, *out, *kernel]`` for any number of spatial dims."""
    for d, (k, dil, st) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + d, dil * (k - 1) + 1, st)         # windows of every spatial dim: [N, C, *out, *window]
    return x[(..., *[slice(None, None, dil) for dil in dilation])]     # the dilated taps of each window


def _cpu_family(x: Tensor, w: object, backend: str | None, nd: int) -> str | None:
    """"bsr" / "csr" when the CPU conv ops (*_conv2d / *_conv3d, *_mm_xt: no transposes of patches or outputs)
    can run this call, else None: other devices/backends and mismatched dtypes or devices take the generic path
    (which also raises the usual argument errors; bias was checked by the caller).
    """
    if not isinstance(w, (BSR, CSR)) or backend not in (None, "cpu") or x.device.type != "cpu":
        return None
    family = "bsr" if isinstance(w, BSR) else "csr"
    if not (has_kernel(f"{family}_mm_xt", "CPU") and has_kernel(f"{family}_conv{nd}d", "CPU")) \
            or x.dtype not in _XT_DTYPES or x.dtype != w.dtype or w.device != x.device:
        return None
    _check_structure(f"{family}_linear", w)
    return family


def _patches(x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...],
             stride: tuple[int, ...]) -> Tensor:
    """The im2col patch matrix [B, L, C*prod(kernel)] (rows: output positions; columns ordered (c, *taps) as the
    weight's): F.unfold in 2-D, strided views of the padded input and one copy in 3-D."""
    if len(kernel) == 2:
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if any(padding):
        x = F.pad(x, [p for q in reversed(padding) for p in (q, q)])
    v = conv_windows(x, kernel, dilation, stride)                          # [B, C, *out, *kernel]
    nd = len(kernel)
    b, c, out = v.shape[0], v.shape[1], v.shape[2:2 + nd]
    v = v.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))    # [B, *out, C, *kernel]
    return v.reshape(b, math.prod(out), c * math.prod(kernel))


def check_conv_operands(fn: str, nd: int, x: object, w: object, layout: str) -> None:
    """x must be a floating ``[B, C_in, *spatial]`` Tensor with ``nd`` spatial dims, w a format or 2-D Tensor over
    ``layout`` (its rows and columns in words, ``{dims}`` standing for the kernel's)."""
    spatial = ("D", "H", "W")[3 - nd:]
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != nd + 2:
        raise ValueError(f"{fn}: x must be {nd + 2}-D [B, C_in, {', '.join(spatial)}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating tensor, got {x.dtype}")
    if not isinstance(w, (BSR, CSR, NM, ChannelIndex, Tensor)) or (isinstance(w, Tensor) and w.dim() != 2):
        dims = "*".join(("kd", "kh", "kw")[3 - nd:])
        raise TypeError(f"{fn}: w must be a BSR, CSR, NM, ChannelIndex or 2-D Tensor over {layout.format(dims=dims)}"
                        f", got {type(w).__name__}")


def _sparse_conv(fn: str, nd: int, x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor, bias: Tensor | None,
                 stride: object, padding: object, dilation: object, groups: int, kernel_size: object,
                 backend: str | None) -> Tensor:
    """sparse_conv2d (nd = 2) and sparse_conv3d (nd = 3); ``fn`` names the caller in errors."""
    check_conv_operands(fn, nd, x, w, "[C_out, C_in/groups*{dims}]")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    check_backend(fn, backend, BACKEND_NAMES)
    b, c_in = x.shape[:2]
    c_out = w.shape[0]
    # once here: the per-group paths below slice the bias, which would hide a wrong length
    check_bias(fn, bias, c_out, x, "C_out = w.shape[0]")
    if c_in % groups or c_out % groups:
        raise ValueError(f"{fn}: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    stride, padding = _ntuple(fn, "stride", stride, 1, nd), _ntuple(fn, "padding", padding, 0, nd)
    dilation = _ntuple(fn, "dilation", dilation, 1, nd)
    kernel = _kernel_size(fn, w, c_in, groups, kernel_size, nd)
    out = conv_out_size(x.shape[2:], kernel, stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(f"{fn}: output would be empty ({'x'.join(map(str, out))}) for input "
                         f"{'x'.join(map(str, x.shape[2:]))}, kernel {'x'.join(map(str, kernel))}, stride {stride}, "
                         f"padding {padding}, dilation {dilation}")
    pointwise = all(k == 1 for k in kernel) and not any(padding)
    subsample = (slice(None), slice(None), *(slice(None, None, s) for s in stride))
    length = math.prod(out)

    starts = None if groups == 1 else _entry_starts(w, groups)
    family = _cpu_family(x, w, backend, nd)
    if family is not None:  # CPU BSR/CSR: per image, NCHW pixels (1x1) are already x^T
        conv_op = getattr(torch.ops.sparsekit, f"{family}_conv{nd}d").default
        xt_op = getattr(torch.ops.sparsekit, f"{family}_mm_xt").default
        c_g, n_g = c_in // groups, c_out // groups
        outs = []
        for g in range(groups):
            xg = x if groups == 1 else x[:, g * c_g:(g + 1) * c_g]
            wg = w if groups == 1 else _rows(w, g * n_g, (g + 1) * n_g, starts[g:g + 2])
            bias_g = bias if bias is None or groups == 1 else bias[g * n_g:(g + 1) * n_g]
            if pointwise:  # the (subsampled) NC(D)HW pixels are x^T, read in place when fp32
                xs = xg[subsample].reshape(b, c_g, length)
                y = call_op(xt_op, xs, wg.crow_indices, wg.col_indices, wg.values, bias_g, n_g)
            else:  # direct: im2col panels built per tile inside the kernel, no unfold (strides as phases)
                y = call_op(conv_op, xg, wg.crow_indices, wg.col_indices, wg.values, bias_g, list(kernel),
                            list(padding), list(dilation), list(stride))
            outs.append(y.reshape(b, n_g, *out))
        return outs[0] if groups == 1 else torch.cat(outs, dim=1)

    if pointwise and groups == 1:
        pix = x[subsample].movedim(1, -1)                                     # channels-last pixels
        return sparse_linear(pix, w, bias, backend).movedim(-1, 1)           # [B, C_out, *out]

    cols = _patches(x, kernel, dilation, padding, stride)                        # [B, L, C_in*prod(kernel)]
    if groups == 1:
        y = sparse_linear(cols, w, bias, backend)                                # [B, L, C_out]
    else:
        k_g, n_g = (c_in // groups) * math.prod(kernel), c_out // groups
        outs = []
        for g in range(groups):
            bias_g = None if bias is None else bias[g * n_g:(g + 1) * n_g]
            wg = _rows(w, g * n_g, (g + 1) * n_g, None if starts is None else starts[g:g + 2])
            outs.append(sparse_linear(cols[..., g * k_g:(g + 1) * k_g], wg, bias_g, backend))
        y = torch.cat(outs, dim=-1)
    return y.transpose(1, 2).reshape(b, c_out, *out)


def sparse_conv2d(x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor, bias: Tensor | None = None,
                  stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1, groups: int = 1,
                  kernel_size: _Pair | None = None, backend: str | None = None) -> Tensor:
    """Conv2d of x [B, C_in, H, W] with a sparse weight over [C_out, C_in/groups*kh*kw].

    kernel_size defaults to the square kernel implied by the weight's K; pass it for non-square kernels.
    """
    return _sparse_conv("sparse_conv2d", 2, x, w, bias, stride, padding, dilation, groups, kernel_size, backend)


def sparse_conv3d(x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor, bias: Tensor | None = None,
                  stride: _Triple = 1, padding: _Triple = 0, dilation: _Triple = 1, groups: int = 1,
                  kernel_size: _Triple | None = None, backend: str | None = None) -> Tensor:
    """Conv3d of x [B, C_in, D, H, W] with a sparse weight over [C_out, C_in/groups*kd*kh*kw].

    kernel_size defaults to the cubic kernel implied by the weight's K; pass it for other kernels.
    """
    return _sparse_conv("sparse_conv3d", 3, x, w, bias, stride, padding, dilation, groups, kernel_size, backend)
