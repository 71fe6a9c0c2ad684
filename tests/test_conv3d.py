"""Conv3d layers (video / volumetric models) through the pruning layer: the criteria families (weights,
activations, feature-map rank, gradients, BN scales, reconstruction of a Conv3d consumer), every weight
granularity, structural compaction through BatchNorm3d / InstanceNorm3d, a residual add, a depthwise Conv3d,
3-D pooling and resampling, parameter and FLOP counts, and save / load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk
from sparsekit.prune.compact import apply_widths, compacted_widths


class VolumeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm3d(16)
        self.c1 = nn.Conv3d(16, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(24)
        self.c2 = nn.Conv3d(24, 24, (1, 3, 3), padding=(0, 1, 1))
        self.inorm = nn.InstanceNorm3d(24, affine=True)
        self.dw = nn.Conv3d(24, 24, 3, stride=2, padding=1, groups=24)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = F.max_pool3d(h, 2)
        h = torch.relu(self.bn1(self.c1(h)))
        h = h + torch.relu(self.inorm(self.c2(h)))           # residual: c1 and c2 outputs coupled
        h = F.interpolate(torch.relu(self.dw(h)), scale_factor=2, mode="trilinear")
        return self.fc(self.pool(h).flatten(1))


def _model(seed: int = 0) -> VolumeNet:
    torch.manual_seed(seed)
    m = VolumeNet()
    with torch.no_grad():
        for bn in (m.bn0, m.bn1):
            bn.weight.uniform_(0.2, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
        m.inorm.weight.uniform_(0.5, 1.5)
    return m.eval()


def _data(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, 8, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("criterion", ["l1", "fpgm", "apoz", "hrank", "taylor", "bn_scale", "thinet"])
def test_channel_pruning_compacts_conv3d(criterion, tmp_path):
    model = _model()
    x = torch.randn(2, 2, 8, 8, 8)
    calib = _data()
    kw: dict = {}
    if criterion == "taylor":
        kw = {"calib": calib, "loss_fn": F.cross_entropy}
    elif criterion not in ("l1", "fpgm", "bn_scale"):
        kw = {"calib": [b for b, _ in calib]}
    # bn_scale needs a BatchNorm after each pruned layer; thinet a plain chain to the next layer (here
    # stem -> bn0 -> relu -> max_pool3d -> c1, a Conv3d whose unfolded input it reconstructs)
    ignore = {"bn_scale": ["c2", "dw", "fc"], "thinet": ["c1", "c2", "dw", "fc"]}.get(criterion, [])
    pruner = sk.prune.Pruner(model, (x,), criterion=criterion, granularity="channel", sparsity=0.5, ignore=ignore,
                             **kw)
    pruner.step()
    small = pruner.compact()
    assert small.stem.out_channels == small.bn0.num_features < 16
    assert small.c1.out_channels == small.c2.out_channels == small.inorm.num_features == small.dw.groups
    if not ignore:
        assert small.c1.out_channels < 24
    sk.verify(model, small, x, atol=1e-4)
    sk.save(small, tmp_path / "m")
    sk.verify(small, sk.load(tmp_path / "m", VolumeNet()).eval(), x, atol=0)
    fresh = apply_widths(VolumeNet(), compacted_widths(small))
    fresh.load_state_dict(small.state_dict())


@pytest.mark.parametrize("granularity,kw", [("element", {}), ("block", {"block": (8, 9)}), ("nm", {"n": 2, "m": 4})])
def test_weight_granularities_on_conv3d(granularity, kw):
    """A Conv3d weight is pruned as its 2-D view [C_out, C_in * kd * kh * kw]."""
    model = _model()
    x = torch.randn(2, 2, 8, 8, 8)
    sk.prune.Pruner(model, (x,), granularity=granularity, sparsity=0.5, ignore=["stem", "dw", "fc"], **kw).step()
    w = model.c2.weight.reshape(24, -1)
    assert 0.45 <= float((w == 0).float().mean()) <= 0.55


def test_cost_counts_conv3d_flops_and_masked_parameters():
    from sparsekit.prune.cost import model_cost

    model = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 4, 1)).eval()
    x = torch.randn(1, 2, 4, 5, 6)
    cost = model_cost(model, (x,))
    assert cost["flops"] == (8 * 2 * 27 + 4 * 8) * 4 * 5 * 6      # multiply-accumulates per sample, every voxel
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5, ignore=["3"])
    pruner.step()
    assert model_cost(model, (x,))["params"] == sum(p.numel() for p in pruner.compact().parameters())


def test_conv3d_consumer_rows_reproduce_the_conv():
    from sparsekit.prune.calibration import consumer_rows

    conv = nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(2, 1, 1),
                     padding_mode="replicate", bias=False)
    x = torch.randn(2, 3, 6, 7, 5)
    ref = conv(x).movedim(1, -1).reshape(-1, 4)
    torch.testing.assert_close(consumer_rows(conv, x) @ conv.weight.reshape(4, -1).T, ref, rtol=1e-5, atol=1e-5)


def test_hrank_ranks_3d_feature_maps():
    """HRank reads a channel's 3-D map [D, H, W] as the matrix [D*H, W]: channels with low-rank maps score
    lower (here channel 0's map is constant, channel 1's random)."""
    from sparsekit.prune.calibration import _acc_rank

    acc: dict = {}
    fmap = torch.randn(2, 3, 4, 5, 6)
    fmap[:, 0] = 1.0
    _acc_rank(acc, fmap)
    ranks = acc["rank_sum"] / acc["rank_count"]
    assert ranks[0] == 1 and ranks[1] == 6 and ranks[2] == 6


class _DenseBlock3d(nn.Module):
    """DenseNet-style 3-D block: pre-activation BatchNorm3d layers read the shared concatenated stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.bn1, self.c1 = nn.BatchNorm3d(8), nn.Conv3d(8, 4, 3, padding=1)
        self.bn2, self.c2 = nn.BatchNorm3d(12), nn.Conv3d(12, 4, 3, padding=1)
        self.head = nn.Conv3d(16, 3, 1)

    def forward(self, x):
        s = self.stem(x)
        s = torch.cat([s, self.c1(F.dropout3d(torch.relu(self.bn1(s)), 0.0))], 1)
        s = torch.cat([s, self.c2(torch.relu(self.bn2(s)))], 1)
        return self.head(nn.functional.pad(s, (1, 1, 1, 1, 1, 1), mode="circular"))


def test_dense_block_3d_selects_channels_from_the_shared_stream(tmp_path):
    from sparsekit.prune.graph import DependencyGraph

    torch.manual_seed(3)
    model = _DenseBlock3d().eval()
    for bn in (model.bn1, model.bn2):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 2, 6, 6, 6)
    graph = DependencyGraph.build(model, x)
    assert set(graph.selections) == {"bn1", "bn2"}
    assert all("dropout3d" not in g.reason and "pad" not in g.reason for g in graph.groups)
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5, ignore=["head"])
    pruner.step()
    small = pruner.compact()
    assert small.stem.out_channels < 8
    sk.verify(model, small, x, atol=1e-4)
    sk.save(small, tmp_path / "d")
    sk.verify(small, sk.load(tmp_path / "d", _DenseBlock3d()).eval(), x, atol=0)


def test_cost_counts_a_transposed_conv():
    from sparsekit.prune.cost import model_cost

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.up = nn.Conv2d(3, 16, 3, padding=1), nn.ConvTranspose2d(16, 12, 2, stride=2)
            self.b, self.c = nn.Conv2d(12, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.up(torch.relu(self.a(x)))))))

    torch.manual_seed(4)
    model = Up().eval()
    x = torch.randn(1, 3, 8, 8)
    cost = model_cost(model, (x,))
    assert cost["dense_flops"] == 16 * 27 * 64 + 16 * 12 * 4 * 64 + 8 * 12 * 9 * 256 + 2 * 8 * 256
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5, ignore=["c"])
    pruner.step()
    small = pruner.compact()
    masked = model_cost(model, (x,))
    assert masked["params"] == sum(p.numel() for p in small.parameters())
    assert masked["flops"] == model_cost(small, (x,))["flops"]


def test_batchnorm_over_tokens_is_pinned_and_grouped_consumers_refused():
    """A BatchNorm1d on a Linear's [N, T, C] output normalises the T positions, not the C channels: those stay
    whole (compaction used to resize the norm by them)."""
    from sparsekit.prune.calibration import consumer_rows

    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(2, 4, 8)
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small[0].out_features == 6 and small[1].num_features == 4
    sk.verify(model, small, x, atol=1e-5)
    with pytest.raises(ValueError, match="grouped conv"):
        consumer_rows(nn.Conv3d(4, 4, 1, groups=2), torch.randn(1, 4, 2, 2, 2))
