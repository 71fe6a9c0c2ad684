"""Global scope for channels (Salama et al. 2019, seed 003): normalised scores, classifier left out,
no layer emptied."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekit import models
from sparsekit.prune import Pruner, masks


def _lenet(seed: int = 0) -> models.LeNet5:
    torch.manual_seed(seed)
    return models.LeNet5(image_size=8)


def _kept_channels(p: Pruner) -> dict[str, int]:
    return {k: int(masks.as_2d(v).any(dim=1).sum()) for k, v in p.masks.items()}


def test_global_l1_mean_one_threshold_over_normalised_scores():
    m = _lenet()
    p = Pruner(m, m.example_input(), criterion="l1_mean", granularity="channel", scope="global", sparsity=0.6,
               min_channels=0)                                 # the pure threshold; the guard is tested below
    assert p.ignored == {"fc"}                                 # the classifier is left out by default
    p.step()
    removed, kept = [], []
    total = 0
    for name, mask in p.masks.items():
        w = p.layers[name].parametrizations.weight.original.detach()
        score = w.reshape(w.shape[0], -1).abs().mean(1)        # L1 / number of weights of the filter
        rows = masks.as_2d(mask).any(dim=1)
        removed.append(score[~rows])
        kept.append(score[rows])
        total += rows.numel()
    removed, kept = torch.cat(removed), torch.cat(kept)
    assert removed.numel() == math.floor(0.6 * total)
    assert float(removed.max()) <= float(kept.min())
    fractions = [1 - c / p.layers[k].weight.shape[0] for k, c in _kept_channels(p).items()]
    assert max(fractions) - min(fractions) > 0.2               # layers are pruned differently


def test_normalisation_matters():
    """Unnormalised l1 favours layers with many weights per filter; l1_mean does not (seed 003, sec. 3)."""
    m1, m2 = _lenet(), _lenet()
    a = Pruner(m1, m1.example_input(), criterion="l1", granularity="channel", scope="global", sparsity=0.5)
    b = Pruner(m2, m2.example_input(), criterion="l1_mean", granularity="channel", scope="global", sparsity=0.5)
    a.step()
    b.step()
    assert _kept_channels(a) != _kept_channels(b)


def test_no_layer_loses_all_channels():
    m = _lenet()
    with torch.no_grad():
        m.conv2.weight.mul_(1e-4)                              # every conv2 filter below every other filter
    p = Pruner(m, m.example_input(), criterion="l1_mean", granularity="channel", scope="global", sparsity=0.3)
    p.step()
    kept = _kept_channels(p)
    assert kept["conv2"] == 1                                  # the guard keeps its best channel
    total = sum(p.layers[k].weight.shape[0] for k in kept)
    assert total - sum(kept.values()) == math.floor(0.3 * total)
    q = Pruner(_lenet(), m.example_input(), criterion="l1_mean", granularity="channel", scope="global",
               sparsity=0.95, min_channels=2)
    q.step()
    assert min(_kept_channels(q).values()) >= 2


def test_global_channel_data_dependent_and_classifier_optional():
    m = _lenet()
    x = m.example_input(16)
    p = Pruner(m, x, criterion="apoz", granularity="channel", scope="global", sparsity=0.5, calib=[x], ignore=[])
    p.step()
    assert "fc" in p.masks


@pytest.mark.parametrize("bad", [-1, 1.5, "1"])
def test_min_channels_validated(bad):
    m = _lenet()
    with pytest.raises(ValueError, match="min_channels must be an int >= 0"):
        Pruner(m, m.example_input(), granularity="channel", scope="global", min_channels=bad)


def test_global_keep_min_keep_unit():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.1, 0.2])}
    shapes = {"a": (3, 4), "b": (2, 4)}
    keep = masks.global_keep(scores, 0.6, "channel", shapes=shapes, min_keep=1)
    assert keep["b"][:, 0].tolist() == [False, True] and keep["a"][:, 0].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="'nm'"):
        masks.global_keep(scores, 0.5, "nm")


def test_global_keep_min_keep_holds_at_high_sparsity():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.1, 0.2])}
    keep = masks.global_keep(scores, 0.9, "channel", shapes={"a": (3, 4), "b": (2, 4)}, min_keep=1)
    assert keep["a"][:, 0].tolist() == [False, False, True] and keep["b"][:, 0].tolist() == [False, True]


def test_global_keep_warns_when_min_keep_caps_the_target():
    from sparsekit.prune.masks import global_keep

    scores = {"a": torch.rand(4, 3), "b": torch.rand(4, 3)}
    with pytest.warns(UserWarning, match=r"reaches 50.0% of the units, not 90.0%.*keeps at least 2"):
        keep = global_keep(scores, 0.9, "channel", min_keep=2)
    assert all(int(k[:, 0].sum()) == 2 for k in keep.values())


def test_max_sparsity_caps_what_the_global_threshold_takes_from_one_layer():
    """Plain l1 over layers of different scales strips the small one; max_sparsity keeps a share of every layer
    (channels and elements alike), and the total falls short of the target with a warning when the cap binds."""
    m = _lenet()
    with torch.no_grad():
        m.conv1.weight.mul_(1e-3)                       # its filters all score lowest
    p = Pruner(m, m.example_input(), criterion="l1", granularity="channel", scope="global", sparsity=0.4)
    p.step()
    assert _kept_channels(p)["conv1"] == 1              # min_channels alone
    q = Pruner(_lenet(), m.example_input(), criterion="l1", granularity="channel", scope="global", sparsity=0.4,
               max_sparsity=0.5)
    with torch.no_grad():
        q.model.conv1.weight.mul_(1e-3)
    q.step()
    kept = _kept_channels(q)
    for name, c in kept.items():
        n = q.layers[name].weight.shape[0]
        assert n - c <= math.floor(0.5 * n), name
    total = sum(q.layers[k].weight.shape[0] for k in kept)
    assert total - sum(kept.values()) == math.floor(0.4 * total)   # the cap moved the removals elsewhere

    e = _lenet()
    with torch.no_grad():
        e.conv2.weight.mul_(1e-3)
    r = Pruner(e, e.example_input(), criterion="magnitude", granularity="element", scope="global", sparsity=0.5,
               max_sparsity=0.7, ignore=[])
    r.step()
    assert float((~r.masks["conv2"]).float().mean()) == pytest.approx(0.7, abs=0.01)
    with pytest.warns(UserWarning, match="max_sparsity"):
        masks.global_keep({"a": torch.rand(2, 5), "b": torch.rand(2, 5)}, 0.9, "element", max_sparsity=0.5)


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, "0.5", True])
def test_max_sparsity_validated(bad):
    m = _lenet()
    with pytest.raises(ValueError, match="max_sparsity must be a number in"):
        Pruner(m, m.example_input(), granularity="channel", scope="global", max_sparsity=bad)
