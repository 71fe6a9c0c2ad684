"""`sparsekit demo` on a tiny configuration: every stage verified, the structure right. No timing assertions."""

from __future__ import annotations

import json

import pytest
from torch import nn

from sparsekit.cli import main
from sparsekit.demo import ATOL, DemoConfig, format_result, run_demo
from sparsekit.nn import SparseLinear

# width 1/8: FFN 96->384->96; min_speedup tiny so sparsify keeps a sparse format whatever the timings say
TINY = dict(width=0.125, batch=2, tokens=8, reps=2, min_speedup=1e-3)


@pytest.fixture(scope="module", params=["ffn", "transformer"])
def result(request) -> dict:
    return run_demo(DemoConfig(model=request.param, **TINY))


def _rows(res: dict) -> dict[str, dict]:
    return {r["stage"].split(" (")[0]: r for r in res["rows"]}


def test_every_stage_present_and_verified(result):
    rows = _rows(result)
    assert list(rows) == ["dense original", "compacted", "block-pruned", "sparsified", "unstructured",
                          "saved -> loaded"]
    for stage in ("compacted", "sparsified", "unstructured", "saved -> loaded"):
        assert rows[stage]["max_diff"] is not None and rows[stage]["max_diff"] <= ATOL, stage
    for r in rows.values():
        assert r["ms"] > 0 and r["speedup"] > 0


def test_compacted_is_smaller_and_sparsified_uses_sparse_formats(result):
    rows = _rows(result)
    assert rows["compacted"]["params"] < rows["dense original"]["params"]
    assert rows["sparsified"]["weight_bytes"] < rows["block-pruned"]["weight_bytes"]
    fast = result["models"]["sparsified"]
    pruned = result["models"]["block-pruned"]
    block_pruned = [n for n, m in pruned.named_modules() if isinstance(m, nn.Linear) and n not in result["left_whole"]]
    assert block_pruned
    for name in block_pruned:
        layer = fast.get_submodule(name)
        assert isinstance(layer, SparseLinear) and layer.format != "dense", name
    assert set(result["formats"]) == set(block_pruned)


def test_unstructured_stage_prunes_elements_and_sparsifies(result):
    """The structured-and-unstructured story: element pruning of the compacted model, sparsified (its own row)."""
    rows = _rows(result)
    assert rows["unstructured"]["weight_bytes"] < rows["compacted"]["weight_bytes"]
    fast = result["models"]["unstructured"]
    assert result["formats_unstructured"] and all(fmt != "dense" for fmt in result["formats_unstructured"].values())
    for decision in result["report_unstructured"].layers:
        assert decision.sparsity >= 0.9
        assert isinstance(fast.get_submodule(decision.name), SparseLinear)


def test_format_result_prints_one_table(result):
    text = format_result(result)
    for needle in ("dense original", "compacted", "block-pruned", "sparsified", "unstructured (95% elem.)",
                   "saved -> loaded", "threads", "median", "unstructured stage"):
        assert needle in text


def test_cli_demo(capsys, tmp_path):
    assert main(["demo", "--width", "0.125", "--batch", "2", "--tokens", "8", "--reps", "2", "--no-save",
                 "--formats", "dense,bsr", "--min-speedup", "0.001", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sparsified" in out and "saved -> loaded" not in out
    (saved,) = tmp_path.glob("demo_*.json")
    data = json.loads(saved.read_text())
    assert data["text"] in out and saved.with_suffix(".txt").read_text() == data["text"] + "\n"
    assert data["default_config"] is False and data["config"]["width"] == 0.125
    assert data["machine"]["device"] == "cpu" and [r["stage"] for r in data["rows"]][0] == "dense original"


@pytest.mark.parametrize("change, match", [({"model": "vgg"}, "model"), ({"channels": 1.5}, "channels"),
                                           ({"sparsity": -0.1}, "sparsity"), ({"reps": 0}, "reps"),
                                           ({"unstructured": 1.0}, "unstructured"),
                                           ({"width": 0.01}, "block")])
def test_bad_config_names_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        run_demo(DemoConfig(**{**TINY, **change}))
