"""Measured Triton launch tables: kernels/_configs.py loading and validating them (SPARSEKIT_TRITON_CONFIGS, the
tuned_sm<major>0.json shipped next to it), live autotuning (SPARSEKIT_TRITON_AUTOTUNE, kernels/_autotune.py) and
bench/tune_triton.py's logic, on CPU: stand-ins for the timings, the Triton interpreter for the kernels
(`pytest -m triton --triton-interpret tests/test_tune_triton.py` runs those too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _scripts import load_bench_script
from _triton import INTERPRET, close, make_bsr
from sparsekit.kernels import _autotune
from sparsekit.kernels import _configs as C

from sparsekit.ops import reference as R

ROOT = Path(__file__).resolve().parents[1]
H100 = (9, 227 * 1024)
A100 = (8, 163 * 1024)

interpreter_only = pytest.mark.skipif(not INTERPRET, reason="runs kernels: pytest -m triton --triton-interpret")


@pytest.fixture
def tables(monkeypatch, tmp_path):
    """No table from the environment or the package: the shipped file's place is tmp_path (per test); the tables
    read are forgotten before and after."""
    monkeypatch.delenv(C.TUNED_ENV, raising=False)
    monkeypatch.setattr(C, "tuned_path", lambda major: tmp_path / f"tuned_sm{major}0.json")
    C.reload_tuned()
    yield tmp_path
    C.reload_tuned()


def _table(major: int = 9, **changes) -> dict:
    table = {
        "format": C.TUNED_FORMAT,
        "version": C.TUNED_VERSION,
        "arch_major": major,
        "m_buckets": list(C.M_BUCKETS),
        **C.hand_written_tables(major),
    }
    table.update(changes)
    return table


def _write(path: Path, table: dict) -> Path:
    path.write_text(json.dumps(table))
    return path


# ------------------------------------------------------------------------------------------ loading tables
def test_env_table_replaces_the_hand_written_rows_for_its_arch(tables, monkeypatch):
    table = _table(9)
    table["bsr_mm"]["32"][0] = [32, 8, 3]  # M <= 16, 32x32 blocks
    table["bsr_sddmm"]["1024"] = [128, 8, 2]
    table["nm_mm"][4] = [64, 64, 32, 2, 3]
    table["channel_mm"][1] = [16, 128, 32, 8, 3]
    monkeypatch.setenv(C.TUNED_ENV, str(_write(tables / "mine.json", table)))
    fp16 = torch.float16
    assert C.bsr_mm_config(8, 32, 32, fp16, arch=H100) == C.KernelConfig(block_m=32, num_warps=8, num_stages=3)
    assert C.bsr_mm_config(300, 32, 32, fp16, arch=H100) == C.KernelConfig(128, 4, 5)  # a row left as it was
    cfg = C.bsr_sddmm_config(4096, 10**6, 32, 32, fp16, arch=H100)
    assert (cfg.block_m, cfg.num_warps, cfg.num_stages) == (128, 8, 2)
    assert C.nm_mm_config(4096, fp16, arch=H100) == C.TileConfig(64, 64, 32, 2, 3)
    assert C.channel_mm_config(20, fp16, arch=H100) == C.TileConfig(16, 128, 32, 8, 3)
    # another arch keeps its hand-written rows; shared memory still bounds a measured row
    assert C.bsr_mm_config(8, 32, 32, fp16, arch=A100) == C.KernelConfig(16, 2, 5)
    table["bsr_mm"]["128"][4] = [256, 8, 8]
    monkeypatch.setenv(C.TUNED_ENV, str(_write(tables / "big.json", table)))
    fitted = C.bsr_mm_config(4096, 128, 128, torch.float32, arch=(9, 99 * 1024))
    assert (fitted.block_m, fitted.num_stages) != (256, 8)
    assert C.smem_bytes(fitted.block_m, fitted.num_stages, 128, 128, 4, 9) <= 99 * 1024


def test_shipped_table_next_to_configs_is_used_and_env_wins(tables, monkeypatch):
    shipped = _table(8)
    shipped["bsr_mm"]["64"][2] = [32, 2, 4]
    _write(tables / "tuned_sm80.json", shipped)
    assert C.bsr_mm_config(64, 64, 64, torch.float16, arch=A100) == C.KernelConfig(32, 2, 4)
    assert C.bsr_mm_config(64, 64, 64, torch.float16, arch=H100) == C.KernelConfig(64, 4, 5)  # no sm90 file
    env = _table(8)
    env["bsr_mm"]["64"][2] = [16, 1, 3]
    monkeypatch.setenv(C.TUNED_ENV, str(_write(tables / "env.json", env)))
    assert C.bsr_mm_config(64, 64, 64, torch.float16, arch=A100) == C.KernelConfig(16, 1, 3)


def test_a_table_may_hold_some_families_only(tables, monkeypatch):
    table = {k: v for k, v in _table(9).items() if k not in ("bsr_mm", "bsr_sddmm", "channel_mm")}
    table["nm_mm"][0] = [16, 128, 64, 8, 4]
    monkeypatch.setenv(C.TUNED_ENV, str(_write(tables / "nm.json", table)))
    assert C.nm_mm_config(1, torch.float16, arch=H100) == C.TileConfig(16, 128, 64, 8, 4)
    assert C.bsr_mm_config(1, 16, 16, torch.float16, arch=H100) == C.KernelConfig(16, 1, 5)


def test_the_interpreter_ignores_tables(tables, monkeypatch):
    table = _table(9)
    table["bsr_mm"]["32"] = [[128, 8, 3]] * 5
    monkeypatch.setenv(C.TUNED_ENV, str(_write(tables / "t.json", table)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.bsr_mm_config(8, 32, 32, torch.float16).block_m == 16  # the interpreter's small tile


BAD = [
    ("not json {", r"not valid JSON"),
    (json.dumps([1, 2]), r"must be a JSON object, got list"),
    (json.dumps(_table(9, format="other")), r"format/version must be 'sparsekit-triton-configs'/1"),
    (json.dumps(_table(9, arch_major="sm90")), r"arch_major must be the GPU's compute capability major"),
    (json.dumps(_table(9, m_buckets=[16, 32])), r"m_buckets must be \[16, 32, 64, 128, 256\]"),
    (json.dumps(_table(9, extra=1)), r"unknown key\(s\) \['extra'\]"),
    (json.dumps(_table(9, bsr_mm={"48": [[16, 1, 1]] * 5})), r"bsr_mm has key '48'; keys must be one of"),
    (json.dumps(_table(9, bsr_mm={"32": [[16, 1, 1]] * 4})), r"bsr_mm\[32\] must be a list of 5 rows"),
    (
        json.dumps(_table(9, bsr_mm={"32": [[16, 1, 1]] * 4 + [[24, 4, 3]]})),
        r"bsr_mm\[32\]\[4\] = \[24, 4, 3\]: BLOCK_M must be a power of two",
    ),
    (json.dumps(_table(9, bsr_sddmm={"1024": [64, 3, 2]})), r"bsr_sddmm\[1024\] = \[64, 3, 2\]: .*num_warps one of"),
    (json.dumps(_table(9, nm_mm=[[16, 64, 64, 4]] * 5)), r"nm_mm\[0\] must be a list of 5 ints \[BLOCK_M, BLOCK_N"),
    (json.dumps(_table(9, channel_mm=[[16, 64, 64, 4, 9]] * 5)), r"channel_mm\[0\] = .*num_stages in \[1, 8\]"),
    (json.dumps(_table(9, measured=[1])), r"measured must be an object"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_invalid_tables_raise_naming_the_file_and_the_entry(tables, monkeypatch, text, message):
    path = tables / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as exc:
        C.load_tuned(path)
    assert str(path) in str(exc.value)
    monkeypatch.setenv(C.TUNED_ENV, str(path))
    C.reload_tuned()
    with pytest.raises(ValueError, match=f"{message}.*named by {C.TUNED_ENV}"):
        C.bsr_mm_config(16, 32, 32, torch.float16, arch=H100)


def test_a_bad_shipped_table_raises_too(tables):
    (tables / "tuned_sm90.json").write_text(json.dumps(_table(9, nm_mm=[])))
    with pytest.raises(ValueError, match=r"tuned_sm90\.json: nm_mm must be a list of 5 rows"):
        C.nm_mm_config(16, torch.float16, arch=H100)


def test_missing_env_file(tables, monkeypatch):
    monkeypatch.setenv(C.TUNED_ENV, str(tables / "nowhere.json"))
    with pytest.raises(ValueError, match=r"nowhere\.json: cannot read the measured Triton table .*named by"):
        C.bsr_mm_config(16, 32, 32, torch.float16, arch=H100)


def test_hand_written_tables_validate_and_candidates_start_with_the_table():
    for major in (8, 9):
        assert C.validate_tuned(_table(major))["arch_major"] == major
        fp16 = torch.float16
        arch = A100 if major == 8 else H100
        for m in (1, 16, 100, 4096):
            assert C.bsr_mm_candidates(m, 32, 64, fp16, arch)[0] == C.bsr_mm_config(m, 32, 64, fp16, arch=arch)
            assert C.tile_candidates("nm_mm", m, fp16, arch)[0] == C.nm_mm_config(m, fp16, arch=arch)
            assert C.bsr_sddmm_candidates(m, 500, 32, 32, fp16, arch)[0] == C.bsr_sddmm_config(
                m, 500, 32, 32, fp16, arch=arch
            )
        cands = C.bsr_mm_candidates(8, 64, 64, torch.float32, arch)
        assert len(set(cands)) == len(cands) > 3 and all(c.block_m == 16 for c in cands)  # M <= 16: one tile
    with pytest.raises(ValueError, match="family must be"):
        C.tile_candidates("bsr_mm", 16, torch.float16, H100)


# ------------------------------------------------------------------------------------------- live autotune
def test_autotune_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(_autotune.ENV, raising=False)
    assert _autotune.pick(("k",), "table", lambda: pytest.fail("timed"), lambda c: None, torch.device("cpu")) == "table"
    monkeypatch.setenv(_autotune.ENV, "0")
    assert not _autotune.enabled()
    monkeypatch.setenv(_autotune.ENV, "yes")
    assert _autotune.enabled()


def test_autotune_picks_the_fastest_once_per_key(monkeypatch):
    monkeypatch.setenv(_autotune.ENV, "1")
    monkeypatch.setattr(_autotune, "CACHE", {})
    timings = {"a": 3.0, "b": 1.0, "c": 2.0}
    ran = []

    def timer(fn, device):
        fn()
        return timings[ran[-1]]

    def run(cfg):
        if cfg == "bad":
            raise RuntimeError("out of resources: shared memory")
        ran.append(cfg)

    monkeypatch.setattr(_autotune, "time_config", timer)
    assert _autotune.pick(("k", 1), "a", lambda: ["a", "bad", "b", "c"], run, torch.device("cpu")) == "b"
    assert _autotune.CACHE == {("k", 1): "b"}
    assert _autotune.pick(("k", 1), "a", lambda: pytest.fail("timed twice"), run, torch.device("cpu")) == "b"
    best, ms, errors = _autotune.best(["bad"], run, torch.device("cpu"), timer=timer)
    assert best is None and not ms and "out of resources" in errors["bad"]
    assert _autotune.pick(("k", 2), "a", lambda: ["bad"], run, torch.device("cpu")) == "a"  # none ran: the table's


@pytest.mark.triton
@interpreter_only
def test_live_autotune_in_the_launcher(monkeypatch):
    """SPARSEKIT_TRITON_AUTOTUNE=1: bsr_mm times its candidates (a tiny list here) on the first launch of a key,
    launches the fastest, and reuses it; the result is unchanged."""
    from sparsekit.kernels import k_bsr_mm

    monkeypatch.setenv(_autotune.ENV, "1")
    monkeypatch.setattr(_autotune, "CACHE", {})
    small, big = C.KernelConfig(16, 1, 1), C.KernelConfig(32, 1, 1)
    monkeypatch.setattr(k_bsr_mm, "bsr_mm_candidates", lambda *a: [small, big])
    launched = []
    real = k_bsr_mm._bsr_mm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["BLOCK_M"])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(k_bsr_mm, "_bsr_mm_kernel", Spy())
    calls = iter([5.0, 1.0])  # the second candidate (BLOCK_M 32) is "faster"

    def timer(fn, device):
        fn()
        return next(calls)

    monkeypatch.setattr(_autotune, "time_config", timer)
    w = make_bsr(64, 64, (16, 16), 0.5, torch.float32, device="cpu")
    x = torch.randn(20, 64)
    y = k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 64, split_k=1)
    assert launched == [16, 32, 32]  # timed: one run per candidate (the stand-in timer), then the real launch
    close(y, R.bsr_mm(x.double(), w.crow_indices, w.col_indices, w.values.double(), None, 64), torch.float32)
    k_bsr_mm.bsr_mm(x[:17], w.crow_indices, w.col_indices, w.values, None, 64, split_k=1)  # same key
    assert launched == [16, 32, 32, 32] and len(_autotune.CACHE) == 1
    k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, 64, split_k=1, config=small)  # explicit
    assert launched[-1] == 16


@pytest.mark.triton
@interpreter_only
def test_live_autotune_keeps_the_sddmm_split_per_call(monkeypatch):
    """The autotune key of bsr_sddmm holds no block count: a tile tuned on a small layer must not bring that
    layer's split of M (fp32 atomics) to a large one; the split follows each call's table rule."""
    from sparsekit.kernels import k_bsr_sddmm

    monkeypatch.setenv(_autotune.ENV, "1")
    monkeypatch.setattr(_autotune, "CACHE", {})
    monkeypatch.setattr(_autotune, "time_config", lambda fn, device: (fn(), 1.0)[1])
    def table(m, nnzb, bn, bk, dtype, device=None, arch=None):   # a GPU table's rule: few blocks -> split M
        return C.TileConfig(block_m=16, block_n=bn, block_k=bk, num_warps=1, num_stages=1,
                            split=4 if nnzb < 100 else 1)

    monkeypatch.setattr(k_bsr_sddmm, "bsr_sddmm_config", table)
    monkeypatch.setattr(k_bsr_sddmm, "bsr_sddmm_candidates",
                        lambda m, nnzb, bn, bk, dt, arch: [table(m, nnzb, bn, bk, dt)])
    splits = []

    class Spy:
        def __getitem__(self, grid):
            splits.append(grid[1])
            return lambda *args, **kwargs: None

    monkeypatch.setattr(k_bsr_sddmm, "_bsr_sddmm_kernel", Spy())

    def split_of(nblocks: int) -> int:
        crow = torch.arange(0, nblocks + 1, dtype=torch.int32)
        col = torch.zeros(nblocks, dtype=torch.int32)
        k_bsr_sddmm.bsr_sddmm(torch.randn(1024, 16 * nblocks), torch.randn(1024, 16), crow, col, 16, 16)
        return splits[-1]

    assert split_of(4) == 4 and split_of(600) == 1 and len(_autotune.CACHE) == 1


# --------------------------------------------------------------------------------------- bench/tune_triton.py
@pytest.fixture(scope="module")
def tt():
    return load_bench_script("tune_triton")


def test_rows_cover_every_table_row(tt):
    rows = tt.rows(tt.DEFAULT_FAMILIES, C.BLOCK_SIDES, tuple(range(len(C.M_BUCKETS))))
    keys = {tt.row_key(r) for r in rows}
    assert len(keys) == len(rows)
    table = C.hand_written_tables(9)
    expect = {f"bsr_mm[{bn}][{b}]" for bn in table["bsr_mm"] for b in range(len(C.M_BUCKETS))}
    expect |= {f"bsr_sddmm[{size}]" for size in table["bsr_sddmm"]}
    expect |= {f"{f}[{b}]" for f in ("nm_mm", "channel_mm") for b in range(len(C.M_BUCKETS))}
    assert keys == expect
    assert rows[0] == ("bsr_mm", 32, 0)  # the targets first: BSR 32 at decode M
    assert tt.bucket_m(0, 4096) == 16 and tt.bucket_m(len(C.M_BUCKETS) - 1, 4096) == 4096
    assert tt.sddmm_block(2048, C.BLOCK_SIDES) == (64, 32)


def test_measure_row_keeps_the_fastest_correct_candidate(tt):
    """A candidate whose output differs from the table config's is dropped however fast it is; one that fails is
    skipped; the fastest of the rest wins."""
    ref = torch.arange(6.0).reshape(2, 3)
    outputs = {"table": ref, "wrong": ref + 1, "close": ref + 1e-4, "broken": None}
    timings = {"table": 3.0, "wrong": 0.5, "close": 1.0}

    def run(cfg):
        if outputs[cfg] is None:
            raise RuntimeError("compilation failed")
        return outputs[cfg]

    last = []

    def timer(fn, device):
        last.append(fn())
        return timings[next(k for k, v in outputs.items() if v is last[-1])]

    res = tt.measure_row(run, ["table", "wrong", "close", "broken"], torch.device("cpu"), torch.float16, timer)
    assert res["best"] == "close" and set(res["ms"]) == {"table", "close"}
    assert "differs from the table config's" in res["errors"]["wrong"]
    assert "compilation failed" in res["errors"]["broken"]


def test_written_table_validates_and_is_what_the_launchers_read(tt, tables, monkeypatch):
    table = _table(9)
    tt.apply(table, ("bsr_mm", 64, 1), C.KernelConfig(16, 8, 3))
    tt.apply(table, ("bsr_sddmm", 32, 64), C.TileConfig(32, 32, 64, 2, 2))
    tt.apply(table, ("channel_mm", 3), C.TileConfig(32, 64, 64, 4, 3))
    out = tables / "out" / "tuned_sm90.json"
    tt.write(table, out)
    assert "[16, 8, 3]" in out.read_text()  # one table row per line
    monkeypatch.setenv(C.TUNED_ENV, str(out))
    assert C.bsr_mm_config(32, 64, 64, torch.float16, arch=H100) == C.KernelConfig(16, 8, 3)
    cfg = C.bsr_sddmm_config(64, 10**6, 32, 64, torch.float16, arch=H100)
    assert (cfg.block_m, cfg.num_warps, cfg.num_stages) == (32, 2, 2)
    assert C.channel_mm_config(100, torch.float16, arch=H100) == C.TileConfig(32, 64, 64, 4, 3)
    table["bsr_mm"]["64"][1] = [17, 8, 3]
    with pytest.raises(ValueError, match=r"bsr_mm\[64\]\[1\]"):
        tt.write(table, out)
    assert C.load_tuned(out)["bsr_mm"][64][1] == (16, 8, 3)  # the previous file is left as it was


def test_tune_stops_at_its_budget_and_writes_what_it_measured(tt, tmp_path, monkeypatch):
    """Rows past the budget keep the hand-written values and are listed; the file is valid after every row."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(tt, "clock", lambda: next(clock))
    table_cfg = C.KernelConfig(16, 4, 5)
    monkeypatch.setattr(tt, "problem", lambda row, args, dtype, device: (None, [table_cfg], table_cfg))
    monkeypatch.setattr(
        tt,
        "measure_row",
        lambda *a: {"best": C.KernelConfig(32, 8, 3), "ms": {C.KernelConfig(32, 8, 3): 1.0}, "errors": {}},
    )
    args = tt.build_parser().parse_args(
        [
            "--device",
            "cpu",
            "--families",
            "bsr_mm",
            "--sides",
            "32",
            "--budget-s",
            "55",
            "--out",
            str(tmp_path / "t.json"),
        ]
    )
    logs = []
    table = tt.tune(args, log=logs.append)
    measured = table["measured"]
    assert [k for k in measured if k != "not_measured"] == ["bsr_mm[32][0]", "bsr_mm[32][1]"]
    assert measured["not_measured"] == ["bsr_mm[32][2]", "bsr_mm[32][3]", "bsr_mm[32][4]"]
    saved = C.load_tuned(tmp_path / "t.json")
    assert saved["bsr_mm"][32][:3] == ((32, 8, 3), (32, 8, 3), tuple(C.BSR_MM_TABLE[(9, 32)][2]))
    assert any("budget of 55" in line for line in logs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sides", "48"], "--sides: values must be among"),
        (["--buckets", "7"], "--buckets: values must be among"),
        (["--families", "bsr_mm,dense"], "--families: must be a comma list"),
        (["--size", "100"], "--size must be a multiple of the largest block side"),
        (["--density", "0"], "--density must be in"),
        (["--out", "a.json", "--out-dir", "d"], "not allowed with argument"),
    ],
)
def test_cli_rejects_bad_arguments(tt, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        tt.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_needs_a_gpu_or_the_interpreter(tt, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        tt.main(["--device", "cpu", "--out", str(tmp_path / "t.json")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            tt.main(["--out", str(tmp_path / "t.json")])


@pytest.mark.triton
@interpreter_only
def test_tune_end_to_end_under_the_interpreter(tt, tables, monkeypatch):
    """Every family, one bucket, block 16, two candidates per row, real kernels (the interpreter) and the CPU timer:
    a valid table whose measured rows are what the launchers then read."""
    out = tables / "tuned_sm90.json"
    args = tt.build_parser().parse_args(
        [
            "--device",
            "cpu",
            "--size",
            "64",
            "--sides",
            "16",
            "--buckets",
            "0",
            "--max-candidates",
            "2",
            "--large-m",
            "32",
            "--out",
            str(out),
        ]
    )
    table = tt.tune(args, log=lambda line: None)
    measured = table["measured"]
    assert set(measured) == {"bsr_mm[16][0]", "nm_mm[0]", "bsr_sddmm[256]", "channel_mm[0]"}
    assert all(r["candidates"] == 2 and r["failed"] == 0 and r["chosen_ms"] > 0 for r in measured.values())
    saved = C.load_tuned(out)
    assert saved["bsr_mm"][16][0] == tuple(measured["bsr_mm[16][0]"]["chosen"])
    monkeypatch.setenv(C.TUNED_ENV, str(out))
    monkeypatch.delenv("TRITON_INTERPRET")  # the table lookup (the interpreter's own tiles ignore tables)
    cfg = C.bsr_mm_config(16, 16, 16, torch.float16, arch=H100)
    assert [cfg.block_m, cfg.num_warps, cfg.num_stages] == measured["bsr_mm[16][0]"]["chosen"]


def test_measure_row_survives_a_failing_table_config(tt):
    """The table's own config failing (out of shared memory) is what tuning is for: recorded, and the first
    candidate that runs becomes the reference the others are checked against."""
    out = {"a": torch.ones(4), "b": torch.ones(4), "wrong": torch.zeros(4)}
    times = {"a": 2.0, "b": 1.0, "wrong": 0.5}
    last = []

    def run(cfg):
        if cfg == "table":
            raise RuntimeError("out of resource: shared memory")
        last.append(cfg)
        return out[cfg]

    def timer(fn, device):
        fn()
        return times[last[-1]]

    res = tt.measure_row(run, ["table", "a", "b", "wrong"], torch.device("cpu"), torch.float16, timer)
    assert res["best"] == "b" and "shared memory" in res["errors"]["table"] and "wrong" in res["errors"]


def test_the_tables_shipped_in_kernels_are_valid():
    """Every tuned_sm<major>0.json shipped next to kernels/_configs.py loads (the launchers would raise on first
    use otherwise) and is filed under the arch it was measured on."""
    shipped = sorted(Path(C.__file__).parent.glob("tuned_sm*0.json"))
    assert shipped, "no tuned_sm*0.json next to kernels/_configs.py (package_data must ship them)"
    for path in shipped:
        table = C.load_tuned(str(path))
        assert path.name == f"tuned_sm{table['arch_major']}0.json"
        assert set(C.FAMILIES) <= set(table)


def test_configs_are_memoized_until_reload(tables, monkeypatch):
    """A launch config is worked out once per (bucket, block, dtype, arch, table): a table rewritten in place is
    read again only after reload_tuned(), the configs with it."""
    path = tables / "mine.json"
    table = _table(9)
    table["bsr_mm"]["32"][0] = [32, 8, 3]
    table["nm_mm"][0] = [16, 128, 64, 8, 4]
    monkeypatch.setenv(C.TUNED_ENV, str(_write(path, table)))
    fp16 = torch.float16
    assert C.bsr_mm_config(8, 32, 32, fp16, arch=H100) == C.KernelConfig(32, 8, 3)
    assert C.nm_mm_config(1, fp16, arch=H100) == C.TileConfig(16, 128, 64, 8, 4)
    table["bsr_mm"]["32"][0] = [16, 4, 4]
    table["nm_mm"][0] = [16, 64, 64, 4, 3]
    _write(path, table)
    assert C.bsr_mm_config(8, 32, 32, fp16, arch=H100) == C.KernelConfig(32, 8, 3)
    C.reload_tuned()
    assert C.bsr_mm_config(8, 32, 32, fp16, arch=H100) == C.KernelConfig(16, 4, 4)
    assert C.nm_mm_config(1, fp16, arch=H100) == C.TileConfig(16, 64, 64, 4, 3)


@pytest.mark.parametrize("measured_in", ["float16", "float32", None])
def test_a_table_serves_the_element_size_it_was_measured_in(tables, monkeypatch, measured_in):
    """Rows timed in fp16 (bf16 shares them) keep 4-byte launches on the hand-written rows, which were sized
    against register spills, and the other way round; a table that names no dtype serves both."""
    table = _table(9)
    table["bsr_mm"]["32"][0] = [32, 8, 3]
    table["nm_mm"][0] = [16, 128, 64, 8, 4]
    if measured_in is not None:
        table["dtype"] = measured_in
    monkeypatch.setenv(C.TUNED_ENV, str(_write(tables / "mine.json", table)))
    measured = C.KernelConfig(32, 8, 3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        serves = measured_in is None or (dtype == torch.float32) == (measured_in == "float32")
        got = C.bsr_mm_config(8, 32, 32, dtype, arch=H100)
        assert (got == measured) == serves, (dtype, got)
        if dtype != torch.float32:   # (an fp32 nm_mm row is refitted by the fp32 rule either way)
            assert (C.nm_mm_config(1, dtype, arch=H100) == C.TileConfig(16, 128, 64, 8, 4)) == serves


def test_a_table_with_an_unknown_dtype_is_refused(tables):
    with pytest.raises(ValueError, match=r"mine\.json: dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        C.load_tuned(str(_write(tables / "mine.json", _table(9, dtype="float64"))))
