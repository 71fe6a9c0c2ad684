"""Launcher plumbing shared by the Triton kernel modules (k_bsr_mm, k_bsr_mm_t, k_bsr_sddmm, k_nm_mm,
k_channel), written once: the argument checks they have in common (with their error messages), the default
dot precision, and the device context of a launch. Imports torch only (never triton).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ._configs import interpreting

__all__ = ["SUPPORTED_DTYPES", "check_tensor", "check_activation", "check_int", "check_index", "check_bias",
           "check_grid", "check_optional_positive_int", "check_runnable", "check_deterministic",
           "cuda_matmul_allows_tf32", "cudnn_allows_tf32", "default_input_precision", "device_ctx", "INPUT_PRECISIONS",
           "resolve_input_precision"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(t: object, name: str) -> Tensor:
    """``t`` itself when it is a dense, contiguous torch.Tensor; TypeError / ValueError naming it otherwise."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); "
                         f"call .contiguous() first")
    return t


def check_activation(t: Tensor, name: str, shape: str = "") -> None:
    """An activation (x, dy): 2-D (``shape`` describes it in the message, e.g. "[M, K]") in a supported dtype."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D{' ' + shape if shape else ''}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_int(v: object, name: str) -> int:
    """An int argument (numpy / torch integer scalars accepted, bool refused)."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def check_index(t: Tensor, name: str) -> None:
    """An index vector of the BSR launchers (crow_indices, col_indices): int32 and 1-D."""
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def check_bias(bias: object, x: Tensor, n: int) -> Tensor | None:
    """None, or a contiguous bias of shape (n,) in x's dtype."""
    if bias is None:
        return None
    bias = check_tensor(bias, "bias")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return bias


def check_optional_positive_int(v: object, name: str, upper: int | None = None) -> None:
    """A split count: None (the launcher decides) or an int in [1, upper] (bool refused)."""
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (upper is not None and v > upper):
        allowed = "a positive int" if upper is None else f"an int in [1, {upper}]"
        raise ValueError(f"{name} must be None or {allowed}, got {v!r}")


def check_runnable(device: torch.device, subject: str) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; ``subject`` starts the
    message ("x is", "tensors are")."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"{subject} on {device}; the Triton kernel runs on CUDA tensors (CPU tensors only under "
                         "TRITON_INTERPRET=1)")


def check_deterministic(what: str, fix: str) -> None:
    """torch's rule for an op without a deterministic implementation, under ``torch.use_deterministic_algorithms(
    True)``: a RuntimeError, or a warning with ``warn_only=True``. For the splits the caller forced (fp32 atomics,
    whose order varies from run to run); the default splits are 1 in that mode (kernels/_configs.py)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = f"{what} adds fp32 partials with atomics (run-to-run differences in the last bits)"
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(f"{msg}, but torch.use_deterministic_algorithms(True, warn_only=True) is set", stacklevel=3)
        return
    raise RuntimeError(f"{msg}, but torch.use_deterministic_algorithms(True) is set: {fix}")


def _fp32_setting(getter: Callable[[], object]) -> str | None:
    """One of torch's fp32_precision settings ("ieee", "tf32", "none", ...) in lower case, or None where this
    torch has no such attribute (or refuses to read it)."""
    try:
        value = getter()
    except (AttributeError, RuntimeError):
        return None
    return value.lower() if isinstance(value, str) else None


def cuda_matmul_allows_tf32() -> bool:
    """Whether torch lets cuBLAS use TF32 for fp32 matmuls, by either of torch's APIs.

    torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"; "none" inherits the global
    ``torch.backends.fp32_precision``). Once it is set, reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` can raise RuntimeError (mixed APIs), so the new API is read
    first and the legacy flag only when neither level says "tf32" or "ieee" (older torch, or nothing set)."""
    backends = torch.backends
    return _tf32_allowed(lambda: backends.cuda.matmul.fp32_precision, lambda: backends.cuda.matmul.allow_tf32)


def cudnn_allows_tf32() -> bool:
    """Whether torch lets cuDNN use TF32 for fp32 convolutions (``torch.backends.cudnn.conv.fp32_precision``,
    then the global setting, then the legacy ``torch.backends.cudnn.allow_tf32``), as cuda_matmul_allows_tf32."""
    backends = torch.backends
    return _tf32_allowed(lambda: backends.cudnn.conv.fp32_precision, lambda: backends.cudnn.allow_tf32)


def _tf32_allowed(setting: Callable[[], object], legacy: Callable[[], object]) -> bool:
    for getter in (setting, lambda: torch.backends.fp32_precision):
        value = _fp32_setting(getter)
        if value == "tf32":
            return True
        if value == "ieee":
            return False
    try:
        return bool(legacy())
    except (AttributeError, RuntimeError):
        return False


def default_input_precision(dtype: torch.dtype) -> str:
    """Dot precision for fp32 inputs: "tf32" when torch allows TF32 for CUDA matmuls (the same switch cuBLAS
    follows, see cuda_matmul_allows_tf32), else "ieee".

    fp16/bf16 dots ignore it (they always run on tensor cores with fp32 accumulation)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if cuda_matmul_allows_tf32() else "ieee"


INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def resolve_input_precision(dtype: torch.dtype, input_precision: str | None) -> str:
    """A launcher's ``input_precision`` argument: the default for ``dtype`` when None, else checked against
    INPUT_PRECISIONS (so a typo fails here, naming the argument, not inside Triton's compiler)."""
    if input_precision is None:
        return default_input_precision(dtype)
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    return input_precision


def device_ctx(device: torch.device):
    """The context to launch on ``device``: its CUDA device (so a tensor on cuda:1 launches there), or none for
    CPU tensors under the interpreter and when ``device`` is already the current one (entering torch.cuda.device
    costs several microseconds of host time per launch)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def check_grid(what: str, grid: tuple[int, ...]) -> None:
    """CUDA's launch limits (axis 0 < 2^31, axes 1-2 <= 65535), as a clear error instead of Triton's 'invalid
    argument' from the driver."""
    if grid[0] >= 2**31 or any(g > 65535 for g in grid[1:]):
        raise ValueError(f"{what}: the problem is too large for one launch (grid {grid}; CUDA allows < 2^31 "
                         "programs on axis 0 and <= 65535 on axes 1-2); split the input")
