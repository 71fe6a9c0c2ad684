"""Dependency-graph edge cases: modules called more than once, norms without affine parameters, chunked single
layers (GLU / fused gate-up), grouped convs compacted twice, Hugging Face config flags, no-op selections."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _norms import randomize_norms as _randomize
from torch import nn

import sparsekit as sk
from sparsekit.prune.channel_select import ChannelSelect
from sparsekit.prune.compact import apply_widths, compact, compacted_widths, mask_groups
from sparsekit.prune.graph import DependencyGraph


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _groups_of(graph: DependencyGraph, module: str, axis: str = "out") -> list:
    return [g for g in graph.groups if any(m.module == module and m.axis == axis for m in g.members)]


def _compacts(make, x, tmp_path, sparsity=0.5, scopes=("global", "layer"), prepare=_randomize):
    """Every scope: compact == the group-masked model (1e-4), fewer parameters, and a save / load round trip."""
    model = prepare(make())
    graph = DependencyGraph.build(model, x)
    for scope in scopes:
        keep = graph.select(sparsity, scope=scope)
        small = compact(model, x, keep, graph=graph)
        sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-4)
        assert _params(small) < _params(model), scope
        sk.save(small, tmp_path / scope)
        back = sk.load(tmp_path / scope, make()).eval()
        sk.verify(small, back, x, atol=0)
    return model, graph


# ------------------------------------------------------------------------------ modules called twice
class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.shared = nn.Conv2d(12, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 10, 1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        h = F.relu(self.shared(F.relu(self.a(x))))
        h = F.relu(self.shared(h))
        return self.fc(F.relu(self.b(h)).mean((2, 3)))


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Linear(6, 16), nn.Linear(6, 16)
        self.shared = nn.Linear(16, 20)
        self.h, self.fc = nn.Linear(40, 12), nn.Linear(12, 3)

    def forward(self, x):
        u, v = self.shared(F.relu(self.p(x))), self.shared(F.relu(self.q(x)))
        return self.fc(F.relu(self.h(torch.cat([u, v], -1))))


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.b, self.c = nn.Conv2d(12, 12, 3, padding=1), nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        h = F.relu(self.bn(self.b(h)))
        return self.fc(F.relu(self.c(h)).mean((2, 3)))


class Loop(nn.Module):
    def __init__(self, fx_traceable=True):
        super().__init__()
        self.fx_traceable = fx_traceable
        self.a, self.s = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        for _ in range(3 if self.fx_traceable else len(x)):  # len(x): fx fails, the torch.export fallback runs
            h = F.relu(self.s(h))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("name", ["conv", "linear", "bn", "loop", "loop_export"])
def test_a_module_called_twice_is_in_one_group_per_axis(name, tmp_path):
    make, x = {
        "conv": (SharedConv, torch.randn(2, 3, 8, 8)),
        "linear": (SharedLinear, torch.randn(4, 6)),
        "bn": (SharedBN, torch.randn(2, 3, 8, 8)),
        "loop": (Loop, torch.randn(2, 3, 8, 8)),
        "loop_export": (lambda: Loop(False), torch.randn(2, 3, 8, 8)),
    }[name]
    model, graph = _compacts(make, x, tmp_path)
    shared = {"conv": "shared", "linear": "shared", "bn": "bn", "loop": "s", "loop_export": "s"}[name]
    axes = ("out",) if name == "bn" else ("out", "in")
    for axis in axes:
        (g,) = _groups_of(graph, shared, axis)  # was one group per call: compaction removed their union
        assert g.prunable
    pruner = sk.prune.Pruner(model, x, criterion="l1_mean", granularity="channel", sparsity=0.5)
    pruner.step()
    sk.verify(model, pruner.compact(), x, atol=1e-4)


def test_a_selecting_bn_called_on_two_streams_is_pinned():
    class TwoStreams(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.bn, self.c = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            y = self.c(self.bn(a)) + self.c(self.bn(b))  # each stream is also read by the sum below
            return self.fc((y + a + b).mean((2, 3)))

    model = _randomize(TwoStreams())
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph.build(model, x)
    assert all(not g.prunable for g in _groups_of(graph, "bn"))
    assert any("called more than once" in g.reason for g in _groups_of(graph, "bn"))
    small = compact(model, x, graph.select(0.5), graph=graph)
    sk.verify(model, small, x, atol=1e-4)


# ---------------------------------------------------------------------------------- norms without affine
class NoAffine(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.n = nn.Conv2d(3, 16, 3, padding=1), norm
        self.b, self.fc = nn.Conv2d(16, 12, 3, padding=1), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.n(self.a(x))))).mean((2, 3)))


@pytest.mark.parametrize("norm", ["bn", "bn_batch_stats", "gn"])
def test_norms_without_affine_parameters(norm, tmp_path):
    def make():
        return NoAffine(
            {
                "bn": lambda: nn.BatchNorm2d(16, affine=False),
                "bn_batch_stats": lambda: nn.BatchNorm2d(16, affine=False, track_running_stats=False),
                "gn": lambda: nn.GroupNorm(4, 16, affine=False),
            }[norm]()
        )

    def prepare(model):
        if norm == "bn":
            with torch.no_grad():
                model.n.running_mean.uniform_(-1, 1)  # a zeroed channel comes out as a nonzero constant
        return model.eval()

    x = torch.randn(2, 3, 8, 8)
    model = prepare(make())
    graph = DependencyGraph.build(model, x)
    (g,) = _groups_of(graph, "a")
    if norm == "bn":
        assert not g.prunable and "affine=False" in g.reason
    else:
        assert g.prunable and {m.module for m in g.members} == {"a", "n", "b"}
    _compacts(make, x, tmp_path, prepare=prepare)
    pruner = sk.prune.Pruner(model, x, criterion="l1_mean", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-4)
    assert _params(small) < _params(model)


# -------------------------------------------------------------------------------- chunk of one layer
class GLU(nn.Module):
    """Fused gate / up projection (Phi-3 style): ``gate, up = gate_up(x).chunk(2, -1)``."""

    def __init__(self, hidden=16, traced_split=False):
        super().__init__()
        self.traced_split = traced_split
        self.inp = nn.Linear(8, 16)
        self.gate_up = nn.Linear(16, 2 * hidden)
        self.down = nn.Linear(hidden, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        y = self.gate_up(h)
        gate, up = y.split(y.shape[-1] // 2, -1) if self.traced_split else y.chunk(2, dim=-1)
        return self.fc(h + self.down(F.silu(gate) * up))


class ConvChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(16, 6, 1)  # also reads the whole (unchunked) tensor
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.bn(self.a(x))
        u, v = y.chunk(2, 1)
        return self.fc((self.b(u * torch.sigmoid(v)) + self.c(y)).mean((2, 3)))


@pytest.mark.parametrize("traced_split", [False, True])
def test_glu_chunk_of_one_layer_is_coupled_piece_by_piece(traced_split, tmp_path):
    x = torch.randn(2, 5, 8)
    model, graph = _compacts(lambda: GLU(traced_split=traced_split), x, tmp_path)
    (g,) = _groups_of(graph, "gate_up")
    assert g.prunable and g.size == 16
    assert {(m.module, m.axis, m.offset, m.span) for m in g.members} == {
        ("gate_up", "out", 0, 16),
        ("gate_up", "out", 16, 16),
        ("down", "in", 0, 16),
    }
    keep = {g.id: torch.tensor([1, 4, 9])}  # unit j: rows j and 16 + j of gate_up, column j of down
    small = compact(model, x, keep, graph=graph)
    assert small.gate_up.out_features == 6 and small.down.in_features == 3
    torch.testing.assert_close(small.gate_up.weight, model.gate_up.weight[[1, 4, 9, 17, 20, 25]])
    sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-4)
    pruner = sk.prune.Pruner(model, x, criterion="l1_mean", granularity="channel", scope="layer", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-4)
    assert small.down.in_features == 8


def test_conv_chunk_with_its_norm_and_a_whole_reader(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model, graph = _compacts(ConvChunk, x, tmp_path)
    (g,) = _groups_of(graph, "a")
    assert g.prunable and g.size == 8
    assert {(m.module, m.offset) for m in g.members if m.module in ("a", "bn", "c")} == {
        ("a", 0),
        ("a", 8),
        ("bn", 0),
        ("bn", 8),
        ("c", 0),
        ("c", 8),
    }


class ChunkTwice(nn.Module):
    """The same tensor chunked into 2 and into 4, and a piece chunked again."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.p, self.q = nn.Linear(8, 5), nn.Linear(4, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.a(x)
        h, _ = y.chunk(2, -1)
        q = y.chunk(4, -1)
        r = h.chunk(2, -1)
        return self.fc(self.p(h) + self.q(q[0] * q[3] + r[1]))


def test_chunks_of_chunks_share_one_interleaving(tmp_path):
    x = torch.randn(3, 6)
    _, graph = _compacts(ChunkTwice, x, tmp_path)
    (g,) = _groups_of(graph, "a")
    assert g.prunable and g.size == 4  # unit j: channel j of each quarter


class UnequalSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(10, 4), nn.Linear(6, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        u, v = self.a(x).split([10, 6], -1)
        return self.fc(self.b(u) + self.c(v))


def test_unequal_split_of_one_layer_stays_pinned():
    x = torch.randn(3, 6)
    model = UnequalSplit()
    graph = DependencyGraph.build(model, x)
    (g,) = _groups_of(graph, "a")
    assert not g.prunable and "split" in g.reason
    keep = graph.select(0.5)
    sk.verify(mask_groups(model, x, keep, graph=graph), compact(model, x, keep, graph=graph), x, atol=1e-4)


# -------------------------------------------------------------------- grouped conv compacted twice
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.gn = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b, self.dw = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.g = nn.Conv2d(16, 16, 1, groups=2)
        self.c, self.fc = nn.Conv2d(16, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        y = self.gn(self.a(h)) + self.dw(F.relu(self.b(h))) + self.g(h)
        return self.fc(F.relu(self.c(F.relu(y))).mean((2, 3)))


def test_grouped_conv_compacted_twice_loads_with_its_saved_groups(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = _randomize(Mixed())
    small = model
    for _ in range(2):
        pruner = sk.prune.Pruner(small, x, criterion="l1_mean", granularity="channel", sparsity=0.5)
        pruner.step()
        small = pruner.compact()
    sk.save(small, tmp_path / "twice")
    back = sk.load(tmp_path / "twice", Mixed()).eval()
    sk.verify(small, back, x, atol=0)
    assert compacted_widths(back) == compacted_widths(small)
    # a spec narrower than one group of the original class (groups = 2 * 4 // 16 = 0 before)
    fresh = apply_widths(Mixed(), {"g": {"in": 4, "out": 4, "groups": 1}})
    assert (fresh.g.in_channels, fresh.g.out_channels, fresh.g.groups) == (4, 4, 1)
    with pytest.raises(ValueError, match="groups=4 must divide in=6"):
        apply_widths(Mixed(), {"g": {"in": 6, "out": 4, "groups": 4}})


# -------------------------------------------------------------------------------- no-op channel selection
class PreDW(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn, self.dw = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.dw(F.relu(self.bn(h)))  # the selection is added back to its stream: it keeps what it keeps
        return self.fc(F.relu(self.c(h)).mean((2, 3)))


def test_a_selection_of_the_whole_compacted_stream_is_no_channel_select():
    model = _randomize(PreDW())
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph.build(model, x)
    assert "bn" in graph.selections
    keep = graph.select(0.5)
    small = compact(model, x, keep, graph=graph)
    assert isinstance(small.bn, nn.BatchNorm2d) and not any(isinstance(m, ChannelSelect) for m in small.modules())
    sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-4)


# ------------------------------------------------------------------------------------ Hugging Face
def test_tracing_a_hf_model_keeps_its_use_cache():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 6))
    assert model.config.use_cache
    DependencyGraph.build(model, {"input_ids": ids})
    assert model.config.use_cache  # HFTracer turned it off for the trace
    pruner = sk.prune.Pruner(model, {"input_ids": ids}, criterion="l1_mean", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert model.config.use_cache and small.config.use_cache
    with torch.no_grad():
        assert small(input_ids=ids).past_key_values is not None
    sk.verify(model, small, {"input_ids": ids, "use_cache": False}, atol=1e-4)
    diffs = sk.verify(model, small, {"input_ids": ids}, atol=1e-4)   # the caches (fewer kv heads) are not compared
    assert diffs and not any("past_key_values" in path for path in diffs)
    off = copy.deepcopy(model)
    off.config.use_cache = False
    DependencyGraph.build(off, {"input_ids": ids})
    assert off.config.use_cache is False


class _ActNet(nn.Module):
    """conv a -> ``op`` (a module, or a function) -> conv b."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        if isinstance(op, nn.Module):
            self.act = op
        else:
            self.fn = op

    def forward(self, x):
        return self.b((self.act if hasattr(self, "act") else self.fn)(self.a(x)))


def _channels_pass_through(op) -> None:
    """The conv before ``op`` is prunable (not pinned as an unsupported op) and the compacted model equals the
    masked one."""
    model = _ActNet(op).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph.build(model, x)
    keep = graph.select(0.5)
    small = compact(model, x, keep, graph=graph)
    assert small.a.out_channels < 16
    sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-5)


@pytest.mark.parametrize("act", [nn.SELU(), nn.CELU(), nn.Softplus(), nn.Hardtanh(), nn.LogSigmoid(), nn.Softsign(),
                                 nn.Threshold(0.1, 0.0), nn.Hardshrink(), nn.AlphaDropout(0.1), nn.Tanhshrink(),
                                 F.selu, F.logsigmoid, F.hardsigmoid, F.softsign],
                         ids=lambda a: getattr(a, "__name__", type(a).__name__))
def test_elementwise_activations_pass_channels_through(act):
    """Parameterless elementwise modules / functions leave channels where they are."""
    _channels_pass_through(act)


@pytest.mark.parametrize("op", [nn.Upsample(scale_factor=2), nn.Upsample(size=(5, 7), mode="bilinear"),
                                nn.ZeroPad2d((1, 0, 2, 1)), nn.ConstantPad2d(1, 3.0), nn.ReflectionPad2d(1),
                                nn.ReplicationPad2d(1), nn.ConstantPad1d(2, -1.0),
                                lambda h: F.interpolate(h, scale_factor=2, mode="nearest"),
                                lambda h: F.pad(h, (1, 1, 1, 1), value=2.0)],
                         ids=["upsample", "upsample-bilinear", "zeropad", "constpad", "reflectpad", "replicatepad",
                              "constpad1d", "interpolate", "F.pad"])
def test_resampling_and_padding_keep_channels_prunable(op):
    """U-Net / FPN / super-resolution blocks: resampling and padding of the spatial dims pass channels through
    (a constant pad fills removed channels too, but their consumer columns are removed with them)."""
    _channels_pass_through(op)


@pytest.mark.parametrize("op", [nn.Softmax2d(), nn.LocalResponseNorm(2), "pad-features"],
                         ids=["softmax2d", "lrn", "pad-features"])
def test_ops_that_mix_or_pad_channels_pin_them(op):
    if op == "pad-features":     # ConstantPad1d on [B, F]: it pads the Linear's features themselves
        model, x = nn.Sequential(nn.Linear(4, 16), nn.ConstantPad1d(1, 0.0), nn.Linear(18, 2)), torch.randn(2, 4)
        first = "0"
    else:
        model, x, first = _ActNet(op).eval(), torch.randn(2, 3, 8, 8), "a"
    graph = DependencyGraph.build(model, x)
    (group,) = [g for g in graph.groups if any(m.module == first and m.axis == "out" for m in g.members)]
    assert not group.prunable and "unsupported op" in group.reason


@pytest.mark.parametrize("kw", [{}, {"affine": True}, {"affine": True, "track_running_stats": True},
                                {"track_running_stats": True}], ids=["plain", "affine", "affine-stats", "stats"])
def test_instance_norm_channels(kw, tmp_path):
    """InstanceNorm normalises each channel of each sample alone: prunable, sliced when it has parameters or
    running statistics; without affine parameters its running statistics would turn a removed channel into a
    constant, so that case is pinned with a reason."""
    model = _ActNet(_randomize(nn.InstanceNorm2d(16, **kw))).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph.build(model, x)
    (group,) = [g for g in graph.groups if any(m.module == "a" and m.axis == "out" for m in g.members)]
    if kw == {"track_running_stats": True}:
        assert not group.prunable and "running statistics, affine=False" in group.reason
        return
    keep = graph.select(0.5)
    small = compact(model, x, keep, graph=graph)
    assert small.a.out_channels == small.act.num_features < 16
    sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-5)
    sk.save(small, tmp_path / "in")
    sk.verify(small, sk.load(tmp_path / "in", _ActNet(nn.InstanceNorm2d(16, **kw))).eval(), x, atol=0)


class _UNet(nn.Module):
    """Two-level U-Net: ConvTranspose2d upsampling whose outputs are concatenated with the skip streams."""

    def __init__(self, up_groups: int = 1):
        super().__init__()
        self.e1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.e2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=up_groups)
        self.d1 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = torch.relu(self.bn1(self.e1(x)))
        b = torch.relu(self.bn2(self.e2(F.max_pool2d(a, 2))))
        return self.head(torch.relu(self.d1(torch.cat([self.up(b), a], 1))))


def test_transposed_conv_input_channels_follow_their_producer(tmp_path):
    """A ConvTranspose2d's weight is [C_in, C_out, kh, kw]: its input channels (dim 0) shrink with the layer
    that produces them; its outputs are a new space (concatenated here) that criteria reading weights score by
    the weight's dim-1 slices, and data-dependent ones by its output channels."""
    model = _randomize(_UNet())
    x = torch.randn(2, 3, 16, 16)
    graph = DependencyGraph.build(model, x)
    (g,) = [g for g in graph.groups if any(m.module == "e2" and m.axis == "out" for m in g.members)]
    assert {(m.module, m.axis) for m in g.members} >= {("e2", "out"), ("bn2", "out"), ("up", "in")}
    keep = {gid: torch.arange(0, grp.size, 2) for gid, grp in ((grp.id, grp) for grp in graph.prunable)}
    small = compact(model, x, keep, graph=graph)
    assert small.up.in_channels == small.e2.out_channels == 8 and small.up.out_channels == 4
    sk.verify(mask_groups(model, x, keep, graph=graph), small, x, atol=1e-5)
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    compacted = pruner.compact()
    assert compacted.up.in_channels == compacted.e2.out_channels == 8 and compacted.up.out_channels == 4
    # its outputs go by their L1 norms over the weight's dim 1 (scope="layer": half of them)
    by_l1 = model.up.weight.detach().abs().sum((0, 2, 3)).argsort(descending=True)[:4].sort().values
    (up_group,) = [g for g in pruner._dependency_graph().groups if any(m.module == "up" and m.axis == "out"
                                                                       for m in g.members)]
    assert torch.equal(torch.nonzero(pruner._keep[up_group.id]).reshape(-1), by_l1)
    sk.verify(model, compacted, x, atol=1e-5)
    sk.save(compacted, tmp_path / "unet")
    sk.verify(compacted, sk.load(tmp_path / "unet", _UNet()).eval(), x, atol=0)
    data = _randomize(_UNet()).eval()
    up_out = []
    hook = data.up.register_forward_hook(lambda m, a, out: up_out.append(out.detach()))
    data(x)
    hook.remove()
    by_mean = up_out[0].mean((0, 2, 3)).argsort(descending=True)[:4].sort().values
    ranked = sk.prune.Pruner(data, (x,), criterion="mean_activation", granularity="channel", sparsity=0.5,
                             calib=[x], scope="layer")
    ranked.step()                                          # data-dependent criteria read its output channels
    (up_group,) = [g for g in ranked._dependency_graph().groups if ("up", "out") in {(m.module, m.axis)
                                                                                     for m in g.members}]
    assert torch.equal(torch.nonzero(ranked._keep[up_group.id]).reshape(-1), by_mean)
    sk.verify(data, ranked.compact(), x, atol=1e-5)
    ignored = sk.prune.Pruner(_randomize(_UNet()), (x,), criterion="l1", granularity="channel", sparsity=0.5,
                              ignore=["up", "head"])      # ignore covers a transposed conv too
    ignored.step()
    assert ignored.compact().up.out_channels == 8
    grouped = DependencyGraph.build(_UNet(up_groups=2), x)
    (g2,) = [g for g in grouped.groups if any(m.module == "e2" and m.axis == "out" for m in g.members)]
    assert not g2.prunable and "ConvTranspose2d, groups=2" in g2.reason


class _UpND(nn.Module):
    """An encoder conv, a strided transposed conv (1-D or 3-D) and a conv after it, with a norm between."""

    def __init__(self, dims: int):
        super().__init__()
        conv, up, bn = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
                        3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}[dims]
        self.enc, self.up, self.bn, self.dec, self.head = conv(2, 12, 3, padding=1), up(12, 10, 2, stride=2), \
            bn(10), conv(10, 6, 3, padding=1), conv(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.dec(torch.relu(self.bn(self.up(torch.relu(self.enc(x))))))))


@pytest.mark.parametrize("dims", [1, 3])
def test_transposed_conv_1d_and_3d_compact_and_save(dims, tmp_path):
    """ConvTranspose1d / 3d follow ConvTranspose2d's rule: inputs with their producer, outputs a new space scored
    by their weight's dim-1 slices; compacted, verified, saved and loaded into a fresh model."""
    torch.manual_seed(dims)
    model = _randomize(_UpND(dims))
    x = torch.randn(2, 2, *([16] if dims == 1 else [4, 4, 4]))
    pruner = sk.prune.Pruner(model, (x,), criterion="l1", granularity="channel", sparsity=0.5, scope="layer")
    pruner.step()
    small = pruner.compact()
    assert (small.enc.out_channels, small.up.in_channels, small.up.out_channels, small.bn.num_features,
            small.dec.in_channels) == (6, 6, 5, 5, 5)
    assert type(small.up) is {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[dims]
    sk.verify(model, small, x, atol=1e-5)
    by_l1 = model.up.weight.detach().abs().sum([d for d in range(dims + 2) if d != 1]).argsort(descending=True)[:5]
    (up_group,) = [g for g in pruner._dependency_graph().groups if ("up", "out") in {(m.module, m.axis)
                                                                                     for m in g.members}]
    assert torch.equal(torch.nonzero(pruner._keep[up_group.id]).reshape(-1), by_l1.sort().values)
    sk.save(small, tmp_path / "up")
    sk.verify(small, sk.load(tmp_path / "up", _UpND(dims)).eval(), x, atol=0)


@pytest.mark.parametrize("criterion", ["apoz", "entropy", "variance", "hrank", "taylor", "hessian"])
def test_data_dependent_criteria_score_transposed_conv_outputs(criterion):
    """Every data-dependent criterion that reads a layer's outputs or gradients scores a transposed conv's output
    channels through a per-channel gate on its output; the masked model compacts to the same outputs."""
    torch.manual_seed(3)
    model = _randomize(_UNet()).eval()
    x = torch.randn(3, 3, 16, 16)
    target = torch.randint(0, 2, (3, 16, 16))
    gradient = criterion in ("taylor", "hessian")
    pruner = sk.prune.Pruner(model, (x,), criterion=criterion, granularity="channel", sparsity=0.5, scope="layer",
                             calib=[(x, target)] if gradient else [x])
    pruner.step()
    (up_group,) = [g for g in pruner._dependency_graph().groups if ("up", "out") in {(m.module, m.axis)
                                                                                     for m in g.members}]
    assert up_group.id in pruner._selectable_groups() and int(pruner._keep[up_group.id].sum()) == 4
    small = pruner.compact()
    assert small.up.out_channels == 4
    sk.verify(model, small, x, atol=1e-5)


class _Decoder(nn.Module):
    """An up-convolution coupled by a residual add to an encoder conv, through InstanceNorm and a per-channel
    PReLU, then padding and a spatial crop: the transposed-conv, InstanceNorm, PReLU and padding rules together."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up, self.inorm, self.act = nn.ConvTranspose2d(16, 8, 2, stride=2), nn.InstanceNorm2d(8, affine=True), \
            nn.PReLU(8)
        self.d, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.e1(x)
        u = self.act(self.inorm(self.up(self.e2(torch.relu(a))))) + a
        return self.head(torch.relu(self.d(F.pad(u, (1, 1, 1, 1)))[..., 1:-1, 1:-1]))


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_decoder_residual_through_transposed_conv_norm_and_prelu(criterion, tmp_path):
    torch.manual_seed(0)
    model = _Decoder().eval()
    with torch.no_grad():
        model.inorm.weight.uniform_(0.5, 1.5)
        model.inorm.bias.uniform_(-0.5, 0.5)
        model.act.weight.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 16, 16)
    kw = {"calib": [(torch.randn(4, 3, 16, 16), torch.randn(4, 2, 16, 16))], "loss_fn": F.mse_loss} \
        if criterion == "taylor" else {}
    pruner = sk.prune.Pruner(model, (x,), criterion=criterion, granularity="channel", sparsity=0.5, **kw)
    pruner.step()
    small = pruner.compact()
    # the residual couples up's outputs with e1's: pruned together, with the norm and the slopes between them
    assert small.e1.out_channels == small.up.out_channels == small.inorm.num_features == small.act.num_parameters < 8
    sk.verify(model, small, x, atol=1e-5)
    sk.save(small, tmp_path / "dec")
    sk.verify(small, sk.load(tmp_path / "dec", _Decoder()).eval(), x, atol=0)


def test_a_criterion_needing_activations_and_gradients_scores_transposed_convs(monkeypatch):
    """Gates are made before the event counter restarts: a criterion reading feature maps *and* gradients keeps
    the calib batches' events aligned with the trace (the gates' torch.ones used to count as a step)."""
    from sparsekit.prune import criteria

    name = "test_act_and_grad"
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))     # registered for this test only

    @criteria.register(name, needs=("activations", "grads"), data_dependent=True,
                       doc="mean activation, with the Taylor statistics collected too (a test criterion)")
    def _act_and_grad(module, ctx):     # both statistics are collected; the mean activation decides
        return ctx.stat("act_sum") / ctx.stat("act_count") + 0.0 * ctx.stat("taylor_chan").sum()

    torch.manual_seed(5)
    model = _randomize(_UNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = sk.prune.Pruner(model, (x,), criterion=name, granularity="channel", sparsity=0.5, scope="layer",
                             calib=[(x, torch.randint(0, 2, (2, 16, 16)))])
    pruner.step()
    sk.verify(model, pruner.compact(), x, atol=1e-5)


def test_a_model_of_transposed_convs_only_prunes_with_data_dependent_criteria():
    """No Linear / conv left to prune, but the transposed convs' outputs are scored through gates: accepted."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.ConvTranspose2d(8, 16, 2, 2), nn.ReLU(), nn.ConvTranspose2d(16, 4, 2, 2)).eval()
    x = torch.randn(2, 8, 4, 4)
    pruner = sk.prune.Pruner(model, x, criterion="mean_activation", calib=[x], granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small[0].out_channels == 8 and small[2].in_channels == 8
    sk.verify(model, small, x, atol=1e-5)


class _KwargConv(nn.Module):          # a layer called with its input as a keyword
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.o(self.b(input=torch.relu(self.a(x))))


class _TextCNN(nn.Module):            # max over time: (values, indices), the values feed the classifier
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(4, 8, 3), nn.Conv1d(4, 8, 5), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.c1(x).max(dim=2)[0], self.c2(x).max(dim=2).values], 1))


class _ElementwiseMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.o(torch.max(self.a(x), self.b(x)))


class _ChunkSlice(nn.Module):          # a slice of the list of pieces, concatenated again
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 16, 1), nn.Conv2d(12, 3, 1)

    def forward(self, x):
        return self.o(torch.cat(self.a(x).chunk(4, 1)[1:], 1))


class _SelectionPinned(nn.Module):     # a BN on a shared stream whose output an unknown op reads
    def __init__(self):
        super().__init__()
        self.c0, self.bn, self.o, self.o2 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 3, 1), \
            nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.c0(x)
        return self.o(torch.softmax(self.bn(h), 1)) + self.o2(h)


class _SelectionCoarse(nn.Module):     # a selection with coarser units (GroupNorm) than its stream
    def __init__(self):
        super().__init__()
        self.c0, self.bn, self.gn = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.GroupNorm(4, 16)
        self.o, self.o2 = nn.Conv2d(16, 3, 1), nn.Conv2d(16, 3, 1)

    def forward(self, x):
        h = self.c0(x)
        return self.o(self.gn(self.bn(h))) + self.o2(h)


@pytest.mark.parametrize("make, shape", [(_KwargConv, (2, 3, 6, 6)), (_TextCNN, (2, 4, 12)),
                                         (_ElementwiseMax, (2, 3, 5, 5)), (_ChunkSlice, (2, 3, 5, 5)),
                                         (_SelectionPinned, (2, 3, 4, 4)), (_SelectionCoarse, (2, 3, 6, 6))])
def test_call_forms_tuple_results_slices_and_selections_compact_exactly(make, shape):
    """Each used to crash compact or mis-shape an output: a keyword input, max over a dim (values, indices),
    torch.max(a, b), a slice of chunk pieces, a pinned BatchNorm selection (its stream must keep every channel),
    a selection with coarser units than its stream (graph.select's keep-sets must compact)."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = _randomize(make()).eval()
        x = torch.randn(shape)
        graph = DependencyGraph.build(model, x)
        for sparsity in (0.5, 0.75):
            for scope in ("global", "layer"):
                keep = graph.select(sparsity, scope=scope)
                sk.verify(mask_groups(model, x, keep, graph=graph), compact(model, x, keep, graph=graph), x,
                          atol=1e-5)


def test_a_conv_or_groupnorm_reading_token_features_pins_them():
    class LinearThenConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv, self.gn, self.o = nn.Linear(8, 6), nn.Conv1d(5, 4, 1), nn.GroupNorm(5, 5), \
                nn.Linear(6, 3)

        def forward(self, x):            # x [2, 5, 8]: 5 tokens; the Linear's 6 features are on the last dim
            h = self.lin(x)
            return self.conv(self.gn(h)).sum() + self.o(h)

    graph = DependencyGraph.build(LinearThenConv(), torch.randn(2, 5, 8))
    (group,) = [g for g in graph.groups if ("lin", "out") in {(m.module, m.axis) for m in g.members}]
    assert not group.prunable and "dim 1" in group.reason


def drop_path(x: torch.Tensor, p: float = 0.1, training: bool = False) -> torch.Tensor:
    """timm's / torchvision's stochastic depth: whole samples dropped (training) or passed (eval)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= p
    return x * keep / (1 - p)


torch.fx.wrap("drop_path")      # as torchvision wraps stochastic_depth: one call in the traced graph


class _DropPathNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + drop_path(self.b(torch.relu(self.a(h))), 0.1, self.training)
        return self.head(h.mean((2, 3)))


def test_stochastic_depth_passes_the_residual_stream_through():
    """An EfficientNet / ConvNeXt / Swin residual under stochastic depth: the stream (stem + block output) is one
    prunable group (the function was an unknown op, which kept every such stream whole)."""
    torch.manual_seed(0)
    model = _DropPathNet().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph.build(model, x)
    stream = next(g for g in graph.groups if any(m.module == "stem" for m in g.members))
    assert stream.prunable and {m.module for m in stream.members} >= {"stem", "b", "a", "head"}
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.stem.out_channels == 8
    sk.verify(model, small, x, atol=1e-5)


class _TimmAttention(nn.Module):
    """timm's Attention (1.0): fused qkv, proj, num_heads, head_dim, and the heads' output viewed attn_dim wide."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.attn_dim = heads * self.head_dim
        self.qkv, self.proj = nn.Linear(dim, 3 * self.attn_dim), nn.Linear(self.attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_timm_style_attention_loses_whole_heads():
    """Its forward views the heads' output attn_dim wide: compaction updates that width with num_heads (the head
    probe failed on it, which kept every timm ViT's heads whole)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), _TimmAttention(32, 4), nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8)
    graph = DependencyGraph.build(model, x)
    heads = next(g for g in graph.groups if g.kind == "heads")
    assert heads.prunable, heads.reason
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert (small[1].num_heads, small[1].attn_dim, small[1].proj.in_features) == (2, 16, 16)
    sk.verify(model, small, x, atol=1e-5)


class _StdConv(nn.Conv2d):
    """timm's StdConv2d: each filter standardised over its inputs, so removing an input changes every filter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _HandLinear(nn.Linear):
    """Falcon's FalconLinear: nn.Linear's function written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def test_a_layer_computing_its_own_forward_keeps_its_channels():
    """The StdConv's inputs and outputs stay whole (cut, its standardisation would change); the hand-written
    Linear is cut like a Linear; the compacted model verifies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _StdConv(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1), nn.Flatten(2), _HandLinear(16, 24), nn.ReLU(),
                          nn.Linear(24, 4)).eval()
    x = torch.randn(2, 3, 4, 4)
    graph = DependencyGraph.build(model, x)
    std = [g for g in graph.groups if any(m.module == "2" for m in g.members)]
    assert len(std) == 2 and all(not g.prunable and "computes its own forward" in g.reason for g in std)
    hand = next(g for g in graph.groups if any(m.module == "6" and m.axis == "out" for m in g.members))
    assert hand.prunable
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert (small[2].in_channels, small[2].out_channels, small[6].out_features) == (16, 16, 12)
    sk.verify(model, small, x, atol=1e-5)


class _SamePadConv(nn.Conv2d):
    """timm's Conv2dSame: TF-style 'same' padding in its own forward; cut like any conv, depthwise too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_an_own_forward_conv_that_cuts_like_one_is_pruned(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), _SamePadConv(16, 16, 3, groups=groups), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    x = torch.randn(2, 3, 4, 4)
    graph = DependencyGraph.build(model, x)
    own = [g for g in graph.groups if any(m.module == "2" for m in g.members)]
    assert own and all(g.prunable for g in own), [g.reason for g in own]
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small[2].out_channels < 16
    sk.verify(model, small, x, atol=1e-5)


def test_probing_an_own_forward_layer_leaves_its_input_and_hooks_alone():
    from sparsekit._stock_layers import acts_as_stock

    class Clamping(nn.Linear):
        def forward(self, x):
            return F.linear(x.clamp_(-0.1, 0.1), self.weight, self.bias)

    layer = Clamping(8, 4)
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 8) * 5
    before = x.clone()
    assert not acts_as_stock(layer, x)          # it clamps: not nn.Linear's function
    torch.testing.assert_close(x, before)
    assert not calls
