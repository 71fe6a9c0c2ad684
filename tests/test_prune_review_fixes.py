"""Review fixes in sparsekit.prune: hrank / fpgm under global scope, fpgm after an earlier step, AlphaBlend
through nn.Flatten, abc_search's training flags, low_rank's error on a masked layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit.prune import Pruner, criteria, masks
from sparsekit.prune.methods import AlphaBlend, abc_search, low_rank
from sparsekit.prune.methods.width_search import calib_fitness
from sparsekit.prune.schedules import Iterative


# ------------------------------------------------------------------------------ hrank / fpgm: layer scope only
def _three_convs() -> nn.Module:
    # 16x16 maps, then 4x4 maps after the pooling: hrank's ranks are capped by 16 and by 4
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(4), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("name", ["hrank", "fpgm"])
def test_hrank_and_fpgm_scores_do_not_compare_across_layers(name):
    x = torch.randn(4, 3, 16, 16)
    kw = {"calib": [x]} if name == "hrank" else {}
    with pytest.raises(ValueError, match=f"scope='global'.*'{name}'"):
        Pruner(_three_convs(), x, criterion=name, granularity="channel", scope="global", sparsity=0.5, **kw).step()
    assert criteria.get(name).comparable is False
    p = Pruner(_three_convs(), x, criterion=name, granularity="channel", scope="layer", sparsity=0.5, **kw)
    p.step()
    removed = {r["name"]: r["removed"] for r in p.sparsity_report()}
    assert removed == {"0": 8, "2": 16, "5": 16}            # the classifier is left out


# ------------------------------------------------------------------------------ fpgm over the remaining filters
def _fpgm_live(w: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    rows = w.reshape(w.shape[0], -1).double()
    out = torch.zeros(w.shape[0], dtype=torch.float64)
    out[live] = torch.cdist(rows[live], rows[live]).sum(1)
    return out


def test_fpgm_leaves_removed_filters_out_of_the_distance_sums():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 10, 3)
    live = torch.ones(10, dtype=torch.bool)
    live[[1, 4, 7]] = False
    masks.apply_mask(conv, live.reshape(-1, 1, 1, 1).expand_as(conv.weight).clone())
    got = criteria.get("fpgm").score(conv)
    torch.testing.assert_close(got.double(), _fpgm_live(conv.weight.detach(), live))
    assert bool((got[~live] == 0).all())


def test_fpgm_second_iterative_step_ranks_by_distance_among_the_remaining_filters():
    # a tight cluster of large filters near the median, and distinct small ones: counting the removed (zero)
    # filters adds each filter's own norm to its sum, which favours removing the small distinct filters
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        d = torch.randn(32)
        m[0].weight[:40] = 2.0 * d / d.norm() + 0.05 * torch.randn(40, 32)
        m[0].weight[40:] = 0.3 * torch.randn(24, 32) / 32 ** 0.5 * 4
    p = Pruner(m, torch.randn(2, 32), criterion="fpgm", granularity="channel", sparsity=0.5,
               schedule=Iterative(steps=2))
    p.step()
    live = masks.as_2d(p.masks["0"]).any(1)
    assert int((~live).sum()) == 16
    ref = _fpgm_live(m[0].weight.detach(), live)
    torch.testing.assert_close(p.scores()["0"][live].double(), ref[live])
    expected = set(torch.nonzero(~live).reshape(-1).tolist())
    expected |= {int(i) for i in torch.nonzero(live).reshape(-1)[torch.argsort(ref[live], stable=True)[:16]]}
    p.step()
    assert set(torch.nonzero(~masks.as_2d(p.masks["0"]).any(1)).reshape(-1).tolist()) == expected


# ------------------------------------------------------------------------------ AlphaBlend through nn.Flatten
class _Net(nn.Module):
    def __init__(self, act: nn.Module | None = None, functional_flatten: bool = False) -> None:
        super().__init__()
        self.functional_flatten = functional_flatten
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3), act if act is not None else nn.ReLU(), nn.Conv2d(8, 12, 3),
                               nn.ReLU())
        self.flat = nn.Flatten()
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.f(x)
        return self.fc(torch.flatten(h, 1) if self.functional_flatten else self.flat(h))


def _blend_and_merge(model: nn.Module, x: torch.Tensor) -> tuple[AlphaBlend, torch.Tensor, torch.Tensor]:
    blend = AlphaBlend(model, x, widths=0.5)
    with torch.no_grad():
        for br in blend.branches.values():       # as if trained: the merge must fold every part exactly
            br.a_weight.add_(0.1 * torch.randn_like(br.a_weight))
            br.e_weight.add_(0.1 * torch.randn_like(br.e_weight))
            br.a_bias.normal_()
    blend.set_alpha(0.0)
    with torch.no_grad():
        y0 = model(x)
        blend.merge()
        return blend, y0, model(x)


def test_alpha_blend_passes_nn_flatten_like_torch_flatten():
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(0)
    blend, y0, merged = _blend_and_merge(_Net(), x)
    assert blend.widths == {"f.0": 4, "f.2": 6}
    torch.testing.assert_close(merged, y0, atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    ref, y0_fn, merged_fn = _blend_and_merge(_Net(functional_flatten=True), x)
    assert ref.widths == blend.widths
    torch.testing.assert_close(merged, merged_fn, atol=1e-5, rtol=1e-4)     # the same model, the same result


@pytest.mark.parametrize("act", [nn.SELU, nn.Hardtanh, nn.Softplus])
def test_alpha_blend_replays_other_stateless_activations(act):
    x = torch.randn(4, 3, 6, 6)
    _, y0, merged = _blend_and_merge(_Net(act()), x)
    torch.testing.assert_close(merged, y0, atol=1e-5, rtol=1e-4)


def test_alpha_blend_names_the_real_reason_for_a_module_it_cannot_replay():
    with pytest.raises(ValueError, match=r"cannot blend 'f.0': its chain passes 'f.1' \(PReLU\), which the "
                                         "narrow branch cannot replay"):
        AlphaBlend(_Net(nn.PReLU(8)), torch.randn(2, 3, 6, 6), widths={"f.0": 4})


# ------------------------------------------------------------------------------ abc_search: training flags kept
def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _flags(model: nn.Module) -> list[bool]:
    return [mod.training for mod in model.modules()]


def test_calib_fitness_and_abc_search_restore_every_training_flag():
    m = _small_cnn().train()
    m[1].eval()                        # a frozen BatchNorm: model.train() afterwards would not give it back
    flags = _flags(m)
    x, y = torch.randn(4, 3, 10, 10), torch.randint(0, 10, (4,))
    calib_fitness(m, [(x, y)])
    assert _flags(m) == flags
    abc_search(m, x, [(x, y)], budget=0.6, colony=2, cycles=1)
    assert _flags(m) == flags

    def evaluates_in_eval_mode(model: nn.Module, calib: list) -> float:
        model.eval()
        return 0.0

    abc_search(m, x, [(x, y)], budget=0.6, colony=2, cycles=1, fitness=evaluates_in_eval_mode)
    assert _flags(m) == flags

    def fails(model: nn.Module, calib: list) -> float:
        model.eval()
        raise RuntimeError("fitness failed")

    with pytest.raises(RuntimeError, match="fitness failed"):
        abc_search(m, x, [(x, y)], budget=0.6, colony=2, cycles=1, fitness=fails)
    assert _flags(m) == flags and not any(masks.is_masked(mod) for mod in m.modules())
    with pytest.raises(ValueError, match=r"calib\[0\] must be an \(input, target\) pair"):
        calib_fitness(m, [x])
    assert _flags(m) == flags


# ------------------------------------------------------------------------------ low_rank: which layer is masked
def test_low_rank_names_the_masked_layer_and_changes_nothing():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    masks.apply_mask(m[2], torch.rand(32, 32) > 0.5)
    with pytest.raises(ValueError, match=r"layer '2' is masked: compact the pruned model first"):
        low_rank(m, rank=2)
    assert all(isinstance(m[i], nn.Linear) for i in (0, 2, 4))      # '0' came first and was not factorised either
    report = low_rank(m, rank=2, ignore=["2"])
    assert set(report) == {"0", "4"}


# ---------------------------------------------------------------------------------- second pruning review
def test_cost_counts_every_call_of_a_shared_layer_and_a_converted_rnn_like_the_stock_one():
    import sparsekit as sk
    from sparsekit.prune.cost import model_cost

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(self.a(self.a(x)))

    assert model_cost(Twice(), torch.randn(1, 8))["dense_flops"] == 2 * 64 + 16

    class Seq(nn.Module):
        def __init__(self, rnn: nn.Module) -> None:
            super().__init__()
            self.r = rnn

        def forward(self, x):
            return self.r(x)[0]

    x = torch.randn(1, 5, 8)
    for rnn in (nn.LSTM(8, 16, batch_first=True), nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True)):
        stock = Seq(rnn)
        want = model_cost(stock, x)["dense_flops"]
        assert model_cost(sk.nn.rnn_to_linear(stock), x)["dense_flops"] == want


def test_taylor_scores_of_fp16_weights_do_not_underflow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).half()
    x = torch.randn(16, 64).half()
    calib = [(torch.randn(16, 64).half(), torch.randint(0, 10, (16,))) for _ in range(2)]
    scores = Pruner(model, x, criterion="taylor", granularity="element", sparsity=0.5, calib=calib).scores()
    # (fp16 products squared underflowed to 0: almost every score was a tie, the pruned weights picked by index)
    assert (scores["0"] == 0).float().mean() < 0.05


def _conv_flatten_linear() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("criterion", ["lasso", "thinet"])
def test_reconstruction_keeps_the_consumer_when_nothing_is_removed_and_remove_undoes_it(criterion):
    import copy

    from sparsekit.prune.calibration import weight_param

    torch.manual_seed(0)
    ref = _conv_flatten_linear()
    x, calib = torch.randn(2, 3, 6, 6), [torch.randn(32, 3, 6, 6) for _ in range(4)]
    m = copy.deepcopy(ref)
    Pruner(m, x, criterion=criterion, granularity="channel", sparsity=0.0, calib=calib).step()
    # (the refit used to pull the Linear's 288 inputs towards the least-norm fit of 128 samples)
    assert torch.equal(m[5].weight, ref[5].weight) and torch.equal(m[2].weight, ref[2].weight)

    m = copy.deepcopy(ref)
    p = Pruner(m, x, criterion=criterion, granularity="channel", sparsity=0.5,
                schedule=Iterative(2), calib=calib)
    p.step()
    p.step()
    assert not torch.equal(m[5].weight, ref[5].weight)
    # fine-tuning moves the refit consumer's kept weights: remove() keeps that and undoes the refit
    tuned = 0.5 * masks._mask_param(m[5], "weight").mask
    with torch.no_grad():
        weight_param(m[5]).add_(tuned)
    p.remove()
    test = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        m[5].weight.sub_(tuned)
        torch.testing.assert_close(m(test), ref(test))


def test_remove_restores_the_running_statistics_of_masked_norm_channels():
    import copy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(16, 3, 4, 4))
    ref = copy.deepcopy(m)
    p = Pruner(m, torch.randn(4, 3, 4, 4), criterion="l1", granularity="channel", sparsity=0.5)
    p.step()
    removed = ~p.masks["0"].reshape(8, -1).any(1)
    with torch.no_grad():    # fine-tuning passes: the masked channels' inputs are 0, their variance decays
        for _ in range(30):
            m(torch.randn(16, 3, 4, 4))
    assert bool((m[1].running_var[removed] < 0.1).all())
    p.remove()
    assert torch.equal(m[1].running_var[removed], ref[1].running_var[removed])
    assert torch.equal(m[1].running_mean[removed], ref[1].running_mean[removed])


def test_alpha_blend_fraction_that_rounds_to_full_width_skips_the_layer():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 2))

        def forward(self, x):
            return self.f(x)

    blend = AlphaBlend(Net(), torch.randn(2, 4), widths=0.95)   # 8 -> 8 (skipped), 40 -> 38
    assert blend.widths == {"f.2": 38}
    with pytest.raises(ValueError, match="full width"):
        AlphaBlend(Net(), torch.randn(2, 4), widths=0.99)
