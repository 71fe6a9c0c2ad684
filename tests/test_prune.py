"""Pruning layer: criteria registry, mask selection per granularity, parametrizations, Pruner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsekit import models
from sparsekit.prune import Pruner, criteria, masks


def _mlp(seed: int = 0) -> models.MLP:
    torch.manual_seed(seed)
    return models.MLP([64, 32, 16, 8])


def _resnet(seed: int = 0) -> models.ResNet20:
    torch.manual_seed(seed)
    return models.ResNet20(width=0.5, image_size=8)   # 8/16/32 channels; conv1 has K = 27


def _lenet(seed: int = 0) -> models.LeNet5:
    torch.manual_seed(seed)
    return models.LeNet5(image_size=8)


def _effective(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach()


# ------------------------------------------------------------------------------------------------ criteria
def test_registry_lists_builtins_with_papers():
    assert {"magnitude", "l1"} <= set(criteria.available())
    docs = criteria.describe()
    assert "Han et al. 2015" in docs["magnitude"]
    assert "Li et al. 2017" in docs["l1"] and "Pruning Filters for Efficient ConvNets" in docs["l1"]
    assert criteria.get("l1").data_dependent is False


def test_register_decorator_and_duplicates(monkeypatch):
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))

    @criteria.register("neg_magnitude", doc="test only")
    def neg(module):
        return -module.weight.detach().abs()

    assert "neg_magnitude" in criteria.available()
    assert criteria.get("neg_magnitude").fn is neg
    with pytest.raises(ValueError, match="already registered"):
        criteria.register("neg_magnitude", neg)
    criteria.register("plain", lambda mod: mod.weight.detach().abs())
    assert criteria.get("plain").data_dependent is False


def test_unknown_criterion_lists_available():
    with pytest.raises(ValueError, match=r"unknown criterion 'taylorr'.*l1.*magnitude"):
        criteria.get("taylorr")
    with pytest.raises(ValueError, match="available: apoz, bn_scale, .*l1, l1_mean, .*magnitude"):
        m = _mlp()
        Pruner(m, m.example_input(), criterion="nope")


def test_criterion_output_is_checked(monkeypatch):
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    criteria.register("bad_shape", lambda mod: mod.weight.detach().abs().sum(1, keepdim=True))
    criteria.register("nan", lambda mod: mod.weight.detach() * float("nan"))
    m = _mlp()
    with pytest.raises(ValueError, match="bad_shape.*expected"):
        Pruner(m, m.example_input(), criterion="bad_shape").step()
    with pytest.raises(ValueError, match="non-finite"):
        Pruner(m, m.example_input(), criterion="nan").step()


def test_per_channel_scores_only_for_channel(monkeypatch):
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    criteria.register("row_index", lambda mod: torch.arange(mod.weight.shape[0], dtype=torch.float32))
    m = _mlp()
    p = Pruner(m, m.example_input(), criterion="row_index", granularity="channel", sparsity=0.5)
    p.step()
    assert torch.equal(p.masks["layers.0"][:, 0], torch.arange(32) >= 16)  # lowest rows removed
    with pytest.raises(ValueError, match="granularity='channel'"):
        Pruner(_mlp(), m.example_input(), criterion="row_index").step()


# ---------------------------------------------------------------------------------------- granularity
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_element_layer_scope_exact(sparsity):
    m = _resnet()
    p = Pruner(m, m.example_input(), sparsity=sparsity)
    p.step()
    assert len(p.masks) == 22
    for name, mask in p.masks.items():
        assert (~mask).sum().item() == math.floor(sparsity * mask.numel() + 1e-9), name
        assert torch.count_nonzero(_effective(p.layers[name])[~mask]) == 0
    for row in p.sparsity_report():
        assert row["sparsity"] == pytest.approx(math.floor(sparsity * math.prod(row["shape"]) + 1e-9)
                                                / math.prod(row["shape"]))


def test_layer_mask_floor_is_robust_to_rounding():
    scores = torch.arange(100.0)
    keep = masks.layer_mask(scores.reshape(10, 10), 0.29, "element")   # 0.29 * 100 == 28.999999999999996
    assert (~keep).sum() == 29 and not keep.reshape(-1)[:29].any()


def test_global_element_one_threshold():
    m = _resnet()
    p = Pruner(m, m.example_input(), scope="global", sparsity=0.6)
    p.step()
    removed, kept = [], []
    total = 0
    for name, mask in p.masks.items():
        w = p.layers[name].parametrizations.weight.original.detach().abs()
        removed.append(w[~mask])
        kept.append(w[mask])
        total += mask.numel()
    removed, kept = torch.cat(removed), torch.cat(kept)
    assert removed.numel() == math.floor(0.6 * total)
    assert removed.max() <= kept.min()
    per_layer = [r["sparsity"] for r in p.sparsity_report()]
    assert max(per_layer) - min(per_layer) > 0.1   # layers differ: the threshold is global


def test_block_masks_are_aligned_and_exact():
    m = _resnet()
    p = Pruner(m, m.example_input(), granularity="block", block=(8, 4), sparsity=0.5, ignore=["conv1", "fc"])
    p.step()
    for name, mask in p.masks.items():
        m2 = masks.as_2d(mask)
        blocks = m2.reshape(m2.shape[0] // 8, 8, m2.shape[1] // 4, 4)
        per_block = blocks.sum(dim=(1, 3))
        assert bool(((per_block == 0) | (per_block == 32)).all()), name
        assert (per_block == 0).sum().item() == math.floor(0.5 * per_block.numel())


def test_block_global_scope():
    m = _mlp()
    p = Pruner(m, m.example_input(), granularity="block", block=8, scope="global", sparsity=0.5)
    p.step()
    total = sum(mk.numel() // 64 for mk in p.masks.values())
    removed = sum(int((~mk).sum()) // 64 for mk in p.masks.values())
    assert removed == total // 2


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_are_n_of_m(n, m):
    model = _resnet()
    p = Pruner(model, model.example_input(), granularity="nm", n=n, m=m, sparsity=1 - n / m, ignore=["conv1"])
    p.step()
    assert p.masks, "nothing pruned"
    for name, mask in p.masks.items():
        groups = masks.as_2d(mask).reshape(mask.shape[0], -1, m)
        assert bool((groups.sum(-1) == n).all()), name
        w = masks.as_2d(p.layers[name].parametrizations.weight.original.detach().abs()).reshape(groups.shape)
        # the kept values are the n largest of each group: max removed <= min kept
        max_removed = w.masked_fill(groups, -1).amax(-1)
        assert bool((max_removed <= w.masked_fill(~groups, float("inf")).amin(-1)).all())


def test_channel_masks_zero_rows_and_bias_and_skip_classifier():
    m = _lenet()
    p = Pruner(m, m.example_input(), criterion="l1", granularity="channel", sparsity=0.5)
    assert p.ignored == {"fc"}
    p.step()
    assert set(p.masks) == {"conv1", "conv2", "fc1", "fc2"}
    for name, mask in p.masks.items():
        mod = p.layers[name]
        rows = masks.as_2d(mask)
        row_keep = rows.any(dim=1)
        assert bool((rows.all(dim=1) == row_keep).all())                 # whole rows
        assert (~row_keep).sum().item() == math.floor(0.5 * mod.weight.shape[0])
        assert torch.count_nonzero(masks.as_2d(_effective(mod))[~row_keep]) == 0
        assert torch.count_nonzero(mod.bias.detach()[~row_keep]) == 0   # bias entry masked too
        l1 = masks.as_2d(mod.parametrizations.weight.original.detach()).abs().sum(1)
        assert l1[~row_keep].max() <= l1[row_keep].min()               # lowest-L1 filters go
    # the classifier keeps every output; only its input columns of removed features are masked (they are 0 anyway)
    assert bool(m.fc.weight.detach().ne(0).any(dim=1).all())


def test_channel_ignore_empty_prunes_classifier_too():
    m = _lenet()
    p = Pruner(m, m.example_input(), granularity="channel", sparsity=0.5, ignore=[])
    p.step()
    assert "fc" in p.masks


def test_default_ignore_uses_execution_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)     # registered first, runs last
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(self.body(x).relu())

    net = Net()
    p = Pruner(net, torch.randn(2, 4), granularity="channel")
    assert p.ignored == {"head"} and list(p.layers) == ["body"]


def test_ignore_by_module_and_container():
    m = _resnet()
    p = Pruner(m, m.example_input(), ignore=[m.fc, "layer3"])
    assert "fc" in p.ignored and all(k.startswith("layer3.") for k in p.ignored - {"fc"})
    assert len(p.ignored) == 1 + 7      # layer3: 3 blocks x 2 convs + a projection shortcut
    assert not any(k.startswith("layer3") for k in p.layers)


# ------------------------------------------------------------------------------------------ parametrize
def test_masked_weights_stay_zero_during_training():
    m = _resnet()
    x = m.example_input(4)
    p = Pruner(m, x, granularity="element", sparsity=0.7)
    p.step()
    before = p.masks
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    for name, mask in before.items():
        assert torch.count_nonzero(_effective(p.layers[name])[~mask]) == 0
        assert torch.equal(masks.get_masks(m)[name], mask)


def test_remove_restores_exactly():
    m = _resnet()
    x = m.example_input()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    y_ref = m(x)
    p = Pruner(m, x, granularity="channel", sparsity=0.5)
    p.step()
    assert not torch.allclose(m(x), y_ref)
    p.remove()
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
    state = m.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert torch.equal(m(x), y_ref)
    assert p.masks == {}


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
], ids=["sgd_momentum_wd", "adam_wd"])
def test_remove_restores_the_values_at_masking_time_after_training(make_opt):
    """Momentum, weight decay and Adam move the stored originals of masked entries (their gradient is 0, not
    their update): remove() gives back the values the entries had when they were masked."""
    m = _lenet()
    x, y = m.example_input(16), torch.randint(0, 10, (16,))
    opt = make_opt(m.parameters())

    def train(steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    train(3)                                     # momentum / moments built up before pruning
    p = Pruner(m, x, granularity="element", sparsity=0.5)
    p.step()
    at_prune = {n: mod.parametrizations.weight.original.detach().clone() for n, mod in p.layers.items()}
    train(20)
    drifted = any(not torch.equal(mod.parametrizations.weight.original.detach()[~p.masks[n]], at_prune[n][~p.masks[n]])
                  for n, mod in p.layers.items())
    assert drifted                                # what remove() had restored before
    kept = {n: mod.weight.detach().clone() for n, mod in p.layers.items()}
    mk = p.masks
    p.remove()
    for n, mod in p.layers.items():
        w = mod.weight.detach()
        assert torch.equal(w[~mk[n]], at_prune[n][~mk[n]]), n
        assert torch.equal(w[mk[n]], kept[n][mk[n]]), n      # trained values of the kept entries stay


def test_mask_update_and_state_dict_load_restore_values():
    lin = nn.Linear(4, 3)
    w0 = lin.weight.detach().clone()
    first = torch.ones(3, 4, dtype=torch.bool)
    first[0] = False
    masks.apply_mask(lin, first)
    with torch.no_grad():
        lin.parametrizations.weight.original.add_(1.0)        # an optimizer's drift
    second = torch.ones(3, 4, dtype=torch.bool)
    second[1] = False                                         # row 0 comes back, row 1 goes
    masks.apply_mask(lin, second)
    assert torch.equal(lin.weight.detach()[0], w0[0])        # the value it had when masked
    with torch.no_grad():
        lin.parametrizations.weight.original.add_(1.0)        # more drift, now of row 1 while masked
    masks.remove_masks(lin)
    assert torch.equal(lin.weight.detach()[1], w0[1] + 1.0)  # its value when masked (after the first drift)
    assert torch.equal(lin.weight.detach()[2], w0[2] + 2.0)  # kept entries keep what training made of them
    src = nn.Linear(4, 3)
    masks.apply_mask(src, second)
    dst = nn.Linear(4, 3)
    masks.load_masked_state_dict(dst, src.state_dict())      # the values at masking time are not saved:
    masks.remove_masks(dst)                                  # un-pruning gives the loaded originals
    assert torch.equal(dst.weight.detach(), src.parametrizations.weight.original.detach())


def test_bake_leaves_plain_parameters_with_zeros():
    m = _mlp()
    param_ids = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Linear)}
    p = Pruner(m, m.example_input(), sparsity=0.5)
    p.step()
    saved = p.masks
    p.bake()
    for name, mask in saved.items():
        mod = p.layers[name]
        assert not parametrize.is_parametrized(mod)
        assert type(mod.weight) is nn.Parameter
        assert torch.count_nonzero(mod.weight.detach()[~mask]) == 0
    assert {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Linear)} == param_ids
    assert set(m.state_dict()) == set(_mlp().state_dict())


def test_state_dict_round_trip():
    m = _lenet()
    x = m.example_input()
    p = Pruner(m, x, granularity="channel", sparsity=0.5)
    p.step()
    sd = m.state_dict()
    assert "conv1.parametrizations.weight.0.mask" in sd and "conv1.parametrizations.bias.0.mask" in sd
    fresh = _lenet(seed=1)                       # unmasked, different weights
    masks.load_masked_state_dict(fresh, sd)
    assert torch.equal(fresh(x), m(x))
    applied = masks.get_masks(m)   # the selection plus the coupled members' masks a channel step adds
    assert all(torch.equal(masks.get_masks(fresh)[k], v) for k, v in applied.items())
    other = _lenet(seed=2)                       # already masked (differently) by its own pruner
    Pruner(other, x, granularity="channel", sparsity=0.25).step()
    other.load_state_dict(sd)
    assert torch.equal(other(x), m(x))


def test_apply_mask_updates_in_place():
    lin = nn.Linear(4, 3)
    masks.apply_mask(lin, torch.ones(3, 4, dtype=torch.bool))
    masks.apply_mask(lin, torch.zeros(3, 4, dtype=torch.bool))
    assert len(lin.parametrizations.weight) == 1 and torch.count_nonzero(lin.weight) == 0
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        masks.apply_mask(lin, torch.ones(4, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------- determinism, steps
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_deterministic(granularity):
    a, b = _resnet(seed=3), _resnet(seed=3)
    pa = Pruner(a, a.example_input(), granularity=granularity)
    pb = Pruner(b, b.example_input(), granularity=granularity)
    pa.step()
    pb.step()
    assert pa.masks.keys() == pb.masks.keys()
    assert all(torch.equal(pa.masks[k], pb.masks[k]) for k in pa.masks)
    ta, tb = masks.tensor_masks(a), masks.tensor_masks(b)     # every masked tensor, coupled members included
    assert ta.keys() == tb.keys() and all(ta[k].keys() == tb[k].keys() for k in ta)
    assert all(torch.equal(ta[k][t], tb[k][t]) for k in ta for t in ta[k])


def test_ties_break_by_lower_index():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))   # the model's outputs are never pruned
    nn.init.constant_(net[0].weight, 1.0)
    p = Pruner(net, torch.randn(1, 4), granularity="channel", sparsity=0.5)
    p.step()
    assert torch.equal(p.masks["0"][:, 0], torch.tensor([False, False, False, True, True, True]))
    keep = masks.nm_keep(torch.ones(2, 8), 2, 4)
    assert torch.equal(keep[0], torch.tensor([True, True, False, False] * 2))


def test_schedule_steps_are_monotone():
    m = _mlp()
    targets = [0.25, 0.5, 0.75]
    p = Pruner(m, m.example_input(), sparsity=0.75, schedule=lambda t: targets[t])
    prev = None
    for t in targets:
        assert p.step() == t
        for name, mask in p.masks.items():
            assert (~mask).sum().item() == math.floor(t * mask.numel())
            if prev is not None:
                assert not bool((mask & ~prev[name]).any())   # removed stays removed
        prev = p.masks
    assert p.sparsity_report()[0]["target"] == 0.75


def test_one_shot_step_is_idempotent_and_keeps_training_flags():
    m = _resnet()
    m.train()
    stats = m.bn1.running_mean.clone()
    p = Pruner(m, m.example_input())
    assert m.training and torch.equal(m.bn1.running_mean, stats)   # tracing changed nothing
    p.step()
    first = p.masks
    p.step()
    assert all(torch.equal(first[k], p.masks[k]) for k in first)
    assert all(len(mod.parametrizations.weight) == 1 for mod in p.layers.values())


def test_sparsity_report_fields():
    m = _lenet()
    p = Pruner(m, m.example_input(), granularity="channel", sparsity=0.5)
    assert all(r["sparsity"] == 0.0 for r in p.sparsity_report())
    p.step()
    rows = p.sparsity_report()
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    assert rows[0] == {"name": "conv1", "type": "Conv2d", "shape": (6, 1, 5, 5), "granularity": "channel",
                       "target": 0.5, "sparsity": 0.5, "units": 6, "removed": 3}


def test_transformer_with_dict_inputs():
    m = models.TransformerEncoder(vocab=20, dim=32, heads=4, ffn=64, layers=1, seq_len=8)
    ids = m.example_input()
    p = Pruner(m, {"ids": ids}, granularity="block", block=(16, 16), sparsity=0.5, ignore=[m.fc])
    p.step()
    assert set(p.masks) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.ffn.fc1", "blocks.0.ffn.fc2"}
    assert "fc" in p.ignored


# -------------------------------------------------------------------------------------------- bad inputs
def _bad(**kwargs):
    m = _resnet()
    return Pruner(m, kwargs.pop("example_inputs", m.example_input()), **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"sparsity": 1.0}, ValueError, r"sparsity must be in \[0, 1\).*1\.0"),
    ({"sparsity": -0.1}, ValueError, r"sparsity must be in \[0, 1\).*-0\.1"),
    ({"sparsity": "0.5"}, TypeError, "sparsity must be a float"),
    ({"sparsity": True}, TypeError, "sparsity"),
    ({"granularity": "row"}, ValueError, r"granularity must be one of .*'row'"),
    ({"granularity": 2}, TypeError, "granularity must be a str"),
    ({"granularity": "nm", "n": 4, "m": 4, "ignore": ["conv1"]}, ValueError, "1 <= n < m.*n=4, m=4"),
    ({"granularity": "nm", "n": 5, "m": 4}, ValueError, "n < m"),
    ({"granularity": "nm", "n": 2.0, "m": 4}, TypeError, "n must be an int"),
    ({"granularity": "nm", "n": 1, "m": 4, "ignore": ["conv1"]}, ValueError, "Pass sparsity=0.75"),
    ({"granularity": "nm"}, ValueError, "m=4 does not divide the input dim 27 of conv1.*ignore"),
    ({"granularity": "block", "block": (8, 8)}, ValueError, r"block \(8, 8\) does not divide conv1.*Remedy"),
    ({"granularity": "block", "block": (8, "8")}, TypeError, "block must be an int or a pair"),
    ({"granularity": "block", "block": 0}, ValueError, "block sides must be positive"),
    ({"scope": "network"}, ValueError, "scope must be one of"),
    ({"scope": "global", "granularity": "channel", "criterion": "lasso"}, ValueError, "do not compare across layers"),
    ({"scope": "global", "granularity": "nm", "ignore": ["conv1"]}, ValueError, "global threshold"),
    ({"ignore": [nn.Linear(2, 2)]}, ValueError, r"ignore\[0\] \(Linear\) is not a submodule"),
    ({"ignore": ["layer1.0.conv3"]}, ValueError, r"not a module name.*did you mean"),
    ({"ignore": [3]}, TypeError, r"ignore\[0\] must be an nn.Module"),
    ({"ignore": 3}, TypeError, "ignore must be None or a list"),
    ({"ignore": [""]}, ValueError, "no nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d left"),
    ({"example_inputs": "image"}, TypeError, "example_inputs must be a Tensor"),
    ({"example_inputs": torch.randn(2, 5, 8, 8)}, ValueError, "example_inputs could not be run"),
    ({"criterion": 3}, TypeError, "criterion must be a str"),
    ({"schedule": "cubic"}, ValueError, "schedule must be 'oneshot', a Schedule.*'cubic'"),
    ({"schedule": 3}, TypeError, "schedule must be None, 'oneshot'.*int 3"),
    ({"granularity": "nm", "ignore": ["conv1"], "schedule": lambda t: 0.5}, ValueError, "schedule=None"),
])
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kwargs)


def test_bad_model_and_schedule_value():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Pruner(lambda x: x, torch.randn(1))
    m = _mlp()
    p = Pruner(m, m.example_input(), schedule=lambda t: 1.5)
    with pytest.raises(ValueError, match=r"schedule\(0\) must be in \[0, 1\)"):
        p.step()


def test_data_dependent_criterion_needs_calib(monkeypatch):
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    criteria.register("act_weighted", lambda mod, ctx: mod.weight.detach().abs() * ctx.stat("act_sum")[:, None],
                      data_dependent=True)
    assert criteria.get("act_weighted").needs == ("activations",)
    m = _mlp()
    with pytest.raises(ValueError, match="data-dependent: pass calib"):
        Pruner(m, m.example_input(), criterion="act_weighted")
    p = Pruner(m, m.example_input(), criterion="act_weighted", calib=[m.example_input(8)])
    p.step()
    assert set(p.masks) == {"layers.0", "layers.2", "fc"}


def test_baking_a_deepcopy_leaves_the_original_masked():
    """deepcopy shares torch's dynamic parametrized class; un/baking the copy must not strip the original."""
    import copy

    import sparsekit as sk

    model = sk.models.FFN(dim=32, hidden=64, tokens=2)
    sk.prune.Pruner(model, model.example_input(2), sparsity=0.5).step()
    clone = copy.deepcopy(model)
    sk.prune.masks.bake_masks(clone)
    assert type(clone.fc1) is torch.nn.Linear
    assert sk.prune.masks.is_masked(model.fc1) and float(model.fc1.weight.eq(0).float().mean()) == 0.5
    sk.prune.masks.remove_masks(model)
    assert type(model.fc1) is torch.nn.Linear


@pytest.mark.parametrize("name,kw", [("lenet5", {}), ("resnet20", {"width": 0.5})])
def test_pruner_compact_equals_the_masked_model(name, kw):
    import sparsekit as sk

    torch.manual_seed(0)
    model = models.build(name, **kw).eval()
    x = model.example_input(2)
    dense_params = sum(p.numel() for p in model.parameters())
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.75 * dense_params
    assert not any(parametrize.is_parametrized(m) for m in small.modules())
    pruner.remove()
    assert masks.get_masks(model) == {}


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.sigmoid(self.bn1(self.conv1(x)))      # sigmoid(0) != 0: an unmasked column would leak
        x = torch.sigmoid(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_two_pruners_on_one_model_keep_each_others_masks():
    """A second Pruner (e.g. one per layer to apply searched widths) must not unmask the consumer columns of
    the first one's removed channels; removing one pruner leaves the other's masks."""
    import sparsekit as sk

    torch.manual_seed(0)
    m = _TwoConvs().eval()
    x = torch.randn(2, 3, 8, 8)
    p1 = Pruner(m, x, criterion="l1", granularity="channel", sparsity=0.5, ignore=["conv2", "fc"])
    p1.step()
    gone1 = ~_rows_kept(p1, "conv1")
    p2 = Pruner(m, x, criterion="l1", granularity="channel", sparsity=0.25, ignore=["conv1", "fc"])
    p2.step()
    gone2 = ~_rows_kept(p2, "conv2")
    assert bool((m.conv2.weight.detach()[:, gone1] == 0).all())      # p1's columns stay masked
    assert bool((m.conv2.weight.detach()[gone2] == 0).all()) and int(gone2.sum()) == 2
    sk.verify(m, p2.compact(), x, atol=1e-5)
    p2.step()                                                          # re-stepping keeps them too
    assert bool((m.conv2.weight.detach()[:, gone1] == 0).all())
    p2.remove()
    assert bool((m.conv2.weight.detach()[:, gone1] == 0).all()) and masks.is_masked(m.conv1)
    assert bool(m.conv2.weight.detach()[:, ~gone1].ne(0).all())          # p2's rows are back
    assert not masks.is_masked(m.fc) and not parametrize.is_parametrized(m.bn2)
    p1.remove()
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())


def test_pruners_can_be_removed_in_any_order():
    """Removing the first of two pruners keeps every entry the second one masks (also where both masked)."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    w0 = lin.weight.detach().clone()
    a = Pruner(nn.Sequential(lin), torch.randn(2, 32), criterion="magnitude", granularity="element", sparsity=0.5)
    a.step()
    b = Pruner(a.model, torch.randn(2, 32), criterion="random", granularity="element", sparsity=0.7)
    b.step()
    by_b = b.masks["0"]
    a.remove()
    mask = masks.get_masks(a.model)["0"]
    assert bool((mask <= by_b).all())                  # all of b's masked entries stay masked
    assert abs(1 - mask.float().mean().item() - 0.7) < 0.02
    b.remove()
    assert not masks.is_masked(lin) and torch.equal(lin.weight.detach(), w0)

    m = _TwoConvs().eval()
    x = torch.randn(2, 3, 8, 8)
    p1 = Pruner(m, x, criterion="l1", granularity="channel", sparsity=0.5, ignore=["conv2", "fc"])
    p1.step()
    p2 = Pruner(m, x, criterion="l1", granularity="channel", sparsity=0.25, ignore=["conv1", "fc"])
    p2.step()
    gone2 = ~_rows_kept(p2, "conv2")
    p1.remove()
    assert bool((m.conv2.weight.detach()[gone2] == 0).all())           # p2's removed rows stay removed
    p2.remove()
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())


class _EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.a = nn.Linear(24, 32)
        self.fc = nn.Linear(32, 3)

    def forward(self, ids):
        return self.fc(torch.relu(self.a(self.emb(ids))).mean(1))


@pytest.mark.parametrize("criterion", ["l1_mean", "l1", "magnitude", "random"])
def test_channel_pruner_shrinks_embedding_features(criterion):
    """An nn.Embedding produces channels (its features: the columns of its weight) like a Linear's neurons."""
    from sparsekit.prune.compact import compact

    torch.manual_seed(0)
    m = _EmbeddingNet().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        m.emb.weight[:, :6] *= 1e-3                                      # six weak features
    p = Pruner(m, ids, criterion=criterion, granularity="channel", sparsity=0.5, ignore=[])
    p.step()
    cols = masks.as_2d(m.emb.parametrizations.weight[0].mask).any(0)
    assert int(cols.sum()) == 12
    if criterion != "random":
        assert not bool(cols[:6].any())
    assert bool((m.a.weight.detach()[:, ~cols] == 0).all())             # its consumer lost those inputs
    keep = {gid: torch.nonzero(k).reshape(-1) for gid, k in p._keep.items()}
    small = compact(m, ids, keep, graph=p._dependency_graph())
    assert small.emb.embedding_dim == 12 and small.a.in_features == 12
    torch.testing.assert_close(small(ids), m(ids), atol=1e-5, rtol=1e-5)
    assert p.compact().emb.embedding_dim == 12                          # keep-sets read from the masks too
    with torch.no_grad():
        w = m.emb.parametrizations.weight.original.clone()
    p.remove()
    assert torch.equal(m.emb.weight.detach(), w) and not masks.is_masked(m.emb)
    q = Pruner(_EmbeddingNet().eval(), ids, criterion=criterion, granularity="channel", sparsity=0.5,
               ignore=["emb"])
    q.step()
    assert not masks.is_masked(q.model.emb)                             # an ignored embedding stays whole


def test_pruner_compact_needs_channel_granularity():
    model = models.build("lenet5")
    pruner = Pruner(model, model.example_input(2), granularity="element", sparsity=0.5)
    pruner.step()
    with pytest.raises(ValueError, match="granularity='channel'"):
        pruner.compact()


# ------------------------------------------------------------------------------------ group selection
class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    """stem -> two identity-shortcut blocks -> pooled classifier: stem, blocks.0.conv2 and blocks.1.conv2
    write one residual stream (one dependency group of 8 channels)."""

    RESIDUAL = ("stem", "blocks.0.conv2", "blocks.1.conv2")

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(2))
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))


def _residual_net(seed: int = 0) -> ResidualNet:
    """The producers disagree: the stem's weakest filters are 0-3, both blocks' conv2 weakest are 4-7."""
    torch.manual_seed(seed)
    net = ResidualNet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.5, 0.5, generator=g)
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
        net.stem.weight[:4] *= 0.1
        for block in net.blocks:
            block.conv2.weight[4:] *= 0.1
    return net.eval()


def _rows_kept(p: Pruner, name: str) -> torch.Tensor:
    return masks.as_2d(p.masks[name]).any(1)


def test_residual_group_pruned_where_the_union_rule_kept_it():
    import sparsekit as sk

    net = _residual_net()
    x = torch.randn(2, 3, 8, 8)
    # per layer, the 4 lowest-L1 filters of the stream's producers are disjoint: a unit-removed-by-every-producer
    # rule (the former per-layer selection) would keep the whole stream
    lowest = [set(torch.argsort(net.get_submodule(n).weight.detach().abs().sum((1, 2, 3)))[:4].tolist())
              for n in ResidualNet.RESIDUAL]
    assert not set.intersection(*lowest)
    p = Pruner(net, x, criterion="l1", granularity="channel", sparsity=0.5)
    p.step()
    for name in ResidualNet.RESIDUAL:          # the group's aggregated score removes 4..7 from every producer
        assert _rows_kept(p, name).tolist() == [True] * 4 + [False] * 4, name
    assert net.bn.weight.detach()[4:].eq(0).all() and net.bn.bias.detach()[4:].eq(0).all()
    assert net.blocks[0].conv1.weight.detach()[:, 4:].eq(0).all()        # the stream's consumers lose columns
    small = p.compact()
    assert small.stem.out_channels == 4 and small.fc.in_features == 4
    assert all(b.conv1.out_channels == 4 and b.conv2.out_channels == 4 for b in small.blocks)
    sk.verify(net, small, x, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_layer_scope_removes_the_fraction_of_every_group(sparsity):
    import sparsekit as sk

    net = _residual_net()
    x = torch.randn(2, 3, 8, 8)
    p = Pruner(net, x, criterion="l2", granularity="channel", sparsity=sparsity)
    p.step()
    graph = p._dependency_graph()
    groups = [g for g in graph.prunable]
    assert len(groups) == 3                    # the residual stream and each block's inner channels
    for g in groups:
        producers = [m.module for m in g.members if m.axis == "out" and m.module in p.layers]
        removed = {int((~_rows_kept(p, n)).sum()) for n in producers}
        assert removed == {math.floor(sparsity * g.size)}, g.id
    sk.verify(net, p.compact(), x, atol=1e-4)


def test_global_scope_one_threshold_over_aggregated_group_scores():
    import sparsekit as sk

    net = _residual_net()
    x = torch.randn(2, 3, 8, 8)
    p = Pruner(net, x, criterion="l1_mean", granularity="channel", scope="global", sparsity=0.5)
    p.step()
    scored, kept_flags, best = [], [], []
    for g in p._dependency_graph().prunable:
        producers = [m.module for m in g.members if m.axis == "out" and m.module in p.layers]
        s = torch.stack([p.layers[n].parametrizations.weight.original.detach().abs().mean((1, 2, 3))
                         for n in producers]).double()                   # l1_mean per filter
        c = s.mean(1, keepdim=True)
        agg = (s / c).mean(0) * c.mean()        # the documented aggregation: scale-free mean, criterion's scale
        scored.append(agg)
        best.append(torch.arange(g.size) == torch.argmax(agg))            # min_channels=1 protects the best unit
        kept_flags.append(_rows_kept(p, producers[0]))
        assert all(torch.equal(_rows_kept(p, n), kept_flags[-1]) for n in producers)
    s, kept, best = torch.cat(scored), torch.cat(kept_flags), torch.cat(best)
    assert int((~kept).sum()) == math.floor(0.5 * s.numel())
    assert float(s[~kept].max()) <= float(s[kept & ~best].min())          # one threshold
    assert kept_flags[0].sum() == 1            # the weak residual stream falls below it but for its best unit
    fractions = {round(1 - float(k.float().mean()), 3) for k in kept_flags}
    assert len(fractions) > 1                  # groups are pruned to different fractions
    sk.verify(net, p.compact(), x, atol=1e-4)


def test_global_scope_keeps_min_channels_per_group():
    net = _residual_net()
    with torch.no_grad():
        net.blocks[1].conv1.weight.mul_(1e-4)  # every inner filter of block 1 below every other filter
    p = Pruner(net, torch.randn(2, 3, 8, 8), criterion="l1_mean", granularity="channel", scope="global",
               sparsity=0.5, min_channels=2)
    p.step()
    assert int(_rows_kept(p, "blocks.1.conv1").sum()) == 2


def test_group_selection_steps_are_monotone_and_ignore_keeps_a_group_whole():
    import sparsekit as sk

    net = _residual_net()
    x = torch.randn(2, 3, 8, 8)
    p = Pruner(net, x, criterion="l1", granularity="channel", sparsity=0.75, schedule=lambda t: [0.25, 0.75][t])
    p.step()
    first = {k: _rows_kept(p, k) for k in p.layers}
    p.step()
    for name, rows in first.items():
        now = _rows_kept(p, name)
        assert not bool((now & ~rows).any()), name                        # removed stays removed
        assert int((~now).sum()) == math.floor(0.75 * rows.numel()), name
    sk.verify(net, p.compact(), x, atol=1e-4)
    p.remove()
    q = Pruner(net, x, criterion="l1", granularity="channel", sparsity=0.5, ignore=["fc", "blocks.1.conv2"])
    q.step()
    assert all(bool(_rows_kept(q, n).all()) for n in ("stem", "blocks.0.conv2"))   # a producer is ignored
    assert int((~_rows_kept(q, "blocks.0.conv1")).sum()) == 4


def test_select_previews_the_group_selection_and_empty_groups_do_not_compact():
    net = _residual_net()
    x = torch.randn(2, 3, 8, 8)
    p = Pruner(net, x, criterion="l1", granularity="channel", sparsity=0.5)
    preview = p.select(p.scores(), 0.5)
    assert not masks.get_masks(net)                          # select applies nothing
    p.step()
    assert all(torch.equal(preview[k], p.masks[k]) for k in p.masks)
    q = Pruner(_residual_net(), x, criterion="l1_mean", granularity="channel", scope="global", sparsity=0.9,
               min_channels=0)                                # the pure threshold may empty a group
    with torch.no_grad():
        q.model.blocks[1].conv1.weight.mul_(1e-6)
    q.step()
    assert not _rows_kept(q, "blocks.1.conv1").any()
    with pytest.raises(ValueError, match="every unit of group"):
        q.compact()


def test_chains_end_at_multi_output_ops_and_at_a_conv_reading_token_features():
    """A producer whose output is also chunked is not a plain chain (the chunk is a use); a Linear on
    [batch, tokens, features] does not feed a conv over dim 1 (the tokens), even when the counts match."""
    from sparsekit.prune.chains import trace_links

    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            h = self.c1(x)
            a, _ = h.chunk(2, 1)
            return self.c2(h) + a.sum()

    class TokensThenConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.tok = nn.Linear(8, 16), nn.Conv1d(16, 16, 1)

        def forward(self, x):           # x [4, 16, 8]: 16 tokens, the Linear makes 16 features
            return self.tok(self.lin(x))

    link = trace_links(Chunked(), torch.randn(1, 3, 6, 6), ["c1"])["c1"]
    assert link.consumer is None and "2 operations" in link.reason
    link = trace_links(TokensThenConv(), torch.randn(4, 16, 8), ["lin"])["lin"]
    assert link.consumer is None and "not its features" in link.reason

    class TokensFlattened(nn.Module):     # [16, 3, 8] -> Linear -> [16, 3, 4] -> flatten -> Linear(12): strided
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(8, 4), nn.Linear(12, 5)

        def forward(self, x):
            return self.out(torch.relu(self.lin(x)).flatten(1))

    link = trace_links(TokensFlattened(), torch.randn(16, 3, 8), ["lin"])["lin"]
    assert link.consumer is None and "no longer contiguous" in link.reason
    with pytest.raises(ValueError, match="'thinet' reconstructs the layer that consumes.*not its features"):
        Pruner(TokensThenConv(), torch.randn(4, 16, 8), criterion="thinet", granularity="channel", sparsity=0.5,
               calib=[torch.randn(4, 16, 8)], ignore=["tok"])


def test_masks_on_a_deep_copy_owners_after_a_load_and_masked_recurrent_loads():
    """Masking a new tensor of a deep copy leaves the original's class alone; a loaded mask is the one owner
    (an earlier owner's record does not come back); load_masked_state_dict keeps a recurrent module copyable."""
    import copy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    Pruner(m, x, sparsity=0.5).step()
    c = copy.deepcopy(m)
    Pruner(c, x, granularity="channel", sparsity=0.5).step()       # masks c's biases too
    m(x)                                                             # the original still runs
    assert not parametrize.is_parametrized(m[0], "bias") and parametrize.is_parametrized(c[0], "bias")

    src, dst = nn.Sequential(nn.Linear(16, 16)), nn.Sequential(nn.Linear(16, 16))
    masks.set_owned_mask(dst[0], "weight", "pruner", torch.rand(16, 16) > 0.25)
    masks.apply_tensor_mask(src[0], "weight", torch.rand(16, 16) > 0.75)
    dst.load_state_dict(src.state_dict())
    loaded = dst[0].weight == 0
    masks.set_owned_mask(dst[0], "weight", "user", torch.ones(16, 16, dtype=torch.bool))
    assert torch.equal(dst[0].weight == 0, loaded)

    torch.manual_seed(1)
    own = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pruner = Pruner(own, x, criterion="l1", sparsity=0.5)
    pruner.step()
    own.load_state_dict(own.state_dict())       # a load keeps each owner: remove() still takes its masks off
    pruner.remove()
    assert not any(parametrize.is_parametrized(mod) for mod in own.modules())

    lstm = nn.LSTM(4, 6)
    masks.apply_tensor_mask(lstm, "weight_hh_l0", torch.rand(24, 6) > 0.5)
    fresh = nn.LSTM(4, 6)
    masks.load_masked_state_dict(fresh, lstm.state_dict())
    fresh(torch.randn(3, 1, 4))[0].sum().backward()
    copy.deepcopy(fresh)
