"""Timing as CUDA-graph replays (sparsekit.timing.graph_replay_median_ms) and sk.sparsify(cuda_graphs=True).

On a CPU machine the graph machinery is replaced by a stand-in that records the captured calls and re-runs them on
replay (what a CUDA graph does, minus the GPU), so the bookkeeping is checked everywhere: warm-up before capture,
several calls per graph (fewer when their outputs are large), the time per call, the eager fallback. The tests
marked cuda run the real thing.
"""

import importlib
import time
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import timing

sparsify_mod = importlib.import_module("sparsekit.sparsify")    # (sk.sparsify is the function)


class _FakeGraph:
    capturing: "_FakeGraph | None" = None

    def __init__(self):
        self.calls = []

    def replay(self):
        for fn in self.calls:
            fn()


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's graph, stream and event API as plain Python: a capture records which fn ran."""
    @contextmanager
    def graph(g):
        _FakeGraph.capturing = g
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    @contextmanager
    def stream(_s):
        yield

    class _Stream:
        def wait_stream(self, _other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda _s: None)


def _recording(log, name, nbytes, sleep_s=0.0):
    def fn():
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.calls.append(fn)   # captured: runs again on every replay
            log.append((name, "capture"))
            return torch.empty(nbytes, dtype=torch.uint8)
        log.append((name, "run"))
        if sleep_s:
            time.sleep(sleep_s)
        return torch.empty(nbytes, dtype=torch.uint8)
    return fn


def test_graph_replay_warms_up_captures_several_calls_and_divides_by_them(fake_cuda):
    log = []
    fns = {"small": _recording(log, "small", 1024, sleep_s=0.002),
           "large": _recording(log, "large", 100 << 20, sleep_s=0.002)}   # 100 MiB out: 2 calls fit in 256 MiB
    t = timing.graph_replay_median_ms(fns, warmup=2, reps=3, calls_per_graph=5, max_graph_mib=256)
    captured = {k: sum(1 for n, what in log if n == k and what == "capture") for k in fns}
    assert captured == {"small": 5, "large": 2}
    first_capture = next(i for i, (_, what) in enumerate(log) if what == "capture")
    assert [n for n, what in log[:first_capture]] == ["small", "large"] * 2     # the warm-up, eager, before capture
    # each replay re-runs the captured calls (one warm replay + 3 timed): the per-call time is the sleep, not
    # the sleep times the calls in the graph
    assert sum(1 for n, what in log if n == "small" and what == "run") == 2 + 5 * (1 + 3)
    for k in fns:
        assert 1.5 < t[k] < 50, (k, t[k])


def test_a_failed_capture_names_the_fn_and_the_first_error(fake_cuda, monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "set_stream", restored.append)

    def syncs():
        if _FakeGraph.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return torch.ones(2)

    with pytest.raises(RuntimeError, match="capture of 'bad' failed: operation not permitted"):
        timing.graph_replay_median_ms({"bad": syncs}, warmup=1, reps=1)
    assert len(restored) == 1      # the caller's stream is put back


def test_graph_replay_checks_its_arguments(fake_cuda):
    with pytest.raises(ValueError, match="calls_per_graph"):
        timing.graph_replay_median_ms({"a": lambda: None}, calls_per_graph=0)
    assert timing.graph_replay_median_ms({}) == {}


def test_a_capture_failure_is_timed_eagerly_with_a_note(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sparsify_mod, "graph_replay_median_ms", refuse)
    notes = []
    t = sparsify_mod._median_ms({"dense": lambda: torch.ones(4) * 2}, reps=2, device=torch.device("cpu"),
                                cuda_graphs=True, notes=notes)
    assert set(t) == {"dense"} and t["dense"] > 0
    assert notes and "CUDA-graph capture failed" in notes[0] and "timed eagerly" in notes[0]


def _pruned_mlp(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    for lin in (model[0], model[2]):
        keep = (torch.rand(lin.out_features // 32, lin.in_features // 32) > 0.9)
        keep[0, 0] = True
        with torch.no_grad():
            lin.weight.mul_(keep.repeat_interleave(32, 0).repeat_interleave(32, 1))
    return model.to(device=device, dtype=dtype).eval()


def test_sparsify_cuda_graphs_needs_a_cuda_model_and_a_bool():
    model = _pruned_mlp()
    x = torch.randn(8, 256)
    with pytest.raises(ValueError, match=r"cuda_graphs=True .* CUDA device, got devices \['cpu'\]"):
        sk.sparsify(model, x, cuda_graphs=True, cache=False)
    with pytest.raises(ValueError, match=r"got devices \['none'\]"):     # no tensor anywhere
        sk.sparsify(nn.Sequential(nn.ReLU()), {"not_a_tensor": 1}, cuda_graphs=True, cache=False)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        sk.sparsify(model, x, cuda_graphs="yes", cache=False)


@pytest.mark.cuda
def test_graph_replay_times_real_cuda_calls():
    x = torch.randn(1024, 1024, device="cuda")
    t = timing.graph_replay_median_ms({"mm": lambda: x @ x, "add": lambda: x + 1}, warmup=2, reps=5)
    assert 0 < t["add"] < t["mm"]


@pytest.mark.cuda
def test_sparsify_with_cuda_graphs_on_a_gpu():
    model = _pruned_mlp("cuda", torch.float16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    fast, report = sk.sparsify(model, x, cuda_graphs=True, cache=False, reps=3)
    assert any("CUDA-graph replays" in n for n in report.notes)
    assert report.dense_ms is not None and report.sparse_ms is not None
    with torch.no_grad():
        torch.testing.assert_close(fast(x).float(), model(x).float(), rtol=2e-2, atol=2e-2)
    # the model runs under a CUDA graph as timed
    g = torch.cuda.CUDAGraph()
    with torch.no_grad():
        fast(x)
        with torch.cuda.graph(g):
            y = fast(x)
    g.replay()
    torch.testing.assert_close(y.float(), model(x).float(), rtol=2e-2, atol=2e-2)
