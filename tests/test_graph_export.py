"""The torch.export fallback of the dependency graph: models torch.fx cannot trace, compacted and verified."""

import pytest
import torch
import torch.fx as fx
from torch import nn

import sparsekit as sk
from sparsekit.prune.compact import PrunedMultiheadAttention, compact, mask_groups
from sparsekit.prune.graph import DependencyGraph, GraphError


class Loopy(nn.Module):
    """A Python loop over the batch (``range(x.shape[0])``): fx cannot turn the traced size into an int."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = self.bn1(self.conv1(x)).relu()
        rows = [self.bn2(self.conv2(h[i:i + 1])) for i in range(x.shape[0])]    # conv2 called once per sample
        h = h + torch.cat(rows)                                                # residual: couples conv1, conv2
        h = self.conv3(h).relu()
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class LoopEncoder(nn.Module):
    """``len(x)`` in forward (fx: 'len' is not supported) around a TransformerEncoder and an attention."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x, scale=1.0):
        h = self.inp(x)
        for _ in range(len(x)):
            h = h * scale
        h = self.enc(h)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.fc(h + a).mean(1)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                for t in (mod.weight, mod.running_var):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                for t in (mod.bias, mod.running_mean):
                    t.copy_(torch.rand(t.shape, generator=g) - 0.5)
    return model.eval()


def test_fx_really_fails_on_these_models():
    for model in (Loopy(), LoopEncoder()):
        with pytest.raises(Exception):  # noqa: B017 - whatever fx raises
            fx.symbolic_trace(model)


def _group(g, module, axis="out"):
    (gr,) = [gr for gr in g.groups if any(m.module == module and m.axis == axis for m in gr.members)]
    return gr


def test_export_graph_groups_match_the_module_structure():
    g = DependencyGraph.build(Loopy(), torch.randn(2, 3, 8, 8))
    stream = _group(g, "conv1")     # the residual add couples conv1 / bn1 with conv2 / bn2 (called twice)
    assert stream.prunable and {(m.module, m.axis) for m in stream.members} == {
        ("conv1", "out"), ("bn1", "out"), ("conv2", "in"), ("conv2", "out"), ("bn2", "out"), ("conv3", "in")}
    assert _group(g, "conv3").prunable and {m.module for m in _group(g, "conv3").members} == {"conv3", "fc"}
    assert not _group(g, "fc").prunable and "model output" in _group(g, "fc").reason


def test_export_fallback_compacts_and_verifies():
    model = _randomize_bn(Loopy())
    x = torch.randn(2, 3, 8, 8)
    g = DependencyGraph.build(model, x)
    keep = g.select(0.5, scope="layer")   # exact widths: global ranking depends on the random weights
    small = compact(model, x, keep, graph=g)
    sk.verify(mask_groups(model, x, keep, graph=g), small, x, atol=1e-4)
    assert small.conv1.out_channels == 4 and small.conv3.out_channels == 6
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_export_fallback_heads_and_feed_forward():
    model = LoopEncoder().eval()
    x = torch.randn(2, 5, 8)
    g = DependencyGraph.build(model, (x, 2.0))
    heads = [gr for gr in g.groups if gr.kind == "heads"]
    assert [gr.members[0].module for gr in heads] == ["enc.layers.0.self_attn", "enc.layers.1.self_attn", "mha"]
    assert all(gr.prunable for gr in heads)
    (inp,) = [gr for gr in g.groups if gr.members[0].module == "inp"]
    assert not inp.prunable and "LayerNorm" in inp.reason
    pruner = sk.prune.Pruner(model, (x, 2.0), criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert isinstance(small.mha, PrunedMultiheadAttention) and small.mha.num_heads == 2
    assert small.enc.layers[1].linear1.out_features == 16
    sk.verify(model, small, (x, 2.0), atol=1e-4)


def test_when_fx_and_export_both_fail_the_error_names_both():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y[:, : int(y.sum() > 0) + 1]    # a data-dependent width: export cannot specialise it

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Bad()

        def forward(self, x):
            return self.body(x)

    with pytest.raises(GraphError) as err:
        DependencyGraph.build(Outer(), {"x": torch.randn(1, 3, 8, 8)})
    msg = str(err.value)
    assert msg.startswith("torch.fx could not trace Outer: in module 'body'")
    assert "torch.export fallback failed too: in module 'body', op `return y[:, : int(y.sum() > 0) + 1]" in msg
    assert "def forward" not in msg     # the exported partial graph is not dumped


def test_a_module_registered_under_two_names_is_one_member():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(4, 8), nn.Linear(8, 2)
            self.b = self.a                     # the same Linear, called once under each name

        def forward(self, x):
            h = self.a(x)
            for _ in range(len(x)):
                h = h + 0
            return self.fc(self.b(x) + h)

    g = DependencyGraph.build(Shared(), torch.randn(2, 4))
    stream = _group(g, "a")
    assert stream.prunable and {m.module for m in stream.members} == {"a", "fc"}
