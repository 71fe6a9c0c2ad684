"""Backend dispatcher.

Each backend declares what it supports and answers ``not_supported_reasons(family, x, w) -> list[str]``.
The dispatcher walks a per-device priority list and takes the first backend with no reasons; the pure-PyTorch
reference is last and always supported. ``backend="name"`` forces one; if it cannot run, the error lists every
backend's reasons. ``sparsekit info`` prints the same reasons.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _extension
from ..formats import BSR, CSR, NM
from . import reference
from ._library import call_op, has_kernel

Format = BSR | CSR | NM
FAMILY_OF = {BSR: "bsr", CSR: "csr", NM: "nm"}


def _call_mm(fn: Callable, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
    if family == "nm":
        return call_op(fn, x, w.values, w.indices, bias, w.n, w.m)
    return call_op(fn, x, w.crow_indices, w.col_indices, w.values, bias, w.shape[0])


class Backend:
    """One way of running the ops. Subclasses set name/families/dtypes and implement ``mm``."""

    name: str = ""
    description: str = ""
    families: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def environment_reasons(self) -> list[str]:
        """Reasons this backend cannot run at all on this machine/build (independent of the inputs)."""
        return []

    def input_reasons(self, family: str, x: Tensor, w: Format) -> list[str]:
        return []

    def not_supported_reasons(self, family: str, x: Tensor, w: Format) -> list[str]:
        if family not in self.families:
            return [f"has no {family} kernel (supports: {', '.join(self.families) or 'nothing yet'})"]
        reasons = self.environment_reasons()
        if x.dtype not in self.dtypes:
            reasons.append(f"dtype {x.dtype} not supported (supports {[str(d) for d in self.dtypes]})")
        return reasons + self.input_reasons(family, x, w)

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch (densify + matmul); always available, the correctness baseline"
    families = ("bsr", "csr", "nm")

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        return _call_mm(reference.REFERENCES[f"{family}_mm"], family, x, w, bias)


class CppBackend(Backend):
    """C++ kernels in sparsekit._C registered for one dispatch key (CPU or CUDA)."""

    families = ("bsr", "csr", "nm")

    def __init__(self, name: str, dispatch_key: str, device_type: str, description: str) -> None:
        self.name = name
        self.dispatch_key = dispatch_key
        self.device_type = device_type
        self.description = description

    def environment_reasons(self) -> list[str]:
        if not _extension.load():
            return [f"the C++ extension sparsekit._C is not built ({_extension.LOAD_ERROR}); "
                    "reinstall with `pip install --no-build-isolation -e .` (SPARSEKIT_BUILD_EXT unset)"]
        return []

    def input_reasons(self, family: str, x: Tensor, w: Format) -> list[str]:
        reasons = []
        if x.device.type != self.device_type:
            reasons.append(f"runs on {self.device_type} tensors, got {x.device.type}")
        if _extension.LOADED and not has_kernel(f"{family}_mm", self.dispatch_key):
            why = " (torch is a CPU build or the extension was built without FORCE_CUDA)" \
                if self.dispatch_key == "CUDA" else ""
            reasons.append(f"sparsekit._C has no {self.dispatch_key} kernel for {family}_mm{why}")
        return reasons

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        return _call_mm(getattr(torch.ops.sparsekit, f"{family}_mm").default, family, x, w, bias)


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (same spellings Triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_TRITON_IMPORT_ERROR: list[str | None] = []   # filled on first query: [None] or [error]
_CAPABILITY: dict[int, tuple[int, int]] = {}   # per CUDA device index


def _triton_import_error() -> str | None:
    if not _TRITON_IMPORT_ERROR:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            _TRITON_IMPORT_ERROR.append(str(exc))
        else:
            _TRITON_IMPORT_ERROR.append(None)
    return _TRITON_IMPORT_ERROR[0]


def _capability(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (kernels/), CUDA GPUs of compute capability >= 8.0; CPU under TRITON_INTERPRET=1"
    families = ("bsr", "nm")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    block_sides = (16, 32, 64, 128)

    def environment_reasons(self) -> list[str]:
        err = _triton_import_error()
        return [f"triton is not importable ({err}); `pip install triton`"] if err else []

    def input_reasons(self, family: str, x: Tensor, w: Format) -> list[str]:
        reasons = []
        if x.device.type == "cuda":
            major, minor = _capability(x.device)
            if major < 8:
                reasons.append(f"needs compute capability >= 8.0, the GPU has {major}.{minor}")
        elif x.device.type == "cpu":
            if not triton_interpreting():
                reasons.append("runs on CUDA tensors; on CPU only with TRITON_INTERPRET=1 (the interpreter, for tests)")
            elif x.dtype == torch.bfloat16:
                reasons.append("bfloat16 is unreliable under the Triton interpreter")
        else:
            reasons.append(f"runs on cuda tensors, got {x.device.type}")
        if isinstance(w, BSR) and any(b not in self.block_sides for b in w.block):
            reasons.append(f"block {w.block} not supported (each side must be one of {self.block_sides})")
        if isinstance(w, NM):
            if w.indices.dtype != torch.uint8:
                reasons.append(f"NM indices must be uint8, got {w.indices.dtype}")
            if not 1 <= w.n <= w.m <= 255:
                reasons.append(f"n:m = {w.n}:{w.m} not supported (needs 1 <= n <= m <= 255)")
        return reasons

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        from . import _triton_ops

        return _call_mm(_triton_ops.OPS[family], family, x, w, bias)


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (
        CppBackend("cpu", "CPU", "cpu", "C++ kernels in csrc/cpu (OpenMP)"),
        CppBackend("cuda", "CUDA", "cuda", "CUDA C++ kernels in csrc/cuda"),
        TritonBackend(),
        ReferenceBackend(),
    )
}

# Order tried per device type when no backend is forced; anything not listed tries only the reference.
PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "triton", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


def family_of(w: object) -> str:
    try:
        return FAMILY_OF[type(w)]
    except KeyError:
        raise TypeError(f"w must be a BSR, CSR or NM weight, got {type(w).__name__}") from None


def all_reasons(family: str, x: Tensor, w: Format) -> dict[str, list[str]]:
    """Every backend's reasons for not running (empty list = can run)."""
    return {name: b.not_supported_reasons(family, x, w) for name, b in BACKENDS.items()}


_CHOSEN: dict[tuple, Backend] = {}   # (forced name, family, device, dtype, pattern, interpreter) -> backend


def _choice_key(family: str, x: Tensor, w: Format) -> tuple:
    """Everything the backends' reasons depend on, cheaply (this is on every call's path): device (type and
    index), dtype, the pattern's kind, and the Triton interpreter switch."""
    if family == "bsr":
        pattern = w.values.shape[1:]
    elif family == "nm":
        pattern = (w.n, w.m, w.indices.dtype)
    else:
        pattern = None
    device = "cpu" if x.is_cpu else (x.get_device() if x.is_cuda else str(x.device))
    return family, device, x.dtype, pattern, os.environ.get("TRITON_INTERPRET")


def choose(family: str, x: Tensor, w: Format, backend: str | None = None) -> Backend:
    """The backend that will run this call: the forced one, or the first usable in priority order. The pick
    (and a forced backend's check) is remembered per device, dtype and pattern kind: it is on every call's path."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {backend!r}")
    if torch.compiler.is_compiling():   # no global dict writes while tracing
        return _pick(family, x, w, backend)
    key = (backend, *_choice_key(family, x, w))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _pick(family, x, w, backend)
    return chosen


def _pick(family: str, x: Tensor, w: Format, backend: str | None) -> Backend:
    if backend is None:
        return _first_usable(family, x, w)
    reasons = BACKENDS[backend].not_supported_reasons(family, x, w)
    if reasons:
        raise ValueError(f"backend={backend!r} cannot run this {family} call "
                         f"(x {tuple(x.shape)} {x.dtype} on {x.device}, block/pattern {_describe(w)}):\n"
                         + _format_reasons(all_reasons(family, x, w)))
    return BACKENDS[backend]


def _first_usable(family: str, x: Tensor, w: Format) -> Backend:
    for name in PRIORITY.get(x.device.type, ("reference",)):
        b = BACKENDS[name]
        if not b.not_supported_reasons(family, x, w):
            return b
    return BACKENDS["reference"]


def _describe(w: Format) -> str:
    if isinstance(w, BSR):
        return f"BSR block {w.block}"
    if isinstance(w, NM):
        return f"NM {w.n}:{w.m}"
    return type(w).__name__


def _format_reasons(reasons: dict[str, list[str]]) -> str:
    lines = []
    for name, rs in reasons.items():
        lines.append(f"  {name}: " + ("can run" if not rs else "; ".join(rs)))
    return "\n".join(lines)
