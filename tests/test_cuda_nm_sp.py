"""The 2:4 sparse-tensor-core path of sparsekit::nm_mm (csrc/cuda/nm_mm_sp.cu, mma.sp), on a GPU.

nm_mm runs it for n:m = 2:4 and fp16/bf16 on compute capability >= 8.0 once its first-use self-check
(SPARSEKIT_NM_SP, csrc/cuda/selfcheck.cuh) agreed with the generic kernel; a failed check only costs speed, so
the ordinary nm tests pass either way. Here SPARSEKIT_NM_SP=force runs the path without the check and compares
it with the float64 reference, over every tile shape (M <= 8, <= 16, <= 32, > 32), N and K tails, K that rules
out 16-byte loads, misaligned operands, all-zero rows, bias and no bias; and a fresh interpreter with the
variable unset must pass the check without a warning.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _profile import kernel_names
from _tolerance import assert_close_to_reference

from sparsekit.formats import NM
from sparsekit.ops import reference

pytestmark = pytest.mark.cuda

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(64, 64), (70, 100), (130, 224), (257, 520), (33, 1028)]  # (N, K): K % 32, % 16, % 8 tails too


def _weight(n, k, dtype, seed, empty_rows=(0, 5)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    for r in (*empty_rows, n - 1):
        if r < n:
            w[r] = 0
    w = NM.prune(w, 2, 4).to(dtype)
    return NM.from_dense(w, 2, 4).to(DEV)


def _rand(*shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)


def _misaligned(t):
    """A contiguous copy of t one element into its storage: 16-byte loads ruled out."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


def _check(got, x, w, bias, dtype):
    ref = reference.nm_mm(x.double(), w.values.double(), w.indices, None if bias is None else bias.double(), 2, 4)
    assert_close_to_reference(got, ref, dtype, x.shape[1])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 7, 16, 20, 32, 33, 128])     # every tile shape: NT 1, 2, 4 and 8
@pytest.mark.parametrize("mode", ["force", "0"])                  # "0": the generic kernel on the same inputs
def test_forced_sparse_tensor_core_matches_reference(monkeypatch, mode, m, shape, dtype, with_bias):
    monkeypatch.setenv("SPARSEKIT_NM_SP", mode)
    n, k = shape
    w = _weight(n, k, dtype, seed=m + n)
    x = _rand(m, k, seed=1, dtype=dtype)
    bias = _rand(n, seed=2, dtype=dtype) if with_bias else None
    _check(torch.ops.sparsekit.nm_mm(x, w.values, w.indices, bias, 2, 4), x, w, bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("operand", ["x", "values", "indices"])
@pytest.mark.parametrize("m", [3, 40])
def test_forced_sparse_tensor_core_misaligned_operands(monkeypatch, m, operand, dtype):
    monkeypatch.setenv("SPARSEKIT_NM_SP", "force")
    n, k = 96, 256
    w = _weight(n, k, dtype, seed=m)
    x = _rand(m, k, seed=1, dtype=dtype)
    bias = _rand(n, seed=2, dtype=dtype)
    values, indices = w.values, w.indices
    if operand == "x":
        x = _misaligned(x)
    elif operand == "values":
        values = _misaligned(values)
    else:
        indices = _misaligned(indices)
    _check(torch.ops.sparsekit.nm_mm(x, values, indices, bias, 2, 4), x, w, bias, dtype)


@pytest.mark.parametrize("mode, sparse", [("force", True), ("0", False)])
def test_env_selects_the_kernel(monkeypatch, mode, sparse):
    monkeypatch.setenv("SPARSEKIT_NM_SP", mode)
    w = _weight(128, 256, torch.float16, seed=0)
    x = _rand(20, 256, seed=1, dtype=torch.float16)
    _check(torch.ops.sparsekit.nm_mm(x, w.values, w.indices, None, 2, 4), x, w, None, torch.float16)
    names = kernel_names(lambda: torch.ops.sparsekit.nm_mm(x, w.values, w.indices, None, 2, 4))
    if names is None:
        pytest.skip("the profiler records no CUDA kernels on this machine")
    assert any("nm24_sp_kernel" in name for name in names) == sparse, sorted(names)
    assert any("nm_gemm_kernel" in name for name in names) == (not sparse), sorted(names)


def test_generic_kernel_sums_a_position_given_twice(monkeypatch):
    """An NM that NM.validate refuses (a position twice in a group) still computes what the reference does
    on the generic kernel (the CPU kernels sum it too)."""
    monkeypatch.setenv("SPARSEKIT_NM_SP", "0")
    w = _weight(64, 128, torch.float32, seed=3)
    indices = w.indices.clone()
    indices[:, 1::2] = indices[:, 0::2]          # both entries of every group at the first one's position
    x = _rand(9, 128, seed=1, dtype=torch.float32)
    got = torch.ops.sparsekit.nm_mm(x, w.values, indices, None, 2, 4)
    ref = reference.nm_mm(x.double(), w.values.double(), indices, None, 2, 4)
    assert_close_to_reference(got, ref, torch.float32, 128)


_PROBE_CALL = """
import warnings, torch
from sparsekit.formats import NM
from sparsekit.ops import reference
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    for dtype in (torch.float16, torch.bfloat16):
        w = NM.from_dense(NM.prune(torch.randn(192, 320, dtype=torch.float64), 2, 4).to(dtype)).to("cuda")
        x = torch.randn(24, 320, device="cuda", dtype=dtype)
        y = torch.ops.sparsekit.nm_mm(x, w.values, w.indices, None, 2, 4)
        ref = reference.nm_mm(x.double(), w.values.double(), w.indices, None, 2, 4)
        assert (y.double() - ref).abs().max().item() <= 0.1 * (1 + ref.abs().max().item())
    torch.cuda.synchronize()
for warning in caught:
    print("WARNING:", warning.message)
"""


def test_probe_passes_on_this_gpu():
    # A fresh interpreter: the probe runs once per device per process, so an earlier test here may have run it.
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_NM_SP"}
    proc = subprocess.run([sys.executable, "-c", _PROBE_CALL], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "SPARSEKIT_NM_SP" not in output, f"the SPARSEKIT_NM_SP self-check failed on this GPU:\n{output}"
