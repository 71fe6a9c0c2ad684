#!/usr/bin/env python
"""Compile checks that need no GPU: every csrc/cuda/*.cu through `nvcc -c` for sm_80 and sm_90a, then the
Triton kernels for sm80/sm90 (sparsekit.kernels._compile_check.check_all).

The nvcc flags mirror what setup.py / torch.utils.cpp_extension use for the real build: torch's include
dirs, its C++ standard, its CUDA defines, the same TORCH_EXTENSION_NAME and _GLIBCXX_USE_CXX11_ABI. On a CPU
build of torch the header c10/cuda/impl/cuda_cmake_macros.h (generated only for CUDA builds) is missing;
then C10_CUDA_NO_CMAKE_CONFIGURE_FILE is defined, which skips it (it only sets a Windows DLL export macro).

Each source is compiled once for all arches (`nvcc -c` with one -gencode per arch): the host side is the same
for every arch and about half of the work, so doing it once saves about a third of the time. The per-arch
lines come from `nvcc --time`; when a source fails, it is recompiled one arch at a time to say which failed.

Exit status: 0 when everything compiled or was skipped (no nvcc, no triton), 1 when anything failed.

    python scripts/check_compile.py [--skip-nvcc] [--skip-triton] [-j N] [--sources SRC ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "90a")  # A100, H100 (90a: the arch-specific features wgmma/TMA need)
# Same as setup.py's extra_compile_args["nvcc"] so the check sees what the build sees.
SETUP_NVCC_FLAGS = ["-O3", "-lineinfo"]
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS, used when this torch does not expose it.
DEFAULT_TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                            "--expt-relaxed-constexpr"]


# ------------------------------------------------------------------------------------------------ nvcc
def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def torch_cxx_std(cpp_extension) -> str:
    """The -std torch builds extensions with (c++17 through torch 2.11, c++20 in 2.13), read from cpp_extension:
    the flag it adds when the caller sets none (``cpp_flag_prefix + 'c++NN'``), else its Linux flag list, never
    a docstring example (2.11's docstring shows -std=c++20 while its build uses c++17)."""
    try:
        source = Path(cpp_extension.__file__).read_text()
    except OSError:
        return "c++17"
    for pattern in (r"cpp_flag_prefix \+ 'c\+\+(\d\d)'", r"common_cflags \+= \['-std=c\+\+(\d\d)'"):
        found = re.search(pattern, source)
        if found:
            return f"c++{found.group(1)}"
    return "c++17"


def nvcc_base_flags() -> tuple[list[str], list[str]]:
    """(flags, notes) shared by every nvcc invocation."""
    import torch
    from torch.utils import cpp_extension

    notes = []
    includes = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"]]
    flags = [f"-I{p}" for p in includes]
    flags += [f"-std={torch_cxx_std(cpp_extension)}"]
    flags += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", DEFAULT_TORCH_NVCC_FLAGS))
    flags += ["-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DSPARSEKIT_WITH_CUDA=1"]
    flags += SETUP_NVCC_FLAGS
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
        notes.append(f"torch {torch.__version__} has no c10/cuda/impl/cuda_cmake_macros.h (a CPU build): "
                     "compiling with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    if os.environ.get("CC"):  # torch passes the host compiler the same way
        flags += ["-ccbin", os.environ["CC"]]
    return flags, notes


def supported_archs(nvcc: str) -> set[str] | None:
    """Arches this nvcc can compile for (e.g. {"80", "90a"}), or None when it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = set(re.findall(r"compute_(\w+)", out))
    return archs or None


def run_nvcc(nvcc: str, flags: list[str], src: Path, archs: list[str], out_dir: Path,
             threads: int) -> tuple[bool, float, dict[str, float], str]:
    """One `nvcc -c` for all `archs`: the host side (preprocess, cudafe++, gcc) is arch-independent and runs
    once; the device side (cicc, ptxas) runs per arch, `threads` of them at a time. Returns (ok, wall seconds,
    seconds per phase group from nvcc --time: "host" and "sm_<arch>", log)."""
    tag = f"{src.stem}.{'_'.join(archs)}"
    obj, timing = out_dir / f"{tag}.o", out_dir / f"{tag}.time.csv"
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    cmd = [nvcc, "-c", str(src), "-o", str(obj), *gencode, "--threads", str(threads), "--time", str(timing),
           *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    log = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        log = f"$ {' '.join(cmd)}\n{log}"
    return proc.returncode == 0, wall, phase_times(timing), log


def phase_times(csv_path: Path) -> dict[str, float]:
    """Seconds per group of nvcc phases: "sm_80", "sm_90a" (cicc + ptxas for that arch) and "host" (the rest)."""
    groups: dict[str, float] = {}
    try:
        rows = csv_path.read_text().splitlines()[1:]
    except OSError:
        return groups
    for row in rows:
        cells = [c.strip() for c in row.split(",")]
        if len(cells) < 8 or cells[7] != "ms":
            continue
        phase, arch, ms = cells[1], cells[4], float(cells[6])
        if phase.startswith(("cicc", "ptxas")) and arch:
            key = "sm_" + arch.split("_", 1)[1]
        elif phase.startswith("nvcc") or phase.startswith("fatbinary"):
            continue
        else:
            key = "host"
        groups[key] = groups.get(key, 0.0) + ms / 1000
    return groups


def check_source(nvcc: str, flags: list[str], src: Path, archs: list[str], out_dir: Path, threads: int
                 ) -> tuple[list[str], list[str]]:
    """(report lines, failures) for one source. A failure is re-run one arch at a time to say which failed."""
    rel = src.relative_to(ROOT)
    ok, wall, times, log = run_nvcc(nvcc, flags, src, archs, out_dir, threads)
    if ok:
        lines = [f"  {rel}  sm_{a:<4} ok    device {times.get('sm_' + a, float('nan')):5.1f}s (cicc + ptxas)"
                 for a in archs]
        lines.append(f"  {rel}  host    ok    host   {times.get('host', float('nan')):5.1f}s "
                     f"(preprocess, cudafe++, gcc; once for all arches); wall {wall:.1f}s")
        return lines, []
    lines, failures = [], []
    for a in archs:
        a_ok, a_wall, _, a_log = run_nvcc(nvcc, flags, src, [a], out_dir, 1)
        lines.append(f"  {rel}  sm_{a:<4} {'ok  ' if a_ok else 'FAIL'}  {a_wall:5.1f}s")
        if not a_ok:
            lines.append("    " + "\n".join(a_log.splitlines()[-40:]).replace("\n", "\n    "))
            failures.append(f"nvcc {rel} sm_{a}")
    if not failures:  # failed together but not apart: report the combined log
        lines.append("    " + "\n".join(log.splitlines()[-40:]).replace("\n", "\n    "))
        failures.append(f"nvcc {rel} ({', '.join('sm_' + a for a in archs)})")
    return lines, failures


def select_sources(names: list[str] | None) -> list[Path]:
    """csrc/cuda/*.cu, or those of them ``names`` picks (a path, a file name, or a stem: csr_spmm.cu,
    csrc/cuda/csr_spmm.cu and csr_spmm all name the same file). ValueError naming what matched nothing."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not names:
        return sources
    picked, unknown = [], []
    for name in names:
        hits = [s for s in sources if name in (s.name, s.stem, str(s.relative_to(ROOT)), str(s))]
        if hits:
            picked += [h for h in hits if h not in picked]
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"--sources: no csrc/cuda/*.cu source matches {', '.join(unknown)} (have: "
                         f"{', '.join(s.name for s in sources)})")
    return picked


def check_nvcc(jobs: int, names: list[str] | None = None) -> list[str]:
    sources = select_sources(names)
    if not sources:
        print("nvcc: no csrc/cuda/*.cu sources")
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc: not found (set CUDA_HOME or put nvcc on PATH): skipping the CUDA compile check")
        return []
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"nvcc: {nvcc} ({version[-1] if version else 'unknown version'})")
    flags, notes = nvcc_base_flags()
    for note in notes:
        print(f"nvcc: note: {note}")
    known = supported_archs(nvcc)
    archs = []
    for arch in ARCHS:
        if known is not None and arch.rstrip("af") not in known:  # the list omits the 90a/100f variants
            print(f"nvcc: SKIP sm_{arch}: this nvcc cannot target it")
        else:
            archs.append(arch)
    if not archs:
        return []
    jobs = max(1, jobs)
    workers = min(jobs, len(sources))
    threads = max(1, jobs // workers)  # nvcc --threads: device compiles of one source in parallel
    start = time.perf_counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sparsekit_nvcc_") as tmp, ThreadPoolExecutor(workers) as pool:
        results = [pool.submit(check_source, nvcc, flags, src, archs, Path(tmp), threads) for src in sources]
        for fut in results:
            lines, failed = fut.result()
            print("\n".join(lines), flush=True)
            failures += failed
    print(f"nvcc: {len(sources) - len({f.split()[1] for f in failures})}/{len(sources)} sources compiled for "
          f"{', '.join('sm_' + a for a in archs)} in {time.perf_counter() - start:.1f}s (-j {jobs})")
    return failures


# ---------------------------------------------------------------------------------------------- triton
def check_triton() -> list[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton: not installed: skipping the Triton compile check")
        return []
    sys.path.insert(0, str(ROOT))  # the working tree's sparsekit when it is not installed
    try:
        from sparsekit.kernels import _compile_check
    except ModuleNotFoundError as exc:
        if exc.name in ("sparsekit.kernels._compile_check", "sparsekit.kernels"):
            print("no triton compile checks found")
            return []
        raise
    start = time.perf_counter()
    failures = list(_compile_check.check_all())
    print(f"triton: {'all compiled' if not failures else f'{len(failures)} failed'} "
          f"in {time.perf_counter() - start:.1f}s")
    return [f"triton: {msg}" for msg in failures]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-nvcc", action="store_true", help="skip the nvcc -c check of csrc/cuda/*.cu")
    parser.add_argument("--skip-triton", action="store_true", help="skip the Triton compile check")
    parser.add_argument("-j", "--jobs", type=int, default=2,
                        help="parallel nvcc jobs: sources at once, and the per-arch device compiles of a source "
                             "through nvcc --threads (default 2)")
    parser.add_argument("--sources", nargs="+", metavar="SRC", default=None,
                        help="compile only these csrc/cuda sources (csr_spmm.cu, csrc/cuda/csr_spmm.cu or csr_spmm); "
                             "while iterating on a few files: the full check takes minutes per source")
    args = parser.parse_args(argv)
    try:
        select_sources(args.sources)
    except ValueError as exc:
        parser.error(str(exc))

    failures: list[str] = []
    if not args.skip_nvcc:
        failures += check_nvcc(args.jobs, args.sources)
    if not args.skip_triton:
        failures += check_triton()
    if failures:
        print(f"\n{len(failures)} compile check(s) failed:")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\nall compile checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
