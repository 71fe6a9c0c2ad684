"""Lottery ticket: iterative magnitude pruning, rewinding survivors to init / an early iteration / random / none."""

import copy

import torch
from digits_data import accuracy, load, train

from sparsekit import models
from sparsekit.prune.methods import LotteryTicket

torch.manual_seed(0)
x, y, xt, yt = load()
dense = models.LeNet5(image_size=8)
for rewind in ("init", "iteration", "random", "finetune"):
    model = copy.deepcopy(dense)
    ticket = LotteryTicket(model, x[:2], sparsity=0.9, rounds=2, rewind=rewind)
    for _ in range(ticket.rounds):
        if rewind == "iteration":
            train(model, x[:256], y[:256], epochs=1)       # a few iterations, then remember them
            ticket.snapshot() if ticket.pruner.steps_taken == 0 else None
        train(model, x, y, epochs=3)
        ticket.prune_round()
    train(model, x, y, epochs=4)
    print(f"rewind={rewind:9s} 90% of weights removed: {accuracy(model, xt, yt):.2f}%")
