"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20 and ResNet-56 (depth = 6n + 2).

Three stages of ``n`` basic blocks at 16/32/64 channels (times ``width``), a 3x3 stem, global average
pooling and ``fc``. Shortcuts follow option B: identity when shapes match, otherwise a 1x1 conv (stride 2
where the stage downsamples) + BN projection, so every residual add is between tensors of equal shape.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int, check_width, scaled

__all__ = ["BasicBlock", "ResNetCifar", "ResNet20", "ResNet56"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU. ``shortcut`` is ``None`` for identity."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class ResNetCifar(ReferenceModel):
    """CIFAR ResNet of ``depth`` = 6n + 2 layers for 32x32 (any size works: pooling is global).

    Modules: ``conv1``/``bn1`` stem, ``layer1..layer3`` (``nn.Sequential`` of ``BasicBlock``), ``fc``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        depth = check_positive_int(depth, "depth")
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.image_size = check_positive_int(image_size, "image_size")
        blocks = (depth - 2) // 6
        c1, c2, c3 = (scaled(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(c1, c1, blocks, stride=1)
        self.layer2 = self._stage(c1, c2, blocks, stride=2)
        self.layer3 = self._stage(c2, c3, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, in_channels, image_size, image_size]`` tensor (32x32 by default)."""
        return self._randn(batch, self.in_channels, self.image_size, self.image_size)


class ResNet20(ResNetCifar):
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27M parameters at width 1)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__(20, num_classes, width, in_channels, image_size)


class ResNet56(ResNetCifar):
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85M parameters at width 1)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__(56, num_classes, width, in_channels, image_size)
