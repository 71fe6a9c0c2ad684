"""Every distinct GPU launch config of kernels/_configs.py, run through the Triton interpreter.

Under TRITON_INTERPRET=1 the *_config functions return small interpreter tiles (BLOCK_M=16), so the rest of
the suite never runs the tile shapes an sm80/sm90 GPU gets from the tables. Here each distinct config the
tables produce for the compile check's TARGETS (sm80 and sm90; the config functions take
``arch=(major, smem)``) is forced into its launcher (the name the launcher module looks up is monkeypatched)
and the kernel runs on a small problem with partial tiles: M not a multiple of BLOCK_M (1 and BLOCK_M+1 on
the split-K decode path), an odd number of block-rows with an empty one, fp32 and fp16, against
sparsekit.ops.reference. Configs are deduplicated by what the interpreter sees (tile sides, GROUP_M, split
factors; num_warps / num_stages mean nothing there). Every test id names its config, e.g.
``test_bsr_mm[block=32x64-BM128-G8-sm80+sm90-fp16]``.

Covered: bsr_mm (plain and split-K), bsr_mm_t, bsr_sddmm (with its M split), nm_mm (2:4 and 3:5),
channel_mm (linear and 1x1 conv with the fused scatter), channel_scatter (its GPU branch, which picks
BLOCK_C / BLOCK_I in the launcher rather than from a table).

Run: `pytest -m triton --triton-interpret tests/test_triton_gpu_configs.py`. Without --triton-interpret on a
CUDA machine the same tests run compiled, each with the config its table gives for that GPU's arch and the
test's dtype (the others are skipped: a sm90 tile may not fit a sm80's shared memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from _triton import DEVICE, HAS_CUDA, INTERPRET, close, needs_runner
from sparsekit.kernels import _configs as C
from sparsekit.kernels._compile_check import TARGETS, _full_cases

import sparsekit as sk
from sparsekit.formats import BSR, NM
from sparsekit.ops import reference as R

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

pytestmark = [pytest.mark.triton, needs_runner]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_DTYPE_OF = {"float32": "fp32", "float16": "fp16"}
_SIDES = (16, 32, 64, 128)


# --------------------------------------------------------------------------------------- the configs
@dataclass
class Entry:
    """One distinct config: ``key`` is what the interpreter sees, ``cfgs`` the full configs that produce it,
    per (compute capability, dtype name) of the table lookup."""
    id: str
    key: tuple
    cfgs: dict = field(default_factory=dict)


def _distinct(rows) -> list[Entry]:
    """rows: (cc, dtype name, config, key, id) -> one Entry per distinct key, in first-seen order."""
    out: dict[tuple, Entry] = {}
    for cc, dt, cfg, key, ident in rows:
        e = out.setdefault(key, Entry(ident, key))
        e.cfgs.setdefault((cc, dt), cfg)
    for e in out.values():
        archs = sorted({cc for cc, _ in e.cfgs})
        e.id += "-" + "+".join(f"sm{cc}" for cc in archs)
    return list(out.values())


def _bsr_mm_rows(transposed: bool):
    """bsr_mm / bsr_mm_t configs from the compile check's full enumeration (every block shape x M bucket x
    dtype that changes the config). bsr_mm_t asks bsr_mm_config with the block sides swapped, so the case
    (bn, bk) of the enumeration is the weight block (bk, bn) there."""
    for cc, smem in TARGETS:
        for dtype, (bn, bk), m, _bias, _prec in _full_cases(cc, smem):
            cfg = C.bsr_mm_config(m, bn, bk, getattr(torch, dtype), arch=(cc // 10, smem))
            block = (bk, bn) if transposed else (bn, bk)
            yield (cc, _DTYPE_OF[dtype], cfg, (block, cfg.block_m, cfg.group_m),
                   f"block={block[0]}x{block[1]}-BM{cfg.block_m}-G{cfg.group_m}")


def _split_k_rows():
    """The split-K kernel's tiles: bsr_mm_config for the M that bsr_mm_split_k may split (M <= SPLIT_K_MAX_M)."""
    for cc, smem in TARGETS:
        for dtype, (bn, bk), m, _bias, _prec in _full_cases(cc, smem):
            if m <= C.SPLIT_K_MAX_M:
                cfg = C.bsr_mm_config(m, bn, bk, getattr(torch, dtype), arch=(cc // 10, smem))
                yield (cc, _DTYPE_OF[dtype], cfg, ((bn, bk), cfg.block_m), f"block={bn}x{bk}-BM{cfg.block_m}")


def _split_factors() -> list[int]:
    """Every split bsr_mm_split_k can answer (> 1) for the targets' SM counts, over decode-sized shapes."""
    out = set()
    for cc, _smem in TARGETS:
        sms = C.sm_count(arch_major=cc // 10)
        for m in (1, 16, 17, 32, 33, C.SPLIT_K_MAX_M):
            for rows in (1, 2, 4, 8, 16, 64, 256, 1024):
                for per_row in (1, 2, 4, 8, 16, 32, 64, 256):
                    out.add(C.bsr_mm_split_k(m, rows, rows * per_row, 32, 32, sms=sms))
    return sorted(out - {1})


def _sddmm_rows():
    """bsr_sddmm_config over every block shape, dtype, and (M, nnzb) from one block to millions: the M step
    and the split of M it picks."""
    for cc, smem in TARGETS:
        for dt, dtype in DTYPES.items():
            for bn in _SIDES:
                for bk in _SIDES:
                    for m in (2**i for i in range(0, 21, 2)):
                        for nnzb in (*(2**i for i in range(10)), 10**6):
                            cfg = C.bsr_sddmm_config(m, nnzb, bn, bk, dtype, arch=(cc // 10, smem))
                            yield (cc, dt, cfg, ((bn, bk), cfg.block_m, cfg.split),
                                   f"block={bn}x{bk}-BM{cfg.block_m}-split{cfg.split}")


def _tile_rows(config_fn):
    """nm_mm_config / channel_mm_config: one tile per (arch, dtype, M bucket)."""
    for cc, smem in TARGETS:
        for dt, dtype in DTYPES.items():
            for m in C.M_BUCKETS:
                c = config_fn(m, dtype, arch=(cc // 10, smem))
                yield (cc, dt, c, (c.block_m, c.block_n, c.block_k, c.group_m),
                       f"tile={c.block_m}x{c.block_n}x{c.block_k}-G{c.group_m}")


BSR_MM = _distinct(_bsr_mm_rows(transposed=False))
BSR_MM_T = _distinct(_bsr_mm_rows(transposed=True))
SPLIT_K_TILES = _distinct(_split_k_rows())
SPLIT_FACTORS = _split_factors()
SDDMM = _distinct(_sddmm_rows())
NM_MM = _distinct(_tile_rows(C.nm_mm_config))
CHANNEL_MM = _distinct(_tile_rows(C.channel_mm_config))


def _scatter_blocks(inner: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_I) of k_channel.channel_scatter's GPU branch (mirrored here; the test checks the
    launcher launched exactly this)."""
    block_i = min(128, 1 << (inner - 1).bit_length())
    block_c = max(1, 4096 // block_i) if inner < 128 else 32
    return min(block_c, 128), block_i


def _scatter_cases() -> list[tuple[int, int, int]]:
    """(BLOCK_C, BLOCK_I, inner) per distinct GPU tile, inner the smallest that gives it with a partial I tile
    (ops.channel_scatter never passes inner=1: it turns a channels-last y into rows)."""
    found: dict[tuple[int, int], int] = {}
    for inner in range(2, 300):
        bc, bi = _scatter_blocks(inner)
        if (bc, bi) not in found or (found[(bc, bi)] % bi == 0 and inner % bi):
            found[(bc, bi)] = inner
    return [(bc, bi, inner) for (bc, bi), inner in found.items()]


SCATTER = _scatter_cases()


def _ints(value) -> list[int]:
    return [v for x in value for v in _ints(x)] if isinstance(value, tuple) else [value]


def _checker_dtype(*key) -> str:
    """One dtype per config, alternating like a checkerboard over the (power-of-two) fields of the key, so that
    every value of every field (and every pair of them) still runs in both fp32 and fp16."""
    return list(DTYPES)[sum(v.bit_length() for v in _ints(key)) % 2]


def _params(entries: list[Entry], *extra: list[tuple[str, object]], checker: bool = False):
    """pytest.params of (entry, dtype name, extra values...) with ids naming the config, then the extras; each
    config in fp32 and fp16, or (checker=True, for the big lists) in one of them, see _checker_dtype."""
    out = []
    for e in entries:
        for dt in [_checker_dtype(e.key)] if checker else DTYPES:
            out.append(pytest.param(e, dt, id=f"{e.id}-{dt}"))
    for values in extra:
        out = [pytest.param(*p.values, v, id=f"{p.id}-{name}") for p in out for name, v in values]
    return out


def _pick(entry: Entry, dt: str):
    """The config to force: under the interpreter any that produced the key (only the key matters there),
    preferring one chosen for this dtype; compiled on a GPU, the one its table gives for this GPU and dtype."""
    if INTERPRET or not HAS_CUDA:
        return next((c for (_, d), c in entry.cfgs.items() if d == dt), next(iter(entry.cfgs.values())))
    major, smem = C._device_info(torch.cuda.current_device())     # the kernels' own reading (older torch too)
    for (cc, d), cfg in entry.cfgs.items():
        if cc // 10 == major and d == dt and smem >= dict(TARGETS)[cc]:
            return cfg
    pytest.skip(f"{entry.id} is not the table's config for this GPU (sm{major}x, {smem} B) and {dt}")


def _force(monkeypatch, module, config_name: str | None, cfg, *kernel_names: str) -> list[tuple]:
    """Make ``module.<config_name>`` return ``cfg`` (if a name is given) and record every launch of the named
    kernels as (kernel name, grid, keyword arguments), so a test can check that the config reached the kernel."""
    if config_name is not None:
        monkeypatch.setattr(module, config_name, lambda *args, **kwargs: cfg)
    launches: list[tuple] = []
    for name in kernel_names:
        real = getattr(module, name)

        class Spy:
            def __getitem__(self, grid, _real=real, _name=name):
                def launch(*args, **kwargs):
                    launches.append((_name, grid, kwargs))
                    return _real[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(module, name, Spy())
    return launches


# ------------------------------------------------------------------------------------------ test data
def randn(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def pattern_bsr(block: tuple[int, int], cols_per_row: list[list[int]], n_cols: int, dtype: torch.dtype,
                seed: int = 0) -> BSR:
    """A validated BSR whose block-row r stores exactly the blocks cols_per_row[r] (of n_cols)."""
    bn, bk = block
    keep = torch.zeros(len(cols_per_row), n_cols, dtype=torch.bool)
    for r, cols in enumerate(cols_per_row):
        keep[r, list(cols)] = True
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(len(cols_per_row) * bn, n_cols * bk, generator=g)
    dense *= keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    w = BSR.from_dense(dense, block=block).to(device=DEVICE, dtype=dtype).validate()
    assert w.nnzb == sum(len(c) for c in cols_per_row)
    return w


# --------------------------------------------------------------------------------------------- BSR
@pytest.mark.parametrize("entry, dt", _params(BSR_MM, checker=True))
def test_bsr_mm(monkeypatch, entry, dt):
    from sparsekit.kernels import k_bsr_mm

    dtype, cfg = DTYPES[dt], _pick(entry, dt)
    (bn, bk), block_m, group_m = entry.key
    launches = _force(monkeypatch, k_bsr_mm, "bsr_mm_config", cfg, "_bsr_mm_kernel")
    # 3 block-rows: full, empty, one block; M = BLOCK_M + 3: a partial second row tile (fewer than GROUP_M)
    w = pattern_bsr((bn, bk), [[0, 1, 2], [], [1]], 3, dtype)
    m, n = block_m + 3, 3 * bn
    x, b = randn(m, 3 * bk, dtype=dtype), randn(n, dtype=dtype, seed=2)
    y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, n, split_k=1)
    [(_, grid, kw)] = launches
    assert (kw["BLOCK_M"], kw["BN"], kw["BK"], kw["GROUP_M"]) == (block_m, bn, bk, group_m)
    assert grid == (2 * 3,)
    close(y, R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), b.double(), n), dtype)
    assert y[:, bn:2 * bn].eq(b[bn:2 * bn]).all()   # the empty block-row is exactly the bias


@pytest.mark.parametrize("block_m", sorted({e.key[1] for e in BSR_MM}), ids=lambda v: f"BM{v}")
def test_bsr_mm_grouped_order_many_row_tiles(monkeypatch, block_m):
    # more row tiles than GROUP_M with the GPU tile heights: a full group, then a partial one, partial last tile
    from sparsekit.kernels import k_bsr_mm

    entry = next(e for e in BSR_MM if e.key[0] == (16, 16) and e.key[1] == block_m)
    cfg = _pick(entry, "fp32")
    launches = _force(monkeypatch, k_bsr_mm, "bsr_mm_config", cfg, "_bsr_mm_kernel")
    w = pattern_bsr((16, 16), [[0, 2], [], [1], [0, 1, 2], [2]], 3, torch.float32)
    m = (cfg.group_m + 1) * block_m + 5
    x, b = randn(m, 48), randn(80, seed=2)
    y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, 80, split_k=1)
    assert launches[0][2]["BLOCK_M"] == block_m and launches[0][1] == ((cfg.group_m + 2) * 5,)
    close(y, R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), b.double(), 80), torch.float32)


def _split_k_params():
    """Each split-K tile with one split factor, the factors taken in turn (the tiles come 3 BLOCK_M per block
    shape, the factors 4: every (BLOCK_M, split) pair appears), and one dtype (checkerboard); ids name all."""
    out = []
    for i, e in enumerate(SPLIT_K_TILES):
        split = SPLIT_FACTORS[i % len(SPLIT_FACTORS)]
        dt = _checker_dtype(e.key)
        out.append(pytest.param(e, dt, split, id=f"{e.id}-split{split}-{dt}"))
    return out


@pytest.mark.parametrize("entry, dt, split", _split_k_params())
def test_bsr_mm_split_k(monkeypatch, entry, dt, split):
    from sparsekit.kernels import k_bsr_mm

    dtype, cfg = DTYPES[dt], _pick(entry, dt)
    (bn, bk), block_m = entry.key
    launches = _force(monkeypatch, k_bsr_mm, "bsr_mm_config", cfg, "_bsr_mm_splitk_kernel", "_bsr_mm_kernel")
    # block-row 0 has split + 3 blocks (the first splits take two, the strided loop wraps), block-row 1 none,
    # block-row 2 two (most splits have nothing to add and skip their atomics)
    kb = split + 3
    w = pattern_bsr((bn, bk), [list(range(kb)), [], [1, kb - 1]], kb, dtype)
    n = 3 * bn
    for m in (1, block_m + 1):
        x, b = randn(m, kb * bk, dtype=dtype, seed=m), randn(n, dtype=dtype, seed=2)
        launches.clear()
        y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, b, n, split_k=split)
        [(name, grid, kw)] = launches
        assert name == "_bsr_mm_splitk_kernel" and kw["BLOCK_M"] == block_m and kw["SPLIT_K"] == split
        assert grid == (3, split, -(-m // block_m))
        assert y.shape == (m, n) and y.dtype == dtype
        expect = R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), b.double(), n)
        close(y, expect, dtype)
        assert y[:, bn:2 * bn].eq(b[bn:2 * bn]).all()


@pytest.mark.parametrize("entry, dt", _params(BSR_MM_T, checker=True))
def test_bsr_mm_t(monkeypatch, entry, dt):
    from sparsekit.kernels import k_bsr_mm_t

    dtype, cfg = DTYPES[dt], _pick(entry, dt)
    (bn, bk), block_m, group_m = entry.key
    launches = _force(monkeypatch, k_bsr_mm_t, "bsr_mm_config", cfg, "_bsr_mm_t_kernel")
    # block-row 1 and block-column 1 empty; block-column 0 one block, block-column 2 two
    w = pattern_bsr((bn, bk), [[0, 2], [], [2]], 3, dtype)
    m, k = block_m + 3, 3 * bk
    dy = randn(m, 3 * bn, dtype=dtype)
    dx = k_bsr_mm_t.bsr_mm_t(dy, w.crow_indices, w.col_indices, w.values, k)
    [(_, grid, kw)] = launches
    assert (kw["BLOCK_M"], kw["BN"], kw["BK"], kw["GROUP_M"]) == (block_m, bn, bk, group_m)
    assert grid == (2 * 3,)
    close(dx, R.bsr_mm_t(dy.double(), w.crow_indices, w.col_indices, w.values.double(), k), dtype)
    assert dx[:, bk:2 * bk].eq(0).all()   # the empty block-column writes exact zeros


@pytest.mark.parametrize("entry, dt", _params(SDDMM, checker=True))
def test_bsr_sddmm(monkeypatch, entry, dt):
    from sparsekit.kernels import k_bsr_sddmm

    dtype, cfg = DTYPES[dt], _pick(entry, dt)
    (bn, bk), block_m, split = entry.key
    launches = _force(monkeypatch, k_bsr_sddmm, "bsr_sddmm_config", cfg, "_bsr_sddmm_kernel")
    w = pattern_bsr((bn, bk), [[0], [], [2]], 3, dtype)   # one program (per split) per stored block
    # M = split * BLOCK_M + 3: the launcher keeps the split (it caps it at the number of M steps), split 0
    # takes one more step, a partial one
    m = split * block_m + 3
    dy, x = randn(m, 3 * bn, dtype=dtype), randn(m, 3 * bk, dtype=dtype, seed=3)
    dv = k_bsr_sddmm.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, bn, bk)   # split from the config
    [(_, grid, kw)] = launches
    assert (kw["BLOCK_M"], kw["BN"], kw["BK"], kw["SPLIT"]) == (block_m, bn, bk, split)
    assert grid == (2, split)
    assert dv.shape == w.values.shape and dv.dtype == dtype
    close(dv, R.bsr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices, bn, bk), dtype)


# ------------------------------------------------------------------------------------------------ N:M
@pytest.mark.parametrize("entry, dt, nm", _params(NM_MM, [("2of4", (2, 4)), ("3of5", (3, 5))]))
def test_nm_mm(monkeypatch, entry, dt, nm):
    from sparsekit.kernels import k_nm_mm

    dtype, cfg = DTYPES[dt], _pick(entry, dt)
    block_m, block_n, block_k, group_m = entry.key
    nn, mm = nm
    launches = _force(monkeypatch, k_nm_mm, "nm_mm_config", cfg, "_nm_mm_kernel")
    # partial second tile along M, N and K (K a multiple of m, not of BLOCK_K: groups straddle K tiles for
    # m = 5); weight rows 1..4 all zero
    m, n, k = block_m + 3, block_n + 5, mm * (block_k // mm + 3)
    dense = randn(n, k, seed=4, dtype=torch.float32).cpu()
    dense[1:5] = 0
    w = NM.from_dense(NM.prune(dense, nn, mm), nn, mm).to(device=DEVICE, dtype=dtype)
    x, b = randn(m, k, dtype=dtype), randn(n, dtype=dtype, seed=2)
    y = k_nm_mm.nm_mm(x, w.values, w.indices, b, nn, mm)
    [(_, grid, kw)] = launches
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"]) == (block_m, block_n, block_k, group_m)
    assert grid == (2 * 2,)
    close(y, R.nm_mm(x.double(), w.values.double(), w.indices, b.double(), nn, mm), dtype)


# -------------------------------------------------------------------------------------------- channel
@pytest.mark.parametrize("entry, dt", _params(CHANNEL_MM))
def test_channel_mm(monkeypatch, entry, dt):
    from sparsekit.kernels import k_channel

    dtype, cfg = DTYPES[dt], _pick(entry, dt)
    block_m, block_n, block_k, group_m = entry.key
    launches = _force(monkeypatch, k_channel, "channel_mm_config", cfg, "_channel_mm_kernel")
    # Kc = BLOCK_K + 7 kept of 2 * Kc input channels, Nc = BLOCK_N + 5 outputs: partial second K and N tiles
    kc, nc = block_k + 7, block_n + 5
    in_idx = torch.randperm(2 * kc, generator=torch.Generator().manual_seed(0))[:kc].sort().values.to(DEVICE)
    out_idx = torch.randperm(nc + 9, generator=torch.Generator().manual_seed(1))[:nc].to(DEVICE)
    w, b = randn(nc, kc, dtype=dtype, seed=2), randn(nc, dtype=dtype, seed=3)

    # linear, compact output: M = BLOCK_M + 3 rows
    x = randn(block_m + 3, 2 * kc, dtype=dtype)
    got = sk.ops.channel_gather_linear(x, in_idx, w, b, backend="triton")
    close(got, sk.ops.channel_gather_linear(x.double(), in_idx, w.double(), b.double(), backend="reference"), dtype)
    # 1x1 conv on NCHW, batch 2, H*W = BLOCK_M + 3 positions, scattered into nc + 9 output channels
    x4 = randn(2, 2 * kc, 1, block_m + 3, dtype=dtype, seed=5)
    w4 = w.reshape(nc, kc, 1, 1)
    kw = {"out_idx": out_idx, "n_out": nc + 9}
    got4 = sk.ops.channel_gather_conv2d(x4, in_idx, w4, b, backend="triton", **kw)
    ref4 = sk.ops.channel_gather_conv2d(x4.double(), in_idx, w4.double(), b.double(), backend="reference", **kw)
    close(got4, ref4, dtype)

    assert len(launches) == 2
    for (_, grid, kw), batch in zip(launches, (1, 2)):
        assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"]) == (block_m, block_n, block_k, group_m)
        assert grid == (2 * 2 * batch,)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("block_c, block_i, inner", SCATTER, ids=[f"C{c}xI{i}-inner{n}" for c, i, n in SCATTER])
def test_channel_scatter(monkeypatch, dt, block_c, block_i, inner):
    from sparsekit.kernels import k_channel

    dtype = DTYPES[dt]
    # channel_scatter has no table: its launcher picks the GPU blocks unless interpreting() (16 x 16)
    monkeypatch.setattr(k_channel, "interpreting", lambda: False)
    launches = _force(monkeypatch, k_channel, None, None, "_channel_scatter_kernel")
    c, n_out = block_c + 5, block_c + 12   # a partial second channel tile
    y = randn(2, c, inner, dtype=dtype)
    out_idx = torch.randperm(n_out, generator=torch.Generator().manual_seed(0))[:c].to(DEVICE)
    for bias in (None, randn(n_out, dtype=dtype, seed=4)):
        got = sk.ops.channel_scatter(y, out_idx, n_out, bias, dim=1, backend="triton")
        close(got, sk.ops.channel_scatter(y, out_idx, n_out, bias, dim=1, backend="reference"), dtype)
    for _, grid, kw in launches:
        assert (kw["BLOCK_C"], kw["BLOCK_I"]) == (block_c, block_i)
        assert grid == (2 * -(-inner // block_i), 2)
    assert len(launches) == 2


# ------------------------------------------------------------------------------------ the enumeration
def test_enumeration_covers_the_tables():
    """The lists above are not empty and reach the big tiles (guards against an enumeration that silently
    shrinks, e.g. if the config functions' signatures change)."""
    assert {e.key[1] for e in BSR_MM} == {16, 32, 64, 128}
    assert {e.key[1] for e in SPLIT_K_TILES} <= {16, 32, 64} and len(SPLIT_K_TILES) >= 16
    assert SPLIT_FACTORS[0] == 2 and SPLIT_FACTORS[-1] == C.SPLIT_K_MAX
    assert {e.key[2] for e in SDDMM} >= {1, C.SPLIT_K_MAX}
    assert max(e.key[0] for e in NM_MM) == 128 and max(e.key[0] for e in CHANNEL_MM) == 128
    assert {bi for _, bi, _ in SCATTER} >= {2, 128}
