"""Timing launch configs: live autotuning (opt-in) and the timer bench/tune_triton.py shares.

``SPARSEKIT_TRITON_AUTOTUNE=1`` (also true/on/yes): the first launch of each key (kernel family, device, dtype,
block / n:m shape, M bucket, ...) times every candidate config of ``_configs.*_candidates`` on that launch's real
inputs and keeps the fastest in memory for the process (``CACHE``; ``clear()`` forgets). Every candidate is
compiled on first use, so a new key costs seconds to a minute; the measured tables (``_configs.tuned_tables``,
written by bench/tune_triton.py) are the way to ship tuned configs. Unset (the default): the launchers take the
tables' config and nothing here runs.

Not measured (the table's config is used, and not remembered) while the current CUDA stream captures a graph:
timing synchronises. A candidate that fails (compilation out of resources, ...) is skipped; if all fail, the
table's config is used.

Imports torch only at import; triton (``triton.testing.do_bench``) when timing on a GPU.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["ENV", "enabled", "pick", "time_config", "best", "CACHE", "clear"]

ENV = "SPARSEKIT_TRITON_AUTOTUNE"
_ON = ("1", "true", "on", "yes")

Cfg = TypeVar("Cfg")
CACHE: dict[tuple, object] = {}  # key -> the fastest config measured for it


def enabled() -> bool:
    """True when SPARSEKIT_TRITON_AUTOTUNE asks for live autotuning (read on every launch: cheap)."""
    return os.environ.get(ENV, "").strip().lower() in _ON


def clear() -> None:
    """Forget every config chosen by live autotuning."""
    CACHE.clear()


def time_config(
    run: Callable[[], object], device: torch.device, warmup_ms: float = 5.0, rep_ms: float = 20.0, cpu_reps: int = 3
) -> float:
    """Milliseconds one ``run()`` takes: ``triton.testing.do_bench`` on CUDA (median over ``rep_ms`` of runs, L2
    flushed between them, after ``warmup_ms`` of warm-up: the first call compiles), ``time.perf_counter`` around
    ``cpu_reps`` calls after one warm-up elsewhere (the Triton interpreter)."""
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            return float(triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    run()
    times = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def best(
    candidates: Sequence[Cfg],
    run: Callable[[Cfg], object],
    device: torch.device,
    timer: Callable[[Callable[[], object], torch.device], float] | None = None,
) -> tuple[Cfg | None, dict[Cfg, float], dict[Cfg, str]]:
    """(fastest config or None when none ran, {config: ms}, {config: error}) over ``candidates``; ``run(cfg)``
    launches once with ``cfg``; ``timer`` defaults to time_config. Ties keep the earlier candidate (the table's
    own choice comes first)."""
    timer = timer or time_config
    ms: dict = {}
    errors: dict = {}
    for cfg in candidates:
        try:
            ms[cfg] = timer(lambda cfg=cfg: run(cfg), device)
        except Exception as exc:  # e.g. out of shared memory / registers for this tile on this GPU
            errors[cfg] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    timed = [c for c in candidates if c in ms]
    return (min(timed, key=ms.__getitem__) if timed else None), ms, errors


def pick(
    key: tuple,
    default: Cfg,
    candidates: Callable[[], Sequence[Cfg]],
    run: Callable[[Cfg], object],
    device: torch.device,
) -> Cfg:
    """The config a launcher uses: ``default`` (the table's) unless live autotuning is on, then the fastest of
    ``candidates()`` for ``key``, timed once on this launch's inputs through ``run(cfg)`` and remembered."""
    if not enabled():
        return default
    hit = CACHE.get(key)
    if hit is not None:
        return hit  # type: ignore[return-value]
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_current_stream_capturing():
                return default
    found, _ms, _errors = best(list(candidates()), run, device)
    chosen = default if found is None else found
    CACHE[key] = chosen
    return chosen
