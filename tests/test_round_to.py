"""``select(..., round_to=r)``: every compacted group keeps a multiple of ``r`` channels (conv, DenseNet-style
selections, grouped / GroupNorm units, attention heads), and the compacted model still equals the masked one."""

import pytest
import torch
from _norms import randomize_norms as _randomize
from torch import nn

import sparsekit as sk
from sparsekit.models import VGG16_BN, ResNet20, ResNet50, TransformerEncoder
from sparsekit.prune.compact import _effective_keep, _stream_mask, compact, mask_groups
from sparsekit.prune.graph import DependencyGraph


class Mobile(nn.Module):
    """MobileNet-style: depthwise separable conv, then a GroupNorm and a grouped conv whose units are 16 channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 40, 3, padding=1, bias=False), nn.BatchNorm2d(40)
        self.dw, self.bn1 = nn.Conv2d(40, 40, 3, padding=1, groups=40, bias=False), nn.BatchNorm2d(40)
        self.pw, self.gn = nn.Conv2d(40, 64, 1), nn.GroupNorm(4, 64)
        self.gconv = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.dw(torch.relu(self.bn0(self.stem(x))))))
        x = self.gconv(torch.relu(self.gn(self.pw(x))))
        return self.fc(x.mean((2, 3)))


class Dense(nn.Module):
    """DenseNet-style: pre-activation BN-ReLU-conv layers reading a concatenated stream (ChannelSelect)."""

    def __init__(self, c0=24, growth=12, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.layers = nn.ModuleList()
        for i in range(layers):
            c = c0 + i * growth
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
        self.fc = nn.Linear(c0 + layers * growth, 5)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(x.mean((2, 3)))


MODELS = {
    "resnet20": lambda: (ResNet20(width=1.0), torch.randn(1, 3, 32, 32)),
    "resnet50": lambda: (ResNet50(width=0.25, image_size=32), torch.randn(1, 3, 32, 32)),
    "vgg16_bn": lambda: (VGG16_BN(width=0.25), torch.randn(1, 3, 32, 32)),
    "mobile": lambda: (Mobile(), torch.randn(1, 3, 16, 16)),
    "dense": lambda: (Dense(), torch.randn(1, 3, 16, 16)),
    # head_dim 4: with round_to 8 / 16 the head count itself must step by 2 / 4
    "transformer": lambda: (TransformerEncoder(vocab=50, dim=32, heads=8, ffn=72, layers=1, seq_len=6),
                            torch.randint(0, 50, (1, 6))),
}
_GRAPHS: dict = {}


def _graph(name):
    if name not in _GRAPHS:
        model, x = MODELS[name]()
        _randomize(model)
        _GRAPHS[name] = model, x, DependencyGraph.build(model, x)
    return _GRAPHS[name]


def _check_multiples(graph, keep, r):
    """Every kept group's channel count, in every member, is a multiple of ``r``, or the widest it can be:
    the whole group, or for a selection group everything its stream keeps. Returns how many were rounded."""
    eff = _effective_keep(graph, keep)
    avail = {sel["group"]: int(_stream_mask(graph, sel["segs"], eff).reshape(graph.groups[sel["group"]].size, -1)
                               .all(1).sum()) for sel in graph.selections.values() if sel["group"] is not None}
    partial = 0
    for gid in keep:
        g, n = graph.groups[gid], int(eff[gid].sum())
        if n in (g.size, avail.get(gid)):
            continue
        partial += 1
        for m in g.members:
            assert n * (m.span // g.size) % r == 0, (gid, g.kind, m, n)
    return partial


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("r", [8, 16])
@pytest.mark.parametrize("name", list(MODELS))
def test_round_to_keeps_multiples_and_verifies(name, r, scope):
    model, x, graph = _graph(name)
    keep = graph.select(0.6, graph.group_scores(), scope=scope, round_to=r)
    assert _check_multiples(graph, keep, r) > 0          # some group really was pruned to a multiple
    small = compact(model, x, keep, graph=graph)
    sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-4)
    before = dict(model.named_modules())
    for mod_name, mod in small.named_modules():           # every narrowed output is a multiple
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.shape[0] != before[mod_name].weight.shape[0]:
            assert mod.weight.shape[0] % r == 0, (mod_name, tuple(mod.weight.shape))


def test_rounding_counts_channels_not_units():
    _, _, graph = _graph("mobile")
    (gn,) = [g for g in graph.groups if any(m.module == "gn" for m in g.members)]
    assert gn.size == 4 and gn.unit == 16         # GroupNorm(4, 64): a unit is 16 channels, already a multiple
    assert graph.round_keep({gn.id: torch.tensor([2])}, 16)[gn.id].tolist() == [2]
    _, _, graph = _graph("transformer")
    (heads,) = [g for g in graph.groups if g.kind == "heads"]
    assert heads.unit == 4                        # 3 heads of 4 channels: 12 -> 16 channels, 4 heads
    assert graph.round_keep({heads.id: torch.tensor([0, 1, 2])}, 16)[heads.id].numel() == 4
    assert graph.round_keep({heads.id: torch.tensor([0, 1, 2])}, 4)[heads.id].numel() == 3


def test_selection_is_rounded_on_what_its_stream_keeps():
    model, x, graph = _graph("dense")
    stem = next(g.id for g in graph.groups if any(m.module == "stem" for m in g.members))
    sel = graph.selections["layers.0.0"]["group"]
    # the stream keeps 16 of 24 stem channels, layers.0 picks 9 of the 24: only 5 of them (11..15) survive
    keep = {stem: torch.arange(16), sel: torch.arange(11, 20)}
    rounded = graph.round_keep(keep, 8, {sel: -torch.arange(24.0)})
    # 5 -> 8: the best three the stream keeps are added (16..19 stay chosen but are not in the stream)
    assert rounded[stem].numel() == 16 and rounded[sel].tolist() == [0, 1, 2] + list(range(11, 20))
    small = compact(model, x, rounded, graph=graph)
    assert small.layers[0][2].in_channels == 8


@pytest.mark.parametrize("bad", [0, -8, 8.0, "8", True])
def test_bad_round_to_is_refused(bad):
    _, _, graph = _graph("resnet20")
    with pytest.raises(ValueError, match="round_to must be a positive int or None"):
        graph.select(0.5, round_to=bad)
    with pytest.raises(ValueError, match="round_to"):
        graph.round_keep({}, bad)


def test_pruner_compact_round_to_adds_channels_back_with_their_weights():
    """The channels Pruner.compact(round_to=...) adds back to reach a multiple come with their weights from
    before pruning (they were all-zero channels, the masks' values, before), chosen by those weights; the masked
    model and its masks are left as they were."""
    torch.manual_seed(0)
    model = sk.models.build("resnet20", width=0.5).eval()
    x = model.example_input(2)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.4)
    pruner.step()
    before, masks = model(x), {k: v.clone() for k, v in sk.prune.masks.get_masks(model).items()}
    small = pruner.compact(round_to=8)
    assert torch.equal(model(x), before)
    assert all(torch.equal(masks[k], v) for k, v in sk.prune.masks.get_masks(model).items())
    for name, conv in small.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert conv.out_channels % 8 == 0 or conv.out_channels == dense[name].shape[0]
            assert (conv.weight.flatten(1).abs().sum(1) > 0).all(), name        # no zero (masked) channel kept
