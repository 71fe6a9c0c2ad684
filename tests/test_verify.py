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
    with pytest.raises(TypeError, match="example_inputs"):
        sk.verify(a, a, {"x": 1})
