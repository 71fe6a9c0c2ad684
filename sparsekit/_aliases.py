"""Modules and weights that a model holds under several names: a layer registered twice (a shared block in a
``ModuleList``, ALBERT-style weight sharing) or one Parameter held by two layers (tied embeddings / decoders).

``named_modules()`` lists a shared module once, under its first name: code that swaps modules by name must swap
every alias, or the other names keep running the old module."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["module_aliases", "replace_modules", "shared_weights", "tied_layers", "equal_classes", "retie"]


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every name it has in model`` (in ``named_modules`` order; the root is ``""``)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def replace_modules(model: nn.Module, pick: Callable[[nn.Module], bool],
                    build: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace (in place) every submodule of ``model`` (not the root) that ``pick`` selects by ``build(it)``, under
    every name it has (one module shared by two names stays one); returns its first name -> the module replaced."""
    from ._compat import set_submodule

    replaced = {}
    aliases = module_aliases(model)
    for name, mod in list(model.named_modules()):   # (lists a shared module once)
        if name and pick(mod):
            replaced[name] = mod
            new = build(mod)
            for alias in aliases[id(mod)]:
                set_submodule(model, alias, new)
    return replaced


def shared_weights(model: nn.Module, types: tuple[type, ...]) -> dict[str, list[str]]:
    """``name -> the other modules' names`` for every module of ``types`` whose ``weight`` Parameter another
    distinct module of ``types`` also holds (tied weights; one module under several names is not tying)."""
    from .prune.module_copy import stored_original
    holders: dict[int, list[tuple[int, str]]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, types):
            continue
        # a masked layer's weight is computed; the Parameter it holds is the parametrization's original
        weight = (stored_original(mod.parametrizations.weight) if parametrize.is_parametrized(mod, "weight")
                  else getattr(mod, "weight", None))
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append((id(mod), name))
    out: dict[str, list[str]] = {}
    for group in holders.values():
        if len({m for m, _ in group}) > 1:
            for _, name in group:
                out[name] = [other for _, other in group if other != name]
    return out


def tied_layers(model: nn.Module) -> list[list[str]]:
    """Names of the layers (Linear, Embedding, convs) holding one weight Parameter, one list per weight."""
    from .prune.masks import CONVS, TRANSPOSED_CONVS
    ties = shared_weights(model, (nn.Linear, nn.Embedding, *CONVS, *TRANSPOSED_CONVS))
    return [list(names) for names in dict.fromkeys(tuple(sorted([n, *others])) for n, others in ties.items())]


def equal_classes(names: list[str], same: Callable[[str, str], bool]) -> list[list[str]]:
    """``names`` split into classes of names ``same`` finds equal (to each class's first), in order."""
    classes: list[list[str]] = []
    for name in names:
        for cls in classes:
            if same(cls[0], name):
                cls.append(name)
                break
        else:
            classes.append([name])
    return classes


def retie(model: nn.Module, ties: list[list[str]], same_values: bool = True) -> list[list[str]]:
    """Make the layers of each list in ``ties`` (``tied_layers`` of the model before it was rebuilt) hold one
    weight Parameter again, class by class: layers whose weights have one shape (and, with ``same_values``,
    equal values) share the first one's. Returns the lists that split into several classes."""
    split = []
    for names in ties:
        mods = {n: model.get_submodule(n) for n in names}
        w = {n: m.weight for n, m in mods.items()}
        classes = equal_classes(names, lambda a, b, w=w: w[a].shape == w[b].shape
                                and (not same_values or torch.equal(w[a], w[b])))
        for cls in classes:
            for n in cls[1:]:
                mods[n].weight = w[cls[0]]
        if len(classes) > 1:
            split.append(names)
    return split
