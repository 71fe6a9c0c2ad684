"""Schedules: one-shot, iterative (linear / geometric), AGP cubic; strings, objects and callables."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekit import models
from sparsekit.prune import Pruner, masks
from sparsekit.prune.schedules import AGP, Iterative, OneShot, resolve


def _mlp() -> models.MLP:
    torch.manual_seed(0)
    return models.MLP([64, 32, 16, 8])


def test_agp_is_zhu_gupta_cubic():
    s = AGP(steps=4, initial=0.1)
    got = [s.target(t, 0.9) for t in range(6)]
    want = [0.9 + (0.1 - 0.9) * (1 - (t + 1) / 4) ** 3 for t in range(4)] + [0.9, 0.9]
    assert got == pytest.approx(want)
    assert got[0] - 0.1 > got[3] - got[2]         # prunes fast first, slowly at the end
    assert not s.done(3) and s.done(4)


def test_iterative_linear_and_geometric():
    assert [Iterative(steps=4).target(t, 0.8) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    geo = [Iterative(steps=3, mode="geometric").target(t, 0.875) for t in range(3)]
    assert geo == pytest.approx([0.5, 0.75, 0.875])   # each round removes half of what is left


def test_pruner_follows_agp_and_stays_monotone():
    m = _mlp()
    p = Pruner(m, m.example_input(), sparsity=0.8, schedule=AGP(steps=3))
    prev = None
    targets = []
    while not p.done:
        targets.append(p.step())
        for name, mask in p.masks.items():
            assert (~mask).sum().item() == math.floor(targets[-1] * mask.numel() + 1e-9)
            if prev is not None:
                assert not bool((mask & ~prev[name]).any())
        prev = p.masks
    assert targets == pytest.approx([0.8 - 0.8 * (2 / 3) ** 3, 0.8 - 0.8 * (1 / 3) ** 3, 0.8])
    assert p.step() == 0.8 and p.steps_taken == 4


@pytest.mark.parametrize("schedule", [None, "oneshot", "one-shot", OneShot()])
def test_oneshot_forms(schedule):
    m = _mlp()
    p = Pruner(m, m.example_input(), sparsity=0.5, schedule=schedule)
    assert p.step() == 0.5 and p.done


def test_iterative_channel_schedule():
    m = _mlp()
    p = Pruner(m, m.example_input(), granularity="channel", sparsity=0.5, schedule=Iterative(steps=2))
    assert p.step() == 0.25
    assert int((~masks.as_2d(p.masks["layers.0"]).any(1)).sum()) == 8
    assert p.step() == 0.5
    assert int((~masks.as_2d(p.masks["layers.0"]).any(1)).sum()) == 16


def test_callable_still_works_and_remove_restarts():
    m = _mlp()
    p = Pruner(m, m.example_input(), sparsity=0.75, schedule=lambda t: [0.25, 0.5][min(t, 1)])
    assert p.step() == 0.25 and p.step() == 0.5 and not p.done
    p.remove()
    assert p.step() == 0.25


@pytest.mark.parametrize("make,exc,match", [
    (lambda: Iterative(steps=0), ValueError, "steps must be >= 1"),
    (lambda: Iterative(steps=2.0), TypeError, "steps must be an int"),
    (lambda: Iterative(steps=2, mode="cubic"), ValueError, "mode must be 'linear' or 'geometric'"),
    (lambda: AGP(steps=3, initial=1.0), ValueError, r"initial must be a float in \[0, 1\)"),
    (lambda: resolve("agp"), ValueError, "schedule must be 'oneshot'"),
    (lambda: AGP(steps=2, initial=0.6).target(0, 0.5), ValueError, "initial=0.6 is above"),
])
def test_bad_schedules(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_pruner_rejects_agp_starting_above_the_final_sparsity():
    m = _mlp()
    with pytest.raises(ValueError, match=r"AGP\(initial=0.6\) starts above sparsity=0.5"):
        Pruner(m, m.example_input(), sparsity=0.5, schedule=AGP(steps=3, initial=0.6))
    assert Pruner(m, m.example_input(), sparsity=0.5, schedule=AGP(steps=3, initial=0.5)).step() == 0.5


def test_nm_refuses_a_schedule():
    m = _mlp()
    with pytest.raises(ValueError, match="schedule=None"):
        Pruner(m, m.example_input(), granularity="nm", sparsity=0.5, schedule=Iterative(steps=2))


def test_oneshot_has_one_step_and_nan_penalty_is_refused():
    from sparsekit.prune.methods import bn_l1_penalty

    for steps in (0, 5, True):
        with pytest.raises(ValueError, match="OneShot has steps=1"):
            OneShot(steps=steps)
    with pytest.raises(ValueError, match="strength must be a float >= 0"):
        bn_l1_penalty(torch.nn.BatchNorm1d(3), strength=math.nan)
