"""The built extension uses the C++ runtime torch loads (libstdc++ as a shared library), never a private copy.

A g++ that links libstdc++ statically by default (the GPU machines' /opt/gcc does) once built an _C whose own
libstdc++ never initialised its locale facets: every C++ error message that formats a number segfaulted
(setup.py now names the shared library). Checked on the built module itself, CPU or CUDA build alike.
"""

import re
import shutil
import subprocess
import sys

import pytest


def _extension_path() -> str:
    try:
        from sparsekit import _C
    except ImportError:
        pytest.skip("the C++ extension is not built")
    return _C.__file__


def _readelf(*args: str) -> str:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    return subprocess.run([readelf, *args, _extension_path()], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects (Linux) only")
def test_the_extension_needs_the_shared_libstdcxx():
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf("-dW"))
    assert any(name.startswith("libstdc++.so") for name in needed), needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects (Linux) only")
def test_the_extension_holds_no_copy_of_the_cxx_runtime():
    # std::locale::classic() is defined in libstdc++ alone: a definition inside _C means a static copy
    defined = [line for line in _readelf("-sW", "--dyn-syms").splitlines()
               if line.rstrip().endswith(" _ZNSt6locale7classicEv") and " UND " not in line]
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
