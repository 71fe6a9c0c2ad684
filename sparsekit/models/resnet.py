"""ResNet-50 (He et al. 2016) in the ImageNet layout, bottleneck v1.5 (stride on the 3x3 conv).

Stem conv7x7/2 - BN - ReLU - maxpool3x3/2, four stages of [3, 4, 6, 3] bottlenecks (1x1 reduce, 3x3,
1x1 expand x4) at 64/128/256/512 base channels (times ``width``), a 1x1 conv + BN projection shortcut on
the first block of every stage, global average pooling and ``fc``. Module names match torchvision's.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int, check_width, scaled

__all__ = ["Bottleneck", "ResNet50"]


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride) - 1x1 (x4) with BN and ReLU; ``downsample`` is the projection or ``None``."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(ReferenceModel):
    """ResNet-50; ``width`` scales every channel count, ``image_size`` only sets ``example_input``."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 image_size: int = 224) -> None:
        super().__init__()
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.image_size = check_positive_int(image_size, "image_size")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 (total stride 32), got {image_size}")
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        ch = stem
        stages = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            p = scaled(planes, width)
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(ch, p, stride if i == 0 else 1))
                ch = p * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, in_channels, image_size, image_size]`` tensor (224x224 by default)."""
        return self._randn(batch, self.in_channels, self.image_size, self.image_size)
