"""What a result was measured on (machine, versions, flags) and this machine's rough peaks for the roofline.

Peaks are *measured in the run*, not taken from a spec sheet: peak FLOP/s is the best rate of a large dense
matmul in the benchmarked dtype (torch's own GEMM: MKL/oneDNN on CPU, cuBLAS on CUDA), and bandwidth is the
best rate of a large tensor copy (read + write bytes); best, not median, because a peak is what the machine
can do and other jobs only ever slow it down. Kernels are then expressed as % of those, which says
"how close to what this machine demonstrably does", not "% of the theoretical hardware peak".
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from ..kernels._launch import cuda_matmul_allows_tf32, cudnn_allows_tf32

__all__ = ["ISA_ENV", "cpu_isa_class", "cpu_tag", "machine_info", "machine_slug", "measure_peaks", "script_results",
           "tf32_state"]

# Environment variables that lower the instruction set of sparsekit's CPU kernels and of torch's own CPU paths
# (ATen kernels, MKL GEMM, oneDNN conv): with all four at AVX2, an AVX-512 machine runs both sides of a
# comparison as an AVX2-only CPU would (bench/avx2_class.sh sets them).
ISA_ENV = ("SPARSEKIT_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
           "DNNL_MAX_CPU_ISA")


def cpu_isa_class(meta: dict) -> str:
    """The CPU class a result belongs to, from the instruction set its sparsekit kernels ran with: "avx2" or
    "scalar" (a machine without AVX-512, or one forced lower); "mixed" when an instruction-set variable was set
    but the kernels were not lowered (e.g. only torch's dense side held back: its speedups would flatter us);
    else "native" (AVX-512 / AMX, no extension, or a GPU run). Results of different classes are not compared
    with one another."""
    if meta.get("device", "cpu") != "cpu":      # a GPU run: its host CPU's instruction set is beside the point
        return "native"
    isa = str(meta.get("cpu_kernel_isa") or "")
    lowered = next((c for c in ("avx2", "scalar") if isa.startswith(c)), None)
    if lowered:
        return lowered
    return "mixed" if any(k in ISA_ENV for k in (meta.get("env") or {})) else "native"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_caches() -> str:
    """'L1d 32K L1i 32K L2 512K L3 32768K' from sysfs (cpu0), '' where it is not readable: with the model name
    (which a VM may give as just 'AMD EPYC'), it tells machines apart whose tuning decisions differ."""
    parts = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        parts.append(f"L{level}{ {'Data': 'd', 'Instruction': 'i'}.get(kind, '')} {size}")
    return " ".join(parts)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    """The sparsekit source tree's commit (+ '-dirty'), if it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def _switch_tf32(new_api: object, legacy: object, enabled: bool) -> None:
    """One TF32 switch through torch's precision API where it exists (``fp32_precision`` "tf32" / "ieee", torch >=
    2.9: it outranks the legacy flag, so setting only ``allow_tf32`` under a global "tf32" changed nothing),
    else the legacy ``allow_tf32``."""
    if new_api is not None and hasattr(new_api, "fp32_precision"):
        new_api.fp32_precision = "tf32" if enabled else "ieee"
    else:
        legacy.allow_tf32 = enabled


def _switch_both(matmul: bool, cudnn: bool) -> None:
    backends = torch.backends
    _switch_tf32(backends.cuda.matmul, backends.cuda.matmul, matmul)
    _switch_tf32(getattr(backends.cudnn, "conv", None), backends.cudnn, cudnn)


def set_tf32(enabled: bool) -> dict[str, bool]:
    """Let (or stop) cuBLAS and cuDNN use TF32 for fp32 work; returns the previous settings for restore_tf32."""
    old = {"matmul": cuda_matmul_allows_tf32(), "cudnn": cudnn_allows_tf32()}
    _switch_both(enabled, enabled)
    return old


def restore_tf32(old: dict[str, bool]) -> None:
    _switch_both(old["matmul"], old["cudnn"])


def tf32_state() -> dict[str, object]:
    """TF32 / reduced-precision matmul settings in force (they change fp32 numbers on GPUs)."""
    return {"cuda.matmul.allow_tf32": cuda_matmul_allows_tf32(),
            "cudnn.allow_tf32": cudnn_allows_tf32(),
            "float32_matmul_precision": _float32_matmul_precision()}


def _float32_matmul_precision() -> str | None:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:   # torch >= 2.9 after a mix of the legacy and new TF32 APIs
        return None


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"; None where it cannot be read)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else None


def machine_info(device: str) -> dict[str, object]:
    """Machine, versions and settings, recorded with every result file."""
    from .. import _extension

    _extension.load()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_caches": _cpu_caches(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "sparsekit": _sparsekit_version(),
        "sparsekit_commit": _git_commit(),
        "extension_loaded": _extension.LOADED,
        "cpu_kernel_isa": torch.ops.sparsekit.cpu_kernel_isa() if _extension.LOADED
        and hasattr(torch.ops.sparsekit, "cpu_kernel_isa") else None,
        "tf32": tf32_state(),
        # (THP_MEM_ALLOC_ENABLE: torch's CPU allocator asks for huge pages; with tens of MB of fresh output per
        # call, page faults otherwise cost as much as the arithmetic of a sparse layer)
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET",
                                           "CUDA_VISIBLE_DEVICES", "THP_MEM_ALLOC_ENABLE", *ISA_ENV)
                if k in os.environ},
        "transparent_hugepage": _thp_mode(),
        "loadavg_start": load,
    }
    if device == "cuda" and torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    return info


def _sparsekit_version() -> str:
    from .. import __version__

    return __version__


def cpu_tag(cpu_model: str | None = None, threads: int | None = None) -> str:
    """'cpu-amd-epyc-2t': the first three words of the CPU model (this machine's by default) and the threads; the
    machine in bench_compact.py's file names, by which bench/targets.py places its older results."""
    words = (cpu_model or _cpu_model()).lower().replace("(r)", "").replace("(tm)", "").split()[:3]
    return f"cpu-{'-'.join(words)}-{torch.get_num_threads() if threads is None else threads}t"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "unknown"


def machine_slug(info: dict) -> str:
    """A short file-name-safe machine id: 'cpu-intel-xeon-2t', 'cuda-nvidia-h100-80gb-hbm3'."""
    if info["device"] == "cuda" and "gpu" in info:
        return f"cuda-{_slug(info['gpu']['name'])}"
    return f"cpu-{_slug(str(info['cpu_model']))}-{info['threads']}t"


def script_results(out: str | Path, prefix: str, device: str) -> tuple[Path, dict, str, str]:
    """Where a bench/ script writes its .json/.md and what it records: (``<out>/<prefix>_<machine>_<UTC stamp>``
    without suffix, machine_info, the stamp, a short label: CPU model and threads, or the GPU's name). ``out``
    is created. The CPU machine id is 'cpu-<threads>t', as those scripts have always named their files."""
    info = machine_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    machine = f"cpu-{threads}t" if device == "cpu" else machine_slug(info)
    where = (f"{info.get('cpu_model', '')}, {threads} threads" if device == "cpu"
             else str(info.get("gpu", {}).get("name", "cuda")))
    forced = [f"{k}={v}" for k, v in info["env"].items() if k in ISA_ENV]
    if forced:
        where += f", instruction sets forced: {' '.join(forced)}"
    if info["env"].get("THP_MEM_ALLOC_ENABLE"):
        where += ", THP_MEM_ALLOC_ENABLE=1 (huge pages)"
    return out / f"{prefix}_{machine}_{stamp}", info, stamp, where


def _best_s(fn, device: str, reps: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def _mm_fn(size: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    return lambda: torch.mm(a, b)


def measure_peaks(device: str, dtype: torch.dtype, size: int | None = None, copy_mib: int | None = None,
                  reps: int = 10) -> dict[str, object]:
    """Measured peak FLOP/s (dense matmul of size^3) and bandwidth (copy of copy_mib MiB) for the roofline."""
    if size is None:
        size = 8192 if device == "cuda" else 2048
    if copy_mib is None:
        copy_mib = 1024 if device == "cuda" else 256
    gen = torch.Generator(device="cpu").manual_seed(0)
    numel = copy_mib * 2**20 // 4
    with torch.no_grad():
        t_mm = _best_s(_mm_fn(size, dtype, device, gen), device, reps)
        mm = "torch.mm"
        onednn = _onednn_mm_fn(size, dtype, device, gen)
        if onednn is not None:   # on AMD CPUs torch.mm's MKL takes its AVX2 path: oneDNN may be the faster
            t_dnn = _best_s(onednn, device, reps)
            if t_dnn < t_mm:
                t_mm, mm = t_dnn, "oneDNN linear, prepacked (faster than torch.mm here)"
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t_copy = _best_s(lambda: dst.copy_(src), device, reps)
    return {"flops": 2.0 * size**3 / t_mm, "bytes_per_s": 2.0 * numel * 4 / t_copy,
            "how": f"measured in this run: fastest of {reps} dense {size}x{size}x{size} {str(dtype).split('.')[-1]} "
                   f"matmuls ({mm}) and of {reps} copies of {copy_mib} MiB (read + write bytes)"}


def _onednn_mm_fn(size: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    """The same product on oneDNN with a prepacked weight (CPU, where torch has it), else None."""
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    a = torch.randn(size, size, generator=gen).to(dtype=dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(size, size, generator=gen).to(dtype=dtype), size)
        torch.ops.mkldnn._linear_pointwise(a[:1], packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
