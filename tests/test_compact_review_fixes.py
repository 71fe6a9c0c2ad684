"""Review fixes of compaction: a view with a literal channel count pins those channels (shapes computed from the
tensor follow them), a module or BatchNorm registered under two names is resized / selected under both (compact
and sk.load of the widths), each tensor keeps its requires_grad."""

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
    for grad_mode in (torch.enable_grad, torch.no_grad):   # (masked tensors: their stored originals are read)
        with grad_mode():
            small = pruner.compact()
        assert {n: p.requires_grad for n, p in small.named_parameters()} == {
            n: n.endswith("bias") for n, _ in small.named_parameters()}


class Reshaped(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if self.how == "view_shape":
            h = h.view(h.shape)
        elif self.how == "view_size":
            h = h.view(size=tuple(h.size()))
        elif self.how == "reshape_fn":
            h = torch.reshape(h, h.shape)
        else:    # a hand-written swish divides by 1 + exp(-h), never zero: no reason to keep channels
            h = h / (1 + torch.exp(-h))
        return self.c2(h)


@pytest.mark.parametrize("how", ["view_shape", "view_size", "reshape_fn", "swish"])
def test_shapes_computed_from_the_tensor_and_safe_divisions_still_compact(how):
    torch.manual_seed(0)
    model = Reshaped(how).eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.c1.out_channels == 4
    sk.verify(model, small, x)


class SharedNorm(nn.Module):
    """A BatchNorm under two names that reads a residual stream: compaction gives it a ChannelSelect."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.seq = nn.Sequential(self.bn, nn.ReLU(), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 1))

    def forward(self, x):
        h = self.c1(x)
        return h + self.seq(h)


def test_a_shared_norm_gets_its_channel_select_under_every_name(tmp_path):
    torch.manual_seed(0)
    model = SharedNorm().eval()
    with torch.no_grad():
        for bn in (model.bn, model.seq[3]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    graph = sk.prune.graph.DependencyGraph.build(model, x)
    keep = {g.id: torch.arange(0, g.size, 2) for g in graph.groups if g.prunable}
    small = sk.prune.compact.compact(model, x, keep, graph=graph)
    assert small.bn is small.seq[0] and type(small.bn).__name__ == "ChannelSelect"
    reference = sk.prune.compact.mask_groups(model, x, keep, graph=graph)
    torch.testing.assert_close(small(x), reference(x), rtol=1e-4, atol=1e-4)
    back = sk.load(sk.save(small, tmp_path / "m"), SharedNorm().eval())
    assert back.bn is back.seq[0]
    torch.testing.assert_close(back(x), small(x))
