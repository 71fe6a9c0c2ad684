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


def _pruned_conv(c_in, c_out, groups, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.6)
    return conv


def _modules():
    lin = _pruned_linear()
    nm_lin = nn.Linear(96, 64)
    with torch.no_grad():
        nm_lin.weight.copy_(NM.prune(nm_lin.weight, 2, 4))
    return [(SparseLinear.from_dense(lin, format="bsr", block=16), torch.randn(4, 96)),
            (SparseLinear.from_dense(lin, format="csr"), torch.randn(4, 96)),
            (SparseLinear.from_dense(nm_lin, format="nm"), torch.randn(4, 96)),
            (SparseConv2d.from_dense(_pruned_conv(8, 16, 1), format="bsr", block=8), torch.randn(2, 8, 6, 6)),
            (SparseConv2d.from_dense(_pruned_conv(8, 16, 2), format="csr"), torch.randn(2, 8, 6, 6))]


@pytest.mark.parametrize("i", range(5))
def test_modules_pickle_save_and_copy_after_inference(i):
    """The cached format (and the op faces' per-call state on it) stays out of pickles and copies."""
    import copy
    import io
    import pickle

    mod, x = _modules()[i]
    with torch.no_grad():
        y = mod(x)
        mod(x)
    assert "_format_cache" in mod.__dict__
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    for c in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
        assert "_format_cache" not in c.__dict__
        with torch.no_grad():
            torch.testing.assert_close(c(x), y)
        torch.testing.assert_close(c(x), y)            # with autograd too


@pytest.mark.parametrize("format, block", [("csr", None), ("bsr", (8, 4))])
@pytest.mark.parametrize("depthwise", [False, True], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_conv_export(format, block, depthwise):
    """torch.export cannot read the index data, so the groups split at offsets computed when the module was built."""
    c = 16
    conv = _pruned_conv(c, c if depthwise else 2 * c, c if depthwise else 2)
    if depthwise:
        block = None if block is None else (1, 3)   # one output channel per group, K = 9
    mod = SparseConv2d.from_dense(conv, format=format, **({"block": block} if block else {}))
    x = torch.randn(2, c, 9, 9)
    exported = torch.export.export(mod, (x,))
    torch.testing.assert_close(exported.module()(x), conv(x), rtol=1e-4, atol=1e-5)
    assert any("sparsekit" in str(n.target) for n in exported.graph.nodes)
    compiled = torch.compile(mod, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), conv(x), rtol=1e-4, atol=1e-5)


def test_grouped_conv_offsets_follow_load_state_dict():
    """Same nnz, different split between the groups: loading in place must refresh the per-group offsets."""
    w1 = torch.tensor([[1.0, 0], [0, 0], [2, 3], [4, 0]]).reshape(4, 2, 1, 1)   # groups hold 1 and 3 entries
    w2 = torch.tensor([[1.0, 5], [6, 0], [0, 0], [7, 0]]).reshape(4, 2, 1, 1)   # 3 and 1
    convs = []
    for w in (w1, w2):
        conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        convs.append(conv)
    mod = SparseConv2d.from_dense(convs[0], format="csr")
    mod.load_state_dict(SparseConv2d.from_dense(convs[1], format="csr").state_dict())
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(mod(x), convs[1](x))
    torch.testing.assert_close(torch.export.export(mod, (x,)).module()(x), convs[1](x))


def test_sparse_conv_to_dense_keeps_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, dilation=2)
    sc = SparseConv2d.from_dense(conv, format="csr")
    x = torch.randn(2, 16, 11, 11)
    torch.testing.assert_close(sc.to_dense()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_frozen_layers_stay_frozen_through_from_dense_and_to_dense():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    lin.weight.requires_grad_(False)                      # a frozen weight, a trained bias
    conv = nn.Conv2d(4, 8, 3).requires_grad_(False)
    conv1d = nn.Conv1d(4, 8, 3).requires_grad_(False)
    for fmt in ("csr", "dense"):
        sl = SparseLinear.from_dense(lin, fmt)
        trained = sl.values if fmt != "dense" else sl.weight2d
        assert not trained.requires_grad and sl.bias.requires_grad
        back = sl.to_dense()
        assert not back.weight.requires_grad and back.bias.requires_grad
        for cls, src in ((SparseConv2d, conv), (sk.nn.SparseConv1d, conv1d)):
            sc = cls.from_dense(src, fmt)
            assert not any(p.requires_grad for p in sc.parameters())
            assert not any(p.requires_grad for p in sc.to_dense().parameters())


def test_channel_format_refuses_a_grouped_conv():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with torch.no_grad():
        conv.weight[::2] = 0                          # zeros: convert_modules tries it
    with pytest.raises(ValueError, match="format='channel' needs groups=1"):
        SparseConv2d.from_dense(conv, "channel")
    converted = convert_modules(nn.Sequential(conv), format="channel")
    assert isinstance(converted[0], nn.Conv2d)         # left dense, with the reason recorded
    assert any("groups" in str(r) for r in getattr(converted, "sparsekit_skipped", {}).values())


def test_a_masked_layer_converted_under_no_grad_still_trains():
    """sparsify builds its candidates under torch.no_grad: a masked (parametrized) layer's trainability comes
    from its stored original, not from the recomputed weight (which has no grad there)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    sk.prune.masks.apply_mask(lin, torch.rand(8, 16) > 0.5)
    with torch.no_grad():
        sl = SparseLinear.from_dense(lin, "csr")
    assert sl.values.requires_grad and sl.bias.requires_grad
    convt = nn.ConvTranspose2d(8, 4, 2, 2)
    sk.prune.masks.apply_mask(convt, torch.rand(convt.weight.shape) > 0.5)
    convt.parametrizations.weight.original.requires_grad_(False)
    with torch.no_grad():
        sc = sk.nn.SparseConvTranspose2d.from_dense(convt, "csr")
    assert not sc.values.requires_grad and sc.bias.requires_grad
