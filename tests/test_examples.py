"""The runnable examples of the pruning procedures (examples/*.py) run to the end, each in a fresh process, and
the ones that claim an exact equivalence print one within tolerance. Without scikit-learn they train on the
synthetic stand-in of examples/digits_data.py, so no accuracy is checked here (bench/prune_digits.py measures
accuracy on the real digits)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "digits_data.py")
# examples whose output states a difference that must be ~0: the pattern captures the printed number
EXACT = {
    "alpha_blend.py": r"max \|difference\| to alpha=0: (\S+)",
    "slimming.py": r"same outputs as the masked model \(max \|diff\| (\S+)\)",
    "vit_attention.py": r"sparsified == block-pruned: max \|diff\| (\S+)",
    "video_conv3d.py": r"sparsified == pruned: max \|diff\| (\S+)",
    "sparse_lstm.py": r"sparsified == block-pruned: max \|diff\| (\S+)",
}


def test_every_example_is_listed():
    assert {"alpha_blend.py", "dynamic_gates.py", "lottery_ticket.py", "low_rank.py", "slimming.py",
            "width_search.py", "vit_attention.py", "video_conv3d.py", "sparse_lstm.py"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, script], cwd=EXAMPLES, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{script} printed nothing"
    if script in EXACT:
        found = re.search(EXACT[script], proc.stdout)
        assert found, f"{script}: no line matching {EXACT[script]!r} in:\n{proc.stdout}"
        assert float(found.group(1)) <= 1e-4, found.group(0)
