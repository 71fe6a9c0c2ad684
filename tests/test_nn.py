"""SparseLinear / SparseConv2d: conversion, forward equality, training with a fixed pattern, to_dense."""

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.formats import NM
from sparsekit.nn import SparseConv2d, SparseLinear, convert_modules


def _pruned_linear(n=64, k=96, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        keep = (torch.rand(n // 16, k // 16) < 0.4).repeat_interleave(16, 0).repeat_interleave(16, 1)
        lin.weight.mul_(keep)
    return lin


@pytest.mark.parametrize("format", ["bsr", "csr", "channel", "dense"])
def test_sparse_linear_matches(format):
    lin = _pruned_linear()
    sl = SparseLinear.from_dense(lin, format=format, block=16)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    back = sl.to_dense()
    assert isinstance(back, nn.Linear)
    torch.testing.assert_close(back.weight, lin.weight)
    assert sl.format == format and f"format={format}" in repr(sl)


def test_sparse_linear_nm():
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(NM.prune(lin.weight, 2, 4))
    sl = SparseLinear.from_dense(lin, format="nm", n=2, m=4)
    x = torch.randn(4, 32)
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format", ["bsr", "csr", "dense"])
@pytest.mark.parametrize("conv_kw", [dict(kernel_size=3, padding=1), dict(kernel_size=1),
                                     dict(kernel_size=3, stride=2, padding=1, groups=2),
                                     dict(kernel_size=(3, 1), padding="same"), dict(kernel_size=3, dilation=2)])
def test_sparse_conv_matches(format, conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, **conv_kw)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.5)
    sc = SparseConv2d.from_dense(conv, format=format, block=(16, 1))
    x = torch.randn(2, 16, 9, 11)
    torch.testing.assert_close(sc(x), conv(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc.to_dense().weight, conv.weight)


def test_training_keeps_pattern_and_matches_masked_dense():
    lin = _pruned_linear()
    mask = lin.weight.ne(0)
    sl = SparseLinear.from_dense(lin, format="bsr", block=16)
    ref = nn.Linear(96, 64)
    ref.load_state_dict(lin.state_dict())
    opt_s = torch.optim.SGD(sl.parameters(), lr=0.1)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 96, generator=torch.Generator().manual_seed(step))
        for model, opt in ((sl, opt_s), (ref, opt_r)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            ref.weight.mul_(mask)  # the masked dense model keeps its zeros by re-masking
    torch.testing.assert_close(sl.to_dense().weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sl.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip():
    sl = SparseLinear.from_dense(_pruned_linear(), format="bsr", block=16)
    sl2 = SparseLinear.from_dense(_pruned_linear(), format="bsr", block=16)
    with torch.no_grad():
        sl.values.mul_(2)
    sl2.load_state_dict(sl.state_dict())
    x = torch.randn(2, 96)
    torch.testing.assert_close(sl2(x), sl(x))


def test_convert_modules_and_verify():
    model = sk.models.FFN(dim=64, hidden=128, tokens=4)
    with torch.no_grad():
        model.fc1.weight.mul_((torch.rand(128 // 16, 64 // 16) < 0.3).repeat_interleave(16, 0)
                              .repeat_interleave(16, 1))
    masked = model
    import copy
    sparse = convert_modules(copy.deepcopy(masked), format="bsr", block=16)
    assert isinstance(sparse.fc1, SparseLinear)
    assert isinstance(sparse.fc2, nn.Linear) and sparse.sparsekit_skipped == {"fc2": "no zeros"}
    diffs = sk.verify(masked, sparse, model.example_input(2))
    assert max(diffs.values()) < 1e-4


def test_bad_input():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear.from_dense(nn.Linear(32, 32), format="coo")
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), format="csr")
    with pytest.raises(ValueError, match="does not divide"):
        SparseLinear.from_dense(nn.Linear(30, 32), format="bsr", block=16)


def test_cached_format_follows_moves_and_loads():
    """The forward reuses one format object; .to() and load_state_dict must still be seen."""
    lin = _pruned_linear()
    sl = SparseLinear.from_dense(lin, format="bsr", block=16)
    x = torch.randn(4, 96)
    assert sl.sparse_weight() is sl.sparse_weight()
    sl.to(torch.float64)
    torch.testing.assert_close(sl(x.double()), lin.double()(x.double()))
    other = SparseLinear.from_dense(_pruned_linear(seed=0), format="bsr", block=16).double()
    with torch.no_grad():
        other.values.mul_(2)
    sl.load_state_dict(other.state_dict())
    torch.testing.assert_close(sl(x.double()), other(x.double()))
