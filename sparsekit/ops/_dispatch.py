"""Backend dispatcher.

Each backend declares what it supports and answers ``not_supported_reasons(family, x, w) -> list[str]``.
``backend="name"`` forces one; if it cannot run, the error lists every backend's reasons. ``sparsekit info``
prints the same reasons. Backends: ``cpu`` / ``cuda`` (C++ kernels), ``triton``, ``cusparselt`` (2:4 NM weights
on sparse tensor cores through torch's semi-structured sparsity, fp16/bf16, sm80+; see ``_cusparselt.py``) and
``reference`` (densify + matmul: always supported, the last resort).

Choosing (``backend=None``)
    Measured where measurement is on for the device type (default: ``cuda`` only): the first time a key
    (family, device, dtype, pattern kind — block shape / n:m / csr —, M rounded up to a power of two, N, K,
    stored-density bucket) is seen, every usable backend but the reference is timed on that call's real
    inputs (``MEASURE_WARMUP`` warm-up + up to ``MEASURE_REPS`` timed runs, median; CUDA events on CUDA,
    ``time.perf_counter`` around synchronised calls elsewhere, without bias, under no_grad; outputs discarded:
    the real call runs once afterwards on the winner) and the fastest is remembered for the key. Ties and
    failures go to the priority order. Nothing is measured while torch.compile/export trace, functorch
    transforms or a TorchDispatchMode are active, or while the current CUDA stream is capturing a graph: the
    first usable backend in ``PRIORITY`` order is taken there (and, outside tracing, not remembered, so a later
    eager call still measures). Elsewhere (default: CPU, where the ``cpu`` backend is always first) the first
    usable backend in ``PRIORITY`` order is taken. ``SPARSEKIT_MEASURE_BACKENDS`` (read at import: ``0`` = never,
    ``1`` = every device type, or a comma list such as ``cuda,cpu``) or ``set_measure(device_type, on)`` changes
    where. Choices live for the process (``MEASUREMENTS`` holds the timings; ``clear_choices()`` forgets them);
    they are not persisted: a few calls per new shape is cheap, and stored timings go stale with drivers,
    kernels and clocks.

Kernel variants
    A backend whose kernels pick among several by built-in thresholds can name them (``Backend.variants``):
    measuring then times each as a candidate of its own (labelled ``"<backend>:<variant>"`` in MEASUREMENTS) and
    remembers the winner as a ``VariantBackend``, whose ``name`` is still the backend's. Today: csr on the ``cuda``
    backend (``csr_mm_variants``: the skinny tensor-core kernel, the row-dot and the Sputnik-style tiled kernel,
    through ``sparsekit::csr_mm_variant``); without measuring, the op's own thresholds decide.

The same timing and cache serve ``measured_choice``, for helpers that pick between a fused kernel and the
unfused PyTorch path (sparsekit.ops.channel).

The ``cuda`` backend also checks that sparsekit._C holds code this GPU can run (``cuda_build_reasons``: one probe
launch per device), so a GPU outside the TORCH_CUDA_ARCH_LIST the extension was built for gets a reason, not
"no kernel image is available" from every call. On a ROCm build of torch (AMD GPUs appear as "cuda" devices) the
``cuda`` and ``triton`` backends give ``ROCM_REASON`` for them (``rocm_reasons``), so the dispatcher falls back.

The pick is remembered per key in a plain dict (``_CHOSEN``), so the cached case costs one key build and one
dict lookup per call.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .. import _extension
from ..formats import BSR, CSR, NM
from . import _cusparselt, reference
from ._library import _needs_autograd_layer, call_op, has_kernel

Format = BSR | CSR | NM
FAMILY_OF = {BSR: "bsr", CSR: "csr", NM: "nm"}


def _call_mm(fn: Callable, family: str, x: Tensor, w: Format, bias: Tensor | None,
             eager: Callable | None = None) -> Tensor:
    if family == "nm":
        return call_op(fn, x, w.values, w.indices, bias, w.n, w.m, eager=eager)
    return call_op(fn, x, w.crow_indices, w.col_indices, w.values, bias, w.shape[0], eager=eager)


def cpu_mm_call(family: str, w: Format, bias: Tensor | None) -> tuple[Callable, tuple]:
    """The op the ``cpu`` backend runs for ``family`` and its arguments after x: ``<family>_mm``, or
    ``csr_bitmap_mm`` for a CSR that carries a bitmap (its kernel reads the bitmap for skinny x)."""
    if family == "nm":
        return torch.ops.sparsekit.nm_mm.default, (w.values, w.indices, bias, w.n, w.m)
    if family == "csr" and w.bitmap is not None and has_kernel("csr_bitmap_mm", "CPU"):   # (an older _C: csr_mm)
        return torch.ops.sparsekit.csr_bitmap_mm.default, (w.crow_indices, w.col_indices, w.bitmap, w.values, bias,
                                                           w.shape[0])
    return getattr(torch.ops.sparsekit, f"{family}_mm").default, (w.crow_indices, w.col_indices, w.values, bias,
                                                                  w.shape[0])


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

    def release(self, family: str, w: Format) -> None:
        """Drop anything cached for ``w`` (called when this backend lost a measurement for it)."""

    variant: str | None = None   # set on a VariantBackend only

    @property
    def label(self) -> str:
        """The backend's name in MEASUREMENTS: its name, plus ":<variant>" for one of its kernel variants."""
        return self.name if self.variant is None else f"{self.name}:{self.variant}"

    def variants(self, family: str, x: Tensor, w: Format) -> tuple[str, ...]:
        """Kernel variants that measuring times as candidates of their own, replacing the rule by which this
        backend's kernels pick one (untuned thresholds) with the measured winner; () = the backend as it is."""
        return ()

    def mm_variant(self, family: str, x: Tensor, w: Format, bias: Tensor | None, variant: str) -> Tensor:
        """``mm`` on kernel variant ``variant`` (one of ``variants()``)."""
        raise NotImplementedError(f"backend {self.name!r} has no kernel variants")


class VariantBackend(Backend):
    """``base`` running one of its kernel variants: what measuring chose for a key. ``name`` stays the base's
    (the backend a call ran on); ``label`` names the variant."""

    def __init__(self, base: Backend, variant: str) -> None:
        self.base, self.variant = base, variant
        self.name, self.description, self.families, self.dtypes = base.name, base.description, base.families, \
            base.dtypes

    def environment_reasons(self) -> list[str]:
        return self.base.environment_reasons()

    def input_reasons(self, family: str, x: Tensor, w: Format) -> list[str]:
        return self.base.input_reasons(family, x, w)

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        return self.base.mm_variant(family, x, w, bias, self.variant)

    def release(self, family: str, w: Format) -> None:
        self.base.release(family, w)


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
        elif self.dispatch_key == "CUDA" and x.device.type == "cuda" and _extension.LOADED:
            reasons += cuda_build_reasons(x.device)
        return reasons

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        if self.dispatch_key == "CPU":
            op, args = cpu_mm_call(family, w, bias)
            return call_op(op, x, *args)
        return _call_mm(getattr(torch.ops.sparsekit, f"{family}_mm").default, family, x, w, bias)

    def variants(self, family: str, x: Tensor, w: Format) -> tuple[str, ...]:
        # csr_mm on CUDA picks among three kernels by untuned thresholds (csrc/cuda/csr_spmm.cu, csr_skinny.cu);
        # sparsekit::csr_mm_variant runs a named one, so measuring times each
        if family != "csr" or self.dispatch_key != "CUDA" or x.device.type != "cuda" \
                or not has_kernel(CSR_VARIANT_OP, "CUDA"):
            return ()
        return csr_mm_variants(x.shape[0], x.dtype, _capability(x.device))

    def mm_variant(self, family: str, x: Tensor, w: Format, bias: Tensor | None, variant: str) -> Tensor:
        if family != "csr" or _needs_autograd_layer((x, w.values, bias)) or (variant == "skinny" and skinny_off()):
            # the variant op has no autograd formula (nor fake): csr_mm, with its kernels' own rule, serves
            # calls that need autograd or are traced, and a measured "skinny" pick once the switch turned it off
            return self.mm(family, x, w, bias)
        op = getattr(torch.ops.sparsekit, CSR_VARIANT_OP).default
        return call_op(op, x, w.crow_indices, w.col_indices, w.values, bias, w.shape[0], variant)


# sparsekit::csr_mm_variant (csrc/cuda/csr_spmm.cu, CUDA builds only): csr_mm on a named kernel
CSR_VARIANT_OP = "csr_mm_variant"
CSR_SKINNY_MAX_M = 64   # csr_skinny.cu kMaxM
CSR_ROWDOT_MAX_M = 8    # csr_spmm.cu kRowDotMaxM


def skinny_off() -> bool:
    """SPARSEKIT_CSR_SKINNY=0 (read per call by the CUDA op too): the skinny tensor-core CSR kernel is off."""
    return os.environ.get("SPARSEKIT_CSR_SKINNY") == "0"   # the same test as selfcheck.cuh's path_mode


def csr_mm_variants(m: int, dtype: torch.dtype, capability: tuple[int, int]) -> tuple[str, ...]:
    """The CUDA csr_mm kernels that can run x of ``m`` rows in ``dtype`` on a GPU of ``capability``: "skinny"
    (tensor-core "load sparse, compute dense", fp16/bf16, 1 <= M <= 64, sm80+; any density), "rowdot" (a warp per
    sparse row, M <= 8) and "tiled" (the Sputnik-style subwarp kernel, any M). Without measuring, the op picks by
    its thresholds (skinny for density 0.09-0.5 once its self-check passed, rowdot for M <= 8, else tiled)."""
    out = []
    if dtype in (torch.float16, torch.bfloat16) and 1 <= m <= CSR_SKINNY_MAX_M and tuple(capability) >= (8, 0) \
            and not skinny_off():
        out.append("skinny")
    if 1 <= m <= CSR_ROWDOT_MAX_M:
        out.append("rowdot")
    out.append("tiled")
    return tuple(out)


# ------------------------------------------------------------------------- can the built CUDA code run here
DEFAULT_CUDA_ARCH_LIST = "8.0+PTX;9.0a"   # setup.py's default TORCH_CUDA_ARCH_LIST
_CUDA_BUILD: dict[int, list[str]] = {}    # device index -> cuda_build_reasons


ROCM_REASON = "ROCm (torch.version.hip) is not supported by sparsekit's GPU kernels"


def rocm_reasons() -> list[str]:
    """[ROCM_REASON] on a ROCm build of torch, [] otherwise. There AMD GPUs are "cuda" devices, so without this the
    ``cuda`` and ``triton`` backends would take them, with kernels, launch tables and TF32 rules written for NVIDIA
    GPUs (mma.sync / wgmma, sm80/sm90 shared memory)."""
    return [ROCM_REASON] if getattr(torch.version, "hip", None) else []


def cuda_build_reasons(device: torch.device) -> list[str]:
    """Why sparsekit._C's CUDA kernels cannot run on ``device`` (empty: they can). On a ROCm build of torch:
    rocm_reasons(), without a probe. Otherwise the extension holds code for the TORCH_CUDA_ARCH_LIST it was built
    with only (default: sm_80 and sm_90a machine code, compute_80 PTX that newer GPUs compile at load time; nothing
    for 7.x), and every launch on another GPU fails with "no kernel image is available". Probed once per device with
    a one-entry csr_mm, remembered for the process; not probed (and assumed fine) while tracing, under a dispatch
    mode or functorch transform, or while a CUDA graph is captured."""
    rocm = rocm_reasons()
    if rocm:
        return rocm
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _CUDA_BUILD:
        return _CUDA_BUILD[idx]
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return []
    from torch.utils import _python_dispatch

    if _python_dispatch.is_in_torch_dispatch_mode() or torch._C._len_torch_dispatch_stack():
        return []
    with torch.cuda.device(idx):
        if torch.cuda.is_current_stream_capturing():
            return []
    error = _probe_cuda_build(idx)
    reasons = []
    if error is not None:
        major, minor = _capability(torch.device("cuda", idx))
        reasons.append(f"sparsekit._C's CUDA code does not run on this GPU (compute capability {major}.{minor}): "
                       f"{error}; rebuild with TORCH_CUDA_ARCH_LIST naming it (e.g. \"{major}.{minor}\"; setup.py's "
                       f"default \"{DEFAULT_CUDA_ARCH_LIST}\" covers 8.x, 9.0 and, through PTX, newer GPUs)")
    _CUDA_BUILD[idx] = reasons
    return reasons


def _probe_cuda_build(index: int) -> str | None:
    """None when a sparsekit CUDA kernel runs on device ``index`` (and computes 1 * 2 = 2), else the error."""
    dev = torch.device("cuda", index)
    try:
        with torch.cuda.device(index), torch.no_grad():
            ones = torch.ones(1, device=dev)
            crow = torch.tensor([0, 1], dtype=torch.int32, device=dev)
            col = torch.zeros(1, dtype=torch.int32, device=dev)
            y = call_op(torch.ops.sparsekit.csr_mm.default, ones.view(1, 1) * 2, crow, col, ones, None, 1)
            if y.item() != 2.0:
                return f"a probe csr_mm returned {y.item()} instead of 2.0"
    except RuntimeError as exc:   # torch.AcceleratorError too
        return str(exc).strip().splitlines()[0][:300]
    return None


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
            rocm = rocm_reasons()
            if rocm:
                reasons += rocm
            else:
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
        # (the launchers read the format's tensors as dense arrays: a strided view would be refused there)
        loose = [n for n in ("values", "crow_indices", "col_indices", "indices")
                 if isinstance(getattr(w, n, None), Tensor) and not getattr(w, n).is_contiguous()]
        if loose:
            reasons.append(f"needs contiguous format tensors, got non-contiguous {', '.join(loose)}")
        if isinstance(w, NM):
            if w.indices.dtype != torch.uint8:
                reasons.append(f"NM indices must be uint8, got {w.indices.dtype}")
            if not 1 <= w.n <= w.m <= 255:
                reasons.append(f"n:m = {w.n}:{w.m} not supported (needs 1 <= n <= m <= 255)")
        return reasons

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        from . import _triton_ops

        return _call_mm(_triton_ops.OPS[family], family, x, w, bias, eager=_triton_ops.EAGER[family])


class CusparseltBackend(Backend):
    """2:4 NM weights through torch's semi-structured sparsity (cuSPARSELt, else CUTLASS); see _cusparselt.py."""

    name = "cusparselt"
    description = ("2:4 NM on sparse tensor cores via torch's semi-structured sparsity (cuSPARSELt, else "
                   "CUTLASS); fp16/bf16, CUDA sm80+, eager only")
    families = ("nm",)
    dtypes = _cusparselt.DTYPES

    def environment_reasons(self) -> list[str]:
        return _cusparselt.environment_reasons()

    def input_reasons(self, family: str, x: Tensor, w: Format) -> list[str]:
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"runs on cuda tensors, got {x.device.type}")
        tracing = _cusparselt.tracing_reasons(x)
        if tracing:   # that alone decides; nothing below needs to be traced
            return reasons + tracing
        if x.device.type == "cuda" and not self.environment_reasons():
            major, minor = _capability(x.device)
            if (major, minor) < _cusparselt.MIN_CAPABILITY:
                reasons.append(f"needs compute capability >= 8.0 (sparse tensor cores), the GPU has {major}.{minor}")
        if isinstance(w, NM):
            if (w.n, w.m) != _cusparselt.PATTERN:
                reasons.append(f"pattern n:m = {w.n}:{w.m} is not 2:4 (the only pattern sparse tensor cores run)")
            if x.dtype in self.dtypes:
                reasons += _cusparselt.shape_reasons(w.shape[0], w.shape[1], x.dtype)
        return reasons

    def mm(self, family: str, x: Tensor, w: Format, bias: Tensor | None) -> Tensor:
        if torch._C._are_functorch_transforms_active():   # a choice remembered from an eager call: same result
            return _call_mm(torch.ops.sparsekit.nm_mm.default, family, x, w, bias)   # through nm_mm's autograd
        return _cusparselt.linear(x, w, bias)

    def release(self, family: str, w: Format) -> None:
        _cusparselt.forget(w)


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (
        CppBackend("cpu", "CPU", "cpu", "C++ kernels in csrc/cpu (OpenMP)"),
        CppBackend("cuda", "CUDA", "cuda", "CUDA C++ kernels in csrc/cuda"),
        TritonBackend(),
        CusparseltBackend(),
        ReferenceBackend(),
    )
}

# Order tried per device type when no backend is forced and nothing is measured (and the order ties and
# failures fall back to when measuring); anything not listed tries only the reference.
PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "triton", "reference"),
    "cuda": ("triton", "cusparselt", "cuda", "reference"),
}


def family_of(w: object) -> str:
    try:
        return FAMILY_OF[type(w)]
    except KeyError:
        raise TypeError(f"w must be a BSR, CSR or NM weight, got {type(w).__name__}") from None


def all_reasons(family: str, x: Tensor, w: Format) -> dict[str, list[str]]:
    """Every backend's reasons for not running (empty list = can run)."""
    return {name: b.not_supported_reasons(family, x, w) for name, b in BACKENDS.items()}


# ---------------------------------------------------------------------------------------------- choosing
MEASURE_ENV = "SPARSEKIT_MEASURE_BACKENDS"
MEASURE_WARMUP = 2          # untimed runs per backend (Triton JIT, cuSPARSELt compression, caches)
MEASURE_REPS = 5            # timed runs per backend (median), fewer when one run is slow:
MEASURE_BUDGET_S = 0.25     # ... at most about this long per backend after warm-up (at least one run)
MEASURE_SKIP = frozenset({"reference"})   # densifies W on every call: a fallback, never a measured candidate
_OFF = ("0", "off", "false", "no", "none", "")
_ON = ("1", "on", "true", "yes", "all", "*")


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (0 stays 0): calls whose row counts share a bucket share a measurement."""
    return 1 << (m - 1).bit_length() if m > 0 else 0


def check_backend(fn: str, backend: object, allowed: tuple[str, ...]) -> None:
    """``backend`` must be None or one of ``allowed`` (a TypeError / ValueError naming ``fn`` otherwise)."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a str or None, got {type(backend).__name__}")
    if backend not in (None, *allowed):
        raise ValueError(f"{fn}: backend must be one of {list(allowed)} or None, got {backend!r}")


def _parse_measure(value: str | None) -> set[str]:
    """``SPARSEKIT_MEASURE_BACKENDS`` -> the device types measured ("*" = all). Unset: {"cuda"}."""
    if value is None:
        return {"cuda"}
    v = value.strip().lower()
    if v in _OFF:
        return set()
    if v in _ON:
        return {"*"}
    parts = {part.strip() for part in v.split(",") if part.strip()}
    bad = sorted(p for p in parts if not _is_device_type(p))
    if bad:
        warnings.warn(f"{MEASURE_ENV}={value!r}: {bad} are not device types (expected a comma-separated list such "
                      f"as 'cuda,cpu', or one of {_ON + _OFF[:-1]}); ignoring them", RuntimeWarning, stacklevel=2)
    return parts - set(bad)


def _is_device_type(name: str) -> bool:
    try:
        return torch.device(name).type == name
    except RuntimeError:
        return False


_MEASURE: set[str] = _parse_measure(os.environ.get(MEASURE_ENV))
_NO_MEASURE: set[str] = set()        # switched off by set_measure (wins over "*")
_CHOSEN: dict[tuple, Backend | str] = {}   # (forced name, *_choice_key) -> backend; measured_choice's keys -> name
MEASUREMENTS: dict[tuple, dict] = {}   # _choice_key -> {"shape", "ms": {name: median ms}, "errors", "chosen"}


def measure_enabled(device_type: str) -> bool:
    """True when ``backend=None`` calls on ``device_type`` tensors are measured (see the module docstring)."""
    return (device_type in _MEASURE or "*" in _MEASURE) and device_type not in _NO_MEASURE


def set_measure(device_type: str, enabled: bool) -> bool:
    """Turn measured choice on/off for one device type ("cpu", "cuda", ...); returns the previous setting.
    Forgets the remembered choices (they were made under the other setting)."""
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f"device_type must be a device type string such as 'cuda' or 'cpu', got {device_type!r}")
    before = measure_enabled(device_type)
    if enabled:
        _MEASURE.add(device_type)
        _NO_MEASURE.discard(device_type)
    else:
        _MEASURE.discard(device_type)
        _NO_MEASURE.add(device_type)
    clear_choices()
    return before


def clear_choices() -> None:
    """Forget every remembered backend choice and measurement."""
    _CHOSEN.clear()
    MEASUREMENTS.clear()


# os.environ.get costs ~1 µs (key encoding); the dict behind os.environ (kept in step by os.environ[...] = and
# monkeypatch.setenv) answers in ~50 ns. Used for the per-call Triton interpreter switch only.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _INTERP_KEY = os.environ.encodekey("TRITON_INTERPRET")   # type: ignore[attr-defined]
except AttributeError:
    _ENV_DATA = None


def _interp_switch() -> object:
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_INTERP_KEY)
    return os.environ.get("TRITON_INTERPRET")


def _choice_key(family: str, x: Tensor, w: Format) -> tuple:
    """Everything a choice depends on, cheaply (this is on every call's path): family, device (type and index),
    dtype, the pattern's kind, M rounded up to a power of two, N, K, a stored-density bucket (ceil(16 *
    density) from the formats' sizes: no device sync) and, for CPU tensors, the Triton interpreter switch."""
    n, k = w.shape
    if family == "bsr":
        vs = w.values.shape
        pattern = (vs[1], vs[2])
        stored = vs[0] * vs[1] * vs[2]
    elif family == "nm":
        pattern = (w.n, w.m, w.indices.dtype)
        stored = n * (k // w.m) * w.n
    else:
        pattern = None
        stored = w.col_indices.shape[0]
    xs = x.shape
    m = xs[0] if len(xs) == 2 else (x.numel() // k if k else 0)
    if x.is_cpu:
        device, interp = "cpu", _interp_switch()
    else:
        device, interp = (x.get_device() if x.is_cuda else str(x.device)), None
    return (family, device, x.dtype, pattern, m_bucket(m), n, k,
            -(-stored * 16 // (n * k)) if n * k else 0, interp)


_RECORDING = threading.local()   # .seen: a list while recording_choices() is active in this thread


@contextlib.contextmanager
def recording_choices() -> Iterator[list[str]]:
    """Collect the labels of the backends ``choose`` picks in this thread inside the block (which backend ran a
    layer, for sk.sparsify's report). Calls that skip the dispatcher (the CPU C++ kernels' repeat path and
    convolution kernels) record nothing."""
    previous = getattr(_RECORDING, "seen", None)
    _RECORDING.seen = seen = []
    try:
        yield seen
    finally:
        _RECORDING.seen = previous


def choose(family: str, x: Tensor, w: Format, backend: str | None = None) -> Backend:
    """The backend that will run this call: the forced one, the fastest measured one, or the first usable in
    priority order (see the module docstring). The pick (and a forced backend's check) is remembered per key:
    it is on every call's path."""
    chosen = _choose(family, x, w, backend)
    seen = getattr(_RECORDING, "seen", None)
    if seen is not None:
        seen.append(chosen.label)
    return chosen


def _choose(family: str, x: Tensor, w: Format, backend: str | None) -> Backend:
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {backend!r}")
    if torch.compiler.is_compiling():   # no global dict writes (and no measuring) while tracing
        return _pick(family, x, w, backend)
    key = (backend, *_choice_key(family, x, w))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        if backend is None and measure_enabled(x.device.type):
            chosen, remember = _measured_pick(family, x, w, key[1:])
            if not remember:
                return chosen
        else:
            chosen = _pick(family, x, w, backend)
        _CHOSEN[key] = chosen
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


def _why_not_measure(x: Tensor) -> str | None:
    """Why this call must not be measured now (None: it may)."""
    if torch._C._are_functorch_transforms_active():
        return "functorch transforms are active"
    if type(x) not in (Tensor, torch.nn.Parameter):
        return f"x is a {type(x).__name__}"
    from torch.utils import _python_dispatch

    if _python_dispatch.is_in_torch_dispatch_mode() or torch._C._len_torch_dispatch_stack():
        return "a TorchDispatchMode is active"
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return "the current CUDA stream is capturing a graph"
    return None


def _measured_pick(family: str, x: Tensor, w: Format, key: tuple) -> tuple[Backend, bool]:
    """(backend, remember it): the fastest usable backend on this call's inputs, or the first usable one in
    priority order where measuring is not possible now (then not remembered) or pointless (one candidate)."""
    usable = [BACKENDS[name] for name in PRIORITY.get(x.device.type, ("reference",))
              if not BACKENDS[name].not_supported_reasons(family, x, w)]
    if not usable:
        return BACKENDS["reference"], True
    candidates = [c for b in usable if b.name not in MEASURE_SKIP for c in _with_variants(b, family, x, w)]
    if len(candidates) < 2:
        return usable[0], True
    if _why_not_measure(x) is not None:
        return usable[0], False
    return _measure(family, x, w, candidates, key), True


def _with_variants(b: Backend, family: str, x: Tensor, w: Format) -> list[Backend]:
    variants = b.variants(family, x, w)
    return [VariantBackend(b, v) for v in variants] if variants else [b]


def _measure(family: str, x: Tensor, w: Format, candidates: list[Backend], key: tuple) -> Backend:
    xc = x.detach().contiguous()
    by_label = {b.label: b for b in candidates}
    ms, errors = _time_candidates({label: (lambda b=b: b.mm(family, xc, w, None)) for label, b in by_label.items()},
                                  xc.device)
    timed = [b for b in candidates if b.label in ms]   # priority order: min() keeps the first of equals
    best = min(timed, key=lambda b: ms[b.label]) if timed else candidates[0]
    winner = getattr(best, "base", best)
    for b in {getattr(b, "base", b) for b in candidates} - {winner}:   # (a backend's variants share its caches)
        b.release(family, w)
    MEASUREMENTS[key] = {"shape": (xc.shape[0], *w.shape), "ms": ms, "errors": errors, "chosen": best.label}
    return best


def _time_candidates(calls: dict[str, Callable[[], object]], device: torch.device
                     ) -> tuple[dict[str, float], dict[str, str]]:
    """({name: median ms}, {name: error}) of each call, under no_grad (see _time_call). A call that raises is not
    timed; its error is kept for inspection."""
    ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    with torch.no_grad():
        for name, fn in calls.items():
            try:
                ms[name] = _time_call(fn, device)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return ms, errors


def measured_choice(key: tuple, x: Tensor, calls: dict[str, Callable[[], object]], default: str,
                    shape: tuple = ()) -> str:
    """The fastest of ``calls`` (name -> a call on this call's real inputs; ties and failures go to the first in
    their order) for ``key``, measured like the backends above and remembered with their choices (``_CHOSEN``,
    ``MEASUREMENTS``; ``clear_choices()`` forgets both). For helpers outside the sparse formats (the channel
    gather/scatter ops) that pick between a fused kernel and the unfused PyTorch path.

    ``key`` must start with a name of its own (the helper's), not a backend name. Returns ``default`` without
    measuring or remembering anything where measuring is off for x's device type, or not possible now (tracing,
    functorch transforms, a TorchDispatchMode, CUDA graph capture); a single candidate is returned as is."""
    if len(calls) == 1:
        return next(iter(calls))
    if torch.compiler.is_compiling():
        return default
    key = (*key, tuple(calls))   # which paths can run differs between calls of one shape (e.g. with autograd)
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    if not measure_enabled(x.device.type) or _why_not_measure(x) is not None:
        return default
    ms, errors = _time_candidates(calls, x.device)
    timed = [name for name in calls if name in ms]
    best = min(timed, key=ms.__getitem__) if timed else default
    MEASUREMENTS[key] = {"shape": shape, "ms": ms, "errors": errors, "chosen": best}
    _CHOSEN[key] = best
    return best


def remembered_choice(key: tuple) -> object | None:
    """What ``choose`` / ``measured_choice`` remembered for ``key`` (None: nothing yet)."""
    return _CHOSEN.get(key)


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn()`` after warm-up: CUDA events on CUDA, perf_counter around synchronised
    calls elsewhere. Outputs are discarded."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _time_cuda(fn)
    sync = _synchronizer(device)
    one = _warm_up(fn, sync)
    times = []
    for _ in range(_reps(one)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda(fn: Callable[[], object]) -> float:
    one = _warm_up(fn, torch.cuda.synchronize)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(_reps(one))]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(stop) for start, stop in events)


def _warm_up(fn: Callable[[], object], sync: Callable[[], object]) -> float:
    """Run the warm-up calls (at least one); returns the seconds the last one took (compilation and first-use
    costs fall on the earlier ones), to size the timed runs."""
    for _ in range(MEASURE_WARMUP - 1):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _reps(one_s: float) -> int:
    return max(1, min(MEASURE_REPS, int(MEASURE_BUDGET_S / one_s) if one_s > 0 else MEASURE_REPS))


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cpu":
        return lambda: None
    mod = getattr(torch, device.type, None)
    sync = getattr(mod, "synchronize", None)
    if callable(sync):
        return sync
    acc = getattr(torch, "accelerator", None)
    return (lambda: acc.synchronize(device)) if acc is not None else (lambda: None)


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
