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

The pick is remembered per key in a plain dict (``_CHOSEN``), so the cached case costs one key build and one
dict lookup per call.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _extension
from ..formats import BSR, CSR, NM
from . import _cusparselt, reference
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

    def release(self, family: str, w: Format) -> None:
        """Drop anything cached for ``w`` (called when this backend lost a measurement for it)."""


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


def _parse_measure(value: str | None) -> set[str]:
    """``SPARSEKIT_MEASURE_BACKENDS`` -> the device types measured ("*" = all). Unset: {"cuda"}."""
    if value is None:
        return {"cuda"}
    v = value.strip().lower()
    if v in _OFF:
        return set()
    if v in _ON:
        return {"*"}
    return {part.strip() for part in v.split(",") if part.strip()}


_MEASURE: set[str] = _parse_measure(os.environ.get(MEASURE_ENV))
_NO_MEASURE: set[str] = set()        # switched off by set_measure (wins over "*")
_CHOSEN: dict[tuple, Backend] = {}   # (forced name, *_choice_key) -> backend
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
    return (family, device, x.dtype, pattern, 1 << (m - 1).bit_length() if m > 0 else 0, n, k,
            -(-stored * 16 // (n * k)) if n * k else 0, interp)


def choose(family: str, x: Tensor, w: Format, backend: str | None = None) -> Backend:
    """The backend that will run this call: the forced one, the fastest measured one, or the first usable in
    priority order (see the module docstring). The pick (and a forced backend's check) is remembered per key:
    it is on every call's path."""
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
    candidates = [b for b in usable if b.name not in MEASURE_SKIP]
    if len(candidates) < 2:
        return usable[0], True
    if _why_not_measure(x) is not None:
        return usable[0], False
    return _measure(family, x, w, candidates, key), True


def _measure(family: str, x: Tensor, w: Format, candidates: list[Backend], key: tuple) -> Backend:
    xc = x.detach().contiguous()
    ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    with torch.no_grad():
        for b in candidates:
            try:
                ms[b.name] = _time_call(lambda b=b: b.mm(family, xc, w, None), xc.device)
            except Exception as exc:   # a backend that fails here is not chosen; the error is kept for inspection
                errors[b.name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    timed = [b for b in candidates if b.name in ms]   # priority order: min() keeps the first of equals
    best = min(timed, key=lambda b: ms[b.name]) if timed else candidates[0]
    for b in candidates:
        if b is not best:
            b.release(family, w)
    MEASUREMENTS[key] = {"shape": (xc.shape[0], *w.shape), "ms": ms, "errors": errors, "chosen": best.name}
    return best


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
