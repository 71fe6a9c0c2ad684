"""Results -> markdown: break-even sparsity per format and shape, best speedup, % of the ideal 1/(1-s).

Break-even is the sparsity from which a sparse candidate stays faster than dense: after the last measured
sparsity where its speedup is below 1.0, by linear interpolation up to the next one (speedups 0.5 at s=0.5 and
1.5 at s=0.9 -> 0.7). A curve that dips below 1.0 again after crossing it (a noisy or a genuinely slower point)
is judged by that last dip, and marked "dips": the first crossing would claim sparsities that were measured
slower than dense. If every measured sparsity is faster than dense it is "<= s_min"; if the highest is not, "never
(up to s_max)". Non-finite speedups (a failed timing) are left out.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .machine import ISA_ENV, cpu_isa_class

__all__ = ["BreakEven", "break_even", "load_results", "summarize", "to_markdown", "speedup_table", "machine_line",
           "is_noisy", "replace_marked_block", "find_results", "group_key", "START_MARKER", "END_MARKER",
           "SCHEMA"]

SCHEMA = "sparsekit-bench/1"   # what `sparsekit bench` writes (sweep.new_results); the report reads only that
_OP_ORDER = {"linear": 0, "conv2d": 1, "model": 2}
START_MARKER = "<!-- bench-table -->"
END_MARKER = "<!-- /bench-table -->"
NOISY_PCT = 10.0
_NUMERIC = {"M", "N", "K", "target_sparsity", "sparsity", "ms", "noise_pct", "dense_noise_pct", "dense_ms",
            "best_dense_ms", "speedup", "speedup_vs_best_dense", "ideal", "pct_ideal", "rel_err", "reps", "flops",
            "bytes", "gflops_per_s", "pct_peak_flops", "gb_per_s", "pct_peak_bw"}


@dataclass(frozen=True)
class BreakEven:
    value: float | None     # interpolated sparsity, the lowest measured one ("below"), or None ("never")
    kind: str               # "interpolated" | "below" | "never" | "none" (no ok points)
    low: float | None = None
    high: float | None = None
    dips: bool = False      # the curve is below 1.0 again somewhere above a sparsity where it was not

    def __str__(self) -> str:
        note = " (dips)" if self.dips else ""
        if self.kind == "interpolated":
            return f"{self.value:.2f}{note}"
        if self.kind == "below":
            return f"<= {self.value:.2f}"
        if self.kind == "never":
            return f"never (up to {self.high:.2f}){note}"
        return "-"


def break_even(points: list[tuple[float, float]]) -> BreakEven:
    """Sparsity from which the speedup stays at or above 1.0, from (sparsity, speedup) points (any order)."""
    pts = sorted((float(s), float(v)) for s, v in points
                 if s is not None and v is not None and math.isfinite(float(s)) and math.isfinite(float(v)))
    if not pts:
        return BreakEven(None, "none")
    lo, hi = pts[0][0], pts[-1][0]
    below = [i for i, (_, v) in enumerate(pts) if v < 1.0]
    if not below:
        return BreakEven(lo, "below", lo, hi)
    last = below[-1]
    dips = any(v >= 1.0 for _, v in pts[:last])
    if last == len(pts) - 1:
        return BreakEven(None, "never", lo, hi, dips)
    (s0, v0), (s1, v1) = pts[last], pts[last + 1]
    return BreakEven(s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0), "interpolated", lo, hi, dips)


# ----------------------------------------------------------------------------------------------- loading
def find_results(path: str | os.PathLike, device: str | None = None, suite: str | None = None,
                 prefer_full: bool = True, prefer_native: bool = False) -> Path:
    """A results file: ``path`` itself, or the newest matching JSON in a directory (complete sweeps before
    interrupted ones, full before quick; with ``prefer_native``, runs of the machine's own CPU class first, before
    ones with a lowered instruction set)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"RESULTS: {str(p)!r} does not exist; expected a results .json/.csv file or a "
                                "directory of them (e.g. bench/results)")
    found = []
    for f in p.glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:   # other tools' JSON (bench/*.py, caches)
            continue
        meta = data.get("meta", {})
        if (device and meta.get("device") != device) or (suite and meta.get("suite") != suite):
            continue
        native = not prefer_native or cpu_isa_class(meta) == "native"
        found.append((native, not meta.get("interrupted"), not (prefer_full and meta.get("quick")),
                      str(meta.get("date", "")), f))
    if not found:
        what = " ".join(x for x in (device, suite) if x)
        raise FileNotFoundError(f"RESULTS: no {what + ' ' if what else ''}results .json in {str(p)!r}; "
                                "run `sparsekit bench kernels --out DIR` first")
    return max(found)[-1]


def _num(v: str) -> object:
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def load_results(path: str | os.PathLike) -> dict:
    """Load a results .json (everything) or .csv (rows only), or the newest .json in a directory."""
    p = find_results(path)
    if p.suffix == ".csv":
        with open(p, newline="") as f:
            rows = [{k: (_num(v) if k in _NUMERIC else v) for k, v in r.items()} for r in csv.DictReader(f)]
        if not rows or "candidate" not in rows[0]:
            raise ValueError(f"RESULTS: {str(p)!r} is not a sparsekit results CSV (no 'candidate' column)")
        return {"schema": None, "meta": {"source": str(p)}, "peaks": {}, "notes": {}, "rows": rows}
    if p.suffix != ".json":
        raise ValueError(f"RESULTS: expected a .json or .csv file, got {str(p)!r}")
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise ValueError(f"RESULTS: {str(p)!r} is not valid JSON ({exc})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA or not isinstance(data.get("rows"), list):
        raise ValueError(f"RESULTS: {str(p)!r} is not a `sparsekit bench` results file: its schema is {schema!r}, "
                         f"expected {SCHEMA!r} (other benchmark scripts write their own JSON)")
    data.setdefault("meta", {})["source"] = str(p)
    return data


# --------------------------------------------------------------------------------------------- summary
def group_key(row: dict) -> str:
    """The format a speedup-vs-sparsity curve belongs to: the pattern (bsr32x32, csr); all n:m patterns are 'nm'."""
    return "nm" if row.get("format") == "nm" else str(row.get("pattern"))


def summarize(rows: list[dict], kinds: tuple[str, ...] = ("sparsekit", "torch")) -> list[dict]:
    """One entry per (op, shape, dtype, format, candidate) of the given kinds: break-even, best, % ideal."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:     # (M and device too: results of several runs may be concatenated)
        if r.get("kind") in kinds:
            groups[(r["op"], r["shape"], r.get("M"), r.get("device"), r["dtype"], group_key(r),
                    r["candidate"])].append(r)
    out = []
    for (op, shape, _, device, dtype, fmt, cand), rs in groups.items():
        ok, failed_at = [], set()
        for r in rs:
            if r.get("status") == "ok" and _finite(r.get("speedup")) and _finite(r.get("sparsity")):
                ok.append(r)
            else:     # (named by its status, or "no timing" when its speedup or sparsity is missing / not finite)
                where = r.get("sparsity") if _finite(r.get("sparsity")) else r.get("target_sparsity")
                failed_at.add(f"{r.get('status') if r.get('status') != 'ok' else 'no timing'}@{_fmt(where)}")
        be = break_even([(r["sparsity"], r["speedup"]) for r in ok])
        best = max(ok, key=lambda r: r["speedup"]) if ok else None
        failed = sorted(failed_at)
        out.append({"op": op, "shape": shape, "device": device, "dtype": dtype, "format": fmt, "candidate": cand,
                    "M": rs[0].get("M"), "N": rs[0].get("N"), "K": rs[0].get("K"), "break_even": be,
                    "best_speedup": best["speedup"] if best else None,
                    "best_at": best["sparsity"] if best else None,
                    "best_nm": best.get("nm") if best else None,
                    "pct_ideal_at_best": best["pct_ideal"] if best else None,
                    "best_vs_fastest_dense": max((r["speedup_vs_best_dense"] for r in ok
                                                  if r.get("speedup_vs_best_dense") is not None), default=None),
                    "by_sparsity": {round(r["sparsity"], 4): r["speedup"] for r in ok},
                    "by_target": {round(r["target_sparsity"], 4): (r["speedup"], is_noisy(r)) for r in ok},
                    "failed": failed})
    out.sort(key=lambda e: (_OP_ORDER.get(e["op"], 9), e["shape"], e["M"] or 0, str(e["device"]), e["dtype"],
                            e["format"], e["candidate"]))
    return out


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_noisy(r: dict) -> bool:
    """True when the candidate's or dense's interquartile range exceeds NOISY_PCT % of its median."""
    return any((r.get(k) or 0.0) > NOISY_PCT for k in ("noise_pct", "dense_noise_pct"))


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _mnk(e: dict) -> str:
    if e.get("N") is None:                       # whole models: only the token count is meaningful
        return f"{int(e['M'])} tokens" if e.get("M") is not None else "-"
    return "x".join(str(int(e[k])) for k in ("M", "N", "K"))


def machine_line(meta: dict) -> str:
    """One line: device, hardware, versions, TF32, date and load average of a result set."""
    if not meta.get("date"):
        return f"source: `{meta.get('source', '?')}` (CSV: no machine information)"
    dev = meta.get("device", "?")
    hw = (f"{meta['gpu']['name']} (sm_{meta['gpu']['capability'].replace('.', '')})" if dev == "cuda"
          and meta.get("gpu") else f"{meta.get('cpu_model')}, {meta.get('threads')} threads"
          + (f", sparsekit CPU kernels {meta['cpu_kernel_isa']}" if meta.get("cpu_kernel_isa") else ""))
    tf32 = meta.get("tf32", {})
    tf = "on" if tf32.get("cuda.matmul.allow_tf32") else "off"
    load = meta.get("loadavg_start")
    parts = [f"{dev.upper()}: {hw}", f"torch {meta.get('torch')}", f"triton {meta.get('triton') or '-'}",
             f"sparsekit {meta.get('sparsekit')} ({meta.get('sparsekit_commit') or 'no git'})", f"TF32 {tf}",
             f"{meta.get('date', '?')[:16].replace('T', ' ')} UTC"]
    if load:
        parts.append(f"load average {load[0]:.1f} at start on {meta.get('cpu_count')} CPUs")
    forced = {k: v for k, v in (meta.get("env") or {}).items() if k in ISA_ENV}
    if forced:        # both sides of the comparison ran with a lowered instruction set (bench/avx2_class.sh)
        parts.append("instruction sets forced: " + " ".join(f"{k}={v}" for k, v in forced.items())
                     + f" (torch's CPU capability {meta.get('torch_cpu_capability', '?')})")
    return "; ".join(parts)


def speedup_table(results: dict, shapes: list[str] | None = None, dtypes: list[str] | None = None,
                  kinds: tuple[str, ...] = ("sparsekit", "torch")) -> str:
    """Markdown: one line per (shape, format, candidate), speedup over dense eager per sparsity, break-even, best."""
    rows = [r for r in results["rows"] if (shapes is None or r["shape"] in shapes)
            and (dtypes is None or r["dtype"] in dtypes)]
    entries = summarize(rows, kinds)
    if shapes is not None:
        order = {s: i for i, s in enumerate(shapes)}
        entries.sort(key=lambda e: (order.get(e["shape"], 99), e["dtype"], e["format"], e["candidate"]))
    sparsities = sorted({round(r["target_sparsity"], 4) for r in rows if r.get("kind") in kinds})
    head = ["shape (MxNxK)", "dtype", "format", "candidate"] + [f"{s:.0%}" for s in sparsities] + \
           ["break-even", "best (% of ideal)", "best vs fastest dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = []
        for s in sparsities:   # by target sparsity: an n:m point sits at its own (nearest) sparsity
            hit = e["by_target"].get(s)
            cells.append("-" if hit is None else f"{hit[0]:.2f}x" + ("~" if hit[1] else ""))
        best = "-" if e["best_speedup"] is None else \
            f"{e['best_speedup']:.2f}x @ {e['best_at']:.2f} ({e['pct_ideal_at_best']:.0f}%)"
        if e["failed"] and e["best_speedup"] is None:
            best = ", ".join(e["failed"])
        vs_fastest = _fmt(e["best_vs_fastest_dense"], ".2f", "x")
        lines.append("| " + " | ".join([f"{e['shape']} ({_mnk(e)})", e["dtype"], e["format"], e["candidate"],
                                         *cells, str(e["break_even"]), best, vs_fastest]) + " |")
    if any(noisy for e in entries for _, noisy in e["by_target"].values()):
        lines.append(f"\n~ noisy: the interquartile range of the candidate's or dense's times exceeded {NOISY_PCT:g}% "
                     "of the median (other load on the machine); re-run on a quiet machine before trusting it.")
    return "\n".join(lines)


def to_markdown(results: dict, plots_dir: str | None = None) -> str:
    """The full report of a result set."""
    meta, rows = results.get("meta", {}), results["rows"]
    suite = meta.get("suite", "?")
    out = [f"# sparsekit benchmark report: {suite}{' (quick sweep)' if meta.get('quick') else ''}", "",
           machine_line(meta), ""]
    if meta.get("timing"):
        out += [f"- timing: {meta['timing']}", f"- dense baseline: {meta.get('dense_baseline', '-')}"]
    for dtype, p in results.get("peaks", {}).items():
        out.append(f"- roofline peaks ({dtype}): {p['flops'] / 1e9:.0f} GFLOP/s, {p['bytes_per_s'] / 1e9:.1f} GB/s "
                   f"({p['how']})")
    if meta.get("argv"):
        out.append(f"- command: `{' '.join(meta['argv'])}`")
    if meta.get("interrupted"):
        out.append(f"- **incomplete**: {meta['interrupted']}; only the configurations finished before are here")
    out += ["", "Speedup = dense eager ms / candidate ms (same run, same loop); ideal = 1/(1-sparsity); "
            "'best vs fastest dense' divides by the fastest dense variant (eager, torch.compile, channels_last, "
            "oneDNN prepacked) "
            "instead; "
            "columns are target sparsities (n:m: the pattern nearest the target; break-even and best use the actual "
            "sparsity).", ""]
    ops = sorted({r["op"] for r in rows}, key=lambda o: _OP_ORDER.get(o, 9))
    for op in ops:
        out += [f"## {op}", "", speedup_table({"rows": [r for r in rows if r["op"] == op]}), ""]
    variants = ("dense_compile", "dense_cl", "dense_onednn")
    dense = [r for r in rows if r.get("candidate") in variants and r.get("speedup")]
    if dense:
        out += ["## dense variants vs dense eager (median over all configurations)", "",
                "| shape | dtype | variant | speedup |", "|---|---|---|---|"]
        groups: dict[tuple, list[float]] = defaultdict(list)
        for r in dense:
            groups[(r["shape"], r["dtype"], r["candidate"])].append(r["speedup"])
        for (shape, dtype, cand), vs in sorted(groups.items()):
            vs.sort()
            out.append(f"| {shape} | {dtype} | {cand} | {vs[len(vs) // 2]:.2f}x |")
        out.append("")
    roof = [r for r in rows if r.get("pct_peak_flops") is not None and r.get("kind") != "dense"]
    if roof:
        best = sorted(roof, key=lambda r: -(r["pct_peak_flops"] or 0))[:10]
        out += ["## roofline: the 10 sparse configurations closest to peak FLOP/s", "",
                "| shape | dtype | pattern | sparsity | candidate | GFLOP/s (useful) | % peak FLOP/s | GB/s | "
                "% peak bandwidth |", "|---|---|---|---|---|---|---|---|---|"]
        for r in best:
            out.append(f"| {r['shape']} | {r['dtype']} | {r['pattern']} | {r['sparsity']:.2f} | {r['candidate']} | "
                       f"{r['gflops_per_s']:.1f} | {r['pct_peak_flops']:.1f}% | {r['gb_per_s']:.1f} | "
                       f"{r['pct_peak_bw']:.1f}% |")
        out.append("")
    bad = [r for r in rows if r.get("status") not in ("ok", None)]
    notes = results.get("notes", {})
    if bad or notes:
        out += ["## not measured", ""]
        seen = set()
        for r in bad:
            key = (r["candidate"], r["status"], r.get("note"))
            if key in seen:
                continue
            seen.add(key)
            n = sum(1 for b in bad if (b["candidate"], b["status"], b.get("note")) == key)
            out.append(f"- {r['candidate']} {r['status']} ({n} configuration{'s' if n > 1 else ''}, e.g. "
                       f"{r['shape']} {r['dtype']} {r['pattern']} s={r['sparsity']:.2f}): {r.get('note', '')}")
        for k, v in notes.items():
            out.append(f"- {k}: {v}")
        out.append("")
    if plots_dir:
        out += ["## plots", "", f"PNG plots (speedup vs sparsity per format, roofline) are in `{plots_dir}/`.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- README
def replace_marked_block(text: str, block: str, start: str = START_MARKER, end: str = END_MARKER) -> str:
    """Replace what lies between the start and end marker lines (markers kept); everything else untouched."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0:
        missing = [m for m, at in ((start, i), (end, j)) if at < 0]
        raise ValueError(f"text has no {' and no '.join(repr(m) for m in missing)} marker; add "
                         f"{start!r} and {end!r} where the generated table belongs")
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected exactly one {start!r} and one {end!r}, got {text.count(start)} and "
                         f"{text.count(end)}")
    if j < i:
        raise ValueError(f"the end marker {end!r} comes before the start marker {start!r}")
    return text[:i + len(start)] + "\n" + block.strip("\n") + "\n" + text[j:]
