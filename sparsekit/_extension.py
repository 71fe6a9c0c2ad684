"""Loads the compiled extension sparsekit._C if it was built. Never raises, never initialises CUDA."""

from __future__ import annotations

import importlib
import warnings

LOADED: bool = False
LOAD_ERROR: str | None = None


def load() -> bool:
    """Import sparsekit._C (which registers the C++ kernels); remember why it failed otherwise."""
    global LOADED, LOAD_ERROR
    if LOADED or LOAD_ERROR is not None:  # decided once per process
        return LOADED
    try:
        import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

        importlib.import_module("sparsekit._C")
    except ImportError as exc:  # not built (SPARSEKIT_BUILD_EXT=0) or built against another torch
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        if "No module named" not in str(exc):
            warnings.warn(f"sparsekit._C failed to load, C++ kernels are unavailable ({LOAD_ERROR}); "
                          "rebuild with `pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=2)
        return False
    LOADED = True
    LOAD_ERROR = None
    return True
