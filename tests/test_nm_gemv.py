"""nm_mm for few rows of x (csrc/cpu/nm_gemv.cpp): the NM format read directly, in windows of 32 columns on
AVX-512 (positions + group bases index two registers of x) and 16 on AVX2 (two permutes and a blend). Every n:m
it takes (n <= m / 2; m in 4, 8, 16, 32, AVX2 without 32), K with a partial last window, empty rows and groups,
M = 1..8 (tiles of up to 4 rows of x) and past it, fp32 / bf16 / fp16, with and without bias, against the float64
reference; SPARSEKIT_CPU_ISA=scalar (and m = 32 on AVX2) takes the CSR route. Tolerances: tests/_tolerance.py
(eps(dtype) * 4 * sqrt(K) * max(1, |y|max))."""

import pytest
import torch
from _tolerance import assert_close_to_reference

from sparsekit import _extension
from sparsekit.formats import NM

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"sparsekit._C not loaded: {_extension.LOAD_ERROR}")

PATTERNS = [(1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (8, 16), (3, 16), (1, 32), (16, 32)]


def _nm(rows, k, n, m, dtype, gen):
    w = NM.prune(torch.randn(rows, k, generator=gen, dtype=torch.float64), n, m)
    w[1] = 0                        # a row of explicit zeros
    if k > m:
        w[:, :m] = 0                # and a group of them in every row
    return NM.from_dense(w.to(dtype), n, m)


@pytest.mark.parametrize("isa", ["", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_small_m_matches_reference(n, m, dtype, isa, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(n * 100 + m)
    for k in sorted({m, 2 * m, 32, 64 + m, 96, 160 + 2 * m}):
        if k % m:
            continue
        w = _nm(13, k, n, m, dtype, gen)
        dense = w.to_dense().double()
        for rows in (1, 2, 3, 4, 5, 7, 8, 9):
            x = torch.randn(rows, k, generator=gen, dtype=torch.float64).to(dtype)
            bias = torch.randn(13, generator=gen, dtype=torch.float64).to(dtype)
            for b in (None, bias):
                y = torch.ops.sparsekit.nm_mm(x, w.values, w.indices, b, n, m)
                ref = x.double() @ dense.t() + (0 if b is None else b.double())
                assert_close_to_reference(y, ref, dtype, k)


def test_bad_position_is_named():
    w = NM.from_dense(NM.prune(torch.randn(4, 16), 2, 4), 2, 4)
    idx = w.indices.clone()
    idx[2, 3] = 4
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, m=4\), got 4 at flat position 19"):
        torch.ops.sparsekit.nm_mm(torch.randn(1, 16), w.values, idx, None, 2, 4)


_GUARD_PAGE = r"""
import ctypes, mmap, os, torch
import sparsekit
from sparsekit.formats import NM
page = mmap.PAGESIZE
libc = ctypes.CDLL(None)
def guarded():
    buf = mmap.mmap(-1, 2 * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(addr + page), page, 0) == 0   # PROT_NONE after the first page
    return buf
vbuf, ibuf = guarded(), guarded()
for isa in ("", "avx2"):
    os.environ["SPARSEKIT_CPU_ISA"] = isa
    for dtype in (torch.float32, torch.bfloat16):
        for k in (40, 64):   # a partial and a full last window
            print("case", isa or "default", dtype, k, flush=True)   # the last line names the case that crashed
            w = NM.from_dense(NM.prune(torch.randn(3, k), 2, 4).to(dtype), 2, 4)
            size = w.values.element_size()
            vals = torch.frombuffer(vbuf, dtype=dtype, count=w.values.numel(), offset=page - w.values.numel() * size)
            idx = torch.frombuffer(ibuf, dtype=torch.uint8, count=w.indices.numel(), offset=page - w.indices.numel())
            vals.copy_(w.values.flatten()); idx.copy_(w.indices.flatten())
            x = torch.randn(2, k).to(dtype)
            y = torch.ops.sparsekit.nm_mm(x, vals.view(w.values.shape), idx.view(w.indices.shape), None, 2, 4)
            torch.testing.assert_close(y.float(), (x.float() @ w.to_dense().float().t()), rtol=2e-2, atol=2e-2)
print("ok")
"""


def test_kernel_never_reads_past_the_values_or_positions(tmp_path):
    """values and positions each ending right before an inaccessible page: a read past them is a segfault."""
    import subprocess
    import sys

    script = tmp_path / "guard.py"
    script.write_text(_GUARD_PAGE)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.endswith("ok\n"), (run.returncode, run.stdout[-300:],
                                                                 run.stderr[-2000:])


@pytest.mark.parametrize("isa", ["", "avx2", "scalar"])
@pytest.mark.parametrize("n,m", [(1, 4), (2, 8), (1, 8), (2, 4)])
def test_inf_in_an_unkept_column_stays_out(n, m, isa, monkeypatch):
    """An inf in a column no row keeps must not reach any output (0 * inf): the windows' spare lanes (n/m < 1/2)
    point at group starts, so every group keeps positions 1..n and the inf sits at the start of group 1."""
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    k = 64
    w = torch.zeros(6, k)
    for g in range(k // m):
        w[:, g * m + 1: g * m + 1 + n] = torch.randn(6, n)
    f = NM.from_dense(w, n, m)
    x = torch.randn(2, k)
    x[:, m] = float("inf")
    y = torch.ops.sparsekit.nm_mm(x, f.values, f.indices, None, n, m)
    assert torch.isfinite(y).all()
    keep = w.ne(0).any(0)
    torch.testing.assert_close(y, x[:, keep] @ w[:, keep].t())


def test_many_rows_split_across_threads_and_a_bad_position_far_in():
    gen = torch.Generator().manual_seed(3)
    w = NM.from_dense(NM.prune(torch.randn(512, 1024, generator=gen), 2, 4), 2, 4)
    x = torch.randn(3, 1024, generator=gen)
    torch.testing.assert_close(torch.ops.sparsekit.nm_mm(x, w.values, w.indices, None, 2, 4),
                               x @ w.to_dense().t(), rtol=1e-4, atol=1e-4)
    idx = w.indices.clone()
    idx[-1, -1] = 7          # flat position 262143: past the first chunks of the parallel range check
    with pytest.raises(RuntimeError, match="got 7 at flat position 262143"):
        torch.ops.sparsekit.nm_mm(x, w.values, idx, None, 2, 4)
