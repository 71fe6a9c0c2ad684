"""bench/targets.py and the README's generated targets table: each target's verdict from tiny synthetic result
files (met, not met, not measured yet; the newest full sweep that holds the rows wins), and the committed README
matches what bench/make_readme_table.py generates from bench/results. No benchmark runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
BERT = ("bert-base.mlp_up", "bert-base.mlp_down")
NK = {"bert-base.mlp_up": (3072, 768), "bert-base.mlp_down": (768, 3072), "square.4096": (4096, 4096)}


_load_script = load_bench_script


@pytest.fixture(scope="module")
def script():
    return _load_script("make_readme_table")


@pytest.fixture(scope="module")
def tg(script):
    return script.targets          # bench/targets.py, as make_readme_table imports it


def _row(shape: str, m: int, pattern: str, s: float, candidate: str, speedup: float | None, dtype="float32",
         status="ok", nbytes=None) -> dict:
    n, k = NK[shape]
    dense_ms = 10.0
    return {"op": "linear", "shape": shape, "M": m, "N": n, "K": k, "dtype": dtype, "pattern": pattern,
            "target_sparsity": s, "sparsity": s, "candidate": candidate, "status": status,
            "ms": dense_ms / speedup if speedup else None, "speedup": speedup, "bytes": nbytes}


def _sweep(directory: Path, name: str, rows: list[dict], device="cpu", date="2026-01-01T00:00:00+00:00",
           quick=False, **config) -> Path:
    path = directory / f"{name}.json"
    meta = {"device": device, "date": date, "suite": "kernels", "quick": quick,
            "config": {"min_sample_ms": 1.0, **config}}
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _bert(s: float, speedups: tuple[float, float], pattern="bsr32x32", candidate="sparsekit_cpu", m=512) -> list:
    return [_row(shape, m, pattern, s, candidate, v) for shape, v in zip(BERT, speedups)]


def _measure(tg, directory: Path, text_start: str, device: str = "cpu"):
    (target,) = [t for t in tg.TARGETS if t.device == device and t.text.startswith(text_start)]
    return target.measure(tg.Results(directory))


def test_speedup_target_met_not_met_and_not_measured(tg, tmp_path):
    at50 = "BSR 32x32, BERT-base MLP"
    assert _measure(tg, tmp_path, at50).status == tg.NOT_MEASURED
    _sweep(tmp_path, "a", _bert(0.5, (1.30, 1.39)), date="2026-01-01T00:00:00+00:00")
    got = _measure(tg, tmp_path, at50)
    assert (got.value, got.status, [r.path.name for r in got.sources]) == ("1.30x / 1.39x", tg.MET, ["a.json"])
    # a newer full sweep wins; a still newer quick one does not; one at another M holds no rows for the target
    _sweep(tmp_path, "b", _bert(0.5, (1.10, 0.95)), date="2026-01-02T00:00:00+00:00")
    _sweep(tmp_path, "c", _bert(0.5, (3.0, 3.0)), date="2026-01-03T00:00:00+00:00", quick=True)
    _sweep(tmp_path, "d", _bert(0.5, (3.0, 3.0), m=1), date="2026-01-04T00:00:00+00:00")
    got = _measure(tg, tmp_path, at50)
    assert (got.value, got.status, got.sources[0].path.name) == ("1.10x / 0.95x", tg.NOT_MET, "b.json")


def test_break_even_ratio_and_weight_bytes(tg, tmp_path):
    rows = []
    for s, v, torch_v in ((0.5, 0.5, 0.25), (0.9, 1.5, 0.3)):
        rows += _bert(s, (v, v), "bsr16x16")
        rows += _bert(s, (v * 4, v * 3), "bsr32x32") + _bert(s, (torch_v, torch_v), "bsr32x32", "torch_bsr")
    full = 3072 * 768 * 4       # a row's bytes: input + output (here 1000) + the weight bytes the candidate reads
    rows += [_row(shape, 512, "csr", 0.9, "dense", 1.0, nbytes=1000 + full) for shape in BERT]
    rows += [_row(shape, 512, "csr", 0.9, "sparsekit_cpu", 2.5, nbytes=1000 + int(full * p))
             for shape, p in zip(BERT, (0.151, 0.17))]
    _sweep(tmp_path, "k", rows)
    be = _measure(tg, tmp_path, "BSR 16x16 break-even")       # report.break_even: 0.5 at 0.5, 1.5 at 0.9 -> 0.70
    assert (be.value, be.status) == ("0.70 / 0.70", tg.MET)
    assert _measure(tg, tmp_path, "BSR 1x4 break-even").status == tg.NOT_MEASURED
    ratio = _measure(tg, tmp_path, "... >= 3x faster than torch.sparse BSR")
    assert ratio.value == "6.00x–20.00x (4 points)" and ratio.status == tg.MET   # torch ms / sparsekit ms
    mem = _measure(tg, tmp_path, "CSR weight at 90%")
    assert (mem.value, mem.status) == ("15.1% / 17.0%", tg.NOT_MET)


def test_gemv_informational_single_calls_and_config_filter(tg, tmp_path):
    gemv = "GEMV (M = 1)"
    _sweep(tmp_path, "hot", _bert(0.9, (10.0, 13.0), m=1), date="2026-01-01T00:00:00+00:00")
    got = _measure(tg, tmp_path, gemv)
    assert (got.value, got.status) == ("10.00x / 13.00x", tg.MET)
    # newer, but single cold calls: not the target's file, shown as information only
    _sweep(tmp_path, "cold", _bert(0.9, (3.7, 3.9), m=1), date="2026-01-02T00:00:00+00:00", min_sample_ms=0.0)
    got = _measure(tg, tmp_path, gemv)
    assert got.status == tg.MET and got.value.startswith("10.00x / 13.00x; single cold calls")
    assert got.value.endswith("3.70x / 3.90x") and [r.path.name for r in got.sources] == ["hot.json", "cold.json"]


def test_gpu_targets_name_the_fastest_sparsekit_candidate(tg, tmp_path):
    square = "BSR 32x32, square M = N = K = 4096"
    _sweep(tmp_path, "cpu", [_row("square.4096", 4096, "bsr32x32", 0.5, "sparsekit_cpu", 5.0, "float16")])
    assert _measure(tg, tmp_path, square, "cuda").status == tg.NOT_MEASURED     # a CPU file does not count
    rows = [_row("square.4096", 4096, "bsr32x32", 0.5, c, v, "float16") for c, v in
            (("sparsekit_cuda", 0.9), ("sparsekit_triton", 1.2), ("torch_bsr", 0.5))]
    rows.append(_row("square.4096", 4096, "bsr32x32", 0.5, "sparsekit_cusparselt", None, "float16", "mismatch"))
    path = _sweep(tmp_path, "gpu", rows, device="cuda")
    data = json.loads(path.read_text())
    data["meta"]["cpu_kernel_isa"] = "avx2"      # the GPU machine's host CPU: no bearing on GPU figures
    path.write_text(json.dumps(data))
    got = _measure(tg, tmp_path, square, "cuda")
    assert (got.value, got.status) == ("1.20x (sparsekit_triton)", tg.MET)
    vs_torch = _measure(tg, tmp_path, "... >= 1.5x faster than torch.sparse BSR", "cuda")
    assert (vs_torch.value, vs_torch.status) == ("2.40x (1 point)", tg.MET)
    assert _measure(tg, tmp_path, "... >= 6x at 90%", "cuda").status == tg.NOT_MEASURED


def _compact(directory: Path, layer_note: str) -> None:
    rows = [{"model": m, "params": 6.9e6, "speedup": v, "note": note} for m, v, note in
            (("sk-global", 2.9, ""), ("tp-global", 3.0, ""), ("sk@tp-global", 2.95, ""),
             ("tp-layer", 3.4, ""), ("sk-layer", 3.3, layer_note))]
    (directory / "compact_x_1.json").write_text(json.dumps({"meta": {"date": "2026-01-01T00:00:00"}, "rows": rows}))


def test_compaction_rows_no_fudge_and_one_architecture_note(tg, tmp_path):
    _compact(tmp_path, "sparsekit layer-wise; same per-layer widths (identical architecture: run noise)")
    assert _measure(tg, tmp_path, "ResNet-50, 50% global channel").status == tg.MET           # 2.9 >= 2.3
    assert _measure(tg, tmp_path, "... at equal parameter count").status == tg.NOT_MET          # 2.95 < 3.0
    layer = _measure(tg, tmp_path, "... layer-wise recipes")
    assert layer.status.startswith("no verdict") and "identical architecture: run noise" in layer.value
    _compact(tmp_path, "")
    assert _measure(tg, tmp_path, "... layer-wise recipes").status == tg.NOT_MET


def _models(directory: Path, name: str, **bert) -> None:
    row = {"model": "BERT-base encoder (12 layers), seq 128, batch 8", "dtype": "float32", "dense_ms": 700.0,
           "sparse_ms": 200.0, "speedup": 3.5, "linear_weight_bytes_pct": 10.0, **bert}
    machine = {"device": "cpu", "date": f"2026-01-0{len(name)}T00:00:00+00:00"}
    (directory / f"sparsify_models_{name}.json").write_text(json.dumps({"machine": machine, "rows": [row]}))


def test_a_unet_compaction_run_does_not_count_for_resnet50(tg, tmp_path):
    """bench_compact.py --model unet files fill the U-Net row only; a file without "net" is a ResNet-50 run."""
    _compact(tmp_path, "")
    rows = [{"model": m, "params": 7.8e6, "speedup": v, "note": ""} for m, v in
            (("sk-global", 1.1), ("tp-global", 1.2), ("sk-layer", 1.3))]
    (tmp_path / "compact_x_2.json").write_text(json.dumps({"meta": {"date": "2026-01-02T00:00:00", "net": "unet"},
                                                           "rows": rows}))
    resnet = _measure(tg, tmp_path, "ResNet-50, 50% global channel")
    assert (resnet.value, resnet.status) == ("2.90x", tg.MET) and resnet.sources[0].path.name == "compact_x_1.json"
    unet = _measure(tg, tmp_path, "U-Net (batch 2, 128x128), 50% channels")
    assert unet.status == tg.REPORTED and unet.value.startswith("sk-global 1.10x (7.80M params), tp-global 1.20x")


def test_model_speedup_needs_eager_and_best_vs_best_when_compiled(tg, tmp_path):
    bert = "BERT-base encoder (12 layers"
    _models(tmp_path, "a")
    got = _measure(tg, tmp_path, bert)
    assert (got.value, got.status) == ("3.50x (700 -> 200 ms)", tg.MET)
    # a newer run with --compile: dense compiled is much faster, so best sparse vs best dense falls below 3x
    _models(tmp_path, "bb", dense_compile_ms=500.0, sparse_compile_ms=190.0, speedup_compiled=500 / 190,
            speedup_best=500 / 190)
    got = _measure(tg, tmp_path, bert)
    assert got.status == tg.NOT_MET and "best sparse vs best dense 2.63x" in got.value
    assert "under torch.compile 500 -> 190 ms" in got.value


def test_model_speedup_with_mismatched_outputs_is_not_met(tg, tmp_path):
    # bench_sparsify_models.py still times a model whose outputs differ from dense: no verdict from that
    _models(tmp_path, "a", verify_error="output: max |diff| 0.3 > atol 0.0001")
    got = _measure(tg, tmp_path, "BERT-base encoder (12 layers")
    assert got.status == tg.NOT_MET and "outputs differ from the dense model" in got.value


def test_targets_block_one_table_per_device_with_links(tg, tmp_path):
    _sweep(tmp_path, "k", _bert(0.5, (1.3, 1.4)))
    (tmp_path / "k.md").write_text("report")
    block = tg.targets_block(tmp_path, lambda p: f"rel/{p.name}")
    cpu, gpu = block.split("### GPU")
    assert "### CPU" in cpu and "| 1.30x / 1.40x | met | [k](rel/k.md) |" in cpu
    assert "the machines as they record them" in cpu
    assert "| - | not measured yet | - |" in gpu and "No GPU results" in gpu


def test_avx2_class_runs_fill_their_own_table_only(tg, tmp_path):
    """A sweep whose sparsekit kernels ran at AVX2 (an AVX2 machine, or bench/avx2_class.sh) is judged in the
    AVX2-class table and never stands in for the native CPU's figures, nor the other way round."""
    at90 = "... >= 5x at 90%"
    forced = {"SPARSEKIT_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    path = _sweep(tmp_path, "avx2", _bert(0.9, (6.0, 6.5)), date="2026-01-05T00:00:00+00:00")
    data = json.loads(path.read_text())
    data["meta"] |= {"cpu_kernel_isa": "avx2", "torch_cpu_capability": "AVX2", "env": forced}
    path.write_text(json.dumps(data))
    assert _measure(tg, tmp_path, at90).status == tg.NOT_MEASURED
    got = _measure(tg, tmp_path, at90, device="cpu-avx2")
    assert (got.value, got.status) == ("6.00x / 6.50x", tg.MET)
    _sweep(tmp_path, "native", _bert(0.9, (4.0, 4.0)), date="2026-01-06T00:00:00+00:00")
    assert _measure(tg, tmp_path, at90).status == tg.NOT_MET          # the newer native run: its own table
    assert _measure(tg, tmp_path, at90, device="cpu-avx2").value == "6.00x / 6.50x"
    block = tg.targets_block(tmp_path, lambda p: p.name)
    avx2 = block.split("### CPU, AVX2 class")[1].split("### GPU")[0]
    assert "| 6.00x / 6.50x | met | [avx2](avx2.json) |" in avx2
    assert "instruction sets forced: SPARSEKIT_CPU_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2" in avx2


def test_mixed_instruction_sets_count_nowhere_and_single_table_targets_prefer_native(tg, tmp_path):
    """A run that held only torch's dense side to AVX2 (sparsekit's kernels native) would flatter the speedups:
    it counts for neither table. Targets with one table take a native run first, another class otherwise."""
    at90 = "... >= 5x at 90%"
    path = _sweep(tmp_path, "mixed", _bert(0.9, (9.0, 9.0)))
    data = json.loads(path.read_text())
    data["meta"] |= {"cpu_kernel_isa": "avx512+amx", "env": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
    path.write_text(json.dumps(data))
    assert _measure(tg, tmp_path, at90).status == tg.NOT_MEASURED
    assert _measure(tg, tmp_path, at90, device="cpu-avx2").status == tg.NOT_MEASURED
    res = tg.Results(tmp_path)
    assert res.newest("kernels", "cpu").path.name == "mixed.json"          # only one there: taken, class shown
    _sweep(tmp_path, "older-native", _bert(0.9, (6.0, 6.0)), date="2025-01-01T00:00:00+00:00")
    assert tg.Results(tmp_path).newest("kernels", "cpu").path.name == "older-native.json"


def test_results_without_an_instruction_set_take_their_machines_class(tg, tmp_path):
    """Older bench_compact.py files record only a machine tag: they go in the table of the class that runs of
    that machine recorded (the native one only when no run of that machine says otherwise)."""
    _compact(tmp_path, "")
    data = json.loads((tmp_path / "compact_x_1.json").read_text())
    data["meta"]["machine"] = "cpu-amd-epyc-2t"
    (tmp_path / "compact_x_1.json").write_text(json.dumps(data))
    assert tg.Results(tmp_path).runs[0].isa_class == "native"
    path = _sweep(tmp_path, "amd", _bert(0.9, (6.0, 6.5)))
    sweep = json.loads(path.read_text())
    sweep["meta"] |= {"cpu_model": "AMD EPYC", "threads": 2, "cpu_kernel_isa": "avx2", "env": {}}
    path.write_text(json.dumps(sweep))
    (compact,) = [r for r in tg.Results(tmp_path).runs if r.kind == "compact"]
    assert (compact.recorded_isa, compact.isa_class) == (None, "avx2")
    got = _measure(tg, tmp_path, "ResNet-50, 50% global channel", device="cpu-avx2")
    assert got.status == tg.MET and got.sources[0].path.name == "compact_x_1.json"
    native = {"cpu_kernel_isa": "avx512", "env": {}}
    rows = [{"model": "sk-global", "params": 6.9e6, "speedup": 2.5, "note": ""}]
    (tmp_path / "compact_y_1.json").write_text(json.dumps({"meta": {"date": "2025-01-01T00:00:00", **native},
                                                           "rows": rows}))
    assert _measure(tg, tmp_path, "ResNet-50, 50% global channel").value == "2.50x"    # the older native run


def test_a_machine_tag_with_two_classes_takes_the_nearest_recorded_run(tg, tmp_path):
    """One VM tag ("AMD EPYC", 2 threads) was an AVX2 machine and later an AVX-512 one: an older file that recorded
    only the tag takes the class of the recorded run nearest in time."""
    _compact(tmp_path, "")     # dated 2026-01-01
    data = json.loads((tmp_path / "compact_x_1.json").read_text())
    data["meta"]["machine"] = "cpu-amd-epyc-2t"
    (tmp_path / "compact_x_1.json").write_text(json.dumps(data))
    for name, date, isa in (("old", "2026-01-01T05:00:00+00:00", "avx2"), ("new", "2026-03-01T00:00:00+00:00",
                                                                          "avx512+bf16dot")):
        path = _sweep(tmp_path, name, _bert(0.9, (6.0, 6.5)), date=date)
        sweep = json.loads(path.read_text())
        sweep["meta"] |= {"cpu_model": "AMD EPYC", "threads": 2, "cpu_kernel_isa": isa, "env": {}}
        path.write_text(json.dumps(sweep))
    (compact,) = [r for r in tg.Results(tmp_path).runs if r.kind == "compact"]
    assert (compact.recorded_isa, compact.isa_class) == (None, "avx2")


def test_make_readme_table_writes_and_checks_both_blocks(script, tmp_path, capsys):
    from sparsekit.benchmark.report import END_MARKER, START_MARKER

    results = tmp_path / "results"
    results.mkdir()
    _sweep(results, "k", _bert(0.5, (1.3, 1.4)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\n{START_MARKER}\nold\n{END_MARKER}\n\n## Targets\n\n{script.TARGETS_START}\nstale\n"
                      f"{script.TARGETS_END}\n\nkept\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert script.main(args) == 0
    text = readme.read_text()
    block = text[text.index(script.TARGETS_START):text.index(script.TARGETS_END)]
    assert "stale" not in block and "| 1.30x / 1.40x | met | [k](results/k.json) |" in block
    assert text.endswith(f"{script.TARGETS_END}\n\nkept\n") and script.main([*args, "--check"]) == 0
    readme.write_text(text.replace("| met |", "| not met |"))
    assert script.main([*args, "--check"]) == 1
    capsys.readouterr()


def test_readme_is_generated_from_the_committed_results(script, capsys):
    text = (ROOT / "README.md").read_text()
    assert script.TARGETS_START in text and script.TARGETS_END in text
    assert script.main(["--check"]) == 0, capsys.readouterr().err


def test_demo_block_from_the_newest_default_run(script, tmp_path):
    """The README's demo output comes from the newest CPU `sparsekit demo --out` run of the default config."""
    def run(name: str, date: str, default: bool, device: str = "cpu") -> None:
        data = {"machine": {"date": date, "device": device, "cpu_model": "Xeon", "threads": 2, "torch": "2.13"},
                "default_config": default, "text": f"table of {name}"}
        (tmp_path / f"demo_{name}.json").write_text(json.dumps(data))

    readme = tmp_path / "README.md"
    assert script.demo_block(tmp_path, readme) is None
    run("old", "2026-01-01T00:00:00", True)
    run("new", "2026-02-01T00:00:00", True)
    run("newer_but_scaled", "2026-03-01T00:00:00", False)
    run("newer_on_gpu", "2026-03-01T00:00:00", True, device="cuda")
    block = script.demo_block(tmp_path, readme)
    assert "table of new" in block and "2026-02-01" in block and "(demo_new.json)" in block


def test_break_even_below_the_sweep_and_points_where_sparsekit_failed(tg, tmp_path):
    """'below' (already faster at the lowest sparsity measured) meets a break-even target only when that lowest
    sparsity is itself within it; a point where sparsekit did not run (and torch did) fails an 'every
    sparsity' target, a point where torch did not run is left out."""
    rows = []
    for s, v in ((0.9, 3.0), (0.95, 5.0)):
        rows += _bert(s, (v, v), "bsr16x16")
    _sweep(tmp_path, "late", rows)
    be = _measure(tg, tmp_path, "BSR 16x16 break-even")
    assert (be.value, be.status) == ("<= 0.90 / <= 0.90", tg.NOT_MET)
    rows = _bert(0.5, (1.1, 1.1), "bsr16x16") + _bert(0.9, (3.0, 3.0), "bsr16x16")
    rows += _bert(0.5, (0.4, 0.4), "bsr32x32", "torch_bsr") + _bert(0.9, (1.0, 1.0), "bsr32x32", "torch_bsr")
    rows += [_row(shape, 512, "bsr32x32", 0.5, "sparsekit_cpu", None, status="mismatch") for shape in BERT]
    rows += _bert(0.9, (6.0, 6.0), "bsr32x32")
    rows += _bert(0.95, (9.0, 9.0), "bsr32x32")          # no torch_bsr row at 95%: left out
    _sweep(tmp_path, "later", rows, date="2026-01-02T00:00:00+00:00")
    be = _measure(tg, tmp_path, "BSR 16x16 break-even")
    assert (be.value, be.status) == ("<= 0.50 / <= 0.50", tg.MET)
    ratio = _measure(tg, tmp_path, "... >= 3x faster than torch.sparse BSR")
    assert ratio.status == tg.NOT_MET and "2 where sparsekit did not run" in ratio.value
    assert "2 where torch_bsr did not run" in ratio.value
