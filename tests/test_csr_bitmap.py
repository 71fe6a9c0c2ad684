"""CSR.bitmap and sparsekit::csr_bitmap_mm: the skinny-input CPU kernel that expands each row's values by the
pattern's bitmap (csrc/cpu/csr_bitmap.cpp), under every instruction set this machine can run.

SPARSEKIT_CPU_ISA picks the path: unset / "amx" -> AVX-512 with vdpbf16ps for bfloat16 (where the CPU has
AVX512-BF16 and VBMI2), "avx512" -> AVX-512 F/BW/VL/DQ (bfloat16 widened to fp32), "avx2" -> 8-lane table
expansion, "scalar" -> the portable loops. Shapes cover K not a multiple of 64 (a partial last bitmap word), empty
rows, 0% and 100% density, every row tile of x (1, 2, 4, 8 and the padded remainders) and M > 8, where the op is
csr_mm. Tolerances: eps(dtype) * 4 * sqrt(K) * max(1, |y|max) against the float64 reference on the same inputs
(tests/_tolerance.py; bfloat16 eps 8e-3: fp32 accumulation, one rounding of the output).
"""

import pytest
import torch
from _tolerance import assert_close_to_reference
from torch import nn

import sparsekit as sk
from sparsekit import _extension
from sparsekit.formats import CSR, bitmap_shape, pack_bitmap, unpack_bitmap
from sparsekit.ops import reference

needs_ext = pytest.mark.skipif(not _extension.LOADED, reason=f"sparsekit._C not loaded: {_extension.LOAD_ERROR}")


def _op():
    return torch.ops.sparsekit.csr_bitmap_mm


def _weight(n, k, density, dtype, gen, empty_rows=True):
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w[torch.rand(n, k, generator=gen) >= density] = 0
    if empty_rows and n > 2 and 0 < density < 1:
        w[1] = 0
        w[-1] = 0
    return w.to(dtype)


def _run(x, c, bias):
    return _op()(x, c.crow_indices, c.col_indices, c.bitmap, c.values, bias, c.shape[0])


# ------------------------------------------------------------------------------------------------ format
def test_pack_unpack_roundtrip():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((3, 1), (5, 63), (4, 64), (2, 65), (7, 200), (0, 9), (3, 0)):
        mask = torch.rand(n, k, generator=gen) < 0.4
        packed = pack_bitmap(mask)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == bitmap_shape(n, k)
        assert torch.equal(unpack_bitmap(packed, k), mask)
    # little-endian bits: column k is bit k % 8 of byte k // 8
    mask = torch.zeros(1, 70, dtype=torch.bool)
    mask[0, [0, 9, 69]] = True
    assert pack_bitmap(mask)[0, :9].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 32]


def test_csr_bitmap_fields():
    gen = torch.Generator().manual_seed(1)
    w = _weight(12, 100, 0.4, torch.float32, gen)
    plain, with_bm = CSR.from_dense(w), CSR.from_dense(w, bitmap=True).validate()
    assert plain.bitmap is None and torch.equal(unpack_bitmap(with_bm.bitmap, 100), w.ne(0))
    assert torch.equal(plain.with_bitmap().bitmap, with_bm.bitmap)
    assert with_bm.without_bitmap().bitmap is None and with_bm.without_bitmap().values is with_bm.values
    assert with_bm.nbytes == plain.nbytes + 12 * 16
    # state_dict round trip, with and without the optional tensor
    assert "bitmap" not in plain.state_dict()
    assert CSR.from_state_dict(plain.state_dict()).bitmap is None
    back = CSR.from_state_dict(with_bm.state_dict())
    assert torch.equal(back.bitmap, with_bm.bitmap) and torch.equal(back.to_dense(), w)
    moved = with_bm.to(torch.float64)
    assert moved.bitmap is with_bm.bitmap or torch.equal(moved.bitmap, with_bm.bitmap)
    assert moved.values.dtype == torch.float64
    assert "density" in repr(with_bm)


def test_csr_bitmap_errors():
    gen = torch.Generator().manual_seed(2)
    w = _weight(6, 70, 0.5, torch.float32, gen)
    c = CSR.from_dense(w, bitmap=True)
    with pytest.raises(TypeError, match="bitmap must be a bool"):
        CSR.from_dense(w, bitmap="yes")
    wrong = c.bitmap.clone()
    wrong[0, 0] ^= 1
    with pytest.raises(ValueError, match="bitmap does not match"):
        CSR(c.values, c.crow_indices, c.col_indices, c.shape, bitmap=wrong).validate()
    with pytest.raises(ValueError, match=r"bitmap must have shape \(6, 16\)"):
        CSR(c.values, c.crow_indices, c.col_indices, c.shape, bitmap=c.bitmap[:, :8].contiguous()).validate()
    with pytest.raises(TypeError, match="bitmap must have dtype"):
        CSR(c.values, c.crow_indices, c.col_indices, c.shape, bitmap=c.bitmap.to(torch.int16)).validate()
    moved = c.bitmap.clone()   # the same bit count per row, one bit in another column
    row0 = unpack_bitmap(c.bitmap, 70)[0]
    on, off = int(row0.nonzero()[0]), int((~row0).nonzero()[0])
    moved[0, on // 8] ^= 1 << (on % 8)
    moved[0, off // 8] ^= 1 << (off % 8)
    with pytest.raises(ValueError, match="bitmap does not match"):
        CSR(c.values, c.crow_indices, c.col_indices, c.shape, bitmap=moved).validate()
    padding = c.bitmap.clone()
    padding[2, 15] |= 0x80     # column 127 of a K = 70 weight
    with pytest.raises(ValueError, match="bits past K"):
        CSR(c.values, c.crow_indices, c.col_indices, c.shape, bitmap=padding).validate()
    with pytest.raises(ValueError, match="w.bitmap must be a uint8 tensor of shape"):
        sk.ops.csr_linear(torch.randn(1, 70), CSR(c.values, c.crow_indices, c.col_indices, c.shape,
                                                    bitmap=c.bitmap[:5].contiguous()))
    with pytest.raises(ValueError, match="bitmap=True is a CSR option"):
        sk.nn.SparseLinear.from_dense(nn.Linear(64, 32), format="bsr", bitmap=True)


# -------------------------------------------------------------------------------------------------- op
@needs_ext
@pytest.mark.parametrize("isa", ["", "avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_matches_reference(isa, dtype, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(hash((isa, str(dtype))) % 10_000)
    for n, k in ((9, 7), (17, 64), (33, 130), (40, 257), (12, 256)):
        for density in (0.0, 0.3, 0.7, 1.0):
            w = _weight(n, k, density, dtype, gen)
            if k >= 192 and 0 < density < 1:
                w[:, 64:128] = 0     # an all-zero 64-bit word between stored ones
            c = CSR.from_dense(w, bitmap=True)
            for m in (1, 2, 3, 5, 8, 9, 17):
                x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
                bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for b in (None, bias):
                    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
                    got = _run(x, c, b)
                    assert_close_to_reference(got, ref, dtype, k)


@needs_ext
def test_reference_op_and_autograd():
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(3)
    w = _weight(20, 70, 0.4, torch.float64, gen)
    c = CSR.from_dense(w, bitmap=True)
    x = torch.randn(3, 70, generator=gen, dtype=torch.float64, requires_grad=True)
    v = c.values.clone().requires_grad_()
    b = torch.randn(20, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = reference.csr_bitmap_mm(x, c.crow_indices, c.col_indices, c.bitmap, v, b, 20)
    torch.testing.assert_close(ref, x @ w.t() + b)
    assert torch.autograd.gradcheck(
        lambda x, v, b: _op()(x, c.crow_indices, c.col_indices, c.bitmap, v, b, 20), (x, v, b))
    opcheck(_op(), (x.detach(), c.crow_indices, c.col_indices, c.bitmap, c.values, b.detach(), 20))


@needs_ext
def test_bad_bitmap_is_refused_by_the_kernel():
    gen = torch.Generator().manual_seed(4)
    w = _weight(8, 100, 0.5, torch.float32, gen)
    c = CSR.from_dense(w, bitmap=True)
    extra = c.bitmap.clone()
    extra[3, 0] ^= 1           # column 0 of row 3 added or dropped: its bit count no longer matches crow
    x = torch.randn(1, 100)
    with pytest.raises(RuntimeError, match="row 3 of bitmap does not match crow_indices"):
        _op()(x, c.crow_indices, c.col_indices, extra, c.values, None, 8)
    past_k = c.bitmap.clone()
    past_k[5, 12] |= 0x80      # column 103 of a K = 100 weight
    with pytest.raises(RuntimeError, match="row 5 of bitmap"):
        _op()(x, c.crow_indices, c.col_indices, past_k, c.values, None, 8)
    with pytest.raises(RuntimeError, match=r"bitmap must have shape \[n, 8 \* ceil\(K / 64\)\]"):
        _op()(x, c.crow_indices, c.col_indices, c.bitmap[:, :8].contiguous(), c.values, None, 8)
    with pytest.raises(RuntimeError, match="bitmap must have dtype torch.uint8"):
        _op()(x, c.crow_indices, c.col_indices, c.bitmap.to(torch.int32), c.values, None, 8)
    # more than 8 rows of x: csr_mm's kernels run and the bitmap is not read
    x9 = torch.randn(9, 100)
    y = _op()(x9, c.crow_indices, c.col_indices, extra, c.values, None, 8)
    torch.testing.assert_close(y, x9 @ w.t())


@needs_ext
def test_csr_linear_uses_the_bitmap():
    gen = torch.Generator().manual_seed(5)
    w = _weight(16, 96, 0.4, torch.float32, gen)
    c = CSR.from_dense(w, bitmap=True)
    x = torch.randn(2, 96, generator=gen)
    torch.testing.assert_close(sk.ops.csr_linear(x, c), x @ w.t())
    torch.testing.assert_close(sk.ops.csr_linear(x, c), x @ w.t())   # the repeated-call path
    # a bitmap that disagrees with the pattern makes the kernel raise: proof that csr_linear read it
    bad = c.bitmap.clone()
    bad[0, 0] ^= 1
    wrong = CSR(c.values, c.crow_indices, c.col_indices, c.shape, bitmap=bad)
    with pytest.raises(RuntimeError, match="does not match crow_indices"):
        sk.ops.csr_linear(x, wrong)
    # the repeated-call shortcut notices a bitmap set on a format object it has seen without one
    plain = c.without_bitmap()
    sk.ops.csr_linear(x, plain)
    sk.ops.csr_linear(x, plain)
    plain.bitmap = bad
    with pytest.raises(RuntimeError, match="does not match crow_indices"):
        sk.ops.csr_linear(x, plain)


@needs_ext
def test_sparse_linear_bitmap_trains_saves_and_compiles(tmp_path):
    torch.manual_seed(6)
    lin = nn.Linear(130, 40)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.6] = 0
    layer = sk.nn.SparseLinear.from_dense(lin, format="csr", bitmap=True)
    assert "bitmap" in dict(layer.named_buffers()) and "bitmap" in layer.extra_repr()
    x = torch.randn(3, 130)
    torch.testing.assert_close(layer(x), lin(x))
    # the values train with the pattern fixed, through csr_bitmap_mm's autograd (csr_mm's backward)
    layer(x).square().sum().backward()
    lin(x).square().sum().backward()
    mask = lin.weight.ne(0)
    torch.testing.assert_close(layer.values.grad, lin.weight.grad[mask])
    model = nn.Sequential(layer).eval()
    sk.save(model, tmp_path)
    back = sk.load(tmp_path, nn.Sequential(nn.Linear(130, 40)))
    assert torch.equal(back[0].bitmap, layer.bitmap)
    compiled = torch.compile(back, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lin(x))


@needs_ext
def test_sparsify_times_the_bitmap_for_skinny_inputs():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(256, 512)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.7] = 0
    _, report = sk.sparsify(model, (torch.randn(1, 256),), cache=None)
    assert "csr+bitmap" in report.layers[0].times_ms
    _, report = sk.sparsify(model, (torch.randn(16, 256),), cache=None)
    assert "csr+bitmap" not in report.layers[0].times_ms and "csr" in report.layers[0].times_ms


_GUARD_PAGE = r"""
import ctypes, mmap, os, torch
import sparsekit
from sparsekit.formats import CSR
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None)
assert libc.mprotect(ctypes.c_void_p(addr + page), page, 0) == 0   # PROT_NONE after the first page
for isa in ("", "avx512", "avx2", "scalar"):   # SPARSEKIT_CPU_ISA is read per call
    os.environ["SPARSEKIT_CPU_ISA"] = isa
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        print("case", isa or "default", dtype, flush=True)   # the last line names the case that crashed
        w = torch.zeros(3, 64, dtype=dtype)
        w[0, 5], w[2, 0], w[2, 63] = 1.0, 2.0, 3.0
        c = CSR.from_dense(w, bitmap=True)
        size = torch.tensor([], dtype=dtype).element_size()
        values = torch.frombuffer(buf, dtype=dtype, count=c.nnz, offset=page - c.nnz * size)  # ends at the guard
        values.copy_(c.values)
        for m in (1, 3, 8):
            x = torch.ones(m, 64, dtype=dtype)
            y = torch.ops.sparsekit.csr_bitmap_mm(x, c.crow_indices, c.col_indices, c.bitmap, values, None, 3)
            assert y.float().tolist() == [[1.0, 0.0, 5.0]] * m, y
print("ok")
"""


@needs_ext
def test_kernel_never_reads_past_the_values(tmp_path):
    """values ending right before an inaccessible page, under every ISA and dtype: any read past them is a
    segfault of the child process."""
    import subprocess
    import sys

    script = tmp_path / "guard.py"
    script.write_text(_GUARD_PAGE)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.endswith("ok\n"), (run.returncode, run.stdout[-300:],
                                                                  run.stderr[-2000:])


def test_state_dict_with_or_without_a_bitmap_loads_into_either_layer():
    torch.manual_seed(8)
    lin = nn.Linear(70, 12)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.5] = 0
    with_bm = sk.nn.SparseLinear.from_dense(lin, format="csr", bitmap=True)
    plain = sk.nn.SparseLinear.from_dense(lin, format="csr")
    plain.load_state_dict(with_bm.state_dict())          # strict: the extra bitmap is dropped
    assert "bitmap" not in dict(plain.named_buffers())
    with_bm.load_state_dict(plain.state_dict())          # strict: the missing bitmap is rebuilt
    assert torch.equal(with_bm.bitmap, CSR.from_dense(lin.weight.detach(), bitmap=True).bitmap)
    # another pattern with the same count per row: the kept bitmap follows the loaded indices
    other = nn.Linear(70, 12)
    with torch.no_grad():
        other.weight.copy_(lin.weight.flip(1))
    with_bm.load_state_dict(sk.nn.SparseLinear.from_dense(other, format="csr").state_dict())
    x = torch.randn(2, 70)
    torch.testing.assert_close(with_bm(x), other(x))
    torch.testing.assert_close(with_bm.sparse_weight().validate().to_dense(), other.weight.detach())


def test_state_of_another_nnz_is_reported_by_load_state_dict():
    torch.manual_seed(9)
    a, b = nn.Linear(64, 16), nn.Linear(64, 16)
    with torch.no_grad():
        a.weight[torch.rand_like(a.weight) < 0.7] = 0
        b.weight[torch.rand_like(b.weight) < 0.3] = 0
    layer = sk.nn.SparseLinear.from_dense(a, format="csr", bitmap=True)
    other = sk.nn.SparseLinear.from_dense(b, format="csr").state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for values"):   # torch's own report, not a crash
        layer.load_state_dict(other)


def test_bitmap_helpers_name_bad_input():
    from sparsekit.formats import bitmap_from_indices

    with pytest.raises(TypeError, match="mask must be a 2-D bool tensor"):
        pack_bitmap(torch.ones(3, 4))
    with pytest.raises(TypeError, match="bitmap must have dtype"):
        unpack_bitmap(torch.zeros(2, 8, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 64\]"):
        unpack_bitmap(torch.zeros(2, 8, dtype=torch.uint8), 65)
    crow, col = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([3, 9], dtype=torch.int16)
    assert bitmap_from_indices(crow, col, 2, 10).shape == (2, 8)
    with pytest.raises(ValueError, match=r"col must lie in \[0, k=8\)"):
        bitmap_from_indices(crow, col, 2, 8)
    with pytest.raises(ValueError, match="crow must have n \\+ 1 = 4 entries"):
        bitmap_from_indices(crow, col, 3, 10)
    with pytest.raises(TypeError, match="col must have dtype"):
        bitmap_from_indices(crow, col.float(), 2, 10)


def test_a_bitmap_needs_each_rows_columns_in_order():
    """The kernels give a row's k-th value to its k-th set bit: unsorted columns would silently permute values."""
    w = CSR(values=torch.tensor([1.0, 10.0]), crow_indices=torch.tensor([0, 2], dtype=torch.int32),
            col_indices=torch.tensor([3, 0], dtype=torch.int16), shape=(1, 4))
    with pytest.raises(ValueError, match="strictly increasing within each row"):
        w.with_bitmap()
