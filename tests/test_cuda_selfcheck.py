"""The first-use self-checks of the specialised CUDA paths (csrc/cuda/selfcheck.cuh), on a GPU.

A path whose probe disagrees with the generic kernel is switched off with a warning and every call still
gives right answers, so the ordinary kernel tests would pass either way; these tests fail instead when a
probe fails (a wrong fragment layout on this GPU), and check the forced path against the reference.
Each probe runs once per process, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sparsekit.formats import BSR
from sparsekit.ops import reference

pytestmark = pytest.mark.cuda

_BSR_TC_CALL = """
import warnings, torch
from sparsekit.formats import BSR
warnings.simplefilter("always")
w = torch.randn(256, 192) * (torch.rand(8, 6).repeat_interleave(32, 0).repeat_interleave(32, 1) < 0.5)
w = BSR.from_dense(w, (32, 32)).to("cuda", torch.float16)
x = torch.randn(40, 192, device="cuda", dtype=torch.float16)
torch.ops.sparsekit.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 256)
torch.cuda.synchronize()
"""


@pytest.mark.parametrize("env_name, code", [("SPARSEKIT_BSR_TC", _BSR_TC_CALL)])
def test_probe_passes_on_this_gpu(env_name, code):
    env = {k: v for k, v in os.environ.items() if k != env_name}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert env_name not in proc.stderr, f"the {env_name} self-check failed on this GPU:\n{proc.stderr}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 17, 64, 130])
def test_forced_bsr_tensor_core_matches_reference(monkeypatch, dtype, block, m):
    monkeypatch.setenv("SPARSEKIT_BSR_TC", "force")
    g = torch.Generator().manual_seed(block + m)
    n, k = 5 * block, 3 * block
    keep = torch.rand(n // block, k // block, generator=g) < 0.5
    keep[1] = False                                              # an empty block-row
    w = torch.randn(n, k, generator=g) * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    wb = BSR.from_dense(w, (block, block)).to("cuda", dtype)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    got = torch.ops.sparsekit.bsr_mm(x, wb.crow_indices, wb.col_indices, wb.values, bias, n)
    ref = reference.bsr_mm(x.double(), wb.crow_indices, wb.col_indices, wb.values.double(), bias.double(), n)
    tol = (2e-2 if dtype == torch.bfloat16 else 4e-3) * (1 + ref.abs().max().item())
    assert (got.double() - ref).abs().max().item() <= tol
