"""Low rank (seed 000, sec. 4): SVD to an energy target, alone and after channel pruning."""

import copy

import torch
from digits_data import accuracy, load, train

from sparsekit import models
from sparsekit.prune import Pruner
from sparsekit.prune.methods import low_rank

torch.manual_seed(0)
x, y, xt, yt = load()
model = models.LeNet5(image_size=8)
train(model, x, y, epochs=10)
n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
print(f"dense: {accuracy(model, xt, yt):.2f}%, {n(model)} params")

svd = copy.deepcopy(model)
report = low_rank(svd, energy=0.9)
print(f"SVD 90% energy: {accuracy(svd, xt, yt):.2f}%, {n(svd)} params, ranks {[r for r, _, _ in report.values()]}")
train(svd, x, y, epochs=2, lr=1e-3)
print(f"  fine-tuned: {accuracy(svd, xt, yt):.2f}%")

masked = copy.deepcopy(model)
pruner = Pruner(masked, x[:2], criterion="l1_mean", granularity="channel", scope="global", sparsity=0.4)
pruner.step()
train(masked, x, y, epochs=2, lr=1e-3)
both = pruner.compact()                                # channels out first: the SVD factorises the smaller layers
report = low_rank(both, energy=0.95)
train(both, x, y, epochs=2, lr=1e-3)
print(f"channels + SVD: {accuracy(both, xt, yt):.2f}%, {n(both)} params, ranks "
      f"{[r for r, _, _ in report.values()]}")
