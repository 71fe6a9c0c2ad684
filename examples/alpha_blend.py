"""Target-architecture pruning without fine-tuning (seed 002): alpha-blend narrow branches, then merge."""

import torch
from digits_data import accuracy, load, train

from sparsekit import models
from sparsekit.prune.methods import AlphaBlend

torch.manual_seed(0)
x, y, xt, yt = load()
model = models.LeNet5(image_size=8)
train(model, x, y, epochs=10)
print(f"original: {accuracy(model, xt, yt):.2f}%, {sum(p.numel() for p in model.parameters())} params")
blend = AlphaBlend(model, x[:2], widths=0.35)                  # every layer with a consumer to 35% width
for alpha in blend.alphas(step=0.25):                          # 1.0, 0.75, 0.5, 0.25, 0.0
    blend.set_alpha(alpha)
    train(model, x, y, epochs=1, lr=1e-3)                      # both branches train
    print(f"alpha={alpha:.2f}: {accuracy(model, xt, yt):.2f}%")
at_zero = model(xt)
blend.merge()                                                  # einsum-merged smaller layers
print(f"merged: {accuracy(model, xt, yt):.2f}%, {sum(p.numel() for p in model.parameters())} params, "
      f"max |difference| to alpha=0: {(model(xt) - at_zero).abs().max():.2e}")
