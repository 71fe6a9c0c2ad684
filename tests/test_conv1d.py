"""Conv1d layers (audio / time-series models) through the pruning layer: every granularity, the criteria
families (weights, activations, gradients, reconstruction of a Conv1d consumer, BN scales), structural
compaction through BatchNorm1d, a residual add, a depthwise Conv1d and pooling, and save / load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.prune.compact import apply_widths, compacted_widths


class AudioNet(nn.Module):
    def __init__(self, padding: int | str = 2):
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 5, padding=2)
        self.bn0 = nn.BatchNorm1d(16)
        self.c1 = nn.Conv1d(16, 24, 5, padding=padding)
        self.bn1 = nn.BatchNorm1d(24)
        self.c2 = nn.Conv1d(24, 24, 3, padding=2, dilation=2)
        self.dw = nn.Conv1d(24, 24, 3, stride=2, padding=1, groups=24)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.c1(h)))
        h = h + torch.relu(self.c2(h))                     # residual: c1 and c2 outputs coupled
        h = nn.functional.max_pool1d(torch.relu(self.dw(h)), 2)
        return self.fc(self.pool(h).flatten(1))


def _model(seed: int = 0, **kw) -> AudioNet:
    torch.manual_seed(seed)
    m = AudioNet(**kw)
    with torch.no_grad():
        for bn in (m.bn0, m.bn1):
            bn.weight.uniform_(0.2, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _data(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("criterion", ["l1", "fpgm", "apoz", "mean_activation", "taylor", "bn_scale", "lasso",
                                       "thinet"])
def test_channel_pruning_compacts_conv1d(criterion, tmp_path):
    model = _model()
    x = torch.randn(2, 4, 32)
    calib = _data()
    needs_targets = criterion == "taylor"
    kw = {"calib": calib if needs_targets else [b for b, _ in calib]} if criterion not in ("l1", "fpgm",
                                                                                           "bn_scale") else {}
    if needs_targets:
        kw["loss_fn"] = nn.functional.cross_entropy
    # bn_scale needs a BatchNorm after each pruned layer; lasso / thinet a plain chain to the next layer (here
    # stem -> bn0 -> relu -> c1, a Conv1d whose unfolded input they reconstruct)
    ignore = {"bn_scale": ["c2", "dw", "fc"], "lasso": ["c1", "c2", "dw", "fc"],
              "thinet": ["c1", "c2", "dw", "fc"]}.get(criterion, [])
    pruner = sk.prune.Pruner(model, (x,), criterion=criterion, granularity="channel", sparsity=0.5, ignore=ignore,
                             **kw)
    pruner.step()
    small = pruner.compact()
    assert small.stem.out_channels < 16 and small.c1.out_channels == small.c2.out_channels == small.dw.groups
    if not ignore:
        assert small.c1.out_channels < 24
    sk.verify(model, small, x, atol=1e-4)
    assert small.fc.out_features == 3
    sk.save(small, tmp_path / "m")
    sk.verify(small, sk.load(tmp_path / "m", AudioNet()).eval(), x, atol=0)
    fresh = apply_widths(AudioNet(), compacted_widths(small))
    fresh.load_state_dict(small.state_dict())


@pytest.mark.parametrize("granularity,kw", [("element", {}), ("block", {"block": (8, 4)}), ("nm", {"n": 2, "m": 4})])
def test_weight_granularities_on_conv1d(granularity, kw):
    """A Conv1d weight is pruned as its 2-D view [C_out, C_in * k] (blocks and n:m groups along C_in * k)."""
    model = _model()
    x = torch.randn(2, 4, 32)
    sk.prune.Pruner(model, (x,), granularity=granularity, sparsity=0.5, ignore=["dw", "fc"], **kw).step()
    w = model.c2.weight.reshape(24, -1)
    assert 0.45 <= float((w == 0).float().mean()) <= 0.55


def test_reconstruction_with_same_padding_consumer():
    """lasso / thinet read the consumer's unfolded input: a Conv1d consumer with padding='same' (odd kernel)
    unfolds like its numeric padding."""
    x = torch.randn(2, 4, 32)
    calib = [b for b, _ in _data()]
    a, b = _model(padding=2), _model(padding="same")
    for m in (a, b):     # stem's consumer is c1, with padding 2 or "same"
        sk.prune.Pruner(m, (x,), criterion="thinet", granularity="channel", sparsity=0.5, calib=calib,
                        ignore=["c1", "c2", "dw", "fc"]).step()
        assert int((m.bn0.weight == 0).sum()) == 8
    torch.testing.assert_close(a(x), b(x))
