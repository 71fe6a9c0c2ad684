"""Sparse transposed convolution: a sparse GEMM over the input pixels, then col2im (the adjoint of im2col), or
on CPU, where the kernel equals the stride, the GEMM stored straight into the output (``*_mm_xt_tiled``).

A transposed conv's weight ``[C_in, C_out, *kernel]`` is used as the matrix ``W`` over ``[C_out * prod(kernel),
C_in]`` (rows ordered ``(c_out, *taps)``; ``weight.movedim(0, -1).reshape(-1, C_in)``): every input pixel's
channels ``x_p`` give the columns ``W @ x_p`` of one output patch, and the patches are summed into the output
at stride ``stride`` (one strided write per kernel tap), the same as ``torch``'s ``conv_transpose*d``. On CPU
with a BSR / CSR weight the NC(D)HW input already is ``x^T [B, C_in, L]`` for ``*_mm_xt``, which writes the
columns as ``[B, C_out * prod(kernel), L]``: no transposes; where the kernel equals the stride (no padding) the
taps tile the output and ``*_mm_xt_tiled`` stores each column entry straight at its output pixel (one write of
the output, no columns tensor). Elsewhere the pixels go channels-last through ``sparse_linear``. Gradients flow
through the sparse ops' autograd and the strided writes'.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..formats import BSR, CSR, NM, ChannelIndex
from ._dispatch import check_backend
from ._library import call_op, has_kernel
from .conv import _cpu_family, _ntuple, check_conv_operands
from .linear import BACKEND_NAMES, check_bias, sparse_linear

__all__ = ["sparse_conv_transpose2d", "sparse_conv_transpose3d", "conv_transpose_out_size", "transposed_weight2d"]


def conv_transpose_out_size(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                            padding: tuple[int, ...], output_padding: tuple[int, ...],
                            dilation: tuple[int, ...]) -> tuple[int, ...]:
    """The output's spatial sizes (torch's formula): ``(n - 1) * s - 2 * p + d * (k - 1) + output_padding + 1``."""
    return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1
                 for n, k, s, p, op, d in zip(sizes, kernel, stride, padding, output_padding, dilation))


def transposed_weight2d(weight: Tensor, groups: int = 1) -> Tensor:
    """A transposed conv's weight ``[C_in, C_out / groups, *kernel]`` as the GEMM matrix ``[C_out *
    prod(kernel), C_in]`` these ops take (a grouped one as the equal ungrouped weight: block-diagonal, zero
    between the groups, ``ungrouped_weight``)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"transposed_weight2d: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 3:
        raise ValueError(f"transposed_weight2d: weight must be [C_in, C_out, *kernel] (3-D to 5-D), got shape "
                         f"{tuple(weight.shape)}")
    if groups != 1:
        weight = ungrouped_weight(weight, groups)
    return weight.movedim(0, -1).reshape(-1, weight.shape[0])


def ungrouped_weight(weight: Tensor, groups: int) -> Tensor:
    """A grouped transposed conv's weight ``[C_in, C_out / groups, *kernel]`` as the ungrouped one ``[C_in, C_out,
    *kernel]`` computing the same: input channels of group g feed only its output channels."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing C_in = {weight.shape[0]}, got {groups!r}")
    cin, cout = weight.shape[0] // groups, weight.shape[1]
    full = weight.new_zeros(weight.shape[0], cout * groups, *weight.shape[2:])
    for g in range(groups):
        full[g * cin:(g + 1) * cin, g * cout:(g + 1) * cout] = weight[g * cin:(g + 1) * cin]
    return full


def grouped_weight(full: Tensor, groups: int) -> Tensor:
    """The inverse of ``ungrouped_weight``: each group's block of ``[C_in, C_out, *kernel]``, concatenated."""
    cin, cout = full.shape[0] // groups, full.shape[1] // groups
    return torch.cat([full[g * cin:(g + 1) * cin, g * cout:(g + 1) * cout] for g in range(groups)])


def _tap_layout(kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...],
                padding: tuple[int, ...], out: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[bool, bool]:
    """``(disjoint, tiled)``: the kernel taps cannot overlap in the output (``d * (k - 1) < s``: U-Net's 2x2
    stride-2 up-convolutions), and they also cover every output pixel exactly once."""
    disjoint = all(d * (k - 1) < s for k, d, s in zip(kernel, dilation, stride))
    tiled = disjoint and all(d == 1 and k == s and o + 2 * p == n * s
                             for k, d, s, p, o, n in zip(kernel, dilation, stride, padding, out, sizes))
    return disjoint, tiled


def _fold(cols: Tensor, sizes: tuple[int, ...], out: tuple[int, ...], kernel: tuple[int, ...],
          dilation: tuple[int, ...], padding: tuple[int, ...], stride: tuple[int, ...], c_out: int,
          bias: Tensor | None = None) -> Tensor:
    """Sum the patch columns ``[B, C_out * prod(kernel), L = prod(sizes)]`` (``sizes``: the input's spatial sizes)
    into ``[B, C_out, *out]``: one strided write per kernel tap (F.fold runs this single-threaded here, 2x
    slower). Disjoint taps are copied rather than added, into an uninitialised output where they tile it.
    ``bias`` (``[C_out]``, or None) starts the output (the columns must not carry it then); for tiled taps the
    caller puts it in the columns instead (the GEMM adds it), so the output is written once."""
    b = cols.shape[0]
    taps = cols.reshape(b, c_out, *kernel, *sizes)
    disjoint, tiled = _tap_layout(kernel, dilation, stride, padding, out, sizes)
    shape = (b, c_out, *(o + 2 * p for o, p in zip(out, padding)))
    if tiled:
        padded = cols.new_empty(shape)
    elif bias is not None:
        padded = cols.new_empty(shape).copy_(bias.reshape(1, -1, *([1] * len(out))).expand(shape))
    else:
        padded = cols.new_zeros(shape)
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = (slice(None), slice(None),
                  *(slice(t * d, t * d + s * (n - 1) + 1, s) for t, d, s, n in zip(tap, dilation, stride, sizes)))
        if disjoint and bias is None:
            padded[window] = taps[(slice(None), slice(None), *tap)]
        else:
            padded[window] += taps[(slice(None), slice(None), *tap)]
    if not any(padding):
        return padded
    return padded[(slice(None), slice(None), *(slice(p, p + o) for o, p in zip(out, padding)))]


def _sparse_conv_transpose(fn: str, nd: int, x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor,
                           bias: Tensor | None, stride: object, padding: object, output_padding: object,
                           dilation: object, groups: int, kernel_size: object, backend: str | None) -> Tensor:
    check_conv_operands(fn, nd, x, w, "[C_out*{dims}, C_in] (transposed_weight2d)")
    dims = "*".join(("kd", "kh", "kw")[3 - nd:])
    if groups != 1:
        raise ValueError(f"{fn}: groups must be 1 (a grouped transposed conv has no sparse path), got {groups!r}")
    check_backend(fn, backend, BACKEND_NAMES)
    b, c_in = x.shape[:2]
    if w.shape[1] != c_in:
        raise ValueError(f"{fn}: w has K={w.shape[1]} columns but x has C_in={c_in} channels; w must be over "
                         f"[C_out*{dims}, C_in]")
    stride, padding = _ntuple(fn, "stride", stride, 1, nd), _ntuple(fn, "padding", padding, 0, nd)
    output_padding = _ntuple(fn, "output_padding", output_padding, 0, nd)
    dilation = _ntuple(fn, "dilation", dilation, 1, nd)
    kernel = _ntuple(fn, "kernel_size", kernel_size, 1, nd) if kernel_size is not None else None
    if kernel is None:
        raise ValueError(f"{fn}: kernel_size is required (the rows of w are C_out*{dims})")
    taps = math.prod(kernel)
    if w.shape[0] % taps:
        raise ValueError(f"{fn}: w has N={w.shape[0]} rows, not a multiple of {dims} = {taps}")
    c_out = w.shape[0] // taps
    check_bias(fn, bias, c_out, x, f"C_out = w.shape[0] / {dims}")
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(f"{fn}: output_padding {output_padding} must be smaller than stride {stride} or dilation "
                         f"{dilation} in every dim")
    out = conv_transpose_out_size(tuple(x.shape[2:]), kernel, stride, padding, output_padding, dilation)
    if min(out) < 1:
        raise ValueError(f"{fn}: output would be empty ({'x'.join(map(str, out))}) for input "
                         f"{'x'.join(map(str, x.shape[2:]))}, kernel {kernel}, stride {stride}, padding {padding}")
    length = math.prod(x.shape[2:])
    # where the taps tile the output every pixel is one column entry: the GEMM adds the bias (per row c_out, tap);
    # elsewhere the bias starts the output (_fold). Either way the output is not read and written again for it.
    tiled = _tap_layout(kernel, dilation, stride, padding, out, tuple(x.shape[2:]))[1]
    row_bias = bias.repeat_interleave(taps) if bias is not None and tiled else None
    family = _cpu_family(x, w, backend, 2)
    if family is not None and tiled and not any(padding) and has_kernel(f"{family}_mm_xt_tiled", "CPU"):
        # the GEMM stores every column entry straight at its output pixel: no columns tensor, no second pass
        tiled_op = getattr(torch.ops.sparsekit, f"{family}_mm_xt_tiled").default
        return call_op(tiled_op, x.reshape(b, c_in, length), w.crow_indices, w.col_indices, w.values, row_bias,
                       w.shape[0], list(x.shape[2:]), list(kernel))
    if family is not None:     # NC(D)HW pixels are x^T: the columns come out as [B, C_out*taps, L]
        xt_op = getattr(torch.ops.sparsekit, f"{family}_mm_xt").default
        cols = call_op(xt_op, x.reshape(b, c_in, length), w.crow_indices, w.col_indices, w.values, row_bias,
                       w.shape[0])
    else:
        cols = sparse_linear(x.reshape(b, c_in, length).transpose(1, 2), w, row_bias, backend).transpose(1, 2)
    return _fold(cols, tuple(x.shape[2:]), out, kernel, dilation, padding, stride, c_out,
                 None if tiled else bias)


def sparse_conv_transpose2d(x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor, bias: Tensor | None = None,
                            stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                            output_padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                            groups: int = 1, kernel_size: int | tuple[int, int] | None = None,
                            backend: str | None = None) -> Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups=1, dilation)`` with ``w`` a
    sparse format over ``transposed_weight2d(weight)`` = ``[C_out*kh*kw, C_in]``; ``kernel_size`` is required."""
    return _sparse_conv_transpose("sparse_conv_transpose2d", 2, x, w, bias, stride, padding, output_padding,
                                  dilation, groups, kernel_size, backend)


def sparse_conv_transpose3d(x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor, bias: Tensor | None = None,
                            stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0,
                            output_padding: int | tuple[int, int, int] = 0, dilation: int | tuple[int, int, int] = 1,
                            groups: int = 1, kernel_size: int | tuple[int, int, int] | None = None,
                            backend: str | None = None) -> Tensor:
    """``F.conv_transpose3d`` with ``w`` a sparse format over ``[C_out*kd*kh*kw, C_in]`` (see
    ``sparse_conv_transpose2d``)."""
    return _sparse_conv_transpose("sparse_conv_transpose3d", 3, x, w, bias, stride, padding, output_padding,
                                  dilation, groups, kernel_size, backend)
