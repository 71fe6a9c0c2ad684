"""Review fixes of compaction: a view with a literal channel count pins those channels, a module registered under
two names is resized under both (compact and sk.load of the widths), each tensor keeps its requires_grad."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk


class TutorialLeNet(nn.Module):
    """PyTorch's tutorial LeNet: x.view(-1, 16 * 5 * 5) writes conv2's width into the code."""

    def __init__(self, literal: bool = True):
        super().__init__()
        self.literal = literal
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5) if self.literal else x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


def test_a_view_with_a_literal_channel_count_pins_those_channels():
    x = torch.randn(2, 1, 32, 32)
    for literal in (True, False):
        torch.manual_seed(0)
        model = TutorialLeNet(literal).eval()
        pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
        pruner.step()
        small = pruner.compact()
        sk.verify(model, small, x)
        assert small.conv2.out_channels == (16 if literal else 8)      # x.size(0), -1 follows the channels
        assert small.conv1.out_channels == 3


class TwoNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.features = nn.Sequential(self.stem, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_a_module_under_two_names_is_resized_under_both(tmp_path):
    torch.manual_seed(0)
    model = TwoNames().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.stem is small.features[0] and small.stem.out_channels == 4
    sk.verify(model, small, x)
    back = sk.load(sk.save(small, tmp_path / "m"), TwoNames().eval())
    assert back.stem is back.features[0] and back.features[0].out_channels == 4
    torch.testing.assert_close(back(x), small(x))


def test_each_resized_tensor_trains_as_its_original_did():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))            # BitFit: only biases train
    x = torch.randn(2, 3, 8, 8)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert {n: p.requires_grad for n, p in small.named_parameters()} == {
        n: n.endswith("bias") for n, _ in small.named_parameters()}


class Normalised(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        h = self.c1(x)
        if self.how == "div":
            h = h / h.abs().amax((2, 3), keepdim=True)
        else:
            h = h * torch.rsqrt(h.pow(2).mean((2, 3), keepdim=True))
        return self.c2(h)


def test_channels_a_model_divides_by_are_not_pruned():
    """1 / x of a removed (zero) channel is inf in the masked model (NaN after the next layer), which the
    compacted model could not match: those channels stay."""
    x = torch.randn(2, 3, 8, 8)
    for how in ("div", "rsqrt"):
        torch.manual_seed(0)
        model = Normalised(how).eval()
        pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
        with pytest.warns(UserWarning, match="no channel group can be pruned"):
            pruner.step()
        assert bool(torch.isfinite(model(x)).all())
        sk.verify(model, pruner.compact(), x)
