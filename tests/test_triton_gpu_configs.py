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

The tests at the end run anywhere (no interpreter, no GPU): the tables' rows fit shared memory (sm80, sm86/89,
sm90) and follow the fp32 rules that keep them from spilling registers; measured rows too big for the device are
shrunk, or refused when no GPU of their arch could hold them; and the compile check (kernels/_compile_check.py,
triton.compile for sm80 without a GPU) fails on register spills and falls back to PTX without poisoning Triton's
cache when ptxas fails.
"""

from __future__ import annotations

import json
import re
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

# the kernel tests below need a runner (needs_runner); the config and compile-check tests at the end run on any CPU
pytestmark = [pytest.mark.triton]

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
@needs_runner
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


@needs_runner
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


@needs_runner
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


@needs_runner
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


@needs_runner
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
@needs_runner
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
@needs_runner
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


@needs_runner
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


# ------------------------------------------------------------------- table sizing (CPU: no kernel runs)
# sm86 / sm89 report major 8 with 99 KB of shared memory per block: the tables' sm80 rows must fit there too
_ARCHS = [(cc // 10, smem) for cc, smem in TARGETS] + [(8, 99 * 1024)]
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture
def no_tuned(monkeypatch, tmp_path):
    """The hand-written tables only (no $SPARSEKIT_TRITON_CONFIGS, no shipped tuned_sm*.json)."""
    monkeypatch.delenv(C.TUNED_ENV, raising=False)
    monkeypatch.setattr(C, "tuned_path", lambda major: tmp_path / f"tuned_sm{major}0.json")
    C.reload_tuned()
    yield tmp_path
    C.reload_tuned()


@pytest.mark.parametrize("arch", _ARCHS, ids=lambda a: f"sm{a[0]}x-{a[1] // 1024}K")
def test_tile_rows_fit_shared_memory_and_follow_the_fp32_rule(no_tuned, arch):
    _major, smem = arch
    for family, config_fn in (("nm_mm", C.nm_mm_config), ("channel_mm", C.channel_mm_config)):
        for m in C.M_BUCKETS:
            half = config_fn(m, torch.float16, arch=arch)
            assert config_fn(m, torch.bfloat16, arch=arch) == half
            full = config_fn(m, torch.float32, arch=arch)
            for cfg, elem in ((half, 2), (full, 4)):
                assert C._tile_smem(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages, elem) <= 0.9 * smem
                assert cfg.num_stages >= 2 and min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16
            assert full.num_warps == half.num_warps
            if family == "nm_mm":
                # the "ieee" FMA dot spills KBs with wider K steps or more outputs per warp (see NM_MM_TABLE)
                assert full.block_k == 16 and full.block_m * full.block_n <= 1024 * full.num_warps
                assert (full.block_m, full.block_n) in ((half.block_m, half.block_n), (half.block_m, half.block_n // 2),
                                                        (half.block_m // 2, half.block_n))
            else:
                assert full.block_k == max(16, half.block_k // 2)
                assert (full.block_m, full.block_n) == (half.block_m, half.block_n)


def test_the_rows_measured_without_spills(no_tuned):
    """The rows the register measurements in kernels/_configs.py are about (a change there must re-measure)."""
    a100, h100 = (8, 163 * 1024), (9, 227 * 1024)
    fp16, fp32 = torch.float16, torch.float32
    assert C.nm_mm_config(1, fp16, arch=a100) == C.TileConfig(16, 64, 128, 8, 3)
    assert C.nm_mm_config(100, fp16, arch=a100) == C.TileConfig(64, 128, 32, 8, 3)
    assert C.nm_mm_config(4096, fp16, arch=a100) == C.TileConfig(128, 128, 16, 8, 3)
    assert C.nm_mm_config(4096, fp16, arch=h100) == C.TileConfig(128, 128, 32, 8, 3)
    assert C.nm_mm_config(4096, fp32, arch=h100) == C.TileConfig(128, 64, 16, 8, 3)
    assert C.nm_mm_config(1, fp32, arch=h100) == C.TileConfig(16, 64, 16, 8, 3)
    assert C.channel_mm_config(4096, fp16, arch=h100) == C.TileConfig(128, 128, 32, 16, 3)
    assert C.channel_mm_config(4096, fp32, arch=a100) == C.TileConfig(128, 128, 16, 16, 3)
    # bsr_mm, fp32 with a 128-deep K step: 8 warps from 4096 outputs, at most 8192 outputs
    assert C.bsr_mm_config(4096, 128, 128, fp32, arch=a100) == C.KernelConfig(64, 8, 4)
    assert C.bsr_mm_config(4096, 32, 128, fp32, arch=h100) == C.KernelConfig(128, 8, 4)
    assert C.bsr_mm_config(4096, 128, 128, fp16, arch=a100) == C.KernelConfig(128, 8, 5)   # fp16 unchanged
    assert C.bsr_mm_config(4096, 32, 64, fp32, arch=h100).num_warps == 4                    # K step 64 unchanged


def _tuned(tmp_path, monkeypatch, **families) -> None:
    table = {"format": C.TUNED_FORMAT, "version": C.TUNED_VERSION, "arch_major": 9, "m_buckets": list(C.M_BUCKETS),
             **families}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(C.TUNED_ENV, str(path))
    C.reload_tuned()


@pytest.mark.parametrize("family", ["nm_mm", "channel_mm"])
def test_a_measured_tile_row_too_big_for_the_device_is_shrunk(no_tuned, monkeypatch, family):
    # [128, 128, 128, 8, 4]: 256 KB at 4 stages of fp16; an H100 holds 3 stages, a 99 KB sm89 not even 2 (nor a
    # 48 KB part in fp32): there the tile shrinks (BLOCK_K first) instead of failing at launch
    _tuned(no_tuned, monkeypatch, **{family: [[128, 128, 128, 8, 4]] * 5})
    config_fn = C.nm_mm_config if family == "nm_mm" else C.channel_mm_config
    assert config_fn(4096, torch.float16, arch=(9, 227 * 1024)) == C.TileConfig(128, 128, 128, 8, 3)
    small = (9, 99 * 1024)
    cfg = config_fn(4096, torch.float16, arch=small)
    assert cfg == C.TileConfig(128, 128, 64, 8, 2)
    for dtype, elem in ((torch.float16, 2), (torch.float32, 4)):
        for arch in ((9, 227 * 1024), small, (9, 48 * 1024)):
            c = config_fn(4096, dtype, arch=arch)
            assert C._tile_smem(c.block_m, c.block_n, c.block_k, c.num_stages, elem) <= 0.9 * arch[1]
    # the tuner's candidates are fitted the same way
    for c in C.tile_candidates(family, 4096, torch.float32, (9, 48 * 1024)):
        assert C._tile_smem(c.block_m, c.block_n, c.block_k, c.num_stages, 4) <= 0.9 * 48 * 1024


def test_a_tile_row_no_gpu_of_the_arch_can_hold_is_refused(no_tuned, monkeypatch):
    # nm_mm [256, 256, 256, 8, 2]: ~512 KB even at 2 stages of fp16; it used to load and fail at launch with
    # OutOfResources (no fallback outside autotune)
    _tuned(no_tuned, monkeypatch, nm_mm=[[64, 64, 64, 4, 3]] * 4 + [[256, 256, 256, 8, 2]])
    with pytest.raises(ValueError, match=r"nm_mm\[4\] = \[256, 256, 256, 8, 2\] needs ~512 KB of shared memory.*"
                                         r"sm9x GPU has \(227 KB\).*named by"):
        C.nm_mm_config(4096, torch.float16, arch=(9, 227 * 1024))


def test_a_measured_sddmm_row_too_big_shrinks_block_m(no_tuned, monkeypatch):
    # bsr_sddmm used to stop at 1 stage: BLOCK_M 256 of 128x128 fp32 blocks needs 256 KB at 1 stage
    _tuned(no_tuned, monkeypatch, bsr_sddmm={"16384": [256, 8, 4]})
    for arch in ((9, 227 * 1024), (8, 99 * 1024)):
        for dtype in _ALL_DTYPES:
            cfg = C.bsr_sddmm_config(4096, 10**6, 128, 128, dtype, arch=arch)
            elem = dtype.itemsize
            assert C._sddmm_smem(cfg.block_m, cfg.num_stages, 128, 128, elem, arch[0]) <= 0.9 * arch[1]
            assert cfg.num_stages >= 1 and cfg.block_m >= 16 and cfg.num_warps == 8
    # (the table is sm9x's: a 99 KB sm8x part keeps its hand-written row, which fits as it is in fp32 too)
    assert C.bsr_sddmm_config(4096, 10**6, 128, 128, torch.float32, arch=(8, 99 * 1024)) == \
        C.TileConfig(32, 128, 128, 8, 3)
    assert C.bsr_sddmm_config(4096, 10**6, 128, 128, torch.float32, arch=(9, 99 * 1024)).block_m == 64
    cfg = C.bsr_sddmm_config(4096, 10**6, 128, 128, torch.float16, arch=(9, 227 * 1024))   # fits at 1 stage
    assert (cfg.block_m, cfg.num_stages) == (256, 1)


@pytest.mark.parametrize("arch", _ARCHS, ids=lambda a: f"sm{a[0]}x-{a[1] // 1024}K")
def test_hand_written_bsr_rows_fit_shared_memory(no_tuned, arch):
    major, smem = arch
    for dtype in _ALL_DTYPES:
        elem = dtype.itemsize
        for bn in _SIDES:
            for bk in _SIDES:
                for m in C.M_BUCKETS:
                    cfg = C.bsr_mm_config(m, bn, bk, dtype, arch=arch)
                    assert C.smem_bytes(cfg.block_m, cfg.num_stages, bn, bk, elem, major) <= 0.9 * smem
                    s = C.bsr_sddmm_config(m * 64, 10**6, bn, bk, dtype, arch=arch)
                    assert C._sddmm_smem(s.block_m, s.num_stages, bn, bk, elem, major) <= 0.9 * smem


def test_sddmm_smem_model_and_sm86_stages(no_tuned):
    """The SDDMM model counts what Triton 3.6 allocates (kernel.metadata.shared of the compile, see
    test_sddmm_smem_model_covers_the_compiled_kernel): stages - 1 buffers of the dy^T and x tiles on sm80 (at least
    one), stages on sm90, or the [bn, bk] epilogue. It used to count stages buffers plus an fp32 [bn, bk] (about 3x),
    which left 99 KB sm86/sm89 parts one stage (no pipelining) for 128x128 fp16 blocks."""
    assert C._sddmm_smem(64, 3, 128, 128, 2, 8) == 65536 and C._sddmm_smem(64, 3, 128, 128, 2, 9) == 98304
    assert C._sddmm_smem(64, 1, 128, 128, 2, 8) == C._sddmm_smem(64, 2, 128, 128, 2, 8) == 32768
    assert C._sddmm_smem(16, 2, 128, 128, 2, 9) == 128 * 128 * 2   # the epilogue's [bn, bk] tile
    sm86 = C.bsr_sddmm_config(4096, 10**6, 128, 128, torch.float16, arch=(8, 99 * 1024))
    assert (sm86.block_m, sm86.num_stages) == C.BSR_SDDMM_TABLE[(8, 128 * 128)][::2]   # the table's row, unchanged


@pytest.mark.parametrize("arch", _ARCHS, ids=lambda a: f"sm{a[0]}x-{a[1] // 1024}K")
def test_bsr_mm_candidates_follow_the_fp32_register_rule(no_tuned, arch):
    """The tuning / autotune candidates get the fp32 register rule the table rows get (_configs._fit_registers):
    with a 128-deep K step, 8 warps from 4096 outputs and at most 8192 outputs (bigger tiles spilled KBs)."""
    for bn in _SIDES:
        for m in C.M_BUCKETS:
            for c in C.bsr_mm_candidates(m, bn, 128, torch.float32, arch):
                assert c.block_m * bn <= 8192 or c.block_m == 16, (bn, m, c)
                assert c.block_m * bn < 4096 or c.num_warps >= 8, (bn, m, c)
            # 2-byte elements are left alone: the 2-warp candidates stay
            assert any(c.num_warps == 2 for c in C.bsr_mm_candidates(m, bn, 128, torch.float16, arch))


# ------------------------------------------------------------- the compile check (CPU: triton.compile, no GPU)
compile_only = pytest.mark.skipif(INTERPRET, reason="compiles kernels: run without --triton-interpret")


@compile_only
@pytest.mark.parametrize("cc", [80, 90])
def test_sddmm_smem_model_covers_the_compiled_kernel(triton_cache, cc):
    """kernel.metadata.shared of the SDDMM kernel never exceeds _configs._sddmm_smem (what _fit_sddmm sizes by)."""
    from sparsekit.kernels import _compile_check as CC
    from sparsekit.kernels import k_bsr_sddmm
    from triton.backends.compiler import GPUTarget

    # (dtype, BLOCK_M, stages, (bn, bk), split): the pipelined, unpipelined, epilogue-bound and split cases
    cases = (("float16", 64, 1, (128, 128), 1), ("float16", 64, 3, (128, 128), 1), ("float32", 128, 1, (128, 128), 1),
             ("float16", 16, 2, (128, 128), 4), ("float16", 128, 1, (16, 16), 1))
    for dtype, block_m, stages, (bn, bk), split in cases:
        t = CC._TL_TYPE[dtype]
        sig = {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "row_ptr": "*i32", "col_ptr": "*i32",
               "out_ptr": "*fp32" if split > 1 else f"*{t}", "M": "i32", "N": "i32", "K": "i32",
               "BLOCK_M": "constexpr", "BN": "constexpr", "BK": "constexpr", "SPLIT": "constexpr",
               "INPUT_PRECISION": "constexpr", "WHILE_LOOP": "constexpr"}
        ce = {"BLOCK_M": block_m, "BN": bn, "BK": bk, "SPLIT": split,
              "INPUT_PRECISION": "tf32" if dtype == "float32" else "ieee", "WHILE_LOOP": False}
        src = CC._src(k_bsr_sddmm._bsr_sddmm_kernel, sig, ce, ["dy_ptr", "x_ptr", "row_ptr", "col_ptr", "out_ptr", "N",
                                                                "K"])
        kernel = CC._compile(src, GPUTarget("cuda", cc, 32), {"num_warps": 4, "num_stages": stages}, ptx_only=True)
        elem = 4 if dtype == "float32" else 2
        assert int(kernel.metadata.shared) <= C._sddmm_smem(block_m, stages, bn, bk, elem, cc // 10), \
            (dtype, block_m, stages, bn, bk, split)


def _scatter_job(dtype: str):
    """(src, options) of the cheapest kernel to compile (the channel scatter), as the compile check builds it."""
    from sparsekit.kernels import _compile_check as CC

    return next((src, opts) for src, opts, desc in CC._extra_sources(80, 163 * 1024)
                if desc.startswith("_channel_scatter_kernel") and dtype in desc)


@pytest.fixture
def triton_cache(monkeypatch, tmp_path):
    """A Triton cache directory of the test's own (TRITON_CACHE_DIR, no knob override)."""
    from triton import knobs

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delitem(knobs.cache.__dict__, "dir", raising=False)
    return tmp_path / "cache"


@compile_only
def test_ptx_only_compile_leaves_the_cache_alone(triton_cache):
    from sparsekit.kernels import _compile_check as CC
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    src, opts = _scatter_job("float16")
    target = GPUTarget("cuda", 80, 32)
    kernel = CC._compile(src, target, opts, True)
    assert ".entry _channel_scatter_kernel" in kernel.asm["ptx"] and not kernel.asm["cubin"]
    assert not triton_cache.exists() or not any(triton_cache.iterdir())   # written to a throwaway directory
    assert knobs.cache.dir == str(triton_cache) and "dir" not in knobs.cache.__dict__
    assert knobs.runtime.add_stages_inspection_hook is None
    # the same key compiled for real afterwards (in Triton 3.6 this raised KeyError 'cubin' when the PTX-only
    # entry had gone to the shared cache); the ptxas -v report comes along
    log: list[str] = []
    kernel = CC._compile(src, target, opts, False, log)
    assert kernel.asm["cubin"][:4] == b"\x7fELF"
    regs, spills = CC._ptxas_usage(kernel, 80, log[0])
    assert 0 < regs <= 255 and spills == 0
    again: list[str] = []
    cached = CC._compile(src, target, opts, False, again)           # a cache hit: no ptxas ran, ptxas -v re-run
    assert again == [""] and CC._ptxas_usage(cached, 80, "") == (regs, spills)


@compile_only
def test_check_falls_back_to_ptx_when_ptxas_fails_and_the_cache_stays_usable(triton_cache, monkeypatch, tmp_path):
    from sparsekit.kernels import _compile_check as CC
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    # a ptxas that reports the real version (the cache key) but fails every compile
    fake = tmp_path / "ptxas"
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec "{knobs.nvidia.ptxas.path}" --version\n'
                    'echo "ptxas fatal: simulated failure" >&2\nexit 1\n')
    fake.chmod(0o755)
    jobs = [(*_scatter_job(dt), f"_channel_scatter_kernel sm80 {dt}") for dt in ("float16", "bfloat16")]
    monkeypatch.setattr(CC, "TARGETS", ((80, 163 * 1024),))
    monkeypatch.setattr(CC, "CASES", ())
    monkeypatch.setattr(CC, "_extra_sources", lambda cc, smem: jobs)
    monkeypatch.setenv("TRITON_PTXAS_PATH", str(fake))
    failures = CC.check_all(verbose=False)
    assert len(failures) == 1 and "cubin generation failed (ptxas)" in failures[0]
    monkeypatch.delenv("TRITON_PTXAS_PATH")
    for src, opts, _ in jobs:   # the same keys, the real ptxas, the same cache directory
        assert CC._compile(src, GPUTarget("cuda", 80, 32), opts, False).asm["cubin"][:4] == b"\x7fELF"


@compile_only
def test_check_fails_on_spills_above_the_limit(triton_cache, monkeypatch):
    from sparsekit.kernels import _compile_check as CC

    jobs = [(*_scatter_job("float16"), "_channel_scatter_kernel sm80 float16")]
    monkeypatch.setattr(CC, "TARGETS", ((80, 163 * 1024),))
    monkeypatch.setattr(CC, "CASES", ())
    monkeypatch.setattr(CC, "_extra_sources", lambda cc, smem: jobs)
    assert CC.check_all(verbose=False) == []
    monkeypatch.setattr(CC, "SPILL_LIMIT", -1)   # every kernel "spills" more than that
    [failure] = CC.check_all(verbose=False)
    assert re.search(r"spills 0 B per thread to local memory \(\d+ registers; more than -1 B\)", failure)


def test_parse_ptxas_report():
    from sparsekit.kernels._compile_check import _parse_ptxas

    report = ("ptxas info    : Compiling entry function '_nm_mm_kernel' for 'sm_90a'\n"
              "ptxas info    : Function properties for _nm_mm_kernel\n"
              "    2536 bytes stack frame, 5028 bytes spill stores, 4544 bytes spill loads\n"
              "ptxas info    : Used 32 registers, used 1 barriers, 2536 bytes cumulative stack size\n")
    assert _parse_ptxas(report) == (32, 5028)
    assert _parse_ptxas("") is None
