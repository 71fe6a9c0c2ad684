"""bench/gpu_session.sh (the GPU-session runbook) on a machine without a GPU: its dry run prints every stage's
commands, the benchmark commands it prints parse and validate (with --device cpu), and its Python helpers
(bench/gpu_session_helpers.py) and bench/bench_sparsify_models.py's --device/--dtype work on CPU."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _scripts import load_bench_script

import sparsekit as sk
from sparsekit.nn import SparseLinear

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ("build", "test", "bench-targets-1", "bench-targets-2", "tune", "bench-models")
BENCH_LABELS = ("a", "b", "c", "d", "d2", "e", "f", "m1", "m2", "m3", "m4", "m5")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")




def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # the script's own knobs, and the build ones the Makefile exports (MAX_JOBS=2), are left out: the test
    # checks the script's defaults
    skip = ("DRY_RUN", "ONLY", "TEST_FILES", "SESSION_BUDGET_S", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST")
    full = {k: v for k, v in os.environ.items() if k not in skip}
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=60,
                          cwd=ROOT)


def _sections(text: str) -> dict[str, list[str]]:
    """{stage: its [dry-run] lines}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"== stage (\S+) ==", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif line.startswith("[dry-run] ") and current:
            out[current].append(line[len("[dry-run] "):])
    return out


def _commands(lines: list[str]) -> dict[str, list[str]]:
    """{label: argv} of the dry-run lines 'label: command'."""
    out = {}
    for line in lines:
        label, sep, cmd = line.partition(": ")
        if sep:
            out[label] = shlex.split(cmd)
    return out


@pytest.fixture(scope="module")
def dry_all(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu") / "out"
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    return _run("--dry-run", "all", env={"OUT": str(out), "PYTHON": "python3"}), out


@needs_bash
def test_dry_run_all_prints_commands_for_every_stage(dry_all):
    proc, out = dry_all
    assert proc.returncode == 0, proc.stderr
    sections = _sections(proc.stdout)
    assert list(sections) == list(STAGES)
    for stage in STAGES:
        assert sections[stage], f"stage {stage} printed no command"
    assert not out.exists(), "a dry run must not create $OUT"

    build = _commands(sections["build"])
    pip = build["pip-install"]
    for flag in ("--no-index", "--no-build-isolation", "--no-deps", "-e"):
        assert flag in pip, (flag, pip)
    assert "MAX_JOBS=16" in pip and "FORCE_CUDA=1" in pip
    assert build["info"][-1] == "info"

    tests = [c for c in _commands(sections["test"]).values() if "pytest" in c]
    files = [c[c.index("pytest") + 1] for c in tests]
    selfcheck = ["tests/test_cuda_selfcheck.py", "tests/test_cuda_nm_sp.py", "tests/test_cuda_csr_skinny.py",
                 "tests/test_cuda_channel_conv.py"]
    assert files[:4] == selfcheck
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if "pytest.mark.cuda" in p.read_text())
    assert sorted(files) == marked, "every test file with a cuda marker runs exactly once"
    for argv in tests:
        assert argv[argv.index("-m", argv.index("pytest")) + 1] == "cuda"
        assert any(a.startswith("--junitxml=") for a in argv)
    blocking = [c for c in tests if "CUDA_LAUNCH_BLOCKING=1" in c]
    assert [c[c.index("pytest") + 1] for c in blocking] == selfcheck

    labels = {label for s in ("bench-targets-1", "bench-targets-2", "bench-models")
              for label in _commands(sections[s])}
    assert set(BENCH_LABELS) <= labels


@needs_bash
def test_dry_run_bench_commands_parse_and_validate(dry_all):
    """Every benchmark command the runbook prints is accepted by its parser, and its sweep config validates
    (with --device cpu: the cuda check is the only thing that differs on the GPU machine)."""
    from sparsekit.benchmark.command import config_from_args
    from sparsekit.cli import build_parser

    skm = load_bench_script("bench_sparsify_models")
    bdc = load_bench_script("bench_decode")
    blo = load_bench_script("bench_launch_overhead")
    proc, _ = dry_all
    seen = set()
    for lines in _sections(proc.stdout).values():
        for label, argv in _commands(lines).items():
            if "sparsekit.cli" in argv and "bench" in argv:
                args = argv[argv.index("sparsekit.cli") + 1:]
                assert args[args.index("--device") + 1] == "cuda"
                args[args.index("--device") + 1] = "cpu"
                ns = build_parser().parse_args(args)
                cfg = config_from_args(ns, ns.suite, args)
                assert cfg.dtypes == ("float16",), label
                if ns.suite == "kernels":
                    assert cfg.ops == ("linear",) and cfg.selected_shapes("linear"), label
                seen.add(label)
            elif any(a.endswith(("bench_sparsify_models.py", "bench_decode.py")) for a in argv):
                i = [i for i, a in enumerate(argv) if a.endswith(("bench_sparsify_models.py", "bench_decode.py"))][0]
                parser = (skm if argv[i].endswith("bench_sparsify_models.py") else bdc).build_parser()
                ns = parser.parse_args(argv[i + 1:])
                assert (ns.device, ns.dtype) == ("cuda", "float16")
                seen.add(label)
            elif any(a.endswith("bench/bench_launch_overhead.py") for a in argv):
                i = [i for i, a in enumerate(argv) if a.endswith("bench/bench_launch_overhead.py")][0]
                ns = blo.build_parser().parse_args(argv[i + 1:])
                assert ns.dtype == "float16" and "triton" in ns.backends.split(",")
                seen.add(label)
    assert seen == set(BENCH_LABELS)


@needs_bash
def test_dry_run_targets_cover_the_issue_shapes(dry_all):
    from sparsekit.benchmark.shapes import get_shapes

    proc, _ = dry_all
    cmds = {}
    for lines in _sections(proc.stdout).values():
        cmds.update(_commands(lines))

    def opt(label, name):
        argv = cmds[label]
        return argv[argv.index(name) + 1] if name in argv else None

    assert opt("a", "--shapes") == "square.4096" and opt("a", "--block") == "16,32,64,128"
    assert [s.gemm("cuda") for s in get_shapes(["square.4096"])] == [(4096, 4096, 4096)]
    assert opt("c", "--m") == "16" and opt("f", "--m") == "16" and opt("d2", "--m") == "16"
    assert opt("d", "--formats") == "nm" and opt("d", "--sparsity") == "0.5"
    assert opt("e", "--formats") == "csr" and opt("e", "--sparsity") == "0.9"
    assert "opt-30b.*" in opt("f", "--shapes") and opt("f", "--sparsity") == "0.8"


@needs_bash
def test_dry_run_tune_stage(dry_all, tmp_path):
    """The tune stage runs bench/tune_triton.py with a time budget into the stage's results, then the GPU-config
    tests with the measured table; its command line parses with the script's own parser."""
    proc, _ = dry_all
    cmds = _commands(_sections(proc.stdout)["tune"])
    tune = cmds["tune"]
    i = next(i for i, a in enumerate(tune) if a.endswith("bench/tune_triton.py"))
    mod = load_bench_script("tune_triton")
    ns = mod.build_parser().parse_args(tune[i + 1:])
    assert (ns.device, ns.dtype, ns.budget_s, ns.max_candidates) == ("cuda", "float16", 360, 12)
    assert ns.out_dir.endswith("results")
    check = cmds["tune-check"]
    assert check[:2] == ["sh", "-c"] and "SPARSEKIT_TRITON_CONFIGS=" in check[2]
    assert "tests/test_triton_gpu_configs.py" in check[2] and "tuned_sm*0.json" in check[2]
    # the budget follows TUNE_BUDGET_S, the candidate cap TUNE_MAX_CANDIDATES
    proc = _run("-n", "tune", env={"TUNE_BUDGET_S": "100", "TUNE_MAX_CANDIDATES": "0", "OUT": str(tmp_path / "o")})
    tune = _commands(_sections(proc.stdout)["tune"])["tune"]
    assert tune[tune.index("--budget-s") + 1] == "100" and tune[tune.index("--max-candidates") + 1] == "0"


def test_default_cuda_arch_list_has_ptx_and_matches_everywhere(helpers):
    """setup.py's default TORCH_CUDA_ARCH_LIST (mirrored by the dispatcher's message and the session helpers) gives
    sm_80 and sm_90a machine code plus compute_80 PTX: the extension then runs on 8.x, 9.0 and newer GPUs."""
    import re as _re

    from torch.utils import cpp_extension

    from sparsekit.ops._dispatch import DEFAULT_CUDA_ARCH_LIST

    found = _re.search(r'^DEFAULT_CUDA_ARCH_LIST = "([^"]+)"', (ROOT / "setup.py").read_text(), _re.M)
    assert found and found.group(1) == DEFAULT_CUDA_ARCH_LIST == helpers.DEFAULT_ARCHS
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    assert "-gencode=arch=compute_80,code=compute_80" in flags   # the PTX newer GPUs compile at load time
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90a,code=sm_90a" in flags


@needs_bash
@pytest.mark.parametrize("args, env, code, expect", [
    ((), {}, 2, "name at least one stage"),
    (("--dry-run", "deploy"), {}, 2, "unknown argument 'deploy'"),
    (("--help",), {}, 0, "bench-targets-1"),
])
def test_arguments(args, env, code, expect):
    proc = _run(*args, env=env)
    assert proc.returncode == code
    assert expect in proc.stdout + proc.stderr


@needs_bash
def test_stage_aliases_env_dry_run_and_only():
    proc = _run("bench-targets", env={"DRY_RUN": "1", "ONLY": "a,f"})
    assert proc.returncode == 0, proc.stderr
    sections = _sections(proc.stdout)
    assert list(sections) == ["bench-targets-1", "bench-targets-2"]
    labels = [label for lines in sections.values() for label in _commands(lines)]
    assert [lb for lb in labels if lb != "ensure-ext"] == ["a", "f"]
    proc = _run("-n", "test", env={"TEST_FILES": "tests/test_cuda_ops.py"})
    files = [c for c in _commands(_sections(proc.stdout)["test"]).values() if "pytest" in c]
    assert [c[c.index("pytest") + 1] for c in files] == ["tests/test_cuda_ops.py"]


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def helpers():
    return load_bench_script("gpu_session_helpers")


def test_junit_summary_counts_and_failures(helpers, tmp_path):
    xml = tmp_path / "test_x.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" '
                   'skipped="1" time="2.5"><testcase classname="tests.test_x" name="test_ok"/>'
                   '<testcase classname="tests.test_x" name="test_bad"><failure message="assert 1 == 2">'
                   'trace</failure></testcase><testcase classname="tests.test_x" name="test_s"><skipped/>'
                   '</testcase><testcase classname="tests.test_x" name="test_ok2"/></testsuite></testsuites>')
    md = helpers.junit_summary([str(xml), str(tmp_path / "missing.xml")])
    assert "| test_x | 4 | 2 | 1 | 0 | 1 | 2 |" in md
    assert "tests.test_x::test_bad`: assert 1 == 2" in md
    assert "| missing | no junit" in md


def test_sources_hash_and_arch(helpers):
    a, b = helpers.sources_hash("9.0a"), helpers.sources_hash("8.0+PTX;9.0a")
    assert a == helpers.sources_hash("9.0a") and a != b and re.fullmatch(r"[0-9a-f]{16}", a)
    if not torch.cuda.is_available():
        assert helpers.arch_list() == helpers.DEFAULT_ARCHS


def test_preflight_and_ext_ok_report_instead_of_crashing(helpers, tmp_path):
    out = tmp_path / "pre.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session_helpers.py"), "preflight", "--json",
                           str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "torch:" in proc.stdout and out.exists()
    if torch.version.cuda is None:
        assert proc.returncode == 1 and "PROBLEM: torch is a CPU build" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session_helpers.py"), "ext-ok"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "extension" in proc.stdout
    if not torch.cuda.is_available() and torch.version.cuda is None:
        assert proc.returncode == 1 and "no CUDA kernels" in proc.stdout


# ------------------------------------------------------------------------------ bench_sparsify_models
@pytest.fixture(scope="module")
def skm():
    return load_bench_script("bench_sparsify_models")


def test_bench_sparsify_models_device_and_dtype_on_cpu(skm, tmp_path, capsys):
    assert skm.main(["--models", "bert", "--layers", "1", "--reps", "1", "--batch", "1", "--dtype", "bfloat16",
                     "--out", str(tmp_path)]) == 0
    import json

    data = json.loads(next(tmp_path.glob("sparsify_models_cpu-*.json")).read_text())
    row = data["rows"][0]
    assert (row["device"], row["dtype"]) == ("cpu", "bfloat16") and row["verify_error"] is None
    assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
    assert "bfloat16" in next(tmp_path.glob("*.md")).read_text()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            skm.main(["--device", "cuda", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown model"):
        skm.main(["--models", "gpt", "--out", str(tmp_path)])


def test_bench_sparsify_models_reports_a_mismatch_instead_of_raising(skm):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    res = skm._verify(a, b, torch.randn(2, 8), torch.float32)
    assert res["verify_error"] and res["verify_max_diff"] > 0
    assert skm._verify(a, a, torch.randn(2, 8), torch.float16)["verify_error"] is None


def test_bench_sparsify_models_times_compiled_pairs_in_the_same_loop(skm):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():
        dense[0].weight[:32] = 0                       # two empty 32x32 block-rows
    fast = torch.nn.Sequential(SparseLinear.from_dense(dense[0], "bsr", block=32)).eval()
    t = skm._timed(dense, fast, torch.randn(4, 64), reps=1, device="cpu", compile_=True)
    assert {"dense_ms", "sparse_ms", "dense_compile_ms", "sparse_compile_ms", "dense_compile_s",
            "sparse_compile_s"} <= t.keys()
    assert t["speedup_compiled"] == t["dense_compile_ms"] / t["sparse_compile_ms"]
    dense_variants = [t[k] for k in ("dense_ms", "dense_compile_ms", "dense_onednn_ms") if k in t]
    assert t["speedup_best"] == min(dense_variants) / min(t["sparse_ms"], t["sparse_compile_ms"])
    assert "dense_compile_ms" not in skm._timed(dense, fast, torch.randn(4, 64), 1, "cpu", compile_=False)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_bench_sparsify_models_onednn_dense_packs_each_linear_for_its_rows(skm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(3, 5, 32)
    onednn, why = skm._onednn_dense(model, x)
    assert why == "" and [type(m).__name__ for m in onednn] == ["_OneDNNLinear", "ReLU", "_OneDNNLinear"]
    with torch.no_grad():
        torch.testing.assert_close(onednn(x), model(x), rtol=1e-4, atol=1e-4)
    # a stock encoder layer's fused eval path reads its weights itself: no oneDNN copy (it would be MKL renamed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    copy_, why = skm._onednn_dense(layer, torch.randn(2, 5, 32))
    assert copy_ is None and "fused" in why


def test_bench_sparsify_models_hugging_face_models(skm, tmp_path):
    pytest.importorskip("transformers")
    # a tiny min_speedup: every 90%-block-sparse Linear goes sparse whatever this (shared, noisy) machine times
    assert skm.main(["--models", "hf-bert,hf-gpt2", "--layers", "1", "--reps", "1", "--batch", "1",
                     "--min-speedup", "1e-6", "--out", str(tmp_path)]) == 0
    import json

    bert, gpt2 = json.loads(next(tmp_path.glob("sparsify_models_cpu-*.json")).read_text())["rows"]
    assert bert["model"].startswith("Hugging Face BertModel (1 layers)") and bert["verify_error"] is None
    assert bert["sparse_layers"] == 6 and bert["linear_weight_bytes_pct"] < 15
    assert gpt2["model"].startswith("Hugging Face GPT2Model (1 layers)") and gpt2["verify_error"] is None
    assert gpt2["sparse_layers"] == 4 and gpt2["linear_weight_bytes_pct"] < 15


def test_bench_sparsify_models_r3d18_compacts_and_sparsifies_conv3d(skm, tmp_path, monkeypatch):
    """The video model (a narrow R3D-18 on small clips here): channels compacted through the 3-D dependency graph,
    the remaining 3x3x3 convs block-sparse as SparseConv3d, outputs equal to the pruned model's."""
    from functools import partial

    monkeypatch.setattr(sk.models, "R3D18", partial(sk.models.R3D18, width=0.5, frames=8, image_size=32))
    assert skm.main(["--models", "r3d18", "--reps", "1", "--batch", "1", "--min-speedup", "1e-6",
                     "--out", str(tmp_path)]) == 0
    import json

    (row,) = json.loads(next(tmp_path.glob("sparsify_models_cpu-*.json")).read_text())["rows"]
    assert row["model"].startswith("R3D-18, batch 1") and row["verify_error"] is None
    assert row["sparse_layers"] > 0 and "3x3x3 convs" in row["pruning"] and row["target"] is None


def test_bench_sparsify_models_unet_sparsifies_its_up_convolutions(skm, tmp_path, monkeypatch):
    """A narrow U-Net: channels compacted through its concatenated skips and up-convolutions, then the 3x3 convs
    and the transposed convs block-sparse (SparseConv2d / SparseConvTranspose2d), outputs equal to the pruned
    model's."""
    from functools import partial

    monkeypatch.setattr(sk.models, "UNet", partial(sk.models.UNet, width=1.0, image_size=32))
    assert skm.main(["--models", "unet", "--reps", "1", "--min-speedup", "1e-6", "--out", str(tmp_path)]) == 0
    import json

    (row,) = json.loads(next(tmp_path.glob("sparsify_models_cpu-*.json")).read_text())["rows"]
    assert row["model"] == "U-Net, batch 2, 32x32" and row["verify_error"] is None
    assert "up-convolutions" in row["pruning"] and row["target"] is None
    assert row["sparse_transposed"] > 0 and row["sparse_layers"] > row["sparse_transposed"]


def test_bench_sparsify_models_vit_prunes_stock_attention(skm, tmp_path):
    assert skm.main(["--models", "vit", "--layers", "1", "--reps", "1", "--batch", "1", "--min-speedup", "1e-6",
                     "--out", str(tmp_path)]) == 0
    import json

    (vit,) = json.loads(next(tmp_path.glob("sparsify_models_cpu-*.json")).read_text())["rows"]
    assert vit["model"].startswith("ViT-B/16 of stock torch modules (1 layers)") and vit["verify_error"] is None
    # q, k, v (from nn.MultiheadAttention's packed in_proj_weight), out_proj, linear1, linear2
    assert vit["sparse_layers"] == 6 and vit["linear_weight_bytes_pct"] < 15
