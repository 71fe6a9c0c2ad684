"""Reference models, defined here (no torchvision, no downloads).

Every model has ``.fc`` (its classifier; for ``FFN`` the output projection) and
``example_input(batch=2)``, a seeded input of the shape ``forward`` expects. Small test versions come from
``width`` (conv nets) or the size arguments (MLP, FFN, transformer).

    build("resnet20", width=0.25)       by name, keyword arguments passed to the constructor
    available()                         the names ``build`` accepts
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .lenet import LeNet5
from .mlp import FFN, MLP
from .r3d import R3D18
from .resnet import ResNet50
from .resnet_cifar import ResNet20, ResNet56, ResNetCifar
from .transformer import TransformerEncoder, bert_base_config
from .unet import UNet
from .vgg import VGG16_BN
from .vit import VisionTransformer, vit_b_16_config

__all__ = ["LeNet5", "MLP", "FFN", "ResNetCifar", "ResNet20", "ResNet56", "VGG16_BN", "ResNet50", "R3D18", "UNet",
           "TransformerEncoder", "bert_base_config", "VisionTransformer", "vit_b_16_config", "available", "build"]


def _bert_base(**kw: object) -> TransformerEncoder:
    cfg: dict = {**bert_base_config(), **kw}
    return TransformerEncoder(**cfg)


def _vit_b_16(**kw: object) -> VisionTransformer:
    return VisionTransformer(**{**vit_b_16_config(), **kw})


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "mlp": MLP,
    "ffn": FFN,
    "resnet20": ResNet20,
    "resnet56": ResNet56,
    "vgg16_bn": VGG16_BN,
    "resnet50": ResNet50,
    "r3d_18": R3D18,
    "unet": UNet,
    "transformer": TransformerEncoder,
    "bert_base": _bert_base,
    "vit": VisionTransformer,
    "vit_b_16": _vit_b_16,
}


def available() -> list[str]:
    """Names accepted by ``build``, sorted."""
    return sorted(_REGISTRY)


def build(name: str, **kwargs: object) -> nn.Module:
    """Construct the reference model ``name`` (case-insensitive) with ``kwargs`` for its constructor."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key](**kwargs)
