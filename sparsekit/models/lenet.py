"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, sized for any square input from 4 px up.

conv5(6) - pool2 - conv5(16) - pool2 - fc(120) - fc(84) - fc(num_classes). Padding adapts to the input:
28x28 (MNIST) pads conv1 by 2 (the usual 28 -> 28 -> 14 -> 10 -> 5), 32x32 pads nothing (the original
32 -> 28 -> 14 -> 10 -> 5), and inputs too small for an unpadded conv2 (e.g. 8x8 sklearn digits) pad conv2
by 2 as well (8 -> 8 -> 4 -> 4 -> 2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int

__all__ = ["LeNet5"]


class LeNet5(ReferenceModel):
    """LeNet-5 for ``image_size`` x ``image_size`` inputs with ``in_channels`` channels.

    Layers: ``conv1``, ``conv2``, ``fc1`` (120), ``fc2`` (84), ``fc`` (the classifier).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        num_classes = check_positive_int(num_classes, "num_classes")
        in_channels = check_positive_int(in_channels, "in_channels")
        image_size = check_positive_int(image_size, "image_size")
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4 (two 2x2 poolings), got {image_size}")
        self.in_channels, self.image_size = in_channels, image_size
        pad1 = 0 if image_size >= 32 else 2
        size = (image_size + 2 * pad1 - 4) // 2
        pad2 = 0 if size >= 10 else 2
        size = (size + 2 * pad2 - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad1)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc(self.act(self.fc2(self.act(self.fc1(x)))))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, in_channels, image_size, image_size]`` tensor."""
        return self._randn(batch, self.in_channels, self.image_size, self.image_size)
