"""R3D-18 (Tran et al. 2018, "A Closer Look at Spatiotemporal Convolutions for Action Recognition"): ResNet-18
with 3-D convolutions, for video clips [B, 3, frames, H, W] (16 x 112 x 112 in the paper).

Stem conv 3x7x7, stride (1, 2, 2) - BN - ReLU, four stages of two basic blocks (3x3x3 - BN - ReLU - 3x3x3 - BN,
residual add) at 64/128/256/512 channels (times ``width``), stride 2 in every dim on the first block of stages
2-4 with a 1x1x1 conv + BN projection shortcut, global average pooling and ``fc``. The layout of torchvision's
``r3d_18`` (module names simplified: ``conv1`` / ``bn1`` / ``conv2`` / ``bn2`` per block).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int, check_width, scaled

__all__ = ["BasicBlock3d", "R3D18"]


class BasicBlock3d(nn.Module):
    """3x3x3 (stride) - BN - ReLU - 3x3x3 - BN, plus the input (or its projection ``downsample``), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class R3D18(ReferenceModel):
    """R3D-18; ``width`` scales every channel count; ``frames`` and ``image_size`` only set ``example_input``."""

    def __init__(self, num_classes: int = 400, width: float = 1.0, in_channels: int = 3, frames: int = 16,
                 image_size: int = 112) -> None:
        super().__init__()
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.frames = check_positive_int(frames, "frames")
        self.image_size = check_positive_int(image_size, "image_size")
        if frames < 8 or image_size < 16:
            raise ValueError(f"frames must be at least 8 and image_size at least 16 (total strides 8 and 16), got "
                             f"{frames} and {image_size}")
        stem = scaled(64, width)
        self.conv1 = nn.Conv3d(in_channels, stem, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(stem)
        self.relu = nn.ReLU()
        ch = stem
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            out = scaled(planes, width)
            stages.append(nn.Sequential(BasicBlock3d(ch, out, stride), BasicBlock3d(out, out)))
            ch = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, in_channels, frames, image_size, image_size]`` clip (16 x 112 x 112 by default)."""
        return self._randn(batch, self.in_channels, self.frames, self.image_size, self.image_size)
