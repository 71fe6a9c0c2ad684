"""Fully connected models: ``MLP`` (e.g. LeNet-300-100) and ``FFN``, a transformer feed-forward block.

``FFN`` (dim -> hidden -> out, default 768 -> 3072 -> 768 as in BERT-base) is the natural target for
block-sparse and n:m kernels: two large GEMMs whose shapes are multiples of every common block size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int

__all__ = ["MLP", "FFN"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _activation(name: object) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()  # type: ignore[index]


class MLP(ReferenceModel):
    """Linear-ReLU stack over ``sizes`` (input, hidden..., classes); the default is LeNet-300-100.

    Hidden layers live in ``layers`` (an ``nn.Sequential``); the last Linear is ``fc``. Inputs of any
    shape ``[batch, ...]`` are flattened to ``[batch, sizes[0]]``.
    """

    def __init__(self, sizes: Sequence[int] = (784, 300, 100, 10), activation: str = "relu") -> None:
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2:
            raise ValueError(f"sizes must be a sequence of at least 2 positive ints (input, ..., classes), "
                             f"got {sizes!r}")
        sizes = [check_positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
        self.sizes = tuple(sizes)
        hidden: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            hidden += [nn.Linear(a, b), _activation(activation)]
        self.layers = nn.Sequential(*hidden)
        self.fc = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(torch.flatten(x, 1)))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, sizes[0]]`` tensor."""
        return self._randn(batch, self.sizes[0])


class FFN(ReferenceModel):
    """Transformer feed-forward block: ``fc2(act(fc1(x)))``, ``dim -> hidden -> out`` over the last dim.

    No classifier: ``.fc`` is an alias (a property, not a second registration) of the output projection
    ``fc2``. Input ``[batch, tokens, dim]`` (any leading dims work).
    """

    def __init__(self, dim: int = 768, hidden: int = 3072, out: int | None = None, activation: str = "gelu",
                 tokens: int = 16) -> None:
        super().__init__()
        dim = check_positive_int(dim, "dim")
        hidden = check_positive_int(hidden, "hidden")
        out = dim if out is None else check_positive_int(out, "out")
        self.dim, self.tokens = dim, check_positive_int(tokens, "tokens")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(hidden, out)

    @property
    def fc(self) -> nn.Linear:
        """The output projection ``fc2`` (this block has no classifier)."""
        return self.fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, tokens, dim]`` tensor."""
        return self._randn(batch, self.tokens, self.dim)
