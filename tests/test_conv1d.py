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


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect", bias=False), (2, 4, 11)),
    (nn.Conv1d(4, 6, 3, padding=2, dilation=2, stride=2, padding_mode="circular", bias=False), (2, 4, 13)),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", bias=False), (2, 4, 7, 9)),
    (nn.Conv2d(4, 6, (2, 3), padding="same", bias=False), (2, 4, 7, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (2, 4, 7, 9))],
    ids=["1d-same-reflect", "1d-circular-dilated-strided", "2d-replicate", "2d-same-uneven", "2d-strided"])
def test_consumer_rows_reproduce_the_conv(conv, shape):
    """Reconstruction criteria fit the consumer on its unfolded input: rows @ W^T must be the conv's output,
    whatever its padding mode (reflect / circular / replicate pad with data, not zeros) or 'same' padding."""
    from sparsekit.prune.calibration import consumer_rows

    x = torch.randn(*shape)
    rows = consumer_rows(conv, x)
    ref = conv(x).movedim(1, -1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(rows @ conv.weight.reshape(conv.out_channels, -1).T, ref, rtol=1e-5, atol=1e-5)


def test_unbatched_conv_input_is_pinned_not_misread():
    """A conv on an unbatched [C, L] input has its channels on dim 0: the graph must not couple them with what
    reads dim 1 (here a Linear over L), so they stay whole, with the reason."""
    from sparsekit.prune.graph import DependencyGraph

    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    graph = DependencyGraph.build(model, x)
    (g,) = [g for g in graph.groups if any(m.module == "0" and m.axis == "out" for m in g.members)]
    assert not g.prunable and "unbatched input" in g.reason
    assert not any(m.module == "2" for m in g.members)


def test_alpha_blend_refuses_a_conv1d_consumer():
    from sparsekit.prune.methods import AlphaBlend

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.q = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.q(torch.relu(self.c(x)).flatten(2))

    with pytest.raises(ValueError, match=r"cannot blend 'c': its consumer 'q' is an nn.Conv1d"):
        AlphaBlend(M(), (torch.randn(1, 3, 6, 6),), {"c": 4})


def test_prelu_slopes_neither_score_nor_cost_like_weights():
    """Per-channel PReLU slopes are coupled members, not weights: group L1 scores leave them out, and the
    masked model's parameter count drops the slopes of removed channels (as compaction does)."""
    from sparsekit.prune.cost import model_cost
    from sparsekit.prune.graph import DependencyGraph

    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv1d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10)
    graph = DependencyGraph.build(model, x)
    before = graph.group_scores()
    with torch.no_grad():
        model[1].weight[0] = 100.0
    after = DependencyGraph.build(model, x).group_scores()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5, ignore=["2"])
    pruner.step()
    small = pruner.compact()
    assert model_cost(model, (x,))["params"] == \
        sum(p.numel() for p in small.parameters())


@pytest.mark.parametrize("mid", [nn.PReLU(8), nn.BatchNorm1d(8), nn.InstanceNorm1d(8, affine=True)],
                         ids=["prelu", "batchnorm", "instancenorm"])
def test_masked_parameter_count_matches_the_compacted_model(mid):
    """model_cost of a channel-masked model (its per-channel members masked too, as parametrizations) counts
    what compaction keeps: neither the removed channels' scales / slopes nor the masks' stored originals twice."""
    from sparsekit.prune.cost import model_cost

    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), mid, nn.ReLU(), nn.Conv1d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10)
    assert model_cost(model, (x,))["params"] == sum(p.numel() for p in model.parameters())
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5, ignore=["3"])
    pruner.step()
    assert model_cost(model, (x,))["params"] == sum(p.numel() for p in pruner.compact().parameters())
