"""Formats: round trips, counts, .to(), validate(), state_dict, and clear errors."""

import pytest
import torch

from sparsekit.formats import BSR, CSR, NM, ChannelIndex


def _block_sparse(n, k, block, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bn, bk = block
    keep = torch.rand(n // bn, k // bk, generator=g) < density
    w = torch.randn(n, k, generator=g, dtype=dtype)
    return w * keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)


@pytest.mark.parametrize("block", [(1, 4), (4, 1), (16, 1), (16, 16), (32, 32), (16, 32), (128, 128), (1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bsr_round_trip(block, density):
    w = _block_sparse(128, 256, block, density)
    b = BSR.from_dense(w, block=block).validate()
    assert b.block == block
    assert torch.equal(b.to_dense(), w)
    assert b.nnzb == int(w.reshape(128 // block[0], block[0], 256 // block[1], block[1]).ne(0).any(3).any(1).sum())
    assert b.nnz == b.nnzb * block[0] * block[1]
    assert b.density == pytest.approx(b.nnz / w.numel())


def test_bsr_int_block_and_empty_rows():
    w = torch.zeros(64, 64)
    w[32:48, 16:32] = 1.0
    b = BSR.from_dense(w, block=16)
    assert b.block == (16, 16) and b.nnzb == 1
    assert b.crow_indices.tolist() == [0, 0, 0, 1, 1]
    assert b.col_indices.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_to(dtype):
    w = _block_sparse(32, 64, (16, 16), 0.5, dtype=dtype)
    for fmt in (BSR.from_dense(w, 16), CSR.from_dense(w), CSR.from_dense(w, bitmap=True),
                NM.from_dense(NM.prune(w, 2, 4), 2, 4), ChannelIndex.from_dense(w)):
        assert fmt.dtype == dtype
        f32 = fmt.to(dtype=torch.float32)
        assert f32.dtype == torch.float32 and type(f32) is type(fmt)
        assert torch.equal(f32.to_dense(), fmt.to_dense().float())
        # indices keep their integer dtype
        for name in fmt._present_tensors():
            if name != "values":
                assert getattr(f32, name).dtype == getattr(fmt, name).dtype


def test_csr_round_trip_and_index_width():
    w = torch.randn(33, 70) * (torch.rand(33, 70) > 0.8)
    c = CSR.from_dense(w).validate()
    assert torch.equal(c.to_dense(), w)
    assert c.col_indices.dtype == torch.int16        # K fits 16 bits
    assert c.nnz == int(w.ne(0).sum())
    wide = torch.zeros(2, 40000)
    wide[1, 39999] = 3.0
    cw = CSR.from_dense(wide).validate()
    assert cw.col_indices.dtype == torch.int32 and torch.equal(cw.to_dense(), wide)


def test_csr_memory_at_90_percent():
    w = torch.randn(3072, 768) * (torch.rand(3072, 768) > 0.9)
    c = CSR.from_dense(w)
    assert c.nbytes <= 0.16 * w.numel() * w.element_size()


def test_bsr_memory_at_90_percent_blocks():
    w = _block_sparse(3072, 768, (32, 32), 0.1)
    b = BSR.from_dense(w, 32)
    assert b.nbytes <= 0.12 * w.numel() * w.element_size()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 16)])
def test_nm_prune_and_round_trip(n, m):
    w = torch.randn(24, 64)
    p = NM.prune(w, n, m)
    groups = p.reshape(24, 64 // m, m)
    assert int(groups.ne(0).sum(-1).max()) <= n
    # the kept ones are the largest in magnitude
    kept_min = torch.where(groups.ne(0), groups.abs(), torch.inf).min(-1).values
    dropped_max = torch.where(groups.eq(0), w.reshape(24, 64 // m, m).abs(), -torch.inf).max(-1).values
    assert bool((kept_min >= dropped_max).all())
    nm = NM.from_dense(p, n, m).validate()
    assert torch.equal(nm.to_dense(), p)
    assert nm.values.shape == (24, 64 // m * n) and nm.indices.dtype == torch.uint8


def test_nm_from_dense_with_fewer_nonzeros_than_n():
    w = torch.zeros(4, 8)
    w[0, 3] = 1.0
    nm = NM.from_dense(w, 2, 4).validate()
    assert torch.equal(nm.to_dense(), w)


def test_channel_index():
    w = torch.randn(10, 6)
    w[[1, 4, 9]] = 0
    c = ChannelIndex.from_dense(w).validate()
    assert c.indices.tolist() == [0, 2, 3, 5, 6, 7, 8] and c.values.shape == (7, 6)
    assert torch.equal(c.to_dense(), w)
    w2 = torch.randn(5, 8)
    w2[:, [0, 7]] = 0
    c2 = ChannelIndex.from_dense(w2, dim=1).validate()
    assert c2.values.shape == (5, 6) and torch.equal(c2.to_dense(), w2)


def test_state_dict_round_trip():
    w = _block_sparse(64, 64, (16, 16), 0.4)
    for fmt in (BSR.from_dense(w, (16, 16)), CSR.from_dense(w), NM.from_dense(NM.prune(w, 2, 4), 2, 4),
                ChannelIndex.from_dense(w)):
        sd = fmt.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        back = type(fmt).from_state_dict(sd)
        assert torch.equal(back.to_dense(), fmt.to_dense())
        # a module's state_dict can hold it (buffers) and load it back
        mod = torch.nn.Module()
        for k, v in sd.items():
            mod.register_buffer(k, v)
        assert type(fmt).from_state_dict(dict(mod.state_dict())).shape == fmt.shape


# ------------------------------------------------------------------------------------------- bad input
def test_block_not_dividing_names_remedy():
    with pytest.raises(ValueError, match=r"does not divide.*Remedy"):
        BSR.from_dense(torch.randn(100, 64), block=32)


@pytest.mark.parametrize("block,exc", [((0, 4), ValueError), ((129, 1), ValueError), ("32", TypeError),
                                       ((32,), TypeError), ((2.0, 2), TypeError)])
def test_bad_block(block, exc):
    with pytest.raises(exc, match="block"):
        BSR.from_dense(torch.randn(256, 256), block=block)


def test_weight_must_be_2d_float_tensor():
    with pytest.raises(ValueError, match="2-D"):
        CSR.from_dense(torch.randn(4, 4, 3))
    with pytest.raises(TypeError, match="floating"):
        CSR.from_dense(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        BSR.from_dense([[1.0]], block=1)


def test_nm_errors():
    with pytest.raises(ValueError, match="n must satisfy"):
        NM.prune(torch.randn(4, 8), 4, 4)
    with pytest.raises(ValueError, match="not a multiple of m"):
        NM.prune(torch.randn(4, 10), 2, 4)
    with pytest.raises(ValueError, match=r"not 2:4 sparse.*NM.prune"):
        NM.from_dense(torch.randn(4, 8), 2, 4)


def test_validate_catches_corruption():
    b = BSR.from_dense(_block_sparse(64, 64, (16, 16), 0.5, seed=3), 16)
    bad = BSR(values=b.values, crow_indices=b.crow_indices, col_indices=b.col_indices.flip(0), shape=b.shape)
    if b.nnzb > 1:
        with pytest.raises(ValueError, match="col_indices"):
            bad.validate()
    with pytest.raises(ValueError, match="crow_indices"):
        BSR(values=b.values, crow_indices=b.crow_indices[:-1].contiguous(), col_indices=b.col_indices,
            shape=b.shape).validate()
    with pytest.raises(TypeError, match="col_indices"):
        BSR(values=b.values, crow_indices=b.crow_indices, col_indices=b.col_indices.long(), shape=b.shape).validate()


def _all_formats():
    w = _block_sparse(32, 64, (16, 16), 0.5, seed=5)
    return (BSR.from_dense(w, 16), CSR.from_dense(w), NM.from_dense(NM.prune(w, 2, 4), 2, 4),
            ChannelIndex.from_dense(w))


def test_validate_rejects_non_contiguous_tensors():
    """The kernels read every format tensor as one dense run; validate() says so instead of a kernel error."""
    for fmt in _all_formats():
        v = fmt.values
        strided = torch.empty(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)[..., ::2].copy_(v)
        bad = type(fmt)(**{**{f: getattr(fmt, f) for f in fmt.__dataclass_fields__}, "values": strided})
        with pytest.raises(ValueError, match=r"values must be contiguous.*values\.contiguous\(\)"):
            bad.validate()
        # a saved view is data all the same: from_state_dict makes it contiguous
        back = type(fmt).from_state_dict({**fmt.state_dict(), "values": strided})
        assert back.values.is_contiguous() and torch.equal(back.to_dense(), fmt.to_dense())
    b = _all_formats()[0]
    col = torch.empty(2 * b.nnzb, dtype=torch.int32)[::2].copy_(b.col_indices)
    with pytest.raises(ValueError, match=r"col_indices must be contiguous.*col_indices\.contiguous\(\)"):
        BSR(values=b.values, crow_indices=b.crow_indices, col_indices=col, shape=b.shape).validate()


@pytest.mark.parametrize("shape, match", [((32.0, 64), "pair of ints"), ((-32, 64), "non-negative"),
                                          ([32, 64], "pair of ints"), ((32, 64, 1), "pair of ints")])
def test_validate_checks_shape(shape, match):
    for fmt in _all_formats():
        bad = type(fmt)(**{**{f: getattr(fmt, f) for f in fmt.__dataclass_fields__}, "shape": shape})
        with pytest.raises(ValueError, match=match):
            bad.validate()


def test_to_takes_a_dtype_first_like_tensor_to():
    for fmt in _all_formats():
        half = fmt.to(torch.float16)
        assert half.dtype == torch.float16 and half.device == fmt.device
        assert torch.equal(half.to_dense(), fmt.to_dense().half())
        assert fmt.to("cpu", torch.float64).dtype == torch.float64
        with pytest.raises(TypeError, match="pass one"):
            fmt.to(torch.float16, dtype=torch.float32)
        with pytest.raises(TypeError, match="device must be"):
            fmt.to(3.0)
        with pytest.raises(TypeError, match="floating dtype"):
            fmt.to(torch.int32)


def _bsr_2x2_grid():
    return BSR.from_dense(torch.randn(4, 8), (2, 4))   # 2x2 block grid, all blocks stored


def test_validate_rejects_out_of_range_and_duplicate_indices():
    b = _bsr_2x2_grid()
    col = b.col_indices.clone()
    col[-1] = 2                       # == K/bk
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 2\)"):
        BSR(values=b.values, crow_indices=b.crow_indices, col_indices=col, shape=b.shape).validate()
    c = CSR.from_dense(torch.ones(2, 3))
    col = c.col_indices.clone()
    col[-1] = 3                       # == K
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        CSR(values=c.values, crow_indices=c.crow_indices, col_indices=col, shape=c.shape).validate()
    col = c.col_indices.clone()
    col[1] = col[0]                   # duplicate inside a row
    with pytest.raises(ValueError, match="strictly increasing"):
        CSR(values=c.values, crow_indices=c.crow_indices, col_indices=col, shape=c.shape).validate()
    nm = NM.from_dense(NM.prune(torch.randn(2, 8), 2, 4), 2, 4)
    idx = nm.indices.clone()
    idx[0, 1] = 4                        # == m
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        NM(values=nm.values, indices=idx, shape=nm.shape, n=2, m=4).validate()
    ch = ChannelIndex.from_dense(torch.ones(3, 2))
    idx = ch.indices.clone()
    idx[-1] = 3                          # == N
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        ChannelIndex(values=ch.values, indices=idx, shape=ch.shape, dim=0).validate()
