"""Pruning schedules: how much to prune at each ``pruner.step()``.

A schedule maps the step index ``t`` (0 for the first ``step()``) and the final ``sparsity`` to that
step's target. ``Pruner(schedule=...)`` takes

* ``None`` or ``"oneshot"``: ``OneShot()``, every step prunes to the final sparsity;
* ``Iterative(steps=k)``: k equal increments (``mode="linear"``), or k steps that each remove the same
  fraction of what is left (``mode="geometric"``, the lottery-ticket rounds of Frankle & Carbin 2019);
* ``AGP(steps=n, initial=0.0)``: Zhu & Gupta's automated gradual pruning (2017, 'To prune, or not to
  prune'), ``s_t = s_f + (s_i - s_f) * (1 - (t + 1) / n) ** 3``: fast at first, slow at the end. The paper
  counts n + 1 events from t0, the first pruning to ``s_i``; here the n steps are the events after it (with
  ``initial=0``, the default, that first event prunes nothing and the two agree), so ``initial`` is where the
  curve starts, above every step's target;
* a callable ``schedule(t) -> target`` (kept for custom schedules).

After its last step a schedule stays at the final sparsity (``done(t)`` is True from then on).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule", "OneShot", "Iterative", "AGP", "resolve"]


def _check_steps(steps: object) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int >= 1, got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


class Schedule:
    """Base class: ``target(t, final)`` and ``steps`` (number of pruning steps until ``final``)."""

    steps: int = 1

    def target(self, t: int, final: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def done(self, t: int) -> bool:
        """True once ``t`` steps have been taken and the final sparsity is reached."""
        return t >= self.steps


@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune to the final sparsity in one step."""

    steps: int = 1

    def __post_init__(self) -> None:
        if self.steps != 1 or isinstance(self.steps, bool):
            raise ValueError(f"OneShot has steps=1, got {self.steps!r} (Iterative(steps=k) prunes in k steps)")

    def target(self, t: int, final: float) -> float:
        return final


@dataclass(frozen=True)
class Iterative(Schedule):
    """``steps`` pruning steps to the final sparsity; ``mode`` "linear" (equal increments of sparsity) or
    "geometric" (each step removes the same fraction of the remaining weights)."""

    steps: int = 5
    mode: str = "linear"

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.mode not in ("linear", "geometric"):
            raise ValueError(f"mode must be 'linear' or 'geometric', got {self.mode!r}")

    def target(self, t: int, final: float) -> float:
        frac = min(t + 1, self.steps) / self.steps
        if self.mode == "linear":
            return final * frac
        return 1.0 - (1.0 - final) ** frac


@dataclass(frozen=True)
class AGP(Schedule):
    """Zhu & Gupta 2017 cubic schedule: ``final + (initial - final) * (1 - (t + 1) / steps) ** 3``."""

    steps: int = 10
    initial: float = 0.0

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if not isinstance(self.initial, (int, float)) or isinstance(self.initial, bool) \
                or not 0.0 <= self.initial < 1.0:
            raise ValueError(f"initial must be a float in [0, 1), got {self.initial!r}")

    def target(self, t: int, final: float) -> float:
        if self.initial > final:
            raise ValueError(f"AGP initial={self.initial} is above the final sparsity {final}")
        frac = min(t + 1, self.steps) / self.steps
        return final + (self.initial - final) * (1.0 - frac) ** 3


def resolve(schedule: object) -> object:
    """``None``/"oneshot" -> ``OneShot()``; a ``Schedule`` or a callable passes through; else TypeError."""
    if schedule is None:
        return OneShot()
    if isinstance(schedule, str):
        if schedule.lower().replace("-", "").replace("_", "") in ("oneshot", "once"):
            return OneShot()
        raise ValueError(f"schedule must be 'oneshot', a Schedule (Iterative(steps=k), AGP(steps=n)) or a "
                         f"callable step -> sparsity, got {schedule!r}")
    if isinstance(schedule, Schedule) or callable(schedule):
        return schedule
    raise TypeError(f"schedule must be None, 'oneshot', a Schedule (Iterative(steps=k), AGP(steps=n)) or a "
                    f"callable step -> sparsity, got {type(schedule).__name__} {schedule!r}")
