"""Channel-compacted layer helpers: the gather of kept input channels fused into the layer's input load, and
the scatter of compact output channels into a wider tensor.

    channel_gather_linear(x, in_idx, weight, bias=None, out_idx=None, n_out=None, backend=None)
        y = x[..., in_idx] @ weight^T + bias                                  ([..., Nc])
        with out_idx: a [..., n_out] zero tensor whose channels out_idx hold that result
    channel_gather_conv2d(x, in_idx, weight, bias=None, out_idx=None, n_out=None,
                          stride=1, padding=0, dilation=1, groups=1, backend=None)
        conv2d(x[:, in_idx], weight, bias, ...)                               (NCHW, weight [Nc, Kc/groups, kh, kw])
        with out_idx: scattered into channels out_idx of an [N, n_out, H', W'] zero tensor
    channel_scatter(y, out_idx, n_out, bias=None, dim=-1, backend=None)
        out = bias (full width [n_out], or 0) broadcast along `dim`; out[..., out_idx, ...] += y

backend: "triton" forces the kernels (kernels/k_channel.py; on CPU only under TRITON_INTERPRET=1) and raises
with the reasons when they cannot run; "reference" forces the unfused PyTorch path (index_select + F.linear /
F.conv2d, index_add). None takes the fused kernels only where they beat the unfused path: the first call with a
new shape key (op, device, dtype, rows rounded up to a power of two, the other sizes, bias, layout) times every
path that can run it on its real inputs and remembers the fastest (sparsekit.ops._dispatch.measured_choice: the
dispatcher's timing, its cache and its rules — measured where ``measure_enabled`` says so for the device type,
by default CUDA only; never while tracing, under functorch transforms or a TorchDispatchMode, or while a CUDA
graph is captured; ``clear_choices()`` forgets). Where it does not measure, None takes the unfused path. Triton
can run a call on CUDA tensors of compute capability >= 8.0 (or CPU tensors under TRITON_INTERPRET=1) in
fp16/bf16/fp32 when no autograd is needed — the Triton path has no backward (inference helpers) — and, for the
conv, with a 1x1 kernel, stride 1, padding 0, groups 1. Index contents (range, uniqueness of out_idx) are not
checked on CUDA tensors (that would synchronise); on CPU they are. GPU speed of the Triton path is unmeasured
(no GPU where it was written).

channel_gather_conv2d has a third backend, "cuda": the op ``torch.ops.sparsekit.channel_gather_conv2d`` with
its CUDA C++ kernel (csrc/cuda/channel_conv.cu: an implicit-GEMM convolution whose input load gathers the kept
channels; tensor cores for fp16/bf16). It takes any kernel size, stride, padding, dilation and groups, x in
any strides, float16/bfloat16/float32/float64, the fused out_idx scatter, and has a backward (autograd formula
in _library.py: torch's convolution_backward on the gathered input, dx scattered back with index_add). Every
path's output is channels_last when x is (channels_last-contiguous, not NCHW-contiguous), NCHW otherwise
(reference.channel_conv_memory_format). For the conv, backend=None measures "cuda" (when it can run: CUDA
tensors, the extension built with its CUDA kernel for this GPU's arch), "triton" and "reference" against each
other; without measuring it takes "cuda" when it can run, else "reference". backend="cuda" forces it and raises
with the reasons when it cannot run (``cuda_conv_reasons``). Its GPU speed is unmeasured too (written without
a GPU): whether it beats index_select + cuDNN depends on the shape, which is what the measurement decides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._dispatch import (
    _capability,
    _triton_import_error,
    check_backend,
    cuda_build_reasons,
    m_bucket,
    measured_choice,
    remembered_choice,
    triton_interpreting,
)
from ._library import call_op, has_kernel

__all__ = ["channel_gather_linear", "channel_gather_conv2d", "channel_scatter", "triton_reasons",
           "cuda_conv_reasons", "conv_backend"]

_BACKENDS = ("triton", "reference")
_CONV_BACKENDS = ("cuda", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_reasons(*tensors: Tensor) -> list[str]:
    """Why the Triton channel kernels cannot run on these tensors (empty list = they can)."""
    reasons = []
    err = _triton_import_error()
    if err:
        reasons.append(f"triton is not importable ({err})")
    t = tensors[0]
    if t.device.type == "cuda":
        major, minor = _capability(t.device)
        if major < 8:
            reasons.append(f"needs compute capability >= 8.0, the GPU has {major}.{minor}")
    elif t.device.type == "cpu":
        if not triton_interpreting():
            reasons.append("runs on CUDA tensors; on CPU only with TRITON_INTERPRET=1 (the interpreter, for tests)")
        elif t.dtype == torch.bfloat16:
            reasons.append("bfloat16 is unreliable under the Triton interpreter")
    else:
        reasons.append(f"runs on cuda tensors, got {t.device.type}")
    if t.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {t.dtype} not supported (float16, bfloat16, float32)")
    if torch.is_grad_enabled() and any(isinstance(u, Tensor) and u.requires_grad for u in tensors):
        reasons.append("has no backward (an input requires grad while autograd is recording)")
    return reasons


def cuda_conv_reasons(x: Tensor) -> list[str]:
    """Why the CUDA kernel of channel_gather_conv2d cannot run on x (empty list = it can)."""
    reasons = []
    built = has_kernel("channel_gather_conv2d", "CUDA")
    if not built:
        reasons.append("sparsekit._C has no CUDA kernel for channel_gather_conv2d (build it on a CUDA machine: "
                       "pip install --no-build-isolation -e ., or FORCE_CUDA=1)")
    if x.device.type != "cuda":
        reasons.append(f"runs on cuda tensors, got {x.device.type}")
    elif built:   # the extension's arch list covers this GPU (one probe per device, _dispatch.cuda_build_reasons)
        reasons += cuda_build_reasons(x.device)
    if x.dtype not in _CUDA_DTYPES:
        reasons.append(f"dtype {x.dtype} not supported (float16, bfloat16, float32, float64)")
    return reasons


def _triton_candidate(fn: str, backend: str | None, tensors: list[Tensor], extra: list[str],
                      allowed: tuple[str, ...] = _BACKENDS) -> bool:
    """Whether the Triton kernels take part in this call: forced (raises with the reasons when they cannot run),
    or, for backend=None, a candidate that measuring weighs against the unfused path (where Triton can run)."""
    check_backend(fn, backend, allowed)
    if backend not in (None, "triton"):
        return False
    reasons = triton_reasons(*tensors) + extra
    if backend == "triton" and reasons:
        raise ValueError(f"{fn}: backend='triton' cannot run this call: " + "; ".join(reasons))
    return not reasons


def _pick(fn: str, backend: str | None, x: Tensor, key: tuple, calls: dict[str, Callable[[], Tensor]],
          default: str = "reference") -> str:
    """The path that runs: the forced one, else the fastest of ``calls`` measured once per key against the unfused
    path (sparsekit.ops._dispatch.measured_choice: the dispatcher's timing, cache and rules for when not to
    measure), else ``default`` (the unfused path, or the CUDA conv kernel) where measuring is off or impossible."""
    if backend is not None:
        return backend
    return measured_choice((fn, *key), x, calls, default, shape=key[2:])


def _device_key(t: Tensor) -> tuple:
    return (t.get_device() if t.is_cuda else str(t.device)), t.dtype


def _check_tensor(fn: str, t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_index(fn: str, idx: object, name: str, limit: int, device: torch.device, unique: bool = False) -> Tensor:
    idx = _check_tensor(fn, idx, name)
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise TypeError(f"{fn}: {name} must be a 1-D int32/int64 tensor, got {idx.dtype} with shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{fn}: {name} is on {idx.device}, expected {device}")
    if idx.device.type == "cpu" and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{fn}: {name} entries must lie in [0, {limit}), got [{lo}, {hi}]")
        if unique and torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{fn}: {name} must not repeat a channel")
    return idx.contiguous()


def _check_float(fn: str, t: Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected {dtype} (x's dtype); cast one of them")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (x's device)")


def _out_args(fn: str, out_idx: Tensor | None, n_out: int | None, nc: int, device: torch.device
              ) -> tuple[Tensor | None, int | None]:
    if out_idx is None:
        if n_out is not None:
            raise ValueError(f"{fn}: n_out is only meaningful with out_idx")
        return None, None
    if isinstance(n_out, bool) or not isinstance(n_out, int):
        raise TypeError(f"{fn}: n_out must be an int when out_idx is given, got {type(n_out).__name__}")
    out_idx = _check_index(fn, out_idx, "out_idx", n_out, device, unique=True)
    if out_idx.numel() != nc:
        raise ValueError(f"{fn}: out_idx has {out_idx.numel()} entries, expected {nc} (weight.shape[0])")
    return out_idx, n_out


# ------------------------------------------------------------------------------------------------ linear
def channel_gather_linear(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None = None,
                          out_idx: Tensor | None = None, n_out: int | None = None,
                          backend: str | None = None) -> Tensor:
    """y = x[..., in_idx] @ weight^T + bias (optionally scattered into channels out_idx of n_out); see module doc."""
    fn = "channel_gather_linear"
    x = _check_tensor(fn, x, "x")
    weight = _check_tensor(fn, weight, "weight")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating tensor [..., K], got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must be a tensor [..., K], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D [Nc, Kc], got shape {tuple(weight.shape)}")
    _check_float(fn, weight, "weight", x.dtype, x.device)
    nc, kc = (int(s) for s in weight.shape)
    k = int(x.shape[-1])
    in_idx = _check_index(fn, in_idx, "in_idx", k, x.device)
    if in_idx.numel() != kc:
        raise ValueError(f"{fn}: in_idx has {in_idx.numel()} entries, expected {kc} (weight.shape[1])")
    if bias is not None:
        bias = _check_tensor(fn, bias, "bias")
        _check_float(fn, bias, "bias", x.dtype, x.device)
        if tuple(bias.shape) != (nc,):
            raise ValueError(f"{fn}: bias must have shape ({nc},) (weight.shape[0]), got {tuple(bias.shape)}")
    out_idx, n_out = _out_args(fn, out_idx, n_out, nc, x.device)
    lead = x.shape[:-1]
    width = nc if out_idx is None else n_out

    def unfused() -> Tensor:
        y = F.linear(x.index_select(-1, in_idx), weight, bias)
        if out_idx is None:
            return y
        return y.new_zeros(*lead, n_out).index_copy(-1, out_idx.long(), y)

    def fused() -> Tensor:
        from ..kernels import k_channel

        x2 = x.reshape(-1, k).contiguous()
        m = int(x2.shape[0])
        y = (torch.empty if out_idx is None else torch.zeros)((m, width), dtype=x.dtype, device=x.device)
        k_channel.channel_mm(x2, in_idx, weight.contiguous(), None if bias is None else bias.contiguous(), y,
                             (0, k, 1), (0, width, 1), 1, m, out_idx)
        return y.reshape(*lead, width)

    calls = {"reference": unfused}
    if _triton_candidate(fn, backend, [x, weight] + ([bias] if bias is not None else []), []):
        calls = {"triton": fused, "reference": unfused}
    key = (*_device_key(x), m_bucket(x.numel() // k if k else 0), k, kc, nc, n_out, bias is not None)
    return calls[_pick(fn, backend, x, key, calls)]()


# -------------------------------------------------------------------------------------------------- conv
def _pair(v: object, name: str, fn: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")


def _conv_args(fn: str, x: object, in_idx: object, weight: object, bias: object, out_idx: object, n_out: object,
               stride: object, padding: object, dilation: object, groups: object) -> tuple:
    """Validated (x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups) of the conv."""
    x = _check_tensor(fn, x, "x")
    weight = _check_tensor(fn, weight, "weight")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating 4-D [N, C, H, W] tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{fn}: weight must be 4-D [Nc, Kc/groups, kh, kw], got shape {tuple(weight.shape)}")
    _check_float(fn, weight, "weight", x.dtype, x.device)
    stride, padding, dilation = (_pair(v, nm, fn) for v, nm in ((stride, "stride"), (padding, "padding"),
                                                                 (dilation, "dilation")))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{fn}: stride and dilation must be >= 1 and padding >= 0, got stride {stride}, "
                         f"padding {padding}, dilation {dilation}")
    nc, kcg, kh, kw = (int(s) for s in weight.shape)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or nc % groups:
        raise ValueError(f"{fn}: groups must be a positive int dividing weight.shape[0] = {nc}, got {groups!r}")
    in_idx = _check_index(fn, in_idx, "in_idx", int(x.shape[1]), x.device)
    if in_idx.numel() != kcg * groups:
        raise ValueError(f"{fn}: in_idx has {in_idx.numel()} entries, expected weight.shape[1] * groups = "
                         f"{kcg * groups}")
    if bias is not None:
        bias = _check_tensor(fn, bias, "bias")
        _check_float(fn, bias, "bias", x.dtype, x.device)
        if tuple(bias.shape) != (nc,):
            raise ValueError(f"{fn}: bias must have shape ({nc},) (weight.shape[0]), got {tuple(bias.shape)}")
    out_idx, n_out = _out_args(fn, out_idx, n_out, nc, x.device)
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    hp, wp = int(x.shape[2]) + 2 * padding[0], int(x.shape[3]) + 2 * padding[1]
    if hp < eh or wp < ew:
        raise ValueError(f"{fn}: the (dilated) kernel {eh}x{ew} is larger than the padded input {hp}x{wp}")
    return x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups


def _conv_candidates(fn: str, backend: object, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding,
                     groups: int) -> list[str]:
    """The paths that may run the conv, in priority order ("cuda", "triton", "reference"): just the forced one
    (raising with the reasons when it cannot run), or every one that can (see the module doc)."""
    check_backend(fn, backend, _CONV_BACKENDS)
    out = []
    if backend in (None, "cuda"):
        reasons = cuda_conv_reasons(x)
        if backend == "cuda":
            if reasons:
                raise ValueError(f"{fn}: backend='cuda' cannot run this call: " + "; ".join(reasons))
            return ["cuda"]
        if not reasons:
            out.append("cuda")
    kh, kw, w = int(weight.shape[2]), int(weight.shape[3]), int(x.shape[3])
    extra = []
    if (kh, kw) != (1, 1) or stride != (1, 1) or padding != (0, 0) or groups != 1:
        extra.append(f"only 1x1 kernels with stride 1, padding 0, groups 1 (got kernel {(kh, kw)}, stride {stride}, "
                     f"padding {padding}, groups {groups})")
    elif x.stride(2) != w * x.stride(3):
        extra.append(f"x's spatial dims must be flattenable (NCHW or channels_last), got strides {x.stride()}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if _triton_candidate(fn, backend, tensors, extra, _CONV_BACKENDS):
        if backend == "triton":
            return ["triton"]
        out.append("triton")
    return out + ["reference"] if backend is None else ["reference"]


def _conv_key(x: Tensor, weight: Tensor, bias: Tensor | None, n_out: int | None, conv: tuple) -> tuple:
    b, c, h, w = (int(s) for s in x.shape)
    return (*_device_key(x), m_bucket(b), c, h, w, tuple(weight.shape), n_out, bias is not None, conv,
            reference.channel_conv_memory_format(x) == torch.channels_last)


def conv_backend(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None = None,
                 out_idx: Tensor | None = None, n_out: int | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, backend: str | None = None) -> str:
    """The backend channel_gather_conv2d would run these arguments on ("cuda", "triton" or "reference"): the forced
    one, the one measured for this shape if a call measured it, else the one taken without measuring; raises what
    the call would raise (bad arguments, a forced backend that cannot run)."""
    fn = "channel_gather_conv2d"
    x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups = _conv_args(
        fn, x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups)
    names = _conv_candidates(fn, backend, x, weight, bias, stride, padding, groups)
    if len(names) == 1:
        return names[0]
    key = _conv_key(x, weight, bias, n_out, (stride, padding, dilation, groups))
    remembered = remembered_choice((fn, *key, tuple(names)))   # measured_choice's key: it holds the candidates
    return remembered if remembered in names else _conv_default(names)


def _conv_default(names: list[str]) -> str:
    # unmeasured: the CUDA kernel where it runs (a fused kernel with a backward, any conv), else the unfused path;
    # Triton only where a measurement found it faster
    return "cuda" if "cuda" in names else "reference"


def channel_gather_conv2d(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None = None,
                          out_idx: Tensor | None = None, n_out: int | None = None, stride=1, padding=0,
                          dilation=1, groups: int = 1, backend: str | None = None) -> Tensor:
    """conv2d(x[:, in_idx], weight, bias, ...) (optionally scattered into channels out_idx of n_out)."""
    fn = "channel_gather_conv2d"
    x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups = _conv_args(
        fn, x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups)
    names = _conv_candidates(fn, backend, x, weight, bias, stride, padding, groups)
    paths = {
        "cuda": lambda: call_op(torch.ops.sparsekit.channel_gather_conv2d.default, x, in_idx, weight, bias, out_idx,
                                n_out, list(stride), list(padding), list(dilation), groups),
        "triton": lambda: _triton_conv1x1(x, in_idx, weight, bias, out_idx, n_out),
        # index_select + F.conv2d (+ index_copy), plain autograd
        "reference": lambda: reference.channel_gather_conv2d(x, in_idx, weight, bias, out_idx, n_out, list(stride),
                                                             list(padding), list(dilation), groups),
    }
    calls = {name: paths[name] for name in names}
    if len(names) == 1:
        return calls[names[0]]()
    key = _conv_key(x, weight, bias, n_out, (stride, padding, dilation, groups))
    return calls[_pick(fn, backend, x, key, calls, _conv_default(names))]()


def _triton_conv1x1(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None, out_idx: Tensor | None,
                    n_out: int | None) -> Tensor:
    """The 1x1 conv as k_channel.channel_mm over the H*W positions, y in the memory format the other paths give
    (reference.channel_conv_memory_format: channels_last for a channels_last x)."""
    from ..kernels import k_channel

    nc, kcg = int(weight.shape[0]), int(weight.shape[1])
    b, h, w = int(x.shape[0]), int(x.shape[2]), int(x.shape[3])
    width = nc if out_idx is None else n_out
    y = torch.empty((b, width, h, w), dtype=x.dtype, device=x.device,
                    memory_format=reference.channel_conv_memory_format(x))
    if out_idx is not None:
        y.zero_()   # the channels out of out_idx
    # (batch, position, channel) strides; a position is (h, w) flattened, which both layouts allow
    k_channel.channel_mm(x, in_idx, weight.reshape(nc, kcg).contiguous(),
                         None if bias is None else bias.contiguous(), y,
                         (x.stride(0), x.stride(3), x.stride(1)), (y.stride(0), y.stride(3), y.stride(1)), b, h * w,
                         out_idx)
    return y


# ------------------------------------------------------------------------------------------------ scatter
def channel_scatter(y: Tensor, out_idx: Tensor, n_out: int, bias: Tensor | None = None, dim: int = -1,
                    backend: str | None = None) -> Tensor:
    """out = bias (full width n_out, broadcast along ``dim``; 0 without) with out[.., out_idx, ..] += y."""
    fn = "channel_scatter"
    y = _check_tensor(fn, y, "y")
    if not y.is_floating_point():
        raise TypeError(f"{fn}: y must be a floating tensor, got {y.dtype}")
    if y.dim() < 1:
        raise ValueError(f"{fn}: y must have at least 1 dim, got shape {tuple(y.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -y.dim() <= dim < y.dim():
        raise ValueError(f"{fn}: dim must be an int in [{-y.dim()}, {y.dim()}), got {dim!r}")
    dim %= y.dim()
    if isinstance(n_out, bool) or not isinstance(n_out, int):
        raise TypeError(f"{fn}: n_out must be a non-negative int, got {type(n_out).__name__} {n_out!r}")
    if n_out < 0:
        raise ValueError(f"{fn}: n_out must be a non-negative int, got {n_out}")
    c = int(y.shape[dim])
    out_idx = _check_index(fn, out_idx, "out_idx", n_out, y.device, unique=True)
    if out_idx.numel() != c:
        raise ValueError(f"{fn}: out_idx has {out_idx.numel()} entries, expected y.shape[{dim}] = {c}")
    if bias is not None:
        bias = _check_tensor(fn, bias, "bias")
        _check_float(fn, bias, "bias", y.dtype, y.device)
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"{fn}: bias must have shape ({n_out},) (the full width), got {tuple(bias.shape)}")
    shape = list(y.shape)
    shape[dim] = n_out
    view = [1] * y.dim()
    view[dim] = n_out

    def unfused() -> Tensor:
        out = y.new_zeros(shape) if bias is None else bias.reshape(view).expand(shape).clone()
        return out.index_add(dim, out_idx, y)

    calls = {"reference": unfused}
    if _triton_candidate(fn, backend, [y] + ([bias] if bias is not None else []), []):
        calls = {"triton": lambda: _triton_scatter(y, out_idx, n_out, bias, dim, shape, view), "reference": unfused}
    key = (*_device_key(y), m_bucket(int(y.shape[0])), *(int(s) for s in y.shape[1:]), dim, n_out, bias is not None)
    return calls[_pick(fn, backend, y, key, calls)]()


def _triton_scatter(y: Tensor, out_idx: Tensor, n_out: int, bias: Tensor | None, dim: int, shape: list[int],
                    view: list[int]) -> Tensor:
    from ..kernels import k_channel

    yc = y.contiguous()
    c = int(y.shape[dim])
    outer = 1
    for s in y.shape[:dim]:
        outer *= int(s)
    inner = 1
    for s in y.shape[dim + 1:]:
        inner *= int(s)
    out = torch.zeros(shape, dtype=y.dtype, device=y.device) if bias is None else \
        torch.empty(shape, dtype=y.dtype, device=y.device).copy_(bias.reshape(view).expand(shape))
    if inner == 1:   # channels last (a linear layer's output): rows become the inner axis, tiles cover rows
        outer, inner = 1, outer
        y_strides, out_strides = (0, 1, c), (0, 1, n_out)
    else:
        y_strides, out_strides = (c * inner, inner, 1), (n_out * inner, inner, 1)
    k_channel.channel_scatter(yc, out_idx, None if bias is None else bias.contiguous(), out, outer, c, inner,
                              y_strides, out_strides)
    return out
