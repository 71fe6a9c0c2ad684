"""Smoke runs of the bench/ scripts that have no test of their own, at their smallest settings and into a
temporary --out (never bench/results): they run to the end and write what bench/targets.py reads. No timing is
judged here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _scripts import load_bench_script

from sparsekit import _extension
from sparsekit.ops import _library


def test_train_step_writes_one_row_per_shape_and_format(tmp_path):
    script = load_bench_script("bench_train_step")
    assert script.main(["--reps", "1", "--dtypes", "float32", "--out", str(tmp_path)]) in (0, None)
    (path,) = tmp_path.glob("train_step_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["shape"].split(" ")[0], r["format"]) for r in rows} == {
        (s, f) for s in ("bert-base.mlp_up", "bert-base.mlp_down") for f in ("bsr32x32", "csr")}
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert path.with_suffix(".md").exists()


@pytest.mark.slow
def test_memory_loads_the_sparse_model_without_dense_copies(tmp_path):
    """One encoder layer: the saved sparse model loads in fresh processes, gives the reference outputs, and no
    dense copy of a swapped weight stays referenced (issue 8's memory claim)."""
    script = load_bench_script("bench_memory")
    script.main(["--layers", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("memory_*.json")
    data = json.loads(path.read_text())
    assert data["layers"] == 1 and data["sparse_linear_bytes"] <= 0.15 * data["dense_linear_bytes"]
    sparse = [r for r in data["rows"] if r["kind"] == "sparse"]
    assert sparse and all(r["error"] is None for r in data["rows"])
    for r in sparse:
        assert r["dense_weights_alive"] == [] and r["dense_shaped_tensors_alive"] == 0, r
        assert r["max_diff"] <= 1e-4, r


def test_avx2_class_wrapper_lowers_every_instruction_set():
    """bench/avx2_class.sh runs its command with sparsekit's, ATen's, MKL's and oneDNN's ISA held to AVX2 (the
    variables the result files record), and refuses to run without a command."""
    script = Path(__file__).resolve().parents[1] / "bench" / "avx2_class.sh"
    env = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True, check=True).stdout
    for var in ("SPARSEKIT_CPU_ISA=avx2", "ATEN_CPU_CAPABILITY=avx2", "MKL_ENABLE_INSTRUCTIONS=AVX2",
                "ONEDNN_MAX_CPU_ISA=AVX2"):
        assert var in env.splitlines(), var
    assert subprocess.run(["bash", str(script)], capture_output=True, text=True).returncode == 2


def test_conv1d_writes_every_shape_and_pattern(tmp_path):
    script = load_bench_script("bench_conv1d")
    assert script.main(["--reps", "1", "--batch", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("conv1d_cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["shape"], r["format"], r["sparsity"]) for r in rows} == {
        (s, f, p) for s in script.SHAPES for f, p in (("bsr32x32", 0.8), ("bsr32x32", 0.9), ("bsr32x32", 0.95),
                                                     ("csr", 0.9), ("csr", 0.95))}
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows) and path.with_suffix(".md").exists()
    with pytest.raises(SystemExit, match="must be >= 1"):
        script.main(["--reps", "0", "--out", str(tmp_path)])


def test_conv3d_writes_every_shape_and_pattern(tmp_path, monkeypatch):
    script = load_bench_script("bench_conv3d")
    small = {"tiny.conv3x3x3_s2": (32, 32, 3, 2, 1, (3, 6, 5)), "tiny.temporal": (32, 64, (3, 1, 1), 1, (1, 0, 0),
                                                                                    (4, 3, 3))}
    monkeypatch.setattr(script, "SHAPES", small)
    assert script.main(["--reps", "1", "--batch", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("conv3d_cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["shape"], r["format"], r["sparsity"]) for r in rows} == {
        (s, f, p) for s in small for f, p in (("bsr32x32", 0.8), ("bsr32x32", 0.9), ("bsr32x32", 0.95),
                                             ("csr", 0.9), ("csr", 0.95))}
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)
    assert "| tiny.temporal | 32 -> 64, k 3x1x1, s 1, p 1x0x0, 4x3x3 |" in path.with_suffix(".md").read_text()


def test_compact_rnn_prunes_every_recurrent_model(tmp_path):
    """Each model's hidden units are halved (layer-wise), its compacted model verified inside the script."""
    script = load_bench_script("bench_compact_rnn")
    assert script.main(["--reps", "1", "--batch", "1", "--steps", "3", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("compact_rnn_cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["model"] for r in rows] == list(script.MODELS)
    for r in rows:
        dense = int(r["dense_hidden"].split()[-1])
        assert r["sparsekit_hidden"].endswith(f" {dense // 2}") and r["sparsekit_params"] < r["dense_params"] / 3
        assert r["dense_ms"] > 0 and r["sparsekit_ms"] > 0 and r["torch_pruning"]
    assert path.with_suffix(".md").exists()
    with pytest.raises(SystemExit, match="sparsity"):
        script.main(["--sparsity", "1.0", "--out", str(tmp_path)])


def test_sparse_rnn_sparsifies_every_recurrent_model(tmp_path):
    """Each model's recurrent weights are pruned to the sparsity, sparsified and verified inside the script; the
    row says what was converted, and bench/targets.py reads the file."""
    script = load_bench_script("bench_sparse_rnn")
    assert script.main(["--reps", "1", "--batch", "1", "--steps", "3", "--models", "lstm-1layer", "tagger-bigru",
                        "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("sparse_rnn_cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["model"], r["sparsity"], r["granularity"]) for r in rows] == [
        ("lstm-1layer", 0.9, "block"), ("tagger-bigru", 0.9, "block")]
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and isinstance(r["converted"], list)
        assert any(d["name"].split(".")[-1].startswith("hh_l0") for d in r["layers"])
    assert path.with_suffix(".md").exists()
    targets = load_bench_script("make_readme_table").targets   # (dataclasses need it imported as a module)
    measured = targets.sparse_rnn_reported(0.9)(targets.Results(tmp_path))
    assert measured.status == targets.REPORTED and "lstm-1layer" in measured.value
    with pytest.raises(SystemExit, match="sparsity"):
        script.main(["--sparsity", "1.0", "--out", str(tmp_path)])


def test_conv_transpose_writes_every_shape_and_pattern(tmp_path, monkeypatch):
    script = load_bench_script("bench_conv_transpose")
    # the smallest geometry of each dimensionality keeps the smoke run short
    monkeypatch.setattr(script, "SHAPES", {"dcgan.g3_4x4_s2": (64, 32, 4, 2, 1, (4, 4)),
                                           "unet3d.up_2x2x2_s2": (64, 32, 2, 2, 0, (2, 2, 2)),
                                           "hifigan.up1_k16_s8": (64, 32, 16, 8, 4, (8,))})
    assert script.main(["--reps", "1", "--batch", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("conv_transpose_cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["shape"] for r in rows} == set(script.SHAPES) and len(rows) == 3 * 5
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows) and path.with_suffix(".md").exists()


@pytest.mark.skipif(not _extension.LOADED, reason="the tiled store is a C++ CPU op")
def test_conv_transpose_tiled_ab_times_both_paths_and_restores_the_dispatch(tmp_path, monkeypatch):
    script = load_bench_script("ab_conv_transpose_tiled")
    monkeypatch.setattr(script, "SHAPES", {"unet.up_2x2_s2": (64, 32, 2, 2, 0, (3, 5)),
                                           "dcgan.g3_4x4_s2": (64, 32, 4, 2, 1, (4, 4))})   # (not tiled: skipped)
    assert script.main(["--reps", "1", "--batch", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("conv_transpose_tiled_ab_cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["shape"], r["format"]) for r in rows] == [("unet.up_2x2_s2", "bsr32x32"), ("unet.up_2x2_s2", "csr")]
    assert all(r["dense_ms"] > 0 and r["fold_ms"] > 0 and r["tiled_ms"] > 0 for r in rows)
    assert all(_library.has_kernel(f"{f}_mm_xt_tiled", "CPU") for f in ("bsr", "csr"))


@pytest.mark.parametrize("name, shape", [("bench_linear", "bert-base.mlp_up"),
                                         ("bench_conv", "resnet50.layer3.conv3x3")])
def test_op_family_scripts_take_the_shape_options(name, shape, capsys):
    """bench_linear.py / bench_conv.py fix --ops, and take --list-shapes / --shapes / --m like `sparsekit bench
    kernels` (they crashed on every call when --ops was fixed)."""
    script = load_bench_script(name)
    assert script.main(["--list-shapes"]) == 0 and shape in capsys.readouterr().out
    with pytest.raises(SystemExit):     # stops at the bad --sparsity, having taken --shapes and --m
        script.main(["--shapes", shape, "--m", "4", "--sparsity", "1.5"])
    err = capsys.readouterr().err
    assert "--sparsity: '1.5' is not in [0, 1)" in err and "unrecognized" not in err
