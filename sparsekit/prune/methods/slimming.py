"""Network slimming (Liu et al. 2017, 'Learning Efficient Convolutional Networks through Network Slimming').

Train with ``loss + bn_l1_penalty(model, strength)`` so that the BatchNorm scales of unimportant channels
shrink towards 0, then prune the channels with the smallest |gamma| under one global threshold:

    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + bn_l1_penalty(model, 1e-4)
        ...
    pruner = slimming_pruner(model, example_inputs, sparsity=0.5)
    pruner.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import BATCH_NORMS
from ..pruner import Pruner

__all__ = ["bn_l1_penalty", "slimming_pruner"]

_BN = BATCH_NORMS


def bn_l1_penalty(model: nn.Module, strength: float = 1e-4, modules: Iterable[nn.Module] | None = None) -> Tensor:
    """``strength * sum |gamma|`` over the affine BatchNorm layers of ``model`` (or ``modules``): the
    sparsity-inducing term added to the training loss. Differentiable; 0 if there is no BatchNorm."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 <= strength < math.inf:
        raise ValueError(f"strength must be a float >= 0, got {strength!r}")
    mods = list(model.modules() if modules is None else modules)
    scales = [m.weight for m in mods if isinstance(m, _BN) and m.weight is not None]
    if not scales:
        return torch.zeros(())
    return strength * sum(w.abs().sum() for w in scales)


def slimming_pruner(model: nn.Module, example_inputs: Any, sparsity: float = 0.5, scope: str = "global",
                    **kwargs: Any) -> Pruner:
    """A ``Pruner`` with criterion ``bn_scale`` on whole channels, global by default (Liu et al. use one
    threshold over all scaling factors). Layers without a BatchNorm after them must be ignored."""
    return Pruner(model, example_inputs, criterion="bn_scale", granularity="channel", scope=scope,
                  sparsity=sparsity, **kwargs)
