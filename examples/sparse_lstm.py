"""A speech-style LSTM, end to end: remove a quarter of its hidden units (compaction of the stock nn.LSTM), give
its weight matrices Linear children (rnn_to_linear), prune each to 90% 32x32 blocks, sparsify, check, save and
load. Random weights: speed and equivalence are the point."""

import tempfile

import torch
from torch import nn

import sparsekit as sk


class SpeechLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(80, 512)
        self.lstm = nn.LSTM(512, 1024, num_layers=2, batch_first=True)
        self.out = nn.Linear(1024, 500)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(torch.relu(self.inp(feats)))[0])


torch.manual_seed(0)
model = SpeechLSTM().eval()
x = torch.randn(8, 50, 80)          # 8 utterances of 50 frames
params = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731

# 1. structured: a quarter of the hidden units (every layer's gates, the next layer's inputs) and of the input
# projection's outputs, through the dependency graph, on the stock nn.LSTM
units = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.25)
units.step()
small = units.compact().eval()
print(f"compacted: {params(model)} -> {params(small)} params, hidden {model.lstm.hidden_size} -> "
      f"{small.lstm.hidden_size}")

# 2. within the recurrent weights: nn.LSTM hands its flat weights to one fused kernel, which element / block
# pruning does not reach; rnn_to_linear gives it Linear children (same outputs)
conv = sk.nn.rnn_to_linear(small)
blocks = sk.prune.Pruner(conv, x, criterion="magnitude", granularity="block", block=(32, 32), sparsity=0.9,
                         ignore=["inp", "out"])
blocks.step()
blocks.bake()

# 3. hand-off: each weight matrix measured at its real input (the recurrent one at M = batch), the converted
# LSTM kept only if it beats the stock fused kernel on the real call
fast, report = sk.sparsify(conv, x, cache=False)
print(report)
diffs = sk.verify(conv, fast, x, atol=1e-4)
print(f"sparsified == block-pruned: max |diff| {max(diffs.values()):.2e}")

with tempfile.TemporaryDirectory() as path:
    sk.save(fast, path)
    loaded = sk.load(path, SpeechLSTM())          # the original class: widths and conversion re-applied
    print(f"loaded == sparsified: max |diff| {max(sk.verify(fast, loaded, x, atol=0).values()):.2e}")
