"""Wall-clock timing for side-by-side comparisons (medians after warm-up; CUDA synchronised)."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10, min_time_s: float = 0.0,
              device: torch.device | str | None = None) -> float:
    """Median milliseconds of fn() over `reps` runs (more if `min_time_s` is not reached, up to 10 * reps runs),
    after `warmup` runs."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps!r}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < reps or time.perf_counter() - start_all < min_time_s:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 10 * reps:
                break
    return statistics.median(times)


def calls_per_sample(fastest_ms: float, min_sample_ms: float) -> int:
    """Back-to-back calls per sample for every candidate of a comparison: enough for the fastest one's calls to
    fill ``min_sample_ms`` (1 when ``min_sample_ms`` is 0 or its single call already does)."""
    if min_sample_ms <= 0:
        return 1
    return max(1, min(_MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_ms / max(fastest_ms, 1e-6))))


def _probe_ms(fns: dict[str, Callable[[], object]], device: torch.device | str | None) -> dict[str, float]:
    """Each fn's time per call, the median of three single calls (one call can be an outlier)."""
    out = {}
    for k, fn in fns.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out[k] = statistics.median(times)
    return out


_MAX_CALLS_PER_SAMPLE = 1000


def interleaved_samples_ms(fns: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10,
                           device: torch.device | str | None = None,
                           min_sample_ms: float = 0.0) -> dict[str, list[float]]:
    """Milliseconds per call of each fn, measured round-robin in the same loop so machine noise hits all of
    them alike (after `warmup` rounds; under no_grad; CUDA synchronised around each sample).

    With ``min_sample_ms`` > 0 and the fastest fn's single call shorter than that, every fn is called
    back-to-back the same number of times per sample (``calls_per_sample``: enough for the fastest to fill it)
    and the sample is the mean per call (timeit-style): microsecond calls are then not dominated by timer and
    interpreter noise, and every candidate is measured the same way, its operands cache-resident across the calls
    of a sample (a count per fn would give the fast ones warm repeats and the slow ones cold single calls). 0
    times single calls. Each round starts one fn later than the previous one, so that no fn always runs right
    after the same other one (whose cache footprint it would inherit)."""
    if not math.isfinite(min_sample_ms) or min_sample_ms < 0:
        raise ValueError(f"min_sample_ms must be a finite number >= 0, got {min_sample_ms!r}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps!r}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        _sync(device)
        n = calls_per_sample(min(_probe_ms(fns, device).values()), min_sample_ms) if fns and min_sample_ms > 0 \
            else 1
        keys = list(fns)
        for r in range(reps if keys else 0):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                fn = fns[k]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                _sync(device)
                times[k].append((time.perf_counter() - t0) * 1e3 / n)
    return times


def interleaved_median_ms(fns: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10,
                          device: torch.device | str | None = None, min_sample_ms: float = 0.0) -> dict[str, float]:
    """Median ms of each fn from ``interleaved_samples_ms``."""
    return {k: statistics.median(v)
            for k, v in interleaved_samples_ms(fns, warmup, reps, device, min_sample_ms).items()}


def _output_bytes(out: object) -> int:
    """Bytes of the tensors in a call's output (a tensor, or any pytree of them)."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def graph_replay_median_ms(fns: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10,
                           calls_per_graph: int = 20, max_graph_mib: int = 256,
                           device: torch.device | str | None = None) -> dict[str, float]:
    """Median ms per call of each CUDA fn when it runs inside a CUDA graph: what it costs in a model run under CUDA
    graphs (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.make_graphed_callables``), where the host's
    per-call work (Python, argument checks, kernel launches) is gone and only the GPU time is left.

    Each fn runs ``warmup`` times eagerly on a side stream (backends chosen, kernels compiled: nothing can be
    measured or compiled during a capture), then ``calls_per_graph`` back-to-back calls of it (fewer when their
    outputs would pass ``max_graph_mib`` MiB: the graph keeps each one) are captured into one graph, so that even a
    microsecond kernel's replay is not a single launch waiting on the host. The graphs are replayed round-robin,
    ``reps`` rounds, CUDA events around each replay; a sample is the replay's time / its calls. ``device``: the CUDA
    device the fns run on (None: the current one). A fn that cannot be captured (it synchronises, or allocates
    outside the graph's pool) raises a RuntimeError naming it and the capture's first error, with the caller's
    stream restored."""
    if reps < 1 or warmup < 1 or calls_per_graph < 1 or max_graph_mib < 1:
        raise ValueError(f"warmup, reps, calls_per_graph and max_graph_mib must be >= 1, got {warmup}, {reps}, "
                         f"{calls_per_graph}, {max_graph_mib}")
    if not fns:
        return {}
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        return _graph_replay(fns, warmup, reps, calls_per_graph, max_graph_mib)


def _graph_replay(fns: dict[str, Callable[[], object]], warmup: int, reps: int, calls_per_graph: int,
                  max_graph_mib: int) -> dict[str, float]:
    graphs: dict[str, tuple[torch.cuda.CUDAGraph, int]] = {}
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        out_bytes = {}
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for k, fn in fns.items():
                    out_bytes[k] = _output_bytes(fn())
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for k, fn in fns.items():
            calls = max(1, min(calls_per_graph, (max_graph_mib << 20) // max(1, out_bytes[k])))
            graph = torch.cuda.CUDAGraph()
            caller = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        fn()
            except RuntimeError as exc:
                # a failed capture's exit raises again (invalidated capture) before it restores the stream
                torch.cuda.set_stream(caller)
                first = exc.__context__ if isinstance(exc.__context__, Exception) else exc
                raise RuntimeError(f"CUDA-graph capture of {k!r} failed: {first}") from exc
            graphs[k] = (graph, calls)
        for graph, _ in graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {k: [] for k in fns}
        keys = list(fns)
        for r in range(reps):
            events = []
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                graph, calls = graphs[k]
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                events.append((k, start, end, calls))
            torch.cuda.synchronize()
            for k, start, end, calls in events:
                times[k].append(start.elapsed_time(end) / calls)
    return {k: statistics.median(v) for k, v in times.items()}
