"""Data-independent criteria: scores from the weights alone (and, for ``bn_scale``, the next BatchNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .calibration import LayerContext, layer_seed
from .criteria import register
from .masks import _mask_param, as_2d

__all__ = ["magnitude", "random", "l1", "l2", "l1_mean", "fpgm", "mean_variance", "bn_scale"]


def _w(module: nn.Module) -> Tensor:
    return module.weight.detach()


def _rows(module: nn.Module) -> Tensor:
    w = _w(module)
    return w.reshape(w.shape[0], -1).float()


@register("magnitude", doc="|w| per element; low-magnitude weights go first (Han et al. 2015, "
                           "'Learning both Weights and Connections for Efficient Neural Networks')")
def magnitude(module: nn.Module) -> Tensor:
    """Absolute value of every weight (Han et al. 2015)."""
    return _w(module).abs()


@register("random", needs=("seed",), doc="uniform random scores from a seed and the layer's name: the baseline "
                                  "(e.g. Frankle & Carbin 2019, 'The Lottery Ticket Hypothesis', random pruning)")
def random(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Seeded uniform scores, different per layer, identical across runs for the same seed: one per weight, or one
    per output channel for channel granularity (a sum of per-weight draws would grow with the fan-in, and a
    global threshold would then empty the layers with few inputs first)."""
    gen = torch.Generator().manual_seed(layer_seed(ctx.seed, ctx.name))
    shape = _w(module).shape[:1] if ctx.granularity == "channel" else _w(module).shape
    return torch.rand(shape, generator=gen)


@register("l1", doc="L1 norm of each output channel/filter, sum of |w| (Li et al. 2017, "
                    "'Pruning Filters for Efficient ConvNets'); per element it equals magnitude")
def l1(module: nn.Module) -> Tensor:
    """Element scores |w|; summed per output channel by the granularity code they are the filter L1 norm."""
    return _w(module).abs()


@register("l2", doc="squared L2 norm of each filter, sum of w^2 (Li et al. 2017 / He et al. 2018, 'Soft "
                    "Filter Pruning'); same order as the L2 norm")
def l2(module: nn.Module) -> Tensor:
    """Element scores w^2: per channel the squared L2 norm, which ranks filters like their L2 norm."""
    return _w(module).square()


@register("l1_mean", doc="filter L1 norm divided by its number of weights, so filters of different layers "
                         "compare under one global threshold (Salama et al. 2019, 'Pruning at a Glance: "
                         "Global Neural Pruning for Model Compression', seed 003)")
def l1_mean(module: nn.Module) -> Tensor:
    """Element scores |w| / (weights the filter still has): per channel the mean |w| over its unmasked
    weights (Salama et al. 2019, Alg. 1: ``L1(F_i) / size(F_i)``, where removing a filter also removes the
    next layer's input channel it fed, so ``size`` shrinks). Dividing by the full filter size instead would
    lower every later layer's scores at each iterative step (their masked input columns count as zeros)
    until the global threshold empties them."""
    w = _w(module)
    keep = _mask_param(module, "weight")
    if keep is None:
        return w.abs() / max(1, w[0].numel())
    count = as_2d(keep.mask).sum(1).clamp_min(1).to(w.dtype)      # a removed filter (count 0) scores 0
    return w.abs() / count.reshape((-1,) + (1,) * (w.dim() - 1))


# Not comparable across layers: a filter's distance sum grows with the number of filters in its layer and with
# their norms, so one global threshold empties the small / small-weight layers first. FPGM itself (He et al. 2019)
# prunes a fixed fraction of every layer; a normalised variant (e.g. / (C - 1) / mean norm) would be a
# criterion of our own, not the paper's, so global scope is refused (Pruner: scope="layer").
@register("fpgm", comparable=False,
          doc="filter pruning via geometric median: a filter's summed Euclidean distance to the other "
              "filters of its layer; the most replaceable (nearest the median) go first (He et al. "
              "2019, 'Filter Pruning via Geometric Median for Deep CNN Acceleration')")
def fpgm(module: nn.Module) -> Tensor:
    """Per channel: sum over j of ||F_c - F_j||_2 over the layer's remaining filters; the filters closest to
    the layer's geometric median (smallest sum) carry information the others already have (He et al. 2019).
    Filters an earlier step removed (all their weights masked) are left out of every sum and score 0."""
    rows = _rows(module).double()
    keep = _mask_param(module, "weight")
    if keep is None:
        return torch.cdist(rows, rows).sum(1)
    # a removed filter is a zero row: counted, it would add each filter's own norm to its sum and so rank the
    # remaining filters by norm rather than by their distance to the median of the filters that are left
    alive = as_2d(keep.mask).any(1).to(rows.device)
    out = rows.new_zeros(rows.shape[0])
    live = rows[alive]
    out[alive] = torch.cdist(live, live).sum(1)
    return out


# (scaled by the layer's own maxima and split by a per-layer 2-means: a score says where a filter stands in its
# layer, so one global threshold over layers has no meaning; the paper clusters each layer on its own)
@register("mean_variance", comparable=False, doc="filters clustered by (mean |w|, variance of w); the low cluster is "
                               "redundant (Gong et al. 2020, 'CNN model pruning combined with tensor "
                               "decomposition compression', seed 000 sec. 4.2)")
def mean_variance(module: nn.Module) -> Tensor:
    """Per channel. Each filter is a point (mean |w|, var w), both scaled by their layer maximum; 2-means
    (initialised at the smallest and largest point) splits the layer; filters of the low cluster score
    below every filter of the high one, ordered by their distance from the origin (Gong et al. 2020)."""
    rows = _rows(module).double()
    pts = torch.stack([rows.abs().mean(1), rows.var(1, unbiased=False)], dim=1)
    pts = pts / pts.amax(0).clamp_min(1e-30)
    norm = pts.norm(dim=1)
    if pts.shape[0] < 2:
        return norm
    centers = torch.stack([pts[norm.argmin()], pts[norm.argmax()]])
    for _ in range(20):
        assign = torch.cdist(pts, centers).argmin(1)
        new = torch.stack([pts[assign == k].mean(0) if bool((assign == k).any()) else centers[k]
                           for k in range(2)])
        if torch.allclose(new, centers):
            break
        centers = new
    high = int(centers.norm(dim=1).argmax())
    return norm + 2.0 * (assign == high).double()


@register("bn_scale", needs=("bn",), doc="|gamma| of the BatchNorm after each channel; train with an L1 penalty "
                                         "on gamma first (Liu et al. 2017, 'Learning Efficient Convolutional "
                                         "Networks through Network Slimming')")
def bn_scale(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: |gamma| of the BatchNorm that follows the layer (Liu et al. 2017). See
    ``methods.slimming`` for the L1 penalty on the scales."""
    if ctx.bn is None or getattr(ctx.bn, "weight", None) is None:
        raise ValueError(f"bn_scale needs an affine BatchNorm right after layer {ctx.name!r}; it has none")
    return ctx.bn.weight.detach().abs()
