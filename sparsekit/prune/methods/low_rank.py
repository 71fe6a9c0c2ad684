"""Low-rank factorisation by SVD (seed 000, sec. 4: Wu et al. 2019 fuse LASSO channel pruning with SVD).

A weight viewed as ``[out, in*kh*kw]`` is ``U S V^T``; keeping ``r`` singular values replaces

* ``nn.Linear(in, out)`` by ``Linear(in, r, bias=False)`` then ``Linear(r, out)``;
* ``nn.Conv2d(in, out, k)`` by ``Conv2d(in, r, k, stride, padding, dilation, bias=False)`` then a 1x1
  ``Conv2d(r, out)``,

each factor taking ``sqrt(S)``. ``rank`` fixes ``r``; ``energy`` keeps the smallest ``r`` whose singular
values hold that fraction of ``sum S^2``. A layer is replaced only when the factors have fewer parameters.
Combined with channel pruning (seed 000's fusion: channels first, then SVD), compact first: the SVD then
factorises the smaller layers. Baked masks instead leave full-width factors whose removed channels are zero rows
and columns only until training moves them (a layer with such zeros gets a warning).

    small = pruner.compact()                      # after channel pruning, if any
    report = low_rank(small, energy=0.9)          # {layer: (rank, params before, params after)}
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..._compat import set_submodule
from .. import masks as _masks

__all__ = ["svd_rank", "factorize", "low_rank"]


def svd_rank(singular_values: Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """``rank`` (clipped to the number of nonzero singular values), or the smallest rank holding
    ``energy`` of ``sum S^2``; exactly one of the two must be given."""
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank and energy, got rank={rank!r}, energy={energy!r}")
    s2 = singular_values.double().square()
    nonzero = max(1, int((singular_values > singular_values.max() * 1e-7).sum())) if s2.numel() else 1
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        return min(rank, nonzero)
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    frac = torch.cumsum(s2, 0) / s2.sum().clamp_min(1e-300)
    return min(nonzero, int((frac < energy - 1e-12).sum()) + 1)


@torch.no_grad()
def factorize(layer: nn.Module, rank: int | None = None, energy: float | None = None) -> nn.Sequential:
    """The two-factor ``nn.Sequential`` replacing ``layer`` (an unmasked ``nn.Linear`` / ``nn.Conv2d``)."""
    if not isinstance(layer, _masks.LINEAR_CONV2D):
        raise TypeError(f"layer must be an nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    if _masks.is_masked(layer):
        raise ValueError(f"layer (weight {tuple(layer.weight.shape)}) is masked: compact the pruned model first "
                         "(pruner.compact()), or bake the masks (pruner.bake()) so the SVD sees the zeros")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f"grouped convolutions are not factorised (groups={layer.groups})")
    w = layer.weight.detach()
    w2 = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w2, full_matrices=False)
    r = svd_rank(s, rank, energy)
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).to(w.dtype)              # [r, in*kh*kw]
    second = (u[:, :r] * root[None, :]).to(w.dtype)           # [out, r]
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        a, b = nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features, bias=bias)
        a.weight.copy_(first)
        b.weight.copy_(second)
    else:
        a = nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                      bias=False, padding_mode=layer.padding_mode)
        b = nn.Conv2d(r, layer.out_channels, 1, bias=bias)
        a.weight.copy_(first.reshape(r, *w.shape[1:]))
        b.weight.copy_(second.reshape(*second.shape, 1, 1))
    if bias:
        b.bias.copy_(layer.bias.detach())
    return nn.Sequential(a, b).to(device=w.device, dtype=w.dtype)


def low_rank(model: nn.Module, rank: int | None = None, energy: float | None = None,
             layers: Iterable[str] | None = None, ignore: Iterable[str] = ()) -> dict[str, tuple[int, int, int]]:
    """Factorise ``layers`` (default: every Linear/Conv2d not in ``ignore``) in place where it saves
    parameters; returns ``{name: (rank, params before, params after)}`` for the layers replaced."""
    modules = dict(model.named_modules())
    names = [k for k, v in modules.items() if isinstance(v, _masks.LINEAR_CONV2D)] if layers is None else list(layers)
    ignore = set(ignore)
    todo = []
    # every layer is checked before any is replaced, so an error leaves the model as it was
    for name in names:
        if name not in modules or not isinstance(modules[name], _masks.LINEAR_CONV2D):
            raise ValueError(f"layers names {name!r}, which is not an nn.Linear/nn.Conv2d of model")
        grouped = isinstance(modules[name], nn.Conv2d) and modules[name].groups != 1
        if grouped and layers is not None and name not in ignore:
            raise ValueError(f"layers names {name!r}, a grouped conv (groups={modules[name].groups}): grouped "
                             "convolutions are not factorised")
        if name in ignore or grouped:
            continue
        if _masks.is_masked(modules[name]):
            raise ValueError(f"layer {name!r} is masked: compact the pruned model first (small = pruner.compact(); "
                             f"low_rank(small, ...)), or bake the masks (pruner.bake()), or pass ignore=[{name!r}]")
        todo.append(name)
    _warn_zero_channels(modules, todo)
    report = {}
    for name in todo:
        layer = modules[name]
        new = factorize(layer, rank, energy)
        before = sum(p.numel() for p in layer.parameters())
        after = sum(p.numel() for p in new.parameters())
        if after >= before:
            continue
        set_submodule(model, name, new)
        report[name] = (new[0].weight.shape[0], before, after)
    return report


def _warn_zero_channels(modules: dict[str, nn.Module], names: list[str]) -> None:
    """Warn about layers holding all-zero output rows or input channels (baked channel pruning): their factors
    keep the full width."""
    for name in names:
        w = modules[name].weight.detach()
        rows = int((w.reshape(w.shape[0], -1).abs().sum(1) == 0).sum())
        cols = int((w.transpose(0, 1).reshape(w.shape[1], -1).abs().sum(1) == 0).sum())
        if rows or cols:
            warnings.warn(f"low_rank: {name!r} has {rows} all-zero output rows and {cols} all-zero input channels "
                          "(baked channel pruning?): its factors keep the full width and training brings those "
                          "channels back; compact the pruned model first (pruner.compact())", RuntimeWarning,
                          stacklevel=3)
