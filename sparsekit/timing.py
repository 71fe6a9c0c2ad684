"""Wall-clock timing for side-by-side comparisons (medians after warm-up; CUDA synchronised)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


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


def _calls_per_sample(fns: dict[str, Callable[[], object]], min_sample_ms: float,
                      device: torch.device | str | None) -> dict[str, int]:
    """How many back-to-back calls of each fn fill ``min_sample_ms`` (1 when a single call already does)."""
    if min_sample_ms <= 0:
        return {k: 1 for k in fns}
    out = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        out[k] = max(1, min(_MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_ms / max(ms, 1e-6))))
    return out


_MAX_CALLS_PER_SAMPLE = 1000


def interleaved_samples_ms(fns: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10,
                           device: torch.device | str | None = None,
                           min_sample_ms: float = 0.0) -> dict[str, list[float]]:
    """Milliseconds per call of each fn, measured round-robin in the same loop so machine noise hits all of
    them alike (after `warmup` rounds; under no_grad; CUDA synchronised around each sample).

    With ``min_sample_ms`` > 0, a fn whose single call is shorter than that is called back-to-back enough
    times to fill it and the sample is the mean per call (timeit-style): microsecond calls are then not
    dominated by timer and interpreter noise, and the operands stay cache-resident across the calls of one
    sample, for every candidate alike. 0 times single calls. Each round starts one fn later than the previous
    one, so that no fn always runs right after the same other one (whose cache footprint it would inherit)."""
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
        calls = _calls_per_sample(fns, min_sample_ms, device)
        keys = list(fns)
        for r in range(reps if keys else 0):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                fn, n = fns[k], calls[k]
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
