"""VGG-16 with batch norm for 32x32 inputs (the CIFAR variant of Li et al. 2017 and Salama et al. 2019).

Thirteen conv3x3-BN-ReLU layers in five max-pooled stages (64, 128, 256, 512, 512 channels, times
``width``), then ``fc1`` (512 -> 512) - ReLU - ``fc`` (512 -> classes). A global average pool before the
classifier makes inputs other than 32x32 work too (at 32x32 it is a no-op on the 1x1 map).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int, check_width, scaled

__all__ = ["VGG16_BN", "VGG16_CFG"]

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


class VGG16_BN(ReferenceModel):  # noqa: N801 - the published model's name
    """VGG-16-BN; ``features`` is an ``nn.Sequential`` of conv/BN/ReLU/pool, then ``fc1`` and ``fc``."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.image_size = check_positive_int(image_size, "image_size")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 (five 2x2 poolings), got {image_size}")
        layers: list[nn.Module] = []
        ch = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = scaled(int(v), width)
            layers += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.fc1 = nn.Linear(ch, hidden)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.relu(self.fc1(x)))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, in_channels, image_size, image_size]`` tensor (32x32 by default)."""
        return self._randn(batch, self.in_channels, self.image_size, self.image_size)
