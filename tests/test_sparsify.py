"""sk.sparsify, the tuning cache, the report, training/compile/export of a sparsified model, sk.save / sk.load."""

import copy
import importlib

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import _extension
from sparsekit.nn import SparseConv2d, SparseLinear
from sparsekit.sparsify import DEFAULT_BLOCKS, pattern_stats
from sparsekit.tuning_cache import TuningCache


def _block_mask_(lin: nn.Module, density: float, block: int = 16, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    w = lin.weight.data.reshape(lin.weight.shape[0], -1)
    n, k = w.shape
    keep = (torch.rand(n // block, k // block, generator=g) < density)
    w.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    _block_mask_(net.conv, 0.3)
    _block_mask_(net.fc1, 0.2)
    return net, torch.randn(4, 16, 8, 8)


def test_forced_sparse_choice_and_report():
    net, x = _net()
    fast, report = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2)
    assert isinstance(fast.conv, SparseConv2d) and isinstance(fast.fc1, SparseLinear)
    assert isinstance(fast.fc2, nn.Linear)              # no zeros: untouched
    assert isinstance(net.fc1, nn.Linear)               # the original model is not modified
    sk.verify(net, fast, x, atol=1e-4)
    names = [d.name for d in report.layers]
    assert names == ["conv", "fc1"]
    for d in report.layers:
        assert "dense" in d.times_ms and d.choice in d.times_ms and d.choice != "dense"
        assert d.speedup == pytest.approx(d.times_ms["dense"] / d.times_ms[d.choice])
    assert report.dense_ms > 0 and report.sparse_ms > 0
    text = str(report)
    assert "fc1" in text and "whole model" in text
    assert report.to_dict()["layers"][0]["name"] == "conv"


def test_nothing_beats_an_impossible_min_speedup():
    net, x = _net()
    fast, report = sk.sparsify(net, x, min_speedup=1e9, cache=False, reps=2, measure_model=False)
    assert all(d.choice == "dense" for d in report.layers)
    assert isinstance(fast.fc1, nn.Linear)


def test_formats_restrict_candidates():
    net, x = _net()
    _, report = sk.sparsify(net, x, formats=["dense", "csr"], min_speedup=1e-9, cache=False, reps=2,
                            measure_model=False)
    for d in report.layers:   # ("csr+bitmap": CSR with its bitmap, timed for inputs of <= 8 rows on a CPU)
        assert set(d.times_ms) <= {"dense", "csr", "csr+bitmap"}


def test_cache_makes_the_second_call_skip_measuring(tmp_path):
    net, x = _net()
    path = tmp_path / "cache.json"
    _, first = sk.sparsify(net, x, cache=path, reps=2, measure_model=False)
    assert path.exists() and not any(d.cached for d in first.layers)
    _, second = sk.sparsify(net, x, cache=path, reps=2, measure_model=False)
    assert all(d.cached for d in second.layers)
    assert [d.times_ms for d in first.layers] == [d.times_ms for d in second.layers]
    assert len(TuningCache(path).entries) == 2


def test_a_candidate_failing_at_run_time_is_not_cached(tmp_path, monkeypatch):
    # a RuntimeError (out of memory, say) may not happen again: that measurement is not remembered
    net, x = _net()
    path = tmp_path / "cache.json"
    plain = sk.nn.SparseLinear.forward

    def flaky(self, inp):
        if self.format == "csr":
            raise RuntimeError("out of memory")
        return plain(self, inp)

    monkeypatch.setattr(sk.nn.SparseLinear, "forward", flaky)
    _, first = sk.sparsify(net, x, cache=path, reps=2, measure_model=False)
    fc1 = next(d for d in first.layers if d.name == "fc1")
    assert "csr" not in fc1.times_ms and "not cached: a candidate failed at run time" in fc1.notes
    monkeypatch.setattr(sk.nn.SparseLinear, "forward", plain)
    _, second = sk.sparsify(net, x, cache=path, reps=2, measure_model=False)
    fc1 = next(d for d in second.layers if d.name == "fc1")
    assert not fc1.cached and "csr" in fc1.times_ms
    assert next(d for d in second.layers if d.name == "conv").cached     # (the conv's candidates all ran)


def test_masked_model_from_the_pruner():
    model = sk.models.FFN(dim=64, hidden=128, tokens=4).eval()
    x = model.example_input(2)
    pruner = sk.prune.Pruner(model, x, criterion="magnitude", granularity="block", block=(16, 16), sparsity=0.8)
    pruner.step()
    fast, report = sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    assert isinstance(fast.fc1, SparseLinear) and isinstance(fast.fc2, SparseLinear)
    sk.verify(model, fast, x, atol=1e-4)
    assert hasattr(model.fc1, "parametrizations")   # the user's masked model is intact


def test_sparsified_model_trains_like_the_masked_dense_model():
    net, x = _net()
    fast, _ = sk.sparsify(net, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=2,
                          measure_model=False, exact=True)
    masks = {n: m.weight.ne(0) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    ref = copy.deepcopy(net)
    opt_f = torch.optim.SGD(fast.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05)
    target = torch.randint(0, 10, (4,))
    for _ in range(3):
        for model, opt in ((fast, opt_f), (ref, opt_r)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
        with torch.no_grad():
            for n, mask in masks.items():
                ref.get_submodule(n).weight.mul_(mask)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)


def test_exact_excludes_formats_storing_zeros():
    net, x = _net()   # fc1 is masked in 16x16 blocks: 32x32 blocks and 1x4 rows over them are exact, 64x64 not
    _, report = sk.sparsify(net, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=2,
                            measure_model=False, exact=True, blocks=[(16, 16), (32, 32), (1, 4)])
    fc1 = next(d for d in report.layers if d.name == "fc1")
    assert "bsr16x16" in fc1.times_ms and "bsr1x4" in fc1.times_ms and "bsr32x32" not in fc1.times_ms


def test_compile_fullgraph_and_export():
    net, x = _net()
    fast, _ = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), fast(x))
    exported = torch.export.export(fast, (x,))
    torch.testing.assert_close(exported.module()(x), fast(x))
    assert any("sparsekit" in str(n.target) for n in exported.graph.nodes)


def test_save_and_load_round_trip(tmp_path):
    net, x = _net()
    fast, _ = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    out = sk.save(fast, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "sparsekit.json").is_file()
    loaded = sk.load(out, Net())
    assert type(loaded.fc1) is type(fast.fc1) and loaded.fc1.format == fast.fc1.format
    torch.testing.assert_close(loaded(x), fast(x))


def test_load_into_a_meta_skeleton_allocates_no_dense_weight(tmp_path):
    net, x = _net()
    fast, _ = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    out = sk.save(fast, tmp_path / "m")
    with torch.device("meta"):
        skeleton = Net()
    loaded = sk.load(out, skeleton)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    torch.testing.assert_close(loaded(x), fast(x))


def test_load_drops_a_backend_that_cannot_run_here(tmp_path, monkeypatch):
    lin = nn.Linear(32, 16)
    _block_mask_(lin, 0.5)
    model = nn.Sequential(SparseLinear.from_dense(lin, format="bsr", block=16, backend="reference"))
    out = sk.save(model, tmp_path / "m")
    spec = (out / "sparsekit.json").read_text().replace('"reference"', '"triton"')
    (out / "sparsekit.json").write_text(spec)
    monkeypatch.setattr(sk.ops.BACKENDS["triton"], "environment_reasons", lambda: ["no triton on this machine"])
    with pytest.warns(RuntimeWarning, match="cannot run here"):
        loaded = sk.load(out, nn.Sequential(nn.Linear(32, 16)))
    assert loaded[0].backend is None


def test_bad_input(tmp_path):
    net, x = _net()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sk.sparsify("net", x)
    with pytest.raises(ValueError, match="formats must be"):
        sk.sparsify(net, x, formats=["coo"])
    with pytest.raises(ValueError, match="min_speedup"):
        sk.sparsify(net, x, min_speedup=0)
    with pytest.raises(TypeError, match="cache must be"):
        sk.sparsify(net, x, cache=3.5)
    with pytest.raises(FileNotFoundError, match="written by sparsekit.save"):
        sk.load(tmp_path, Net())
    model = sk.models.FFN(dim=64, hidden=128, tokens=4)
    sk.prune.Pruner(model, model.example_input(2), sparsity=0.5).step()
    with pytest.raises(ValueError, match="bake them first"):
        sk.save(model, tmp_path / "masked")


def test_sparsify_command(tmp_path, capsys):
    from sparsekit.cli import main

    model = sk.models.FFN(dim=64, hidden=128, tokens=4)
    _block_mask_(model.fc1, 0.2)
    src = tmp_path / "ffn.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    kwargs = '{"dim": 64, "hidden": 128, "tokens": 4}'
    assert main(["sparsify", str(src), "--model", "ffn", "--model-kwargs", kwargs, "--batch", "2",
                 "--out", str(tmp_path / "out"), "--min-speedup", "0.000001"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "saved to" in out
    loaded = sk.load(tmp_path / "out", sk.models.FFN(dim=64, hidden=128, tokens=4))
    assert isinstance(loaded.fc1, SparseLinear)
    x = model.example_input(2)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="--model"):
        main(["sparsify", str(src), "--model", "nosuchmodel", "--out", str(tmp_path / "o2")])


@pytest.mark.skipif(not _extension.LOADED, reason="the CPU kernels' instruction set is reported by sparsekit._C")
def test_tuning_key_names_the_cpu_kernel_isa(monkeypatch):
    """Decisions measured with other CPU kernels (SPARSEKIT_CPU_ISA lowered, AMX on or off) are not reused."""
    from sparsekit.tuning_cache import device_name

    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "scalar")
    scalar = device_name(torch.device("cpu"))
    monkeypatch.delenv("SPARSEKIT_CPU_ISA")
    best = device_name(torch.device("cpu"))
    assert scalar.endswith(":scalar")
    assert best.endswith(":" + torch.ops.sparsekit.cpu_kernel_isa())
    if torch.ops.sparsekit.cpu_kernel_isa() != "scalar":
        assert scalar != best


# ----------------------------------------------------------------------------- audit regressions (issue 8)
def _reflect_or_zeros_conv(mode: str) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, padding_mode=mode)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.7)
    return nn.Sequential(conv)


def test_cached_decision_is_not_reused_for_a_reflect_padded_conv():
    """padding_mode (and bias) are in the cache key: a zero-padded conv's decision does not apply."""
    cache, x = TuningCache(None), torch.randn(2, 16, 9, 10)
    fast, _ = sk.sparsify(_reflect_or_zeros_conv("zeros"), x, min_speedup=1e-9, cache=cache, reps=2,
                          measure_model=False)
    assert isinstance(fast[0], SparseConv2d)
    model = _reflect_or_zeros_conv("reflect")
    fast, report = sk.sparsify(model, x, min_speedup=1e-9, cache=cache, reps=2, measure_model=False)
    (d,) = report.layers
    assert not d.cached and d.choice == "dense" and isinstance(fast[0], nn.Conv2d)
    assert any("padding_mode" in n for n in d.notes)
    torch.testing.assert_close(fast(x), model(x))


def test_a_cached_choice_that_cannot_be_built_falls_back_to_dense(monkeypatch):
    net, x = _net()
    cache = TuningCache(None)
    sk.sparsify(net, x, formats=["dense", "csr"], min_speedup=1e-9, cache=cache, reps=2, measure_model=False)

    def broken(*args, **kwargs):
        raise ValueError("cannot build this here")

    monkeypatch.setattr(SparseLinear, "from_dense", classmethod(broken))
    fast, report = sk.sparsify(net, x, formats=["dense", "csr"], min_speedup=1e-9, cache=cache, reps=2,
                               measure_model=False)
    fc1 = next(d for d in report.layers if d.name == "fc1")
    assert fc1.cached and fc1.choice == "dense" and fc1.speedup == 1.0
    assert any("could not be built" in n and "cannot build this here" in n for n in fc1.notes)
    assert type(fast.fc1) is nn.Linear and isinstance(fast.conv, SparseConv2d)
    sk.verify(net, fast, x, atol=1e-4)


def test_whole_model_baseline_is_a_plain_dense_copy_and_the_model_is_not_run(monkeypatch):
    """A train-mode model keeps its BatchNorm statistics; the pruner's parametrizations are baked in the
    baseline (not timed); with inplace=True the baseline is taken before the layers are swapped."""
    sparsify_mod = importlib.import_module("sparsekit.sparsify")   # (sk.sparsify is the function)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64)).train()
    x = torch.randn(16, 64)
    sk.prune.Pruner(model, x, criterion="magnitude", granularity="block", block=(16, 16), sparsity=0.8).step()
    stats = model[1].running_mean.clone()
    bases, calls = [], []
    real = sparsify_mod._dense_baseline

    def spy(m):
        bases.append(real(m))
        bases[-1].register_forward_pre_hook(lambda *_: calls.append(1))
        return bases[-1]

    monkeypatch.setattr(sparsify_mod, "_dense_baseline", spy)
    fast, report = sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=2)
    assert model.training and torch.equal(model[1].running_mean, stats) and int(model[1].num_batches_tracked) == 0
    assert hasattr(model[0], "parametrizations")   # the user's masked model is intact
    (base,) = bases
    assert calls and report.dense_ms > 0 and not base.training
    assert all(type(base[i]) is nn.Linear for i in (0, 3))   # plain: no parametrization left to time
    model.eval()
    torch.testing.assert_close(base(x), model(x))

    bases.clear()
    target = copy.deepcopy(model)
    fast, report = sk.sparsify(target, x, min_speedup=1e-9, cache=False, reps=2, inplace=True)
    assert fast is target and isinstance(target[0], SparseLinear)
    (base,) = bases
    assert type(base[0]) is nn.Linear and type(base[3]) is nn.Linear   # not the swapped (sparse) layers
    torch.testing.assert_close(base(x), model(x))


def test_an_already_sparsified_model_is_measured_again(tmp_path):
    """sk.load -> sk.sparsify on another machine re-selects: Sparse* layers become dense candidates again."""
    net, x = _net()
    fast, _ = sk.sparsify(net, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=2,
                          measure_model=False)
    loaded = sk.load(sk.save(fast, tmp_path / "m"), Net())
    again, report = sk.sparsify(loaded, x, formats=["dense", "csr"], min_speedup=1e-9, cache=False, reps=2)
    assert [d.name for d in report.layers] == ["conv", "fc1"]
    assert all(d.choice in ("csr", "csr+bitmap") and "dense" in d.times_ms for d in report.layers)
    assert again.fc1.format == "csr" and again.conv.format == "csr"
    assert loaded.fc1.format == "bsr"   # inplace=False: the loaded model is unchanged
    sk.verify(net, again, x, atol=1e-4)
    dense, report = sk.sparsify(loaded, x, min_speedup=1e9, cache=False, reps=2, measure_model=False)
    assert type(dense.fc1) is nn.Linear and type(dense.conv) is nn.Conv2d
    sk.verify(net, dense, x, atol=1e-4)


def test_every_fitting_nm_pattern_is_offered_sparsest_first():
    w = torch.zeros(64, 128)
    w[:, ::4] = torch.randn(64, 32)
    assert pattern_stats(w, DEFAULT_BLOCKS)["nm"] == ["1:4", "2:4", "4:8"]
    lin = nn.Linear(128, 64)
    lin.weight.data.copy_(w)
    x = torch.randn(8, 128)
    _, report = sk.sparsify(nn.Sequential(lin), x, formats=["dense", "nm"], cache=False, reps=2,
                            measure_model=False)
    assert {"nm1:4", "nm2:4", "nm4:8"} <= set(report.layers[0].times_ms)
    assert "n:m 1:4" in report.layers[0].pattern
    _, report = sk.sparsify(nn.Sequential(lin), x, formats=["dense", "nm"], cache=False, reps=2,
                            measure_model=False, exact=True)
    assert set(report.layers[0].times_ms) == {"dense", "nm1:4"}


def test_report_table_shows_the_pattern():
    net, x = _net()
    _, report = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    lines = str(report).splitlines()
    assert "pattern" in lines[1]
    for d in report.layers:
        assert d.pattern and any(line.startswith(d.name) and d.pattern in line for line in lines[2:])
        assert d.backend is not None   # what ran the chosen format here


def test_channel_candidate_is_offered_for_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 64, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(64, 1, 1, 1) > 0.75)
    x = torch.randn(2, 16, 8, 8)
    fast, report = sk.sparsify(nn.Sequential(conv), x, formats=["dense", "channel"], min_speedup=1e-9, cache=False,
                               reps=2, measure_model=False)
    assert "channel" in report.layers[0].times_ms and report.layers[0].choice == "channel"
    assert isinstance(fast[0], SparseConv2d) and fast[0].format == "channel"
    torch.testing.assert_close(fast(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"min_speedup": float("nan")}, ValueError, "min_speedup must be a positive finite number, got nan"),
    ({"min_speedup": float("inf")}, ValueError, "min_speedup"),
    ({"formats": []}, ValueError, "formats must be a non-empty list"),
    ({"backend": "nosuch"}, ValueError, r"backend must be one of \['cpu', 'cuda', .*got 'nosuch'"),
    ({"reps": 0}, ValueError, "reps must be a positive int"),
    ({"blocks": [(True, True)]}, ValueError, r"blocks must be pairs of ints in \[1, 128\], got \(True, True\)"),
    ({"blocks": [4]}, ValueError, "blocks must be pairs"),
    ({"exact": "no"}, TypeError, "exact must be a bool"),
    ({"example_inputs": torch.randn(4, 15, 8, 8)}, ValueError, "example_inputs: the model failed to run"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    net, x = _net()
    args = {"model": net, "example_inputs": x, "cache": False, "reps": 2, "measure_model": False, **kwargs}
    with pytest.raises(error, match=match) as info:
        sk.sparsify(**args)
    if "example_inputs" in kwargs:
        assert isinstance(info.value.__cause__, RuntimeError)   # the model's own error is chained


def test_formats_may_be_any_iterable_and_meta_models_are_rejected():
    net, x = _net()
    _, report = sk.sparsify(net, x, formats=(f for f in ["dense", "csr"]), min_speedup=1e-9, cache=False, reps=2,
                            measure_model=False)
    assert all(d.choice in ("csr", "csr+bitmap") for d in report.layers)   # the generator was not used up
    with torch.device("meta"):
        meta = Net()
    with pytest.raises(ValueError, match="meta device"):
        sk.sparsify(meta, x, cache=False)


def test_layers_kept_dense_are_baked_plain_layers_and_the_model_saves(tmp_path):
    """A masked layer sparsify keeps dense must not keep its mask parametrization (it was timed as a plain
    dense layer, and sk.save refuses masked models); with exact=True it keeps the mask (its zeros stay through
    fine-tuning)."""
    from sparsekit.prune import masks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64)
    sk.prune.Pruner(model, x, criterion="magnitude", granularity="element", sparsity=0.5).step()
    fast, report = sk.sparsify(model, x, cache=False, min_speedup=1e9, reps=1, measure_model=False)
    assert {d.choice for d in report.layers} == {"dense"}
    assert not any(masks.is_masked(m) for m in fast.modules())
    assert type(fast[0]) is nn.Linear and type(fast[2]) is nn.Linear
    torch.testing.assert_close(fast(x), model(x))
    sk.save(fast, tmp_path / "m")                                  # raised "bake them first" before
    assert masks.is_masked(model[0])                               # the user's model keeps its masks
    exact, _ = sk.sparsify(model, x, cache=False, min_speedup=1e9, reps=1, measure_model=False, exact=True)
    assert masks.is_masked(exact[0]) and masks.is_masked(exact[2])


def test_report_records_the_backend_that_ran_each_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight[:48] = 0
    model = nn.Sequential(lin).eval()
    _, report = sk.sparsify(model, torch.randn(4, 64), cache=False, min_speedup=1e-9, reps=1,
                            measure_model=False, formats=["dense", "csr"], backend="reference")
    assert [d.backend for d in report.layers] == ["reference"]


def _masked_linear():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        m[0].weight.mul_(torch.rand(64, 64) > 0.8)
    return m, torch.randn(8, 64)


def test_sparsify_picks_the_fastest_candidate(monkeypatch):
    S = importlib.import_module("sparsekit.sparsify")   # (the package attribute sparsekit.sparsify is the function)

    def fake(fns, **kw):
        t = {k: 10.0 for k in fns}
        t["dense"] = 10.0
        if "csr" in t:
            t["csr"] = 1.0
        return t
    monkeypatch.setattr(S, "interleaved_median_ms", fake)
    m, x = _masked_linear()
    _, rep = sk.sparsify(m, x, formats=["dense", "bsr", "csr"], blocks=[(1, 4)], min_speedup=1.1, cache=False,
                         reps=1, measure_model=False)
    assert rep.layers[0].choice == "csr"


def test_cache_key_separates_dtypes():
    m, x = _masked_linear()
    cache = TuningCache(None)
    sk.sparsify(m, x, min_speedup=1e-9, cache=cache, reps=2, measure_model=False)
    _, rep = sk.sparsify(copy.deepcopy(m).double(), x.double(), min_speedup=1e-9, cache=cache, reps=2,
                         measure_model=False)
    assert not rep.layers[0].cached


def test_cache_key_separates_code_revisions(monkeypatch):
    """A decision measured under other kernels (an upgrade, a rebuild) is measured again, not reused."""
    sparsify_module = importlib.import_module("sparsekit.sparsify")   # the module (sk.sparsify is the function)
    m, x = _masked_linear()
    cache = TuningCache(None)
    monkeypatch.setattr(sparsify_module, "code_revision", lambda: "before")
    sk.sparsify(m, x, min_speedup=1e-9, cache=cache, reps=2, measure_model=False)
    _, again = sk.sparsify(m, x, min_speedup=1e-9, cache=cache, reps=2, measure_model=False)
    assert again.layers[0].cached
    monkeypatch.setattr(sparsify_module, "code_revision", lambda: "after")
    _, rep = sk.sparsify(m, x, min_speedup=1e-9, cache=cache, reps=2, measure_model=False)
    assert not rep.layers[0].cached


def test_code_revision_follows_the_sources(tmp_path, monkeypatch):
    from sparsekit import tuning_cache

    tuning_cache.code_revision.cache_clear()
    first = tuning_cache.code_revision()
    assert first == tuning_cache.code_revision() and len(first) == 12
    fake_init = tmp_path / "__init__.py"
    fake_init.write_text("")
    monkeypatch.setattr(tuning_cache, "__file__", str(tmp_path / "tuning_cache.py"))
    tuning_cache.code_revision.cache_clear()
    try:
        alone = tuning_cache.code_revision()
        fake_init.write_text("# changed")
        tuning_cache.code_revision.cache_clear()
        assert tuning_cache.code_revision() != alone
    finally:
        tuning_cache.code_revision.cache_clear()


class StridedDilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, dilation=2)

    def forward(self, x):
        return self.conv(x)


def test_save_load_keeps_conv_geometry(tmp_path):
    torch.manual_seed(0)
    net = StridedDilated()
    with torch.no_grad():
        net.conv.weight.mul_(torch.rand_like(net.conv.weight) > 0.7)
    x = torch.randn(2, 16, 11, 11)
    fast, _ = sk.sparsify(net, x, formats=["csr"], min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert isinstance(fast.conv, SparseConv2d)
    loaded = sk.load(sk.save(fast, tmp_path / "m"), StridedDilated())
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)


def test_report_says_why_sparse_layers_stayed_dense():
    """The "pruned but not faster" case: the printed report counts the sparse layers kept dense and, for single
    zeros, names the patterns that would pay off; it says nothing when every sparse layer got a format. The
    patterns are described as sparsify describes real weights."""
    from sparsekit.sparsify import LayerDecision, SparsifyReport, _describe, _scattered

    g = torch.Generator().manual_seed(0)

    def pattern(mask):
        return pattern_stats(torch.randn(64, 64, generator=g) * mask, DEFAULT_BLOCKS)

    scattered = {s: pattern(torch.rand(64, 64, generator=g) >= s) for s in (0.5, 0.9)}
    blocks = pattern((torch.rand(2, 2, generator=g) >= 0.5).repeat_interleave(32, 0).repeat_interleave(32, 1))
    assert _describe(scattered[0.5]).startswith("unstructured") and _describe(scattered[0.9]).startswith("blocks 1x4:")
    assert "32x32" in _describe(blocks)

    def layer(name, sparsity, stats, choice):
        if isinstance(stats, str):
            return LayerDecision(name, "linear", (64, 64), (8, 64), sparsity, stats, {"dense": 1.0}, choice, 1.0)
        return LayerDecision(name, "linear", (64, 64), (8, 64), sparsity, _describe(stats),
                             {"dense": 1.0, "csr": 1.3}, choice, 1.0, scattered=_scattered(stats))

    report = SparsifyReport([layer("a", 0.5, scattered[0.5], "dense"), layer("b", 0.9, scattered[0.9], "dense"),
                             layer("c", 0.5, blocks, "bsr32x32"), layer("d", 0.0, "dense", "dense")],
                            "cpu", "torch.float32", 1.1)
    text = str(report)
    assert "2 of 3 layers with zeros stayed dense: no candidate format was >= 1.1x faster" in text
    assert "2 of them hold single zeros (up to 90%)" in text and "granularity='block'" in text
    blocky = SparsifyReport([layer("a", 0.5, blocks, "dense")], "cpu", "torch.float32", 1.1)
    assert "stayed dense" in str(blocky) and "single zeros" not in str(blocky)
    assert "stayed dense" not in str(SparsifyReport([layer("c", 0.5, blocks, "bsr32x32")], "cpu", "x", 1.1))


def test_keyword_example_inputs_like_the_pruner_and_verify():
    """A dict of keyword args (Hugging Face style) is accepted as example_inputs, as by Pruner and verify."""
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, input_ids=None, scale=1.0):
            return self.lin(input_ids) * scale

    torch.manual_seed(0)
    model = Keyword().eval()
    with torch.no_grad():
        model.lin.weight.mul_(torch.rand(64, 64) < 0.1)
    inputs = {"input_ids": torch.randn(4, 64), "scale": 2.0}
    fast, report = sk.sparsify(model, inputs, formats=["csr"], min_speedup=1e-9, cache=False, reps=1)
    assert [r.choice[:3] for r in report.layers] == ["csr"] and report.dense_ms > 0 and report.sparse_ms > 0
    sk.verify(model, fast, inputs)
    with pytest.raises(ValueError, match="a dict of keyword args"):
        sk.sparsify(model, {"wrong_name": torch.randn(4, 64)}, cache=False, reps=1)


@pytest.mark.parametrize("exact", [False, True])
def test_the_baseline_bakes_every_mask_it_carries(exact, monkeypatch):
    """Masks beyond the swapped layers (a norm, attention's packed in_proj_weight) are baked in the baseline's own
    tensors, so the whole-model speedup is not sparsify's for mask work the result never does; the user's model
    keeps its masks and values, and the returned model is timed as it is (exact=True keeps its masks)."""
    from torch.nn.utils import parametrize

    sparsify_mod = importlib.import_module("sparsekit.sparsify")
    torch.manual_seed(0)


    class Block(nn.Sequential):
        def forward(self, x):
            h = self[1](self[0](x))
            return self[2](h, h, h)[0]

    model = Block(nn.Linear(32, 64), nn.LayerNorm(64), nn.MultiheadAttention(64, 4, batch_first=True)).eval()
    attn = model[2]
    _block_mask_(model[0], 0.5)
    sk.prune.masks.apply_tensor_mask(model[1], "weight", torch.rand(64) > 0.3)
    sk.prune.masks.apply_tensor_mask(attn, "in_proj_weight", torch.rand(192, 64) > 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bases = []
    real = sparsify_mod._dense_baseline
    monkeypatch.setattr(sparsify_mod, "_dense_baseline", lambda m: bases.append(real(m)) or bases[-1])
    x = torch.randn(2, 5, 32)
    sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=2, exact=exact)
    (base,) = bases
    assert not any(parametrize.is_parametrized(m) for m in base.modules())
    assert type(base[1]) is nn.LayerNorm and type(base[2]) is nn.MultiheadAttention
    assert parametrize.is_parametrized(model[1], "weight") and parametrize.is_parametrized(attn, "in_proj_weight")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())    # nothing written into it
    torch.testing.assert_close(base(x), model(x))


def test_a_layer_registered_under_several_names_is_swapped_at_each():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    _block_mask_(lin, 0.2)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), lin).eval()
    x = torch.randn(4, 64)
    fast, report = sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=2)
    assert isinstance(fast[0], SparseLinear) and fast[0] is fast[2] is fast[4]
    (d,) = report.layers
    assert "the same module as 2, 4" in d.notes
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_tied_weights_stay_dense_and_tied():
    torch.manual_seed(0)
    enc, dec = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
    _block_mask_(enc, 0.2)
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.ReLU(), dec).eval()
    fast, report = sk.sparsify(model, torch.randn(4, 64), min_speedup=1e-9, cache=False, reps=2)
    assert type(fast[0]) is nn.Linear and fast[0].weight is fast[2].weight
    assert all(any("weight tied to" in n for n in d.notes) for d in report.layers)
    assert all(list(d.times_ms) == ["dense"] for d in report.layers)     # no candidate was timed for nothing


def test_an_attention_registered_under_two_names_stays_one_module():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = self.b = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            h = self.a(x, x, x)[0]
            return self.b(h, h, h)[0]

    model = Twice().eval()
    with torch.no_grad():
        for w in (model.a.in_proj_weight, model.a.out_proj.weight):
            w.mul_(torch.rand_like(w) > 0.8)
    x = torch.randn(2, 6, 32)
    for min_speedup in (1e-9, 1e9):
        fast, _ = sk.sparsify(model, x, formats=["dense", "csr"], min_speedup=min_speedup, cache=False, reps=2,
                              measure_model=False)
        assert fast.a is fast.b
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_an_unwritable_or_directory_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch):
    net, x = _net()
    fast, _ = sk.sparsify(net, x, min_speedup=1e-9, cache=tmp_path, reps=2)    # a directory: its sparsify.json
    assert (tmp_path / "sparsify.json").is_file() and isinstance(fast.fc1, SparseLinear)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="could not be written"):
        fast, _ = sk.sparsify(net, x, min_speedup=1e-9, cache=blocker / "sub" / "c.json", reps=2)
    assert isinstance(fast.fc1, SparseLinear)
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(tmp_path / "env"))      # read per call
    sk.sparsify(net, x, min_speedup=1e-9, cache=None, reps=2)
    assert (tmp_path / "env" / "sparsify.json").is_file()


def test_cache_key_names_the_kernel_switches(monkeypatch):
    from sparsekit.tuning_cache import kernel_switches

    monkeypatch.delenv("SPARSEKIT_BSR_TC", raising=False)
    off = kernel_switches(torch.device("cpu"))
    monkeypatch.setenv("SPARSEKIT_BSR_TC", "0")
    on = kernel_switches(torch.device("cpu"))
    assert on != off and on["SPARSEKIT_BSR_TC"] == "0" and "measure" in on


def test_save_and_load_a_shared_layer_and_a_bare_sparse_layer(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    _block_mask_(lin, 0.2)
    x = torch.randn(4, 64)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.Linear(64, 64)
            self.layers = nn.ModuleList([layer, layer, layer])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Shared().eval()
    model.layers[0].load_state_dict(lin.state_dict())
    fast, _ = sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=2)
    sk.save(fast, tmp_path / "shared")
    back = sk.load(tmp_path / "shared", Shared().eval())
    assert isinstance(back.layers[1], SparseLinear) and back.layers[0] is back.layers[2]
    torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-4)

    bare = SparseLinear.from_dense(lin, format="csr")
    sk.save(bare, tmp_path / "bare")
    for skeleton in (nn.Linear(64, 64), bare):        # the dense layer it replaced, or its own class
        got = sk.load(tmp_path / "bare", skeleton)
        assert isinstance(got, SparseLinear) and got.format == "csr"
        torch.testing.assert_close(got(x), lin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="saved model was a SparseLinear"):
        sk.load(tmp_path / "bare", nn.Conv2d(3, 3, 1))


def _attention_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    sk.prune.masks.apply_tensor_mask(layer.self_attn, "in_proj_weight",
                                     torch.rand_like(layer.self_attn.in_proj_weight) > 0.9)
    return layer, torch.randn(2, 10, 64)


def test_a_loaded_model_gets_its_stock_attention_back_before_measuring(tmp_path):
    """An attention sparsify converted (to reach its projections) is packed back when the saved model is
    sparsified again, so stock vs converted is decided anew on this machine."""
    from sparsekit.prune.linear_mha import LinearMultiheadAttention

    layer, x = _attention_model()
    fast, _ = sk.sparsify(layer, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    if not isinstance(fast.self_attn, LinearMultiheadAttention):
        pytest.skip("the converted attention lost to the stock one on this machine even at min_speedup=1e-9")
    assert fast.self_attn.sparsify_converted
    fresh = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    loaded = sk.load(sk.save(fast, tmp_path / "m"), fresh)
    assert isinstance(loaded.self_attn, LinearMultiheadAttention) and loaded.self_attn.sparsify_converted
    again, _ = sk.sparsify(loaded, x, min_speedup=1e9, cache=False, reps=2, measure_model=False)
    assert type(again.self_attn) is nn.MultiheadAttention       # nothing beats dense: the stock module
    torch.testing.assert_close(again(x), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["stock", "kdim", "pruned"])
def test_linear_attention_to_stock_inverts_from_module(kind):
    from sparsekit.prune.linear_mha import LinearMultiheadAttention
    from sparsekit.prune.pruned_mha import PrunedMultiheadAttention

    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, bias=True, add_bias_kv=True, batch_first=True,
                                kdim=24 if kind == "kdim" else None, vdim=20 if kind == "kdim" else None).eval()
    if kind == "pruned":
        mha = PrunedMultiheadAttention.from_module(mha, torch.tensor([0, 2])).eval()
    q = torch.randn(2, 5, 32)
    kv = (torch.randn(2, 7, 24), torch.randn(2, 7, 20)) if kind == "kdim" else (q, q)
    back = LinearMultiheadAttention.from_module(mha).to_stock()
    assert type(back) is type(mha)
    assert (back.in_proj_weight is None) == (kind == "kdim")       # packed exactly when q, k, v share a width
    for got, ref in zip(back(q, *kv), mha(q, *kv)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    masked = LinearMultiheadAttention.from_module(mha)
    sk.prune.masks.apply_tensor_mask(masked.q_proj, "weight", torch.ones_like(masked.q_proj.weight, dtype=torch.bool))
    with pytest.raises(TypeError, match="plain nn.Linear projections"):
        masked.to_stock()


class _ScaledLinear(nn.Linear):
    """A subclass with a forward of its own: its sparse twin would drop the scale."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_a_subclass_with_its_own_forward_stays_dense_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledLinear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    for lin in (model[0], model[2]):
        _block_mask_(lin, 0.2)
    x = torch.randn(4, 64)
    fast, report = sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert type(fast[0]) is _ScaledLinear and isinstance(fast[2], SparseLinear)
    first = next(d for d in report.layers if d.name == "0")
    assert first.choice == "dense" and list(first.times_ms) == ["dense"]
    assert any(n.startswith("_ScaledLinear overrides nn.Linear.forward: kept dense") for n in first.notes)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


class _MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: nn.Linear's function written out (x @ W^T + b), nothing of its own."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _LoraLinear(nn.Linear):
    """loralib-style: an adapter of its own, zero at the start (equal to nn.Linear only until it trains)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(4, n)), nn.Parameter(torch.zeros(n, 4))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


class _GainLinear(nn.Linear):
    """A plain attribute of its own that the forward reads (1.0 now, set otherwise later)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        self.gain = 1.0

    def forward(self, x):
        return super().forward(x) * self.gain


def test_a_subclass_that_computes_the_stock_function_is_sparsified():
    """A forward of its own that gives the stock output on the layer's real input, with no state of its own, runs
    as the stock layer (Falcon's Linears); one with an adapter or an attribute of its own stays dense, as does one
    whose output differs (the scaled one)."""
    torch.manual_seed(0)
    model = nn.Sequential(_MatmulLinear(64, 64), _LoraLinear(64), _GainLinear(64), _ScaledLinear(64, 64)).eval()
    for lin in model:
        _block_mask_(lin, 0.2)
    x = torch.randn(4, 64)
    ref = model(x).detach()
    fast, report = sk.sparsify(model, x, min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert isinstance(fast[0], SparseLinear) and [type(m) for m in fast[1:]] == [_LoraLinear, _GainLinear,
                                                                                  _ScaledLinear]
    first = next(d for d in report.layers if d.name == "0")
    assert any("_MatmulLinear overrides its forward but holds nothing of its own" in n for n in first.notes)
    torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4)
    from sparsekit._stock_layers import acts_as_stock
    assert acts_as_stock(_MatmulLinear(8, 8), torch.randn(3, 8))
    assert not acts_as_stock(_MatmulLinear(8, 8), torch.randn(3, 7))     # does not run on it


def test_candidates_are_checked_against_the_layer_itself():
    from sparsekit.sparsify import _measure

    torch.manual_seed(0)
    layer = _ScaledLinear(64, 64).eval()
    _block_mask_(layer, 0.2)
    notes: list[str] = []
    times, built, _ = _measure(layer, torch.randn(4, 64), {"csr": lambda: SparseLinear.from_dense(layer, "csr")},
                               1, notes)
    assert list(built) == ["dense"] and notes == ["csr skipped: output differs from the dense layer's"]


def test_hooks_stay_on_the_chosen_layer_and_do_not_run_while_measuring():
    net, x = _net()
    calls = []
    net.fc1.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    fast, _ = sk.sparsify(net, x, min_speedup=1e-9, cache=False, reps=2, measure_model=False)
    assert isinstance(fast.fc1, SparseLinear)
    assert calls == ["Linear"]          # the one run that captures each layer's input
    fast(x)
    assert calls == ["Linear", "SparseLinear"]


def test_a_bare_layer_is_refused_and_hf_conv1d_layers_are_noted():
    lin = nn.Linear(64, 64)
    _block_mask_(lin, 0.2)
    with pytest.raises(ValueError, match=r"model must contain the layers to sparsify, got a bare Linear; wrap it"):
        sk.sparsify(lin, torch.randn(4, 64), cache=False, reps=1)
    with pytest.raises(ValueError, match="got a bare SparseLinear"):
        sk.sparsify(SparseLinear.from_dense(lin, "csr"), torch.randn(4, 64), cache=False, reps=1)

    class Conv1D(nn.Module):      # transformers' Conv1D (recognised by name and layout): y = x @ W + b
        def __init__(self):
            super().__init__()
            self.nf, self.nx = 64, 64
            self.weight = nn.Parameter(torch.randn(64, 64))
            self.bias = nn.Parameter(torch.zeros(64))

        def forward(self, x):
            return x @ self.weight + self.bias

    model = nn.Sequential(Conv1D(), lin).eval()
    _, report = sk.sparsify(model, torch.randn(4, 64), min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert len(report.notes) == 1 and "1 Hugging Face Conv1D layer(s) left dense (0)" in report.notes[0]
    assert "sparsekit.nn.conv1d_to_linear(model)" in str(report)
