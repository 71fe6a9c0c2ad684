"""ABCPruner-style search of per-layer widths under a FLOPs budget (seed 000, sec. 2.2)."""

import copy

import torch
from digits_data import accuracy, load, train

from sparsekit import models
from sparsekit.prune import Pruner
from sparsekit.prune.cost import model_cost
from sparsekit.prune.methods import abc_search

torch.manual_seed(0)
x, y, xt, yt = load()
model = models.LeNet5(image_size=8)
train(model, x, y, epochs=10)
calib = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
res = abc_search(model, x[:2], calib, budget=0.3, metric="flops", colony=4, cycles=3)
print(f"searched widths {res.widths} ({res.cost:.0%} of the FLOPs), calibration fitness {res.fitness:.3f}")

uniform = copy.deepcopy(model)
Pruner(uniform, x[:2], criterion="l1", granularity="channel", sparsity=0.55).step()
searched = copy.deepcopy(model)
for name, k in res.widths.items():
    layer = dict(searched.named_modules())[name]
    Pruner(searched, x[:2], criterion="l1", granularity="channel", sparsity=1 - k / layer.weight.shape[0],
           ignore=[n for n in res.widths if n != name] + ["fc"]).step()
# one Pruner per layer: each keeps the masks the others put on shared tensors (consumer columns)
cost = model_cost(searched, x[:2])
print(f"searched model: {cost['flops'] / cost['dense_flops']:.0%} of the FLOPs after all per-layer Pruners")
for label, m in (("uniform 55%", uniform), ("searched", searched)):
    print(f"{label}: before fine-tune {accuracy(m, xt, yt):.2f}%", end="")
    train(m, x, y, epochs=2, lr=1e-3)
    print(f", after {accuracy(m, xt, yt):.2f}%")
