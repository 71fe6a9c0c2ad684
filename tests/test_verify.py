import copy

import pytest
import torch
from torch import nn

import sparsekit as sk


def _pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def test_identical_models_pass():
    a, b = _pair()
    diffs = sk.verify(a, b, torch.randn(3, 8))
    assert diffs == {"output": 0.0}


def test_difference_names_first_layer():
    a, b = _pair()
    with torch.no_grad():
        b[2].bias.add_(1.0)
    with pytest.raises(sk.VerificationError, match=r"output: max \|diff\|.*first layer off: '2'"):
        sk.verify(a, b, torch.randn(3, 8))


def test_shape_mismatch_and_bad_args():
    a, _ = _pair()
    with pytest.raises(sk.VerificationError, match="shape"):
        sk.verify(a, nn.Sequential(nn.Linear(8, 5)), torch.randn(3, 8))
    with pytest.raises(TypeError, match="candidate must be an nn.Module"):
        sk.verify(a, "model", torch.randn(3, 8))
    with pytest.raises(TypeError, match="example_inputs must be a Tensor, a tuple/list .* or a dict .* got int"):
        sk.verify(a, a, 1)


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, scale=1.0, mask=None):
        y = self.lin(x) * scale
        return {"y": y if mask is None else y * mask}


def test_dict_example_inputs_are_keyword_args_like_the_pruners():
    torch.manual_seed(0)
    a, b = _Keywords(), _Keywords()
    b.load_state_dict(a.state_dict())
    inputs = {"x": torch.randn(3, 8), "mask": torch.ones(3, 4), "scale": 2.0}
    assert sk.verify(a, b, inputs) == {"output['y']": 0.0}
    with torch.no_grad():
        b.lin.bias.add_(1.0)
    with pytest.raises(sk.VerificationError, match="first layer off: 'lin'"):
        sk.verify(a, b, inputs)
    assert sk.verify(a, a, [torch.randn(3, 8), 0.5]) == {"output['y']": 0.0}


def test_verify_tolerance_boundaries():
    torch.manual_seed(0)
    a = nn.Linear(8, 4)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bias.add_(2e-3)
    x = torch.randn(3, 8)
    sk.verify(a, b, x, atol=3e-3)
    with pytest.raises(sk.VerificationError):
        sk.verify(a, b, x, atol=1e-3)
    ymax = float(a(x).abs().max())
    sk.verify(a, b, x, atol=0.0, rtol=3e-3 / ymax)


def test_verify_names_the_scale_of_large_outputs():
    """An untrained deep model's outputs can reach 1e8, where float rounding alone passes atol: the error says
    how large the difference is against the reference and points at rtol; small outputs get no such note."""
    torch.manual_seed(0)
    a = nn.Linear(8, 4)
    with torch.no_grad():
        a.weight.mul_(1e8)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bias.add_(50.0)
    x = torch.randn(3, 8)
    with pytest.raises(sk.VerificationError, match=r"the reference reaches \|[0-9.e+]+\|: [0-9.e-]+ of that; float "
                                                    r"rounding alone reaches that at this scale: pass rtol="):
        sk.verify(a, b, x)
    sk.verify(a, b, x, rtol=1e-5)
    small = copy.deepcopy(b)
    with torch.no_grad():
        small.weight.div_(1e8)
    with pytest.raises(sk.VerificationError) as err:
        sk.verify(small, nn.Linear(8, 4), x)
    assert "reaches" not in str(err.value)


def test_verify_rejects_nan_and_negative_tolerances():
    a = nn.Linear(8, 4)
    for kw in ({"atol": float("nan")}, {"rtol": float("nan")}, {"rtol": -1.0}):
        with pytest.raises(ValueError):
            sk.verify(a, a, torch.randn(3, 8), **kw)


def test_nan_in_the_candidate_is_never_within_tolerance():
    """A NaN compares false with any tolerance: verify must flag it, not pass it; equal infinities match."""
    class Scaled(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.lin, self.factor = nn.Linear(4, 3), factor

        def forward(self, x):
            return self.lin(x) * self.factor

    torch.manual_seed(0)
    ref, bad = Scaled(1.0), Scaled(float("nan"))
    bad.lin.load_state_dict(ref.lin.state_dict())
    x = torch.randn(2, 4)
    with pytest.raises(sk.VerificationError, match=r"output: max \|diff\| inf \(NaN in the candidate"):
        sk.verify(ref, bad, x, atol=1e9)
    with pytest.raises(sk.VerificationError, match=r"NaN in the reference"):    # rtol: a NaN reference is no
        sk.verify(bad, ref, x, atol=0.0, rtol=1e-3)                              # licence for anything
    big = Scaled(float("inf"))
    big.lin.load_state_dict(ref.lin.state_dict())
    with pytest.raises(sk.VerificationError, match=r"an infinity where the other"):
        sk.verify(big, ref, x, atol=0.0, rtol=1e-3)
    inf_a, inf_b = Scaled(float("inf")), Scaled(float("inf"))
    inf_b.lin.load_state_dict(inf_a.lin.state_dict())
    with torch.no_grad():
        inf_a.lin.weight.abs_()
        inf_b.lin.weight.copy_(inf_a.lin.weight)
        inf_a.lin.bias.fill_(1.0)
        inf_b.lin.bias.fill_(1.0)
    assert sk.verify(inf_a, inf_b, x.abs(), atol=0) == {"output": 0.0}
    nan_b = Scaled(float("nan"))         # NaN facing NaN: only with equal_nan; NaN facing a number never
    nan_b.lin.load_state_dict(ref.lin.state_dict())
    with pytest.raises(sk.VerificationError, match=r"NaN in both"):
        sk.verify(bad, nan_b, x)
    assert sk.verify(bad, nan_b, x, equal_nan=True) == {"output": 0.0}
    with pytest.raises(sk.VerificationError, match=r"NaN in the candidate"):
        sk.verify(ref, bad, x, equal_nan=True)
    with pytest.raises(TypeError, match="equal_nan"):
        sk.verify(ref, ref, x, equal_nan="yes")


# ------------------------------------------------------------------------------------------ review fixes
def test_outputs_verify_cannot_see_fail_instead_of_passing():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        loss: float

    class Net(torch.nn.Module):
        def __init__(self, shift=0.0, loss=1.0):
            super().__init__()
            self.fc, self.shift, self.loss = torch.nn.Linear(4, 4), shift, loss

        def forward(self, x):
            return Out(self.fc(x) + self.shift, self.loss)

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    a = Net()
    b = Net(shift=100.0)
    b.fc = a.fc
    with pytest.raises(AssertionError, match=r"output\.logits"):
        sk.verify(a, b, x)
    c = Net(loss=6.0)
    c.fc = a.fc
    with pytest.raises(AssertionError, match=r"output\.loss: 1\.0 \(reference\) vs 6\.0"):
        sk.verify(a, c, x)

    class Nothing(torch.nn.Module):
        def forward(self, x):
            return None
    with pytest.raises(AssertionError, match="no tensor outputs"):
        sk.verify(Nothing(), Nothing(), x)

    class Complex(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign = sign

        def forward(self, x):
            return torch.complex(x, self.sign * x)
    with pytest.raises(AssertionError, match="max"):
        sk.verify(Complex(1.0), Complex(-1.0), x)


def test_verify_runs_both_in_eval_on_copies_of_the_inputs():
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    fast = copy.deepcopy(model).eval()
    x = torch.randn(8, 4)
    sk.verify(model, fast, x)                        # a fresh (train-mode) reference against an eval candidate
    assert model.training and int(model[1].num_batches_tracked) == 0

    class InPlace(torch.nn.Module):
        def forward(self, x):
            return x.mul_(2)
    before = x.clone()
    sk.verify(InPlace(), InPlace(), x)
    assert torch.equal(x, before)
