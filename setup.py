"""Build script: sparsekit._C from csrc/ (CPU always, CUDA when available), kernels/ as sparsekit.kernels.

Environment:
  SPARSEKIT_BUILD_EXT=0   pure-Python install (no C++ extension)
  FORCE_CUDA=1            build the CUDA sources even when torch is a CPU build or no GPU is present
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0+PTX;9.0a": sm_80 machine code, which 8.6/8.7/8.9 run
                          too, sm_90a for Hopper's wgmma/TMA features, and compute_80 PTX that the driver compiles
                          for newer GPUs (10.x, 12.x) at load time; 7.x needs "7.5" added. On a GPU the built code
                          cannot run, the dispatcher's cuda backend says so: sparsekit.ops._dispatch.cuda_build_reasons)
  MAX_JOBS                parallel compile jobs (read by torch's BuildExtension)
  SPARSEKIT_SHARED_LIBSTDCXX=0  do not name the shared libstdc++ at link time (default: named on Linux, so that a
                          g++ that links it statically by default does not put a private copy into _C)

Install with `pip install --no-build-isolation .` so that the torch already installed is used.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch turns it into -gencode for sm_80 and sm_90a machine code plus compute_80 PTX (the "+PTX"), the one that
# keeps the extension usable on GPUs newer than the list; mirrored by sparsekit.ops._dispatch.DEFAULT_CUDA_ARCH_LIST
DEFAULT_CUDA_ARCH_LIST = "8.0+PTX;9.0a"


def _log(msg: str) -> None:
    print(f"[sparsekit setup] {msg}", file=sys.stderr)


def _want_cuda(torch_mod) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    from torch.utils.cpp_extension import CUDA_HOME

    return torch_mod.version.cuda is not None and CUDA_HOME is not None


def _links_libstdcxx() -> bool:
    """Whether the build uses libstdc++ (not clang's libc++, which torch's wheels do not use either);
    SPARSEKIT_SHARED_LIBSTDCXX=0 leaves the C++ runtime to the compiler's defaults."""
    if os.environ.get("SPARSEKIT_SHARED_LIBSTDCXX", "1") == "0":
        return False
    flags = " ".join(os.environ.get(v, "") for v in ("CXXFLAGS", "CFLAGS", "LDFLAGS"))
    return "-stdlib=libc++" not in flags


def get_extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass); empty when the extension is switched off or torch is missing."""
    if os.environ.get("SPARSEKIT_BUILD_EXT", "1") == "0":
        _log("SPARSEKIT_BUILD_EXT=0: pure-Python install")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable in the build environment (use --no-build-isolation); "
             "installing without the C++ extension")
        return [], {}

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    link_flags = ["-fopenmp"]
    if sys.platform.startswith("linux") and _links_libstdcxx():
        # the C++ runtime torch itself loads, as a shared library: some toolchains' g++ links libstdc++
        # statically by default (a portable-binaries build, e.g. the GPU machines' /opt/gcc), and a second,
        # private libstdc++ inside _C never initialises its locale facets -- the first error message that
        # formats a number (TORCH_CHECK(..., n)) then segfaults. Named before g++'s implicit libraries, the
        # shared one resolves every std:: symbol (tests/test_build_linkage.py checks the built module)
        link_flags.append("-l:libstdc++.so.6")
    define_macros = []
    if _want_cuda(torch):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("SPARSEKIT_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "sparsekit._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
        _log(f"building CPU + CUDA sources for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = CppExtension(
            "sparsekit._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        _log("building CPU sources only (torch is a CPU build or nvcc was not found; FORCE_CUDA=1 overrides)")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = get_extensions()

setup(
    packages=find_packages(include=["sparsekit", "sparsekit.*"]) + ["sparsekit.kernels"],
    package_dir={"sparsekit.kernels": "kernels"},
    # pre-tuned Triton launch tables (kernels/tuned_sm*.json, written by bench/tune_triton.py) ship with the kernels
    package_data={"sparsekit.kernels": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
