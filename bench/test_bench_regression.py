"""Regression benchmarks (pytest-benchmark): a fixed small set of kernels, tracked over time.

Not part of `make test` / `pytest` (testpaths is tests/); run explicitly:

    pytest bench/ --benchmark-autosave                                   # store a baseline (.benchmarks/)
    pytest bench/ --benchmark-compare --benchmark-compare-fail=median:15%  # fail on a >15% median regression
    pytest bench/ -k conv --benchmark-group-by=group                     # a subset

Each case first checks the sparse output against dense (same correctness guard as the sweeps), then times it.
Dense cases are in the same group as the sparse ones so a regression of either shows up side by side; the
sparsity, the ideal speedup 1/(1-s) and the backend go into extra_info. TF32 is off; on CUDA each timed call ends
with a synchronize.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

from sparsekit.benchmark.machine import restore_tf32, set_tf32  # noqa: E402
from sparsekit.benchmark.patterns import Pattern, make_weight, to_format  # noqa: E402
from sparsekit.benchmark.shapes import get_shapes  # noqa: E402
from sparsekit.benchmark.sweep import TOLERANCE, check_output  # noqa: E402
from sparsekit.ops import all_reasons, bsr_linear, csr_linear, nm_linear, sparse_conv2d  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "cpu" if DEVICE == "cpu" else None   # on CUDA: what the dispatcher picks


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 everywhere (cuDNN's default lets a dense fp32 conv run in TF32), as the sweeps' default; restored."""
    old = set_tf32(False)
    yield
    restore_tf32(old)


def _timed(fn):
    """``fn`` and, on CUDA, a synchronize: pytest-benchmark would otherwise time the kernel launches only."""
    if DEVICE != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize()
    return synced

# (name, pattern, sparsity); "dense" times F.linear / F.conv2d on the same (zero-holding) weight
CASES = [
    ("dense", Pattern("csr"), 0.9),
    ("bsr32x32@0.9", Pattern("bsr", block=(32, 32)), 0.9),
    ("bsr16x16@0.95", Pattern("bsr", block=(16, 16)), 0.95),
    ("csr@0.9", Pattern("csr"), 0.9),
    ("nm2:4", Pattern("nm", n=2, m=4), 0.5),
]
LINEAR = [("bert-base.mlp_up", 128), ("llama-7b.attn_proj", 32)]
CONV = ["resnet50.layer3.conv3x3"]
_FACE = {"bsr": bsr_linear, "csr": csr_linear, "nm": nm_linear}


def _usable(pattern: Pattern, x2d: torch.Tensor, fmt) -> bool:
    if BACKEND is None:
        return True
    return not all_reasons(pattern.family, x2d, fmt)[BACKEND]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape_m", LINEAR, ids=[f"{s}-M{m}" for s, m in LINEAR])
def test_linear(benchmark, shape_m, case) -> None:
    (shape,), m = get_shapes([shape_m[0]]), shape_m[1]
    name, pattern, sparsity = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, shape.k, generator=gen).to(DEVICE)
    w = make_weight(shape.n, shape.k, pattern, sparsity, device=DEVICE)
    ref = F.linear(x, w)
    benchmark.group = f"linear {shape.name} M={m}"
    benchmark.extra_info.update({"shape": f"{m}x{shape.n}x{shape.k}", "sparsity": pattern.sparsity(sparsity),
                                 "ideal": 1 / (1 - pattern.sparsity(sparsity)), "device": DEVICE,
                                 "threads": torch.get_num_threads()})
    if name == "dense":
        fn = lambda: F.linear(x, w)
    else:
        fmt = to_format(w, pattern)
        if not _usable(pattern, x, fmt):
            pytest.skip(f"backend {BACKEND!r} cannot run {pattern.name} here")
        face = _FACE[pattern.family]
        fn = lambda: face(x, fmt, None, backend=BACKEND)
        benchmark.extra_info["backend"] = BACKEND or "auto"
    with torch.no_grad():
        ok, err = check_output(fn(), ref, TOLERANCE[torch.float32])
    assert ok, f"{name}: output differs from dense (max rel err {err:.3g})"
    with torch.no_grad():
        benchmark(_timed(fn))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape_name", CONV)
def test_conv(benchmark, shape_name, case) -> None:
    (shape,) = get_shapes([shape_name])
    name, pattern, sparsity = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, shape.c_in, shape.hw, shape.hw, generator=gen).to(DEVICE)
    w2d = make_weight(shape.n, shape.k, pattern, sparsity, device=DEVICE)
    w4 = w2d.reshape(shape.c_out, shape.c_in, shape.kernel, shape.kernel)
    st, pad, ks = shape.stride, shape.padding, shape.kernel
    ref = F.conv2d(x, w4, None, st, pad)
    benchmark.group = f"conv2d {shape.name}"
    benchmark.extra_info.update({"shape": shape.describe(DEVICE, 1), "sparsity": pattern.sparsity(sparsity),
                                 "ideal": 1 / (1 - pattern.sparsity(sparsity)), "device": DEVICE})
    if name == "dense":
        fn = lambda: F.conv2d(x, w4, None, st, pad)
    else:
        fmt = to_format(w2d, pattern)
        if not _usable(pattern, x.new_empty(1, shape.k), fmt):
            pytest.skip(f"backend {BACKEND!r} cannot run {pattern.name} here")
        fn = lambda: sparse_conv2d(x, fmt, None, st, pad, kernel_size=(ks, ks), backend=BACKEND)
    with torch.no_grad():
        ok, err = check_output(fn(), ref, TOLERANCE[torch.float32])
    assert ok, f"{name}: output differs from dense (max rel err {err:.3g})"
    with torch.no_grad():
        benchmark(_timed(fn))
