"""Search of per-layer channel counts under a budget: ABCPruner (Lin et al. 2020, 'Channel Pruning via
Automatic Structure Search'; seed 000, sec. 2.2).

Instead of choosing *which* channels matter, the artificial bee colony searches *how many* each layer
keeps. As in the paper the search space is shrunk to ``choices`` (fractions of each layer's channels), a
candidate is a vector of choice indices, and its fitness is the model's quality on calibration data with
the channels of lowest L1 norm masked to those widths, and every member of a removed channel with them (its
BatchNorm's scale and shift, the next layer's columns: the network scored is the pruned one; optionally after
a short ``finetune``). The best candidate evaluated is returned, even if the colony later abandons it. Candidates
over the budget (``"flops"`` or ``"params"`` kept, as a fraction of dense, counted after physical removal:
``prune.cost``) are repaired by narrowing random layers until they fit.

    result = abc_search(model, x, calib, budget=0.5, metric="flops")
    result.widths      # {layer: channels}, apply with e.g. per-layer Pruners or masks.layer_mask
"""

from __future__ import annotations

import contextlib
import copy
import math
import random as _random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks as _masks
from ..calibration import split_batch
from ..chains import run_model, trace_events
from ..compact import keep_from_masks, member_tensor_masks
from ..cost import model_cost
from ..graph import DependencyGraph, GraphError

__all__ = ["SearchResult", "abc_search", "width_masks", "calib_fitness"]

CHOICES = tuple(i / 10 for i in range(1, 11))


@dataclass
class SearchResult:
    """Best ``widths`` found, its ``fitness`` and ``cost`` fraction, and ``history`` (best per cycle)."""

    widths: dict[str, int]
    fitness: float
    cost: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0


def width_masks(model: nn.Module, widths: dict[str, int]) -> dict[str, Tensor]:
    """Channel keep-masks keeping each layer's ``widths[name]`` filters of largest L1 norm."""
    modules = dict(model.named_modules())
    out = {}
    for name, k in widths.items():
        w = modules[name].weight.detach()
        out[name] = _masks.layer_mask(w.abs(), 1.0 - k / w.shape[0] if k < w.shape[0] else 0.0, "channel")
    return out


@contextlib.contextmanager
def _training_flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit (also on an exception): per module, not one
    ``model.train(mode)``, so a model with some submodules frozen in eval mode gets back exactly its own flags."""
    modes = {mod: mod.training for mod in model.modules()}
    try:
        yield
    finally:
        for mod, mode in modes.items():
            mod.training = mode


@torch.no_grad()
def calib_fitness(model: nn.Module, calib: Iterable[Any]) -> float:
    """Accuracy on ``(input, target)`` pairs minus 1e-3 x mean cross-entropy (a tie-breaker), in eval mode;
    the model's training flags are restored afterwards."""
    correct = total = 0
    loss = 0.0
    with _training_flags_kept(model):
        model.eval()
        for i, item in enumerate(calib):
            x, y = split_batch(item, i)
            if y is None:
                raise ValueError(f"calib[{i}] must be an (input, target) pair for the default fitness")
            out = run_model(model, x)
            correct += int((out.argmax(-1) == y).sum())
            total += int(y.numel())
            loss += float(F.cross_entropy(out, y, reduction="sum"))
    return correct / max(1, total) - 1e-3 * loss / max(1, total)


def abc_search(model: nn.Module, example_inputs: Any, calib: Sequence[Any], budget: float, *,
               metric: str = "flops", layers: Iterable[str] | None = None, choices: Sequence[float] = CHOICES,
               colony: int = 6, cycles: int = 6, limit: int = 3, seed: int = 0,
               fitness: Callable[[nn.Module, Sequence[Any]], float] | None = None,
               finetune: Callable[[nn.Module], None] | None = None) -> SearchResult:
    """Artificial-bee-colony search of per-layer widths keeping at most ``budget`` of the ``metric``.

    ``layers``: default every Linear/Conv2d except the last to run (the classifier). ``fitness(model,
    calib)`` defaults to ``calib_fitness``; ``finetune(model)`` (optional) trains a masked copy before it is
    scored, as ABCPruner does for a few epochs. ``colony`` food sources, ``cycles`` rounds of employed,
    onlooker and scout bees; a source not improved ``limit`` times is abandoned. Deterministic for a seed.
    Every module's ``training`` flag is restored after each candidate is scored (also when scoring raises).
    """
    if metric not in ("flops", "params"):
        raise ValueError(f"metric must be 'flops' or 'params', got {metric!r}")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1] of the dense {metric}, got {budget!r}")
    if any(_masks.is_masked(m) for m in model.modules()):
        raise ValueError("model is already masked: search widths on an unpruned model")
    choices = sorted(float(c) for c in choices)
    if not choices or choices[0] <= 0 or choices[-1] > 1:
        raise ValueError(f"choices must be fractions in (0, 1], got {choices}")
    calib = list(calib)
    fitness = calib_fitness if fitness is None else fitness
    events = trace_events(model, example_inputs)
    modules = dict(model.named_modules())
    order = [ev.name for ev in events if ev.kind == "module" and isinstance(ev.module, _masks.PRUNABLE)]
    names = order[:-1] if layers is None else list(layers)
    for n in names:
        if n not in modules or not isinstance(modules[n], _masks.PRUNABLE):
            raise ValueError(f"layers names {n!r}, which is not an nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d of "
                             "model")
    channels = {n: modules[n].weight.shape[0] for n in names}
    dense = model_cost(model, example_inputs, masks={}, events=events)[metric]
    rng = _random.Random(seed)
    top = len(choices) - 1

    def widths_of(vec: list[int]) -> dict[str, int]:
        return {n: max(1, round(choices[v] * channels[n])) for n, v in zip(names, vec)}

    def cost_of(vec: list[int]) -> float:
        masks = width_masks(model, widths_of(vec))
        return model_cost(model, example_inputs, masks=masks, events=events)[metric] / dense

    def repair(vec: list[int]) -> list[int]:
        vec = list(vec)
        while cost_of(vec) > budget + 1e-12:
            movable = [i for i, v in enumerate(vec) if v > 0]
            if not movable:
                raise ValueError(f"budget={budget} is below the smallest network the choices allow "
                                 f"({cost_of(vec):.3f} of the dense {metric})")
            vec[rng.choice(movable)] -= 1
        return vec

    evaluations = 0
    try:        # to mask every member of a removed channel (a BN after it would output its shift instead of 0)
        graph = DependencyGraph.build(model, example_inputs)
    except GraphError:
        graph = None        # (untraceable: the producers' rows alone)
    best: dict[str, Any] = {"fit": float("-inf"), "vec": None}

    def evaluate(vec: list[int]) -> float:
        nonlocal evaluations
        evaluations += 1
        masks = width_masks(model, widths_of(vec))
        target = copy.deepcopy(model) if finetune is not None else model
        target_modules = dict(target.named_modules())
        # a fitness may switch the model to eval mode (calib_fitness restores it, a user's may not): every
        # candidate starts from, and the search returns, the model's own flags
        with _training_flags_kept(model):
            try:
                for n, mk in masks.items():
                    _masks.apply_mask(target_modules[n], mk, _masks.as_2d(mk).any(1))
                if graph is not None:
                    keep = keep_from_masks(target, graph, allow_empty=True)
                    for n, tensors in member_tensor_masks(graph, keep, allow_empty=True).items():
                        for t, mk in tensors.items():
                            _masks.apply_tensor_mask(target_modules[n], t, mk)
                if finetune is not None:
                    finetune(target)
                f = float(fitness(target, calib))
            finally:
                if target is model:
                    _masks.remove_masks(model)
        if f > best["fit"]:
            best.update(fit=f, vec=list(vec))
        return f

    foods = [repair([rng.randint(0, top) for _ in names]) for _ in range(colony)]
    fits = [evaluate(f) for f in foods]
    trials = [0] * colony
    history: list[float] = []

    def neighbour(i: int) -> None:
        j = rng.randrange(len(names))
        k = rng.choice([x for x in range(colony) if x != i]) if colony > 1 else i
        vec = list(foods[i])
        phi = rng.uniform(-1.0, 1.0)
        vec[j] = min(top, max(0, round(vec[j] + phi * (vec[j] - foods[k][j])) + rng.choice((-1, 1))))
        vec = repair(vec)
        f = evaluate(vec)
        if f > fits[i]:
            foods[i], fits[i], trials[i] = vec, f, 0
        else:
            trials[i] += 1

    for _ in range(cycles):
        for i in range(colony):                       # employed bees
            neighbour(i)
        finite = [f for f in fits if math.isfinite(f)]       # a NaN / -inf fitness draws (almost) no onlooker,
        lo = min(finite, default=0.0)                        # a +inf one all of them
        weights = ([1.0 if f == math.inf else 1e-6 for f in fits] if math.inf in fits else
                   [f - lo + 1e-6 if math.isfinite(f) else 1e-6 for f in fits])
        for _ in range(colony):                       # onlooker bees
            neighbour(rng.choices(range(colony), weights=weights)[0])
        for i in range(colony):                       # scout bees
            if trials[i] > limit:
                foods[i] = repair([rng.randint(0, top) for _ in names])
                fits[i], trials[i] = evaluate(foods[i]), 0
        history.append(best["fit"])
    if best["vec"] is None:
        raise ValueError(f"fitness gave no comparable value for any of the {evaluations} candidates (NaN or -inf "
                         "every time): check the fitness function and calib")
    return SearchResult(widths=widths_of(best["vec"]), fitness=best["fit"], cost=cost_of(best["vec"]),
                        history=history, evaluations=evaluations)
