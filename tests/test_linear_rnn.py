"""nn.RNN / nn.LSTM / nn.GRU with Linear weight matrices: LinearRecurrent, rnn_to_linear, the fused rnn_cell step,
and what uses them (element / block pruning of recurrent weights, sparsify, convert_modules, save / load,
training, torch.compile / export, the dependency graph)."""

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import sparsekit as sk
from sparsekit.nn import LinearRecurrent, SparseLinear, convert_modules, rnn_to_linear
from sparsekit.ops import reference
from sparsekit.ops.rnn_cell import rnn_cell
from sparsekit.prune.masks import bake_masks
from sparsekit.sparsify import LayerDecision, SparsifyReport, _keep_faster_converted

OPTIONS = [
    (nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}), (nn.RNN, {"nonlinearity": "relu"}), (nn.LSTM, {"proj_size": 3}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}), (nn.GRU, {"num_layers": 3, "batch_first": True}),
    (nn.GRU, {"bidirectional": True, "bias": False}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 4, "bias": False, "batch_first": True}),
]


def _states(s):
    return s if isinstance(s, tuple) else (s,)


def _close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("cls,kw", OPTIONS, ids=lambda o: getattr(o, "__name__", str(o)))
def test_same_outputs_as_stock(cls, kw, dtype, atol):
    torch.manual_seed(0)
    rnn = cls(5, 7, **kw).to(dtype).eval()
    lin = LinearRecurrent.from_module(rnn)
    assert isinstance(lin.hh_l0, nn.Linear) and lin.mode == rnn.mode
    bf = kw.get("batch_first", False)
    x = torch.randn(4, 6, 5, dtype=dtype) if bf else torch.randn(6, 4, 5, dtype=dtype)
    with torch.no_grad():
        a, sa = rnn(x)
        b, sb = lin(x)
        _close(b, a, atol)
        for p, q in zip(_states(sb), _states(sa)):
            _close(p, q, atol)
        # a given initial state, an unbatched sequence
        a2, _ = rnn(x, sa)
        b2, _ = lin(x, sa)
        _close(b2, a2, atol)
        xu = x[0] if bf else x[:, 0]
        _close(lin(xu)[0], rnn(xu)[0], atol)
        hu = tuple(s[:, 0] for s in _states(sa))
        _close(lin(xu, hu if len(hu) == 2 else hu[0])[0], rnn(xu, hu if len(hu) == 2 else hu[0])[0], atol)
        # packed sequences of different lengths, unsorted
        packed = pack_padded_sequence(x, torch.tensor([6, 3, 5, 1]), batch_first=bf, enforce_sorted=False)
        a3, sa3 = rnn(packed)
        b3, sb3 = lin(packed)
        _close(b3.data, a3.data, atol)
        assert torch.equal(b3.batch_sizes, a3.batch_sizes) and torch.equal(b3.unsorted_indices, a3.unsorted_indices)
        for p, q in zip(_states(sb3), _states(sa3)):
            _close(p, q, atol)
        _close(pad_packed_sequence(b3, batch_first=bf)[0], pad_packed_sequence(a3, batch_first=bf)[0], atol)
        _close(lin(packed, sa)[0].data, rnn(packed, sa)[0].data, atol)
        back = lin.to_stock()
        assert type(back) is cls and back.mode == rnn.mode
        _close(back(x)[0], a, atol)


def test_an_empty_batch_and_a_one_step_sequence():
    torch.manual_seed(0)
    rnn = nn.LSTM(5, 7, num_layers=2).eval()
    lin = LinearRecurrent.from_module(rnn)
    with torch.no_grad():
        for x in (torch.randn(3, 0, 5), torch.randn(1, 2, 5)):
            a, (h, c) = rnn(x)
            b, (h2, c2) = lin(x)
            _close(b, a, 2e-6)
            _close(h2, h, 2e-6)
            _close(c2, c, 2e-6)


def test_bfloat16_runs_close_to_stock():
    torch.manual_seed(0)
    rnn = nn.GRU(16, 32, num_layers=2)
    lin = LinearRecurrent.from_module(rnn).to(torch.bfloat16)
    x = torch.randn(10, 3, 16)
    with torch.no_grad():
        out, h = lin(x.to(torch.bfloat16))
        ref, _ = rnn(x)
    assert out.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    rnn = nn.LSTM(5, 7, num_layers=3, dropout=0.5)
    lin = LinearRecurrent.from_module(rnn)
    x = torch.randn(4, 2, 5)
    lin.eval()
    _close(lin(x)[0], rnn.eval()(x)[0], 2e-6)
    lin.train()
    torch.manual_seed(1)
    a = lin(x)[0]
    torch.manual_seed(2)
    assert not torch.allclose(a, lin(x)[0])         # dropout draws
    lin.dropout = 0.0
    _close(lin(x)[0], rnn.eval()(x)[0], 2e-6)


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        LinearRecurrent("LSTM2", 4, 8)
    with pytest.raises(ValueError, match="proj_size"):
        LinearRecurrent("GRU", 4, 8, proj_size=2)
    with pytest.raises(ValueError, match="hidden_size"):
        LinearRecurrent("LSTM", 4, 0)
    lin = LinearRecurrent("LSTM", 4, 8, num_layers=2)
    assert lin.layer_names() == ["ih_l0", "hh_l0", "ih_l1", "hh_l1"]
    with pytest.raises(ValueError, match="input must be 3-D"):
        lin(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="4 features"):
        lin(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="tuple"):
        lin(torch.randn(2, 3, 4), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 3, 8\)"):
        lin(torch.randn(2, 3, 4), (torch.zeros(1, 3, 8), torch.zeros(2, 3, 8)))
    with pytest.raises(TypeError, match="Tensor or a PackedSequence"):
        lin([1, 2])
    with pytest.raises(TypeError, match="torch's own forward"):
        LinearRecurrent.from_module(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="itself a recurrent module"):
        rnn_to_linear(nn.GRU(2, 3))
    lin.flatten_parameters()          # (models call it in their forward)


def test_rnn_cell_fused_matches_reference():
    torch.manual_seed(0)
    for (mode, gates), hidden, dtype, isa in itertools.product(
            [("LSTM", 4), ("GRU", 3), ("RNN_TANH", 1), ("RNN_RELU", 1)], [1, 5, 8, 13, 70],
            [torch.float32, torch.bfloat16], ["", "scalar"]):
        gi, gh = torch.randn(6, gates * hidden) * 4, torch.randn(6, gates * hidden) * 4
        h, c = torch.randn(6, hidden), torch.randn(6, hidden) if mode == "LSTM" else None
        args = [t.to(dtype) if t is not None else None for t in (gi, gh, h, c)]
        with pytest.MonkeyPatch.context() as mp:
            if isa:
                mp.setenv("SPARSEKIT_CPU_ISA", isa)
            with torch.no_grad():
                got = rnn_cell(*args, mode)
        wide = [t.double() if t is not None else None for t in args]
        want = reference.rnn_cell(*wide, reference.RNN_MODES.index(mode))
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[0].double(), want[0], atol=tol * 4, rtol=tol)
        assert got[0].dtype == dtype
        if mode == "LSTM":
            torch.testing.assert_close(got[1].double(), want[1], atol=tol * 4, rtol=tol)
        else:
            assert got[1] is None


def test_rnn_cell_rows_split_across_threads_match_reference():
    # 19 rows x 1001 cells: the op splits the rows into chunks of 8 (a shorter last one) on two threads
    torch.manual_seed(0)
    for mode, gates in [("LSTM", 4), ("GRU", 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            gi, gh = torch.randn(19, gates * 1001, dtype=dtype), torch.randn(19, gates * 1001, dtype=dtype)
            h, c = torch.randn(19, 1001, dtype=dtype), torch.randn(19, 1001, dtype=dtype) if mode == "LSTM" else None
            with torch.no_grad():
                got = rnn_cell(gi, gh, h, c, mode)
            wide = [t.double() if t is not None else None for t in (gi, gh, h, c)]
            want = reference.rnn_cell(*wide, reference.RNN_MODES.index(mode))
            tol = 1e-6 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got[0].double(), want[0], atol=tol * 4, rtol=tol)
            if mode == "LSTM":
                torch.testing.assert_close(got[1].double(), want[1], atol=tol * 4, rtol=tol)


def test_rnn_cell_tanh_is_accurate_across_its_range():
    x = torch.linspace(-30, 30, 60001)
    z = torch.zeros_like(x)[:, None]
    with torch.no_grad():
        h, _ = rnn_cell(x[:, None], z, z, None, "RNN_TANH")
        s, c = rnn_cell(x[:, None].repeat(1, 4), torch.zeros(len(x), 4), z, torch.ones(len(x), 1), "LSTM")
    torch.testing.assert_close(h[:, 0], torch.tanh(x), atol=3e-7, rtol=2e-6)
    sig = torch.sigmoid(x)       # c = sig * 1 + sig * tanh(x)
    torch.testing.assert_close(c[:, 0], sig + sig * torch.tanh(x), atol=5e-7, rtol=2e-6)


def test_rnn_cell_op_checks_and_gradients():
    torch.manual_seed(0)
    op = torch.ops.sparsekit.rnn_cell.default
    gi, gh, h, c = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 2), torch.randn(3, 2)
    torch.library.opcheck(op, (gi, gh, h, c, 0))
    torch.library.opcheck(op, (gi[:, :6].contiguous(), gh[:, :6].contiguous(), h, None, 1))
    args = [t.double().requires_grad_() for t in (gi, gh, h, c)]
    assert torch.autograd.gradcheck(lambda *a: op(*a, 0), args)
    with pytest.raises(ValueError, match="mode must be one of"):
        rnn_cell(gi, gh, h, c, "lstm")
    with pytest.raises(ValueError, match=r"c must have shape \(3, 2\)"):
        rnn_cell(gi, gh, h, torch.randn(3, 5), "LSTM")
    with pytest.raises(ValueError, match=r"gi and gh must both be \[rows, 3 \* H\]"):
        rnn_cell(gi, gh, h, None, "GRU")
    with pytest.raises(ValueError, match="takes c=None"):
        rnn_cell(gi[:, :2], gh[:, :2], h, c, "RNN_TANH")
    with pytest.raises(TypeError, match="h must be a Tensor"):
        rnn_cell(gi, gh, None, c, "LSTM")
    with pytest.raises(RuntimeError, match="c must be given for an LSTM"):
        op(gi, gh, h, None, 0)
    with pytest.raises(RuntimeError, match=r"h must have shape \[3, 2\]"):
        op(gi[:, :6].contiguous(), gh[:, :6].contiguous(), torch.randn(3, 3), None, 1)
    # with gradients needed, the face runs the reference ops (autograd through them)
    g = gi.clone().requires_grad_()
    out, _ = rnn_cell(g, gh, h, c, "LSTM")
    out.sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


class Tagger(nn.Module):
    def __init__(self, cls=nn.LSTM, **kw):
        super().__init__()
        self.rnn = cls(64, 64, **kw)
        self.head = nn.Linear(64 * (2 if kw.get("bidirectional") else 1), 5)

    def forward(self, x):
        self.rnn.flatten_parameters() if isinstance(self.rnn, nn.RNNBase) else None
        return self.head(self.rnn(x)[0])


def _block_pruned(model, x, sparsity=0.75):
    """The stock model with 75% of every recurrent weight's 16x16 blocks zeroed (pruned through the converted
    model, baked, packed back into the stock class)."""
    conv = rnn_to_linear(model)
    pruner = sk.prune.Pruner(conv, x, granularity="block", block=(16, 16), sparsity=sparsity, ignore=["head"])
    pruner.step()
    bake_masks(conv)
    model.rnn = conv.rnn.to_stock()
    return model.eval()


def test_block_pruning_reaches_the_recurrent_weights():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(num_layers=2, bidirectional=True), x)
    for name in model.rnn._flat_weights_names:
        if name.startswith("weight"):
            w = getattr(model.rnn, name)
            blocks = w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).abs().sum((1, 3))
            assert (blocks == 0).float().mean() == 0.75, name


@pytest.mark.parametrize("cls,kw", [(nn.LSTM, {"num_layers": 2}), (nn.GRU, {"bidirectional": True})])
def test_sparsify_swaps_recurrent_weights_and_keeps_outputs(cls, kw):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(cls, **kw), x)
    fast, report = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                               measure_model=False)
    assert isinstance(fast.rnn, LinearRecurrent) and fast.rnn.sparsify_converted
    assert all(isinstance(getattr(fast.rnn, n), SparseLinear) for n in fast.rnn.layer_names())
    names = {d.name for d in report.layers}
    assert {f"rnn.{n}" for n in fast.rnn.layer_names()} <= names
    hh = next(d for d in report.layers if d.name == "rnn.hh_l0")
    assert hh.input_shape == (2, 64)       # timed at its real per-step shape (M = batch)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    # nothing faster than the stock module by a factor 1e9: it stays stock, and says so
    slow, report = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e9, cache=False, reps=1,
                               measure_model=False)
    assert type(slow.rnn) is cls
    assert all(d.choice == "dense" for d in report.layers)


def test_a_converted_module_not_faster_than_the_stock_one_is_put_back():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(), x)
    original = model.rnn
    model.rnn = LinearRecurrent.from_module(original)
    model.rnn.hh_l0 = SparseLinear.from_dense(model.rnn.hh_l0, format="bsr", block=16)
    decision = LayerDecision("rnn.hh_l0", "linear", (256, 64), (2, 64), 0.75, "blocks", {"dense": 1.0, "bsr16x16": 0.5},
                             "bsr16x16", 2.0, backend="sparsekit_cpu")
    report = SparsifyReport([decision], "cpu", "torch.float32", min_speedup=1e9)
    exposed = {"rnn": original}
    _keep_faster_converted(model, exposed, {"rnn": ((x,), {})}, report, 3, torch.device("cpu"))
    assert model.rnn is original and exposed == {}
    assert (decision.choice, decision.speedup, decision.backend) == ("dense", 1.0, "torch")
    assert "the stock nn.LSTM" in decision.notes[-1] and "it stays stock" in decision.notes[-1]
    assert "stayed dense" not in str(report)      # (kept stock after timing it whole: no pruning hint)


def test_save_load_and_sparsify_again(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(num_layers=2), x)
    fast, _ = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    sk.save(fast, tmp_path / "m")
    loaded = sk.load(tmp_path / "m", Tagger(num_layers=2))
    assert isinstance(loaded.rnn, LinearRecurrent) and isinstance(loaded.rnn.hh_l1, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    # a meta skeleton allocates no dense weight
    with torch.device("meta"):
        skeleton = Tagger(num_layers=2)
    on_meta = sk.load(tmp_path / "m", skeleton)
    with torch.no_grad():
        torch.testing.assert_close(on_meta(x), model(x), atol=1e-5, rtol=1e-5)
    # sparsifying the loaded model measures the stock module against the converted one again
    again, report = sk.sparsify(loaded, x, formats=["dense", "bsr"], min_speedup=1e9, cache=False, reps=1,
                                measure_model=False)
    assert type(again.rnn) is nn.LSTM
    # a skeleton converted beforehand loads too
    conv = sk.load(tmp_path / "m", rnn_to_linear(Tagger(num_layers=2)))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), atol=1e-5, rtol=1e-5)


def test_compacted_then_converted_model_loads_into_the_original_class(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = Tagger(num_layers=2).eval()
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact().eval()
    assert small.rnn.hidden_size == 32
    small = _block_pruned(small, x, sparsity=0.5)
    fast, _ = sk.sparsify(small, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    assert isinstance(fast.rnn, LinearRecurrent) and fast.rnn.hidden_size == 32
    sk.save(fast, tmp_path / "m")
    for skeleton in (Tagger(num_layers=2), rnn_to_linear(Tagger(num_layers=2))):
        loaded = sk.load(tmp_path / "m", skeleton)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), small(x), atol=1e-5, rtol=1e-5)


def test_masks_follow_the_weights_into_the_converted_module():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = Tagger(num_layers=2).eval()
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.25)
    pruner.step()
    conv = rnn_to_linear(model)
    assert torch.nn.utils.parametrize.is_parametrized(conv.rnn.hh_l0, "weight")
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), atol=1e-5, rtol=1e-5)
    pruner.remove()              # the copy keeps its own masks
    assert torch.nn.utils.parametrize.is_parametrized(conv.rnn.ih_l1, "weight")


def test_sparse_recurrent_module_trains_like_the_masked_dense_one():
    torch.manual_seed(0)
    x, target = torch.randn(8, 2, 64), torch.randn(8, 2, 5)
    model = _block_pruned(Tagger(num_layers=2), x)
    dense = rnn_to_linear(model).train()
    sparse = rnn_to_linear(model)
    for n in sparse.rnn.layer_names():
        setattr(sparse.rnn, n, SparseLinear.from_dense(getattr(sparse.rnn, n), "bsr", block=16))
    sparse.train()
    keep = {n: getattr(dense.rnn, n).weight.detach() != 0 for n in dense.rnn.layer_names()}
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for _ in range(3):
        for m, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), target).backward()
            opt.step()
        with torch.no_grad():       # the masked dense model: its zeros stay zeros
            for n, k in keep.items():
                getattr(dense.rnn, n).weight.mul_(k)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
        for n in dense.rnn.layer_names():
            torch.testing.assert_close(getattr(sparse.rnn, n).dense_weight2d(), getattr(dense.rnn, n).weight,
                                       atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_and_export():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 64)
    model = _block_pruned(Tagger(nn.GRU), x)
    fast, _ = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    assert isinstance(fast.rnn, LinearRecurrent)
    with torch.no_grad():
        want = fast(x)
        torch._dynamo.reset()
        got = torch.compile(fast, fullgraph=True)(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        exported = torch.export.export(fast, (x,))
        torch.testing.assert_close(exported.module()(x), want, atol=1e-5, rtol=1e-5)


def test_convert_modules_and_the_dependency_graph():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(num_layers=2), x)
    conv = convert_modules(model, format="bsr", block=16)
    assert isinstance(conv.rnn, LinearRecurrent) and isinstance(conv.rnn.hh_l0, SparseLinear)
    # a recurrent module none of whose weights converts stays stock; its weights are listed by their own names
    plain = Tagger()
    with torch.no_grad():
        plain.rnn.weight_hh_l0[:16] = 0
    plain = convert_modules(plain, format="bsr", block=48)
    assert type(plain.rnn) is nn.LSTM
    assert plain.sparsekit_skipped["rnn.weight_ih_l0"] == "no zeros"
    assert "48" in plain.sparsekit_skipped["rnn.weight_hh_l0"]
    # channel pruning follows stock modules: a converted one keeps its widths, with the reason
    net = nn.Sequential(nn.Linear(64, 64), rnn_to_linear(Tagger()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = sk.prune.Pruner(net, x, granularity="channel", sparsity=0.5)
        text = pruner._dependency_graph().describe()
    assert "(LinearRecurrent) keeps its widths" in text


def test_the_whole_model_baseline_runs_the_stock_module():
    """A model the user converted (to prune its recurrent weights) is timed against the stock module it computes,
    torch's fused kernel, not against the converted module's slower dense time loop."""
    from sparsekit.sparsify import _dense_baseline

    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    conv = rnn_to_linear(Tagger(num_layers=2))
    pruner = sk.prune.Pruner(conv, x, granularity="block", block=(16, 16), sparsity=0.5, ignore=["head"])
    pruner.step()
    base = _dense_baseline(conv)
    assert type(base.rnn) is nn.LSTM and isinstance(conv.rnn, LinearRecurrent)
    with torch.no_grad():
        torch.testing.assert_close(base(x), conv(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ review fixes
def test_only_the_projection_training_gets_the_stock_gradients():
    """The fused step runs below autograd: not while an LSTM's projection (which feeds every later step) trains."""
    torch.manual_seed(0)
    m = nn.LSTM(4, 6, proj_size=3)
    lin = LinearRecurrent.from_module(m)
    for p in (*m.parameters(), *lin.parameters()):
        p.requires_grad_(False)
    m.weight_hr_l0.requires_grad_(True)
    lin.hr_l0.weight.requires_grad_(True)
    x = torch.randn(5, 2, 4)
    for mod in (m, lin):
        out, (h, _) = mod(x)
        (out.pow(2).sum() + h.sum()).backward()
    torch.testing.assert_close(lin.hr_l0.weight.grad, m.weight_hr_l0.grad, atol=1e-5, rtol=1e-5)


def test_nan_and_autocast_and_forward_mode_like_the_stock_module():
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4, nonlinearity="relu").eval()
    lin = LinearRecurrent.from_module(rnn)
    x = torch.randn(3, 1, 3)
    x[0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(lin(x)[0]).all() and torch.isnan(rnn(x)[0]).all()
    for cls in (nn.GRU, nn.LSTM):
        rnn = cls(8, 16).eval()
        lin = LinearRecurrent.from_module(rnn)
        x = torch.randn(4, 2, 8)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin(x)[0]
        torch.testing.assert_close(out.float(), rnn(x)[0], atol=3e-2, rtol=3e-2)
    import torch.autograd.forward_ad as fwad
    rnn = nn.GRU(3, 4)
    lin = LinearRecurrent.from_module(rnn)
    for p in (*rnn.parameters(), *lin.parameters()):
        p.requires_grad_(False)
    x, t = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    tangents = []
    for mod in (rnn, lin):
        with fwad.dual_level():
            out = mod(fwad.make_dual(x, t))[0]
            tangents.append(fwad.unpack_dual(out).tangent)
    assert tangents[1] is not None
    torch.testing.assert_close(tangents[1], tangents[0], atol=1e-5, rtol=1e-5)


def test_stock_attributes_model_code_reads():
    torch.manual_seed(0)
    for m in (nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2), nn.GRU(3, 4, bias=False),
              nn.RNN(3, 4, nonlinearity="relu", num_layers=2)):
        lin = LinearRecurrent.from_module(m)
        assert lin._flat_weights_names == m._flat_weights_names
        for n in m._flat_weights_names:
            assert torch.equal(getattr(lin, n), getattr(m, n)), n
        assert [[tuple(t.shape) for t in ws] for ws in lin.all_weights] == \
            [[tuple(t.shape) for t in ws] for ws in m.all_weights]
    assert lin.nonlinearity == "relu"
    lin.hh_l0 = SparseLinear.from_dense(lin.hh_l0, "csr")
    assert torch.equal(lin.weight_hh_l0, m.weight_hh_l0)       # a sparse child's dense view
    with pytest.raises(AttributeError, match="nonlinearity"):
        _ = LinearRecurrent("GRU", 3, 4).nonlinearity
    with pytest.raises(AttributeError, match="no attribute 'weight_hh_l5'"):
        _ = lin.weight_hh_l5
    # an LSTM state given as a list, a sequence of no steps
    lstm = LinearRecurrent.from_module(nn.LSTM(3, 4))
    h = [torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)]
    lstm(torch.randn(5, 2, 3), h)
    with pytest.raises(ValueError, match="at least one time step"):
        lstm(torch.randn(0, 2, 3))


class _ReadsWeights(nn.Module):
    def __init__(self, stock_only: bool):
        super().__init__()
        self.rnn, self.head, self.stock_only = nn.GRU(32, 32), nn.Linear(32, 4), stock_only

    def forward(self, x):
        if self.stock_only:
            assert len(self.rnn._flat_weights) == 4    # nothing the converted module mirrors
        h0 = x.new_zeros(1, x.shape[1], 32, dtype=self.rnn.weight_ih_l0.dtype)
        return self.head(self.rnn(x, h0)[0])


def test_sparsify_runs_model_code_reading_the_weights_and_keeps_what_it_cannot_convert():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 32)
    for stock_only in (False, True):
        model = _ReadsWeights(stock_only).eval()
        with torch.no_grad():
            model.rnn.weight_hh_l0[:, :16] = 0
        if stock_only:
            with pytest.warns(RuntimeWarning, match="stay stock"):
                fast, report = sk.sparsify(model, x, formats=["dense", "csr"], min_speedup=1e-9, cache=False,
                                           reps=1, measure_model=False)
            assert type(fast.rnn) is nn.GRU
        else:
            fast, report = sk.sparsify(model, x, formats=["dense", "csr"], min_speedup=1e-9, cache=False, reps=1,
                                       measure_model=False)
            assert isinstance(fast.rnn, LinearRecurrent)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


def test_recurrent_weights_are_measured_on_a_later_step_and_shared_modules_stay_one():
    from sparsekit.sparsify import capture_inputs

    torch.manual_seed(0)
    lin = LinearRecurrent.from_module(nn.GRU(4, 8))
    x = torch.randn(3, 2, 4)
    first = capture_inputs(lin, x, lambda m: isinstance(m, nn.Linear))
    second = capture_inputs(lin, x, lambda m: isinstance(m, nn.Linear), second_call={"hh_l0"})
    assert not first["hh_l0"].any() and second["hh_l0"].any()      # the initial state vs the first step's
    # a converted module registered under two names goes back to stock under both
    net = nn.Module()
    net.enc = net.dec = nn.LSTM(64, 64)
    original = net.enc
    net.enc = net.dec = LinearRecurrent.from_module(original)
    net.enc.hh_l0 = SparseLinear.from_dense(net.enc.hh_l0, "csr")
    net.forward = lambda h: net.dec(net.enc(h)[0])[0]
    report = SparsifyReport([], "cpu", "torch.float32", min_speedup=1e9)
    _keep_faster_converted(net, {"enc": original}, {"enc": ((torch.randn(4, 2, 64),), {})}, report, 1,
                           torch.device("cpu"))
    assert net.enc is original and net.dec is original


def test_rnn_cell_edge_cases():
    op = torch.ops.sparsekit.rnn_cell.default
    empty = op(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), None, 2)
    assert empty[0].shape == (2, 0)
    nan, inf = float("nan"), float("inf")
    gi = torch.tensor([[0.0, -inf, 0.0, 0.0], [inf, inf, -inf, inf]])
    c = torch.tensor([[inf], [1.0]])
    with torch.no_grad():
        got = op(gi, torch.zeros(2, 4), torch.zeros(2, 1), c, 0)
    want = reference.rnn_cell(gi, torch.zeros(2, 4), torch.zeros(2, 1), c, 0)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    assert torch.isnan(op(torch.tensor([[nan]]), torch.zeros(1, 1), torch.zeros(1, 1), None, 3)[0]).all()
    # second order: the backward recomputes through differentiable ops
    args = [torch.randn(2, 8, dtype=torch.float64, requires_grad=True), torch.randn(2, 8, dtype=torch.float64,
            requires_grad=True), torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64,
                                                                                     requires_grad=True)]
    assert torch.autograd.gradgradcheck(lambda gi, gh, c: op(gi, gh, args[2], c, 0), [args[0], args[1], args[3]])


def test_a_converted_skeleton_keeps_the_saved_sparsify_flag(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(), x)
    fast, _ = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    sk.save(fast, tmp_path / "m")
    loaded = sk.load(tmp_path / "m", rnn_to_linear(Tagger()))
    assert loaded.rnn.sparsify_converted


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_cuda_matches_the_stock_cudnn_module(dtype):
    """On a GPU the sparse products run on the CUDA / Triton backends and the gates as torch ops (the fused step
    is CPU only); fp16 against cuDNN's LSTM."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 64)
    model = _block_pruned(Tagger(num_layers=2, bidirectional=True), x).cuda().to(dtype)
    xc = x.cuda().to(dtype)
    fast, _ = sk.sparsify(model, xc, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    assert isinstance(fast.rnn, LinearRecurrent) and isinstance(fast.rnn.hh_l0, SparseLinear)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        torch.testing.assert_close(fast(xc), model(xc), atol=tol, rtol=tol)
    packed = pack_padded_sequence(xc, torch.tensor([8, 3, 5, 1]), enforce_sorted=False)
    with torch.no_grad():
        torch.testing.assert_close(fast.rnn(packed)[0].data, model.rnn(packed)[0].data, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ second review
def test_a_module_the_user_converted_is_compared_with_its_stock_form():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    conv = rnn_to_linear(_block_pruned(Tagger(), x))
    slow, report = sk.sparsify(conv, x, formats=["dense", "bsr"], min_speedup=1e9, cache=False, reps=1,
                               measure_model=False)
    assert type(slow.rnn) is nn.LSTM            # not 1e9x faster than the stock LSTM
    assert any("the stock nn.LSTM" in n for d in report.layers for n in d.notes)
    plain = rnn_to_linear(Tagger())             # no zeros at all: its dense time loop against the stock module
    back, _ = sk.sparsify(plain, x, min_speedup=1e9, cache=False, reps=1, measure_model=False)
    assert type(back.rnn) is nn.LSTM
    kept, _ = sk.sparsify(conv, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    assert isinstance(kept.rnn, LinearRecurrent) and isinstance(kept.rnn.hh_l0, SparseLinear)
    with torch.no_grad():
        for m in (slow, back, kept):
            ref = plain if m is back else conv
            torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


def test_hooks_on_a_stock_module_keep_running_on_the_converted_one():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(nn.GRU), x)
    handle = model.rnn.register_forward_hook(lambda mod, args, out: (out[0] * 2, out[1]))
    fast, _ = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=1,
                          measure_model=False)
    assert isinstance(fast.rnn, LinearRecurrent)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    handle.remove()
    lin = LinearRecurrent.from_module(model.rnn)
    assert not lin._forward_hooks                  # (one handle removes the hook from both)


def test_packed_sequences_are_measured_at_the_full_batch():
    from sparsekit.sparsify import capture_inputs

    lin = LinearRecurrent.from_module(nn.GRU(4, 8, bidirectional=True))
    x = torch.randn(6, 8, 4)
    packed = pack_padded_sequence(x, torch.tensor([6, 6, 5, 4, 3, 2, 1, 1]))
    seen = capture_inputs(lin, (packed,), lambda m: isinstance(m, nn.Linear),
                          second_call={"hh_l0", "hh_l0_reverse"})
    # the largest later call: forward, step 1 (six sequences last two steps or more); reverse, step 0 (all eight)
    assert seen["hh_l0"].shape[0] == 6 and seen["hh_l0_reverse"].shape[0] == 8
    assert seen["hh_l0"].any() and seen["hh_l0_reverse"].any()


def test_bad_inputs_raise_without_the_conversion_warning_and_subclasses_stay():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64)
    model = _block_pruned(Tagger(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="example_inputs"):
            sk.sparsify(model, torch.randn(8, 2, 7), cache=False, reps=1, measure_model=False)

    class MyLSTM(nn.LSTM):
        pass
    sub = Tagger()
    sub.rnn = MyLSTM(64, 64)
    sub.rnn.load_state_dict(model.rnn.state_dict())
    fast, _ = sk.sparsify(sub.eval(), x, min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert type(fast.rnn) is MyLSTM


def test_mirrored_names_are_read_only_and_a_bare_converted_module_is_timed_as_stock():
    from sparsekit.sparsify import _dense_baseline

    lin = LinearRecurrent.from_module(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(AttributeError, match="assign hh_l0.weight instead"):
        lin.weight_hh_l0 = torch.zeros(8, 2)
    assert not hasattr(lin, "bias_hr_l0") and hasattr(lin, "bias_hh_l0")
    assert type(_dense_baseline(lin)) is nn.LSTM


def test_element_pruning_of_a_stock_recurrent_module_says_how_to_reach_it():
    x = torch.randn(3, 2, 64)
    with pytest.warns(UserWarning, match="rnn_to_linear"):
        sk.prune.Pruner(Tagger(), x, sparsity=0.5)
    with pytest.raises(ValueError, match=r"rnn_to_linear\(model\) gives \['rnn'\] Linear layers"):
        sk.prune.Pruner(Tagger(), x, sparsity=0.5, ignore=["head"])
