"""Spread-out normalisation parameters for the compaction tests (shared by tests/test_compact.py and
tests/test_round_to.py): masked channels then matter and L1 choices are not ties."""

from __future__ import annotations

import torch
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm / GroupNorm weights and biases (and BatchNorm2d running statistics) drawn at random; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm, nn.BatchNorm1d)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) - 0.5)
                    mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return model.eval()
