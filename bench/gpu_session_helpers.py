"""Small checks for bench/gpu_session.sh (the GPU-session runbook), kept in Python so they are testable on CPU.

    python bench/gpu_session_helpers.py preflight [--json FILE]   versions, GPU, nvcc/ninja, build + test modules;
                                                                  exit 1 if the CUDA build cannot work here
    python bench/gpu_session_helpers.py arch                      TORCH_CUDA_ARCH_LIST for the visible GPU
    python bench/gpu_session_helpers.py sources-hash [ARCHS]      hash of what the extension is built from
    python bench/gpu_session_helpers.py ext-ok                    exit 0 iff this checkout's sparsekit is installed
                                                                  with CUDA kernels in sparsekit._C
    python bench/gpu_session_helpers.py so-loads FILE             exit 0 iff FILE loads as sparsekit._C
    python bench/gpu_session_helpers.py has-module NAME           exit 0 iff NAME is importable
    python bench/gpu_session_helpers.py junit-summary XML...      markdown: counts per file, failing tests

Nothing here needs network access; nothing imports sparsekit except ext-ok and so-loads.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = "8.0+PTX;9.0a"   # setup.py's default TORCH_CUDA_ARCH_LIST
# importable modules that matter in a session: (name, what it is for, needed to build?)
MODULES = (("setuptools", "the build backend (>= 64 for an editable install)", True),
           ("wheel", "editable wheels on setuptools < 70.1", False),
           ("ninja", "parallel build (MAX_JOBS); without it the build is serial", False),
           ("numpy", "sparsekit dependency", False),
           ("safetensors", "sk.save / sk.load", False),
           ("triton", "the triton backend", False),
           ("pytest", "the test stage", False),
           ("pytest_timeout", "per-test timeouts in the test stage", False),
           ("xdist", "pytest -n (not used by default)", False),
           ("expecttest", "torch.testing internals (opcheck works without it)", False),
           ("matplotlib", "benchmark plots", False),
           ("tqdm", "progress bars", False))


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = __import__(name)
    except Exception as exc:   # importable spec but broken module: say so
        return f"broken ({type(exc).__name__}: {exc})"
    return str(getattr(mod, "__version__", "present"))


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout or out.stderr).strip() or None


def _major(version: str | None) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def preflight() -> tuple[dict, list[str]]:
    """(facts, problems): problems are what makes the CUDA build or the GPU stages impossible."""
    facts: dict = {"python": platform.python_version(), "executable": sys.executable, "cwd": os.getcwd()}
    problems: list[str] = []
    try:
        import torch
    except ImportError as exc:
        return {**facts, "torch": None}, [f"torch is not importable ({exc})"]
    facts.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available()})
    if torch.version.cuda is None:
        problems.append("torch is a CPU build: no CUDA extension, no GPU stages")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                        "count": torch.cuda.device_count()}
    else:
        problems.append("no CUDA device visible (torch.cuda.is_available() is False)")
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:   # a CPU build may lack parts of cpp_extension's CUDA support
        CUDA_HOME = None
    facts["cuda_home"] = CUDA_HOME
    nvcc = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None)
    version = _run([nvcc, "--version"]) if nvcc else None
    facts["nvcc"] = version.splitlines()[-1] if version else None
    if facts["nvcc"] is None:
        problems.append("nvcc not found (PATH, CUDA_HOME): the CUDA sources cannot be compiled")
    else:   # torch's build refuses a CUDA major other than its own, but only after minutes of setup
        release = re.search(r"release (\d+)\.", version or "")
        if release and torch.version.cuda and int(release.group(1)) != _major(torch.version.cuda):
            problems.append(f"nvcc is CUDA {release.group(1)} but torch was built with CUDA {torch.version.cuda}: "
                            "torch.utils.cpp_extension will refuse the build; point CUDA_HOME at a matching toolkit")
    facts["ninja_bin"] = shutil.which("ninja")
    facts["cpu_count"] = os.cpu_count()
    facts["env"] = {k: os.environ[k] for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_VISIBLE_DEVICES",
                                               "OUT") if k in os.environ}
    facts["modules"] = {}
    for name, why, needed in MODULES:
        v = _version(name)
        facts["modules"][name] = v
        if needed and v is None:
            problems.append(f"{name} is missing ({why}); the machine has no network to fetch it")
    if facts["modules"]["setuptools"] and _major(facts["modules"]["setuptools"]) < 64:
        problems.append(f"setuptools {facts['modules']['setuptools']} < 64: no PEP 660 editable install")
    return facts, problems


def cmd_preflight(args: argparse.Namespace) -> int:
    facts, problems = preflight()
    for key in ("python", "executable", "torch", "torch_cuda", "cuda_available", "gpu", "cuda_home", "nvcc",
                "ninja_bin", "cpu_count", "env"):
        print(f"{key:>15}: {facts.get(key)}")
    for name, why, _ in MODULES:
        v = facts.get("modules", {}).get(name)
        print(f"{name:>15}: {v if v is not None else 'MISSING'}" + ("" if v is not None else f"  ({why})"))
    if facts.get("modules", {}).get("ninja") is None and facts.get("ninja_bin") is None:
        print("warning: no ninja: torch builds the extension serially, MAX_JOBS is ignored (several times slower)")
    for p in problems:
        print(f"PROBLEM: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "problems": problems}, indent=1, default=str) + "\n")
    return 1 if problems else 0


def arch_list() -> str:
    """'9.0a' on Hopper (the sm_90a features need the 'a'), 'M.m' on another GPU, setup.py's default without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return DEFAULT_ARCHS
        major, minor = torch.cuda.get_device_capability(0)
    except Exception:
        return DEFAULT_ARCHS
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def sources_hash(archs: str) -> str:
    """16 hex digits over the extension's sources, setup.py, the arch list, Python and torch versions."""
    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()) + [ROOT / "setup.py"]
    for p in files:
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "no-torch"
    h.update(f"{archs}|{platform.python_version()}|{tv}".encode())
    return h.hexdigest()[:16]


def ext_reasons() -> list[str]:
    """Why this checkout's sparsekit cannot run its CUDA kernels yet (empty: it can)."""
    try:
        import sparsekit
        from sparsekit import _extension
        from sparsekit.ops._library import has_kernel
    except Exception as exc:
        return [f"import sparsekit failed: {type(exc).__name__}: {exc}"]
    reasons = []
    where = Path(sparsekit.__file__).resolve().parent
    if where != ROOT / "sparsekit":
        reasons.append(f"sparsekit is imported from {where}, not from this checkout ({ROOT})")
    if not _extension.LOADED:
        reasons.append(f"sparsekit._C is not loaded ({_extension.LOAD_ERROR})")
    else:
        missing = [f for f in ("bsr", "csr", "nm") if not has_kernel(f"{f}_mm", "CUDA")]
        if missing:
            reasons.append(f"sparsekit._C has no CUDA kernels for {', '.join(missing)} (built without CUDA?)")
    try:
        importlib.import_module("sparsekit.kernels")
    except Exception as exc:   # not installed: the package_dir mapping kernels/ -> sparsekit.kernels is missing
        reasons.append(f"sparsekit.kernels is not importable ({type(exc).__name__}: {exc}); pip install -e . first")
    return reasons


def cmd_ext_ok(args: argparse.Namespace) -> int:
    reasons = ext_reasons()
    for r in reasons:
        print(f"extension not ready: {r}")
    if not reasons:
        print("extension ready: sparsekit._C with CUDA kernels, installed from this checkout")
    return 1 if reasons else 0


def cmd_so_loads(args: argparse.Namespace) -> int:
    import torch  # noqa: F401  (libtorch first, as sparsekit._extension does)

    spec = importlib.util.spec_from_file_location("sparsekit._C", args.file)
    if spec is None or spec.loader is None:
        print(f"{args.file}: not a loadable extension module")
        return 1
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as exc:
        print(f"{args.file}: does not load: {type(exc).__name__}: {exc}")
        return 1
    print(f"{args.file}: loads")
    return 0


def junit_summary(paths: list[str]) -> str:
    """A markdown table (one row per junit file, in the order given) and the failing tests."""
    lines = ["| file | tests | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|---|"]
    bad: list[str] = []
    for path in paths:
        name = Path(path).stem
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            lines.append(f"| {name} | no junit ({type(exc).__name__}: the run was killed?) | | | | | |")
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        secs = sum(float(s.get("time", 0)) for s in suites)
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        lines.append(f"| {name} | {n['tests']} | {passed} | {n['failures']} | {n['errors']} | {n['skipped']} | "
                     f"{secs:.0f} |")
        for s in suites:
            for case in s.iter("testcase"):
                for kind in ("failure", "error"):
                    el = case.find(kind)
                    if el is not None:
                        msg = (el.get("message") or el.text or "").strip().splitlines()
                        bad.append(f"- {kind}: `{case.get('classname')}::{case.get('name')}`: "
                                   f"{(msg[0] if msg else '')[:240]}")
    if bad:
        lines += ["", f"Failing tests ({len(bad)}{', first 60' if len(bad) > 60 else ''}):", *bad[:60]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--json", default=None)
    p.set_defaults(fn=cmd_preflight)
    sub.add_parser("arch").set_defaults(fn=lambda a: print(arch_list()) or 0)
    p = sub.add_parser("sources-hash")
    p.add_argument("archs", nargs="?", default=None)
    p.set_defaults(fn=lambda a: print(sources_hash(a.archs or os.environ.get("TORCH_CUDA_ARCH_LIST") or arch_list()))
                   or 0)
    sub.add_parser("ext-ok").set_defaults(fn=cmd_ext_ok)
    p = sub.add_parser("so-loads")
    p.add_argument("file")
    p.set_defaults(fn=cmd_so_loads)
    p = sub.add_parser("has-module")
    p.add_argument("name")
    p.set_defaults(fn=lambda a: 0 if importlib.util.find_spec(a.name) is not None else 1)
    p = sub.add_parser("junit-summary")
    p.add_argument("xml", nargs="*")
    p.set_defaults(fn=lambda a: print(junit_summary(a.xml)) or 0)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
