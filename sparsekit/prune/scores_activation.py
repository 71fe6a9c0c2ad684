"""Data-dependent criteria from each channel's feature map (the layer's output after BN/activation).

An attention head is a channel whose feature map is the head's output before the output projection
(``[tokens, head_dim]`` per sample, ``head_taps``): ``hrank`` is then the rank of that matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .calibration import LayerContext
from .criteria import register

__all__ = ["apoz", "mean_activation", "entropy", "variance", "hrank", "ENTROPY_BINS"]

ENTROPY_BINS = 32


@register("apoz", needs=("activations",), doc="1 - APoZ, the average percentage of zero activations after "
                                              "ReLU; mostly-zero neurons go first (Hu et al. 2016, 'Network "
                                              "Trimming: A Data-Driven Neuron Pruning Approach')")
def apoz(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: 1 - fraction of feature-map values <= 0 over ``calib`` (Hu et al. 2016). Values <= 0
    count as zeros, as they are after the ReLU that follows (the feature map is taken after BN/ReLU)."""
    return 1.0 - ctx.stat("act_zeros") / ctx.stat("act_count")


@register("mean_activation", needs=("activations",), doc="mean activation of each channel over calib "
                                                         "(Molchanov et al. 2017, 'Pruning Convolutional Neural "
                                                         "Networks for Resource Efficient Inference')")
def mean_activation(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: mean of the feature map over samples and positions (Molchanov et al. 2017, sec. 2.2)."""
    return ctx.stat("act_sum") / ctx.stat("act_count")


@register("variance", needs=("activations",), doc="variance of each channel's activation over calib; "
                                                  "low-variance channels carry little information (Polyak & "
                                                  "Wolf 2015, 'Channel-level acceleration of deep face "
                                                  "representations', inbound / reduce-and-reuse pruning)")
def variance(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: E[a^2] - E[a]^2 of the feature map over samples and positions (Polyak & Wolf 2015)."""
    n = ctx.stat("act_count")
    mean = ctx.stat("act_sum") / n
    return (ctx.stat("act_sumsq") / n - mean.square()).clamp_min(0.0)


@register("entropy", needs=("activations",), doc="entropy of each channel's globally average-pooled "
                                                 "activation over calib (Luo & Wu 2017, 'An Entropy-based "
                                                 "Pruning Method for CNN Compression')")
def entropy(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: the pooled activations of the ``calib`` samples are binned into ``ENTROPY_BINS`` equal
    bins between their min and max; score = -sum p log p (Luo & Wu 2017). A constant channel scores 0."""
    gap = ctx.stat("gap")                                       # [samples, C]
    lo, hi = gap.amin(0), gap.amax(0)
    span = hi - lo
    norm = (gap - lo) / span.clamp_min(1e-12)
    bins = (norm * ENTROPY_BINS).floor().clamp(0, ENTROPY_BINS - 1).long()
    counts = torch.zeros(ENTROPY_BINS, gap.shape[1], dtype=torch.float64).scatter_add_(
        0, bins, torch.ones_like(gap, dtype=torch.float64))
    p = counts / gap.shape[0]
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(0)
    return torch.where(span > 1e-12, h, torch.zeros_like(h))


# Not comparable across layers: a feature map's rank is at most min(H, W) (a linear layer's at most 1), so a global
# threshold removes the channels of the layers with the smallest maps first, whatever they carry. HRank (Lin et al.
# 2020) prunes each layer to its own preset rate; dividing by min(H, W) would be a criterion of our own, not the
# paper's, so global scope is refused (Pruner: scope="layer").
@register("hrank", needs=("rank",), comparable=False,
          doc="average rank of each channel's feature maps over calib; low-rank maps carry less information "
              "(Lin et al. 2020, 'HRank: Filter Pruning using High-Rank Feature Map')")
def hrank(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: mean over ``calib`` samples of the matrix rank of its H x W feature map (Lin et al.
    2020). For a linear layer a neuron's map is one number: rank 1 if nonzero, else 0."""
    return ctx.stat("rank_sum") / ctx.stat("rank_count")
