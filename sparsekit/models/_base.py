"""Shared pieces of the reference models: the ``example_input`` contract and width scaling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ReferenceModel", "scaled", "check_positive_int", "check_width"]


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int, or raise naming the argument, the value given and what was expected."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_width(width: object) -> float:
    """Validate a width multiplier (a positive number; 1.0 is the published model)."""
    if not isinstance(width, (int, float)) or isinstance(width, bool):
        raise TypeError(f"width must be a number (1.0 = published size), "
                        f"got {type(width).__name__} {width!r}")
    if not width > 0:
        raise ValueError(f"width must be a positive number (1.0 = published size), got {width!r}")
    return float(width)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1: the channel count of a width-scaled layer."""
    return max(1, int(round(channels * width)))


class ReferenceModel(nn.Module):
    """Base class: every reference model has ``.fc`` (its classifier or output layer) and
    ``example_input(batch)``, a deterministic (seed 0) tensor of the shape ``forward`` expects."""

    def example_input(self, batch: int = 2) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
