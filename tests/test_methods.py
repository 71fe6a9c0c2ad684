"""Procedures in sparsekit.prune.methods: slimming, lottery ticket, alpha-blend, low rank, width search,
dynamic gates."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit import models
from sparsekit.prune import Pruner, masks
from sparsekit.prune.methods import (
    AlphaBlend,
    ChannelGate,
    LotteryTicket,
    abc_search,
    add_channel_gates,
    bn_l1_penalty,
    factorize,
    low_rank,
    slimming_pruner,
    svd_rank,
)


def _data(n: int = 64, seed: int = 0, shape=(1, 8, 8), classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _fit(model: nn.Module, x, y, steps: int = 5, lr: float = 1e-2, extra=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()
    model.eval()


# ------------------------------------------------------------------------------------------- slimming
def test_slimming_penalty_shrinks_scales_then_prunes_the_smallest():
    torch.manual_seed(0)
    m = models.ResNet20(width=0.25, image_size=8, in_channels=1)
    x, y = _data(16)
    assert bn_l1_penalty(m, 1e-2).item() == pytest.approx(1e-2 * sum(b.weight.abs().sum().item()
                                                                      for b in m.modules()
                                                                      if isinstance(b, nn.BatchNorm2d)))
    before = sum(b.weight.abs().sum().item() for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    _fit(m, x, y, steps=3, extra=lambda: bn_l1_penalty(m, 1e-1))
    after = sum(b.weight.abs().sum().item() for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert after < before
    p = slimming_pruner(m, x[:2], sparsity=0.5, min_channels=0)      # the pure threshold (no per-layer guard)
    p.step()
    gammas = torch.cat([p._bn_of(k).weight.detach().abs() for k in p.layers])
    keep = torch.cat([masks.as_2d(p.masks[k]).any(1) for k in p.layers])
    assert float(gammas[~keep].max()) <= float(gammas[keep].min())        # one global threshold on |gamma|
    with pytest.raises(ValueError, match="strength must be"):
        bn_l1_penalty(m, -1.0)
    assert bn_l1_penalty(nn.Linear(2, 2)).item() == 0.0


# -------------------------------------------------------------------------------------------- lottery
@pytest.mark.parametrize("rewind", ["init", "iteration", "random", "finetune"])
def test_lottery_rewinds_surviving_weights(rewind):
    torch.manual_seed(0)
    m = models.MLP([64, 32, 16, 10])
    x, y = _data(32, shape=(64,))
    init = {k: v.clone() for k, v in m.state_dict().items()}
    ticket = LotteryTicket(m, x[:2], sparsity=0.75, rounds=2, rewind=rewind)
    _fit(m, x, y, steps=2)
    if rewind == "iteration":
        ticket.snapshot()
        snap = {k: v.clone() for k, v in m.state_dict().items()}
    _fit(m, x, y, steps=2)
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    assert ticket.prune_round() == pytest.approx(0.5)                      # geometric: half of what is left
    w = m.layers[0].parametrizations.weight.original.detach()
    expect = {"init": init, "iteration": snap if rewind == "iteration" else None, "finetune": trained}.get(rewind)
    if expect is not None:
        assert torch.equal(w, expect["layers.0.weight"])
    else:
        assert not torch.equal(w, init["layers.0.weight"]) and not torch.equal(w, trained["layers.0.weight"])
    assert ticket.prune_round() == pytest.approx(0.75)
    total = sum(mk.numel() for mk in ticket.pruner.masks.values())
    assert sum(int((~mk).sum()) for mk in ticket.pruner.masks.values()) == int(0.75 * total)


@pytest.mark.parametrize("rewind", ["init", "finetune"])
def test_lottery_round_clears_the_optimizer_state_with_the_rewind(rewind):
    torch.manual_seed(0)
    m = models.MLP([16, 8, 4])
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    ticket = LotteryTicket(m, x[:2], sparsity=0.5, rounds=2, rewind=rewind)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert opt.state
    ticket.prune_round(opt)
    assert bool(opt.state) == (rewind == "finetune")        # a rewound ticket trains as a fresh run
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        ticket.prune_round("adam")


def test_lottery_random_reinit_is_redrawn_every_round_and_covers_every_module():
    """rewind="random": each round draws a new initialisation (seeded: the same for the same seed), the root
    module and nn.MultiheadAttention's in-projection included."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.mha(x, x, x, need_weights=False)[0])

    x = torch.randn(2, 4, 8)
    firsts = []
    for _ in range(2):
        torch.manual_seed(0)
        m = Attn()
        before = m.mha.in_proj_weight.detach().clone()
        ticket = LotteryTicket(m, x, sparsity=0.75, rounds=2, rewind="random", ignore=["fc"], seed=3)
        ticket.prune_round()
        first = m.mha.out_proj.parametrizations.weight.original.detach().clone()
        assert not torch.equal(m.mha.in_proj_weight.detach(), before * (m.mha.in_proj_weight != 0))
        ticket.prune_round()
        second = m.mha.out_proj.parametrizations.weight.original.detach()
        assert not torch.equal(first, second)                 # a new draw in round 2
        firsts.append(first)
    assert torch.equal(*firsts)                               # seeded
    root = nn.Linear(16, 4)
    w0 = root.weight.detach().clone()
    LotteryTicket(root, torch.randn(2, 16), sparsity=0.5, rounds=1, rewind="random", ignore=[]).prune_round()
    assert not torch.equal(root.parametrizations.weight.original.detach(), w0)     # the root is re-drawn too


def test_lottery_run_and_errors():
    torch.manual_seed(0)
    m = models.MLP([64, 32, 10])
    x, y = _data(16, shape=(64,))
    LotteryTicket(m, x[:2], sparsity=0.5, rounds=2).run(lambda model: _fit(model, x, y, steps=1))
    assert masks.get_masks(m)
    with pytest.raises(ValueError, match="already masked"):
        LotteryTicket(m, x[:2])
    m2 = models.MLP([64, 32, 10])
    with pytest.raises(ValueError, match="rewind must be one of"):
        LotteryTicket(m2, x[:2], rewind="late")
    with pytest.raises(ValueError, match=r"needs ticket.snapshot\(\)"):
        LotteryTicket(m2, x[:2], rewind="iteration").prune_round()
    with pytest.raises(TypeError, match="rounds must be an int >= 1.*str '3'"):
        LotteryTicket(m2, x[:2], rounds="3")
    with pytest.raises(ValueError, match="rounds must be an int >= 1.*got 0"):
        LotteryTicket(m2, x[:2], rounds=0)


# ---------------------------------------------------------------------------------------- alpha blend
def test_alpha_blend_merge_gives_the_alpha0_outputs():
    torch.manual_seed(0)
    m = models.LeNet5(image_size=8)
    x, y = _data(32)
    ref = m(x).detach()
    blend = AlphaBlend(m, x[:2], widths={"conv1": 3, "conv2": 8, "fc1": 40, "fc2": 30})
    assert torch.equal(m(x), ref)                                     # alpha = 1: the original model
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)                    # both branches train
    names = {k for k, _ in m.named_parameters()}
    assert any(k.startswith("alpha_blend.") for k in names)
    assert blend.alphas(0.25) == [1.0, 0.75, 0.5, 0.25, 0.0]
    for alpha in blend.alphas(0.5):
        blend.set_alpha(alpha)
        m.train()
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    m.eval()
    y0 = m(x).detach()
    blend.merge()
    assert not hasattr(m, "alpha_blend")
    assert (m.conv1.out_channels, m.conv2.in_channels, m.conv2.out_channels) == (3, 3, 8)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.in_features, m.fc2.out_features) == (32, 40, 40, 30)
    assert m.fc.in_features == 30
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in models.LeNet5(image_size=8).parameters())


def test_alpha_blend_with_batchnorm_chain_and_errors():
    torch.manual_seed(0)
    m = models.VGG16_BN(width=0.125, in_channels=1)
    x = m.example_input(4)
    blend = AlphaBlend(m, x[:2], widths={"features.0": 4, "features.3": 5})
    blend.set_alpha(0.0)
    with torch.no_grad():
        m.alpha_blend["features__0"].a_bias.add_(0.1)               # anything trained
        y0 = m(x)
    blend.merge()
    assert isinstance(m.features[1], nn.BatchNorm2d) and m.features[1].num_features == 4
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-4)
    r = models.ResNet20(width=0.25, image_size=8)
    with pytest.raises(ValueError, match="cannot blend 'conv1'.*plain sequential chain"):
        AlphaBlend(r, r.example_input(), widths={"conv1": 2})
    le = models.LeNet5(image_size=8)
    with pytest.raises(ValueError, match=r"widths\['conv1'\] must be an int in \[1, 6\)"):
        AlphaBlend(le, le.example_input(), widths={"conv1": 6})
    with pytest.raises(ValueError, match="not an nn.Linear/nn.Conv2d"):
        AlphaBlend(le, le.example_input(), widths={"pool": 2})
    b = AlphaBlend(le, le.example_input(), widths=0.5)
    assert b.widths == {"conv1": 3, "conv2": 8, "fc1": 60, "fc2": 42}
    with pytest.raises(ValueError, match="merge\\(\\) needs alpha == 0"):
        b.merge()
    with pytest.raises(ValueError, match="is an nn.Sequential.*wrap it"):
        AlphaBlend(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 5), {"0": 4})

    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)

        def forward(self, x):
            return self.pw(torch.relu(self.dw(x)))

    dw = Depthwise()
    with pytest.raises(ValueError, match="'dw' is a grouped conv \\(groups=4\\)"):
        AlphaBlend(dw, torch.randn(2, 4, 5, 5), {"dw": 2})
    with pytest.raises(TypeError, match="non-empty dict"):    # the float form leaves grouped layers out
        AlphaBlend(dw, torch.randn(2, 4, 5, 5), 0.5)


# ------------------------------------------------------------------------------------------- low rank
def test_low_rank_exact_at_full_rank_and_energy_target():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 4) @ torch.randn(4, 32))     # rank 4
    seq = factorize(lin, energy=0.999)
    assert seq[0].out_features == 4
    x = torch.randn(5, 32)
    torch.testing.assert_close(seq(x), lin(x), atol=1e-4, rtol=1e-4)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    seq = factorize(conv, rank=8)
    xi = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(seq(xi), conv(xi), atol=1e-4, rtol=1e-4)
    assert svd_rank(torch.tensor([3.0, 1.0, 0.0]), energy=0.9) == 1
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        svd_rank(torch.ones(3))


def test_low_rank_on_a_model_and_combined_with_channel_pruning():
    torch.manual_seed(0)
    m = models.MLP([64, 48, 48, 10])
    x = m.example_input(4)
    p = Pruner(m, x, criterion="l1", granularity="channel", sparsity=0.75)
    p.step()
    y_masked = m(x).detach()
    with pytest.raises(ValueError, match="compact the pruned model first"):
        low_rank(m, energy=1.0)
    small = p.compact()                                              # channels first, then the SVD
    torch.testing.assert_close(small(x), y_masked, atol=1e-4, rtol=1e-4)
    compacted = sum(q.numel() for q in small.parameters())
    report = low_rank(small, energy=0.6)                             # factors of the 12-wide layers
    assert report and all(rank < 12 for rank, _, _ in report.values())
    assert sum(q.numel() for q in small.parameters()) < compacted
    baked = copy.deepcopy(m)
    masks.bake_masks(baked)
    with pytest.warns(RuntimeWarning, match="all-zero output rows"):   # full-width factors: the zeros revive
        report = low_rank(baked, energy=1.0)                         # lossless: rank = kept channels
    assert report["layers.0"][0] == 12 and report["layers.2"][0] <= 12
    torch.testing.assert_close(baked(x), y_masked, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="grouped conv"):
        low_rank(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), energy=0.5, layers=["0"])


# --------------------------------------------------------------------------------------- width search
def test_abc_search_meets_budget_and_finds_the_redundant_layer():
    torch.manual_seed(0)
    m = models.MLP([16, 32, 32, 4])
    with torch.no_grad():                         # layer 0: only 4 neurons matter; layer 2: all 32 do
        m.layers[0].weight[4:] *= 1e-3
        m.layers[0].bias[4:] = 0
        m.layers[2].weight[:, 4:] = 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = m(x).argmax(1)
    calib = [(x[:128], y[:128]), (x[128:], y[128:])]
    res = abc_search(m, x[:2], calib, budget=0.4, metric="params", colony=4, cycles=4, seed=0)
    assert res.cost <= 0.4 + 1e-9
    assert res.widths["layers.0"] < res.widths["layers.2"]
    assert res.fitness >= 0.9
    again = abc_search(m, x[:2], calib, budget=0.4, metric="params", colony=4, cycles=4, seed=0)
    assert again.widths == res.widths                                   # deterministic
    with pytest.raises(ValueError, match="budget must be a fraction"):
        abc_search(m, x[:2], calib, budget=0.0)
    with pytest.raises(ValueError, match="metric must be"):
        abc_search(m, x[:2], calib, budget=0.5, metric="latency")


# -------------------------------------------------------------------------------------------- dynamic
@pytest.mark.parametrize("conv_kw", [dict(padding=1), dict(padding=1, padding_mode="reflect"),
                                     dict(padding="same", dilation=2), dict(padding=1, padding_mode="circular")])
def test_channel_gate_compact_path_matches_dense_masked(conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, **conv_kw)
    gate = ChannelGate(conv, keep=0.5)
    with torch.no_grad():
        gate.predictor.weight.normal_()
    x = torch.randn(3, 4, 6, 6)
    gate.eval()
    y = gate(x)
    kept = gate.last_kept
    assert kept.shape == (3, 4)
    assert len({tuple(r.tolist()) for r in kept}) > 1                  # depends on the input
    s = torch.sigmoid(gate.scores(x))
    hard = torch.zeros_like(s).scatter_(1, kept, 1.0)
    torch.testing.assert_close(y, conv(x) * (hard * s)[:, :, None, None], atol=1e-5, rtol=1e-5)
    gate.train()
    gate.norm.eval()            # the same scores as in eval mode (training standardises with batch statistics)
    torch.testing.assert_close(gate(x), y, atol=1e-5, rtol=1e-5)
    gate(x).sum().backward()
    assert gate.predictor.weight.grad is not None and conv.weight.grad is not None


def test_channel_gate_selection_depends_on_the_input_from_the_start():
    """A fresh gate (statistics from one training batch) keeps different channels for different inputs; a
    zero-weight predictor with an L1 bias kept the same channels for every input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, padding=1)
    gate = ChannelGate(conv, keep=0.5)
    x = torch.rand(64, 6, 4, 4) + torch.linspace(0, 1, 6)[:, None, None]   # channel means vary little
    gate.train()
    gate(x)
    gate.eval()
    gate(x)
    assert torch.unique(gate.last_kept, dim=0).shape[0] > 8
    one = ChannelGate(nn.Linear(4, 3), keep=0.5).train()
    assert one(torch.randn(1, 4)).shape == (1, 3)            # one sample in training: running statistics


def test_channel_gate_on_linear_tokens():
    """[batch, tokens, features] inputs: scores from the features averaged over tokens (F != T)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 10)
    gate = ChannelGate(lin, keep=0.3).eval()
    x = torch.randn(3, 5, 6)
    s = gate.scores(x)
    assert s.shape == (3, 10)
    torch.testing.assert_close(s, gate.predictor(gate.norm(x.mean(1))))
    y = gate(x)
    hard = torch.zeros_like(s).scatter_(1, gate.last_kept, 1.0)
    torch.testing.assert_close(y, lin(x) * (hard * torch.sigmoid(s))[:, None, :], atol=1e-5, rtol=1e-5)
    gate.train()
    gate.norm.eval()
    torch.testing.assert_close(gate(x), y, atol=1e-5, rtol=1e-5)


def test_channel_gate_loads_a_state_dict_saved_before_the_input_norm():
    """Gates saved by an earlier sparsekit have no ``norm.*`` entries: they load with identity statistics,
    which give their old scores in eval mode (the predictor on the raw pooled input)."""
    torch.manual_seed(0)
    gate = ChannelGate(nn.Linear(6, 10), keep=0.3)
    old = {k: v for k, v in gate.state_dict().items() if not k.startswith("norm.")}
    fresh = ChannelGate(nn.Linear(6, 10), keep=0.3)
    fresh.load_state_dict(old)
    x = torch.randn(4, 5, 6)
    expected = gate.predictor(x.mean(1))
    torch.testing.assert_close(fresh.eval().scores(x), expected, atol=1e-4, rtol=1e-4)
    assert int(fresh.norm.num_batches_tracked) == 1     # a first training batch does not reset them


def test_add_channel_gates_on_lenet():
    torch.manual_seed(0)
    m = models.LeNet5(image_size=8)
    gates = add_channel_gates(m, ["conv2", "fc1"], keep=0.25)
    assert isinstance(m.conv2, ChannelGate) and gates["fc1"].k == 30
    m.eval()
    out = m(m.example_input(2))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="keep must be a fraction"):
        ChannelGate(nn.Linear(2, 2), keep=0.0)
    with pytest.raises(ValueError, match="not a module of model"):
        add_channel_gates(m, ["conv9"])


def test_abc_search_returns_the_best_candidate_it_ever_scored_on_the_pruned_network():
    """The best candidate evaluated is returned even when the colony later abandons it (limit); and the network
    scored is the pruned one: a removed channel's BatchNorm outputs 0, not its shift."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        m[1].bias.fill_(0.5)
    x = torch.randn(2, 3, 4, 4)
    scored, leaks = [], []

    def fitness(target, calib):
        rows_kept = target[0].weight.detach().reshape(8, -1).ne(0).any(1)
        with torch.no_grad():
            bn_out = target[1](target[0](x))
        leaks.append(float(bn_out[:, ~rows_kept].abs().max()) if (~rows_kept).any() else 0.0)
        f = -abs(int(rows_kept.sum()) - 5) - abs(int(target[3].weight.detach().reshape(8, -1).ne(0).any(1).sum()) - 3)
        scored.append(float(f))
        return float(f)

    res = abc_search(m, x, [(x, torch.zeros(2, dtype=torch.long))], budget=1.0, metric="params", colony=3,
                     cycles=6, limit=1, seed=2, fitness=fitness)
    assert res.fitness == max(scored) and res.history[-1] == max(scored)
    assert all(a <= b for a, b in zip(res.history, res.history[1:]))        # best so far: never decreases
    assert max(leaks) == 0.0


def test_abc_search_says_when_no_fitness_is_comparable():
    m = models.MLP([8, 16, 4])
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="no comparable value for any of the"):
        abc_search(m, x[:2], [(x, torch.zeros(4, dtype=torch.long))], budget=0.8, colony=2, cycles=1,
                   fitness=lambda model, calib: float("nan"))


def test_abc_search_an_infinite_fitness_is_the_best():
    m = models.MLP([8, 16, 4])
    x = torch.randn(4, 8)
    res = abc_search(m, x[:2], [(x, torch.zeros(4, dtype=torch.long))], budget=0.9, colony=3, cycles=2,
                     fitness=lambda model, calib: float("inf"))
    assert res.fitness == float("inf")


def test_alpha_blend_trains_through_inplace_relu_in_float64_and_keeps_bn_counts():
    class Wrap(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    torch.manual_seed(0)
    m = Wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    blend = AlphaBlend(m, x[:2], widths={"net.0": 4})
    blend.set_alpha(0.5)
    m(x).sum().backward()                                   # the in-place ReLU does not clobber the branch input
    branch = m.alpha_blend["net__0"]
    assert branch.a_weight.grad is not None and branch.a_weight.dtype == torch.float64
    c = Wrap(nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Conv2d(8, 3, 1)))
    c.net[1].num_batches_tracked.fill_(50)
    AlphaBlend(c, torch.randn(2, 2, 6, 6), widths={"net.0": 4})
    assert int(c.alpha_blend["net__0"].bns["1"].num_batches_tracked) == 50   # the cumulative average keeps its count


def test_bools_are_not_fractions():
    from sparsekit.prune.methods import abc_search, svd_rank

    with pytest.raises(ValueError, match="energy must be a float"):
        svd_rank(torch.ones(3), energy=True)
    with pytest.raises(ValueError, match="step must be in"):
        AlphaBlend.alphas(True)
    m = models.MLP([8, 8, 2])
    with pytest.raises(ValueError, match="budget must be a fraction"):
        abc_search(m, torch.randn(2, 8), [torch.randn(2, 8)], budget=True)
