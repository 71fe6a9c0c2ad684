"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019, 'The Lottery Ticket
Hypothesis'; Frankle et al. 2020 for rewinding to an early iteration).

Each round the user trains, ``prune_round()`` removes a further fraction of the remaining weights (masks
are kept) and resets the surviving weights according to ``rewind`` -- the initialisations of seed 001:

* ``"init"``: back to the values at construction (the original lottery ticket);
* ``"iteration"``: back to a snapshot the user took with ``snapshot()`` early in training ("later
  iteration", late rewinding);
* ``"random"``: a fresh random initialisation every round (the control experiment: a random re-init of the
  ticket; seed 001's "set randomly each time"), seeded by ``seed`` and the round;
* ``"finetune"``: no reset, training continues from the trained weights (fine-tuning).

    ticket = LotteryTicket(model, x, sparsity=0.9, rounds=3, rewind="init")
    for r in range(ticket.rounds):
        train(model, opt)
        ticket.prune_round(opt)       # (opt's momentum / Adam state is cleared with the rewind)
    train(model)          # the winning ticket
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import masks as _masks
from ..calibration import layer_seed
from ..pruner import Pruner
from ..schedules import Iterative

__all__ = ["LotteryTicket", "REWINDS"]

REWINDS = ("init", "iteration", "random", "finetune")


def _state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by its unmasked name (``conv.weight``, not ``...original``)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith(".mask"):
            continue
        out[key.replace("parametrizations.", "").replace(".original", "")] = value.detach().clone()
    return out


def _random_init(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """``_state`` of a freshly initialised copy of ``model`` (every module's own initialiser, the root's too;
    ``nn.MultiheadAttention``'s is ``_reset_parameters``), drawn from ``seed`` without touching the caller's RNG."""
    fresh = copy.deepcopy(model)
    _masks.remove_masks(fresh)          # plain parameters to re-draw (the masks stay on the model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if callable(reset):
                reset()
    return _state(fresh)


@torch.no_grad()
def _load(model: nn.Module, state: dict[str, Tensor]) -> None:
    current = model.state_dict(keep_vars=True)
    for key, tensor in current.items():
        if key.endswith(".mask"):
            continue
        plain = key.replace("parametrizations.", "").replace(".original", "")
        if plain in state:
            tensor.copy_(state[plain])


class LotteryTicket:
    """Iterative magnitude pruning over ``rounds`` rounds to ``sparsity`` with rewinding (see module doc).

    ``criterion``, ``granularity``, ``scope`` and ``ignore`` go to the ``Pruner`` (defaults: global
    element magnitude, as in the paper); each round removes the same fraction of the remaining weights.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, sparsity: float = 0.9, rounds: int = 3,
                 rewind: str = "init", criterion: str = "magnitude", granularity: str = "element",
                 scope: str = "global", ignore: Any = None, seed: int = 0) -> None:
        if rewind not in REWINDS:
            raise ValueError(f"rewind must be one of {REWINDS}, got {rewind!r}")
        if not isinstance(rounds, int) or isinstance(rounds, bool):
            raise TypeError(f"rounds must be an int >= 1 (pruning rounds), got {type(rounds).__name__} {rounds!r}")
        if rounds < 1:
            raise ValueError(f"rounds must be an int >= 1 (pruning rounds), got {rounds}")
        if any(_masks.is_masked(m) for m in model.modules()):
            raise ValueError("model is already masked: start a lottery ticket from an unpruned model")
        self.model, self.rewind, self.rounds, self.seed = model, rewind, rounds, seed
        self.pruner = Pruner(model, example_inputs, criterion=criterion, granularity=granularity, scope=scope,
                             sparsity=sparsity, ignore=ignore, schedule=Iterative(steps=rounds, mode="geometric"))
        self._rewind_state: dict[str, Tensor] | None = None
        self._round = 0
        if rewind == "init":
            self._rewind_state = _state(model)

    def snapshot(self) -> None:
        """Remember the current weights as the rewind point (``rewind="iteration"``: call it after a few
        training iterations, before the first ``prune_round``)."""
        self._rewind_state = _state(self.model)

    def prune_round(self, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Prune to this round's target, then reset the surviving weights; returns the target sparsity.

        ``optimizer`` (the one training ``model``): its per-parameter state (momentum, Adam's moments) is cleared
        with the rewind, so the next round trains as a fresh run from the rewound weights does (the paper
        retrains from scratch); with ``rewind="finetune"`` it is kept. Without it, pass a new optimizer to the
        next round yourself."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.rewind == "iteration" and self._rewind_state is None:
            raise ValueError("rewind='iteration' needs ticket.snapshot() during the first round of training")
        target = self.pruner.step()
        if self.rewind == "random":       # a new draw every round
            self._rewind_state = _random_init(self.model, layer_seed(self.seed, f"lottery/random-reinit/{self._round}"))
        self._round += 1
        if self.rewind != "finetune":
            _load(self.model, self._rewind_state)     # masks stay: pruned weights remain zero
            if optimizer is not None:
                optimizer.state.clear()
        return target

    def run(self, train_fn: Callable[[nn.Module], None]) -> nn.Module:
        """``rounds`` times ``train_fn(model)`` then ``prune_round()``; a final ``train_fn`` trains the ticket."""
        for _ in range(self.rounds):
            train_fn(self.model)
            self.prune_round()
        train_fn(self.model)
        return self.model
