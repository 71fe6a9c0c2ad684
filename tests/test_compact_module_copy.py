"""Compaction keeps what a layer is (its subclass, attributes, hooks) and keeps weights tied across layers."""

import tempfile

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit._aliases import retie, tied_layers
from sparsekit.prune import Pruner, masks
from sparsekit.prune.compact import resize_module
from sparsekit.prune.graph import DependencyGraph


class ScaledConv(nn.Conv2d):
    """A subclass whose constructor takes other arguments than Conv2d's, with state of its own."""

    def __init__(self, channels_in: int, channels_out: int, gain: float) -> None:
        super().__init__(channels_in, channels_out, 3, padding=1)
        self.gain = gain
        self.tag = {"role": "stem"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ScaledConv(3, 16, gain=0.5)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        return self.head(self.conv2(h).mean((2, 3)))


def test_subclass_state_and_hooks_survive_compaction() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    seen = []
    model.conv1.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    seen.clear()
    small = pruner.compact()
    conv = small.conv1
    assert type(conv) is ScaledConv and conv.gain == 0.5 and conv.tag == {"role": "stem"}
    assert conv.out_channels == 8 and conv.weight.shape == (8, 3, 3, 3)
    assert conv.tag is not model.conv1.tag            # a copy, not shared with the original
    diff = sk.verify(model, small, x, atol=1e-5)
    assert max(diff.values()) <= 1e-5
    assert seen == [16, 8]                             # the hook ran on the masked and on the compacted layer
    assert model.conv1.weight.shape == (16, 3, 3, 3)   # the original is untouched, still masked
    assert torch.nn.utils.parametrize.is_parametrized(model.conv1, "weight")
    with tempfile.TemporaryDirectory() as d:
        sk.save(small, f"{d}/net")
        back = sk.load(f"{d}/net", Net().eval())
    assert type(back.conv1) is ScaledConv and back.conv1.gain == 0.5 and back.conv1.out_channels == 8
    assert torch.equal(back(x), small(x))


def test_resize_module_copies_and_keeps_requires_grad() -> None:
    lin = nn.Linear(6, 5)
    lin.bias.requires_grad_(False)
    lin.register_forward_pre_hook(lambda mod, args: None)
    new = resize_module(lin, torch.tensor([0, 3]), torch.tensor([1, 2, 5]))
    assert (new.out_features, new.in_features) == (2, 3)
    assert torch.equal(new.weight, lin.weight.detach()[[0, 3]][:, [1, 2, 5]])
    assert new.weight.requires_grad and not new.bias.requires_grad
    assert len(new._forward_pre_hooks) == 1 and new._forward_pre_hooks is not lin._forward_pre_hooks
    assert lin.weight.shape == (5, 6)
    same = resize_module(lin)                          # nothing cut: a copy with storage of its own
    assert same.weight.data_ptr() != lin.weight.data_ptr()


def test_extra_per_channel_state_is_an_error() -> None:
    class Gained(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 6)
            self.gain = nn.Parameter(torch.ones(6))

    with pytest.raises(ValueError, match="'gain' of shape \\(6,\\)"):
        resize_module(Gained(), torch.tensor([0, 1, 2]))
    scalar = Gained()
    scalar.gain = nn.Parameter(torch.ones(1))          # state of another size is carried over as it is
    assert resize_module(scalar, torch.tensor([0, 1])).gain.shape == (1,)


def test_recurrent_subclass_keeps_its_attributes() -> None:
    class TaggedGRU(nn.GRU):
        def __init__(self) -> None:
            super().__init__(5, 8, num_layers=2, batch_first=True)
            self.note = "encoder"

    gru = TaggedGRU()
    new = resize_module(gru, torch.tensor([0, 2, 4, 6]))
    assert type(new) is TaggedGRU and new.note == "encoder" and new.hidden_size == 4
    out, h = new(torch.randn(2, 3, 5))
    assert out.shape == (2, 3, 4) and h.shape == (2, 2, 4)


class TiedLM(nn.Module):
    """The tied word-language-model (encoder embedding and decoder share one weight)."""

    def __init__(self, vocab: int = 40, dim: int = 24) -> None:
        super().__init__()
        self.enc = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        self.dec = nn.Linear(dim, vocab)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.rnn(self.enc(x))[0])


def test_tied_weights_are_one_group_and_stay_tied() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    x = torch.randint(0, 40, (2, 7))
    graph = DependencyGraph.build(model, x)
    (group,) = [g for g in graph.groups if any(m.module == "enc" for m in g.members)]
    assert {(m.module, m.axis) for m in group.members} == {("enc", "out"), ("rnn", "in"), ("rnn", "out"),
                                                           ("dec", "in")}
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.enc.weight is small.dec.weight and small.enc.weight.shape == (40, 12)
    assert max(sk.verify(model, small, x, atol=1e-5).values()) <= 1e-5
    with tempfile.TemporaryDirectory() as d:
        sk.save(small, f"{d}/lm")
        back = sk.load(f"{d}/lm", TiedLM())
    assert back.enc.weight is back.dec.weight
    assert torch.equal(back(x), small(x))
    torch.optim.SGD(small.parameters(), lr=0.1).zero_grad()
    small(x).sum().backward()
    torch.optim.SGD(small.parameters(), lr=0.1).step()
    assert small.enc.weight is small.dec.weight


def test_retie_reports_weights_that_differ() -> None:
    model = TiedLM()
    assert tied_layers(model) == [["dec", "enc"]]
    model.dec.weight = nn.Parameter(model.enc.weight.detach() + 1)
    assert retie(model, [["dec", "enc"]]) == [["dec", "enc"]]
    assert model.dec.weight is not model.enc.weight
    assert retie(model, [["dec", "enc"]], same_values=False) == []
    assert model.enc.weight is model.dec.weight


def test_weight_norm_parametrization_is_baked_and_the_hook_based_one_refused() -> None:
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6))
    new = resize_module(normed, torch.tensor([0, 2, 5]))
    assert type(new) is nn.Linear and not torch.nn.utils.parametrize.is_parametrized(new)
    assert torch.allclose(new.weight, normed.weight.detach()[[0, 2, 5]])
    with pytest.warns(FutureWarning):
        hooked = nn.utils.weight_norm(nn.Linear(4, 6))
    with pytest.raises(ValueError, match="weight_g.*parametrizations.weight_norm"):
        resize_module(hooked, torch.tensor([0, 2, 5]))


def test_tied_weight_cut_differently_is_pinned() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.b.weight = self.a.weight      # a's inputs are the model's (fixed); b's are a's outputs

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    graph = DependencyGraph.build(Twice(), torch.randn(3, 8))
    (group,) = [g for g in graph.groups if ("a", "out") in {(m.module, m.axis) for m in g.members}]
    assert {(m.module, m.axis) for m in group.members} == {("a", "out"), ("b", "in"), ("b", "out"), ("head", "in")}
    assert not group.prunable and "dim 1 they cut differently" in group.reason


def test_hooks_bound_to_the_layer_follow_the_copy() -> None:
    class Counting(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 6)
            self.calls = 0
            self.register_forward_hook(self._count)
            self._register_load_state_dict_pre_hook(lambda mod, *args: setattr(mod, "loaded", True),
                                                    with_module=True)

        def _count(self, mod, args, out) -> None:
            self.calls += 1

    lin = Counting()
    new = resize_module(lin, torch.tensor([1, 4]))
    new(torch.randn(2, 4))
    assert new.calls == 1 and lin.calls == 0
    del lin                                          # the copy's hooks do not need the original alive
    new.load_state_dict(new.state_dict())
    assert new.loaded


def test_copy_drops_the_compile_wrapper_and_keeps_hook_handles_and_parameter_order() -> None:
    class Handled(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 6)
            self.calls = 0
            self.handle = self.register_forward_hook(self._count)

        def _count(self, mod, args, out) -> None:
            self.calls += 1

    lin = Handled()
    lin.compile(backend="eager")
    new = resize_module(lin, torch.tensor([0, 5]))
    assert new._compiled_call_impl is None                  # the wrapper would call the original layer
    assert new(torch.randn(3, 4)).shape == (3, 2) and new.calls == 1
    new.handle.remove()                                      # the handle reaches the copy's hook dict
    new(torch.randn(3, 4))
    assert new.calls == 1
    masked = nn.Linear(4, 6)
    masks.apply_mask(masked, torch.ones(6, 4, dtype=torch.bool))           # weight only, not the bias
    assert [n for n, _ in resize_module(masked, torch.tensor([1, 2])).named_parameters()] == ["weight", "bias"]


def test_per_channel_plain_tensor_attribute_is_refused_and_extra_state_copied() -> None:
    class Scaled(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 6)
            self.scale = torch.ones(6)                        # a plain attribute, not a buffer
            self.register_buffer("step", torch.zeros(()))

    with pytest.raises(ValueError, match="'scale' of shape \\(6,\\)"):
        resize_module(Scaled(), torch.tensor([0, 1]))
    keep = Scaled()
    del keep.scale
    new = resize_module(keep, torch.tensor([0, 1]))
    assert new.step.data_ptr() != keep.step.data_ptr()      # a copy, not the original's buffer


def test_tied_layer_called_twice_stays_prunable() -> None:
    class TwiceTied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e, self.mid, self.dec = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 30)
            self.dec.weight = self.e.weight

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.relu(self.mid(self.e(a) + self.e(b))))

    torch.manual_seed(0)
    model = TwiceTied()
    args = (torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 5)))
    pruner = Pruner(model, args, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.e.weight is small.dec.weight and small.e.weight.shape == (30, 8)
    assert max(sk.verify(model, small, args, atol=1e-5).values()) <= 1e-5


def test_compacted_and_baked_rnn_hold_no_sparsekit_hook() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.head = nn.GRU(6, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(x)[0])

    model, x = Tagger(), torch.randn(2, 5, 6)
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert not small.gru._forward_hooks and not hasattr(small.gru, "_sparsekit_copyable")
    torch.jit.script(small)                                    # (the hook's object type made scripting fail)
    pruner.bake()
    assert not model.gru._forward_hooks


@pytest.mark.parametrize("meta", [False, True])
def test_load_keeps_weights_the_saved_model_held_apart(meta: bool) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    model.dec.weight = nn.Parameter(model.enc.weight.detach() * 2)     # untied by its user after __init__ tied it
    x = torch.randint(0, 40, (2, 7))
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.enc.weight is not small.dec.weight
    with tempfile.TemporaryDirectory() as d:
        sk.save(small, f"{d}/lm")
        if meta:
            with torch.device("meta"):
                fresh = TiedLM()
        else:
            fresh = TiedLM()
        back = sk.load(f"{d}/lm", fresh)
    assert back.enc.weight is not back.dec.weight
    assert torch.equal(back(x), small(x))


def test_copies_reference_the_rest_of_the_model_rather_than_copying_it() -> None:
    class Noted(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = Noted(6, 8), Noted(8, 8), nn.Linear(8, 2)
            shared = {"calls": 0}
            self.a.shared = self.b.shared = shared            # state two layers share
            object.__setattr__(self.a, "parent", self)      # a reference to the model (not a submodule)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 6)
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.a.out_features == 4 and small.a.parent is small
    assert small.a.shared is small.b.shared


def test_square_layer_state_of_a_kept_size_is_left_with_a_warning() -> None:
    class Scaled(nn.Linear):
        def __init__(self) -> None:
            super().__init__(16, 16)
            self.register_buffer("in_scale", torch.ones(16))     # per input: the inputs stay

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x * self.in_scale)

    with pytest.warns(RuntimeWarning, match="'in_scale' of shape \\(16,\\) is left as it is"):
        new = resize_module(Scaled(), torch.arange(8))
    assert new(torch.randn(2, 16)).shape == (2, 8)


def test_load_keeps_the_part_of_a_three_way_tie_the_saved_model_kept() -> None:
    class Three(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.d1, self.d2 = nn.Embedding(20, 8), nn.Linear(8, 20), nn.Linear(8, 20)
            self.d1.weight = self.d2.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            return self.d1(h) + self.d2(h)

    model, x = Three(), torch.randint(0, 20, (2, 5))
    model.d2.weight = nn.Parameter(model.emb.weight.detach() * 2)
    with tempfile.TemporaryDirectory() as d:
        sk.save(model, f"{d}/m")
        back = sk.load(f"{d}/m", Three())
        with torch.device("meta"):
            skeleton = Three()
        meta = sk.load(f"{d}/m", skeleton)
    for loaded in (back, meta):
        assert loaded.d1.weight is loaded.emb.weight and loaded.d2.weight is not loaded.emb.weight
        assert torch.equal(loaded(x), model(x))


def test_within_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="within must be the nn.Module"):
        resize_module(nn.Linear(4, 6), torch.tensor([0, 1]), within="model")


class WeightNormed(nn.Module):
    """wav2vec 2.0 / HiFi-GAN style: convs under nn.utils.parametrizations.weight_norm (two stored tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 16, 3, padding=1))
        self.conv2 = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 8, 3, padding=1), dim=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(-1))


def test_weight_normed_layers_prune_compact_unmask_and_bake() -> None:
    """A mask stacks on weight_norm's parametrization: channel pruning compacts it (the computed weight, baked),
    remove() drops the mask and keeps weight_norm, bake() leaves the masked value as a plain Parameter."""
    torch.manual_seed(0)
    model = WeightNormed().eval()
    x = torch.randn(2, 4, 10)
    dense_out = model(x).detach()
    pruner = Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    kinds = [type(p).__name__ for p in model.conv1.parametrizations.weight]
    assert kinds == ["_WeightNorm", "WeightMask"]
    small = pruner.compact()
    assert small.conv1.out_channels == 8 and small.conv2.in_channels == 8
    assert not torch.nn.utils.parametrize.is_parametrized(small.conv1)
    sk.verify(model, small, x, atol=1e-5)
    masked_out = model(x).detach()
    with masks.unmasked(model):          # reads through the stacked masks too
        torch.testing.assert_close(model(x), dense_out)
    torch.testing.assert_close(model(x), masked_out)

    pruner.remove()
    assert [type(p).__name__ for p in model.conv1.parametrizations.weight] == ["_WeightNorm"]
    torch.testing.assert_close(model(x), dense_out)

    pruner = Pruner(model, x, criterion="magnitude", granularity="element", sparsity=0.5)
    pruner.step()
    masked_out, masked_w = model(x).detach(), model.conv2.weight.detach().clone()
    pruner.bake()
    assert not torch.nn.utils.parametrize.is_parametrized(model.conv2)
    assert isinstance(model.conv2.weight, nn.Parameter)
    torch.testing.assert_close(model.conv2.weight.detach(), masked_w)
    torch.testing.assert_close(model(x), masked_out)
    assert float((model.conv2.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
