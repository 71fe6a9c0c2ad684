"""A resized copy of a layer that stays the layer it was: its class (a user's subclass too), its hooks and its
other attributes carry over; only its tensors are swapped for smaller ones and its size attributes updated.

Compaction used to rebuild a layer through its class's constructor, which drops a subclass's state and hooks and
fails outright when the subclass's constructor takes other arguments.
"""

from __future__ import annotations

import copy
import types
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["share_call_hooks", "resized_copy", "cut"]


def cut(t: Tensor | None, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor | None:
    """Rows ``rows`` and columns ``cols`` of ``t`` (``None``: all) in a tensor of their own."""
    if t is None:
        return None
    out = t.detach()
    if rows is None and cols is None:
        return out.clone()
    if rows is not None:
        out = out.index_select(0, rows.to(t.device))
    return out if cols is None else out.index_select(1, cols.to(t.device))


def _own_tensors(mod: nn.Module) -> list[Tensor]:
    """``mod``'s own parameters and buffers, with a masked tensor's stored original and its mask."""
    out = [t for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]
    if parametrize.is_parametrized(mod):
        out += [t for t in (*mod.parametrizations.parameters(), *mod.parametrizations.buffers())]
    return out


def stored_original(plist: nn.Module) -> Tensor:
    """What a parametrized tensor stores: its original (the first, for a parametrization with several, as
    ``parametrizations.weight_norm``'s ``original0`` / ``original1``)."""
    return plist.original if plist.is_tensor else plist.original0


def stored_originals(plist: nn.Module) -> list[Tensor]:
    """Every tensor a parametrized tensor stores: ``[original]``, or ``original0``, ``original1``, ... (weight_norm
    stores its magnitude and direction)."""
    if plist.is_tensor:
        return [plist.original]
    return [t for i in range(plist.ntensors) if (t := getattr(plist, f"original{i}", None)) is not None]


_CALL_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def share_call_hooks(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` (a module computing what ``old`` computes, e.g. a converted attention or recurrent module)
    the very hook dicts of ``old``: its forward / backward hooks run on ``new`` too, and a handle removes a hook
    from both."""
    for key in _CALL_HOOKS:
        if isinstance(old.__dict__.get(key), dict):
            new.__dict__[key] = old.__dict__[key]
    # which kind its backward hooks are (register_full_backward_hook sets it): unset, torch runs none of them
    if old.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]


def _moved_hooks(hooks: dict, old: nn.Module, new: nn.Module) -> dict:
    """A copy of a hook dict of ``old`` for ``new``: the same callables, but a method of ``old`` itself, and a hook
    registered ``with_module`` (which holds a weak reference to its module), now refer to ``new``."""
    out = copy.copy(hooks)
    for key, hook in hooks.items():
        if getattr(hook, "__self__", None) is old:
            out[key] = types.MethodType(hook.__func__, new)
        elif getattr(hook, "with_module", False) and callable(getattr(hook, "module", None)) and hook.module() is old:
            out[key] = copy.copy(hook)
            out[key].module = weakref.ref(new)
    return out


def _register(mod: nn.Module, name: str, value: Tensor, src: Tensor | None) -> None:
    """``value`` as ``mod``'s parameter ``name`` if ``src`` (the tensor it replaces) was one, else as a buffer."""
    if isinstance(src, nn.Parameter):
        mod._parameters[name] = nn.Parameter(value, src.requires_grad)
    else:
        mod._buffers[name] = value


def _shared_with(within: nn.Module | None, mod: nn.Module) -> dict[int, Any]:
    """Deep-copy memo entries for what the rest of ``within`` holds (its modules, tensors and the other modules'
    plain attributes): referenced by the copy as they are (a parent reference, a dict two layers share)."""
    if within is None:
        return {}
    memo: dict[int, Any] = {}
    for other in within.modules():
        if other is mod:
            continue
        memo[id(other)] = other
        for t in (*other._parameters.values(), *other._buffers.values()):
            if t is not None:
                memo[id(t)] = t
        for key, value in other.__dict__.items():
            if not key.startswith("_") and key != "training":
                memo[id(value)] = value
    return memo


def resized_copy(mod: nn.Module, tensors: Mapping[str, Tensor | None], sizes: Mapping[str, int],
                 skip: Iterable[str] = (), within: nn.Module | None = None) -> nn.Module:
    """A copy of ``mod`` holding ``tensors`` (new values of its own parameters / buffers of those names; ``None``
    leaves one absent, as a bias-free layer's) and with the attributes ``sizes`` set.

    Masks and other parametrizations are dropped: a parametrized tensor not in ``tensors`` keeps its computed
    value. Each parameter requires grad as the original did; parameters and buffers come in ``tensors``' order,
    then the others (copies). Hooks are the same callables (those bound to ``mod`` itself rebound to the copy,
    and hook handles kept on it refer to the copy's hooks); submodules and plain attributes are deep copies;
    what the rest of ``within`` (the model ``mod`` is part of) holds stays shared rather than copied (a parent
    reference, state two layers share, another layer's weight); attributes named in ``skip`` are left out (the
    caller rebuilds them), and so is a ``module.compile()`` wrapper (it calls the original: compile the copy
    again). Another tensor of ``mod`` with a dim of a size
    being changed (a subclass's per-channel state, the ``weight_g`` of the deprecated hook-based
    ``weight_norm``) cannot be cut along with it: ValueError.
    """
    if within is not None and not isinstance(within, nn.Module):
        raise TypeError(f"within must be the nn.Module the layer is part of, or None, got {type(within).__name__}")
    base = parametrize.type_before_parametrizations(mod)
    masked = dict(mod.parametrizations.items()) if parametrize.is_parametrized(mod) else {}
    new = base.__new__(base)
    memo: dict[int, Any] = _shared_with(within, mod)
    memo[id(mod)] = new
    memo.update({id(t): t for t in _own_tensors(mod)})     # shared, never copied: replaced or cloned below
    # (a plain attribute named as one of ``tensors`` is dropped: the hook-based weight_norm's computed weight)
    skip = {*skip, *tensors, "_compiled_call_impl"}
    state = {}
    for key, value in mod.__dict__.items():               # hook dicts first: handles kept on the module follow
        if "hook" in key and isinstance(value, dict):
            state[key] = memo[id(value)] = _moved_hooks(value, mod, new)
    for key, value in mod.__dict__.items():
        if key in skip or key in state:
            continue
        if key in ("_parameters", "_buffers"):
            state[key] = copy.copy(value)
        elif key == "_modules":
            state[key] = type(value)((k, copy.deepcopy(m, memo)) for k, m in value.items() if k != "parametrizations")
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    if "_compiled_call_impl" in mod.__dict__:
        new._compiled_call_impl = None
    for name, plist in masked.items():
        if name not in tensors:      # a parametrized tensor kept whole: its computed value
            _register(new, name, getattr(mod, name).detach().clone(), stored_original(plist))
    for name, value in tensors.items():
        if value is not None:        # (None: absent in the original too, e.g. no bias)
            src = stored_original(masked[name]) if name in masked else mod._parameters.get(name, mod._buffers.get(name))
            _register(new, name, value.detach(), src)
    for store in (new._parameters, new._buffers):         # the others: copies, not the original's tensors
        for name, t in store.items():
            if name not in tensors and t is not None and t is (mod._parameters.get(name, mod._buffers.get(name))):
                store[name] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, nn.Parameter) \
                    else t.detach().clone()
        order = [n for n in tensors if n in store] + [n for n in store if n not in tensors]
        items = [(n, store[n]) for n in order]
        store.clear()
        store.update(items)
    changed = {getattr(mod, key) for key, size in sizes.items() if getattr(mod, key) != size}
    # (a size both changed and kept, a square Linear losing outputs only: such a tensor may be per input)
    kept = {getattr(mod, key) for key, size in sizes.items() if getattr(mod, key) == size}
    held = [(n, t) for n, t in (*new._parameters.items(), *new._buffers.items()) if n not in tensors]
    held += [(n, t) for n, t in new.__dict__.items() if isinstance(t, Tensor)]
    for name, t in held:
        if t is None or not changed.intersection(t.shape):
            continue
        if not (changed - kept).intersection(t.shape):
            warnings.warn(f"resizing a {base.__name__}: {name!r} of shape {tuple(t.shape)} is left as it is (its "
                          "size is also one the layer keeps; if it runs along a cut dim, the resized layer fails)",
                          RuntimeWarning, stacklevel=3)
            continue
        raise ValueError(f"cannot resize a {base.__name__}: it holds {name!r} of shape {tuple(t.shape)}, which "
                         f"sparsekit does not know how to cut (it resizes {sorted(tensors)}); prune without this "
                         "layer (ignore=...) or move that state out of it (the deprecated hook-based "
                         "nn.utils.weight_norm: use nn.utils.parametrizations.weight_norm)")
    for key, value in sizes.items():
        setattr(new, key, value)
    return new
