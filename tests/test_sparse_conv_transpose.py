"""Sparse transposed convolutions (ops.sparse_conv_transpose2d / 3d, SparseConvTranspose1d / 2d / 3d) against torch's
conv_transpose*d: random geometry, odd sizes, every format, 0% and 100% sparsity, gradients, errors, sparsify and
save / load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk
from sparsekit import _extension
from sparsekit.formats import BSR, CSR, NM, ChannelIndex
from sparsekit.nn import SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d, convert_modules
from sparsekit.ops.conv_transpose import sparse_conv_transpose2d, sparse_conv_transpose3d, transposed_weight2d

OPS = {2: (sparse_conv_transpose2d, F.conv_transpose2d), 3: (sparse_conv_transpose3d, F.conv_transpose3d)}
# kernel, stride, padding, output_padding, dilation
# (2, 2, *): taps tile the output (copied, no zero fill); (3, 3, 2, 2): disjoint taps, not tiling; others overlap
# (3, 1, 0, 1, 2): output_padding >= stride (allowed when dilation > stride)
GEOMETRY = [(2, 2, 0, 0, 1), (2, 2, 1, 0, 1), (3, 2, 1, 1, 1), (4, 2, 1, 0, 1), (3, 1, 1, 0, 2), (3, 1, 0, 1, 2),
            (1, 1, 0, 0, 1), (3, 3, 2, 2, 1)]


def _weight(c_in: int, c_out: int, kernel: int, nd: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(c_in, c_out, *([kernel] * nd), generator=gen)
    return w * (torch.rand(w.shape, generator=gen) >= sparsity)


def _formats(w2d: torch.Tensor) -> dict:
    out = {"dense": w2d, "csr": CSR.from_dense(w2d), "channel": ChannelIndex.from_dense(w2d, dim=0)}
    if w2d.shape[0] % 4 == 0 and w2d.shape[1] % 4 == 0:
        out["bsr4x4"] = BSR.from_dense(w2d, block=(4, 4))
    if w2d.shape[1] % 4 == 0:
        out["nm2:4"] = NM.from_dense(NM.prune(w2d, 2, 4), 2, 4)
    return out


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("geometry", GEOMETRY)
def test_every_format_matches_torch(nd, geometry):
    k, s, p, op, d = geometry
    gen = torch.Generator().manual_seed(k * 10 + s + nd)
    c_in, c_out = 12, 5                          # odd widths: C_out * taps rows not a multiple of anything
    size = [5, 4, 3][:nd] if nd == 3 else [5, 7]
    x = torch.randn(2, c_in, *size, generator=gen)
    w = _weight(c_in, c_out, k, nd, 0.7, gen)
    bias = torch.randn(c_out, generator=gen)
    ours, theirs = OPS[nd]
    for name, fmt in _formats(transposed_weight2d(w)).items():
        dense = fmt.to_dense() if not isinstance(fmt, torch.Tensor) else fmt
        ref = theirs(x, dense.reshape(c_out, *([k] * nd), c_in).movedim(-1, 0), bias, s, p, op, 1, d)
        y = ours(x, fmt, bias, s, p, op, d, kernel_size=k)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, msg=f"{name} {geometry}")


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_no_and_all_zeros(sparsity):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 3, 5, generator=gen)
    w = _weight(8, 4, 3, 2, sparsity, gen)
    ref = F.conv_transpose2d(x, w, None, 2, 1)
    for fmt in (CSR.from_dense(transposed_weight2d(w)), BSR.from_dense(transposed_weight2d(w), block=(4, 4))):
        torch.testing.assert_close(sparse_conv_transpose2d(x, fmt, None, 2, 1, kernel_size=3), ref, rtol=1e-5,
                                   atol=1e-5)


def test_bfloat16_matches_torch_within_rounding():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 6, 6, generator=gen).bfloat16()
    w = _weight(16, 8, 2, 2, 0.8, gen).bfloat16()
    ref = F.conv_transpose2d(x.float(), w.float(), None, 2)
    for fmt in (CSR.from_dense(transposed_weight2d(w)), BSR.from_dense(transposed_weight2d(w), block=(16, 16))):
        y = sparse_conv_transpose2d(x, fmt, None, 2, kernel_size=2)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not _extension.LOADED, reason="the tiled store is a C++ CPU op")
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_tiled_geometries_take_the_tiled_op_and_others_the_columns(fmt):
    """kernel == stride without padding: *_mm_xt_tiled (the GEMM stored at its output pixels); padding,
    output_padding, dilation or overlapping taps: *_mm_xt and the strided adds."""
    gen = torch.Generator().manual_seed(6)
    cases = {(2, 2, 0, 0, 1): True, (3, 3, 0, 0, 1): True, (2, 2, 1, 0, 1): False, (2, 2, 0, 1, 1): False,
             (2, 2, 0, 0, 2): False, (4, 2, 1, 0, 1): False}      # kernel, stride, padding, output_padding, dilation
    for (k, s, p, op, d), tiled in cases.items():
        x = torch.randn(2, 8, 5, 6, generator=gen)
        w = _weight(8, 4, k, 2, 0.5, gen)
        w2d = transposed_weight2d(w)
        sparse = BSR.from_dense(w2d, block=(4, 4)) if fmt == "bsr" else CSR.from_dense(w2d)
        bias = torch.randn(4, generator=gen)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = sparse_conv_transpose2d(x, sparse, bias, s, p, op, d, kernel_size=k)
        ran = {e.name for e in prof.events()}
        assert (f"sparsekit::{fmt}_mm_xt_tiled" in ran) == tiled, (k, s, p, op, d, sorted(ran))
        assert (f"sparsekit::{fmt}_mm_xt" in ran) == (not tiled), (k, s, p, op, d)
        torch.testing.assert_close(y, F.conv_transpose2d(x, w, bias, s, p, op, 1, d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, padding, output_padding", [(3, 2, 1, 1), (2, 2, 0, 0), (2, 2, 1, 0)])
def test_gradients_match_torch_in_float64(kernel, stride, padding, output_padding):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = _weight(6, 3, kernel, 2, 0.5, gen).double()
    bias = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    csr = CSR.from_dense(transposed_weight2d(w))
    values = csr.values.clone().requires_grad_(True)
    fmt = CSR(values=values, crow_indices=csr.crow_indices, col_indices=csr.col_indices, shape=csr.shape)
    y = sparse_conv_transpose2d(x, fmt, bias, stride, padding, output_padding, kernel_size=kernel)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    y.backward(grad)
    wd = w.clone().requires_grad_(True)
    x2, b2 = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    F.conv_transpose2d(x2, wd, b2, stride, padding, output_padding).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    dense_grad = CSR(values=values.grad, crow_indices=csr.crow_indices, col_indices=csr.col_indices,
                     shape=csr.shape).to_dense()
    kept = transposed_weight2d(w) != 0
    torch.testing.assert_close(dense_grad, transposed_weight2d(wd.grad) * kept)    # dW on the pattern only


def test_bad_arguments_name_what_was_expected():
    x = torch.randn(1, 8, 4, 4)
    w = CSR.from_dense(transposed_weight2d(torch.randn(8, 4, 3, 3)))
    with pytest.raises(ValueError, match="kernel_size is required"):
        sparse_conv_transpose2d(x, w)
    with pytest.raises(ValueError, match="groups must be 1"):
        sparse_conv_transpose2d(x, w, kernel_size=3, groups=2)
    with pytest.raises(ValueError, match="K=8 columns but x has C_in=6"):
        sparse_conv_transpose2d(torch.randn(1, 6, 4, 4), w, kernel_size=3)
    with pytest.raises(ValueError, match="N=36 rows, not a multiple of kh\\*kw = 25"):
        sparse_conv_transpose2d(x, w, kernel_size=5)
    with pytest.raises(ValueError, match="output_padding"):
        sparse_conv_transpose2d(x, w, stride=2, output_padding=2, kernel_size=3)
    with pytest.raises(ValueError, match="4-D"):
        sparse_conv_transpose2d(x[0], w, kernel_size=3)
    with pytest.raises(ValueError, match="bias"):
        sparse_conv_transpose2d(x, w, torch.zeros(5), kernel_size=3)
    with pytest.raises(ValueError, match="stores entries between its groups.*C_in / groups = 4"):
        SparseConvTranspose2d.from_dense(nn.ConvTranspose2d(8, 4, 3, groups=2), "bsr", block=(36, 8))


@pytest.mark.parametrize("cls, dense", [
    (SparseConvTranspose1d, nn.ConvTranspose1d(16, 8, 4, 2, 1)),
    (SparseConvTranspose2d, nn.ConvTranspose2d(16, 8, 3, 2, 1, 1)),
    (SparseConvTranspose3d, nn.ConvTranspose3d(16, 8, 2, 2)),
])
def test_modules_round_trip_train_and_run_unbatched(cls, dense):
    torch.manual_seed(4)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.25)
    nd = dense.weight.dim() - 2
    x = torch.randn(2, 16, *([5] * nd))
    for fmt in ("csr", "bsr", "dense"):
        sparse = cls.from_dense(dense, fmt, block=(8, 8))
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(x[0]), dense(x[0]), rtol=1e-5, atol=1e-5)
        back = sparse.to_dense()
        assert type(back) is type(dense) and torch.equal(back.weight, dense.weight)
    sparse = cls.from_dense(dense, "csr")
    sparse(x).square().mean().backward()         # the values train, the pattern stays
    assert sparse.values.grad is not None and sparse.values.grad.abs().sum() > 0


def test_sparsify_convert_save_and_load(tmp_path):
    def decoder() -> nn.Module:
        return nn.Sequential(nn.ConvTranspose2d(32, 16, 2, 2), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1))

    torch.manual_seed(5)
    model = decoder().eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < 0.1)
    x = torch.randn(2, 32, 8, 8)
    fast, report = sk.sparsify(model, x, formats=["csr", "bsr"], min_speedup=1e-9, cache=False, reps=2)
    (row,) = [r for r in report.layers if r.name == "0"]
    assert row.choice != "dense" and isinstance(fast[0], SparseConvTranspose2d)
    sk.verify(model, fast, x)
    sk.save(fast, tmp_path / "dec")
    back = sk.load(tmp_path / "dec", decoder()).eval()
    assert isinstance(back[0], SparseConvTranspose2d)
    sk.verify(fast, back, x, atol=0)
    converted = convert_modules(decoder(), format="csr")
    assert isinstance(converted[0], nn.ConvTranspose2d) and converted.sparsekit_skipped["0"] == "no zeros"
    grouped = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, 2, groups=2))
    with torch.no_grad():
        grouped[0].weight[0] = 0
    assert isinstance(convert_modules(grouped, format="csr")[0], SparseConvTranspose2d)


@pytest.mark.parametrize("cls, dense", [
    (SparseConvTranspose1d, nn.ConvTranspose1d(16, 24, 4, 2, 1, groups=4)),
    (SparseConvTranspose2d, nn.ConvTranspose2d(16, 8, 3, 2, 1, 1, groups=2)),
    (SparseConvTranspose3d, nn.ConvTranspose3d(16, 16, 2, 2, groups=16)),     # depthwise
])
def test_grouped_transposed_convs(cls, dense, tmp_path):
    """A grouped transposed conv runs as the equal ungrouped one (zero between the groups, never stored):
    same outputs, round trip, training, save / load, sparsify."""
    torch.manual_seed(6)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.3)
    nd = dense.weight.dim() - 2
    x = torch.randn(2, 16, *([4] * nd))
    for fmt, block in (("csr", 8), ("bsr", (4, 1)), ("dense", 8)):
        sparse = cls.from_dense(dense, fmt, block=block)
        assert sparse.groups == dense.groups
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
        back = sparse.to_dense()
        assert back.groups == dense.groups and torch.equal(back.weight, dense.weight)
        sparse(x).square().mean().backward()
        assert torch.equal(sparse.to_dense().weight != 0, dense.weight != 0) or fmt == "dense"
    model = nn.Sequential(dense).eval()
    fast, report = sk.sparsify(model, x, formats=["csr"], min_speedup=1e-9, cache=False, reps=1,
                               measure_model=False)
    assert isinstance(fast[0], cls) and fast[0].groups == dense.groups
    sk.verify(model, fast, x)
    sk.save(fast, tmp_path / "g")
    loaded = sk.load(tmp_path / "g", nn.Sequential(type(dense)(dense.in_channels, dense.out_channels,
                                                              dense.kernel_size, dense.stride, dense.padding,
                                                              dense.output_padding, dense.groups)))
    assert loaded[0].groups == dense.groups
    sk.verify(fast, loaded, x, atol=0)
    with torch.device("meta"):                   # a meta skeleton (nothing to check the groups against there)
        skeleton = nn.Sequential(type(dense)(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride,
                                             dense.padding, dense.output_padding, dense.groups))
    sk.verify(fast, sk.load(tmp_path / "g", skeleton), x, atol=0)


def test_pruner_element_and_block_granularity_reach_transposed_convs():
    """Weight / gradient criteria prune a transposed conv at element, block and n:m granularity (blocks over its
    weight's own 2-D view [C_in, C_out * taps]; n:m along C_in); sparsify then runs it sparse. A criterion
    reading activations leaves it dense, saying so."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.up = nn.Conv2d(32, 64, 3, padding=1), nn.ConvTranspose2d(64, 32, 2, 2)

        def forward(self, x):
            return self.up(torch.relu(self.c1(x)))

    torch.manual_seed(6)
    x = torch.randn(2, 32, 6, 6)
    model = Up().eval()
    pruner = sk.prune.Pruner(model, x, criterion="magnitude", granularity="block", block=(32, 32), sparsity=0.75,
                             scope="layer")
    pruner.step()
    assert list(pruner.layers) == ["c1", "up"]
    blocks = (model.up.weight.detach().reshape(64, 128) != 0).reshape(2, 32, 4, 32).any(3).any(1)
    assert int(blocks.sum()) == 2                     # 8 blocks of 32x32, 6 removed
    fast, report = sk.sparsify(model, x, formats=["bsr"], min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert isinstance(fast.up, SparseConvTranspose2d) and fast.up.format == "bsr"
    sk.verify(model, fast, x)
    taylor = sk.prune.Pruner(Up(), x, criterion="taylor", granularity="element", sparsity=0.5,
                             calib=[(x, torch.randn(2, 32, 12, 12))], loss_fn=lambda out, t: (out - t).square().mean())
    taylor.step()
    assert "up" in taylor.layers and abs(float((taylor.model.up.weight == 0).float().mean()) - 0.5) < 0.01
    nm_model = Up().eval()
    nm = sk.prune.Pruner(nm_model, x, criterion="magnitude", granularity="nm", n=2, m=4)
    nm.step()
    gemm = transposed_weight2d(nm_model.up.weight.detach())          # [C_out * taps, C_in]: 2 of every 4 along C_in
    assert "up" in nm.layers and torch.equal((gemm != 0).reshape(128, 16, 4).sum(-1), torch.full((128, 16), 2))
    fast, _ = sk.sparsify(nm_model, x, formats=["nm"], min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert isinstance(fast.up, SparseConvTranspose2d) and fast.up.format == "nm"
    sk.verify(nm_model, fast, x)
    with pytest.warns(UserWarning, match="transposed convs \\['up'\\] are not pruned: criterion 'apoz'"):
        sk.prune.Pruner(Up(), x, criterion="apoz", calib=[x], granularity="nm", n=2, m=4)
    with pytest.raises(ValueError, match="criterion 'fpgm' gives one score per output channel"):   # (filters)
        sk.prune.Pruner(Up(), x, criterion="fpgm", granularity="nm", n=2, m=4, ignore=["c1"]).step()
    with pytest.raises(ValueError, match="m=3 does not divide"):
        sk.prune.Pruner(Up(), x, criterion="magnitude", granularity="nm", n=2, m=3, sparsity=1 - 2 / 3,
                        ignore=["c1"])


@pytest.mark.parametrize("cls, dense, size", [
    (SparseConvTranspose2d, nn.ConvTranspose2d(8, 4, 3, 2, 1), (5, 6)),
    (SparseConvTranspose1d, nn.ConvTranspose1d(8, 4, 3, 2, 1), (7,)),
    (SparseConvTranspose3d, nn.ConvTranspose3d(8, 4, 2, 3), (2, 3, 2)),
])
def test_output_size_as_nn_conv_transpose_takes_it(cls, dense, size):
    """forward(x, output_size) picks the output padding (U-Net decoders matching a skip's odd size)."""
    torch.manual_seed(7)
    x = torch.randn(2, 8, *size)
    sparse = cls.from_dense(dense, "csr")
    for extra in range(max(dense.stride)):
        target = [(n - 1) * s - 2 * p + dense.kernel_size[i] + min(extra, s - 1)
                  for i, (n, s, p) in enumerate(zip(size, dense.stride, dense.padding))]
        ref = dense(x, output_size=target)
        torch.testing.assert_close(sparse(x, output_size=target), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(x, output_size=[2, 4, *target]), ref, rtol=1e-5, atol=1e-5)
        unbatched = dense(x[0], output_size=target)
        torch.testing.assert_close(sparse(x[0], output_size=target), unbatched, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(x[0], output_size=[4, *target]), unbatched, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output_size"):
        sparse(x, output_size=[n * 10 for n in size])
    with pytest.raises(ValueError, match="output_size must be the"):        # neither spatial nor the whole shape
        sparse(x, output_size=[9, 2, 4, *size])


def test_cost_counts_index_entries_of_a_sparse_transposed_conv():
    """model_cost's index_params charges an index per kept weight of an element-pruned transposed conv, as it
    does for a conv (a sparse format stores one)."""
    from sparsekit.prune.cost import model_cost

    for layer in (nn.Conv2d(8, 8, 2, 2), nn.ConvTranspose2d(8, 8, 2, 2)):
        model = nn.Sequential(layer)
        x = torch.randn(1, 8, 4, 4)
        sk.prune.Pruner(model, x, criterion="magnitude", granularity="element", sparsity=0.5).step()
        cost = model_cost(model, x)
        assert cost["params"] == 136 and cost["index_params"] == 136 + 128, (type(layer).__name__, cost)


def test_channel_pruning_leaves_a_final_transposed_conv_as_the_output_layer():
    """The default ignore is the last layer to run, a transposed conv included (it used to ignore the last conv,
    which was then never pruned); a model with no prunable group warns at step()."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(16, 3, 2, 2))
    x = torch.randn(2, 3, 8, 8)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    assert pruner.ignored == {"4"}
    pruner.step()
    small = pruner.compact()
    assert (small[0].out_channels, small[2].out_channels, small[4].out_channels) == (8, 8, 3)
    sk.verify(model, small, x, atol=1e-5)
    lone = nn.Sequential(nn.ConvTranspose2d(8, 4, 2, 2))
    y = torch.randn(2, 8, 4, 4)
    quiet = sk.prune.Pruner(lone, y, criterion="mean_activation", calib=[y], granularity="channel", sparsity=0.5,
                            ignore=[])
    with pytest.warns(UserWarning, match="no channel group can be pruned"):
        quiet.step()


def test_transposed_weight2d_rejects_what_is_not_a_transposed_conv_weight():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        transposed_weight2d([[1.0]])
    with pytest.raises(ValueError, match=r"weight must be \[C_in, C_out, \*kernel\].*\(4, 6\)"):
        transposed_weight2d(torch.zeros(4, 6))


def test_channel_format_with_a_bias_under_cpu_autocast():
    """A channel-compacted weight with a bias under bf16 autocast: the bias follows the product's dtype (the
    tiled 2x2 stride-2 case hands the bias to channel_linear, whose index_add mixed float32 and bf16)."""
    gen = torch.Generator().manual_seed(11)
    x, weight = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(4, 2, 2, 2, generator=gen)
    weight[:, 1] = 0.0                                            # output channel 1 gone: compacted rows
    bias = torch.randn(2, generator=gen)
    w = ChannelIndex.from_dense(transposed_weight2d(weight), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sparse_conv_transpose2d(x, w, bias, 2, kernel_size=2)
        ref = F.conv_transpose2d(x, weight, bias, 2)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours.float(), ref.float(), atol=3e-2, rtol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):        # the same through channel_linear directly
        y = sk.ops.channel_linear(torch.randn(3, 4), ChannelIndex.from_dense(torch.randn(5, 4), dim=0),
                                  torch.randn(5))
    assert y.dtype == torch.bfloat16
