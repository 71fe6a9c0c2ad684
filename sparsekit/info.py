"""`sparsekit info`: versions, build flags, CPU/GPU features, and which backends can run here (and why not)."""

from __future__ import annotations

import os
import platform

import torch

from . import _extension
from .benchmark.machine import ISA_ENV, _cpu_caches, _cpu_model
from .ops import _cusparselt
from .ops._dispatch import (
    BACKENDS,
    MEASURE_ENV,
    MEASURE_SKIP,
    PRIORITY,
    cuda_build_reasons,
    measure_enabled,
    rocm_reasons,
    triton_interpreting,
)
from .ops._library import has_kernel

FAMILIES = ("bsr", "csr", "nm")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_features() -> dict[str, bool]:
    flags = _cpu_flags()
    return {"avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_tile": "amx_tile" in flags, "amx_bf16": "amx_bf16" in flags}


def _gpu() -> dict:
    if not torch.cuda.is_available():
        return {"available": False, "reason": "torch is a CPU build" if torch.version.cuda is None
                else "no CUDA device visible"}
    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return {"available": True, "name": torch.cuda.get_device_name(idx), "capability": f"{major}.{minor}"}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def backend_status() -> dict[str, dict]:
    """For each backend: families it can run on this machine, and why the others cannot."""
    gpu = torch.cuda.is_available()
    out = {}
    for name, b in BACKENDS.items():
        reasons = list(b.environment_reasons())
        families = []
        for fam in b.families:
            if name == "cpu" and _extension.LOADED and not has_kernel(f"{fam}_mm", "CPU"):
                reasons.append(f"no CPU kernel for {fam}_mm in sparsekit._C")
                continue
            if name == "cuda":
                if _extension.LOADED and not has_kernel(f"{fam}_mm", "CUDA"):
                    reasons.append(f"no CUDA kernel for {fam}_mm (extension built without CUDA)")
                    continue
                if not gpu:
                    continue
            families.append(fam)
        if name == "cuda" and not gpu:
            reasons.append("no CUDA GPU visible")
        usable_gpu = gpu
        if name == "cuda" and gpu and families:   # built for this GPU's arch? (one probe launch per device)
            build = cuda_build_reasons(torch.device("cuda", torch.cuda.current_device()))
            reasons += build
            usable_gpu = not build
        if name == "triton" and not gpu:
            reasons.append("no CUDA GPU visible" + (" (TRITON_INTERPRET=1: CPU tensors run in the interpreter)"
                                                   if triton_interpreting() else ""))
        if name == "triton" and gpu and rocm_reasons():   # (the dispatcher declines AMD GPUs: say so here too)
            reasons += rocm_reasons()
            usable_gpu = False
        if name == "cusparselt":
            if not gpu:
                reasons.append("no CUDA GPU visible")
            elif not b.environment_reasons():
                major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
                if (major, minor) < _cusparselt.MIN_CAPABILITY:
                    reasons.append(f"needs compute capability >= 8.0 (sparse tensor cores), the GPU has "
                                   f"{major}.{minor}")
                    usable_gpu = False
        usable = not b.environment_reasons() and bool(families) and (name not in ("cuda", "triton", "cusparselt")
                                                                      or usable_gpu
                                                                      or (name == "triton" and triton_interpreting()))
        out[name] = {"usable": usable, "families": families if usable else [], "reasons": reasons,
                     "description": b.description}
        if name == "cusparselt" and not b.environment_reasons():
            out[name]["kernel"] = _cusparselt.kernel_name()
            rows, cols = _cusparselt.min_shape(torch.float16)
            out[name]["note"] = (f"2:4 NM only, fp16/bf16, forward on {_cusparselt.kernel_name()}: W's N a multiple "
                                 f"of {rows}, K of {cols}")
    return out


def _cpu_kernel_isa() -> str | None:
    """The instruction set the CPU kernels run with now ("avx512+amx+bf16dot", "avx512+bf16dot", "avx2", ...: AMX
    tiles and AVX512-BF16 dot products for bfloat16 where the CPU has them); None without the extension
    (or with an extension built before the op existed)."""
    if not _extension.LOADED or not hasattr(torch.ops.sparsekit, "cpu_kernel_isa"):
        return None
    return torch.ops.sparsekit.cpu_kernel_isa()


def info() -> dict:
    _extension.load()
    return {
        "sparsekit": _version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "extension": {"loaded": _extension.LOADED, "error": _extension.LOAD_ERROR,
                      "cpu_kernels": [f for f in FAMILIES if _extension.LOADED and has_kernel(f"{f}_mm", "CPU")],
                      "cuda_kernels": [f for f in FAMILIES if _extension.LOADED and has_kernel(f"{f}_mm", "CUDA")],
                      "cpu_isa": _cpu_kernel_isa()},
        "cpu": {"model": _cpu_model(), "caches": _cpu_caches(), "threads": torch.get_num_threads(),
                "torch_capability": torch.backends.cpu.get_cpu_capability(), **cpu_features()},
        "gpu": _gpu(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "SPARSEKIT_BUILD_EXT", *ISA_ENV)
                if k in os.environ},
        "backends": backend_status(),
        "dispatcher": dispatcher_status(),
    }


def dispatcher_status() -> dict:
    """How backend=None picks, per device type: measured (fastest on the call's shape) or priority order."""
    return {dev: {"measured": measure_enabled(dev), "order": list(PRIORITY.get(dev, ("reference",)))}
            for dev in ("cpu", "cuda")} | {"env": os.environ.get(MEASURE_ENV), "not_measured": sorted(MEASURE_SKIP)}


def format_dispatcher(d: dict) -> list[str]:
    lines = ["dispatcher (backend=None):"]
    for dev in ("cuda", "cpu"):
        s = d[dev]
        order = ", ".join(s["order"])
        if s["measured"]:
            lines.append(f"  {dev}: measures every usable backend (not {', '.join(d['not_measured'])}) on a call's "
                         "real shape the first time its key (family, dtype, pattern, M bucket, N, K, density) is "
                         f"seen and keeps the fastest (csr on cuda: each CUDA kernel -- skinny, rowdot, tiled -- "
                         f"timed on its own); order {order} while compiling / capturing CUDA graphs")
        else:
            lines.append(f"  {dev}: first usable in order {order} (not measured)")
    lines.append(f"  {MEASURE_ENV}={d['env'] if d['env'] is not None else '(unset: measure on cuda only)'}; "
                 "0 = never, 1 = every device type, or a list such as cuda,cpu")
    return lines


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sparsekit")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def format_info(d: dict) -> str:
    ext = d["extension"]
    lines = [
        f"sparsekit {d['sparsekit']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})"
        f"  triton {d['triton'] or 'not installed'}",
        f"extension sparsekit._C: {'loaded' if ext['loaded'] else 'NOT loaded: ' + str(ext['error'])}"
        + (f"  CPU kernels: {', '.join(ext['cpu_kernels']) or 'none'}  CUDA kernels: "
           f"{', '.join(ext['cuda_kernels']) or 'none'}" if ext["loaded"] else "")
        + (f"  CPU kernel ISA: {ext['cpu_isa']}" + (" (bf16 BSR on AMX tiles)" if "amx" in ext["cpu_isa"] else "")
           if ext.get("cpu_isa") else ""),
        f"CPU: {d['cpu']['model']}" + (f" ({d['cpu']['caches']})" if d["cpu"]["caches"] else "")
        + f", {d['cpu']['threads']} threads, torch uses {d['cpu']['torch_capability']}; "
        + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in d["cpu"].items()
                   if k not in ("model", "caches", "threads", "torch_capability")),
        "GPU: " + (f"{d['gpu']['name']} (compute capability {d['gpu']['capability']})" if d["gpu"]["available"]
                   else f"none ({d['gpu']['reason']})"),
    ]
    if d["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in d["env"].items()))
    lines.append("backends:")
    for name, s in d["backends"].items():
        state = f"usable for {', '.join(s['families'])}" if s["usable"] else "not usable"
        lines.append(f"  {name:<10} {state:<24} {s['description']}")
        if s.get("note"):
            lines.append(f"  {'':<10}   ({s['note']})")
        for r in s["reasons"]:
            lines.append(f"  {'':<10}   - {r}")
    if "dispatcher" in d:
        lines += format_dispatcher(d["dispatcher"])
    return "\n".join(lines)
