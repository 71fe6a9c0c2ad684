"""Side-by-side timing of candidates: interleaved medians after warm-up, with a per-config time budget.

CPU: the method of ``sparsekit.timing.interleaved_median_ms`` (perf_counter around each sample, candidates
round-robin in one loop so machine noise hits all of them alike, under no_grad, after warm-up rounds; a call
shorter than ``min_sample_ms`` makes every candidate's calls repeat back-to-back within their samples, the same
number of times), keeping the samples so the spread
can be reported too (``noise_pct`` = interquartile range / median). CUDA: the same
round-robin with CUDA events around each call and an L2 flush before it, or ``triton.testing.do_bench``
(median) per candidate with ``timer="do_bench"``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from ..timing import calls_per_sample, interleaved_samples_ms

__all__ = ["TIMERS", "CUDA_TIMERS", "time_candidates"]

TIMERS = ("auto", "interleaved", "events", "do_bench")
CUDA_TIMERS = ("events", "do_bench")   # these need device="cuda"


def _perf_counter_interleaved(fns: dict[str, Callable[[], object]], warmup: int, reps: int,
                              device: str | None = None, min_sample_ms: float = 0.0) -> dict[str, list[float]]:
    return interleaved_samples_ms(fns, warmup=warmup, reps=reps, device=device, min_sample_ms=min_sample_ms)


def _events_interleaved(fns: dict[str, Callable[[], object]], warmup: int, reps: int,
                        flush_mib: int = 256) -> dict[str, list[float]]:
    flush = torch.empty(flush_mib * 2**20 // 4, dtype=torch.float32, device="cuda")
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        torch.cuda.synchronize()
        for _ in range(reps):
            events = []
            for k, fn in fns.items():
                flush.zero_()   # cold L2, as triton.testing.do_bench does
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((k, start, end))
            torch.cuda.synchronize()
            for k, start, end in events:
                times[k].append(start.elapsed_time(end))
    return times


def _do_bench(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    from triton.testing import do_bench

    with torch.no_grad():
        return {k: float(do_bench(fn, warmup=max(1, warmup), rep=max(1, reps), return_mode="median"))
                for k, fn in fns.items()}


def _spread_pct(samples: list[float]) -> float | None:
    """Interquartile range as % of the median (None with fewer than 4 samples)."""
    if len(samples) < 4:
        return None
    q = statistics.quantiles(samples, n=4)
    med = statistics.median(samples)
    return 100.0 * (q[2] - q[0]) / med if med > 0 else None


def time_candidates(fns: dict[str, Callable[[], object]], device: str = "cpu", timer: str = "auto",
                    warmup: int = 3, min_reps: int = 5, max_reps: int = 30,
                    budget_s: float = 1.0, min_sample_ms: float = 0.0
                    ) -> tuple[dict[str, float], dict[str, float | None], int]:
    """Median ms of each candidate, measured in the same loop; returns (medians, noise_pct, reps used).

    Reps adapt to the budget: one measured round after warm-up gives the round time, then
    clamp(budget_s / round_time, min_reps, max_reps) rounds are timed. noise_pct is the interquartile range of
    a candidate's samples as % of its median. ``min_sample_ms`` (timer "interleaved" only) repeats shorter
    calls back-to-back within one sample (see ``sparsekit.timing.interleaved_samples_ms``). With
    timer="do_bench", do_bench's own defaults are used (25 ms warm-up, 100 ms of reps) and noise_pct is None.
    """
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    if not fns:
        return {}, {}, 0
    if timer == "auto":
        timer = "events" if device == "cuda" else "interleaved"
    if timer in CUDA_TIMERS and device != "cuda":
        raise ValueError(f"timer={timer!r} needs device='cuda', got device={device!r}")
    if timer == "do_bench":
        return _do_bench(fns, warmup=25, reps=100), {k: None for k in fns}, 0
    if timer == "events":
        run = _events_interleaved
    else:
        run = lambda f, warmup, reps: _perf_counter_interleaved(f, warmup, reps, device=device,   # noqa: E731
                                                                min_sample_ms=min_sample_ms)
    first = run(fns, warmup=warmup, reps=1)
    per_call = {k: v[0] for k, v in first.items()}
    calls = calls_per_sample(min(per_call.values()), min_sample_ms) if timer == "interleaved" else 1
    round_s = calls * sum(per_call.values()) / 1e3      # (every candidate makes ``calls`` calls per sample)
    reps = max(min_reps, min(max_reps, math.ceil(budget_s / max(round_s, 1e-9))))
    samples = run(fns, warmup=0, reps=reps)
    return ({k: statistics.median(v) for k, v in samples.items()}, {k: _spread_pct(v) for k, v in samples.items()},
            reps)
