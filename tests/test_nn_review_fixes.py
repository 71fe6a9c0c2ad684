"""Review fixes in sparsekit.nn and the `sparsekit sparsify` command: converted modules keep the source's
train / eval mode, unbatched SparseConv2d input, shared and tied layers in convert_modules, dilation in the conv
reprs, constructor checks of weight / format / backend, checkpoint dtypes and clear CLI errors; then subclasses
with a forward of their own, torch.autocast, hooks, a failed load_state_dict, conv1d_to_linear and the argument
checks of convert_modules and the constructors."""

import copy

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.cli import main
from sparsekit.formats import BSR, CSR, NM, ChannelIndex
from sparsekit.nn import (
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseConvTranspose1d,
    SparseConvTranspose2d,
    SparseConvTranspose3d,
    SparseLinear,
    convert_modules,
)


def _zeroed(mod: nn.Module, seed: int = 0) -> nn.Module:
    """``mod`` with about half of its weight zeroed (every format converts it; n:m needs its own pattern)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        mod.weight.mul_(torch.rand_like(mod.weight) < 0.5)
    return mod


DENSE_LAYERS = [
    (SparseLinear, lambda: nn.Linear(8, 16)),
    (SparseConv1d, lambda: nn.Conv1d(4, 8, 3)),
    (SparseConv2d, lambda: nn.Conv2d(4, 8, 3)),
    (SparseConv3d, lambda: nn.Conv3d(4, 8, 3)),
    (SparseConvTranspose1d, lambda: nn.ConvTranspose1d(4, 8, 3)),
    (SparseConvTranspose2d, lambda: nn.ConvTranspose2d(4, 8, 3)),
    (SparseConvTranspose3d, lambda: nn.ConvTranspose3d(4, 8, 3)),
]


# ------------------------------------------------------------------------------------------- 1. train / eval
@pytest.mark.parametrize("cls, make", DENSE_LAYERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("format", ["csr", "dense"])
def test_from_dense_and_to_dense_keep_the_source_mode(cls, make, format):
    for training in (False, True):
        src = _zeroed(make()).train(training)
        sparse = cls.from_dense(src, format=format)
        assert sparse.training is training
        back = sparse.to_dense()
        assert type(back) is type(src) and back.training is training


def test_convert_modules_keeps_an_eval_model_in_eval():
    model = nn.Sequential(_zeroed(nn.Linear(8, 16)), nn.ReLU(), _zeroed(nn.Linear(16, 4), seed=1)).eval()
    convert_modules(model, format="csr")
    assert isinstance(model[0], SparseLinear) and not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------------- 2. unbatched SparseConv2d
@pytest.mark.parametrize("format", ["csr", "bsr", "channel", "dense"])
def test_sparse_conv2d_takes_unbatched_input(format):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    sparse = SparseConv2d.from_dense(conv, format=format, block=4)
    x = torch.randn(4, 6, 6)
    y = sparse(x)
    assert y.shape == (8, 6, 6)
    torch.testing.assert_close(y, conv(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\] or unbatched \[C, H, W\], got shape \(6, 6\)"):
        sparse(torch.randn(6, 6))


def test_unbatched_input_still_works_for_conv1d_and_conv3d():
    torch.manual_seed(0)
    c1, c3 = nn.Conv1d(4, 8, 3, padding=1), nn.Conv3d(2, 4, 3, padding=1)
    torch.testing.assert_close(SparseConv1d.from_dense(c1, format="csr")(x := torch.randn(4, 7)), c1(x),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(SparseConv3d.from_dense(c3, format="csr")(x := torch.randn(2, 3, 4, 5)), c3(x),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- 3. shared and tied convert_modules
class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        lin = _zeroed(nn.Linear(8, 8))
        self.layers = nn.ModuleList([lin] * 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_convert_modules_swaps_every_name_of_a_shared_layer():
    model = _Shared().eval()
    x = torch.randn(2, 8)
    want = model(x)
    convert_modules(model, format="csr")
    assert all(isinstance(layer, SparseLinear) for layer in model.layers)
    assert model.layers[0] is model.layers[1] is model.layers[2]     # still one layer
    assert model.sparsekit_skipped == {}
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_convert_modules_skip_of_one_name_keeps_a_shared_layer_dense_under_all():
    model = _Shared()
    convert_modules(model, format="csr", skip=("layers.1",))
    assert all(type(layer) is nn.Linear for layer in model.layers) and model.layers[0] is model.layers[2]


def test_convert_modules_lists_every_name_of_a_shared_layer_it_skips():
    model = _Shared()
    with torch.no_grad():
        model.layers[0].weight.fill_(1.0)
    convert_modules(model, format="csr")
    assert model.sparsekit_skipped == {f"layers.{i}": "no zeros" for i in range(3)}


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = _zeroed(nn.Linear(8, 8))
        self.dec = nn.Linear(8, 8)
        self.dec.weight = self.enc.weight
        self.other = _zeroed(nn.Linear(8, 8), seed=1)

    def forward(self, x):
        return self.other(self.dec(self.enc(x)))


def test_convert_modules_keeps_tied_weights_tied():
    model = _Tied()
    convert_modules(model, format="csr")
    assert type(model.enc) is nn.Linear and type(model.dec) is nn.Linear
    assert model.dec.weight is model.enc.weight
    assert isinstance(model.other, SparseLinear)
    assert set(model.sparsekit_skipped) == {"enc", "dec"}
    assert "tied to dec" in model.sparsekit_skipped["enc"] and "tied to enc" in model.sparsekit_skipped["dec"]


def test_convert_modules_keeps_a_head_tied_to_an_embedding_tied():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

    model = LM()
    with torch.no_grad():
        model.embed.weight[::2] = 0
    convert_modules(model, format="csr")
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert "tied to embed" in model.sparsekit_skipped["head"]


# ----------------------------------------------------------------------------------------------- 4. dilation
def test_conv_reprs_show_dilation_when_not_1():
    assert "dilation=(1, 2)" in repr(SparseConv1d.from_dense(_zeroed(nn.Conv1d(4, 8, 3, dilation=2)), format="csr"))
    assert "dilation=(2, 3)" in repr(SparseConv2d.from_dense(_zeroed(nn.Conv2d(4, 8, 3, dilation=(2, 3))),
                                                             format="csr"))
    assert "dilation=(2, 2, 2)" in repr(SparseConv3d.from_dense(_zeroed(nn.Conv3d(2, 4, 3, dilation=2)),
                                                                format="csr"))
    assert "dilation" not in repr(SparseConv2d.from_dense(_zeroed(nn.Conv2d(4, 8, 3)), format="csr"))


# ------------------------------------------------------------------------------- 5. constructor argument checks
def _formats(w2d):
    return {"bsr": BSR.from_dense(w2d, block=4), "csr": CSR.from_dense(w2d), "nm": NM.from_dense(NM.prune(w2d, 2, 4)),
            "channel": ChannelIndex.from_dense(w2d, dim=0), "dense": w2d}


@pytest.mark.parametrize("format", ["bsr", "csr", "nm", "channel", "dense"])
def test_constructors_check_the_weight_matches_the_format(format):
    torch.manual_seed(0)
    w2d = torch.randn(8, 16)
    given = _formats(w2d)
    for other, w in given.items():
        if other == format:
            continue
        with pytest.raises(TypeError, match=f"SparseLinear: weight must be .* for format='{format}', got "):
            SparseLinear(w, None, format)
        with pytest.raises(TypeError, match=f"SparseConv2d: weight must be .* for format='{format}', got "):
            SparseConv2d(w, None, format, 16, (1, 1))
        with pytest.raises(TypeError, match=f"SparseConvTranspose2d: weight must be .* for format='{format}'"):
            SparseConvTranspose2d(w, None, format, (1, 1))
    SparseLinear(given[format], None, format)    # the matching one is taken


def test_constructors_refuse_a_column_channel_index():
    with pytest.raises(ValueError, match="weight must be a ChannelIndex with dim=0"):
        SparseLinear(ChannelIndex.from_dense(torch.randn(8, 16), dim=1), None, "channel")


@pytest.mark.parametrize("cls, make", DENSE_LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_an_unknown_backend_is_refused_at_construction(cls, make):
    with pytest.raises(ValueError, match=f"{cls.__name__}: backend must be one of .* got 'cpuu'"):
        cls.from_dense(_zeroed(make()), format="csr", backend="cpuu")
    with pytest.raises(TypeError, match="backend must be a str or None, got int"):
        cls.from_dense(_zeroed(make()), format="csr", backend=1)
    assert cls.from_dense(_zeroed(make()), format="csr", backend="reference").backend == "reference"


def test_convert_modules_refuses_an_unknown_backend_instead_of_skipping_every_layer():
    model = nn.Sequential(_zeroed(nn.Linear(8, 16)))
    with pytest.raises(ValueError, match="convert_modules: backend must be one of .* got 'cpuu'"):
        convert_modules(model, format="csr", backend="cpuu")
    assert type(model[0]) is nn.Linear


# ------------------------------------------------------------------------------------------- 6. the CLI
def _mlp_checkpoint(tmp_path, dtype):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = sk.models.MLP(sizes=(16, 32, 8)).to(dtype)
    with torch.no_grad():
        for lin in (model.layers[0], model.fc):
            lin.weight.mul_(torch.rand_like(lin.weight.float()) < 0.2)
    path = tmp_path / "half.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparsify_command_keeps_the_checkpoint_dtype(tmp_path, dtype, capsys):
    path = _mlp_checkpoint(tmp_path, dtype)
    argv = ["sparsify", str(path), "--model", "mlp", "--model-kwargs", '{"sizes": [16, 32, 8]}', "--batch", "2",
            "--formats", "dense,csr", "--out", str(tmp_path / "o3")]
    assert main(argv) == 0
    assert str(dtype) in capsys.readouterr().out        # measured in it (the report names the dtype)
    loaded = sk.load(tmp_path / "o3", sk.models.MLP(sizes=(16, 32, 8)))
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {dtype}


def test_sparsify_command_keeps_a_mixed_checkpoint_per_tensor():
    from sparsekit.sparsify_command import _match_dtypes

    model = sk.models.MLP(sizes=(16, 32, 8))
    state = {k: v.to(torch.bfloat16) if k.endswith("weight") else v for k, v in model.state_dict().items()}
    fresh = sk.models.MLP(sizes=(16, 32, 8))
    _match_dtypes(fresh, state)
    fresh.load_state_dict(state)
    assert fresh.fc.weight.dtype == torch.bfloat16 and fresh.fc.bias.dtype == torch.float32


def _cli_files(tmp_path):
    whole, state = tmp_path / "whole.pt", tmp_path / "w.pt"
    torch.save(sk.models.MLP(sizes=(16, 8)), whole)      # the module pickled, not its state_dict
    torch.save(sk.models.MLP(sizes=(16, 8)).state_dict(), state)
    return {"missing": str(tmp_path / "missing.pt"), "whole": str(whole), "state": str(state)}


SIZES = ["--model-kwargs", '{"sizes": [16, 8]}']
BAD_CLI = [
    ("missing", ["--model", "mlp"], ["WEIGHTS", "missing.pt", "does not exist"]),
    ("whole", ["--model", "mlp"], ["WEIGHTS", "not a weights-only state_dict", "state_dict()"]),
    ("state", ["--model", ":Foo"], ["--model ':Foo' could not be imported"]),
    ("state", ["--model", "mlp", "--model-kwargs", '{"nope": 1}'], ["--model 'mlp' with --model-kwargs", "nope"]),
    ("state", ["--model", "torch.nn:Linear", "--model-kwargs", '{"nope": 1}'],
     ["--model 'torch.nn:Linear' with --model-kwargs"]),
    ("state", ["--model", "mlp", "--model-kwargs", '{"sizes": [16, 4]}'], ["does not fit --model", "size mismatch"]),
    *[("state", ["--model", "mlp", *SIZES, "--input-shape", shape], ["--input-shape must be comma-separated positive"])
      for shape in ("4,-1", "4,0", "4,x", ",")],
]


@pytest.mark.parametrize("weights, words, said", BAD_CLI, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_sparsify_command_bad_inputs_exit_with_a_message(tmp_path, capsys, weights, words, said):
    argv = ["sparsify", _cli_files(tmp_path)[weights], *words, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = f"{info.value.code}"
    assert "Traceback" not in message + capsys.readouterr().err
    for part in said:
        assert part in message, (part, message)


# --------------------------------------------------------------------- 7. subclasses with their own forward
class _StdConv2d(nn.Conv2d):
    """timm-style weight standardisation: the conv's own computation, not nn.Conv2d's."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-6)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class _PaddedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):      # (the stock forward calls it)
        return super()._conv_forward(nn.functional.pad(x, (1, 1, 1, 1)), weight, bias)


class _Renamed(nn.Linear):
    """A subclass that keeps nn.Linear's forward: converted like one."""


def test_convert_modules_keeps_a_subclass_with_its_own_forward_dense():
    torch.manual_seed(0)
    model = nn.Sequential(_zeroed(_StdConv2d(4, 4, 3, padding=1)), _zeroed(_PaddedConv(4, 4, 3)), nn.Flatten(),
                          _zeroed(_ScaledLinear(64, 8)), _zeroed(_Renamed(8, 8))).eval()
    x = torch.randn(2, 4, 4, 4)
    want = model(x)
    convert_modules(model, format="csr")
    assert [type(m) for m in model[:4]] == [_StdConv2d, _PaddedConv, nn.Flatten, _ScaledLinear]
    assert isinstance(model[4], SparseLinear)
    assert model.sparsekit_skipped["0"].startswith("_StdConv2d overrides nn.Conv2d.forward: kept dense")
    assert model.sparsekit_skipped["1"].startswith("_PaddedConv overrides nn.Conv2d._conv_forward")
    assert model.sparsekit_skipped["3"].startswith("_ScaledLinear overrides nn.Linear.forward")
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_a_masked_plain_layer_still_converts():
    # (parametrize's class derives from nn.Linear without a forward of its own)
    model = nn.Sequential(nn.Linear(8, 8))
    sk.prune.masks.apply_tensor_mask(model[0], "weight", torch.rand(8, 8) < 0.5)
    convert_modules(model, format="csr")
    assert isinstance(model[0], SparseLinear) and model.sparsekit_skipped == {}


# ------------------------------------------------------------------------------------------- 8. autocast
AUTOCAST = {   # the sparse layer's dense original, its class, the dense layer before it (autocast hands on bf16), x
    "linear": (lambda: nn.Linear(16, 8), SparseLinear, lambda: nn.Linear(16, 16), (4, 16)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1), SparseConv2d, lambda: nn.Conv2d(4, 4, 1), (2, 4, 6, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 8, 3, stride=2), SparseConvTranspose2d,
                         lambda: nn.Conv2d(4, 4, 1), (2, 4, 5, 5)),
}


@pytest.mark.parametrize("format", ["csr", "bsr", "dense"])
@pytest.mark.parametrize("kind", list(AUTOCAST))
def test_sparse_layers_run_under_cpu_autocast_like_dense_ones(format, kind):
    make, cls, make_first, shape = AUTOCAST[kind]
    torch.manual_seed(0)
    dense = nn.Sequential(make_first(), _zeroed(make()))
    sparse = nn.Sequential(copy.deepcopy(dense[0]), cls.from_dense(dense[1], format=format, block=2))
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = dense(x), sparse(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    got.float().sum().backward()
    trained = sparse[1].weight2d if format == "dense" else sparse[1].values
    # the float32 master values train
    assert trained.dtype == torch.float32 and trained.grad is not None and trained.grad.dtype == torch.float32
    assert bool(trained.grad.ne(0).any()) and sparse[1].bias.grad is not None
    assert sparse(x).dtype == torch.float32          # outside autocast: as before


def test_a_grouped_sparse_conv_keeps_its_groups_under_autocast():
    torch.manual_seed(0)
    conv = _zeroed(nn.Conv2d(8, 8, 3, padding=1, groups=2))
    sparse = SparseConv2d.from_dense(conv, format="csr")
    x = torch.randn(2, 8, 5, 5).bfloat16()        # (as a dense layer before hands it on under autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = sparse(x), conv(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


def test_a_sparse_layer_under_autocast_compiles_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), SparseLinear.from_dense(_zeroed(nn.Linear(16, 8)), format="csr"))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------ 9. hooks
def test_converted_layers_keep_their_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(_zeroed(nn.Linear(8, 8)), nn.ReLU(), _zeroed(nn.Conv1d(8, 8, 1), seed=1)).eval()
    seen = []
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))      # rewrites the input
    model[0].register_forward_hook(lambda mod, args, kwargs, out: seen.append("kw"), with_kwargs=True)
    handle = model[2].register_forward_hook(lambda mod, args, out: seen.append("conv"))
    x = torch.randn(3, 8)
    want = model[0](x)
    convert_modules(model, format="csr")
    assert isinstance(model[0], SparseLinear)
    seen.clear()
    torch.testing.assert_close(model[0](x), want, rtol=1e-4, atol=1e-5)
    model[2](torch.randn(1, 8, 4))
    assert seen == ["kw", "conv"]
    handle.remove()            # a handle taken on the dense layer removes the hook from the converted one
    model[2](torch.randn(1, 8, 4))
    assert seen == ["kw", "conv"]


def test_converted_layers_keep_full_backward_hooks():
    grads = []
    dense = _zeroed(nn.Linear(8, 8))
    dense.register_full_backward_hook(lambda mod, grad_in, grad_out: grads.append(grad_out[0].shape))
    sparse = SparseLinear.from_dense(dense, format="csr")
    sparse(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert grads == [(2, 8)]


# --------------------------------------------------------------- 10. a failed load keeps the layer consistent
@pytest.mark.parametrize("cls, make", [(SparseConv2d, lambda: nn.Conv2d(8, 8, 3, groups=2)),
                                       (SparseConvTranspose2d, lambda: nn.ConvTranspose2d(8, 8, 3, groups=2)),
                                       (SparseLinear, lambda: nn.Linear(16, 8))], ids=["conv", "transpose", "linear"])
@pytest.mark.parametrize("format", ["csr", "bsr"])
def test_a_failed_load_of_another_pattern_leaves_the_layer_as_it_was(cls, make, format):
    torch.manual_seed(0)
    sparse_src, dense_dst = make(), make()
    with torch.no_grad():
        sparse_src.weight.mul_(torch.rand_like(sparse_src.weight) < 0.1)
        dense_dst.weight.mul_(torch.rand_like(dense_dst.weight) < 0.5)
    src = cls.from_dense(sparse_src, format=format, block=1)
    dst = cls.from_dense(dense_dst, format=format, block=1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        dst.load_state_dict(src.state_dict())
    with torch.no_grad():        # (the bias has one shape in both: torch loads it)
        dense_dst.bias.copy_(sparse_src.bias)
    x = torch.randn(1, 8, 6, 6) if cls is not SparseLinear else torch.randn(3, 16)
    assert int(dst.crow_indices[-1]) == dst.col_indices.numel()
    torch.testing.assert_close(dst(x), dense_dst(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- 11. conv1d_to_linear
class Conv1D(nn.Module):
    """transformers' Conv1D (recognised by name and layout): y = x @ W + b, W [nx, nf]."""

    def __init__(self, nf, nx, keep_nx=True):
        super().__init__()
        self.nf = nf
        if keep_nx:            # (older transformers keep no nx)
            self.nx = nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class _Gpt(nn.Module):
    def __init__(self, keep_nx=True):
        super().__init__()
        shared = Conv1D(6, 4, keep_nx)
        self.a, self.b = shared, shared
        self.frozen = Conv1D(6, 4, keep_nx).requires_grad_(False)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.frozen(x)


@pytest.mark.parametrize("keep_nx", [True, False])
def test_conv1d_to_linear_keeps_shared_frozen_and_hooked_layers(keep_nx):
    torch.manual_seed(0)
    model = _Gpt(keep_nx).eval()
    calls = []
    model.frozen.register_forward_hook(lambda mod, args, out: calls.append(1))
    x = torch.randn(2, 4)
    want = model(x)
    out = sk.nn.conv1d_to_linear(model)
    assert type(out.a) is nn.Linear and out.a is out.b              # one layer under both names
    assert not out.frozen.weight.requires_grad and not out.frozen.bias.requires_grad and out.a.weight.requires_grad
    assert not out.a.training
    calls.clear()
    torch.testing.assert_close(out(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [1]


# --------------------------------------------------------------------------------- 12. argument checks
def test_convert_modules_checks_skip_block_n_m_and_the_root():
    model = nn.Sequential()
    model.add_module("a", _zeroed(nn.Linear(8, 8)))
    model.add_module("ab", _zeroed(nn.Linear(8, 8), seed=1))
    with pytest.raises(TypeError, match=r"skip must be a tuple or list of module names, got str 'ab'; .*\('ab',\)"):
        convert_modules(model, format="csr", skip="ab")
    with pytest.raises(ValueError, match=r"block must have both sides in \[1, 128\], got \(0, 0\)"):
        convert_modules(model, format="bsr", block=0)
    with pytest.raises(ValueError, match="n must satisfy 1 <= n < m"):
        convert_modules(model, format="nm", n=4, m=4)
    assert type(model.a) is nn.Linear and type(model.ab) is nn.Linear      # nothing converted on a bad call
    convert_modules(model, format="csr", skip=["ab"])
    assert isinstance(model.a, SparseLinear) and type(model.ab) is nn.Linear
    with pytest.raises(ValueError, match=r"got a bare Linear; wrap it \(nn.Sequential\(layer\)\) or .*"
                                         r"SparseLinear.from_dense"):
        convert_modules(_zeroed(nn.Linear(8, 8)), format="csr")


def test_sparse_constructors_check_groups_bias_and_take_an_int_kernel_size():
    w = torch.randn(6, 36)
    for groups in (0, 3, True):
        with pytest.raises(ValueError, match=f"SparseConv2d: groups must be a positive int dividing C_in = 4 and "
                                             f"C_out = 6, got {groups}"):
            SparseConv2d(w, None, "dense", 4, (3, 3), groups=groups)
    with pytest.raises(ValueError, match=r"SparseConv2d: weight must have C_in / groups \* taps = 45 columns"):
        SparseConv2d(w, None, "dense", 5, (3, 3))
    with pytest.raises(ValueError, match=r"SparseLinear: bias must have shape \(6,\) \(one per output\), got \(5,\)"):
        SparseLinear(torch.randn(6, 8), torch.randn(5), "dense")
    with pytest.raises(ValueError, match=r"SparseConvTranspose2d: bias must have shape \(6,\)"):
        SparseConvTranspose2d(torch.randn(54, 4), torch.randn(4), "dense", (3, 3))
    with pytest.raises(TypeError, match="SparseLinear: bias must be a Tensor or None, got list"):
        SparseLinear(torch.randn(6, 8), [0.0] * 6, "dense")
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a tuple of ints .* got 3.0"):
        SparseConv2d(w, None, "dense", 4, 3.0)
    torch.manual_seed(0)
    for conv, cls, x in [(nn.Conv2d(4, 6, 3, stride=2, padding=1), SparseConv2d, torch.randn(1, 4, 7, 7)),
                         (nn.Conv1d(4, 6, 3, stride=2, padding=1), SparseConv1d, torch.randn(1, 4, 9)),
                         (nn.Conv3d(2, 4, 3, padding=1), SparseConv3d, torch.randn(1, 2, 3, 4, 4))]:
        sparse = cls(conv.weight.detach().reshape(conv.out_channels, -1), conv.bias, "dense", conv.in_channels,
                     3, 2 if cls is not SparseConv3d else 1, 1)     # ints, as nn.Conv*d takes them
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)
    ct = nn.ConvTranspose2d(4, 6, 3, stride=2)
    sparse = SparseConvTranspose2d(sk.ops.conv_transpose.transposed_weight2d(ct.weight.detach(), 1), ct.bias,
                                   "dense", 3, 2)
    assert sparse.kernel_size == (3, 3) and sparse.stride == (2, 2)
    torch.testing.assert_close(sparse(x := torch.randn(1, 4, 5, 5)), ct(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("format", ["dense", "nm", "csr", "bsr", "channel"])
def test_repr_of_a_layer_on_meta_tensors(format):
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(NM.prune(lin.weight, 2, 4))
    text = repr(SparseLinear.from_dense(lin, format=format, block=2).to("meta"))
    assert f"format={format}" in text
    assert ("density" in text) is (format not in ("dense", "nm"))
