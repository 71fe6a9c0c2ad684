"""Data for the examples: scikit-learn's bundled 8x8 digits (no download), or a synthetic stand-in.

    x_train, y_train, x_test, y_test = load()      # [N, 1, 8, 8] floats in [0, 1], int64 labels
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def load(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits split 70/30 (stratified); without scikit-learn, 10 noisy synthetic prototypes.

    Also sets torch to one thread: these models are tiny, and one thread stays fast on a busy machine."""
    torch.set_num_threads(1)
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        protos = torch.rand(10, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (1500,), generator=g)
        x = (protos[y] + 0.3 * torch.randn(1500, 1, 8, 8, generator=g)).clamp(0, 1)
        return x[:1000], y[:1000], x[1000:], y[1000:]
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    tr, te = train_test_split(range(len(y)), test_size=0.3, stratify=d.target, random_state=seed)
    return x[tr], y[tr], x[te], y[te]


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int = 10, lr: float = 2e-3, extra=None) -> None:
    """Adam, batch 64; ``extra()`` is added to the loss (e.g. a sparsity penalty)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())
