"""Review fixes of the pruning layer's calibration and selection: a DataLoader as calib, half-precision scores,
frozen layers under gradient criteria, one-element batches, a layer emptied by a global threshold, per-channel
criteria at element granularity, floor(sparsity * units) for huge layers, an ignore entry with no layer."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsekit as sk
from sparsekit.prune.masks import num_to_remove


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("criterion", ["apoz", "variance", "hrank", "thinet", "taylor"])
def test_a_dataloader_is_a_calib_like_a_list(criterion):
    """Its own torch calls (the sampler's seed, getitem, the batch stack) are not steps of the forward pass."""
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    gradients = criterion == "taylor"
    loader = DataLoader(TensorDataset(x, y) if gradients else TensorDataset(x), batch_size=4)
    masks = []
    for calib in (loader, list(loader)):      # a DataLoader, and the same batches as a list of [x] / [x, y]
        model = _convnet()
        sk.prune.Pruner(model, x[:2], criterion=criterion, granularity="channel", sparsity=0.25, calib=calib).step()
        masks.append(model[0].weight.eq(0).flatten(1).all(1))
    assert masks[0].any() and torch.equal(masks[0], masks[1])


def test_half_precision_channel_scores_do_not_collapse_into_ties():
    x = torch.randn(2, 4096)
    kept = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 10)).to(torch.bfloat16).to(dtype)
        sk.prune.Pruner(model, x.to(dtype), criterion="l1", granularity="channel", sparsity=0.5).step()
        kept[dtype] = model[0].weight.ne(0).any(1)
    assert torch.equal(kept[torch.bfloat16], kept[torch.float32])     # the same weights rank the same


@pytest.mark.parametrize("criterion, granularity", [("taylor", "element"), ("taylor", "channel"),
                                                    ("hessian", "channel")])
def test_gradient_criteria_score_a_frozen_layer_and_leave_it_frozen(criterion, granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    sk.prune.Pruner(model, x, criterion=criterion, granularity=granularity, sparsity=0.5, calib=[(x, y)]).step()
    assert model[0].parametrizations.weight.original.requires_grad is False
    assert bool(model[0].weight.eq(0).any())


def test_a_three_element_batch_is_refused_naming_the_pair_form():
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    pruner = sk.prune.Pruner(model, x, criterion="apoz", granularity="channel", sparsity=0.25, calib=[(x, x, x)])
    with pytest.raises(TypeError, match=r"\(\(a, b\), target\)"):
        pruner.step()


def test_global_element_pruning_that_empties_a_layer_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    pruner = sk.prune.Pruner(model, torch.randn(2, 512), criterion="magnitude", granularity="element",
                             scope="global", sparsity=0.5)
    with pytest.warns(UserWarning, match=r"removed every weight of \['2'\]"):
        pruner.step()


def test_per_channel_criteria_at_element_granularity_are_refused_naming_the_criterion():
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    for criterion in ("fpgm", "mean_variance"):       # weights only: refused at construction
        with pytest.raises(ValueError, match=f"criterion '{criterion}' gives one score per output channel"):
            sk.prune.Pruner(model, x, criterion=criterion, granularity="element", sparsity=0.5)
    pruner = sk.prune.Pruner(model, x, criterion="apoz", granularity="block", block=(1, 1), sparsity=0.5,
                             calib=[x])
    with pytest.raises(ValueError, match="criterion 'apoz' gives one score per output channel"):
        pruner.step()


def test_floor_of_sparsity_times_units_for_huge_layers():
    assert [num_to_remove(s, 10**8) for s in (0.29, 0.57, 0.58)] == [29_000_000, 57_000_000, 58_000_000]
    assert num_to_remove(0.29, 100) == 29 and num_to_remove(0.5, 3) == 1 and num_to_remove(0.999999, 10) == 9
    assert num_to_remove(0.13782171237277108, 635894) == 87639      # 87639.99996757: not rounded up


def test_ignoring_a_module_without_prunable_layers_warns():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"ignore\[0\] = '1' \(BatchNorm1d\) holds no prunable layer"):
        sk.prune.Pruner(model, torch.randn(4, 8), criterion="l1", granularity="channel", sparsity=0.5,
                        ignore=["1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.prune.Pruner(model, torch.randn(4, 8), criterion="l1", granularity="channel", sparsity=0.5,
                        ignore=["0"])
