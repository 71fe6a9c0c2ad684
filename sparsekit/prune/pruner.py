"""``Pruner``: score, select and apply masks to a model's ``nn.Linear`` / ``nn.Conv2d`` layers."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import criteria as _criteria
from . import masks as _masks

__all__ = ["Pruner", "SCOPES", "check_example_inputs", "run_example", "execution_order"]

SCOPES = ("layer", "global")


def check_example_inputs(example_inputs: Any) -> None:
    """Raise TypeError unless ``example_inputs`` is a Tensor, a tuple/list (positional) or a dict (kwargs)."""
    if not isinstance(example_inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError(f"example_inputs must be a Tensor, a tuple/list of positional args or a dict of "
                        f"keyword args, got {type(example_inputs).__name__}")


def run_example(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on ``example_inputs``: a Tensor, a tuple/list of positional args or a dict of kwargs."""
    check_example_inputs(example_inputs)
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


def execution_order(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the prunable modules in the order their last call happens during one forward pass.

    Runs under ``torch.no_grad`` in eval mode (no BN statistics updated, no dropout) and restores every
    module's training flag afterwards.
    """
    check_example_inputs(example_inputs)
    names = {id(mod): name for name, mod in model.named_modules() if isinstance(mod, _masks.PRUNABLE)}
    calls: list[str] = []
    hooks = [mod.register_forward_hook(lambda mod, _i, _o: calls.append(names[id(mod)]))
             for mod in model.modules() if id(mod) in names]
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            try:
                run_example(model, example_inputs)
            except Exception as e:
                raise ValueError(f"example_inputs could not be run through the model ({type(e).__name__}: "
                                 f"{e}); pass what model(...) accepts") from e
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    last = {name: i for i, name in enumerate(calls)}
    return sorted(last, key=last.__getitem__)


class Pruner:
    """Prune a model's ``nn.Linear`` and ``nn.Conv2d`` layers with masks (reversible parametrizations).

    Args:
        model: the ``nn.Module`` to prune (modified in place by ``step``).
        example_inputs: what ``model(...)`` accepts: a Tensor, a tuple/list of positional args, or a dict of
            keyword args. Run once (eval mode, no grad) to find the layers' execution order.
        criterion: a name from ``criteria.available()`` (``"magnitude"``, ``"l1"``) or a ``Criterion``.
        granularity: ``"element"`` | ``"block"`` (``block=(bn, bk)`` tiles of the 2-D weight
            ``[out, in*kh*kw]``) | ``"nm"`` (keep ``n`` of every ``m`` along the input dim; ``sparsity`` must
            equal ``1 - n/m``) | ``"channel"`` (whole output channels, bias entry included; ``sparsity`` is
            the fraction of channels removed).
        scope: ``"layer"``: every layer loses exactly ``floor(sparsity * units)`` units. ``"global"``: one
            threshold over all layers' units (granularity ``"element"`` or ``"block"`` for now).
        sparsity: final target in [0, 1).
        ignore: modules or module names (a container covers every layer inside it) left unpruned. For
            ``granularity="channel"`` with ``ignore=None`` the model's final layer (the last prunable module
            to run on ``example_inputs``, normally the classifier) is left out; pass ``ignore=[]`` to
            prune it too.
        calib: calibration data for data-dependent criteria (none registered yet; stored for them).
        schedule: ``None`` (one-shot: every ``step()`` prunes to ``sparsity``) or a callable
            ``schedule(step_index) -> target sparsity`` with ``step_index`` counting ``step()`` calls from 0.
        block, n, m: pattern parameters for ``"block"`` and ``"nm"``.

    ``step()`` computes masks for the current target and applies them at once. Units removed by an earlier
    step are scored lowest, so they stay removed while the target does not decrease. Nothing is random:
    results depend only on the model's weights (ties go to the lower index).
    """

    def __init__(self, model: nn.Module, example_inputs: Any,
                 criterion: str | _criteria.Criterion = "magnitude", granularity: str = "element",
                 scope: str = "layer", sparsity: float = 0.5,
                 ignore: Iterable[nn.Module | str] | nn.Module | str | None = None, calib: Any = None,
                 schedule: Callable[[int], float] | None = None, block: int | tuple[int, int] = (32, 32),
                 n: int = 2, m: int = 4) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_example_inputs(example_inputs)
        self.model = model
        self.example_inputs = example_inputs
        self.criterion = _criteria.get(criterion)
        self.granularity = _masks.check_granularity(granularity)
        if not isinstance(scope, str):
            raise TypeError(f"scope must be a str, one of {SCOPES}, got {type(scope).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.sparsity = _masks.check_sparsity(sparsity)
        self.block = _masks.check_block(block)
        self.n, self.m = _masks.check_nm(n, m)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be None or a callable step_index -> sparsity, got "
                            f"{type(schedule).__name__} {schedule!r}")
        self.schedule = schedule
        self.calib = calib
        self._check_combination()
        if self.criterion.data_dependent:
            if calib is None:
                raise ValueError(f"criterion {self.criterion.name!r} is data-dependent: pass calib=<batches>")
            raise NotImplementedError(f"criterion {self.criterion.name!r} is data-dependent; calibration "
                                      "statistics arrive with the data-dependent criteria")

        executed = execution_order(model, example_inputs)
        modules = dict(model.named_modules())
        unexecuted = [k for k, v in modules.items() if isinstance(v, _masks.PRUNABLE) and k not in executed]
        order = executed + unexecuted
        if ignore is None and self.granularity == "channel" and executed:
            ignore = [executed[-1]]  # the classifier: its outputs are the model's outputs
        self.ignored = self._resolve_ignore(ignore, modules)
        self.layers: dict[str, nn.Module] = {k: modules[k] for k in order if k not in self.ignored}
        if not self.layers:
            raise ValueError("no nn.Linear / nn.Conv2d left to prune in model (after ignore="
                             f"{sorted(self.ignored)})")
        for name, mod in self.layers.items():
            _masks.check_layer(tuple(mod.weight.shape), self.granularity, block=self.block, n=self.n,
                               m=self.m, name=name)
        self._masks: dict[str, Tensor] = {}
        self._target = 0.0
        self._steps = 0

    # ------------------------------------------------------------------------------------ validation
    def _check_combination(self) -> None:
        g, s = self.granularity, self.scope
        if g == "nm":
            implied = 1.0 - self.n / self.m
            if abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"granularity='nm' with n={self.n}, m={self.m} has sparsity {implied:g}; "
                                 f"got sparsity={self.sparsity!r}. Pass sparsity={implied:g} or change n/m")
            if self.schedule is not None:
                raise ValueError("granularity='nm' fixes the pattern in one step; use schedule=None")
        if s == "global" and g not in ("element", "block"):
            reason = ("n:m keeps n of every m in each group, so one global threshold has no meaning"
                      if g == "nm" else "channel scores must be compared as coupled groups, which arrives "
                      "with the dependency graph; use scope='layer'")
            raise ValueError(f"scope='global' with granularity={g!r} is not supported: {reason}")

    def _resolve_ignore(self, ignore: Any, modules: dict[str, nn.Module]) -> set[str]:
        if ignore is None:
            return set()
        if isinstance(ignore, (nn.Module, str)):
            ignore = [ignore]
        if not isinstance(ignore, Iterable):
            raise TypeError(f"ignore must be None or a list of modules / module names, "
                            f"got {type(ignore).__name__}")
        by_id = {id(mod): name for name, mod in modules.items()}
        out: set[str] = set()
        for i, item in enumerate(ignore):
            if isinstance(item, str):
                if item not in modules:
                    close = difflib.get_close_matches(item, [k for k in modules if k], n=3)
                    raise ValueError(f"ignore[{i}] = {item!r} is not a module name in model"
                                     + (f"; did you mean {close}?" if close else ""))
                prefix = item
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"ignore[{i}] ({type(item).__name__}) is not a submodule of model")
                prefix = by_id[id(item)]
            else:
                raise TypeError(f"ignore[{i}] must be an nn.Module or a module name, "
                                f"got {type(item).__name__}")
            out |= {k for k, v in modules.items() if isinstance(v, _masks.PRUNABLE)
                    and (prefix == "" or k == prefix or k.startswith(prefix + "."))}
        return out

    # ------------------------------------------------------------------------------------------ steps
    def current_target(self) -> float:
        """The target sparsity the next ``step()`` prunes to."""
        if self.granularity == "nm":
            return 1.0 - self.n / self.m
        if self.schedule is None:
            return self.sparsity
        return _masks.check_sparsity(self.schedule(self._steps), name=f"schedule({self._steps})")

    def _scores(self) -> dict[str, Tensor]:
        out = {}
        for name, mod in self.layers.items():
            s = self.criterion.score(mod)
            prev = self._masks.get(name)
            if prev is not None:  # units removed before score lowest: they stay removed
                low = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
                keep = prev.to(s.device) if s.dim() > 1 else _masks.as_2d(prev).any(dim=1).to(s.device)
                s = torch.where(keep, s, low)
            out[name] = s
        return out

    def step(self) -> float:
        """Compute masks for the current target and apply them; returns that target."""
        target = self.current_target()
        scores = self._scores()
        if self.scope == "global":
            shapes = {k: tuple(self.layers[k].weight.shape) for k in scores}
            masks = _masks.global_keep(scores, target, self.granularity, shapes=shapes, block=self.block)
        else:
            masks = {k: _masks.layer_mask(s, target, self.granularity, shape=self.layers[k].weight.shape,
                                          block=self.block, n=self.n, m=self.m)
                     for k, s in scores.items()}
        for name, mask in masks.items():
            mod = self.layers[name]
            bias_mask = _masks.as_2d(mask).any(dim=1) if self.granularity == "channel" else None
            _masks.apply_mask(mod, mask, bias_mask)
        self._masks = masks
        self._target = target
        self._steps += 1
        return target

    # ---------------------------------------------------------------------------------------- results
    @property
    def masks(self) -> dict[str, Tensor]:
        """Layer name -> bool keep-mask of its weight's shape (True = kept), from the last ``step()``."""
        return dict(self._masks)

    def sparsity_report(self) -> list[dict[str, Any]]:
        """Per layer (execution order): name, type, shape, granularity, target, actual sparsity (fraction of
        weights masked), units and units removed (elements, blocks, n:m groups' zeros, or channels)."""
        rows = []
        for name, mod in self.layers.items():
            mask = self._masks.get(name)
            shape = tuple(mod.weight.shape)
            numel = mod.weight.numel()
            masked = 0 if mask is None else int((~mask).sum())
            if self.granularity == "channel":
                units = shape[0]
                removed = 0 if mask is None else int((~_masks.as_2d(mask).any(dim=1)).sum())
            elif self.granularity == "block":
                units = numel // (self.block[0] * self.block[1])
                removed = masked // (self.block[0] * self.block[1])
            else:
                units, removed = numel, masked
            cls = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
            rows.append({"name": name, "type": cls.__name__, "shape": shape,
                         "granularity": self.granularity, "target": self._target if mask is not None else 0.0,
                         "sparsity": masked / numel if numel else 0.0, "units": units, "removed": removed})
        return rows

    def remove(self) -> None:
        """Un-prune: drop the masks from every pruned layer and restore the original weights.

        The pruner starts over: ``masks`` is empty and a schedule restarts at step 0."""
        for mod in self.layers.values():
            _masks.remove_masks(mod)
        self._masks, self._target, self._steps = {}, 0.0, 0

    def bake(self) -> None:
        """Make the masks permanent: pruned layers get plain Parameters holding the zeros."""
        for mod in self.layers.values():
            _masks.bake_masks(mod)

    def __repr__(self) -> str:
        return (f"Pruner(criterion={self.criterion.name!r}, granularity={self.granularity!r}, "
                f"scope={self.scope!r}, sparsity={self.sparsity}, layers={len(self.layers)}, "
                f"ignored={sorted(self.ignored)})")
