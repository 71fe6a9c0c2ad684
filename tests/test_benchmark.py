"""The benchmark infrastructure (sparsekit.benchmark, bench/): well-formed rows and files, the correctness guard,
break-even arithmetic, README block rewriting and CLI errors. Nothing here asserts a speed."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from _scripts import load_bench_script

from sparsekit import _extension
from sparsekit.benchmark.machine import measure_peaks
from sparsekit.benchmark.patterns import Pattern, make_weight, nm_for_sparsity, parse_block, to_format
from sparsekit.benchmark.progress import Progress
from sparsekit.benchmark.report import (
    END_MARKER,
    START_MARKER,
    break_even,
    find_results,
    load_results,
    replace_marked_block,
    summarize,
    to_markdown,
)
from sparsekit.benchmark.shapes import ConvShape, LinearShape, get_shapes
from sparsekit.benchmark.sweep import ROW_FIELDS, Candidate, SweepConfig, measure, run_kernel_sweep, save_results
from sparsekit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY_LINEAR = LinearShape("tiny.linear", 64, 32, 8, 8, "test")
TINY_CONV = ConvShape("tiny.conv", 16, 16, 3, 6, 1, 1, 1, 1, "test")


def _tiny_config(**kw) -> SweepConfig:
    base = {"shapes": (TINY_LINEAR, TINY_CONV), "sparsities": (0.5, 0.9), "formats": ("bsr", "csr", "nm"),
            "blocks": ((16, 16), (1, 4)), "compile": False, "peaks": False, "warmup": 1, "min_reps": 2,
            "max_reps": 2, "budget_s": 0.01, "progress": False}
    return SweepConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_results() -> dict:
    return run_kernel_sweep(_tiny_config())


# ------------------------------------------------------------------------------------------------ sweep
def test_sweep_rows_are_well_formed(tiny_results):
    rows = tiny_results["rows"]
    assert rows
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        if r["status"] != "ok":     # recorded, not timed: e.g. MKL sparse has no non-square BSR blocks
            assert r["status"] == "unsupported" and r["ms"] is None and r["speedup"] is None and r["note"], r
            continue
        assert r["ms"] > 0 and r["speedup"] > 0 and r["reps"] == 2
        assert math.isclose(r["ideal"], 1 / (1 - r["sparsity"]))
        assert math.isclose(r["pct_ideal"], 100 * r["speedup"] / r["ideal"])
        if r["candidate"] == "dense":
            assert r["speedup"] == 1.0
    shapes = {(r["op"], r["shape"]) for r in rows}
    assert shapes == {("linear", "tiny.linear"), ("conv2d", "tiny.conv")}
    pats = {r["pattern"] for r in rows}
    assert {"bsr16x16", "bsr1x4", "csr", "nm2:4"} <= pats
    cands = {r["candidate"] for r in rows}
    assert {"dense", "torch_bsr", "torch_csr", "dense_cl"} <= cands
    if torch.backends.mkldnn.is_available():    # linear's prepacked oneDNN dense counts as a dense variant
        onednn = [r for r in rows if r["candidate"] == "dense_onednn"]
        assert onednn and all(r["op"] == "linear" and r["kind"] == "dense" and r["status"] == "ok" for r in onednn)
        for r in rows:
            if r["op"] == "linear" and r.get("ms") and r["kind"] != "dense":
                assert r["best_dense_ms"] <= next(o["ms"] for o in onednn if o["pattern"] == r["pattern"]
                                                  and o["target_sparsity"] == r["target_sparsity"])
    assert "sparsekit_reference" not in cands                 # densify + matmul: only with include_reference
    if _extension.LOADED:
        assert "sparsekit_cpu" in cands
    # exact sparsity per pattern; n:m at 0.9 has no n:m within 0.02 for K=144 (conv) and is noted, not run
    for r in rows:
        if r["format"] in ("bsr", "csr"):   # exact up to one unit: tiny.linear has only 8 blocks of 16x16
            bn, bk = map(int, r["block"].split("x")) if r["block"] else (1, 1)
            assert abs(r["sparsity"] - r["target_sparsity"]) <= bn * bk / (r["N"] * r["K"]) / 2 + 1e-9
    assert any(k.startswith("nm@0.9") for k in tiny_results["notes"])
    meta = tiny_results["meta"]
    for key in ("cpu_model", "threads", "torch", "triton", "tf32", "date", "timing", "dense_baseline", "config"):
        assert key in meta


def test_include_reference_and_peaks():
    res = run_kernel_sweep(_tiny_config(shapes=(TINY_LINEAR,), formats=("csr",), sparsities=(0.9,),
                                        include_reference=True))
    assert "sparsekit_reference" in {r["candidate"] for r in res["rows"]}
    peaks = measure_peaks("cpu", torch.float32, size=128, copy_mib=4, reps=2)
    assert peaks["flops"] > 0 and peaks["bytes_per_s"] > 0 and "measured in this run" in peaks["how"]


def test_save_and_load_round_trip(tiny_results, tmp_path):
    paths = save_results(tiny_results, tmp_path, plots=False)
    data = json.loads(Path(paths["json"]).read_text())
    assert data["schema"] == "sparsekit-bench/1" and len(data["rows"]) == len(tiny_results["rows"])
    assert Path(paths["json"]).name.startswith("cpu-") and "_kernels" in Path(paths["json"]).name
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ROW_FIELDS
        assert len(list(reader)) == len(tiny_results["rows"])
    assert "# sparsekit benchmark report" in Path(paths["report"]).read_text()
    for p in (paths["json"], paths["csv"], tmp_path):      # a file of either kind, or the directory
        loaded = load_results(p)
        assert len(loaded["rows"]) == len(tiny_results["rows"])
        assert summarize(loaded["rows"])


def test_plots_written_or_skipped(tiny_results, tmp_path, monkeypatch):
    from sparsekit.benchmark.plots import plot_results

    if importlib.util.find_spec("matplotlib") is not None:
        paths, msg = plot_results(tiny_results, tmp_path / "plots")
        names = {p.name for p in paths}
        assert "speedup_linear_tiny.linear_float32.png" in names and "summary_linear_float32.png" not in names
        assert all(p.stat().st_size > 1000 for p in paths)
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as if not installed
    paths, msg = plot_results(tiny_results, tmp_path / "none")
    assert paths == [] and "matplotlib is not installed" in msg


def test_correctness_guard_records_failures_instead_of_timings():
    x, w = torch.randn(8, 16), torch.randn(32, 16)
    cands = [Candidate("dense", "dense", lambda: x @ w.T),
             Candidate("good", "sparsekit", lambda: (w @ x.T).T),
             Candidate("wrong", "sparsekit", lambda: x @ w.T + 1e-2),
             Candidate("broken", "torch", lambda: (_ for _ in ()).throw(RuntimeError("no kernel for this")))]
    cfg = SweepConfig(warmup=0, min_reps=2, max_reps=2, budget_s=0.01)
    res, reps = measure(cands, 1e-4, "cpu", cfg)
    assert res["good"]["status"] == "ok" and res["good"]["ms"] > 0
    assert res["wrong"]["status"] == "mismatch" and res["wrong"]["ms"] is None
    assert "differs from dense" in res["wrong"]["note"]
    assert res["broken"]["status"] == "unsupported" and res["broken"]["ms"] is None
    assert "no kernel for this" in res["broken"]["note"]


# ---------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("pattern", [Pattern("bsr", block=(16, 16)), Pattern("bsr", block=(1, 4)), Pattern("csr"),
                                     Pattern("nm", n=1, m=4)])
def test_make_weight_exact_sparsity(pattern):
    w = make_weight(64, 128, pattern, 0.75, seed=3)
    assert float((w == 0).float().mean()) == pytest.approx(0.75, abs=1e-3)
    fmt = to_format(w, pattern)
    torch.testing.assert_close(fmt.to_dense(), w)


def test_nm_and_block_parsing():
    assert nm_for_sparsity(0.5, 768) == (2, 4)
    assert nm_for_sparsity(0.95, 768) == (1, 16)
    n, m = nm_for_sparsity(0.9, 768)
    assert abs(1 - n / m - 0.9) <= 0.02
    assert nm_for_sparsity(0.9, 6) is None
    assert parse_block("32") == (32, 32) and parse_block("1x4") == (1, 4)
    with pytest.raises(ValueError, match="'3y'"):
        parse_block("3y")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"sparsities.*1\.2"):
        SweepConfig(sparsities=(1.2,)).validate()
    with pytest.raises(ValueError, match="formats.*'coo'"):
        SweepConfig(formats=("coo",)).validate()
    with pytest.raises(ValueError, match="unknown shape 'nope'"):
        SweepConfig(shapes=("nope",)).validate()
    with pytest.raises(ValueError, match="dtypes.*'float8'"):
        SweepConfig(dtypes=("float8",)).validate()
    assert [s.name for s in get_shapes(["llama-7b.*"])][0] == "llama-7b.attn_proj"


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with Progress(2, "sweep") as p:
        p.update(desc="a")
        p.update(desc="b")
    err = capsys.readouterr().err
    assert "[2/2] sweep b" in err


# ------------------------------------------------------------------------------------------------ report
def _row(s: float, speedup: float, cand: str = "sparsekit_cpu", fmt: str = "bsr") -> dict:
    return {"op": "linear", "shape": "x", "dtype": "float32", "format": fmt, "pattern": "bsr32x32", "M": 1,
            "N": 2, "K": 3, "candidate": cand, "kind": "sparsekit", "status": "ok", "sparsity": s,
            "target_sparsity": s, "speedup": speedup, "pct_ideal": 100 * speedup * (1 - s), "ms": 1.0}


def test_break_even_interpolates():
    assert break_even([(0.5, 0.5), (0.9, 1.5)]).value == pytest.approx(0.7)
    assert break_even([(0.9, 1.5), (0.5, 0.5)]).value == pytest.approx(0.7)       # any order
    be = break_even([(0.5, 0.2), (0.7, 0.6), (0.8, 0.9), (0.9, 1.1)])
    assert be.kind == "interpolated" and be.value == pytest.approx(0.85)
    assert break_even([(0.5, 1.2), (0.9, 3.0)]).kind == "below"
    never = break_even([(0.5, 0.2), (0.9, 0.8)])
    assert never.kind == "never" and never.value is None and str(never) == "never (up to 0.90)"
    assert break_even([]).kind == "none"


def test_break_even_is_where_the_curve_stays_above_one():
    # a dip below 1 after a crossing: judged by the last dip (the first crossing claims a slower point), marked
    dip = break_even([(0.5, 1.1), (0.7, 0.8), (0.9, 2.0)])
    assert dip.kind == "interpolated" and dip.value == pytest.approx(0.7 + 0.2 * 0.2 / 1.2) and dip.dips
    assert str(dip).endswith("(dips)")
    late = break_even([(0.5, 0.8), (0.7, 1.2), (0.8, 0.9), (0.9, 1.5)])
    assert late.value == pytest.approx(0.8 + 0.1 / 6) and late.dips
    assert break_even([(0.5, 1.2), (0.9, 0.9)]).kind == "never"
    nan = break_even([(0.5, 0.5), (0.7, float("nan")), (0.9, 2.0)])     # a failed timing is left out
    assert nan.value == pytest.approx(0.5 + 0.5 * 0.4 / 1.5) and not nan.dips


def test_summary_skips_non_finite_points_and_keeps_row_counts_apart():
    rows = [_row(0.5, 0.5), _row(0.9, float("inf")), {**_row(0.9, 2.0), "sparsity": None},
            _row(0.7, 1.5), {**_row(0.9, 9.0), "M": 16}]      # (a GEMV run and an M = 16 run concatenated)
    by_m = {e["M"]: e for e in summarize(rows)}
    assert set(by_m) == {1, 16}
    assert by_m[1]["best_speedup"] == 1.5 and by_m[1]["break_even"].value == pytest.approx(0.6)
    assert by_m[1]["failed"] == ["no timing@0.90"]   # the inf and the sparsity-less rows: named, no crash
    assert by_m[16]["best_speedup"] == 9.0


def test_summary_and_markdown_on_synthetic_rows():
    rows = [_row(0.5, 0.5), _row(0.9, 1.5), {**_row(0.9, 1.0), "candidate": "dense", "kind": "dense"}]
    (entry,) = summarize(rows)
    assert entry["break_even"].value == pytest.approx(0.7)
    assert entry["best_speedup"] == 1.5 and entry["best_at"] == 0.9
    assert entry["pct_ideal_at_best"] == pytest.approx(15.0)
    md = to_markdown({"meta": {}, "rows": rows})
    assert "| 0.70 |" in md and "1.50x @ 0.90 (15%)" in md


def test_replace_marked_block_only_touches_the_block():
    text = f"# Title\n\nbefore\n{START_MARKER}\nold table\n{END_MARKER}\nafter\n"
    new = replace_marked_block(text, "new table")
    assert new == f"# Title\n\nbefore\n{START_MARKER}\nnew table\n{END_MARKER}\nafter\n"
    with pytest.raises(ValueError, match="no '<!-- bench-table -->'"):
        replace_marked_block("no markers here", "x")
    with pytest.raises(ValueError, match="comes before"):
        replace_marked_block(f"{END_MARKER}\n{START_MARKER}\n", "x")


_load_script = load_bench_script


def test_make_readme_table_rewrites_only_the_marked_block(tiny_results, tmp_path, capsys):
    results = tmp_path / "results"
    save_results(tiny_results, results, plots=False)
    readme = tmp_path / "README.md"
    outside_before, outside_after = "# Project\n\nintro text\n\n", "\n## Later section\n\nkept as is\n"
    readme.write_text(f"{outside_before}{START_MARKER}\nstale numbers\n{END_MARKER}{outside_after}")
    script = _load_script("make_readme_table")
    assert script.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(outside_before + START_MARKER) and text.endswith(END_MARKER + outside_after)
    block = text[text.index(START_MARKER):text.index(END_MARKER)]
    assert "stale numbers" not in block and "#### CPU kernels" in block and "tiny.linear" in block
    assert "#### GPU" in block and "Not measured yet" in block
    assert script.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="marker"):
        script.main(["--results", str(results), "--readme", str(readme)])


def test_make_readme_table_links_lowered_isa_runs_instead_of_repeating_them(tiny_results, tmp_path):
    """An AVX2-class sweep (bench/avx2_class.sh) of the same configuration gets one linking line, not a table of
    its own, and never replaces the native run's table."""
    results = tmp_path / "results"
    native = copy.deepcopy(tiny_results)       # (the machine running the tests may itself be AVX2-class)
    native["meta"] |= {"cpu_kernel_isa": "avx512", "env": {}}
    save_results(native, results, plots=False)
    avx2 = copy.deepcopy(tiny_results)
    avx2["meta"] |= {"cpu_kernel_isa": "avx2", "date": "2999-01-01T00:00:00+00:00",
                     "env": {"SPARSEKIT_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2"}}
    avx2_md = Path(save_results(avx2, results, plots=False)["report"]).name
    script = _load_script("make_readme_table")
    block = script.build_block(results, tmp_path / "README.md")
    assert block.count("#### CPU kernels") == 1 and "AVX2 class" not in block.split("Also measured")[0]
    assert "Also measured with a lowered instruction set" in block and avx2_md in block
    avx2["meta"] |= {"env": {}, "date": "2999-01-02T00:00:00+00:00", "cpu_model": "AMD EPYC"}   # an AVX2 machine
    save_results(avx2, results, plots=False)
    block = script.build_block(results, tmp_path / "README.md")     # a run on another machine replaces nothing
    assert "Also measured on an AVX2-class machine" in block and "Also measured with a lowered" in block


def test_make_readme_table_keeps_a_complete_run_over_a_newer_interrupted_one(tiny_results, tmp_path):
    results = tmp_path / "results"
    save_results(tiny_results, results, plots=False)
    cut = copy.deepcopy(tiny_results)
    cut["meta"] |= {"date": "2999-01-01T00:00:00+00:00", "interrupted": "interrupted (SIGINT) after 1 of 4"}
    cut_path = Path(save_results(cut, results, plots=False)["json"])
    script = _load_script("make_readme_table")
    block = script.build_block(results, tmp_path / "README.md")
    assert cut_path.stem not in block and "interrupted" not in block
    assert find_results(results, device="cpu", suite="kernels").name != cut_path.name
    for f in results.glob("*.json"):        # only the interrupted run left: shown, and said to be partial
        if f != cut_path:
            f.unlink()
    block = script.build_block(results, tmp_path / "README.md")
    assert cut_path.stem in block and "interrupted (SIGINT) after 1 of 4" in block


def test_reports_name_a_plots_folder_only_when_plots_were_written(tiny_results, tmp_path):
    paths = save_results(tiny_results, tmp_path, plots=False)
    assert "PNG plots" not in Path(paths["report"]).read_text()
    out = tmp_path / "report.md"
    assert cli_main(["report", str(paths["json"]), "--out", str(out)]) == 0
    assert "PNG plots" not in out.read_text()
    (tmp_path / tiny_results["meta"]["stem"]).mkdir()
    assert cli_main(["report", str(paths["json"]), "--out", str(out)]) == 0
    assert "PNG plots" in out.read_text()


def test_do_bench_timing_is_described_as_it_runs():
    from sparsekit.benchmark.sweep import _timing_text

    text = _timing_text(_tiny_config(timer="do_bench", device="cuda"))
    assert "do_bench's own 25 ms warm-up and 100 ms of reps" in text and "reps (as many as fit" not in text


def test_semi_structured_weight_bytes_are_its_packed_tensors():
    from types import SimpleNamespace

    from sparsekit.benchmark.sweep import _semi_structured_nbytes

    ws = SimpleNamespace(packed=torch.zeros(64, 32, dtype=torch.float16), meta=torch.zeros(64, 2, dtype=torch.int16))
    assert _semi_structured_nbytes(ws) == 64 * 32 * 2 + 64 * 2 * 2
    assert _semi_structured_nbytes(SimpleNamespace(packed=torch.zeros(8, dtype=torch.int8), meta=None)) == 8


# --------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, expect", [
    (["bench", "kernels", "--sparsity", "1.5"], ["--sparsity", "'1.5'", "[0, 1)"]),
    (["bench", "kernels", "--sparsity", "abc"], ["--sparsity", "'abc'", "not a number"]),
    (["bench", "kernels", "--block", "3y"], ["--block", "'3y'", "1x4"]),
    (["bench", "kernels", "--formats", "coo"], ["--formats", "'coo'", "bsr, csr, nm"]),
    (["bench", "kernels", "--dtype", "float8"], ["--dtype", "'float8'", "float32"]),
    (["bench", "model", "--models", "gpt"], ["--models", "'gpt'", "ffn"]),
    (["bench", "kernels", "--device", "tpu"], ["--device", "'tpu'"]),
])
def test_cli_rejects_bad_arguments(argv, expect, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for piece in expect:
        assert piece in err, (piece, err)


def test_cli_errors_after_parsing(tmp_path):
    with pytest.raises(SystemExit, match="unknown shape 'nope'"):
        cli_main(["bench", "kernels", "--shapes", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["report", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="no results .json"):
        cli_main(["report", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli_main(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path)])


def test_cli_report_prints_markdown(tiny_results, tmp_path, capsys):
    paths = save_results(tiny_results, tmp_path, plots=False)
    assert cli_main(["report", str(paths["json"])]) == 0
    out = capsys.readouterr().out
    assert "break-even" in out and "tiny.linear" in out
    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text().startswith("# sparsekit benchmark report")


# ----------------------------------------------------------------------------------------------- timing
def test_interleaved_timing_repeats_every_candidate_alike_when_the_fastest_is_short():
    from sparsekit.timing import interleaved_samples_ms

    counts = {"fast": 0, "slow": 0}

    def fast():
        counts["fast"] += 1
        time.sleep(0.00025)

    def slow():
        counts["slow"] += 1
        time.sleep(0.003)

    samples = interleaved_samples_ms({"fast": fast, "slow": slow}, warmup=1, reps=3, min_sample_ms=1.0)
    assert [len(v) for v in samples.values()] == [3, 3]
    # warm-up, three probe calls, then the same count per sample for both: enough for `fast` to fill 1 ms (a count
    # per candidate gave the fast one warm repeats and the slow one a cold single call)
    assert counts["fast"] == counts["slow"]
    per_sample = (counts["slow"] - 1 - 3) / 3
    assert per_sample == int(per_sample) and 2 <= per_sample <= 4
    # per-call ms, not per-sample (the median: a sleep may overshoot once on a busy machine)
    assert min(samples["slow"]) >= 3.0 and sorted(samples["fast"])[1] < 1.0

    counts.update(fast=0, slow=0)
    interleaved_samples_ms({"fast": fast, "slow": slow}, warmup=1, reps=3, min_sample_ms=0.0)
    assert counts == {"fast": 4, "slow": 4}


def test_min_sample_ms_is_validated():
    from sparsekit.timing import interleaved_samples_ms

    with pytest.raises(ValueError, match="min_sample_ms"):
        SweepConfig(min_sample_ms=-1).validate()
    with pytest.raises(ValueError, match="min_sample_ms"):
        interleaved_samples_ms({"f": lambda: None}, min_sample_ms=-0.5)


# ------------------------------------------------------------------------- GPU-session support in the sweep
def test_gpu_only_shapes_stay_out_of_the_cpu_default_sweep():
    from sparsekit.benchmark.shapes import shape_names

    gpu_only = {"square.4096", "opt-30b.attn_proj", "opt-30b.fc1", "opt-30b.fc2"}
    assert gpu_only.isdisjoint(shape_names("linear", "cpu"))
    assert gpu_only <= set(shape_names("linear", "cuda")) and gpu_only <= set(shape_names())
    assert gpu_only.isdisjoint(s.name for s in SweepConfig(device="cpu").selected_shapes("linear"))
    opt = {s.name: (s.n, s.k) for s in get_shapes(["opt-30b.*"])}
    assert opt == {"opt-30b.attn_proj": (7168, 7168), "opt-30b.fc1": (28672, 7168), "opt-30b.fc2": (7168, 28672)}
    # named explicitly, a GPU-only shape runs on CPU too
    assert [s.name for s in SweepConfig(shapes=("square.4096",)).selected_shapes("linear")] == ["square.4096"]
    assert get_shapes(["square.4096"])[0].gemm("cuda") == (4096, 4096, 4096)


def test_with_env_sets_and_restores(monkeypatch):
    import os

    from sparsekit.benchmark.sweep import with_env

    monkeypatch.delenv("SK_TEST_SWITCH", raising=False)
    seen = []
    with_env(lambda: seen.append(os.environ.get("SK_TEST_SWITCH")), "SK_TEST_SWITCH", "0")()
    assert seen == ["0"] and "SK_TEST_SWITCH" not in os.environ
    monkeypatch.setenv("SK_TEST_SWITCH", "force")

    def boom():
        seen.append(os.environ["SK_TEST_SWITCH"])
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        with_env(boom, "SK_TEST_SWITCH", "0")()
    assert seen[-1] == "0" and os.environ["SK_TEST_SWITCH"] == "force"


def test_csr_skinny_off_candidate_only_where_the_skinny_path_can_run():
    import os

    from sparsekit.benchmark.sweep import CSR_SKINNY_ENV, csr_skinny_off_candidates

    cuda = Candidate("sparsekit_cuda", "sparsekit", lambda: os.environ.get(CSR_SKINNY_ENV), 123)
    other = Candidate("sparsekit_triton", "sparsekit", lambda: None)
    got = csr_skinny_off_candidates("csr", "cuda", 16, torch.float16, [other, cuda])
    assert [c.name for c in got] == ["sparsekit_cuda_noskinny"] and got[0].nbytes == 123
    assert got[0].fn() == "0" and got[0].kind == "sparsekit"
    assert csr_skinny_off_candidates("csr", "cuda", 64, torch.bfloat16, [cuda])
    for args in (("csr", "cuda", 65, torch.float16), ("csr", "cuda", 16, torch.float32),
                 ("csr", "cpu", 16, torch.float16), ("bsr", "cuda", 16, torch.float16)):
        assert csr_skinny_off_candidates(*args, [cuda]) == [], args
    assert csr_skinny_off_candidates("csr", "cuda", 16, torch.float16, [other]) == []


def test_csr_bitmap_candidate_for_few_rows_on_cpu():
    from sparsekit.benchmark.sweep import csr_bitmap_candidates
    from sparsekit.formats import CSR

    w = torch.randn(16, 70)
    w[torch.rand_like(w) < 0.6] = 0
    fmt, x = CSR.from_dense(w), torch.randn(3, 70)
    cpu = Candidate("sparsekit_cpu", "sparsekit", lambda: None, fmt.nbytes)
    got = csr_bitmap_candidates("csr", "cpu", 3, fmt, x, [cpu])
    assert [c.name for c in got] == ["sparsekit_cpu_bitmap"] and got[0].nbytes == fmt.nbytes + 16 * 16
    if _extension.LOADED:
        torch.testing.assert_close(got[0].fn(), x @ w.t())
    for args in (("csr", "cpu", 9), ("csr", "cuda", 3), ("bsr", "cpu", 3)):
        assert csr_bitmap_candidates(*args, fmt, x, [cpu]) == [], args
    assert csr_bitmap_candidates("csr", "cpu", 3, fmt, x, []) == []


@pytest.mark.parametrize("stop_at", [0, 1])
def test_interrupted_sweep_keeps_the_finished_configurations(monkeypatch, tmp_path, stop_at):
    from sparsekit.benchmark import sweep

    real, calls = sweep._run_job, []

    def run_job(*args, **kw):
        calls.append(1)
        if len(calls) > stop_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "_run_job", run_job)
    res = run_kernel_sweep(_tiny_config(shapes=(TINY_LINEAR,), formats=("csr",), sparsities=(0.5, 0.9)))
    assert res["meta"]["interrupted"] == f"interrupted (SIGINT) after {stop_at} of 2 configurations"
    assert len({r["target_sparsity"] for r in res["rows"]}) == stop_at
    paths = save_results(res, tmp_path, plots=False)
    assert "**incomplete**" in Path(paths["report"]).read_text()


# -------------------------------------------------------------------------------- schema, timer/device
def test_report_reads_only_bench_results(tiny_results, tmp_path, capsys):
    """Other scripts (bench/bench_compact.py, ...) write JSON with 'rows' of their own beside the sweep's."""
    paths = save_results(tiny_results, tmp_path, plots=False)
    other = tmp_path / "compact_new.json"     # newer than the sweep's file, with rows but no schema
    other.write_text(json.dumps({"meta": {"date": "2999-01-01T00:00:00"}, "rows": [{"model": "dense"}]}))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert load_results(tmp_path)["meta"]["source"] == str(paths["json"])
    with pytest.raises(ValueError, match=r"compact_new\.json.*schema is None, expected 'sparsekit-bench/1'"):
        load_results(other)
    with pytest.raises(SystemExit, match=r"sparsekit report: .*compact_new\.json.*'sparsekit-bench/1'"):
        cli_main(["report", str(other)])
    assert cli_main(["report", str(tmp_path)]) == 0
    assert "tiny.linear" in capsys.readouterr().out
    alone = tmp_path / "alone"
    alone.mkdir()
    other.rename(alone / other.name)
    with pytest.raises(FileNotFoundError, match="no results .json"):
        load_results(alone)


@pytest.mark.parametrize("timer", ["events", "do_bench"])
def test_cuda_timers_need_a_cuda_device(timer):
    with pytest.raises(ValueError, match=rf"timer='{timer}' .*needs device='cuda', got device='cpu'"):
        SweepConfig(device="cpu", timer=timer).validate()
    with pytest.raises(SystemExit, match=rf"timer='{timer}'"):
        cli_main(["bench", "kernels", "--device", "cpu", "--timer", timer, "--quick"])


def test_tf32_settings_read_and_restore_under_the_new_api():
    """torch >= 2.9: once fp32_precision is set, reading the legacy allow_tf32 raises; the benchmarks' TF32
    record and switch must still work (and put back what was there)."""
    from sparsekit.benchmark.machine import restore_tf32, set_tf32, tf32_state

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    conv = getattr(torch.backends.cudnn, "conv", None)
    before = (torch.backends.fp32_precision, matmul.fp32_precision, getattr(conv, "fp32_precision", None))
    try:
        matmul.fp32_precision = "tf32"
        assert tf32_state()["cuda.matmul.allow_tf32"] is True
        old = set_tf32(False)
        assert old["matmul"] is True and tf32_state()["cuda.matmul.allow_tf32"] is False
        restore_tf32(old)
        assert tf32_state()["cuda.matmul.allow_tf32"] is True
        # TF32 asked for globally: switching it off must reach cuDNN too (the legacy flag alone did not)
        torch.backends.fp32_precision = "tf32"
        old = set_tf32(False)
        assert old["cudnn"] is True and tf32_state()["cudnn.allow_tf32"] is False
        assert tf32_state()["cuda.matmul.allow_tf32"] is False
        restore_tf32(old)
        assert tf32_state()["cudnn.allow_tf32"] is True
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = before[:2]
        if conv is not None:
            conv.fp32_precision = before[2]


def test_break_even_asymmetric_interpolation():
    from sparsekit.benchmark.report import break_even
    # speedup 0.5 at 0.5 and 3.0 at 0.9: crosses 1.0 at 0.5 + 0.5 * 0.4 / 2.5 = 0.58
    assert break_even([(0.5, 0.5), (0.9, 3.0)]).value == pytest.approx(0.58)


def test_machine_info_records_lowered_instruction_sets(monkeypatch):
    """A run under bench/avx2_class.sh says so: the forcing variables in meta.env, its class from the kernel ISA,
    and the machine line names both (a figure from a lowered ISA is never mistaken for the native one)."""
    from sparsekit.benchmark.machine import cpu_isa_class, machine_info
    from sparsekit.benchmark.report import machine_line

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("SPARSEKIT_CPU_ISA", "avx2")
    meta = machine_info("cpu")
    assert meta["env"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and meta["env"]["SPARSEKIT_CPU_ISA"] == "avx2"
    if meta["cpu_kernel_isa"] is not None:           # the extension reads SPARSEKIT_CPU_ISA per call
        assert cpu_isa_class(meta) == "avx2"
    assert "instruction sets forced: " in machine_line(meta) and "MKL_ENABLE_INSTRUCTIONS=AVX2" in machine_line(meta)
    assert [cpu_isa_class({"cpu_kernel_isa": isa}) for isa in ("avx2", "scalar", "avx512+amx", "avx512", None)] == \
        ["avx2", "scalar", "native", "native", "native"]
    assert cpu_isa_class({"cpu_kernel_isa": "avx512", "env": {"ATEN_CPU_CAPABILITY": "avx2"}}) == "mixed"
    assert cpu_isa_class({"device": "cuda", "cpu_kernel_isa": "avx2"}) == "native"


def test_make_readme_table_prefers_a_native_whole_model_run(tmp_path):
    from sparsekit.benchmark.report import SCHEMA

    for name, date, isa in (("native", "2026-01-01T00:00:00+00:00", "avx512"),
                            ("avx2", "2026-02-01T00:00:00+00:00", "avx2")):
        meta = {"device": "cpu", "suite": "model", "date": date, "cpu_kernel_isa": isa, "quick": False}
        (tmp_path / f"{name}.json").write_text(json.dumps({"schema": SCHEMA, "meta": meta, "rows": []}))
    script = _load_script("make_readme_table")
    assert script._newest(tmp_path, "cpu", "model").name == "native.json"
    (tmp_path / "native.json").unlink()
    assert script._newest(tmp_path, "cpu", "model").name == "avx2.json"       # the only one: shown, class titled


def test_bench_refuses_a_bad_out_before_sweeping_and_tf32_off_cuda(tmp_path, monkeypatch):
    import sparsekit.benchmark.sweep as sweep_mod

    def no_sweep(cfg):
        raise AssertionError("swept before checking --out")

    monkeypatch.setattr(sweep_mod, "run_kernel_sweep", no_sweep)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit, match="--out"):
        cli_main(["bench", "kernels", "--quick", "--out", str(afile)])
    with pytest.raises(ValueError, match="tf32"):
        SweepConfig(device="cpu", tf32=True).validate()


def test_model_suite_builds_the_same_weights_for_a_seed():
    from sparsekit.benchmark.whole_model import MODELS

    a, b, c = (MODELS["ffn"].build("cpu", True, seed).state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
