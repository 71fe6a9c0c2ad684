"""Rewrite the README's benchmark block (between <!-- bench-table --> and <!-- /bench-table -->) and its targets
block (between <!-- targets-table --> and <!-- /targets-table -->) and its demo output (between <!-- demo-output -->
and <!-- /demo-output -->) from bench/results.

Benchmark block: the newest full CPU kernel sweep of every distinct configuration (else the newest quick sweep),
the same for CUDA if any, and the newest whole-model results per device; for each, a title derived from its
configuration, the machine and date, a speedup table for the headline shapes and a link to the
speedup-vs-sparsity plot and the full report. Targets block: every target of bench/targets.py with its measured
figures, status and source file, one table per device. Nothing outside the markers is touched; no number is typed
by hand. A README without the targets markers gets the benchmark block only.

    python bench/make_readme_table.py                 # rewrite README.md in place
    python bench/make_readme_table.py --check         # exit 1 if README.md is out of date (for CI)
    python bench/make_readme_table.py --results DIR --readme PATH --shapes bert-base.mlp_up,llama-7b.mlp_down
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sparsekit.benchmark.machine import ISA_ENV, cpu_isa_class, machine_slug
from sparsekit.benchmark.patterns import PATTERN_KINDS
from sparsekit.benchmark.report import find_results, machine_line, replace_marked_block, speedup_table
from sparsekit.benchmark.shapes import get_shapes
from sparsekit.benchmark.sweep import DEFAULT_SPARSITIES

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/targets.py, also when loaded by path (tests)
import targets  # noqa: E402

HEADLINE = ("bert-base.mlp_up", "bert-base.mlp_down", "llama-7b.mlp_gate_up", "llama-7b.mlp_down",
            "resnet50.layer3.conv3x3", "resnet50.layer4.conv1x1_out")
ROOT = Path(__file__).resolve().parents[1]
TARGETS_START, TARGETS_END = "<!-- targets-table -->", "<!-- /targets-table -->"
DEMO_START, DEMO_END = "<!-- demo-output -->", "<!-- /demo-output -->"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _rel(path: Path, readme: Path) -> str:
    return Path(os.path.relpath(path.resolve(), readme.resolve().parent)).as_posix()


def _newest(results_dir: Path, device: str, suite: str) -> Path | None:
    """The newest ``suite`` run on ``device``: a native-CPU-class run before any other, then full before quick."""
    try:
        return find_results(results_dir, device=device, suite=suite, prefer_native=True)
    except FileNotFoundError:
        return None


def _newest_per_config(results_dir: Path, newest: Path, device: str, suite: str) -> list[Path]:
    """The newest full ``suite`` run on ``device`` of every distinct sweep configuration (ops, shapes, M,
    dtypes, formats, blocks, sparsities, sample batching, timer, TF32, CPU class and whether it was forced, the
    machine: e.g. linear M=512, GEMV M=1 hot and as single calls, conv, a bf16 sweep, an AVX2-class machine and
    an AVX-512 one lowered to AVX2, an H100 and an H200), oldest first; a re-run of a configuration on the same
    machine replaces the earlier one, a complete run an interrupted one whatever their dates."""
    best: dict[str, tuple[tuple[bool, str], Path]] = {}
    for f in sorted(results_dir.glob("*.json")):
        try:
            meta = _load(f).get("meta", {})
        except (OSError, ValueError, KeyError):
            continue
        if meta.get("device") != device or meta.get("suite") != suite or meta.get("quick"):
            continue
        cfg = meta.get("config", {})
        fields = ("ops", "shapes", "m", "dtypes", "formats", "blocks", "sparsities", "min_sample_ms", "timer", "tf32")
        key = json.dumps({k: cfg.get(k) for k in fields} | {
            "isa": cpu_isa_class(meta), "forced": _forced(meta), "machine": machine_slug(meta)}, sort_keys=True)
        rank = (not meta.get("interrupted"), str(meta.get("date", "")))
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, f)
    runs = [f for _, f in sorted(best.values(), key=lambda t: t[0][1])]
    return runs or [newest]


def _forced(meta: dict) -> bool:
    """Whether an instruction-set variable was set for the run (bench/avx2_class.sh)."""
    return any(k in ISA_ENV for k in meta.get("env") or {})


def _shape_names(cfg: dict) -> list[str]:
    """The shapes a sweep configuration names (names, or shape objects saved as dicts); [] for the default set."""
    return [s if isinstance(s, str) else str(s.get("name")) for s in cfg.get("shapes") or []]


def _m_text(ops: list[str], cfg: dict, rows: list[dict], device: str) -> str:
    """'GEMV (M = 1)', 'linear, M = 512', 'linear, M = 128-512 (per shape)', 'conv2d, batch 8': the op and its
    rows (linear) or batch (conv)."""
    m = cfg.get("m")
    if ops == ["linear"]:
        if m == 1:
            return "GEMV (M = 1)"
        ms = sorted({r["M"] for r in rows if r.get("M") is not None})
        if m is not None or len(ms) == 1:
            return f"linear, M = {m if m is not None else ms[0]}"
        return f"linear, M = {ms[0]}-{ms[-1]} (per shape)" if ms else "linear"
    if ops == ["conv2d"]:
        if m is None:
            try:
                batches = sorted({s.batch(device) for s in get_shapes(sorted({r["shape"] for r in rows}))})
            except ValueError:          # shapes not in sparsekit.benchmark.shapes (e.g. shape objects)
                batches = []
            m = batches[0] if len(batches) == 1 else None
        return "conv2d" + (f", batch {m}" if m is not None else "")
    return " + ".join(ops)


def _title(device_title: str, res: dict) -> str:
    """A section title from a result's meta.config and rows: op and M (or batch), dtypes, the shapes if the
    sweep named them, and how calls were timed where that matters (repeated within a sample, or single cold
    calls), e.g. 'CPU kernels: GEMV (M = 1), float32, bert-base mlp_up/mlp_down, repeated calls'."""
    meta, rows = res["meta"], res["rows"]
    cfg = meta.get("config") or {}
    cls = cpu_isa_class(meta)
    if meta.get("suite") == "model":
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        title = f"{device_title} whole models: {', '.join(shapes)}, {', '.join(cfg.get('dtypes') or [])}".rstrip(", ")
        return title + (f", {cls.upper()} class" if cls != "native" else "")
    ops = list(dict.fromkeys(r["op"] for r in rows)) or list(cfg.get("ops") or [])
    parts = [_m_text(ops, cfg, rows, meta.get("device", "cpu")),
             ", ".join(cfg.get("dtypes") or sorted({r["dtype"] for r in rows}))]
    by_model: dict[str, list[str]] = {}
    for name in _shape_names(cfg):
        model, _, layer = name.partition(".")
        by_model.setdefault(model, []).append(layer or model)
    parts += [f"{model} {'/'.join(layers)}" for model, layers in by_model.items()]
    formats = cfg.get("formats") or []
    if formats and set(formats) != set(PATTERN_KINDS) and not meta.get("quick"):   # restricted (not --quick's default)
        parts.append(f"{'/'.join(f.upper() for f in formats)} only")
    if cls != "native":
        parts.append(f"{cls.upper()} class")
    sparsities = cfg.get("sparsities")
    if sparsities and not meta.get("quick") and tuple(sparsities) != tuple(DEFAULT_SPARSITIES):
        parts.append("sparsity " + "/".join(f"{s:g}" for s in sparsities))
    if cfg.get("timer") not in (None, "auto"):
        parts.append(f"timer {cfg['timer']}")
    if cfg.get("tf32"):
        parts.append("TF32 on")
    sample_ms = cfg.get("min_sample_ms")
    if meta.get("device") == "cpu" and sample_ms == 0:
        parts.append("single cold calls (--min-sample-ms 0)")
    elif meta.get("device") == "cpu" and sample_ms and all(
            (r.get("ms") or 0) < sample_ms for r in rows if r.get("candidate") == "dense" and r.get("ms")):
        parts.append("repeated calls")           # every call, dense's too, was repeated to fill a sample
    return f"{device_title} kernels: " + ", ".join(p for p in parts if p)


def _section(title: str, path: Path, readme: Path, shapes: list[str] | None, suffix: str = "") -> list[str]:
    res = _load(path)
    meta = res["meta"]
    title = _title(title, res) + suffix
    present = list(dict.fromkeys(r["shape"] for r in res["rows"]))
    pick = [s for s in (shapes or HEADLINE) if s in present] or present
    kind = "quick sweep (`--quick`)" if meta.get("quick") else "full sweep"
    if meta.get("interrupted"):
        kind += f", {meta['interrupted']}: the configurations after that point are missing"
    stem = path.stem
    out = [f"#### {title}", "", f"{machine_line(meta)}; {kind}.", "",
           speedup_table(res, shapes=pick), ""]
    plot_dir = path.parent / stem
    for shape in pick:
        for dtype in list(dict.fromkeys(r["dtype"] for r in res["rows"])):
            op = next(r["op"] for r in res["rows"] if r["shape"] == shape)
            png = plot_dir / f"speedup_{op}_{shape}_{dtype}.png"
            if png.exists():
                out += [f"![{title}: {shape} {dtype}, speedup vs sparsity]({_rel(png, readme)})", ""]
                break
        else:
            continue
        break
    links = [f"[full report]({_rel(path.with_suffix('.md'), readme)})" if path.with_suffix(".md").exists() else "",
             f"[JSON]({_rel(path, readme)})", f"[CSV]({_rel(path.with_suffix('.csv'), readme)})"
             if path.with_suffix(".csv").exists() else ""]
    out += [" · ".join(x for x in links if x) + (f" · plots in `{_rel(plot_dir, readme)}/`" if plot_dir.exists()
                                                else ""), ""]
    return out


def _other_isa_links(title: str, runs: list[Path], readme: Path) -> list[str]:
    """One sentence of links per kind of non-native run: AVX2 class on such a machine, AVX2 class through
    bench/avx2_class.sh (both judged in the targets table's AVX2 table), other instruction-set settings."""
    def forced(r: Path) -> bool:
        return _forced(_load(r).get("meta", {}))

    def isa(r: Path) -> str:
        return cpu_isa_class(_load(r).get("meta", {}))

    kinds = (("on an AVX2-class machine (no AVX-512; in the targets table below)",
              [r for r in runs if isa(r) == "avx2" and not forced(r)]),
             ("with a lowered instruction set (`bench/avx2_class.sh`; in the targets table below)",
              [r for r in runs if isa(r) == "avx2" and forced(r)]),
             ("with other instruction-set settings (not in the targets tables)",
              [r for r in runs if isa(r) != "avx2"]))
    lines = []
    for how, group in kinds:
        if group:
            links = ", ".join(f"[{_title(title, _load(r)).split(': ', 1)[1]}]({_rel(r.with_suffix('.md'), readme)})"
                              for r in group)
            lines += [f"Also measured {how}: {links}.", ""]
    return lines


def build_block(results_dir: Path, readme: Path, shapes: list[str] | None = None) -> str:
    """The markdown that goes between the markers."""
    lines = ["<!-- generated by bench/make_readme_table.py from bench/results; do not edit by hand -->", ""]
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        kernels = _newest(results_dir, device, "kernels")
        model = _newest(results_dir, device, "model")
        if kernels is None and model is None:
            lines += [f"#### {title}", "",
                      f"Not measured yet: run `sparsekit bench kernels --device {device}` on a {title} machine, "
                      "commit `bench/results/`, then `python bench/make_readme_table.py`.", ""]
            continue
        if kernels is not None:
            runs = _newest_per_config(results_dir, kernels, device, "kernels")
            native = [r for r in runs if cpu_isa_class(_load(r).get("meta", {})) == "native"] or runs
            titles = [_title(title, _load(r)) for r in native]
            for run, head in zip(native, titles):     # the same configuration on two machines: name the machine
                suffix = f" ({machine_slug(_load(run)['meta'])})" if titles.count(head) > 1 else ""
                lines += _section(title, run, readme, shapes, suffix)
            others = [r for r in runs if r not in native]
            if others:      # AVX2-class runs: judged in the targets table, linked here rather than repeated
                lines += _other_isa_links(title, others, readme)
        if model is not None:
            lines += _section(title, model, readme, None)
    return "\n".join(lines).rstrip() + "\n"


def demo_block(results_dir: Path, readme: Path) -> str | None:
    """The newest CPU `sparsekit demo --out` run with the default configuration (what `make demo` runs): its
    machine and date, its printed table and a link to its data; None if there is none."""
    runs = []
    for f in results_dir.glob("demo_*.json"):
        try:
            data = _load(f)
        except (OSError, ValueError):
            continue
        if data.get("default_config") and data.get("machine", {}).get("device") == "cpu":
            runs.append((str(data["machine"].get("date", "")), f, data))
    if not runs:
        return None
    date, path, data = max(runs)
    m = data["machine"]
    return "\n".join([
        "<!-- generated by bench/make_readme_table.py from the newest `sparsekit demo --out bench/results`; "
        "do not edit by hand -->",
        f"Measured {date[:10]} on {m.get('cpu_model', '?')} ({m.get('threads', '?')} threads, CPU kernels "
        f"{m.get('cpu_kernel_isa', '?')}), torch {m.get('torch', '?')}, fp32 "
        f"([table]({_rel(path.with_suffix('.txt'), readme)}), [data]({_rel(path, readme)})):", "",
        "```", data["text"].rstrip("\n"), "```", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_readme_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="results directory")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README to rewrite")
    p.add_argument("--shapes", default=None, help="comma-separated shapes for the tables (default: headline set)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the README is out of date")
    args = p.parse_args(argv)
    readme, results = Path(args.readme), Path(args.results)
    if not readme.is_file():
        raise SystemExit(f"make_readme_table: --readme {str(readme)!r} is not a file")
    if not results.is_dir():
        raise SystemExit(f"make_readme_table: --results {str(results)!r} is not a directory")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes else None
    text = readme.read_text()
    try:
        new = replace_marked_block(text, build_block(results, readme, shapes))
        if TARGETS_START in new or TARGETS_END in new:
            new = replace_marked_block(new, targets.targets_block(results, lambda p: _rel(p, readme)),
                                       start=TARGETS_START, end=TARGETS_END)
        else:
            print(f"make_readme_table: {readme} has no {TARGETS_START} block; targets table skipped", file=sys.stderr)
        demo = demo_block(results, readme)
        if demo is not None and DEMO_START in new:
            new = replace_marked_block(new, demo, start=DEMO_START, end=DEMO_END)
    except ValueError as exc:
        raise SystemExit(f"make_readme_table: {readme}: {exc}") from None
    if args.check:
        if new != text:
            print(f"{readme} is out of date; run python bench/make_readme_table.py", file=sys.stderr)
            return 1
        print(f"{readme} is up to date")
        return 0
    if new != text:
        readme.write_text(new)
        print(f"make_readme_table: rewrote the generated blocks of {readme}")
    else:
        print(f"make_readme_table: {readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
