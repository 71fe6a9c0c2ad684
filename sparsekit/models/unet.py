"""U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation").

Four encoder levels of two 3x3 conv - BN - ReLU (64, 128, 256, 512 channels, times ``width``), each followed by
2x2 max pooling, a 1024-channel bottleneck, and four decoder levels: a 2x2 stride-2 ``nn.ConvTranspose2d``
up-convolution halving the channels, concatenated with the encoder's output of that level (the skip), then two
3x3 conv - BN - ReLU; a 1x1 conv (``fc``) gives ``num_classes`` maps. Convolutions are padded (outputs keep the
input size, as most implementations do; the paper's are unpadded and crop the skips), with BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int, check_width, scaled

__all__ = ["DoubleConv", "UNet"]


class DoubleConv(nn.Sequential):
    """3x3 conv - BN - ReLU, twice."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
                         nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class UNet(ReferenceModel):
    """U-Net; ``width`` scales every channel count, ``image_size`` (a multiple of 16) sets ``example_input``."""

    def __init__(self, num_classes: int = 2, width: float = 1.0, in_channels: int = 3, image_size: int = 128) -> None:
        super().__init__()
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.image_size = check_positive_int(image_size, "image_size")
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x2 poolings), got {image_size}")
        chans = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.downs = nn.ModuleList()
        ch = in_channels
        for c in chans:
            self.downs.append(DoubleConv(ch, c))
            ch = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(ch, scaled(1024, width))
        ch = scaled(1024, width)
        self.ups, self.decs = nn.ModuleList(), nn.ModuleList()
        for c in reversed(chans):
            self.ups.append(nn.ConvTranspose2d(ch, c, 2, stride=2))
            self.decs.append(DoubleConv(2 * c, c))
            ch = c
        self.fc = nn.Conv2d(ch, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], 1))
        return self.fc(x)

    def example_input(self, batch: int = 2) -> Tensor:
        """A seeded ``[batch, in_channels, image_size, image_size]`` image."""
        return self._randn(batch, self.in_channels, self.image_size, self.image_size)
