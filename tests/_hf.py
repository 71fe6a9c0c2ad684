"""Run a test script that imports Hugging Face transformers in a subprocess: importing transformers 4.x into the
test process breaks torch.compile guards in later tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def run_transformers_script(script: str, marker: str, timeout: int = 600) -> None:
    """Run ``script`` with this Python; it must exit 0 and print ``marker``. Skips without transformers."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is a test-only dependency: pip install --no-deps transformers (see README)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and marker in r.stdout, r.stderr[-3000:]
