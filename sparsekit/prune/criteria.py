"""Importance criteria: a registry from name to a scoring function.

A criterion scores one prunable module (``nn.Linear`` / ``nn.Conv2d``); higher means more important.
It returns either

* element scores, a tensor of ``weight.shape`` (aggregated per block / channel by ``masks.unit_scores``,
  as a sum), or
* channel scores, a 1-D tensor of ``weight.shape[0]`` entries (one per output channel; usable only with
  ``granularity="channel"``) for criteria that are only defined per filter (e.g. geometric median).

Data-independent criteria are called ``fn(module)``; a criterion registered with ``data_dependent=True``
is called ``fn(module, stats)`` where ``stats`` holds the calibration statistics the pruner collected
for that module (collection arrives with the data-dependent criteria; see ``Pruner``).

Scores are computed from ``module.weight`` as the forward pass sees it, i.e. *after* any mask already
applied, so pruned entries score 0 and iterative pruning is monotone.

    @criteria.register("my_score", doc="What it is (Author et al. 2020)")
    def my_score(module): return module.weight.detach().abs()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Criterion", "register", "get", "available", "describe", "magnitude", "l1"]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``name``, its function, whether it needs data, a one-line ``doc``."""

    name: str
    fn: Callable[..., Tensor]
    data_dependent: bool = False
    doc: str = ""

    def score(self, module: nn.Module, stats: object = None) -> Tensor:
        """Score ``module``; returns detached float scores of ``weight.shape`` or ``[out_channels]``."""
        weight = module.weight
        out = self.fn(module, stats) if self.data_dependent else self.fn(module)
        if not isinstance(out, Tensor):
            raise TypeError(f"criterion {self.name!r} must return a Tensor, got {type(out).__name__}")
        if tuple(out.shape) not in (tuple(weight.shape), (weight.shape[0],)):
            raise ValueError(f"criterion {self.name!r} returned scores of shape {tuple(out.shape)}; expected "
                             f"the weight's shape {tuple(weight.shape)} (element scores) or "
                             f"({weight.shape[0]},) (one score per output channel)")
        out = out.detach()
        if not out.is_floating_point():
            out = out.to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"criterion {self.name!r} returned non-finite scores (nan/inf)")
        return out


_REGISTRY: dict[str, Criterion] = {}


def register(name: str, fn: Callable[..., Tensor] | None = None, *, data_dependent: bool = False,
             doc: str = "") -> Callable:
    """Register ``fn`` under ``name``; without ``fn`` returns a decorator. Re-registering a name raises."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(data_dependent, bool):
        raise TypeError(f"data_dependent must be a bool, got {data_dependent!r}")

    def decorator(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not callable(f):
            raise TypeError(f"fn must be callable, got {type(f).__name__}")
        if name in _REGISTRY:
            raise ValueError(f"criterion {name!r} is already registered")
        _REGISTRY[name] = Criterion(name, f, data_dependent, doc or (f.__doc__ or "").strip().split("\n")[0])
        return f

    return decorator if fn is None else decorator(fn)


def get(name: str | Criterion) -> Criterion:
    """The criterion registered as ``name`` (a ``Criterion`` passes through); unknown names raise
    ValueError listing the available ones."""
    if isinstance(name, Criterion):
        return name
    if not isinstance(name, str):
        raise TypeError(f"criterion must be a str (one of {available()}), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown criterion {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of every registered criterion, sorted."""
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    """Name -> one-line doc (with its paper) for every registered criterion."""
    return {n: _REGISTRY[n].doc for n in available()}


@register("magnitude", doc="|w| per element; low-magnitude weights go first (Han et al. 2015, "
                           "'Learning both Weights and Connections for Efficient Neural Networks')")
def magnitude(module: nn.Module) -> Tensor:
    """Absolute value of every weight."""
    return module.weight.detach().abs()


@register("l1", doc="L1 norm of each output channel/filter, sum of |w| (Li et al. 2017, "
                    "'Pruning Filters for Efficient ConvNets'); per element it equals magnitude")
def l1(module: nn.Module) -> Tensor:
    """Element scores |w|; summed per output channel by the granularity code they are the filter L1 norm."""
    return module.weight.detach().abs()
