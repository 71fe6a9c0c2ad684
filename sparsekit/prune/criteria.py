"""Importance criteria: a registry from name to a scoring function.

A criterion scores one prunable module (``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``); higher means
more important.
It returns either

* element scores, a tensor of ``weight.shape`` (aggregated per block / channel by ``masks.unit_scores``,
  as a sum), or
* channel scores, a 1-D tensor of ``weight.shape[0]`` entries (one per output channel; usable only with
  ``granularity="channel"``) for criteria that are only defined per filter (e.g. geometric median).

A criterion with no ``needs`` is called ``fn(module)``. One that declares ``needs`` (see
``calibration.NEEDS``: ``"seed"``, ``"bn"``, ``"activations"``, ``"rank"``, ``"grads"``, ``"hessian"``,
``"consumer"``) is called ``fn(module, ctx)`` with a ``calibration.LayerContext``: the layer's name, the
granularity, a seed, and the statistics the pruner collected for it over ``calib`` with hooks. Needs other
than ``"seed"`` and ``"bn"`` make the criterion data-dependent (``calib`` is then required). ``data_dependent=True``
without ``needs`` means ``needs=("activations",)``.

Built-in criteria (each function's docstring names its paper; ``describe()`` lists them):

================  ==========  =================================================================
name              needs       what
================  ==========  =================================================================
magnitude         -           |w| (Han et al. 2015)
random            seed        seeded uniform scores (the baseline of every pruning paper)
l1 / l2           -           filter L1 / squared L2 norm (Li et al. 2017)
l1_mean           -           filter L1 norm / number of its weights (Salama et al. 2019, seed 003)
fpgm              -           sum of distances to the other filters (He et al. 2019); layer scope
mean_variance     -           mean/variance filter clustering (Gong et al. 2020); layer scope
bn_scale          bn          |gamma| of the following BatchNorm (Liu et al. 2017, network slimming)
apoz              activations 1 - average percentage of zeros (Hu et al. 2016)
mean_activation   activations mean activation (Molchanov et al. 2017)
entropy           activations entropy of the pooled activation (Luo & Wu 2017)
variance          activations activation variance (Polyak & Wolf 2015)
hrank             rank        average feature-map rank (Lin et al. 2020); layer scope
taylor            grads       first-order Taylor (g*w)^2 (Molchanov et al. 2019)
hessian           hessian     OBD diag-Fisher per element; HAP Hutchinson trace per channel
lasso             consumer    LASSO channel selection + least squares (He et al. 2017); layer scope
thinet            consumer    greedy next-layer reconstruction + least squares (Luo et al. 2017);
                              layer scope
================  ==========  =================================================================

``layer scope``: the scores rank filters within their layer only, so ``scope='global'`` is refused.

Scores are computed from ``module.weight`` as the forward pass sees it, i.e. *after* any mask already
applied, so pruned entries score 0 and iterative pruning is monotone.

Attention heads (channel pruning with group selection, ``Pruner``): criteria reading weights alone score an
``nn.MultiheadAttention``'s q / k / v in-projection rows as Linears; data-dependent criteria whose needs are
among ``activations``, ``rank``, ``grads``, ``hessian`` (and ``seed``) score its heads as the channels of a
"layer" whose weight is a per-head gate (ones, ``[heads, 1]``) on the heads' output before ``out_proj``
(``head_taps``): activation statistics of each head's output, the gradient / Hessian of its gate.

    @criteria.register("my_score", doc="What it is (Author et al. 2020)")
    def my_score(module): return module.weight.detach().abs()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .calibration import DATA_NEEDS, NEEDS

__all__ = ["Criterion", "register", "get", "available", "describe"]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion.

    ``name``; ``fn``; ``data_dependent`` (needs ``calib``); one-line ``doc`` with its paper; ``needs`` (the
    statistics ``fn(module, ctx)`` reads); ``reconstructs`` (after masking, the next layer is refitted by
    least squares); ``comparable`` (scores of different layers may share one global threshold).
    """

    name: str
    fn: Callable[..., Tensor]
    data_dependent: bool = False
    doc: str = ""
    needs: tuple[str, ...] = ()
    reconstructs: bool = False
    comparable: bool = True

    def score(self, module: nn.Module, ctx: object = None) -> Tensor:
        """Score ``module``; returns detached float scores of ``weight.shape`` or ``[out_channels]``."""
        weight = module.weight
        out = self.fn(module, ctx) if self.needs else self.fn(module)
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
             doc: str = "", needs: Iterable[str] | None = None, reconstructs: bool = False,
             comparable: bool = True) -> Callable:
    """Register ``fn`` under ``name``; without ``fn`` returns a decorator. Re-registering a name raises.

    ``needs``: statistics from ``calibration.NEEDS`` that ``fn(module, ctx)`` reads; ``data_dependent``
    follows from them (a need other than ``"bn"``), and ``data_dependent=True`` alone means
    ``needs=("activations",)``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(data_dependent, bool):
        raise TypeError(f"data_dependent must be a bool, got {data_dependent!r}")
    if needs is None:
        needs_t: tuple[str, ...] = ("activations",) if data_dependent else ()
    else:
        if isinstance(needs, str):
            needs = (needs,)
        needs_t = tuple(needs)
        bad = [x for x in needs_t if x not in NEEDS]
        if bad:
            raise ValueError(f"needs must name statistics from {NEEDS}, got {bad}")
    data_dependent = data_dependent or any(x in DATA_NEEDS for x in needs_t)

    def decorator(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not callable(f):
            raise TypeError(f"fn must be callable, got {type(f).__name__}")
        if name in _REGISTRY:
            raise ValueError(f"criterion {name!r} is already registered")
        _REGISTRY[name] = Criterion(name, f, data_dependent, doc or (f.__doc__ or "").strip().split("\n")[0],
                                    needs_t, bool(reconstructs), bool(comparable))
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


# the built-in criteria register themselves on import
from . import scores_activation, scores_gradient, scores_reconstruction, scores_weight  # noqa: E402,F401
