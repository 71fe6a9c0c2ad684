"""The dispatcher's measured choice (backend=None): the fastest usable backend per key, measured once, never
while tracing; fake backends on CPU, the real cpu/triton pair under the Triton interpreter (`-m triton`), and
the CUDA backends on a GPU (`-m cuda`)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk
from sparsekit.formats import BSR, NM
from sparsekit.ops import _dispatch
from sparsekit.ops._dispatch import ReferenceBackend


class FakeBackend(ReferenceBackend):
    """The reference, slowed down by ``delay`` seconds per call, counting calls and releases."""

    def __init__(self, name: str, delay: float = 0.0, fail: bool = False) -> None:
        self.name = name
        self.description = f"fake {name}"
        self.delay = delay
        self.fail = fail
        self.calls = 0
        self.released = 0

    def mm(self, family, x, w, bias):
        self.calls += 1
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")
        if self.delay:
            time.sleep(self.delay)
        return super().mm(family, x, w, bias)

    def release(self, family, w):
        self.released += 1


@pytest.fixture
def measuring(monkeypatch):
    """Measurement on for CPU, few runs, no remembered choices before or after."""
    monkeypatch.setattr(_dispatch, "_MEASURE", set(_dispatch._MEASURE))
    monkeypatch.setattr(_dispatch, "_NO_MEASURE", set(_dispatch._NO_MEASURE))
    monkeypatch.setattr(_dispatch, "MEASURE_WARMUP", 1)
    monkeypatch.setattr(_dispatch, "MEASURE_REPS", 3)
    _dispatch.set_measure("cpu", True)
    yield
    _dispatch.clear_choices()


@pytest.fixture
def fakes(monkeypatch, measuring):
    slow, fast = FakeBackend("slow", delay=0.02), FakeBackend("fast")   # (well above a loaded machine's noise)
    backends = {"slow": slow, "fast": fast, "reference": ReferenceBackend()}
    monkeypatch.setattr(_dispatch, "BACKENDS", backends)
    monkeypatch.setattr(_dispatch, "PRIORITY", {"cpu": ("slow", "fast", "reference")})
    return slow, fast


def _bsr(n=32, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, k, generator=g)
    keep = (torch.rand(n // 16, k // 16, generator=g) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    dense = dense * keep
    return dense, BSR.from_dense(dense, (16, 16))


# ------------------------------------------------------------------------------------------- settings
def test_env_parsing():
    p = _dispatch._parse_measure
    assert p(None) == {"cuda"}           # default: measure on CUDA only
    assert p("0") == p("off") == p("") == set()
    assert p("1") == p("on") == {"*"}
    assert p("cuda, cpu") == {"cuda", "cpu"}
    with pytest.warns(RuntimeWarning, match=r"\['gpu'\] are not device types"):
        assert p("gpu,cpu") == {"cpu"}     # a typo is named, not silently measured nowhere


def test_defaults_keep_cpu_on_the_priority_list():
    if _dispatch.MEASURE_ENV in __import__("os").environ:
        pytest.skip(f"{_dispatch.MEASURE_ENV} is set in this environment")
    assert _dispatch.measure_enabled("cuda") and not _dispatch.measure_enabled("cpu")


def test_set_measure_returns_previous_and_forgets(measuring):
    _dispatch._CHOSEN[("x",)] = None
    assert _dispatch.set_measure("cpu", False) is True
    assert not _dispatch._CHOSEN and not _dispatch.measure_enabled("cpu")
    _dispatch._MEASURE.add("*")
    assert not _dispatch.measure_enabled("cpu")   # switched off explicitly: wins over "all"
    assert _dispatch.measure_enabled("xpu")
    with pytest.raises(TypeError):
        _dispatch.set_measure(None, True)


# ------------------------------------------------------------------------------------------- fake backends
def test_fastest_is_picked_and_remembered(fakes):
    slow, fast = fakes
    dense, w = _bsr()
    x = torch.randn(4, 48)
    y = sk.ops.bsr_linear(x, w)
    torch.testing.assert_close(y, F.linear(x, dense))   # the real call runs once, on the winner
    assert (slow.calls, fast.calls) == (1 + 3, 1 + 3 + 1)
    (key, rec), = _dispatch.MEASUREMENTS.items()
    assert rec["chosen"] == "fast" and set(rec["ms"]) == {"slow", "fast"} and rec["ms"]["slow"] > rec["ms"]["fast"]
    assert rec["shape"] == (4, 32, 48)
    assert slow.released == 1 and fast.released == 0   # the loser drops what it cached for w
    assert "reference" not in rec["ms"]                 # densify + matmul is never a candidate

    y2 = sk.ops.bsr_linear(x[:3], w, torch.ones(32))   # same key (M 3 -> bucket 4): no new measurement
    torch.testing.assert_close(y2, F.linear(x[:3], dense, torch.ones(32)))
    assert (slow.calls, fast.calls) == (4, 6) and len(_dispatch.MEASUREMENTS) == 1

    sk.ops.bsr_linear(torch.randn(5, 48), w)          # M bucket 8: a new key, measured again
    assert (slow.calls, fast.calls) == (8, 6 + 4 + 1) and len(_dispatch.MEASUREMENTS) == 2
    _, w2 = _bsr(32, 64)
    sk.ops.bsr_linear(torch.randn(4, 64), w2)          # another K
    assert len(_dispatch.MEASUREMENTS) == 3


def test_forced_backend_is_not_measured(fakes):
    slow, fast = fakes
    _, w = _bsr()
    sk.ops.bsr_linear(torch.randn(4, 48), w, backend="slow")
    assert (slow.calls, fast.calls) == (1, 0) and not _dispatch.MEASUREMENTS


def test_a_backend_that_fails_while_measured_is_not_chosen(fakes, monkeypatch):
    slow, fast = fakes
    fast.fail = True
    dense, w = _bsr()
    x = torch.randn(4, 48)
    y = sk.ops.bsr_linear(x, w)
    torch.testing.assert_close(y, F.linear(x, dense))
    rec, = _dispatch.MEASUREMENTS.values()
    assert rec["chosen"] == "slow" and "fast is broken" in rec["errors"]["fast"]


def test_grad_flows_and_timed_runs_build_no_graph(fakes):
    dense, w = _bsr()
    x = torch.randn(4, 48, requires_grad=True)
    y = sk.ops.bsr_linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(x.grad, dense.sum(0).expand(4, -1))


def test_single_candidate_is_not_timed(fakes, monkeypatch):
    slow, fast = fakes
    monkeypatch.setattr(_dispatch, "PRIORITY", {"cpu": ("fast", "reference")})
    _, w = _bsr()
    sk.ops.bsr_linear(torch.randn(4, 48), w)
    assert fast.calls == 1 and not _dispatch.MEASUREMENTS


def test_not_measured_while_compiling(fakes, monkeypatch):
    slow, fast = fakes
    slow.delay = 0.0

    def boom(*args):
        raise AssertionError("measured while tracing")

    monkeypatch.setattr(_dispatch, "_measure", boom)
    dense, w = _bsr()
    x = torch.randn(4, 48)
    fn = torch.compile(lambda x: sk.ops.bsr_linear(x, w), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), F.linear(x, dense))
    assert not _dispatch.MEASUREMENTS and not _dispatch._CHOSEN   # priority order, nothing remembered


def test_not_measured_nor_remembered_under_a_dispatch_mode(fakes):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    slow, fast = fakes
    dense, w = _bsr()
    x = torch.randn(4, 48)
    with Count():
        y = sk.ops.bsr_linear(x, w)
    torch.testing.assert_close(y, F.linear(x, dense))
    assert (slow.calls, fast.calls) == (1, 0)          # the first in priority order
    assert not _dispatch.MEASUREMENTS and not _dispatch._CHOSEN
    sk.ops.bsr_linear(x, w)                            # outside the mode: measured now
    assert _dispatch.MEASUREMENTS


def test_cached_call_does_not_rebuild_reasons(fakes, monkeypatch):
    """The remembered case is one key build + one dict lookup: no backend is asked anything."""
    _, w = _bsr()
    x = torch.randn(4, 48)
    sk.ops.bsr_linear(x, w)
    for b in _dispatch.BACKENDS.values():
        monkeypatch.setattr(b, "not_supported_reasons", lambda *a: pytest.fail("reasons recomputed"))
    monkeypatch.setattr(_dispatch, "_measured_pick", lambda *a: pytest.fail("re-measured"))
    sk.ops.bsr_linear(x, w)


# ------------------------------------------------------------------------------------ kernel variants
class VariantFake(FakeBackend):
    """A backend whose kernels come in variants (like csr_mm on CUDA: skinny, rowdot, tiled), each its own speed."""

    def __init__(self, name, delays):
        super().__init__(name)
        self.delays = delays
        self.ran: list[str | None] = []

    def variants(self, family, x, w):
        return tuple(self.delays)

    def mm(self, family, x, w, bias):
        self.ran.append(None)
        return super().mm(family, x, w, bias)

    def mm_variant(self, family, x, w, bias, variant):
        self.ran.append(variant)
        time.sleep(self.delays[variant])
        return ReferenceBackend.mm(self, family, x, w, bias)


def test_kernel_variants_are_measured_as_candidates_of_their_own(measuring, monkeypatch):
    # (sleeps well above scheduling noise on a loaded 2-core machine: the 0-delay variant must win every time)
    multi = VariantFake("multi", {"slow": 0.02, "fast": 0.0, "slower": 0.03})
    monkeypatch.setattr(_dispatch, "BACKENDS", {"multi": multi, "reference": ReferenceBackend()})
    monkeypatch.setattr(_dispatch, "PRIORITY", {"cpu": ("multi", "reference")})
    dense, w = _bsr()
    x = torch.randn(4, 48)
    torch.testing.assert_close(sk.ops.bsr_linear(x, w), F.linear(x, dense))
    rec, = _dispatch.MEASUREMENTS.values()
    assert set(rec["ms"]) == {"multi:slow", "multi:fast", "multi:slower"} and rec["chosen"] == "multi:fast"
    chosen = _dispatch.choose("bsr", x, w)
    assert (chosen.name, chosen.variant, chosen.label) == ("multi", "fast", "multi:fast")
    assert multi.ran[-1] == "fast" and None not in multi.ran   # the real call ran on the winner
    multi.ran.clear()
    sk.ops.bsr_linear(x, w, torch.ones(32))
    assert multi.ran == ["fast"] and len(_dispatch.MEASUREMENTS) == 1
    assert multi.released == 0    # a backend whose variant won keeps its caches


def test_kernel_variants_compete_with_other_backends_and_the_loser_releases(fakes, monkeypatch):
    slow, fast = fakes
    multi = VariantFake("multi", {"a": 0.02, "b": 0.03})
    monkeypatch.setattr(_dispatch, "BACKENDS", {**_dispatch.BACKENDS, "multi": multi})
    monkeypatch.setattr(_dispatch, "PRIORITY", {"cpu": ("multi", "slow", "fast", "reference")})
    _, w = _bsr()
    sk.ops.bsr_linear(torch.randn(4, 48), w)
    rec, = _dispatch.MEASUREMENTS.values()
    assert set(rec["ms"]) == {"multi:a", "multi:b", "slow", "fast"} and rec["chosen"] == "fast"
    assert multi.released == 1 and slow.released == 1 and fast.released == 0   # once per losing backend


def test_without_measuring_the_backend_keeps_its_own_kernel_rule(measuring, monkeypatch):
    multi = VariantFake("multi", {"a": 0.0, "b": 0.0})
    monkeypatch.setattr(_dispatch, "BACKENDS", {"multi": multi, "reference": ReferenceBackend()})
    monkeypatch.setattr(_dispatch, "PRIORITY", {"cpu": ("multi", "reference")})
    _dispatch.set_measure("cpu", False)
    _, w = _bsr()
    sk.ops.bsr_linear(torch.randn(4, 48), w)
    assert multi.ran == [None] and not _dispatch.MEASUREMENTS   # mm, not a variant: the thresholds in the op


def test_csr_mm_variants_follow_the_kernels_limits(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_CSR_SKINNY", raising=False)
    v = _dispatch.csr_mm_variants
    assert v(4, torch.float16, (8, 0)) == ("skinny", "rowdot", "tiled")
    assert v(8, torch.bfloat16, (9, 0)) == ("skinny", "rowdot", "tiled")
    assert v(16, torch.float16, (9, 0)) == ("skinny", "tiled")
    assert v(64, torch.float16, (12, 0)) == ("skinny", "tiled")
    assert v(65, torch.float16, (9, 0)) == ("tiled",)
    assert v(4, torch.float32, (9, 0)) == ("rowdot", "tiled")        # the skinny kernel is fp16/bf16 only
    assert v(4, torch.float16, (7, 5)) == ("rowdot", "tiled")        # ... and sm80+
    # the key's M bucket (powers of two) never straddles a kernel's limit
    for m in range(1, 130):
        bucket = 1 << (m - 1).bit_length()
        assert v(m, torch.float16, (9, 0)) == v(bucket, torch.float16, (9, 0))
    monkeypatch.setenv("SPARSEKIT_CSR_SKINNY", "0")                   # switched off: not offered (nor run when
    assert v(4, torch.float16, (9, 0)) == ("rowdot", "tiled")        # an earlier measurement picked it)


def test_only_the_cuda_csr_kernels_have_variants(monkeypatch):
    cuda, cpu = _dispatch.BACKENDS["cuda"], _dispatch.BACKENDS["cpu"]
    _, w = _bsr()
    x = torch.randn(4, 48)
    assert cuda.variants("csr", x, w) == () and cpu.variants("csr", x, w) == () and cuda.variants("bsr", x, w) == ()
    from types import SimpleNamespace

    monkeypatch.setattr(_dispatch, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(_dispatch, "_capability", lambda device: (9, 0))
    xc = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(4, 48))
    assert cuda.variants("csr", xc, w) == ("skinny", "rowdot", "tiled")
    assert cuda.variants("nm", xc, w) == ()


def test_a_variant_call_that_needs_autograd_takes_the_plain_op(monkeypatch):
    cuda = _dispatch.BACKENDS["cuda"]
    plain = []
    monkeypatch.setattr(type(cuda), "mm", lambda self, family, x, w, bias: plain.append(family) or "plain")
    _, w = _bsr()
    x = torch.randn(4, 48, requires_grad=True)
    assert cuda.mm_variant("csr", x, w, None, "skinny") == "plain" and plain == ["csr"]
    with pytest.raises(NotImplementedError, match="has no kernel variants"):
        ReferenceBackend().mm_variant("bsr", x, w, None, "a")


# ----------------------------------------------------------------- CUDA code built for this GPU's arch?
@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda_build_reasons on a CPU machine: device context, capture query and capability stood in for."""
    import contextlib

    monkeypatch.setattr(_dispatch, "_CUDA_BUILD", {})
    monkeypatch.setattr(torch.cuda, "device", lambda idx: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_dispatch, "_capability", lambda device: (7, 5))
    probes = []
    return probes


def test_cuda_backend_says_when_its_code_was_not_built_for_the_gpu(fake_gpu, monkeypatch):
    from types import SimpleNamespace

    error = "CUDA error: no kernel image is available for execution on the device"
    monkeypatch.setattr(_dispatch, "_probe_cuda_build", lambda index: fake_gpu.append(index) or error)
    reasons = _dispatch.cuda_build_reasons(torch.device("cuda", 0))
    assert len(reasons) == 1 and "compute capability 7.5" in reasons[0] and error in reasons[0]
    assert "TORCH_CUDA_ARCH_LIST" in reasons[0] and _dispatch.DEFAULT_CUDA_ARCH_LIST in reasons[0]
    assert _dispatch.cuda_build_reasons(torch.device("cuda", 0)) == reasons and fake_gpu == [0]   # probed once
    # the backend reports it (so backend=None never picks it there, and a forced call explains why)
    monkeypatch.setattr(_dispatch, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(_dispatch._extension, "LOADED", True)
    _, w = _bsr()
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(4, 48))
    assert _dispatch.BACKENDS["cuda"].input_reasons("bsr", x, w) == reasons


def test_cuda_build_probe_passes_and_is_skipped_while_tracing(fake_gpu, monkeypatch):
    monkeypatch.setattr(_dispatch, "_probe_cuda_build", lambda index: fake_gpu.append(index))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _dispatch.cuda_build_reasons(torch.device("cuda", 1)) == [] and fake_gpu == []   # not now, not cached
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _dispatch.cuda_build_reasons(torch.device("cuda", 1)) == [] and fake_gpu == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _dispatch.cuda_build_reasons(torch.device("cuda", 1)) == [] and fake_gpu == [1]
    assert _dispatch._CUDA_BUILD == {1: []}


def test_rocm_torch_gets_a_reason_from_the_gpu_backends(fake_gpu, monkeypatch):
    """On a ROCm build of torch AMD GPUs are "cuda" devices: the cuda and triton backends (NVIDIA kernels, tables,
    TF32 rules) decline them with a reason, without a probe launch, and the dispatcher falls back."""
    from types import SimpleNamespace

    monkeypatch.setattr(_dispatch, "_probe_cuda_build", lambda index: fake_gpu.append(index))
    monkeypatch.setattr(_dispatch, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(_dispatch._extension, "LOADED", True)
    monkeypatch.setattr(_dispatch, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: None)
    _, w = _bsr()
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(4, 48))
    monkeypatch.setattr(torch.version, "hip", None)   # a CUDA build: both can run
    assert _dispatch.BACKENDS["triton"].not_supported_reasons("bsr", x, w) == []
    assert _dispatch.BACKENDS["cuda"].not_supported_reasons("bsr", x, w) == [] and fake_gpu == [0]
    monkeypatch.setattr(_dispatch, "_CUDA_BUILD", {})
    fake_gpu.clear()
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    reason = "ROCm (torch.version.hip) is not supported by sparsekit's GPU kernels"
    assert _dispatch.BACKENDS["triton"].not_supported_reasons("bsr", x, w) == [reason]
    assert _dispatch.BACKENDS["cuda"].not_supported_reasons("bsr", x, w) == [reason]
    assert _dispatch.cuda_build_reasons(torch.device("cuda", 0)) == [reason] and fake_gpu == []   # no probe
    assert _dispatch._first_usable("bsr", x, w).name == "reference"
    # CPU tensors are not AMD GPUs: the interpreter and the cpu backend are not affected
    cpu_x = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, shape=(4, 48))
    assert reason not in _dispatch.BACKENDS["triton"].not_supported_reasons("bsr", cpu_x, w)


def test_sparsekit_info_says_triton_declines_an_amd_gpu(monkeypatch):
    from sparsekit import info as info_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 4))
    monkeypatch.setattr(info_mod, "cuda_build_reasons", lambda device: [])
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    triton = info_mod.backend_status()["triton"]
    if _dispatch.BACKENDS["triton"].environment_reasons():
        pytest.skip("triton is not importable here")
    assert not triton["usable"] and _dispatch.ROCM_REASON in triton["reasons"]


# --------------------------------------------------------------------------- real backends (interpreter)
@pytest.mark.triton
def test_measures_cpu_and_triton_under_the_interpreter(measuring, monkeypatch):
    if not _dispatch.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (pytest -m triton --triton-interpret)")
    if _dispatch.BACKENDS["triton"].environment_reasons():
        pytest.skip(f"triton unusable: {_dispatch.BACKENDS['triton'].environment_reasons()}")
    dense, w = _bsr(32, 32)
    x = torch.randn(4, 32)
    reasons = _dispatch.all_reasons("bsr", x, w)
    usable = [name for name, r in reasons.items() if not r and name not in _dispatch.MEASURE_SKIP]
    if len(usable) < 2:
        pytest.skip(f"fewer than two measurable backends here: {reasons}")
    y = sk.ops.bsr_linear(x, w)
    torch.testing.assert_close(y, F.linear(x, dense), rtol=1e-4, atol=1e-4)
    rec, = _dispatch.MEASUREMENTS.values()
    assert set(rec["ms"]) == set(usable) and rec["chosen"] in rec["ms"], rec
    chosen = _dispatch.choose("bsr", x, w)
    assert chosen.name == rec["chosen"]
    monkeypatch.setattr(_dispatch, "_measure", lambda *a: pytest.fail("re-measured"))
    torch.testing.assert_close(sk.ops.bsr_linear(x, w), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["bsr", "nm"])
def test_cuda_measures_by_default_and_matches_reference(family):
    if not _dispatch.measure_enabled("cuda"):
        pytest.skip(f"{_dispatch.MEASURE_ENV} turned measuring off on cuda")
    _dispatch.clear_choices()
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(256, 512, generator=g)
    if family == "nm":
        dense = NM.prune(dense, 2, 4)
        w = NM.from_dense(dense, 2, 4)
    else:
        keep = (torch.rand(8, 16, generator=g) < 0.3).repeat_interleave(32, 0).repeat_interleave(32, 1)
        dense = dense * keep
        w = BSR.from_dense(dense, (32, 32))
    w = w.to(device="cuda", dtype=torch.float16)
    x = torch.randn(64, 512, generator=g).to("cuda", torch.float16)
    y = (sk.ops.nm_linear if family == "nm" else sk.ops.bsr_linear)(x, w)
    ref = F.linear(x.double(), dense.to("cuda").double())
    assert (y.double() - ref).abs().max().item() <= 2e-2 * max(1.0, ref.abs().max().item())
    usable = [n for n, r in _dispatch.all_reasons(family, x, w).items() if not r and n not in _dispatch.MEASURE_SKIP]
    if len(usable) >= 2:
        rec, = _dispatch.MEASUREMENTS.values()
        assert set(rec["ms"]) | set(rec["errors"]) == set(usable) and rec["chosen"] in rec["ms"], rec
    _dispatch.clear_choices()


@pytest.mark.cuda
def test_cuda_graph_capture_uses_priority_and_remembers_nothing():
    if not _dispatch.measure_enabled("cuda"):
        pytest.skip(f"{_dispatch.MEASURE_ENV} turned measuring off on cuda")
    _dispatch.clear_choices()
    dense, w = _bsr(64, 64)
    w = w.to(device="cuda", dtype=torch.float16)
    sk.ops.bsr_linear(torch.randn(32, 64, device="cuda", dtype=torch.float16), w)   # M bucket 32: measured,
    torch.cuda.synchronize()                                                      # kernels compiled eagerly
    chosen_before, measured_before = dict(_dispatch._CHOSEN), dict(_dispatch.MEASUREMENTS)
    x = torch.randn(16, 64, device="cuda", dtype=torch.float16)                   # M bucket 16: a new key
    called = []
    real = _dispatch._measure
    _dispatch._measure = lambda *a: called.append(a) or real(*a)
    try:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                y = sk.ops.bsr_linear(x, w)
        except Exception as exc:   # a backend that cannot be captured is not this test's subject
            pytest.skip(f"capture failed: {type(exc).__name__}: {exc}")
        graph.replay()
        torch.cuda.synchronize()
        ref = F.linear(x.double(), dense.to(device="cuda", dtype=torch.float16).double())
        torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)
        chosen_after, measured_after = dict(_dispatch._CHOSEN), dict(_dispatch.MEASUREMENTS)
        assert not called and chosen_after == chosen_before and measured_after == measured_before
    finally:
        _dispatch._measure = real
        _dispatch.clear_choices()


def test_measured_choice_never_returns_a_path_this_call_does_not_offer(measuring):
    """One shape key, two calls offering different paths (a no_grad call may offer a forward-only fused kernel
    that a training call cannot use): the second call must get one of its own paths (it got a KeyError)."""
    x = torch.randn(4, 8)
    key = ("test_helper", 4, 8)
    slow = lambda: time.sleep(0.02)  # noqa: E731
    fast = lambda: None  # noqa: E731
    assert _dispatch.measured_choice(key, x, {"fused": fast, "unfused": slow}, "unfused") == "fused"
    assert _dispatch.measured_choice(key, x, {"other": slow, "unfused": fast}, "unfused") == "unfused"
    assert _dispatch.measured_choice(key, x, {"fused": fast, "unfused": slow}, "unfused") == "fused"


def test_recording_choices_sees_only_its_own_thread():
    """sk.sparsify records which backend ran a layer; another thread's sparse calls must not leak into it."""
    import threading

    from sparsekit.formats import BSR

    if not _dispatch.has_kernel("bsr_mm", "CPU"):
        pytest.skip("needs the CPU extension")
    w = BSR.from_dense(torch.randn(32, 32), (16, 16))
    x = torch.randn(4, 32)
    stop = threading.Event()

    def other():
        while not stop.is_set():
            _dispatch.choose("bsr", x, w, "reference")

    t = threading.Thread(target=other)
    t.start()
    try:
        with _dispatch.recording_choices() as seen:
            for _ in range(50):
                _dispatch.choose("bsr", x, w, "cpu")
    finally:
        stop.set()
        t.join()
    assert seen == ["cpu"] * 50


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["bsr", "nm"])
def test_cuda_graph_capture_of_the_triton_path(family):
    """The Triton kernels replay correctly from a CUDA graph (compiled by a warm-up call outside the capture, as
    graph capture requires); not skipped on failure: a Triton path that breaks under capture is a defect."""
    if sk.ops._dispatch.BACKENDS["triton"].environment_reasons():
        pytest.skip(f"triton cannot run here: {sk.ops._dispatch.BACKENDS['triton'].environment_reasons()}")
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(128, 256, generator=g)
    if family == "nm":
        dense = NM.prune(dense, 2, 4)
        w, op = NM.from_dense(dense, 2, 4), sk.ops.nm_linear
    else:
        dense = dense * (torch.rand(4, 8, generator=g) < 0.5).repeat_interleave(32, 0).repeat_interleave(32, 1)
        w, op = BSR.from_dense(dense, (32, 32)), sk.ops.bsr_linear
    w = w.to(device="cuda", dtype=torch.float16)
    x = torch.randn(16, 256, generator=g).to("cuda", torch.float16)
    op(x, w, backend="triton")             # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(x, w, backend="triton")
    x.copy_(torch.randn(16, 256, generator=g).to("cuda", torch.float16))    # replay reads the new input
    graph.replay()
    torch.cuda.synchronize()
    ref = F.linear(x.double(), dense.to(device="cuda", dtype=torch.float16).double())
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)

