"""A sparse layer's .weight: the replaced layer's weight as a read-only view (sparsekit.weight_view)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk
from sparsekit.nn import (
    DenseWeightView,
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseConvTranspose1d,
    SparseConvTranspose2d,
    SparseLinear,
)


def _pruned(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.6)
    return layer


CASES = [
    (lambda: _pruned(nn.Linear(12, 8)), SparseLinear, {"format": "csr"}),
    (lambda: _pruned(nn.Linear(16, 8)), SparseLinear, {"format": "bsr", "block": 4}),
    (lambda: _pruned(nn.Linear(16, 8)), SparseLinear, {"format": "dense"}),
    (lambda: _pruned(nn.Conv1d(6, 4, 3)), SparseConv1d, {"format": "csr"}),
    (lambda: _pruned(nn.Conv2d(6, 4, 3, groups=2)), SparseConv2d, {"format": "csr"}),
    (lambda: _pruned(nn.Conv3d(4, 4, (1, 3, 3))), SparseConv3d, {"format": "csr"}),
    (lambda: _pruned(nn.ConvTranspose1d(6, 4, 2, stride=2)), SparseConvTranspose1d, {"format": "csr"}),
    (lambda: _pruned(nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)), SparseConvTranspose2d, {"format": "csr"}),
]


@pytest.mark.parametrize("make, cls, kw", CASES)
def test_view_reads_like_the_replaced_weight(make, cls, kw):
    dense = make()
    sparse = cls.from_dense(dense, **kw)
    w = sparse.weight
    assert isinstance(w, DenseWeightView) and not isinstance(w, torch.Tensor)
    assert w.shape == dense.weight.shape and w.size() == dense.weight.size() and w.size(0) == dense.weight.size(0)
    assert (w.dtype, w.device, w.ndim, w.dim(), w.numel()) == (dense.weight.dtype, dense.weight.device,
                                                               dense.weight.ndim, dense.weight.dim(),
                                                               dense.weight.numel())
    assert w.requires_grad and not w.is_cuda and not w.is_meta
    torch.testing.assert_close(w.dense(), dense.weight.detach())
    torch.testing.assert_close(w.abs(), dense.weight.detach().abs())        # a tensor method: on a dense copy
    torch.testing.assert_close(torch.sum(w), dense.weight.detach().sum())   # a torch function
    assert "DenseWeightView(shape=" in repr(w) and cls.__name__ in repr(w)
    sparse.to(torch.float64)
    assert sparse.weight.dtype == torch.float64


def test_computing_with_the_view_matches_and_trains_the_values():
    dense = _pruned(nn.Linear(16, 8))
    sparse = SparseLinear.from_dense(dense, format="bsr", block=4)
    x = torch.randn(3, 16)
    y = F.linear(x, sparse.weight, sparse.bias)
    torch.testing.assert_close(y, dense(x))
    y.sum().backward()
    assert sparse.values.grad is not None and sparse.values.grad.abs().sum() > 0
    torch.testing.assert_close(x @ sparse.weight.T, x @ dense.weight.detach().T)


@pytest.mark.parametrize("format", ["csr", "dense"])
def test_the_view_reads_as_a_tensor_would(format):
    """Indexing, operators, reading it into another tensor and freezing work as on a dense weight; a copy taken
    from it (format "dense" too) is not the stored Parameter."""
    dense = _pruned(nn.Linear(16, 8))
    sparse = SparseLinear.from_dense(dense, format=format)
    w, ref = sparse.weight, dense.weight.detach()
    torch.testing.assert_close(w[0], ref[0])
    assert len(w) == 8 and len(list(iter(w))) == 8
    for got, want in ((w * 2, ref * 2), (2 * w, 2 * ref), (w + 1, ref + 1), (1 - w, 1 - ref), (-w, -ref),
                      (w @ torch.ones(16), ref @ torch.ones(16)), (w / 2, ref / 2), (w ** 2, ref ** 2)):
        torch.testing.assert_close(got, want)
    buf = torch.zeros(8, 16)
    buf.add_(w)
    with torch.no_grad():
        torch.add(w, 0, out=buf)
    torch.testing.assert_close(buf, ref)
    assert w.requires_grad_(False) is w and not sparse.stored_weight().requires_grad
    w.detach().zero_()
    torch.testing.assert_close(sparse.weight.dense(), ref)


def test_a_view_of_anything_but_a_sparse_layer_is_refused():
    with pytest.raises(TypeError, match="layer must be a sparsekit sparse layer.*got Linear"):
        DenseWeightView(nn.Linear(2, 2))


def test_writes_through_the_view_raise():
    sparse = SparseLinear.from_dense(_pruned(nn.Linear(16, 8)), format="csr")
    before = sparse.values.detach().clone()
    with pytest.raises(TypeError, match="read-only dense view"):
        sparse.weight.zero_()
    with pytest.raises(TypeError, match="read-only dense view"):
        _ = sparse.weight.data
    with pytest.raises(TypeError, match="would write into the dense view"):
        torch.add(torch.ones(8, 16), 1, out=sparse.weight)
    with pytest.raises(TypeError, match="read-only dense view"):
        nn.init.zeros_(sparse.weight)
    torch.testing.assert_close(sparse.values, before)


class _PatchEmbed(nn.Module):
    """Hugging Face's ViT / CLIP pattern: the pixels are cast to the patch projection's weight dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, 16, 4, stride=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.projection.weight.dtype)
        return self.head(self.projection(x).flatten(2).mean(-1))


def test_a_model_that_reads_weight_dtype_sparsifies_compiles_and_exports():
    torch.manual_seed(0)
    model = _PatchEmbed().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = sk.prune.Pruner(model, x, criterion="magnitude", granularity="element", sparsity=0.9, ignore=[])
    pruner.step()
    fast, _ = sk.sparsify(model, x, formats=["csr"], min_speedup=1e-6, cache=False)
    assert isinstance(fast.projection, SparseConv2d)
    sk.verify(model, fast, x, atol=1e-5)
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fast(x))
    exported = torch.export.export(fast, (x,))
    torch.testing.assert_close(exported.module()(x), fast(x))
