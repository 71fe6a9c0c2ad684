"""Structured pruning of recurrent layers: the hidden units of nn.RNN / nn.LSTM / nn.GRU removed physically."""

import copy

import pytest
import torch
from torch import Tensor, nn

import sparsekit as sk
from sparsekit.prune.compact import (
    compact,
    compacted_widths,
    mask_groups,
    resize_module,
)
from sparsekit.prune.cost import model_cost
from sparsekit.prune.graph import DependencyGraph
from sparsekit.prune.masks import apply_tensor_mask
from sparsekit.prune.recurrent import index_masks, resize_recurrent, unit_index


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear -> GRU -> classifier on the last step."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, bidirectional=True, batch_first=batch_first, dropout=0.1)
        self.fc = nn.Linear(48, 32)
        self.gru = nn.GRU(32, 20, batch_first=batch_first)
        self.head = nn.Linear(20, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)
        e = e if self.batch_first else e.transpose(0, 1)
        y, (h, c) = self.lstm(e)
        z, _ = self.gru(torch.relu(self.fc(y)))
        return self.head(z[:, -1] if self.batch_first else z[-1])


class Seq2Seq(nn.Module):
    """An encoder LSTM's final (h, c) starts the decoder LSTM: both keep the same hidden units."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.enc = nn.LSTM(12, 16, num_layers=2)
        self.dec = nn.LSTM(12, 16, num_layers=2)
        self.out = nn.Linear(16, 3)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, state = self.enc(self.inp(src))
        y, _ = self.dec(self.inp(tgt), state)
        return self.out(y)


class RnnOnState(nn.Module):
    """A tanh / ReLU RNN stack whose final hidden state (not the sequence) feeds the classifier."""

    def __init__(self, nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.proj = nn.Linear(5, 10)
        self.rnn = nn.RNN(10, 14, num_layers=3, nonlinearity=nonlinearity, bidirectional=True)
        self.cls = nn.Linear(14, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(self.proj(x))
        return self.cls(h[-1])


class ZeroState(nn.Module):
    """The tutorial pattern: an initial state of the full width made in forward (its width is fixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.zeros(1, x.size(0), 12)
        y, _ = self.gru(x, h0)
        return self.fc(y[:, -1])


def _randomize_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _hidden_sizes(model: nn.Module) -> dict[str, int]:
    return {n: m.hidden_size for n, m in model.named_modules() if isinstance(m, (nn.RNN, nn.LSTM, nn.GRU))}


@pytest.mark.parametrize("make, args", [
    (lambda: Tagger(True), lambda: (torch.randint(0, 50, (3, 7)),)),
    (lambda: Tagger(False), lambda: (torch.randint(0, 50, (3, 7)),)),
    (Seq2Seq, lambda: (torch.randn(9, 2, 6), torch.randn(4, 2, 6))),
    (lambda: RnnOnState("tanh"), lambda: (torch.randn(6, 3, 5),)),
    (lambda: RnnOnState("relu"), lambda: (torch.randn(6, 3, 5),)),
])
def test_compacted_recurrent_model_equals_the_group_masked_one(make, args):
    torch.manual_seed(0)
    model, x = _randomize_biases(make()), args()
    graph = DependencyGraph.build(model, x)
    before = _hidden_sizes(model)
    keep = graph.select(0.5, scope="layer")
    small = compact(model, x, keep, graph=graph)
    ref = mask_groups(model, x, keep, graph=graph)
    sk.verify(ref, small, x, atol=1e-5)
    after = _hidden_sizes(small)
    assert all(after[k] == before[k] // 2 for k in before), (before, after)
    assert not torch.allclose(ref(*x), model(*x), atol=1e-4)     # the pruning removed something that mattered


def test_encoder_state_couples_the_decoder_hidden_units():
    model = Seq2Seq()
    graph = DependencyGraph.build(model, (torch.randn(5, 2, 6), torch.randn(3, 2, 6)))
    (group,) = [g for g in graph.prunable if any(m.module == "enc" and m.axis == "out" for m in g.members)]
    assert {(m.module, m.axis) for m in group.members} >= {("enc", "out"), ("dec", "out"), ("out", "in")}


def test_a_fixed_width_initial_state_pins_the_hidden_units():
    graph = DependencyGraph.build(ZeroState(), (torch.randn(2, 5, 8),))
    (group,) = [g for g in graph.groups if any(m.module == "gru" and m.axis == "out" for m in g.members)]
    assert not group.prunable and "initial state" in group.reason


def test_projected_lstm_and_packed_sequences_are_pinned():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.lstm = nn.LSTM(8, 10, proj_size=6)

        def forward(self, x):
            return self.lstm(self.fc(x))[0]

    class Packed(nn.Module):      # a packed sequence comes in (packing itself cannot be traced)
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 10)
            self.fc = nn.Linear(10, 3)

        def forward(self, packed):
            return self.fc(self.gru(packed)[1])

    proj, x = Proj(), torch.randn(3, 2, 4)
    graph = DependencyGraph.build(proj, (x,))
    assert not {("lstm", "out"), ("lstm", "in")} & {(m.module, m.axis) for g in graph.prunable for m in g.members}
    sk.verify(proj, compact(proj, (x,), graph.select(0.5), graph=graph), (x,), atol=0)   # nothing to shrink
    assert model_cost(proj, (x,))["params"] == sum(p.numel() for p in proj.parameters())   # weight_hr counted
    assert any("proj_size" in (g.reason or "") for g in graph.groups)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    graph = DependencyGraph.build(Packed(), (packed,))
    (group,) = [g for g in graph.groups if ("gru", "out") in {(m.module, m.axis) for m in g.members}]
    assert not group.prunable and "packed" in group.reason
    with pytest.raises(ValueError, match="proj_size"):
        resize_recurrent(nn.LSTM(8, 10, proj_size=6), torch.arange(5))


@pytest.mark.parametrize("criterion, scope", [("l1", "global"), ("l1_mean", "global"), ("fpgm", "layer"),
                                              ("l2", "layer")])
def test_pruner_masks_then_compacts_recurrent_units(criterion, scope):
    torch.manual_seed(1)
    model = _randomize_biases(Tagger())
    x = (torch.randint(0, 50, (4, 9)),)
    dense_out = model(*x).detach()
    pruner = sk.prune.Pruner(model, x, criterion=criterion, granularity="channel", sparsity=0.5, scope=scope)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-5)      # the masked model is the compacted one
    if scope == "layer":
        assert (small.lstm.hidden_size, small.gru.hidden_size) == (12, 10)
    else:
        assert small.lstm.hidden_size + small.gru.hidden_size < 44
    assert small.lstm.input_size == small.emb.embedding_dim and small.fc.in_features == 2 * small.lstm.hidden_size
    cost = model_cost(model, x)
    n_small = sum(p.numel() for p in small.parameters())
    assert cost["params"] == pytest.approx(n_small)
    pruner.remove()                              # reversible: back to the dense model's outputs
    torch.testing.assert_close(model(*x), dense_out, rtol=0, atol=0)


@pytest.mark.parametrize("criterion", ["apoz", "mean_activation", "variance", "taylor", "hessian"])
def test_data_dependent_criteria_score_recurrent_units(criterion):
    """The hidden units of a single-layer GRU and of a 2-layer bidirectional LSTM are scored through a gate on
    every layer's outputs (head_taps, the LSTM run one layer at a time)."""
    torch.manual_seed(2)
    model = Tagger().eval()     # (the LSTM's dropout)
    x = (torch.randint(0, 50, (4, 9)),)
    gradient = criterion in ("taylor", "hessian")
    calib = [(x[0], torch.randint(0, 5, (4,)))] if gradient else [x[0]]
    pruner = sk.prune.Pruner(model, x, criterion=criterion, calib=calib, granularity="channel", sparsity=0.5,
                             scope="layer")
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-5)
    assert small.lstm.hidden_size == 12 and small.gru.hidden_size == 10
    assert small.fc.out_features == 16                 # the Linear between them is pruned


def test_a_recurrent_gate_sees_each_units_states_and_gates_every_output():
    """head_taps on an LSTM (bidirectional, batch_first): unit j's feature map holds its states of both
    directions; a zero gate on unit j zeroes it in the output of both directions and in h_n and c_n."""
    from sparsekit.prune.head_taps import HeadTaps

    torch.manual_seed(3)
    model = nn.Sequential(nn.LSTM(4, 6, batch_first=True, bidirectional=True))
    x = torch.randn(2, 5, 4)
    seen = {}
    with HeadTaps(model, [], lambda name, fmap: seen.setdefault(name, fmap), gates=True, outputs=["0"]) as taps:
        with torch.no_grad():
            taps.gates["0"][2] = 0.0
        out, (h, c) = model(x)
    ref, _ = model(x)
    assert seen["0"].shape == (2, 6, 2 * 5)
    torch.testing.assert_close(seen["0"][:, 2, :5], ref[:, :, 2])               # forward direction, unit 2
    torch.testing.assert_close(seen["0"][:, 2, 5:], ref[:, :, 6 + 2])           # backward direction
    assert out[..., 2].abs().max() == 0 and out[..., 8].abs().max() == 0
    assert h[..., 2].abs().max() == 0 and c[..., 2].abs().max() == 0


@pytest.mark.parametrize("make", [lambda **k: nn.LSTM(5, 7, **k), lambda **k: nn.GRU(5, 7, **k),
                                  lambda **k: nn.RNN(5, 7, nonlinearity="relu", **k)], ids=["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_by_layer_equals_the_module(make, layers, batch_first):
    from sparsekit.prune.recurrent import layer_by_layer

    torch.manual_seed(9)
    for bidirectional, bias in ((False, True), (True, False)):
        mod = make(num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first).eval()
        d = 2 if bidirectional else 1
        x = torch.randn(4, 3, 5)
        h = torch.randn(layers * d, 4 if batch_first else 3, 7)
        hx = (h, torch.randn_like(h)) if isinstance(mod, nn.LSTM) else h
        for args in ((x,), (x, hx), (x[0],)):            # zero state, a given state, unbatched
            torch.testing.assert_close(layer_by_layer(mod, *args), mod(*args))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_a_multi_layer_recurrent_gate_acts_on_every_layer(kind):
    """Three layers, bidirectional: with the taps on, the module runs one layer at a time (ones: its own
    outputs); unit j's feature map holds its states of every layer; a zero gate zeroes unit j in the output and in
    every layer's final states and changes what the next layer reads; the gate's gradient is the derivative of
    the loss in the gate (a finite difference)."""
    from sparsekit.prune.head_taps import HeadTaps

    torch.manual_seed(8)
    model = nn.Sequential(kind(4, 6, num_layers=3, bidirectional=True)).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    ref_out, ref_state = model(x)
    seen = {}
    with HeadTaps(model, [], lambda name, fmap: seen.setdefault(name, fmap), gates=True, outputs=["0"]) as taps:
        out, state = model(x)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(state, ref_state)
        assert seen["0"].shape == (2, 6, 2 * 3 * 5)
        torch.testing.assert_close(seen["0"][:, 1, -5:], ref_out[:, :, 6 + 1].T)   # last layer, backward, unit 1

        def loss(g: float) -> Tensor:
            taps.new_gates()
            with torch.no_grad():
                taps.gates["0"][1] = g
            out, _ = model(x)
            return (out.sin() * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()

        loss(1.0).backward()
        grad = taps.gates["0"].grad[1]
        numeric = (loss(1.0 + 1e-6) - loss(1.0 - 1e-6)) / 2e-6
        torch.testing.assert_close(grad, numeric.detach(), rtol=1e-5, atol=1e-7)
        taps.new_gates()
        with torch.no_grad():
            taps.gates["0"][1] = 0.0
            out, state = model(x)
    h = state[0] if kind is nn.LSTM else state
    assert out[..., [1, 7]].abs().max() == 0 and h[..., 1].abs().max() == 0
    assert not torch.allclose(out, ref_out)         # the inner layers' unit 1 was zeroed for the next layer too
    assert "forward" not in model[0].__dict__       # the module's own forward is back


def test_data_dependent_criteria_leave_a_projected_lstm_whole():
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lstm, self.out = nn.Embedding(30, 12), nn.LSTM(12, 16, proj_size=8), nn.Linear(8, 4)

        def forward(self, t):
            return self.out(self.lstm(self.emb(t))[0])

    x = (torch.randint(0, 30, (5, 2)),)
    with pytest.raises(ValueError, match=r"'apoz' scores Linear / conv layers.*\['emb', 'lstm'\].*l1_mean"):
        sk.prune.Pruner(Projected(), x, criterion="apoz", calib=[x[0]], granularity="channel", sparsity=0.5)


def test_ignoring_a_recurrent_layer_keeps_its_units():
    model = Tagger()
    x = (torch.randint(0, 50, (2, 6)),)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5, ignore=["lstm"])
    pruner.step()
    small = pruner.compact()
    assert small.lstm.hidden_size == 24 and small.gru.hidden_size < 20


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = _randomize_biases(Tagger())
    x = (torch.randint(0, 50, (2, 6)),)
    graph = DependencyGraph.build(model, x)
    small = compact(model, x, graph.select(0.4), graph=graph)
    sk.save(small, tmp_path / "tagger")
    back = sk.load(tmp_path / "tagger", Tagger())
    sk.verify(small, back.eval(), x, atol=0)
    assert compacted_widths(back) == compacted_widths(small)
    assert compacted_widths(small)["lstm"] == {"in": small.emb.embedding_dim, "hidden": small.lstm.hidden_size}


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_resize_keeps_the_units_rows_and_columns(kind, bidirectional):
    torch.manual_seed(4)
    mod = kind(7, 9, num_layers=2, bidirectional=bidirectional, bias=kind is not nn.GRU)
    keep_h, keep_i = torch.tensor([0, 3, 4, 8]), torch.tensor([1, 2, 6])
    small = resize_module(mod, keep_h, keep_i)
    assert type(small) is kind and small.hidden_size == 4 and small.input_size == 3
    # the same as zeroing what goes and running the big module on the kept inputs: equal kept outputs
    big = kind(7, 9, num_layers=2, bidirectional=bidirectional, bias=kind is not nn.GRU)
    big.load_state_dict(mod.state_dict())
    with torch.no_grad():
        for name, keep in index_masks(mod, keep_h, keep_i).items():
            getattr(big, name).mul_(keep)
    x = torch.randn(5, 2, 7)
    x_big = torch.zeros_like(x)
    x_big[..., keep_i] = x[..., keep_i]
    dirs = 2 if bidirectional else 1
    cols = torch.cat([keep_h + d * 9 for d in range(dirs)])
    y_big, y_small = big(x_big)[0], small(x[..., keep_i])[0]
    torch.testing.assert_close(y_small, y_big[..., cols])
    torch.testing.assert_close(big(x_big)[0][..., [1, 2]], torch.zeros(5, 2, 2))    # removed units stay 0
    # every parameter is listed, with rows g * H + j of every gate block
    assert set(unit_index(mod)) == {n for n, _ in mod.named_parameters()}
    rows = unit_index(mod, keep_h)["weight_hh_l0"][0]
    g = {nn.RNN: 1, nn.LSTM: 4, nn.GRU: 3}[kind]
    assert rows.tolist() == [b * 9 + j for b in range(g) for j in keep_h.tolist()]


def test_masked_recurrent_weights_are_what_the_module_runs():
    torch.manual_seed(5)
    lstm = nn.LSTM(4, 6, num_layers=2)
    x = torch.randn(3, 1, 4)
    keep = index_masks(lstm, torch.tensor([0, 2, 5]))
    ref = resize_recurrent(lstm, torch.tensor([0, 2, 5]))
    for name, mk in keep.items():
        apply_tensor_mask(lstm, name, mk)
    torch.testing.assert_close(lstm(x)[0][..., [0, 2, 5]], ref(x)[0])


def test_a_model_whose_only_pruned_layers_are_recurrent():
    """Embedding -> GRU -> classifier: no Linear / conv is pruned (the classifier is ignored), yet channel pruning
    has the GRU's hidden units and the embedding's features; element pruning has nothing and says so."""
    class Tokens(nn.Module):
        def __init__(self, layers: int = 1):
            super().__init__()
            self.emb = nn.Embedding(30, 12)
            self.gru = nn.GRU(12, 16, num_layers=layers, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, t):
            return self.out(self.gru(self.emb(t))[0])

    torch.manual_seed(6)
    model = _randomize_biases(Tokens())
    x = (torch.randint(0, 30, (2, 5)),)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5, scope="layer")
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-5)
    assert (small.emb.embedding_dim, small.gru.hidden_size) == (6, 8)
    with pytest.raises(ValueError, match="left to prune"):
        sk.prune.Pruner(Tokens(), x, criterion="l1", granularity="element", sparsity=0.5, ignore=["out"])
    gated = sk.prune.Pruner(Tokens(), x, criterion="apoz", calib=[x[0]], granularity="channel", sparsity=0.5)
    gated.step()                                 # scored through its gate
    assert gated.compact().gru.hidden_size == 8
    two = sk.prune.Pruner(Tokens(2), x, criterion="apoz", calib=[x[0]], granularity="channel", sparsity=0.5)
    two.step()                                   # two layers: both layers' outputs gated
    assert two.compact().gru.hidden_size == 8


def test_fine_tuning_steps_between_pruning_and_compaction():
    """A masked recurrent model trains (masked weights stay zero), can be copied after forwards with grad, and
    compacts to the fine-tuned masked model."""
    torch.manual_seed(7)
    model = _randomize_biases(Tagger()).train()
    for mod in model.modules():       # no dropout: the masked and compacted models are compared in train mode too
        if isinstance(mod, nn.LSTM):
            mod.dropout = 0.0
    x = (torch.randint(0, 50, (4, 6)),)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5, scope="layer")
    pruner.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(*x).pow(2).mean().backward()
        opt.step()
    model(*x).sum().backward()            # a forward under grad right before copying
    copy.deepcopy(model)
    small = pruner.compact()
    sk.verify(model.eval(), small.eval(), x, atol=1e-5)
    assert small.lstm.hidden_size == 12


def test_call_forms_input_keyword_carried_state_and_state_layout():
    class Twice(nn.Module):       # one GRU run on two segments, the state carried from the first to the second
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 8)
            self.gru = nn.GRU(8, 10, batch_first=True)
            self.out = nn.Linear(10, 2)

        def forward(self, a, b):
            _, h = self.gru(input=self.fc(a))
            y, _ = self.gru(self.fc(b), h)
            return self.out(y)

    torch.manual_seed(8)
    model, x = _randomize_biases(Twice()), (torch.randn(2, 4, 5), torch.randn(2, 3, 5))
    graph = DependencyGraph.build(model, x)
    members = {(m.module, m.axis) for g in graph.prunable for m in g.members}
    assert {("gru", "out"), ("fc", "out"), ("gru", "in")} <= members
    keep = graph.select(0.5, scope="layer")
    sk.verify(mask_groups(model, x, keep, graph=graph), compact(model, x, keep, graph=graph), x, atol=1e-5)

    class StateOnWrongDim(nn.Module):     # a conv's channels land on the state's batch dim (batch = hidden = 12)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 12, 1)
            self.gru = nn.GRU(4, 12)
            self.out = nn.Linear(12, 2)

        def forward(self, a, z):
            return self.out(self.gru(a, self.conv(z))[0])

    graph = DependencyGraph.build(StateOnWrongDim(), (torch.randn(5, 12, 4), torch.randn(1, 3, 12)))
    (group,) = [g for g in graph.groups if ("gru", "out") in {(m.module, m.axis) for m in g.members}]
    assert not group.prunable and "initial state" in group.reason


class _TimeMajorLSTM(nn.LSTM):
    """An LSTM subclass with its own forward (batch-first outside, time-major inside)."""

    def forward(self, x, hx=None):
        out, state = super().forward(x.transpose(0, 1), hx)
        return out.transpose(0, 1), state


@pytest.mark.parametrize("layers", [1, 2])
def test_a_recurrent_subclass_with_its_own_forward_keeps_it_while_tapped(layers):
    """HeadTaps does not replace a subclass's own forward: a single-layer one is gated on what it returns, a
    multi-layer one is not scored by data-dependent criteria (its inner layers cannot be reached)."""
    from sparsekit.prune.head_taps import HeadTaps
    from sparsekit.prune.pruner import _gated

    torch.manual_seed(10)
    model = nn.Sequential(_TimeMajorLSTM(4, 6, num_layers=layers))
    x = torch.randn(2, 5, 4)
    ref = model(x)[0]
    assert _gated(model[0]) is (layers == 1)
    seen = {}
    with HeadTaps(model, [], lambda n, f: seen.setdefault(n, f), gates=True, outputs=["0"]):
        torch.testing.assert_close(model(x)[0], ref)
    assert seen["0"].shape[1] == 6 and seen["0"].numel() == 2 * 5 * 6     # (its own layout: batch, time unknown)


def test_head_taps_restore_forward_on_a_failed_enter_and_refuse_nesting():
    from sparsekit.prune.head_taps import HeadTaps
    from sparsekit.prune.recurrent import layer_by_layer

    model = nn.Sequential(nn.LSTM(4, 6, num_layers=2))
    with pytest.raises(AttributeError), HeadTaps(model, [], gates=True, outputs=["0", "missing"]):
        pass
    assert "forward" not in model[0].__dict__
    with HeadTaps(model, [], outputs=["0"]), pytest.raises(ValueError, match="already tapped"), \
            HeadTaps(model, [], outputs=["0"]):
        pass
    assert "forward" not in model[0].__dict__
    with pytest.raises(ValueError, match="proj_size"):
        layer_by_layer(nn.LSTM(4, 6, proj_size=3), torch.randn(5, 2, 4))
    with pytest.raises(TypeError, match="mod must be an nn.RNN"):
        layer_by_layer(nn.Linear(4, 6), torch.randn(5, 2, 4))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        layer_by_layer(nn.LSTM(4, 6), [torch.randn(5, 2, 4)])


class _ThreeOutputs(nn.LSTM):
    """Returns (output, [h, c], mean output): more than (output, state), the state as a list."""

    def forward(self, x, hx=None):
        out, (h, c) = super().forward(x, hx)
        return out, [h, c], out.mean()


def test_recurrent_taps_keep_what_a_module_of_its_own_returns_and_an_instance_forward():
    from sparsekit.prune.head_taps import HeadTaps

    torch.manual_seed(12)
    model = nn.Sequential(_ThreeOutputs(4, 6))
    x = torch.randn(5, 2, 4)
    with HeadTaps(model, [], gates=True, outputs=["0"]) as taps:
        with torch.no_grad():
            taps.gates["0"][3] = 0.0
        out, state, mean = model(x)
    assert isinstance(state, list) and state[0][..., 3].abs().max() == 0 and out[..., 3].abs().max() == 0
    assert mean.dim() == 0
    calls = []
    lstm = nn.LSTM(4, 6, num_layers=2)
    own = lstm.forward

    def wrapped(*args, **kwargs):       # e.g. a device-alignment hook set on the instance
        calls.append(1)
        return own(*args, **kwargs)

    lstm.forward = wrapped
    with HeadTaps(nn.Sequential(lstm), [], gates=True, outputs=["0"]):
        nn.Sequential(lstm)(x)
    assert calls and lstm.forward is wrapped


def test_stock_forward_and_the_cudnn_switch():
    from sparsekit.prune.recurrent import _cudnn_disabled, stock_forward

    lstm = nn.LSTM(4, 6, num_layers=2)
    assert stock_forward(lstm)
    lstm.forward = lstm.forward          # a hook removed, the bound method set back: still torch's forward
    assert stock_forward(lstm)
    lstm.forward = lambda *a, **k: None
    assert not stock_forward(lstm)
    before = torch.backends.cudnn.enabled
    with _cudnn_disabled():
        assert not torch.backends.cudnn.enabled
    assert torch.backends.cudnn.enabled == before
