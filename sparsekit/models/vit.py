"""A Vision Transformer built from PyTorch's stock modules (``nn.TransformerEncoder`` layers, whose attention is
``nn.MultiheadAttention``, as in torchvision's ``vit_b_16``, whose own encoder blocks wrap the same attention): the
model for "my transformer uses torch's own attention" (``sk.nn.mha_to_linear`` turns its packed q / k / v
projections into Linear layers to prune them).

Patch embedding (a Conv2d with stride = kernel = patch), a class token and learned position embeddings,
pre-norm encoder layers (GELU MLP), a final LayerNorm, and the classifier ``fc`` on the class token.
``vit_b_16_config()`` gives ViT-B/16's sizes (224x224 images, 16x16 patches, 768 wide, 12 heads, MLP 3072,
12 layers, 1000 classes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int

__all__ = ["VisionTransformer", "vit_b_16_config"]


def vit_b_16_config(num_classes: int = 1000) -> dict[str, int]:
    """ViT-B/16's sizes for ``VisionTransformer(**vit_b_16_config())``."""
    return {"image": 224, "patch": 16, "dim": 768, "heads": 12, "mlp": 3072, "layers": 12,
            "num_classes": num_classes}


class VisionTransformer(ReferenceModel):
    """Images ``[batch, 3, image, image]`` -> logits ``[batch, num_classes]`` (defaults: a small test model)."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 64, heads: int = 4, mlp: int = 256,
                 layers: int = 2, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        for name, v in (("image", image), ("patch", patch), ("dim", dim), ("heads", heads), ("mlp", mlp),
                        ("layers", layers), ("num_classes", num_classes)):
            check_positive_int(v, name)
        if image % patch:
            raise ValueError(f"patch must divide image={image}, got {patch}")
        if dim % heads:
            raise ValueError(f"heads must divide dim={dim}, got {heads}")
        self.image = image
        tokens = (image // patch) ** 2 + 1
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # (no nested tensors: this model takes no padding mask, and norm_first layers cannot use them)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (self.image, self.image):
            raise ValueError(f"x must be [batch, 3, {self.image}, {self.image}] images, got shape {tuple(x.shape)}")
        t = self.patch(x).flatten(2).transpose(1, 2)                       # [batch, patches, dim]
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.fc(self.ln(self.encoder(t))[:, 0])

    def example_input(self, batch: int = 2) -> Tensor:
        return self._randn(batch, 3, self.image, self.image)
