"""kernels/k_bsr_mm.py (Triton BSR x dense) against sparsekit.ops.reference.bsr_mm.

On CPU these run through the Triton interpreter: `pytest tests/test_triton_bsr.py --triton-interpret`
(fp32/fp16 only there: the interpreter gets bfloat16 wrong). On a GPU machine, run without
--triton-interpret: the same tests then run compiled, plus the `cuda` ones (bf16, larger shapes, TF32).
"""

from __future__ import annotations

import pytest
import torch
from _triton import DEVICE, INTERPRET, close, compiled_only, make_bsr, needs_runner

from sparsekit.formats import BSR
from sparsekit.ops.reference import bsr_mm as reference_bsr_mm

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

pytestmark = pytest.mark.triton


def _kernel():
    from sparsekit.kernels import k_bsr_mm

    return k_bsr_mm


def run_and_check(m: int, w: BSR, bias: bool, dtype: torch.dtype, seed: int = 1, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, k = w.shape
    x = torch.randn(m, k, generator=g).to(device=DEVICE, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=DEVICE, dtype=dtype) if bias else None
    y = _kernel().bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, n, **kw)
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    expect = reference_bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(),
                              None if b is None else b.double(), n)
    close(y, expect, dtype)
    return y


# ------------------------------------------------------------------------------ interpreter-sized tests
@needs_runner
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("block", [(16, 32), (32, 16), (32, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(dtype, m, block, bias):
    # block-row 1 empty, the rest about half full
    w = make_bsr(64, 96, block, density=0.5, dtype=dtype, empty_rows=(1,))
    y = run_and_check(m, w, bias, dtype)
    bn = block[0]
    if not bias:
        assert y[:, bn:2 * bn].eq(0).all()  # the empty block-row writes exact zeros


@needs_runner
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["sparsity100", "sparsity0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sparsity_extremes(dtype, density, bias):
    w = make_bsr(64, 64, (16, 16), density=density, dtype=dtype)
    assert w.nnzb == (0 if density == 0.0 else 16)
    y = run_and_check(5, w, bias, dtype)
    if density == 0.0 and not bias:
        assert y.eq(0).all()


@needs_runner
@pytest.mark.parametrize("block", [(16, 16), (64, 64), (128, 128), (16, 128), (128, 16), (64, 32)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
def test_block_shapes(block):
    bn, bk = block
    w = make_bsr(2 * bn, 2 * bk, block, density=0.75, dtype=torch.float32, seed=3)
    run_and_check(3, w, True, torch.float32)


@needs_runner
@pytest.mark.parametrize("seed", range(12))
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    sides = (16, 32, 64, 128)
    bn, bk = (sides[int(i)] for i in torch.randint(0, 4, (2,), generator=g))
    rows, cols = (int(v) for v in torch.randint(1, 4, (2,), generator=g))
    m = int(torch.randint(1, 40, (1,), generator=g))
    density = float(torch.rand(1, generator=g))
    dtype = (torch.float32, torch.float16)[seed % 2]
    empty = (int(torch.randint(0, rows, (1,), generator=g)),) if seed % 3 == 0 else ()
    w = make_bsr(rows * bn, cols * bk, (bn, bk), density=density, dtype=dtype, seed=seed, empty_rows=empty)
    run_and_check(m, w, bool(seed % 4 < 2), dtype, seed=seed)


@needs_runner
def test_many_row_tiles_and_block_rows():
    # > GROUP_M (8) row tiles under the interpreter's BLOCK_M=16: exercises the grouped program order,
    # including a partial last group, and a masked last row tile
    w = make_bsr(48, 32, (16, 16), density=0.7, dtype=torch.float32, seed=4, empty_rows=(2,))
    run_and_check(16 * 9 + 5, w, True, torch.float32)


@needs_runner
def test_single_block_row_every_column():
    w = make_bsr(16, 128, (16, 16), density=1.0, dtype=torch.float16, seed=5)
    run_and_check(2, w, False, torch.float16)


@needs_runner
def test_empty_m_and_n_do_not_launch(monkeypatch):
    k_bsr_mm = _kernel()

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the kernel must not be launched for an empty result")

    monkeypatch.setattr(k_bsr_mm, "_bsr_mm_kernel", NoLaunch())
    w = make_bsr(32, 32, (16, 16), density=1.0, dtype=torch.float32)
    x = torch.empty(0, 32, device=DEVICE)
    y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 32)
    assert y.shape == (0, 32) and y.dtype == torch.float32

    crow = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    col = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    values = torch.zeros(0, 16, 16, device=DEVICE)
    y = k_bsr_mm.bsr_mm(torch.randn(4, 32, device=DEVICE), crow, col, values, None, 0)
    assert y.shape == (4, 0)


@needs_runner
def test_input_precision_argument():
    w = make_bsr(32, 32, (16, 16), density=1.0, dtype=torch.float32)
    run_and_check(4, w, False, torch.float32, input_precision="ieee")
    with pytest.raises(ValueError, match="input_precision"):
        run_and_check(4, w, False, torch.float32, input_precision="fp8")


# ------------------------------------------------------------------------------------------ validation
def _args(block=(16, 16), dtype=torch.float32, m=4, n=32, k=32):
    # validation happens before any launch, so CPU tensors are fine here whatever the environment
    bn, bk = block
    w = BSR.from_dense(torch.randn(n, k), block=block).to(dtype=dtype)
    return torch.randn(m, k, dtype=dtype), w.crow_indices, w.col_indices, w.values, None, n


@pytest.mark.parametrize("block", [(8, 16), (16, 8), (48, 16), (16, 96)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_unsupported_block_sides_raise(block):
    bn, bk = block
    x, crow, col, values, bias, n = _args(block=block, n=bn * 2, k=bk * 2)
    with pytest.raises(ValueError, match=r"16, 32, 64, 128"):
        _kernel().bsr_mm(x, crow, col, values, bias, n)


def test_bad_inputs_raise_naming_the_argument():
    bsr_mm = _kernel().bsr_mm
    x, crow, col, values, _, n = _args()
    with pytest.raises(TypeError, match="values dtype"):
        bsr_mm(x, crow, col, values.half(), None, n)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        bsr_mm(x.double(), crow, col, values.double(), None, n)
    with pytest.raises(ValueError, match="x must be contiguous"):
        bsr_mm(torch.randn(32, 4).t(), crow, col, values, None, n)
    with pytest.raises(ValueError, match="values must be contiguous"):
        bsr_mm(x, crow, col, values.transpose(1, 2), None, n)
    with pytest.raises(TypeError, match="crow_indices must be int32"):
        bsr_mm(x, crow.long(), col, values, None, n)
    with pytest.raises(TypeError, match="col_indices must be int32"):
        bsr_mm(x, crow, col.long(), values, None, n)
    with pytest.raises(ValueError, match="crow_indices must have"):
        bsr_mm(x, crow[:-1].contiguous(), col, values, None, n)
    with pytest.raises(ValueError, match="col_indices has"):
        bsr_mm(x, crow, col[:-1].contiguous(), values, None, n)
    with pytest.raises(ValueError, match="n=40"):
        bsr_mm(x, crow, col, values, None, 40)
    with pytest.raises(ValueError, match=r"x.shape\[1\]"):
        bsr_mm(torch.randn(4, 40), crow, col, values, None, n)
    with pytest.raises(ValueError, match="bias must have shape"):
        bsr_mm(x, crow, col, values, torch.randn(n + 1), n)
    with pytest.raises(TypeError, match="bias dtype"):
        bsr_mm(x, crow, col, values, torch.randn(n, dtype=torch.float16), n)
    with pytest.raises(TypeError, match="n must be an int"):
        bsr_mm(x, crow, col, values, None, 32.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bsr_mm(x.numpy(), crow, col, values, None, n)


@pytest.mark.skipif(INTERPRET, reason="CPU tensors are accepted under TRITON_INTERPRET=1")
def test_cpu_tensors_rejected_without_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _kernel().bsr_mm(*_args())


@pytest.mark.slow
def test_compiles_for_sm80_and_sm90():
    # no GPU needed: triton.compile for GPUTarget sm80/sm90 down to cubin (with triton's bundled ptxas);
    # under --triton-interpret check_all re-runs itself in a subprocess without TRITON_INTERPRET
    from sparsekit.kernels._compile_check import check_all

    assert check_all(verbose=False) == []


# --------------------------------------------------------------------------------------- GPU (compiled)
@pytest.mark.cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (128, 128), (32, 128), (128, 32)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [1, 7, 64, 200, 1031])
def test_cuda_matches_reference(m, block, dtype):
    w = make_bsr(512, 768, block, density=0.3, dtype=dtype, seed=m, empty_rows=(0,), device="cuda")
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 768, generator=g).to("cuda", dtype)
    b = torch.randn(512, generator=g).to("cuda", dtype)
    y = _kernel().bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, 512)
    expect = reference_bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), b.double(), 512)
    # K=768 sums: scale the tolerance with sqrt(K) for the low-precision dtypes
    close(y, expect, dtype, scale=1.0 if dtype == torch.float32 else 4.0)


@pytest.mark.cuda
@compiled_only
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["sparsity100", "sparsity0"])
def test_cuda_sparsity_extremes(density):
    w = make_bsr(256, 256, (32, 32), density=density, dtype=torch.float16, device="cuda")
    x = torch.randn(100, 256, device="cuda", dtype=torch.float16)
    y = _kernel().bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 256)
    expect = reference_bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 256)
    torch.testing.assert_close(y.double(), expect, atol=4e-2, rtol=1e-2)


@pytest.fixture
def tf32_flags():
    """Restores torch's TF32 settings, legacy and new API, exactly as they were (the legacy matmul precision
    first: it also writes the new API's matmul setting, and a legacy flag left out of step with the new API makes
    every later read of ``allow_tf32`` raise)."""
    backends = torch.backends
    new_api = hasattr(backends, "fp32_precision") and hasattr(backends.cuda.matmul, "fp32_precision")
    saved = (torch.get_float32_matmul_precision(),
             (backends.fp32_precision, backends.cuda.matmul.fp32_precision) if new_api else None)
    yield new_api
    torch.set_float32_matmul_precision(saved[0])
    if saved[1] is not None:
        backends.fp32_precision, backends.cuda.matmul.fp32_precision = saved[1]


def test_tf32_default_follows_the_new_fp32_precision_api(tf32_flags):
    """torch >= 2.9: matmul.fp32_precision ("none" inherits the global fp32_precision) decides; reading the legacy
    allow_tf32 after the new API was used raises in torch, which must not turn TF32 off silently."""
    from sparsekit.kernels._launch import default_input_precision

    if not tf32_flags:
        pytest.skip("this torch has no torch.backends.*.fp32_precision API")
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"
    assert default_input_precision(torch.float32) == "tf32"
    assert default_input_precision(torch.float16) == "ieee"
    matmul.fp32_precision = "ieee"
    assert default_input_precision(torch.float32) == "ieee"
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert default_input_precision(torch.float32) == "tf32"   # inherited from the global setting
    torch.backends.fp32_precision = "ieee"
    assert default_input_precision(torch.float32) == "ieee"
    matmul.fp32_precision = "tf32"                             # the matmul setting wins over the global one
    assert default_input_precision(torch.float32) == "tf32"


def test_tf32_default_follows_the_legacy_flag(tf32_flags, monkeypatch):
    from types import SimpleNamespace

    from sparsekit.kernels._launch import default_input_precision

    torch.backends.cuda.matmul.allow_tf32 = True
    assert default_input_precision(torch.float32) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert default_input_precision(torch.float32) == "ieee"
    # a torch without the new API: only the legacy flag exists
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=True))
    if tf32_flags:
        monkeypatch.setattr(torch.backends, "fp32_precision", "none")
    assert default_input_precision(torch.float32) == "tf32"


@pytest.mark.cuda
@compiled_only
def test_cuda_tf32_follows_torch_flag(tf32_flags):
    from sparsekit.kernels._launch import default_input_precision

    k_bsr_mm = _kernel()
    torch.backends.cuda.matmul.allow_tf32 = False
    assert default_input_precision(torch.float32) == "ieee"
    if tf32_flags:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    assert default_input_precision(torch.float32) == "tf32"
    w = make_bsr(256, 512, (64, 64), density=0.5, dtype=torch.float32, device="cuda")
    x = torch.randn(128, 512, device="cuda")
    y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 256)
    expect = reference_bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 256)
    torch.testing.assert_close(y.double(), expect, atol=5e-2, rtol=1e-2)  # TF32: ~1e-3 relative per product


@pytest.mark.cuda
@compiled_only
def test_cuda_large_grid():
    # many block-rows x row tiles (grouped order with a partial last group)
    dev = "cuda"
    w = make_bsr(4096, 256, (16, 16), density=0.2, dtype=torch.float16, device=dev)
    x = torch.randn(3000, 256, device=dev, dtype=torch.float16)
    y = _kernel().bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 4096)
    expect = reference_bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 4096)
    torch.testing.assert_close(y.double(), expect, atol=4e-2, rtol=1e-2)


@pytest.mark.cuda
@compiled_only
def test_cuda_second_device_while_the_current_is_the_first():
    """Every Triton launcher runs on the tensors' device, not the current one (device guard): tensors on cuda:1
    while cuda:0 is current, forward, split-K, backward, SDDMM and N:M."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import sparsekit as sk
    from sparsekit.formats import NM
    from sparsekit.ops import reference as R

    torch.cuda.set_device(0)
    dev = "cuda:1"
    w = make_bsr(512, 256, (32, 32), density=0.3, dtype=torch.float16, device=dev)
    values = w.values.clone().requires_grad_()
    wt = BSR(values=values, crow_indices=w.crow_indices, col_indices=w.col_indices, shape=w.shape)
    x = torch.randn(8, 256, device=dev, dtype=torch.float16, requires_grad=True)
    y = sk.ops.bsr_linear(x, wt, backend="triton")
    assert y.device == torch.device(dev)
    expect = reference_bsr_mm(x.detach().double(), w.crow_indices, w.col_indices, w.values.double(), None, 512)
    close(y, expect, torch.float16, 6.0)
    y.float().sum().backward()
    dy = torch.ones(8, 512, device=dev, dtype=torch.float64)
    close(x.grad, R.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values.double(), 256), torch.float16, 6.0)
    close(values.grad, R.bsr_sddmm(dy, x.detach().double(), w.crow_indices, w.col_indices, 32, 32),
          torch.float16, 6.0)
    nm = NM.from_dense(NM.prune(torch.randn(96, 256), 2, 4), 2, 4).to(device=dev, dtype=torch.float16)
    close(sk.ops.nm_linear(x.detach(), nm, backend="triton"),
          R.nm_mm(x.detach().double(), nm.values.double(), nm.indices, None, 2, 4), torch.float16, 6.0)
    assert torch.cuda.current_device() == 0


@needs_runner
def test_every_launcher_rejects_an_unknown_input_precision():
    from sparsekit.kernels import k_bsr_mm_t, k_bsr_sddmm, k_channel, k_nm_mm

    from sparsekit.formats import NM

    w = make_bsr(64, 64, (16, 16), density=0.5, dtype=torch.float32, device=DEVICE)
    x = torch.randn(8, 64, device=DEVICE)
    nm = NM.from_dense(NM.prune(torch.randn(32, 64, device=DEVICE), 2, 4), 2, 4)
    calls = {
        "bsr_mm": lambda p: _kernel().bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 64,
                                             input_precision=p),
        "bsr_mm_t": lambda p: k_bsr_mm_t.bsr_mm_t(x, w.crow_indices, w.col_indices, w.values, 64,
                                                  input_precision=p),
        "bsr_sddmm": lambda p: k_bsr_sddmm.bsr_sddmm(x, x, w.crow_indices, w.col_indices, 16, 16,
                                                     input_precision=p),
        "nm_mm": lambda p: k_nm_mm.nm_mm(x, nm.values, nm.indices, None, 2, 4, input_precision=p),
        "channel_mm": lambda p: k_channel.channel_mm(
            x[None], torch.arange(0, 64, 2, device=DEVICE, dtype=torch.int32), torch.randn(16, 32, device=DEVICE),
            None, torch.empty(1, 8, 16, device=DEVICE), (8 * 64, 64, 1), (8 * 16, 16, 1), 1, 8, input_precision=p),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="input_precision must be one of"):
            call("tf33")
        assert call(None) is not None, name          # the default still runs


@needs_runner
def test_bsr_sddmm_block_sides_must_be_ints():
    from sparsekit.kernels import k_bsr_sddmm

    w = make_bsr(64, 64, (16, 16), density=0.5, dtype=torch.float32, device=DEVICE)
    x = torch.randn(8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="block_n must be an int, got float"):
        k_bsr_sddmm.bsr_sddmm(x, x, w.crow_indices, w.col_indices, 16.5, 16)


def test_device_ctx_enters_a_cuda_device_only_when_it_is_not_the_current_one(monkeypatch):
    """Entering torch.cuda.device costs microseconds per launch: skipped for CPU tensors (the interpreter) and for
    the current device, kept for another GPU (so a tensor on cuda:1 launches there)."""
    import contextlib

    from sparsekit.kernels import _launch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(_launch.device_ctx(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(_launch.device_ctx(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(_launch.device_ctx(torch.device("cuda", 1)), torch.cuda.device)
