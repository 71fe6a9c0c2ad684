"""Every built-in criterion ranks a planted, obviously unimportant channel (or element) lowest.

The plants are chosen so that a criterion looking at the wrong thing would miss them: the channel that
gradient- and reconstruction-based criteria must find has the *largest* weights (its next layer ignores
it), the constant channel that variance/entropy/HRank must find has a *high* mean activation.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.prune import Pruner, criteria, masks

PLANT = 5          # never index 0: ties go to the lower index, so index 0 could win by accident


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
    return net.eval()


def _calib(batches: int = 3, pairs: bool = False, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(8, 3, 8, 8, generator=g)
        out.append((x, torch.randint(0, 4, (8,), generator=g)) if pairs else x)
    return out


# ------------------------------------------------------------------------------------------------ plants
def plant_small_filter(net: Net) -> None:
    with torch.no_grad():
        net.conv1.weight[PLANT] *= 1e-3


def plant_median_filter(net: Net) -> None:
    """Filter PLANT is the mean of the others: the one nearest the geometric median, with a large norm."""
    with torch.no_grad():
        others = torch.cat([net.conv1.weight[:PLANT], net.conv1.weight[PLANT + 1:]])
        net.conv1.weight[PLANT] = others.mean(0)


def plant_small_gamma(net: Net) -> None:
    with torch.no_grad():
        net.bn1.weight[PLANT] = 1e-3


def plant_dead_channel(net: Net) -> None:
    """Always negative before the ReLU: its activations are all zero."""
    with torch.no_grad():
        net.bn1.bias[PLANT] = -100.0


def plant_constant_channel(net: Net) -> None:
    """Zero filter, positive BN shift: a constant, *high* activation (no variance, no information)."""
    with torch.no_grad():
        net.conv1.weight[PLANT] = 0.0
        net.conv1.bias[PLANT] = 0.0
        net.bn1.bias[PLANT] = 5.0


def plant_ignored_channel(net: Net) -> None:
    """The next layer ignores channel PLANT, whose filter is the largest of the layer."""
    with torch.no_grad():
        net.conv2.weight[:, PLANT] = 0.0
        net.conv1.weight[PLANT] *= 10.0


CASES = [
    ("magnitude", plant_small_filter, None),
    ("l1", plant_small_filter, None),
    ("l2", plant_small_filter, None),
    ("l1_mean", plant_small_filter, None),
    ("fpgm", plant_median_filter, None),
    ("mean_variance", plant_small_filter, None),
    ("bn_scale", plant_small_gamma, None),
    ("apoz", plant_dead_channel, "x"),
    ("mean_activation", plant_dead_channel, "x"),
    ("variance", plant_constant_channel, "x"),
    ("entropy", plant_constant_channel, "x"),
    ("hrank", plant_constant_channel, "x"),
    ("taylor", plant_ignored_channel, "xy"),
    ("hessian", plant_ignored_channel, "xy"),
    ("lasso", plant_ignored_channel, "x"),
    ("thinet", plant_ignored_channel, "x"),
]


def _channel_scores(net: Net, criterion: str, calib, granularity: str = "channel") -> torch.Tensor:
    p = Pruner(net, torch.randn(2, 3, 8, 8), criterion=criterion, granularity=granularity, sparsity=0.125,
               calib=calib, ignore=["conv2", "fc"])
    ctx = p.contexts()["conv1"]
    return masks.unit_scores(p.criterion.score(net.conv1, ctx), "channel"), p


@pytest.mark.parametrize("name,plant,data", CASES, ids=[c[0] for c in CASES])
def test_planted_channel_scores_lowest(name, plant, data):
    net = _net()
    plant(net)
    calib = None if data is None else _calib(pairs=data == "xy")
    scores, _ = _channel_scores(net, name, calib)
    assert scores.shape == (8,)
    assert int(torch.argmin(scores)) == PLANT, f"{name}: {scores.tolist()}"
    others = torch.cat([scores[:PLANT], scores[PLANT + 1:]])
    assert float(scores[PLANT]) < float(others.min()), f"{name}: not strictly lowest {scores.tolist()}"
    # and the pruner removes exactly that channel (1 of 8 at sparsity 0.125)
    p = Pruner(net, torch.randn(2, 3, 8, 8), criterion=name, granularity="channel", sparsity=0.125,
               calib=calib, ignore=["conv2", "fc"])
    p.step()
    removed = (~masks.as_2d(p.masks["conv1"]).any(dim=1)).nonzero().flatten().tolist()
    assert removed == [PLANT]


@pytest.mark.parametrize("control", ["l1", "apoz", "mean_activation"])
def test_ignored_channel_plant_fools_other_criteria(control):
    """The gradient / reconstruction plant is not found by weight or activation size: the tests above can fail."""
    net = _net()
    plant_ignored_channel(net)
    scores, _ = _channel_scores(net, control, _calib())
    assert int(torch.argmin(scores)) != PLANT


def test_constant_channel_plant_fools_mean_activation():
    net = _net()
    plant_constant_channel(net)
    scores, _ = _channel_scores(net, "mean_activation", _calib())
    assert int(torch.argmax(scores)) == PLANT        # highest mean, yet no information


@pytest.mark.parametrize("name", ["taylor", "hessian"])
def test_gradient_criteria_elements(name):
    """Element granularity: the 27 weights of the ignored filter are the 27 lowest (gradient exactly 0)."""
    net = _net()
    plant_ignored_channel(net)
    p = Pruner(net, torch.randn(2, 3, 8, 8), criterion=name, granularity="element", sparsity=27 / 216,
               calib=_calib(pairs=True), ignore=["conv2", "fc"])
    p.step()
    mask = p.masks["conv1"]
    assert not bool(mask[PLANT].any()) and bool(torch.cat([mask[:PLANT], mask[PLANT + 1:]]).all())


def test_magnitude_planted_element():
    net = _net()
    with torch.no_grad():
        net.conv1.weight.add_(torch.sign(net.conv1.weight) * 0.01)
        net.conv1.weight[PLANT, 1, 2, 0] = 1e-6
    p = Pruner(net, torch.randn(2, 3, 8, 8), sparsity=1 / 216, ignore=["conv2", "fc"])
    p.step()
    assert (~p.masks["conv1"]).nonzero().tolist() == [[PLANT, 1, 2, 0]]


def test_random_is_seeded_and_differs_by_layer_and_seed():
    def scores(seed):
        net = _net()
        p = Pruner(net, torch.randn(2, 3, 8, 8), criterion="random", seed=seed)
        ctxs = p.contexts()
        return {k: p.criterion.score(p.layers[k], ctxs[k]) for k in p.layers}

    a, b, c = scores(0), scores(0), scores(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1"], c["conv1"])
    assert not torch.equal(a["conv1"].flatten()[:50], a["conv2"].flatten()[:50])


def test_every_builtin_documents_its_paper():
    docs = criteria.describe()
    expected = {"magnitude": "Han et al. 2015", "l1": "Li et al. 2017", "l1_mean": "Salama et al. 2019",
                "fpgm": "He et al. 2019", "bn_scale": "Liu et al. 2017", "apoz": "Hu et al. 2016",
                "mean_activation": "Molchanov et al. 2017", "entropy": "Luo & Wu 2017",
                "variance": "Polyak & Wolf 2015", "hrank": "Lin et al. 2020", "taylor": "Molchanov et al. 2019",
                "hessian": "Yu et al. 2022", "lasso": "He et al. 2017", "thinet": "Luo et al. 2017",
                "mean_variance": "Gong et al. 2020", "random": "Frankle & Carbin 2019", "l2": "Li et al. 2017"}
    for name, paper in expected.items():
        assert paper in docs[name], name
        assert criteria.get(name).fn.__doc__, name
    assert "LeCun et al. 1989" in docs["hessian"]
    data = {k for k in criteria.available() if criteria.get(k).data_dependent}
    assert data == {"apoz", "mean_activation", "entropy", "variance", "hrank", "taylor", "hessian", "lasso",
                    "thinet"}


@pytest.mark.parametrize("name", ["thinet", "lasso"])
def test_reconstruction_reduces_next_layer_error(name):
    """Least-squares refit of conv2 after removing half of conv1's channels beats plain masking."""
    calib = _calib(batches=4)
    x = torch.cat(calib)
    errors = {}
    for reconstruct in (False, True):
        net = _net(seed=3)
        with torch.no_grad():
            ref = net.conv2(net.relu(net.bn1(net.conv1(x))))
        p = Pruner(net, torch.randn(2, 3, 8, 8), criterion=name, granularity="channel", sparsity=0.5,
                   calib=calib, ignore=["conv2", "fc"], reconstruct=reconstruct)
        p.step()
        with torch.no_grad():
            h = net.relu(net.bn1(net.conv1(x)))
            h = h * masks.as_2d(p.masks["conv1"]).any(dim=1).float()[None, :, None, None]
            errors[reconstruct] = float((net.conv2(h) - ref).square().mean() / ref.square().mean())
    assert errors[True] < 0.8 * errors[False], errors


def test_consumer_criteria_need_a_plain_chain():
    from sparsekit import models
    torch.manual_seed(0)
    m = models.ResNet20(width=0.25, image_size=8)
    with pytest.raises(ValueError, match=r"plain sequential chains.*conv1.*ignore="):
        Pruner(m, m.example_input(), criterion="thinet", granularity="channel", calib=[m.example_input(4)])
    with pytest.raises(ValueError, match="granularity='channel'"):
        Pruner(_net(), torch.randn(2, 3, 8, 8), criterion="lasso", calib=_calib())


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradient_criteria_on_plain_batches_with_a_loss_of_ones_own(criterion):
    """A self-supervised loss needs no target: loss_fn gets (output, None) for plain batches, and the scores
    equal those from pairs whose target the loss ignores."""
    loss = lambda out, y: out.float().pow(2).mean()     # noqa: E731
    got = Pruner(_net(), torch.randn(2, 3, 8, 8), criterion=criterion, granularity="element", calib=_calib(),
                 loss_fn=loss, seed=3).scores()
    paired = [(x, torch.zeros(8, dtype=torch.long)) for x in _calib()]
    want = Pruner(_net(), torch.randn(2, 3, 8, 8), criterion=criterion, granularity="element", calib=paired,
                  loss_fn=loss, seed=3).scores()
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k])


_Output = collections.namedtuple("_Output", "logits loss")


class _WithLoss(nn.Module):
    """A Hugging Face-style model: given labels, its output carries .loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return _Output(logits, loss)


def test_gradient_criteria_take_the_loss_a_model_returns_for_labels_in_its_inputs():
    torch.manual_seed(0)
    model = _WithLoss()
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    calib = [{"x": x, "labels": y}]
    got = Pruner(model, {"x": x}, criterion="taylor", granularity="channel", calib=calib, ignore=[]).scores()
    want = Pruner(model, {"x": x}, criterion="taylor", granularity="channel", calib=[({"x": x}, y)], ignore=[],
                  loss_fn=lambda out, t: nn.functional.cross_entropy(out.logits, t)).scores()
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    with pytest.raises(ValueError, match="returned no .loss"):
        Pruner(model, {"x": x}, criterion="taylor", granularity="channel", calib=[{"x": x, "labels": None}],
               ignore=[]).step()


def test_bn_scale_needs_a_batchnorm():
    from sparsekit import models
    m = models.LeNet5(image_size=8)
    with pytest.raises(ValueError, match=r"needs a BatchNorm right after.*conv1.*ignore="):
        Pruner(m, m.example_input(), criterion="bn_scale", granularity="channel")


def test_gradient_criteria_need_pairs_and_scalar_loss():
    net = _net()
    with pytest.raises(ValueError, match=r"calib\[0\] is a plain batch.*\(input, target\) pairs"):
        Pruner(net, torch.randn(2, 3, 8, 8), criterion="taylor", calib=_calib()).step()
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        Pruner(net, torch.randn(2, 3, 8, 8), criterion="taylor", calib=_calib(pairs=True),
               loss_fn=lambda out, y: out).step()
    with pytest.raises(TypeError, match=r"calib\[0\] must be a Tensor.*length 3"):
        Pruner(net, torch.randn(2, 3, 8, 8), criterion="apoz", calib=[(1, 2, 3)]).step()
    with pytest.raises(ValueError, match="calib is empty"):
        Pruner(net, torch.randn(2, 3, 8, 8), criterion="apoz", calib=[]).step()
    with pytest.raises(TypeError, match="calib must be an iterable"):
        Pruner(net, torch.randn(2, 3, 8, 8), criterion="apoz", calib=torch.randn(3))


def test_calib_generator_is_kept_for_later_steps():
    from sparsekit.prune.schedules import Iterative
    net = _net()
    p = Pruner(net, torch.randn(2, 3, 8, 8), criterion="apoz", granularity="channel", sparsity=0.5,
               calib=(x for x in _calib()), schedule=Iterative(steps=2))
    p.step()
    p.step()
    assert p.done


def test_data_dependent_works_on_residual_models():
    from sparsekit import models
    torch.manual_seed(0)
    m = models.ResNet20(width=0.5, image_size=8)
    x = m.example_input(4)
    for name in ("apoz", "hrank", "taylor"):
        calib = [(x, torch.tensor([0, 1, 2, 3]))] if name == "taylor" else [x]
        p = Pruner(m, x, criterion=name, granularity="channel", sparsity=0.25, calib=calib)
        p.step()
        assert len(p.masks) == 21                      # 19 convs + 2 projections; fc left out
        p.remove()


def test_user_criterion_with_needs(monkeypatch):
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))

    @criteria.register("grad_only", needs=("grads",), doc="test")
    def grad_only(module, ctx):
        return ctx.stat("taylor_chan")

    assert criteria.get("grad_only").data_dependent
    net = _net()
    plant_ignored_channel(net)
    scores, _ = _channel_scores(net, "grad_only", _calib(pairs=True))
    assert int(torch.argmin(scores)) == PLANT
    with pytest.raises(ValueError, match="needs must name statistics from"):
        criteria.register("bad", lambda m, c: m.weight, needs=("weights",))


def test_l1_mean_divides_by_the_weights_a_filter_still_has():
    """Seed 003: a filter's size shrinks when the previous layer's channels go (their input columns are
    masked); dividing by the full size made later layers' scores fall at every iterative step."""
    from sparsekit import models

    torch.manual_seed(0)
    m = models.LeNet5(image_size=8)
    p = Pruner(m, m.example_input(), criterion="l1_mean", granularity="channel", scope="global", sparsity=0.5)
    before = masks.unit_scores(p.scores()["fc2"], "channel")
    p.step()
    cols = masks.as_2d(m.fc2.parametrizations.weight[0].mask).any(0)
    assert not bool(cols.all())                                  # fc1 lost neurons: fc2 lost input columns
    w = m.fc2.parametrizations.weight.original.detach()
    rows = masks.as_2d(p.masks["fc2"]).any(1)
    after = masks.unit_scores(p.criterion.score(m.fc2), "channel")
    torch.testing.assert_close(after[rows], w[rows][:, cols].abs().mean(1))
    assert bool((after[~rows] == 0).all())
    fresh = nn.Linear(4, 3)                                      # unmasked: the mean over all weights
    torch.testing.assert_close(criteria.get("l1_mean").score(fresh).sum(1), fresh.weight.detach().abs().mean(1))
    assert float(after[rows].mean()) > 0.9 * float(before[rows].mean())


def test_hessian_fisher_is_per_sample_whatever_the_batching(monkeypatch):
    """The empirical Fisher is the mean of per-sample squared gradients: one batch of 24, batches of 8 and
    micro-batches of one (the fallback where vmap cannot run) give the same statistic and scores."""
    from sparsekit.prune import calibration

    net = _net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 4, (24,), generator=g)

    def fisher(calib):
        p = Pruner(net, x[:2], criterion="hessian", granularity="element", sparsity=0.5, calib=calib,
                   ignore=["fc"])
        ctx = p.contexts()["conv2"]
        return ctx.stat("fisher") / ctx.stat("samples"), p.scores()["conv2"]

    one, s_one = fisher([(x, y)])
    eights, s_eights = fisher([(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)])
    torch.testing.assert_close(one, eights, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(s_one, s_eights, rtol=1e-6, atol=1e-12)
    manual = torch.zeros_like(one)
    for i in range(24):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        manual += net.conv2.weight.grad.double().square()
    torch.testing.assert_close(one, manual / 24, rtol=1e-5, atol=1e-12)
    squared_mean = sum(
        torch.autograd.grad(F.cross_entropy(net(x[i:i + 8]), y[i:i + 8]), net.conv2.weight)[0].double().square()
        for i in range(0, 24, 8)) / 3
    assert float(one.sum()) > 2 * float(squared_mean.sum())      # what the batch-mean gradient gave

    def no_vmap(*args, **kwargs):
        raise RuntimeError("vmap unsupported")

    monkeypatch.setattr(calibration, "_vmap_sq_grads", no_vmap)
    loop, _ = fisher([(x, y)])
    torch.testing.assert_close(loop, one, rtol=1e-5, atol=1e-12)


def test_random_channel_scores_do_not_depend_on_the_fan_in():
    """Under a global channel threshold, random draws one score per channel: a layer with few inputs is not
    emptied first (per-weight draws summed per channel grew with the fan-in)."""
    net = nn.Sequential(nn.Linear(2, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    removed_from_second = []
    for seed in range(5):
        p = Pruner(net, torch.randn(4, 2), criterion="random", granularity="channel", scope="global",
                   sparsity=0.45, seed=seed)
        keep = p.select(p.scores(), 0.45)
        removed_from_second.append(int((~keep["2"].any(1)).sum()))
        p.remove()
    assert sum(removed_from_second) > 0, removed_from_second
