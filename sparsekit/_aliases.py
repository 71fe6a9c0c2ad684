"""Modules and weights that a model holds under several names: a layer registered twice (a shared block in a
``ModuleList``, ALBERT-style weight sharing) or one Parameter held by two layers (tied embeddings / decoders).

``named_modules()`` lists a shared module once, under its first name: code that swaps modules by name must swap
every alias, or the other names keep running the old module."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["module_aliases", "shared_weights"]


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every name it has in model`` (in ``named_modules`` order; the root is ``""``)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def shared_weights(model: nn.Module, types: tuple[type, ...]) -> dict[str, list[str]]:
    """``name -> the other modules' names`` for every module of ``types`` whose ``weight`` Parameter another
    distinct module of ``types`` also holds (tied weights; one module under several names is not tying)."""
    holders: dict[int, list[tuple[int, str]]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, types):
            continue
        # a masked layer's weight is computed; the Parameter it holds is the parametrization's original
        weight = (mod.parametrizations.weight.original if parametrize.is_parametrized(mod, "weight")
                  else getattr(mod, "weight", None))
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append((id(mod), name))
    out: dict[str, list[str]] = {}
    for group in holders.values():
        if len({m for m, _ in group}) > 1:
            for _, name in group:
                out[name] = [other for _, other in group if other != name]
    return out
