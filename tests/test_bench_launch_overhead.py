"""bench/bench_launch_overhead.py: refuses to run without a GPU, formats its table, and (on a GPU) times every
candidate three ways."""

from __future__ import annotations

import pytest
import torch
from _scripts import load_bench_script


@pytest.fixture(scope="module")
def lo():
    return load_bench_script("bench_launch_overhead")


def test_without_a_gpu_it_says_so(lo, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lo.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_markdown_marks_host_bound_rows(lo):
    rows = [{"shape": "s", "M": 16, "N": 64, "K": 64, "block": 32, "sparsity": 0.9, "candidate": "sk.ops triton",
             "kernel_us": 5.0, "call_us": 120.0, "host_us": 118.0, "host_bound": True}]
    rows.append({"shape": "s", "M": 16, "N": 64, "K": 64, "block": 64, "sparsity": 0.9, "candidate": "sk.ops cuda",
                 "error": "ValueError: backend='cuda' cannot run this call"})
    text = lo.markdown(rows, "GPU X", "20261123-000000", "float16")
    assert "| s (16 x 64 x 64) | 32x32 | 90% | sk.ops triton | 5.0 | 120.0 | 118.0 | yes |" in text
    assert "| s (16 x 64 x 64) | 64x64 | 90% | sk.ops cuda | not measured: ValueError: backend='cuda'" in text


def test_blocks_are_checked(lo, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        lo.main(["--blocks", "48"])
    with pytest.raises(SystemExit):
        lo.main(["--blocks", "a"])


@pytest.mark.cuda
def test_on_a_gpu_every_candidate_gets_a_row(lo):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rows = lo.run([0.5], ["triton"], torch.float16, calls=3, reps=1, shapes=[("tiny", 16, 64, 64)])
    assert [r["candidate"] for r in rows] == ["dense (cuBLAS)", "sk.ops triton", "triton launcher"]
    assert all(r["kernel_us"] > 0 and r["call_us"] > 0 and r["host_us"] > 0 for r in rows)
