"""SparseConv1d: nn.Conv1d with a sparse weight, on its own, through sparsify / convert_modules, training, compile
and save / load."""

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.formats import NM
from sparsekit.nn import SparseConv1d, SparseConv2d, convert_modules, sparse_class


def _pruned_conv1d(seed: int = 0, **kw) -> nn.Conv1d:
    torch.manual_seed(seed)
    kw = {"in_channels": 16, "out_channels": 32, "kernel_size": 3, **kw}
    conv = nn.Conv1d(**kw)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.6)
        conv.weight[:8] = 0                                    # empty rows (block-rows of a 4x4 / 8x... BSR)
    return conv


@pytest.mark.parametrize("format,fmt_kw", [("bsr", {"block": (8, 1)}), ("csr", {}), ("channel", {}),
                                           ("dense", {})])
@pytest.mark.parametrize("conv_kw", [dict(padding=1), dict(kernel_size=1), dict(stride=2, padding=1, groups=2),
                                     dict(padding="same"), dict(padding="valid"), dict(dilation=2, bias=False),
                                     dict(in_channels=5, out_channels=24, kernel_size=5, padding=3)])
def test_matches_conv1d(format, fmt_kw, conv_kw):
    conv = _pruned_conv1d(**conv_kw)
    if format == "channel" and conv.groups > 1:      # as for SparseConv2d: refused when built
        with pytest.raises(ValueError, match="format='channel' needs groups=1"):
            SparseConv1d.from_dense(conv, format=format, **fmt_kw)
        return
    sc = SparseConv1d.from_dense(conv, format=format, **fmt_kw)
    x = torch.randn(3, conv.in_channels, 17)
    torch.testing.assert_close(sc(x), conv(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc(x[0]), conv(x[0]), rtol=1e-4, atol=1e-4)      # unbatched [C, L]
    back = sc.to_dense()
    assert type(back) is nn.Conv1d and back.kernel_size == conv.kernel_size and back.stride == conv.stride
    torch.testing.assert_close(back(x), conv(x), rtol=1e-5, atol=1e-5)
    assert sc.kernel_size == (1, conv.kernel_size[0]) and sparse_class(conv) is SparseConv1d


def test_nm_and_all_zero_weights():
    torch.manual_seed(1)
    conv = nn.Conv1d(8, 16, 4)
    with torch.no_grad():
        conv.weight.copy_(NM.prune(conv.weight.reshape(16, -1), 2, 4).reshape_as(conv.weight))
    x = torch.randn(2, 8, 11)
    torch.testing.assert_close(SparseConv1d.from_dense(conv, format="nm")(x), conv(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        conv.weight.zero_()
    for fmt in ("bsr", "csr"):
        torch.testing.assert_close(SparseConv1d.from_dense(conv, format=fmt, block=4)(x), conv(x))


def test_training_matches_masked_dense():
    conv = _pruned_conv1d(padding=1)
    mask = conv.weight.ne(0)
    sc = SparseConv1d.from_dense(conv, format="csr")
    ref = nn.Conv1d(16, 32, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    opt_s, opt_r = torch.optim.SGD(sc.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(step))
        for model, opt in ((sc, opt_s), (ref, opt_r)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            ref.weight.mul_(mask)
    torch.testing.assert_close(sc.to_dense().weight, ref.weight, rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(TypeError, match="conv must be an nn.Conv1d"):
        SparseConv1d.from_dense(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Conv1d(3, 4, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv1d.from_dense(nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), format="csr")
    sc = SparseConv1d.from_dense(_pruned_conv1d(), format="csr")
    with pytest.raises(ValueError, match=r"x must be \[N, C, L\]"):
        sc(torch.randn(2, 16, 3, 5))
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv1d / 2d / 3d or nn.ConvTranspose1d / 2d / 3d, got "
                                        "Bilinear"):
        sparse_class(nn.Bilinear(2, 2, 1))


class TCN(nn.Module):
    """A small temporal conv net: dilated Conv1d blocks with a residual and a pointwise head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(8, 64, 1)
        self.c1 = nn.Conv1d(64, 64, 3, padding=2, dilation=2)
        self.c2 = nn.Conv1d(64, 64, 3, padding="same")
        self.head = nn.Conv1d(64, 4, 1)

    def forward(self, x):
        h = self.inp(x)
        h = h + torch.relu(self.c2(torch.relu(self.c1(h))))
        return self.head(h)


def _pruned_tcn() -> TCN:
    torch.manual_seed(2)
    model = TCN().eval()
    x = torch.randn(2, 8, 40)
    pruner = sk.prune.Pruner(model, x, granularity="block", block=(16, 1), sparsity=0.75, ignore=["inp", "head"])
    pruner.step()
    pruner.bake()
    return model


def test_sparsify_swaps_conv1d_and_saves(tmp_path):
    model = _pruned_tcn()
    x = torch.randn(2, 8, 40)
    fast, report = sk.sparsify(model, x, formats=("bsr", "csr"), blocks=((16, 1),), min_speedup=1e-9, cache=False)
    assert isinstance(fast.c1, SparseConv1d) and isinstance(fast.c2, SparseConv1d)
    kinds = {d.name: d.kind for d in report.layers}
    assert kinds == {"c1": "conv1d", "c2": "conv1d"}
    sk.verify(model, fast, x, atol=1e-4)
    sk.verify(model, torch.compile(fast, fullgraph=True, backend="eager"), x, atol=1e-4)
    sk.save(fast, tmp_path)
    loaded = sk.load(tmp_path, TCN())
    assert type(loaded.c1) is type(fast.c1) and loaded.c1.format == fast.c1.format
    sk.verify(fast, loaded, x, atol=0)
    again, _ = sk.sparsify(loaded, x, formats=("csr",), min_speedup=1e-9, cache=False)   # measured anew
    assert again.c1.format == "csr"
    sk.verify(model, again, x, atol=1e-4)


def test_convert_modules_converts_conv1d():
    model = _pruned_tcn()
    x = torch.randn(2, 8, 40)
    with torch.no_grad():
        ref = model(x)
    fast = convert_modules(model, format="csr")
    assert isinstance(fast.c1, SparseConv1d) and fast.sparsekit_skipped["head"] == "no zeros"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref, atol=1e-4, rtol=1e-4)
