"""sk.save / sk.load: what the spec records (formats, block shapes, chosen backends) and where a loaded model ends."""

import json

import pytest
import safetensors.torch
import torch
from torch import nn

import sparsekit as sk
from sparsekit.nn import SparseLinear


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.register_buffer("scale", torch.ones(64), persistent=False)  # not saved: must still follow the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale


def _sparsified(formats: list[str]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = TwoLayers()
    keep = (torch.rand(4, 4) < 0.3).repeat_interleave(16, 0).repeat_interleave(16, 1)
    with torch.no_grad():
        model.a.weight.mul_(keep)
    x = torch.randn(2, 64)
    fast, _ = sk.sparsify(
        model, x, formats=formats, blocks=[(16, 16)], min_speedup=1e-9, cache=False, reps=2, measure_model=False
    )
    return fast, x


def test_spec_records_block_shape_and_chosen_backend(tmp_path):
    fast, x = _sparsified(["dense", "bsr"])
    assert isinstance(fast.a, SparseLinear) and fast.a.format == "bsr"
    out = sk.save(fast, tmp_path / "m")
    spec = json.loads((out / "sparsekit.json").read_text())["modules"]["a"]
    assert spec["block"] == [16, 16]
    assert spec["backend"] is None  # nothing forced: loading lets the dispatcher choose
    assert spec["chosen_backend"] in sk.ops.BACKENDS  # what ran the layer when sparsify chose it
    loaded = sk.load(out, TwoLayers())
    assert loaded.a.backend is None and loaded.a.sparse_weight().block == (16, 16)
    torch.testing.assert_close(loaded(x), fast(x))


def test_load_rejects_a_spec_whose_block_disagrees_with_the_values(tmp_path):
    fast, _ = _sparsified(["dense", "bsr"])
    out = sk.save(fast, tmp_path / "m")
    spec = json.loads((out / "sparsekit.json").read_text())
    spec["modules"]["a"]["block"] = [32, 32]
    (out / "sparsekit.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"block \[32, 32\]"):
        sk.load(out, TwoLayers())


def test_load_puts_the_whole_model_on_map_location(tmp_path, monkeypatch):
    """Every parameter and buffer ends on map_location, also those of dense layers and unsaved buffers
    (emulated with the meta device: this machine may have no GPU)."""
    fast, _ = _sparsified(["dense", "bsr"])
    out = sk.save(fast, tmp_path / "m")
    real = safetensors.torch.load_file
    monkeypatch.setattr(
        safetensors.torch,
        "load_file",
        lambda path, device="cpu": {k: v.to(device) for k, v in real(path, device="cpu").items()},
    )
    loaded = sk.load(out, TwoLayers(), map_location="meta")
    devices = {name: t.device.type for name, t in (*loaded.named_parameters(), *loaded.named_buffers())}
    assert set(devices.values()) == {"meta"}, devices
    assert isinstance(loaded.a, SparseLinear) and type(loaded.b) is nn.Linear


def test_load_rejects_a_bad_map_location(tmp_path):
    fast, _ = _sparsified(["dense", "bsr"])
    out = sk.save(fast, tmp_path / "m")
    with pytest.raises(ValueError, match="map_location must be"):
        sk.load(out, TwoLayers(), map_location="nowhere")


class TiedLM(nn.Module):
    """An embedding tied to the output projection, and a non-persistent buffer that __init__ computes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 40, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("positions", torch.arange(32, dtype=torch.float32) / 32, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(t)) + self.positions)


def test_meta_skeleton_keeps_ties_and_gets_non_persistent_buffers(tmp_path):
    torch.manual_seed(1)
    model = TiedLM().eval()
    with torch.no_grad():
        model.mid.weight.mul_((torch.rand(32, 32) < 0.2).float())
    t = torch.randint(0, 40, (2, 5))
    fast, _ = sk.sparsify(model, t, formats=["csr"], min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert isinstance(fast.mid, SparseLinear)
    sk.save(fast, tmp_path / "lm")
    with torch.device("meta"):
        skeleton = TiedLM()
    loaded = sk.load(tmp_path / "lm", skeleton)
    assert loaded.head.weight is loaded.emb.weight                   # still one tensor
    assert not any(b.is_meta for b in loaded.buffers())
    torch.testing.assert_close(loaded(t), fast(t), rtol=0, atol=0)
    eager = sk.load(tmp_path / "lm", TiedLM())
    assert eager.head.weight is eager.emb.weight
    torch.testing.assert_close(eager(t), fast(t), rtol=0, atol=0)


def test_a_half_precision_model_loads_in_its_saved_dtype(tmp_path):
    fast, x = _sparsified(["csr"])
    fast = fast.half()
    sk.save(fast, tmp_path / "half")
    loaded = sk.load(tmp_path / "half", TwoLayers())          # a float32 instance
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    torch.testing.assert_close(loaded(x.half()), fast(x.half()), rtol=0, atol=0)


def test_an_unknown_forced_backend_is_dropped_with_a_warning(tmp_path):
    fast, x = _sparsified(["csr"])
    out = sk.save(fast, tmp_path / "m")
    spec = json.loads((out / "sparsekit.json").read_text())
    spec["modules"]["a"]["backend"] = "some-future-backend"
    (out / "sparsekit.json").write_text(json.dumps(spec))
    with pytest.warns(RuntimeWarning, match="does not know it"):
        loaded = sk.load(out, TwoLayers())
    assert loaded.a.backend is None
    torch.testing.assert_close(loaded(x), fast(x))


def test_spec_versions_read_and_refused(tmp_path):
    """Version 2 stores non-persistent buffers too (version 3: module aliases, a root Sparse* layer); a version-1
    directory (without them) still loads, into an eager skeleton; an unknown version is refused naming the ones
    this sparsekit reads."""
    fast, x = _sparsified(["csr"])
    out = sk.save(fast, tmp_path / "m")
    spec = json.loads((out / "sparsekit.json").read_text())
    assert spec["sparsekit_spec"] == 3
    tensors = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert "sparsekit.nonpersistent:scale" in tensors
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.startswith("sparsekit.nonpersistent:")},
                                str(out / "model.safetensors"))
    (out / "sparsekit.json").write_text(json.dumps({**spec, "sparsekit_spec": 1}))
    torch.testing.assert_close(sk.load(out, TwoLayers())(x), fast(x))
    (out / "sparsekit.json").write_text(json.dumps({**spec, "sparsekit_spec": 99}))
    with pytest.raises(ValueError, match="unsupported spec version 99 \\(this sparsekit reads 1, 2, 3\\)"):
        sk.load(out, TwoLayers())


class FrozenBackbone(nn.Module):
    """A model whose __init__ freezes part of itself (a backbone under a trained head), and hooks a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.backbone.requires_grad_(False)
        self.calls: list[int] = []
        self.backbone.register_forward_hook(lambda mod, args, out: self.calls.append(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.mark.parametrize("on_meta", [False, True])
def test_load_keeps_the_skeletons_frozen_layers_mode_and_hooks(tmp_path, on_meta):
    torch.manual_seed(0)
    model = FrozenBackbone()
    with torch.no_grad():
        model.backbone.weight[:, :8] = 0
        model.head.weight[:, :8] = 0
    sk.nn.convert_modules(model, format="csr")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    sk.save(model, tmp_path / "m")
    with torch.device("meta" if on_meta else "cpu"):
        skeleton = FrozenBackbone().eval()
    loaded = sk.load(tmp_path / "m", skeleton)
    assert isinstance(loaded.backbone, SparseLinear) and isinstance(loaded.head, SparseLinear)
    assert [p.requires_grad for p in loaded.backbone.parameters()] == [False, False]
    assert all(p.requires_grad for p in loaded.head.parameters())
    assert not loaded.backbone.training and not loaded.head.training      # the skeleton's mode
    loaded(torch.randn(2, 16))
    assert loaded.calls == [1]                                            # its hook runs on the rebuilt layer


def test_a_damaged_save_is_a_value_error_naming_the_file(tmp_path):
    fast, _ = _sparsified(["csr"])
    out = sk.save(fast, tmp_path / "m")
    weights, spec_file = out / "model.safetensors", out / "sparsekit.json"
    spec, data = spec_file.read_text(), weights.read_bytes()
    tensors = safetensors.torch.load_file(str(weights))
    safetensors.torch.save_file({k: v for k, v in tensors.items() if k != "a.col_indices"}, str(weights))
    with pytest.raises(ValueError, match=f"{weights} has no tensor 'a.col_indices', which the spec's SparseLinear"):
        sk.load(out, TwoLayers())
    weights.write_bytes(data[:500])
    with pytest.raises(ValueError, match=f"{weights} cannot be read .*damaged or truncated"):
        sk.load(out, TwoLayers())
    weights.write_bytes(data)
    for text, said in (("{not json", "is not valid JSON"), ("[]", "must hold a sparsekit.save spec .* got list")):
        spec_file.write_text(text)
        with pytest.raises(ValueError, match=f"{spec_file} {said}"):
            sk.load(out, TwoLayers())
    spec_file.write_text(spec)
    sk.load(out, TwoLayers())          # (whole again: loads)


class Conv1D(nn.Module):
    """transformers' Conv1D (recognised by name and layout): y = x @ W + b, W [nx, nf]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class GptBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(32, 8), Conv1D(8, 8)     # c_proj: square, would load transposed silently

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_fc(self.c_proj(x))


def test_a_save_of_converted_conv1d_layers_refuses_an_unconverted_skeleton(tmp_path):
    torch.manual_seed(0)
    model = sk.nn.conv1d_to_linear(GptBlock())
    with torch.no_grad():
        model.c_fc.weight.mul_(torch.rand_like(model.c_fc.weight) < 0.2)
    sk.nn.convert_modules(model, format="csr")
    sk.save(model, tmp_path / "gpt")
    with pytest.raises(ValueError, match=r"Hugging Face Conv1D layers \(c_fc, c_proj\) .* "
                                         r"sparsekit.nn.conv1d_to_linear"):
        sk.load(tmp_path / "gpt", GptBlock())
    x = torch.randn(3, 8)
    torch.testing.assert_close(sk.load(tmp_path / "gpt", sk.nn.conv1d_to_linear(GptBlock()))(x), model(x))


class _Versioned(nn.Module):
    """torchvision's MNASNet: _load_from_state_dict reads the state's version and refuses a state without one."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.loaded_version = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        self.loaded_version = version
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


@pytest.mark.parametrize("meta", [False, True])
def test_save_keeps_each_modules_state_dict_version(tmp_path, meta):
    torch.manual_seed(0)
    model = nn.Sequential(_Versioned(), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].fc.weight[:, :8] = 0
    fast = sk.nn.convert_modules(model, format="csr")
    sk.save(fast, tmp_path)
    if meta:
        with torch.device("meta"):
            skeleton = nn.Sequential(_Versioned(), nn.ReLU(), nn.Linear(16, 4))
    else:
        skeleton = nn.Sequential(_Versioned(), nn.ReLU(), nn.Linear(16, 4))
    back = sk.load(tmp_path, skeleton)
    assert back[0].loaded_version == 2
    x = torch.randn(3, 16)
    torch.testing.assert_close(back(x), fast(x))
