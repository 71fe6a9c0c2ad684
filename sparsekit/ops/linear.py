"""The Python faces of the sparse GEMM ops: y = x @ W^T + bias for a sparse-format weight W [N, K].

x may have any leading dims ([..., K]); it is flattened to [M, K] for the kernel and the result is reshaped
back to [..., N]. Inputs are validated here (argument named, value given, value expected); the backend is
chosen by the dispatcher (``backend=None``) or forced (``backend="cpu" | "cuda" | "triton" | "reference"``).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.compiler import is_compiling as _is_compiling

from ..formats import BSR, CSR, NM, ChannelIndex, bitmap_shape
from ._dispatch import BACKENDS, CppBackend, Format, check_backend, choose, cpu_mm_call, measure_enabled
from ._library import _needs_autograd_layer

BACKEND_NAMES = tuple(sorted(BACKENDS))


def check_linear_args(fn: str, x: object, w: object, fmt: type, bias: object) -> None:
    """Validate (x, w, bias) for ``fn``; raises TypeError/ValueError naming the argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, fmt):
        hint = f"; convert a dense weight with {fmt.__name__}.from_dense(weight, ...)" if isinstance(w, Tensor) else ""
        raise TypeError(f"{fn}: w must be a {fmt.__name__}, got {type(w).__name__}{hint}")
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have shape [..., {k}] (K = w.shape[1]), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating tensor, got {x.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"{fn}: x has dtype {x.dtype} but w's values are {w.dtype}; cast one of them "
                        f"(x.to({w.dtype}) or w.to(dtype={x.dtype})) — sparsekit never converts silently")
    if not (x.is_cpu and w.values.is_cpu) and x.device != w.device:   # the CPU case without device objects
        raise ValueError(f"{fn}: x is on {x.device} but w is on {w.device}; move one with .to(device)")
    check_bias(fn, bias, n, x)
    _check_structure(fn, w)


def check_bias(fn: str, bias: object, n: int | None, x: Tensor, what: str = "N = w.shape[0]") -> None:
    """bias must be None or a tensor of shape (n,) (any shape when n is None) with x's dtype and device."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if n is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{fn}: bias must have shape ({n},) ({what}), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{fn}: bias has dtype {bias.dtype}, expected {x.dtype} (x's dtype)")
    if bias.device != x.device:
        raise ValueError(f"{fn}: bias is on {bias.device}, expected {x.device} (x's device)")


def _check_structure(fn: str, w: Format) -> None:
    """Cheap O(1) consistency checks of the format's tensors (the full check is w.validate())."""
    n, k = w.shape
    if isinstance(w, BSR):
        bn, bk = w.block if w.values.dim() == 3 else (1, 1)     # (block reads values' dims 1 and 2)
        if w.values.dim() != 3 or n % bn or k % bk or w.crow_indices.numel() != n // bn + 1 \
                or w.col_indices.numel() != w.nnzb:
            raise ValueError(f"{fn}: w is an inconsistent BSR (values {tuple(w.values.shape)}, crow "
                             f"{w.crow_indices.numel()}, col {w.col_indices.numel()}, shape {w.shape}); "
                             "call w.validate() for details")
    elif isinstance(w, CSR):
        if w.values.dim() != 1 or w.crow_indices.numel() != n + 1 or w.col_indices.numel() != w.nnz:
            raise ValueError(f"{fn}: w is an inconsistent CSR; call w.validate() for details")
        if w.bitmap is not None and (not isinstance(w.bitmap, Tensor) or w.bitmap.dtype != torch.uint8
                                     or tuple(w.bitmap.shape) != bitmap_shape(n, k)):
            raise ValueError(f"{fn}: w.bitmap must be a uint8 tensor of shape {bitmap_shape(n, k)}, got "
                             f"{getattr(w.bitmap, 'dtype', type(w.bitmap).__name__)} "
                             f"{tuple(getattr(w.bitmap, 'shape', ()))}; rebuild it with w.with_bitmap()")
    elif isinstance(w, NM) and (tuple(w.values.shape) != (n, k // w.m * w.n) or w.indices.shape != w.values.shape):
        raise ValueError(f"{fn}: w is an inconsistent NM; call w.validate() for details")


_BelowAutograd = torch._C._AutoDispatchBelowAutograd
_functorch_active = torch._C._are_functorch_transforms_active


class _RepeatCall:
    """A checked (w, bias, backend) combination of an eager CPU call on the C++ kernels that needed no autograd.

    Repeating such a call with an x of the same type, dtype and K, the same bias object and w's same tensors
    gives the same check results and the same backend, so it goes straight to the op: the checks and the
    dispatcher cost ~8 µs of Python, about as much as a GEMV's arithmetic. Kept on w (not a dataclass field,
    so never saved); anything that differs takes the full path, which refreshes it."""

    __slots__ = ("backend", "dtype", "k", "bias", "tensors", "op", "tail")

    def __init__(self, backend: str | None, x: Tensor, w: Format, bias: Tensor | None, op, tail: tuple) -> None:
        self.backend, self.dtype, self.k, self.bias = backend, x.dtype, x.shape[1], bias
        self.tensors = _format_tensors(w)      # values first
        self.op, self.tail = op._op, tail     # the C++ callable of the OpOverload: one Python frame less


def _format_tensors(w: Format) -> tuple[Tensor | None, ...]:
    return (w.values, w.indices) if isinstance(w, NM) else (w.values, w.crow_indices, w.col_indices,
                                                            getattr(w, "bitmap", None))


def _repeat(w: Format, x: Tensor, bias: Tensor | None, backend: str | None) -> Tensor | None:
    """The result of a repeated call (see _RepeatCall), or None when this call is not one."""
    # (every check below is on the path of each call of a GEMV of a few dozen µs: kept to plain comparisons)
    rc = w.__dict__.get("_repeat_call")
    if rc is None or type(x) is not Tensor or bias is not rc.bias or backend != rc.backend \
            or x.dtype != rc.dtype or x.dim() != 2 or x.shape[1] != rc.k or not x.is_cpu:
        return None
    values = rc.tensors[0]
    if not all(map(operator.is_, rc.tensors, _format_tensors(w))) or values.dtype != rc.dtype:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    if _is_compiling() or _functorch_active() or forward_ad._current_level >= 0:   # (forward AD: refused there)
        return None
    with _BelowAutograd():
        return rc.op(x if x.is_contiguous() else x.contiguous(), *rc.tail)


def _remember(family: str, w: Format, x: Tensor, bias: Tensor | None, backend: str | None, chosen) -> None:
    # (a measured choice depends on M: not a repeat of another M's call)
    if not (isinstance(chosen, CppBackend) and chosen.device_type == "cpu" and type(x) is Tensor and x.is_cpu) \
            or measure_enabled("cpu") or _needs_autograd_layer((x, *_format_tensors(w), bias)):
        return
    op, tail = cpu_mm_call(family, w, bias)
    w.__dict__["_repeat_call"] = _RepeatCall(backend, x, w, bias, op, tail)


def _linear(fn: str, family: str, fmt: type, x: Tensor, w: Format, bias: Tensor | None,
            backend: str | None) -> Tensor:
    if type(w) is fmt:
        y = _repeat(w, x, bias, backend)
        if y is not None:
            return y
    check_linear_args(fn, x, w, fmt, bias)
    if x.dim() == 2:   # the common case, without the reshape round trip (this path is on every call)
        chosen = choose(family, x, w, backend)
        if not torch.compiler.is_compiling():
            _remember(family, w, x, bias, backend, chosen)
        return chosen.mm(family, x.contiguous(), w, bias)
    n, k = w.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), k).contiguous()     # (-1 cannot be inferred when k == 0)
    y = choose(family, x2, w, backend).mm(family, x2, w, bias)
    return y.reshape(*x.shape[:-1], n)


def bsr_linear(x: Tensor, w: BSR, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """y = x @ W^T + bias for a block-sparse W (BSR). x [..., K] -> y [..., N]."""
    return _linear("bsr_linear", "bsr", BSR, x, w, bias, backend)


def csr_linear(x: Tensor, w: CSR, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """y = x @ W^T + bias for an unstructured-sparse W (CSR). x [..., K] -> y [..., N]."""
    return _linear("csr_linear", "csr", CSR, x, w, bias, backend)


def nm_linear(x: Tensor, w: NM, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """y = x @ W^T + bias for an n:m semi-structured W (NM). x [..., K] -> y [..., N]."""
    return _linear("nm_linear", "nm", NM, x, w, bias, backend)


def channel_linear(x: Tensor, w: ChannelIndex, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T + bias for a channel-compacted W: a dense GEMM on the kept channels only.

    dim=0: only the kept output rows are computed, the others are bias (or 0). dim=1: only the kept input
    columns of x are read.
    """
    check_linear_args("channel_linear", x, w, ChannelIndex, bias)
    if w.dim == 1:
        return F.linear(x.index_select(-1, w.indices), w.values, bias)
    kept = F.linear(x, w.values)
    # (under autocast kept is in the autocast dtype, as F.linear with the bias would give: the bias follows)
    out = kept.new_zeros(*x.shape[:-1], w.shape[0]) if bias is None else \
        bias.to(kept.dtype).expand(*x.shape[:-1], -1).clone()
    return out.index_add(-1, w.indices, kept)


_BY_FORMAT = {BSR: bsr_linear, CSR: csr_linear, NM: nm_linear}


def sparse_linear(x: Tensor, w: Format | ChannelIndex | Tensor, bias: Tensor | None = None,
                  backend: str | None = None) -> Tensor:
    """Dispatch on the weight's format (BSR, CSR, NM, ChannelIndex, or a dense tensor -> F.linear)."""
    if isinstance(w, Tensor):   # F.linear, whatever the backend: still reject a name no backend has
        # (SparseLinear(format="dense") calls this per forward: the checks run only where they could fail)
        if backend is not None:
            check_backend("sparse_linear", backend, BACKEND_NAMES)
        if not isinstance(x, Tensor):
            raise TypeError(f"sparse_linear: x must be a torch.Tensor, got {type(x).__name__}")
        if bias is not None and not (isinstance(bias, Tensor) and bias.dtype == x.dtype
                                     and bias.shape == w.shape[:1]):
            check_bias("sparse_linear", bias, w.shape[0] if w.dim() == 2 else None, x)   # names what is wrong
        return F.linear(x, w, bias)
    if isinstance(w, ChannelIndex):
        check_backend("sparse_linear (a ChannelIndex weight: a dense GEMM on the kept channels)", backend,
                       ("reference",))
        return channel_linear(x, w, bias)
    try:
        fn = _BY_FORMAT[type(w)]
    except KeyError:
        raise TypeError(f"w must be a BSR, CSR, NM, ChannelIndex or dense Tensor, got {type(w).__name__}") from None
    return fn(x, w, bias, backend)


__all__ = ["bsr_linear", "csr_linear", "nm_linear", "channel_linear", "sparse_linear", "check_linear_args",
           "check_bias"]
