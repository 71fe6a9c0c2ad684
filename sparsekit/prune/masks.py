"""Masks: from scores to boolean keep-masks, and masks held on modules as parametrizations.

Selection. A weight is viewed as 2-D ``[out, in*kh*kw]`` (``as_2d``; for a conv the trailing dims flatten
in memory order, the layout of ``sparsekit.formats``). Granularities:

    element   every weight is a unit
    block     (bn, bk) tiles of the 2-D view; both dims must divide (ValueError with the remedy otherwise)
    nm        n of every m consecutive weights along the input dim are kept (sparsity is 1 - n/m)
    channel   whole output channels (rows); ``sparsity`` is the fraction of channels removed

A unit's score is the sum of its element scores (``unit_scores``). At layer scope exactly
``floor(sparsity * units)`` units with the lowest scores are removed (``num_to_remove``); ties go to the
lower flat index first (stable sort), so decisions are deterministic. ``global_keep`` applies one
threshold over the units of several layers (ties: earlier layer, then lower index).

Parametrization. ``apply_mask`` registers ``WeightMask`` (``torch.nn.utils.parametrize``) on
``module.weight`` (and on ``module.bias`` for channel masks): the forward pass sees ``weight * mask``, the
stored ``original`` keeps every value, gradients of masked entries are zero. ``remove_masks`` restores the
original values (un-prune: masked entries get the values they had when masked, kept from the optimizer's
drift in ``WeightMask.pruned``); ``bake_masks`` makes the zeros permanent plain parameters. Other tensors take
masks the same way (``apply_tensor_mask``): channel pruning masks the rows of
``nn.MultiheadAttention.in_proj_weight`` / ``in_proj_bias`` of removed heads.

Saving. A masked model's ``state_dict`` holds ``<layer>.parametrizations.weight.original`` and
``<layer>.parametrizations.weight.0.mask``. Load it with ``load_masked_state_dict(fresh_model, sd)``,
which puts placeholder masks on the layers named in ``sd`` and then calls ``load_state_dict`` (masks
included). Or ``bake_masks`` before saving to get a plain state_dict any unmasked model loads.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .recurrent import drop_copy_hook, keep_copyable

__all__ = [
    "GRANULARITIES", "CONVS", "TRANSPOSED_CONVS", "PRUNABLE", "BATCH_NORMS", "INSTANCE_NORMS", "CHANNEL_NORMS",
    "LINEAR_CONV2D",
    "WeightMask", "as_2d", "check_granularity", "check_sparsity", "check_block", "check_nm", "check_layer",
    "num_to_remove", "unit_scores", "lowest_removed", "expand_units", "nm_keep", "transposed_nm_keep", "layer_mask",
    "global_keep",
    "apply_mask", "apply_tensor_mask", "is_masked", "get_masks", "tensor_masks", "remove_masks",
    "remove_tensor_mask", "bake_masks", "load_masked_state_dict", "set_owned_mask", "release_owned_mask",
    "unmasked",
]

GRANULARITIES = ("element", "block", "nm", "channel")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)   # weight [C_in, C_out / g, *k]
PRUNABLE = (nn.Linear, *CONVS)   # a conv's weight [C_out, C_in / groups, *kernel], channels on dim 1
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
CHANNEL_NORMS = (*BATCH_NORMS, *INSTANCE_NORMS)   # per-channel parameters over [N, C, ...]
LINEAR_CONV2D = (nn.Linear, nn.Conv2d)   # what the procedures that rebuild layers (methods/) handle


# ------------------------------------------------------------------------------------------ validation
def check_granularity(granularity: object) -> str:
    """Return ``granularity`` if it is one of ``GRANULARITIES``; raise naming the value given otherwise."""
    if not isinstance(granularity, str):
        raise TypeError(f"granularity must be a str, one of {GRANULARITIES}, "
                        f"got {type(granularity).__name__}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float in [0, 1); 1.0 (remove everything) is refused."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (fraction of weights/channels removed), got {sparsity!r}")
    return float(sparsity)


def check_block(block: object) -> tuple[int, int]:
    """Return ``block`` as ``(bn, bk)``; an int ``b`` means ``(b, b)``."""
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
        raise TypeError(f"block must be an int or a pair of ints (rows, cols), got {block!r}")
    if block[0] < 1 or block[1] < 1:
        raise ValueError(f"block sides must be positive, got {tuple(block)}")
    return int(block[0]), int(block[1])


def check_nm(n: object, m: object) -> tuple[int, int]:
    """Return ``(n, m)``; requires ints with ``1 <= n < m``."""
    for name, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if not (1 <= n < m):  # type: ignore[operator]
        raise ValueError(f"n:m keeps n of every m weights, so it needs 1 <= n < m; got n={n}, m={m}")
    return int(n), int(m)  # type: ignore[arg-type]


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def check_layer(shape: Sequence[int], granularity: str, *, block: tuple[int, int] = (32, 32), n: int = 2,
                m: int = 4, name: str = "weight") -> None:
    """Raise ValueError if a weight of ``shape`` cannot take ``granularity`` (block or m not dividing)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if granularity == "block":
        bn, bk = block
        if rows % bn or cols % bk:
            raise ValueError(
                f"block {block} does not divide {name} viewed as 2-D {(rows, cols)}: rows need a multiple of "
                f"{bn}, cols a multiple of {bk}. Remedy: choose a block that divides both (rows fit "
                f"{_divisors(rows)[-4:]}, cols fit {_divisors(cols)[-4:]}), or leave this layer out with "
                f"ignore=[{name!r}]")
    elif granularity == "nm" and cols % m:
        raise ValueError(f"m={m} does not divide the input dim {cols} of {name} (2-D {(rows, cols)}); "
                         f"n:m groups run along it. Remedy: choose m dividing {cols}, or ignore=[{name!r}]")


# ------------------------------------------------------------------------------------------- selection
def as_2d(t: Tensor) -> Tensor:
    """View a weight (or element scores) as ``[out, in*kh*kw]``."""
    return t.reshape(t.shape[0], -1)


def check_max_sparsity(max_sparsity: object) -> float:
    """A per-layer cap on global pruning: a number in (0, 1]."""
    if isinstance(max_sparsity, bool) or not isinstance(max_sparsity, (int, float)) \
            or not 0.0 < max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity must be a number in (0, 1] (the most of one layer's units that global "
                         f"pruning removes), got {max_sparsity!r}")
    return float(max_sparsity)


def num_to_remove(sparsity: float, units: int) -> int:
    """``floor(sparsity * units)``, robust to float rounding: how many units a layer loses."""
    return min(units, floor_product(sparsity, units))


def floor_product(fraction: float, count: int) -> int:
    """``floor(fraction * count)`` where a product a few float roundings from an integer is that integer
    (0.29 * 100 == 28.999999999999996 -> 29; 1 / 216 * 216 -> 1); tolerances in ulps of the product hold at
    any count (an absolute epsilon is too small at 1e8 units, a relative one rounds 87639.99997 up)."""
    x = float(fraction) * count
    nearest = round(x)
    return int(nearest) if abs(x - nearest) <= 4 * math.ulp(max(1.0, abs(nearest))) else math.floor(x)


def unit_scores(scores: Tensor, granularity: str, *, block: tuple[int, int] = (32, 32)) -> Tensor:
    """Aggregate scores to units: element ``[out, K]``, block ``[out/bn, K/bk]`` (sums), channel ``[out]``.

    ``scores`` are element scores (weight-shaped) or, for ``channel`` only, one score per output channel.
    """
    if scores.dim() == 1:
        if granularity != "channel":
            raise ValueError(f"per-channel scores (shape {tuple(scores.shape)}) need granularity='channel', "
                             f"got {granularity!r}")
        return scores
    s = as_2d(scores)
    if granularity == "element":
        return s
    if granularity == "channel":
        return s.sum(dim=1)
    if granularity == "block":
        check_layer(s.shape, "block", block=block, name="scores")
        bn, bk = block
        return s.reshape(s.shape[0] // bn, bn, s.shape[1] // bk, bk).sum(dim=(1, 3))
    raise ValueError(f"unit_scores has no units for granularity {granularity!r} (n:m selects within groups; "
                     "use nm_keep)")


def lowest_removed(units: Tensor, k: int) -> Tensor:
    """Keep-mask (shape of ``units``) with the ``k`` lowest scores False; ties: lower flat index first."""
    order = torch.sort(units.reshape(-1), stable=True).indices
    keep = torch.ones(units.numel(), dtype=torch.bool, device=units.device)
    keep[order[:k]] = False
    return keep.reshape(units.shape)


def expand_units(keep: Tensor, granularity: str, shape: Sequence[int], *,
                 block: tuple[int, int] = (32, 32)) -> Tensor:
    """Expand a unit keep-mask to a keep-mask of the weight's ``shape``."""
    rows, cols = shape[0], math.prod(shape[1:])
    if granularity == "element":
        full = keep
    elif granularity == "channel":
        full = keep.reshape(rows, 1).expand(rows, cols)
    elif granularity == "block":
        full = keep.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    else:
        raise ValueError(f"expand_units: granularity must be element, block or channel, got {granularity!r}")
    return full.reshape(tuple(shape)).contiguous()


def nm_keep(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask keeping the ``n`` highest scores of every ``m`` consecutive along the input dim.

    Ties go to the lower position in the group (stable sort), so the result is deterministic.
    """
    if scores.dim() == 1:
        raise ValueError("n:m needs element scores (weight-shaped), got per-channel scores")
    n, m = check_nm(n, m)
    s = as_2d(scores)
    check_layer(s.shape, "nm", n=n, m=m, name="scores")
    groups = s.reshape(s.shape[0], -1, m)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(scores.shape)


def transposed_nm_keep(scores: Tensor, n: int, m: int) -> Tensor:
    """``nm_keep`` for a transposed conv's weight ``[C_in, C_out, *kernel]``: groups of ``m`` along C_in, the
    reduction dim of the GEMM matrix ``[C_out * taps, C_in]`` its sparse twin runs (``transposed_weight2d``)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"transposed_nm_keep: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 3:
        raise ValueError("n:m needs element scores (weight-shaped), got per-channel scores")
    mat = scores.movedim(0, -1).reshape(-1, scores.shape[0])
    check_layer(mat.shape, "nm", n=n, m=m, name="scores (as [C_out * taps, C_in])")
    return nm_keep(mat, n, m).reshape(*scores.shape[1:], scores.shape[0]).movedim(-1, 0)


def layer_mask(scores: Tensor, sparsity: float, granularity: str, *, shape: Sequence[int] | None = None,
               block: tuple[int, int] = (32, 32), n: int = 2, m: int = 4) -> Tensor:
    """Layer-scope keep-mask of the weight's ``shape`` (default ``scores.shape``).

    element/block/channel remove exactly ``floor(sparsity * units)`` units; nm keeps n of every m and
    ignores ``sparsity`` (the pattern fixes it at ``1 - n/m``).
    """
    granularity = check_granularity(granularity)
    shape = tuple(scores.shape) if shape is None else tuple(shape)
    if granularity == "nm":
        return nm_keep(scores, n, m)
    sparsity = check_sparsity(sparsity)
    units = unit_scores(scores, granularity, block=block)
    keep = lowest_removed(units, num_to_remove(sparsity, units.numel()))
    return expand_units(keep, granularity, shape, block=block)


def global_keep(scores: Mapping[str, Tensor], sparsity: float, granularity: str, *,
                shapes: Mapping[str, Sequence[int]] | None = None,
                block: tuple[int, int] = (32, 32), min_keep: int = 0, max_sparsity: float = 1.0) -> dict[str, Tensor]:
    """One threshold over all layers: remove ``floor(sparsity * total units)`` lowest-scoring units.

    ``scores`` maps layer name -> scores (its order breaks ties). Units must be comparable across layers:
    element and block (same block everywhere) are; channel scores are when the criterion makes them so
    (``l1_mean`` divides each filter's L1 norm by its number of weights, Salama et al. 2019).
    ``min_keep`` units of every layer (its highest-scoring ones) are never removed, so no layer loses all
    its channels, and no layer loses more than ``floor(max_sparsity * its units)`` (one threshold over layers
    whose scores differ in scale can otherwise empty some: a network's stem under plain L1); the number removed
    is capped accordingly.
    """
    granularity = check_granularity(granularity)
    if granularity == "nm":
        raise ValueError("global scope does not apply to granularity 'nm': n:m keeps n of every m in each "
                         "group, so one global threshold has no meaning")
    sparsity = check_sparsity(sparsity)
    if not isinstance(min_keep, int) or isinstance(min_keep, bool) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
    max_sparsity = check_max_sparsity(max_sparsity)
    names = list(scores)
    units = [unit_scores(scores[k], granularity, block=block).to(torch.float64) for k in names]
    flats = []
    protected = 0
    for u in units:
        f = u.reshape(-1).clone()
        kept = min(f.numel(), max(min_keep, f.numel() - floor_product(max_sparsity, f.numel())))
        if kept:
            top = torch.sort(f, stable=True).indices[-kept:]
            f[top] = float("inf")
            protected += top.numel()
        flats.append(f)
    flat = torch.cat(flats) if flats else torch.zeros(0, dtype=torch.float64)
    wanted = num_to_remove(sparsity, flat.numel())
    k = min(wanted, flat.numel() - protected)
    if k < wanted:
        warnings.warn(f"global pruning reaches {k / flat.numel():.1%} of the units, not {sparsity:.1%}: every layer "
                      f"keeps at least {min_keep} (min_channels / min_keep)"
                      f"{f' and {1 - max_sparsity:.0%} of its units (max_sparsity)' if max_sparsity < 1 else ''}, "
                      f"{protected} of {flat.numel()} in all",
                      UserWarning, stacklevel=3)
    keep = lowest_removed(flat, k)
    out, start = {}, 0
    for name, u in zip(names, units):
        shape = tuple(shapes[name]) if shapes is not None else tuple(scores[name].shape)
        out[name] = expand_units(keep[start:start + u.numel()].reshape(u.shape), granularity, shape, block=block)
        start += u.numel()
    return out


# ------------------------------------------------------------------------------------ parametrization
class WeightMask(nn.Module):
    """Parametrization ``tensor -> where(mask, tensor, 0)`` with ``mask`` a registered bool buffer.

    ``pruned`` (a non-persistent buffer, 1-D in mask order: only the masked entries, so at 90% sparsity about
    0.9x the weight's memory while the mask exists) holds
    the values the masked entries had when they were masked. The forward pass never reads the stored
    ``original`` there, but an optimizer still moves it (momentum, weight decay, Adam), so ``remove_masks``
    writes ``pruned`` back instead. It is not saved: after a ``state_dict`` load the loaded originals are
    the values an un-prune gives back (``pruned`` is then None).
    """

    def __init__(self, mask: Tensor, values: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())
        pruned = None if values is None else values.detach()[~self.mask].clone()
        self.register_buffer("pruned", pruned, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(self.mask, x, x.new_zeros(()))

    @torch.no_grad()
    def update(self, mask: Tensor, original: Tensor | None) -> None:
        """Set a new ``mask``. ``original`` (the tensor this parametrization reads, None when unknown): entries
        masked before and kept now get their stored values back; newly masked entries are stored."""
        if original is None:
            self.pruned = None
        else:
            full = original.detach().clone()
            if self.pruned is not None:
                full[~self.mask] = self.pruned
                back = mask & ~self.mask
                original[back] = full[back]
            self.pruned = full[~mask]
        self.mask.copy_(mask)

    @torch.no_grad()
    def restore(self, original: Tensor) -> None:
        """Write the stored values of the masked entries back into ``original``."""
        if self.pruned is not None:
            original[~self.mask] = self.pruned

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.pruned = None      # the loaded original holds the values to restore
        if getattr(self, "owners", None):     # every owner's record is the loaded mask now (the records from before
            self.owners = {k: self.mask.detach().clone() for k in self.owners}    # the load would bring it back)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, sparsity={1 - self.mask.float().mean().item():.4f}"


def _mask_param(module: nn.Module, tensor_name: str) -> WeightMask | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    found = [p for p in getattr(module.parametrizations, tensor_name) if isinstance(p, WeightMask)]
    return found[0] if found else None


def _masked_original(module: nn.Module, tensor_name: str) -> Tensor | None:
    """The stored original a ``WeightMask`` reads: only when it is the first parametrization of the tensor."""
    plist = getattr(module.parametrizations, tensor_name)
    return plist.original if isinstance(plist[0], WeightMask) else None


def _set_mask(module: nn.Module, tensor_name: str, mask: Tensor) -> None:
    t = getattr(module, tensor_name)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(t.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{tensor_name} mask must be a tensor of shape {tuple(t.shape)}, got {got}")
    mask = mask.to(device=t.device, dtype=torch.bool)
    existing = _mask_param(module, tensor_name)
    if existing is not None:
        existing.update(mask, _masked_original(module, tensor_name))
    else:
        values = t if not parametrize.is_parametrized(module, tensor_name) else None
        if parametrize.is_parametrized(module):   # its class may be shared with a deep copy: adding a property
            _own_parametrized_class(module)       # to it would reach the copy (or the original) too
        parametrize.register_parametrization(module, tensor_name, WeightMask(mask, values))
        keep_copyable(module)


@contextlib.contextmanager
def unmasked(model: nn.Module) -> Iterator[None]:
    """Inside, every ``WeightMask`` of ``model`` reads through: its masked entries hold the values they had when
    they were masked (what an un-prune gives back). On exit the masks are as before."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    saved, stacked = [], []
    for mod in model.modules():
        if not parametrize.is_parametrized(mod):
            continue
        for name in list(mod.parametrizations.keys()):
            wm, original = _mask_param(mod, name), _masked_original(mod, name)
            if wm is not None and original is not None:
                saved.append((wm, original, wm.mask.clone()))
                wm.update(torch.ones_like(wm.mask), original)
            elif wm is not None:     # on top of another parametrization (weight_norm): its input is never masked
                stacked.append((wm, wm.mask.clone()))
                wm.mask.fill_(True)
    try:
        yield
    finally:
        for wm, original, mask in saved:
            wm.update(mask, original)
        for wm, mask in stacked:
            wm.mask.copy_(mask)


def apply_mask(module: nn.Module, mask: Tensor, bias_mask: Tensor | None = None) -> None:
    """Mask ``module.weight`` with ``mask`` (and ``module.bias`` with ``bias_mask``); updates in place if
    already masked, so repeated calls never stack parametrizations."""
    if not isinstance(module, nn.Module) or not isinstance(getattr(module, "weight", None), Tensor):
        raise TypeError(f"module must be an nn.Module with a weight tensor, got {type(module).__name__}")
    _set_mask(module, "weight", mask)
    if bias_mask is not None and getattr(module, "bias", None) is not None:
        _set_mask(module, "bias", bias_mask)


def apply_tensor_mask(module: nn.Module, tensor_name: str, mask: Tensor) -> None:
    """Mask ``module.<tensor_name>`` (any parameter, e.g. ``in_proj_weight``); updates in place if already masked."""
    if not isinstance(module, nn.Module) or not isinstance(getattr(module, tensor_name, None), Tensor):
        raise TypeError(f"module must be an nn.Module with a tensor {tensor_name!r}, got {type(module).__name__}")
    _set_mask(module, tensor_name, mask)


def set_owned_mask(module: nn.Module, tensor_name: str, owner: str, mask: Tensor) -> None:
    """Set ``owner``'s keep-mask on ``module.<tensor_name>``. The tensor's mask is the AND of every owner's (a
    Pruner is one; a mask already there when the first owner came counts as one more, ``None``), so owners
    can be released in any order (``release_owned_mask``) without unmasking what another still masks."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    p = _mask_param(module, tensor_name)
    owners = dict(getattr(p, "owners", None) or ({} if p is None else {None: p.mask.detach().clone()}))
    owners[owner] = mask.detach().to(torch.bool).clone()
    apply_tensor_mask(module, tensor_name, _and_of(owners))
    _mask_param(module, tensor_name).owners = owners


def release_owned_mask(module: nn.Module, tensor_name: str, owner: str) -> None:
    """Drop ``owner``'s mask from ``module.<tensor_name>`` (see ``set_owned_mask``): entries no other owner
    masks come back with their values at masking time; the parametrization goes when nothing stays masked."""
    p = _mask_param(module, tensor_name)
    owners = getattr(p, "owners", None)
    if p is None or not owners or owner not in owners:
        return
    owners = {k: v for k, v in owners.items() if k != owner}
    combined = _and_of(owners) if owners else None
    if combined is None or bool(combined.all()):
        remove_tensor_mask(module, tensor_name)
        return
    apply_tensor_mask(module, tensor_name, combined)
    p.owners = owners


def _and_of(owners: Mapping[object, Tensor]) -> Tensor:
    masks = list(owners.values())
    out = masks[0].clone()
    for m in masks[1:]:
        out &= m.to(out.device)
    return out


def is_masked(module: nn.Module) -> bool:
    """True if ``module.weight`` carries a ``WeightMask``."""
    return _mask_param(module, "weight") is not None


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """Module name -> a copy of its weight keep-mask, for every masked module in ``model``."""
    return {name: p.mask.clone() for name, mod in model.named_modules()
            if (p := _mask_param(mod, "weight")) is not None}


def _masked_tensor_names(mod: nn.Module) -> list[str]:
    if not parametrize.is_parametrized(mod):
        return []
    return [t for t in mod.parametrizations if _mask_param(mod, t) is not None]


def tensor_masks(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Module name -> {tensor name: a copy of its keep-mask} for every masked tensor (weights, biases, and
    others such as ``in_proj_weight``)."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, mod in model.named_modules():
        for t in _masked_tensor_names(mod):
            out.setdefault(name, {})[t] = _mask_param(mod, t).mask.clone()  # type: ignore[union-attr]
    return out


def _own_parametrized_class(mod: nn.Module) -> None:
    """Give ``mod`` a private copy of its parametrized class.

    torch.nn.utils.parametrize makes one dynamic class per module, but ``copy.deepcopy`` of a model shares it
    between the copy and the original; removing a parametrization deletes a property from that class, which would
    strip the other model too. Removing from a private copy of the class leaves the original intact.
    """
    cls = type(mod)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    mod.__class__ = type(cls.__name__, cls.__bases__, body)


def _unmask_tensor(mod: nn.Module, tensor_name: str, leave_parametrized: bool, label: str) -> None:
    plist = getattr(mod.parametrizations, tensor_name)
    if not all(isinstance(p, WeightMask) for p in plist):
        kinds, parts = [type(p).__name__ for p in plist], list(plist)
        first = next(i for i, p in enumerate(parts) if isinstance(p, WeightMask))
        if first == 0 or not all(isinstance(p, WeightMask) for p in parts[first:]):
            raise ValueError(f"{label}.{tensor_name} has other parametrizations after its WeightMask ({kinds}); "
                             "remove those first")
        # masks on top of another parametrization (weight_norm's magnitude and direction): un-masking drops the
        # masks and leaves the others as they are; baking leaves the computed, masked value as a plain Parameter
        if leave_parametrized:
            parametrize.remove_parametrizations(mod, tensor_name, leave_parametrized=True)
        else:
            for i in reversed(range(len(plist))):
                if isinstance(plist[i], WeightMask):
                    del plist[i]
        return
    if not leave_parametrized:
        plist[0].restore(plist.original)     # the values at masking time, not the optimizer's drift
    parametrize.remove_parametrizations(mod, tensor_name, leave_parametrized=leave_parametrized)


def _unmask(model: nn.Module, leave_parametrized: bool) -> int:
    count = 0
    for name, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod):
            _own_parametrized_class(mod)
        for tensor_name in _masked_tensor_names(mod):
            _unmask_tensor(mod, tensor_name, leave_parametrized, name or "model")
            count += 1
        if not parametrize.is_parametrized(mod):
            drop_copy_hook(mod)
    return count


def remove_tensor_mask(module: nn.Module, tensor_name: str) -> bool:
    """Un-prune one tensor of ``module`` (see ``remove_masks``); returns whether it was masked."""
    if _mask_param(module, tensor_name) is None:
        return False
    _own_parametrized_class(module)
    _unmask_tensor(module, tensor_name, False, type(module).__name__)
    return True


def remove_masks(model: nn.Module) -> int:
    """Un-prune: drop every ``WeightMask`` in ``model`` and restore the original (unmasked) values.

    Returns the number of tensors unmasked. A mask on top of another parametrization (``weight_norm``) is
    dropped, the other left as it is (its stored tensors were never masked). Otherwise masked entries come back
    with the values they had when they were masked, even after an optimizer with momentum, weight decay or Adam
    moved the stored originals (the forward pass never saw those moves); kept entries keep their trained values.
    After a ``state_dict`` load the masked entries come back as loaded (the values at masking time are not
    saved).
    """
    return _unmask(model, leave_parametrized=False)


def bake_masks(model: nn.Module) -> int:
    """Make masks permanent: every masked tensor becomes a plain Parameter holding ``weight * mask``.

    The Parameter objects are kept (optimizers stay valid), but where the mask sits on top of another
    parametrization (``parametrizations.weight_norm``'s magnitude and direction), the tensor becomes one new plain
    Parameter holding the computed, masked value. Returns the number of tensors baked. The zeros are then
    ordinary weights: training moves them (an optimizer's momentum at once), so bake after fine-tuning, or
    fine-tune a sparsified model (its stored values train with the pattern fixed).
    """
    return _unmask(model, leave_parametrized=True)


_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.(\w+)\.(\d+)\.mask$")


def load_masked_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load the ``state_dict`` of a masked model into ``model`` (masked or not).

    Layers whose mask appears in ``state_dict`` get a placeholder ``WeightMask`` first (if they have none),
    then ``model.load_state_dict(state_dict, strict)`` fills in originals and masks. Returns its result.
    """
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        match = _MASK_KEY.match(key)
        if match is None:
            continue
        prefix, tensor_name = match.group(1) or "", match.group(2)
        if prefix not in modules:
            raise ValueError(f"state_dict key {key!r} names module {prefix!r}, which model does not have")
        mod = modules[prefix]
        if _mask_param(mod, tensor_name) is None:
            if parametrize.is_parametrized(mod):
                _own_parametrized_class(mod)
            parametrize.register_parametrization(
                mod, tensor_name, WeightMask(torch.ones_like(value, dtype=torch.bool,
                                                             device=getattr(mod, tensor_name).device)))
            keep_copyable(mod)
    return model.load_state_dict(state_dict, strict=strict)
