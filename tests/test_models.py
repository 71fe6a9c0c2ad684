"""Reference models: shapes, layouts, parameter counts, registry, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit import models

# (name, constructor kwargs, expected output shape for example_input(batch=2))
CASES = [
    ("lenet5", {}, (2, 10)),
    ("lenet5", {"image_size": 8}, (2, 10)),                       # 8x8 sklearn digits
    ("lenet5", {"image_size": 32, "in_channels": 3}, (2, 10)),
    ("mlp", {}, (2, 10)),
    ("mlp", {"sizes": [64, 32, 5]}, (2, 5)),
    ("ffn", {"dim": 64, "hidden": 256, "tokens": 4}, (2, 4, 64)),
    ("resnet20", {"width": 0.5}, (2, 10)),
    ("resnet56", {"width": 0.25, "num_classes": 100}, (2, 100)),
    ("vgg16_bn", {"width": 0.125}, (2, 10)),
    ("resnet50", {"width": 0.125, "image_size": 64, "num_classes": 7}, (2, 7)),
    ("r3d_18", {"width": 0.125, "frames": 8, "image_size": 16, "num_classes": 7}, (2, 7)),
    ("unet", {"width": 0.125, "image_size": 32, "num_classes": 3}, (2, 3, 32, 32)),
    ("transformer", {"vocab": 50, "dim": 32, "heads": 4, "ffn": 64, "layers": 2, "num_classes": 3}, (2, 3)),
    ("bert_base", {"vocab": 50, "dim": 48, "heads": 4, "ffn": 96, "layers": 1}, (2, 2)),
    ("vit", {}, (2, 10)),
    ("vit_b_16", {"image": 32, "dim": 48, "mlp": 96, "layers": 1, "num_classes": 5}, (2, 5)),
]


@pytest.mark.parametrize("name,kwargs,out_shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_forward_shape_and_fc(name, kwargs, out_shape):
    torch.manual_seed(0)
    model = models.build(name, **kwargs).eval()
    x = model.example_input(batch=2)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == out_shape
    if isinstance(model.fc, nn.Conv2d):            # a segmentation net: per-pixel classes, channels on dim 1
        assert model.fc.kernel_size == (1, 1) and model.fc.out_channels == out_shape[1]
    else:
        assert isinstance(model.fc, nn.Linear) and model.fc.out_features == out_shape[-1]
    assert torch.equal(x, model.example_input(batch=2))  # seeded: deterministic


def test_available_and_build_errors():
    names = models.available()
    assert {"lenet5", "mlp", "ffn", "resnet20", "resnet56", "vgg16_bn", "resnet50", "transformer",
            "bert_base", "vit", "vit_b_16"} <= set(names)
    assert isinstance(models.build("ResNet20", width=0.25), models.ResNet20)
    with pytest.raises(ValueError, match="resnet20"):
        models.build("alexnet")
    with pytest.raises(TypeError):
        models.build(3)


def test_parameter_counts_match_published():
    assert sum(p.numel() for p in models.LeNet5().parameters()) == 61706
    # option-B projections add 2 x (1x1 conv + BN) to the 0.27M of He et al.
    assert sum(p.numel() for p in models.ResNet20().parameters()) == 272474
    assert sum(p.numel() for p in models.ResNet50().parameters()) == 25557032  # torchvision's count
    assert sum(p.numel() for p in models.R3D18().parameters()) == 33371472     # torchvision's r3d_18
    assert sum(p.numel() for p in models.UNet().parameters()) == 31037698      # the common BN U-Net's count


def test_resnet_cifar_projection_shortcuts():
    m = models.ResNet20(width=0.5)
    assert m.layer1[0].shortcut is None
    for stage in (m.layer2, m.layer3):
        conv, bn = stage[0].shortcut
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(bn, nn.BatchNorm2d)
        assert all(b.shortcut is None for b in stage[1:])
    assert len(models.ResNet56(width=0.25).layer2) == 9


def test_resnet50_layout():
    m = models.ResNet50(width=0.125, image_size=64)
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3, m.layer4)] == [3, 4, 6, 3]
    assert m.layer1[0].downsample is not None and m.layer1[1].downsample is None
    assert m.layer2[0].conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    assert m.fc.in_features == 4 * 64  # 512 * 0.125 * expansion 4


def test_vgg16_has_13_convs_with_bn():
    m = models.VGG16_BN(width=0.125)
    convs = [mod for mod in m.features if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.features) == 13
    assert convs[-1].out_channels == 64


def test_transformer_fused_qkv_and_padding():
    m = models.TransformerEncoder(vocab=30, dim=16, heads=2, ffn=32, layers=1, seq_len=6).eval()
    assert m.blocks[0].attn.qkv.out_features == 48
    ids = m.example_input(2)
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[:, 4:] = False
    other = ids.clone()
    other[:, 4:] = (other[:, 4:] + 1) % 30
    with torch.no_grad():
        assert torch.allclose(m(ids, pad), m(other, pad), atol=1e-6)
        assert not torch.allclose(m(ids), m(other))


def test_bert_base_config():
    cfg = models.bert_base_config()
    assert cfg == {"vocab": 30522, "dim": 768, "heads": 12, "ffn": 3072, "layers": 12, "num_classes": 2,
                   "max_len": 512}


def test_ffn_default_sizes_and_fc_alias():
    m = models.FFN()
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (768, 3072, 768)
    assert m.fc is m.fc2
    assert [n for n, _ in m.named_modules() if n] == ["fc1", "act", "fc2"]  # no duplicate registration


@pytest.mark.parametrize("ctor,kwargs,exc", [
    (models.ResNetCifar, {"depth": 21}, ValueError),
    (models.ResNet20, {"width": 0}, ValueError),
    (models.ResNet20, {"width": "1"}, TypeError),
    (models.MLP, {"sizes": [10]}, ValueError),
    (models.MLP, {"sizes": [10, 0]}, ValueError),
    (models.LeNet5, {"image_size": 3}, ValueError),
    (models.LeNet5, {"num_classes": 2.5}, TypeError),
    (models.VGG16_BN, {"image_size": 16}, ValueError),
    (models.R3D18, {"frames": 4}, ValueError),
    (models.UNet, {"image_size": 40}, ValueError),
    (models.TransformerEncoder, {"dim": 10, "heads": 4}, ValueError),
    (models.FFN, {"activation": "tanh"}, ValueError),
])
def test_bad_arguments(ctor, kwargs, exc):
    with pytest.raises(exc):
        ctor(**kwargs)


def test_transformer_heads_are_pruned_and_compacted():
    """The attention's inner width follows its head count, so the Pruner removes whole heads and compact()
    builds an encoder with fewer heads whose outputs equal the masked model's."""
    import sparsekit as sk
    from sparsekit.prune import Pruner

    torch.manual_seed(0)
    model = models.TransformerEncoder(vocab=50, dim=32, heads=4, ffn=64, layers=2).eval()
    ids = model.example_input(2)
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1, -3:] = False
    pruner = Pruner(model, (ids, pad), criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    for block in small.blocks:
        assert block.attn.heads == 2 and block.attn.qkv.out_features == 3 * 2 * 8
        assert block.attn.proj.in_features == 16 and block.ffn.fc1.out_features == 32
    sk.verify(model, small, (ids, pad), atol=1e-4)
    sk.verify(model, small, ids, atol=1e-4)


def test_vit_is_stock_torch_attention_and_compacts():
    """VisionTransformer is built from nn.TransformerEncoder layers (nn.MultiheadAttention): whole heads and MLP
    channels are removed through the dependency graph, the residual (LayerNorm) stream stays whole."""
    import sparsekit as sk
    from sparsekit.prune import Pruner

    torch.manual_seed(0)
    model = models.VisionTransformer().eval()
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)
    x = model.example_input(2)
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    layer = small.encoder.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 128
    assert small.patch.out_channels == 64
    sk.verify(model, small, x, atol=1e-4)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="patch must divide"):
        models.VisionTransformer(image=30, patch=8)
