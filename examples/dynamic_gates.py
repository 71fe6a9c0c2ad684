"""Dynamic pruning (seed 001 "dynamic"): per-input channel gates computed through channel-compacted ops."""

import time

import torch
from digits_data import accuracy, load, train

from sparsekit import models
from sparsekit.prune.methods import add_channel_gates

torch.manual_seed(0)
x, y, xt, yt = load()
model = models.LeNet5(image_size=8)
train(model, x, y, epochs=10)
print(f"static: {accuracy(model, xt, yt):.2f}%")
gates = add_channel_gates(model, ["conv2", "fc1", "fc2"], keep=0.5)   # half of the channels per input
train(model, x, y, epochs=4, lr=1e-3)                                 # gates and weights train together
t0 = time.perf_counter()
acc = accuracy(model, xt, yt)                                         # eval: only kept channels computed
print(f"gated (50% of channels per input): {acc:.2f}% in {time.perf_counter() - t0:.2f}s")
print("channels kept for the first two test images (fc1):", gates["fc1"].last_kept[:2, :8].tolist(), "...")
for name, gate in gates.items():      # dynamic: the kept channels must depend on the input
    distinct = torch.unique(gate.last_kept, dim=0).shape[0]
    print(f"{name}: {distinct} distinct kept-channel sets over {len(yt)} test images")
    if distinct < 2:
        raise SystemExit(f"{name}: every input keeps the same channels: the gate is static")
