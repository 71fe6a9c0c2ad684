"""Network slimming (Liu et al. 2017): L1 on BatchNorm scales while training, then prune by |gamma|."""

import torch
from digits_data import accuracy, load, train

from sparsekit import models
from sparsekit.prune.cost import model_cost
from sparsekit.prune.methods import bn_l1_penalty, slimming_pruner

torch.manual_seed(0)
x, y, xt, yt = load()
model = models.ResNet20(width=0.25, in_channels=1, image_size=8)
train(model, x, y, epochs=5, extra=lambda: bn_l1_penalty(model, 1e-4))      # sparsity on the scales
print(f"trained with the L1 penalty: {accuracy(model, xt, yt):.2f}%")
pruner = slimming_pruner(model, x[:2], sparsity=0.4)                         # one global |gamma| threshold
pruner.step()
print(f"40% of channels pruned by |gamma|: {accuracy(model, xt, yt):.2f}%")
train(model, x, y, epochs=2, lr=1e-3)
cost = model_cost(model, x[:2])
print(f"fine-tuned: {accuracy(model, xt, yt):.2f}%  (FLOPs {cost['flops'] / cost['dense_flops']:.0%} of dense)")
small = pruner.compact()    # physically smaller: channels coupled by residual adds are removed together
diff = (small(xt) - model(xt)).abs().max().item()
print(f"compact(): {sum(p.numel() for p in small.parameters())} parameters (dense "
      f"{cost['dense_params']:.0f}), same outputs as the masked model (max |diff| {diff:.1e})")
