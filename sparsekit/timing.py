"""Wall-clock timing for side-by-side comparisons (medians after warm-up; CUDA synchronised)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10, min_time_s: float = 0.0,
              device: torch.device | str | None = None) -> float:
    """Median milliseconds of fn() over `reps` runs (more if `min_time_s` is not reached), after `warmup` runs."""
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


def interleaved_samples_ms(fns: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10,
                           device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Milliseconds of every run of each fn, measured round-robin in the same loop so machine noise hits all of
    them alike (after `warmup` rounds; under no_grad; CUDA synchronised around each call)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        _sync(device)
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_median_ms(fns: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10,
                          device: torch.device | str | None = None) -> dict[str, float]:
    """Median ms of each fn from ``interleaved_samples_ms``."""
    return {k: statistics.median(v) for k, v in interleaved_samples_ms(fns, warmup, reps, device).items()}
