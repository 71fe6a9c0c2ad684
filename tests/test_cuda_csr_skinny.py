"""The skinny tensor-core path of csr_mm (csrc/cuda/csr_skinny.cu) against the float64 reference, on a GPU.

SPARSEKIT_CSR_SKINNY=force runs the path whenever it can run (fp16/bf16, M <= 64, compute capability >= 8.0)
without its density window and without the first-use self-check, so these tests see the path itself, also at
densities the automatic rule leaves to the generic kernel (0, 5%, 100%). The mode is read on every call.
Shapes: every n-tile count of M (1, 5 -> 8 columns; 16; 17 -> 32; 64), odd N (partial row blocks and warps),
odd K (partial chunks, plain x loads) and K % 8 == 0 (cp.async x loads), one split of K and several (the
cursor search), empty rows, int16 and int32 column indices, bias and none.

The probe test runs in a fresh interpreter (each probe runs once per process) with the variable unset and
fails when the self-check disagreed with the generic kernel on this GPU (it warns naming the variable).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _profile import kernel_names
from _tolerance import assert_close_to_reference as _close

from sparsekit.formats import CSR
from sparsekit.ops import reference

pytestmark = pytest.mark.cuda

DEV = "cuda"
ENV = "SPARSEKIT_CSR_SKINNY"


def _needs_sm80():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the skinny path needs compute capability >= 8.0")


def _csr(n, k, density, dtype, seed, col_dtype, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * (torch.rand(n, k, generator=g) < density)
    for r in empty_rows:
        if 0 <= r < n:
            w[r] = 0
    c = CSR.from_dense(w.to(dtype)).to(DEV)
    return CSR(values=c.values, crow_indices=c.crow_indices, col_indices=c.col_indices.to(col_dtype),
               shape=c.shape)


def _rand(*shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)


def _check(w, x, bias, dtype):
    n, k = w.shape
    got = torch.ops.sparsekit.csr_mm(x, w.crow_indices, w.col_indices, w.values, bias, n)
    ref = reference.csr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(),
                           None if bias is None else bias.double(), n)
    _close(got, ref, dtype, k)


SHAPES = [(133, 301), (70, 520)]  # (N, K): odd K (plain x loads), K % 8 == 0 (cp.async); both split K


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 64])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forced_skinny_matches_reference(monkeypatch, dtype, m, density, col_dtype, shape):
    _needs_sm80()
    monkeypatch.setenv(ENV, "force")
    n, k = shape
    w = _csr(n, k, density, dtype, seed=m + n, col_dtype=col_dtype, empty_rows=(0, n // 2, n - 1))
    x = _rand(m, k, seed=m, dtype=dtype)
    bias = _rand(n, seed=m + 1, dtype=dtype)
    _check(w, x, bias, dtype)
    _check(w, x, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [5, 17])
@pytest.mark.parametrize("n, k, density, col_dtype", [
    (200, 4099, 0.3, torch.int16),    # long rows, many splits: the cursor search over ~1200 entries
    (64, 40000, 0.05, torch.int32),   # K beyond int16 columns
    (1000, 64, 0.9, torch.int16),     # a single chunk, windows overflowing into extra rounds
])
def test_forced_skinny_long_rows(monkeypatch, dtype, m, n, k, density, col_dtype):
    _needs_sm80()
    monkeypatch.setenv(ENV, "force")
    w = _csr(n, k, density, dtype, seed=n + k, col_dtype=col_dtype, empty_rows=(3,))
    x = _rand(m, k, seed=m, dtype=dtype)
    _check(w, x, _rand(n, seed=7, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forced_skinny_misaligned_x(monkeypatch, dtype):
    """x one element into its storage (K % 8 == 0 but not 16-byte aligned): the plain x loads."""
    _needs_sm80()
    monkeypatch.setenv(ENV, "force")
    m, n, k = 9, 100, 256
    w = _csr(n, k, 0.3, dtype, seed=1, col_dtype=torch.int16)
    buf = _rand(m * k + 1, seed=2, dtype=dtype)
    x = buf[1:].view(m, k)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    _check(w, x, None, dtype)


@pytest.mark.parametrize("mode", ["0", "1", "force"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_modes_and_declined_cases(monkeypatch, mode, dtype):
    """Every mode gives right answers; fp32, M > 64 and mode "0" never take the path, "force" takes it otherwise."""
    monkeypatch.setenv(ENV, mode)
    for m in (16, 65):
        w = _csr(96, 200, 0.3, dtype, seed=m, col_dtype=torch.int16, empty_rows=(5,))
        x, bias = _rand(m, 200, seed=m, dtype=dtype), _rand(96, seed=3, dtype=dtype)
        _check(w, x, bias, dtype)
        args = (x, w.crow_indices, w.col_indices, w.values, bias, 96)
        names = kernel_names(lambda args=args: torch.ops.sparsekit.csr_mm(*args))
        if names is None:
            continue     # (the profiler records no CUDA kernels here: values checked only)
        skinny = any("csr_skinny_kernel" in name for name in names)
        if mode == "0" or dtype == torch.float32 or m > 64:
            assert not skinny, sorted(names)
        elif mode == "force":
            assert skinny, sorted(names)


def test_invalid_mode_raises(monkeypatch):
    _needs_sm80()
    monkeypatch.setenv(ENV, "sometimes")
    w = _csr(64, 128, 0.3, torch.float16, seed=0, col_dtype=torch.int16)
    x = _rand(4, 128, seed=0, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=ENV):
        torch.ops.sparsekit.csr_mm(x, w.crow_indices, w.col_indices, w.values, None, 64)


_PROBE_CALL = """
import warnings, torch
from sparsekit.formats import CSR
from sparsekit.ops import reference
warnings.simplefilter("always")
g = torch.Generator().manual_seed(0)
w = torch.randn(512, 1024, generator=g) * (torch.rand(512, 1024, generator=g) < 0.3)   # inside the window
w = CSR.from_dense(w.half()).to("cuda")
x = torch.randn(16, 1024, generator=g).to("cuda", torch.float16)
y = torch.ops.sparsekit.csr_mm(x, w.crow_indices, w.col_indices, w.values, None, 512)
ref = reference.csr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 512)
err = (y.double() - ref).abs().max().item()
assert err <= 2e-2 * (1 + ref.abs().max().item()), err
torch.cuda.synchronize()
"""


def test_probe_passes_on_this_gpu():
    _needs_sm80()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.run([sys.executable, "-c", _PROBE_CALL], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert ENV not in proc.stderr, f"the {ENV} self-check failed on this GPU:\n{proc.stderr}"
