"""Dependency graph: coupled channel groups, pinned groups with reasons, scores, selection, trace errors."""

import pytest
import torch
from torch import nn

from sparsekit.models import LeNet5, ResNet20, TransformerEncoder
from sparsekit.prune.graph import DependencyGraph, GraphError


def _group_of(graph, module, axis="out"):
    return [g for g in graph.groups if any(m.module == module and m.axis == axis for m in g.members)]


def test_lenet_chain_and_flatten_expansion():
    m = LeNet5()
    g = DependencyGraph.build(m, m.example_input())
    (conv2,) = _group_of(g, "conv2")
    fc1_in = [mm for mm in conv2.members if mm.module == "fc1"]
    assert conv2.prunable and conv2.size == 16
    assert fc1_in[0].axis == "in" and fc1_in[0].span == m.fc1.in_features     # 16 channels x 5*5 features
    (fc,) = _group_of(g, "fc")
    assert not fc.prunable and "output" in fc.reason                          # the classifier is left intact


def test_resnet_residual_adds_are_coupled():
    m = ResNet20(width=0.5)
    g = DependencyGraph.build(m, m.example_input())
    (stem,) = _group_of(g, "conv1")
    names = {mm.module for mm in stem.members}
    # the stem's channels are the identity stream of stage 1: every block's conv2/bn2 is in the same group
    assert {"bn1", "layer1.0.bn2", "layer1.2.conv2", "layer2.0.conv1", "layer2.0.shortcut.0"} <= names
    inner = _group_of(g, "layer1.0.conv1")[0]
    assert {mm.module for mm in inner.members} == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}


def test_group_scores_and_select():
    m = ResNet20(width=0.5)
    g = DependencyGraph.build(m, m.example_input())
    scores = g.group_scores()
    assert set(scores) == {gr.id for gr in g.prunable}
    assert all(scores[gr.id].shape == (gr.size,) for gr in g.prunable)
    keep = g.select(0.5, scores, scope="layer")
    assert all(k.numel() == gr.size - gr.size // 2 for gr, k in zip(g.prunable, keep.values()))
    glob = g.select(0.5, scores, scope="global")
    total = sum(gr.size for gr in g.prunable)
    assert sum(k.numel() for k in glob.values()) == total - total // 2
    rounded = g.select(0.5, scores, round_to=8)
    assert all(k.numel() % 8 == 0 or k.numel() == g.groups[gid].size for gid, k in rounded.items())


def test_layernorm_pins_stream_and_ffn_hidden_is_prunable():
    m = TransformerEncoder(vocab=50, dim=32, heads=4, ffn=64, layers=1)
    g = DependencyGraph.build(m, m.example_input())
    (emb,) = _group_of(g, "embed")
    assert not emb.prunable and "LayerNorm" in emb.reason
    (hidden,) = _group_of(g, "blocks.0.ffn.fc1")
    assert hidden.prunable and {mm.module for mm in hidden.members} == {"blocks.0.ffn.fc1", "blocks.0.ffn.fc2"}
    # sparsekit's Attention reshapes to heads * head_dim, so it runs with fewer heads: whole heads are prunable
    (heads,) = [gr for gr in g.groups if gr.kind == "heads"]
    assert heads.prunable and heads.size == 4 and heads.unit == 8


class WidthTiedAttention(nn.Module):
    """Fused-qkv attention whose forward reshapes to the input width: it cannot run with fewer heads."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


def test_attention_that_cannot_run_with_fewer_heads_is_pinned_with_why():
    m = nn.Sequential(nn.Linear(8, 16), WidthTiedAttention(), nn.Linear(16, 2))
    g = DependencyGraph.build(m, torch.randn(2, 5, 8))
    (heads,) = [gr for gr in g.groups if gr.kind == "heads"]
    assert not heads.prunable and "fewer heads" in heads.reason


class MHANet(nn.Module):
    def __init__(self, use_weights=False):
        super().__init__()
        self.use_weights = use_weights
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        out, w = self.mha(h, h, h)
        return self.fc(out.mean(1) + w.sum() if self.use_weights else out.mean(1))


def test_multihead_attention_heads_prunable_embed_stream_pinned():
    g = DependencyGraph.build(MHANet(), torch.randn(2, 5, 8))
    (inp,) = _group_of(g, "inp")
    assert not inp.prunable and "MultiheadAttention" in inp.reason and "embed_dim" in inp.reason
    (heads,) = [gr for gr in g.groups if gr.kind == "heads"]
    assert heads.prunable and heads.size == 4 and heads.unit == 4
    assert {(m.module, m.axis, m.offset) for m in heads.members} == {
        ("mha", "out", 0), ("mha", "out", 16), ("mha", "out", 32), ("mha.out_proj", "in", 0)}
    # the returned weights average over all heads: used, they pin the heads
    g = DependencyGraph.build(MHANet(use_weights=True), torch.randn(2, 5, 8))
    (heads,) = [gr for gr in g.groups if gr.kind == "heads"]
    assert not heads.prunable and "attention weights" in heads.reason


def test_torch_transformer_encoder_heads_and_ffn_per_layer():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    m = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    g = DependencyGraph.build(m, torch.randn(2, 5, 8))
    heads = [gr for gr in g.groups if gr.kind == "heads"]
    assert [gr.members[0].module for gr in heads] == ["1.layers.0.self_attn", "1.layers.1.self_attn"]
    assert all(gr.prunable and gr.size == 4 for gr in heads)
    (ffn,) = _group_of(g, "1.layers.1.linear1")
    assert ffn.prunable and {m.module for m in ffn.members} == {"1.layers.1.linear1", "1.layers.1.linear2"}
    (stream,) = _group_of(g, "0")
    assert not stream.prunable and "TransformerEncoder" in stream.reason


def test_trace_failure_names_module_and_op():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y[:, : int(y.sum() > 0) + 1]    # data-dependent width

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Bad()

        def forward(self, x):
            return self.body(x)

    with pytest.raises(GraphError, match=r"body.*int|int.*body|'body'"):
        DependencyGraph.build(Outer(), {"x": torch.randn(1, 3, 8, 8)})


def test_control_flow_after_a_module_call_follows_the_example():
    """The branch is decided by running the partial graph on the example inputs; that run must use the real
    modules, not fx's patched ones (which recursed into tracing and never returned)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.a, self.b, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.lin(x)
            h = self.a(h) if bool(h.abs().sum() >= 0) else self.b(h)
            return self.fc(h.relu())

    g = DependencyGraph.build(Branchy(), torch.randn(2, 4))
    (a,) = _group_of(g, "a")
    assert a.prunable and {m.module for m in a.members} == {"a", "fc"}
    assert not any(m.module == "b" for gr in g.groups for m in gr.members)
