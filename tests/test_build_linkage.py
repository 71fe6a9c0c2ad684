"""The built extension uses the C++ runtime torch loads (libstdc++ as a shared library), never a private copy.

A g++ that links libstdc++ statically by default (the GPU machines' /opt/gcc does) once built an _C whose own
libstdc++ never initialised its locale facets: every C++ error message that formats a number segfaulted
(setup.py now names the shared library). Checked on the built module itself, CPU or CUDA build alike.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sparsekit


def _extension_path() -> str:
    """The built _C next to the package; skipped only when there is none (one that is there must load)."""
    built = sorted(Path(sparsekit.__file__).parent.glob("_C*.so"))
    if not built:
        pytest.skip("the C++ extension is not built")
    from sparsekit import _C  # an ImportError here (e.g. a GLIBCXX version not found) fails the test

    return _C.__file__


def _readelf(*args: str) -> str:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    return subprocess.run([readelf, *args, _extension_path()], capture_output=True, text=True, check=True,
                          env={**os.environ, "LC_ALL": "C"}).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects (Linux) only")
def test_the_extension_needs_the_shared_libstdcxx():
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf("-dW"))
    assert any(name.startswith("libstdc++.so") for name in needed), needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects (Linux) only")
def test_the_extension_holds_no_copy_of_the_cxx_runtime():
    # symbols libstdc++ alone defines (locale, iostream init, exception throwing): defined inside _C means a copy,
    # whole or in part (a static-by-default g++ appends libstdc++.a for what the shared one lacks)
    runtime_only = ("_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev", "__cxa_throw")
    defined = [line for line in _readelf("-sW", "--dyn-syms").splitlines()
               if line.split() and line.split()[-1].split("@")[0] in runtime_only and " UND " not in line]
    assert not defined, defined


def test_a_cxx_error_message_with_a_number_is_raised_not_a_crash():
    _extension_path()
    code = ("import torch, sparsekit\n"
            "x = torch.randn(2, 8)\n"
            "try:\n"
            "    torch.ops.sparsekit.csr_mm(x, torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),"
            " torch.zeros(0), None, -3)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "n must be non-negative, got -3" in proc.stdout, proc.stdout
