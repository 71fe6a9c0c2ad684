"""Review fixes in sparsekit.nn and the `sparsekit sparsify` command: converted modules keep the source's
train / eval mode, unbatched SparseConv2d input, shared and tied layers in convert_modules, dilation in the conv
reprs, constructor checks of weight / format / backend, checkpoint dtypes and clear CLI errors."""

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
