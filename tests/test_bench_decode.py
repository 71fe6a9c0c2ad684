"""bench/bench_decode.py on a tiny Llama-shaped model: the sparsified model generates the dense-masked model's
tokens, every Linear but lm_head is swapped, the results files are written; bad arguments are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _scripts import load_bench_script

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def bd():
    return load_bench_script("bench_decode")


def test_decode_row(bd):
    row = bd.run(layers=2, prompt_len=4, new_tokens=3, reps=1, vocab=50, widths=TINY, sparsity=0.5,
                 min_speedup=1e-9)          # tiny layers: force the swap, what is tested is the flow
    assert row["same_tokens"] and row["sparse_layers"] == 7 * 2
    assert row["dense_tok_s"] > 0 and row["sparse_tok_s"] > 0 and row["speedup"] == pytest.approx(
        row["dense_ms"] / row["sparse_ms"])


def test_main_writes_results_and_refuses_bad_arguments(bd, tmp_path, monkeypatch):
    monkeypatch.setattr(bd, "TINYLLAMA", TINY)
    assert bd.main(["--layers", "1", "--prompt", "4", "--new-tokens", "2", "--reps", "1", "--vocab", "50",
                    "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("decode_cpu-*.json")).read_text())
    assert data["rows"][0]["new_tokens"] == 2 and "tok/s" in next(tmp_path.glob("decode_*.md")).read_text()
    with pytest.raises(SystemExit, match="--sparsity must be in"):
        bd.main(["--sparsity", "1.0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="must be >= 1"):
        bd.main(["--new-tokens", "0", "--out", str(tmp_path)])


def test_decode_row_compacted(bd):
    row = bd.run(layers=2, prompt_len=4, new_tokens=3, reps=1, vocab=50, widths=TINY, sparsity=0.5,
                 method="compact")
    assert row["same_tokens"] and row["choices"] == ["compact"] and row["method"] == "compact"


def test_decode_row_unstructured(bd):
    row = bd.run(layers=2, prompt_len=4, new_tokens=3, reps=1, vocab=50, widths=TINY, sparsity=0.5,
                 min_speedup=1e-9, method="unstructured")
    assert row["same_tokens"] and row["sparse_layers"] == 7 * 2 and row["method"] == "unstructured"
    assert set(row["choices"]) <= {"csr", "csr+bitmap"} and "single weights" in row["pruning"]


def test_decode_row_nm(bd):
    row = bd.run(layers=2, prompt_len=4, new_tokens=3, reps=1, vocab=50, widths=TINY, min_speedup=1e-9, method="nm")
    assert row["same_tokens"] and row["sparse_layers"] == 7 * 2 and row["method"] == "nm"
    assert set(row["choices"]) <= {"nm2:4", "nm1:4", "nm4:8", "csr", "csr+bitmap"} and "2:4" in row["pruning"]
