"""The performance targets of the issues, declared once and evaluated against the result files in bench/results.

A ``Target`` names its issue, its device, the target as text and a ``measure`` function. ``measure`` takes the
loaded results, finds the newest file that holds the rows it needs (full sweeps before quick ones) and returns a
``Measured``: the figures as text, a status and the files they come from. The status is "met" or "not met" against
the threshold declared here, "not measured yet" when no file holds the rows, and "reported" for figures without a
threshold. bench/make_readme_table.py writes ``targets_block`` into the README between <!-- targets-table --> and
<!-- /targets-table -->; the thresholds below are the only numbers typed by hand.

Kernel targets read the sweep rows (``sparsekit bench kernels``): ``speedup`` = dense eager ms / candidate ms in
the same run. On CPU the candidate is ``sparsekit_cpu``; on GPU it is the fastest ``sparsekit_*`` candidate of the
same point, named in the figures. A shape's M is the sweep's ``--m`` (``Points.m``, the batch for a convolution)
or, with None, the shape's default on the device, both from sparsekit.benchmark.shapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from sparsekit.benchmark.machine import ISA_ENV, cpu_isa_class, cpu_tag
from sparsekit.benchmark.report import break_even, machine_line
from sparsekit.benchmark.shapes import get_shapes, shape_names
from sparsekit.benchmark.sweep import DTYPES

__all__ = ["MET", "NOT_MET", "NOT_MEASURED", "REPORTED", "Run", "Results", "Measured", "Target", "Points",
           "TARGETS", "evaluate", "targets_block"]

MET, NOT_MET, NOT_MEASURED, REPORTED = "met", "not met", "not measured yet", "reported"
# result files that are not `sparsekit bench` sweeps, by file-name prefix (a sweep says its suite in meta)
SCRIPT_KINDS = ("sparsify_models", "memory", "compact", "prune_digits", "train_step", "sparse_rnn")


# --------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True, eq=False)
class Run:
    """One result file (compared and hashed by identity: each file is loaded once)."""

    path: Path
    kind: str          # a meta suite ("kernels", "model") or one of SCRIPT_KINDS
    device: str
    date: str          # as recorded; compared only between files of one kind
    quick: bool
    data: dict
    inferred_isa: str | None = None   # Results: the class of an older file that recorded only its machine tag

    @property
    def rows(self) -> list[dict]:
        return self.data.get("rows") or []

    @property
    def config(self) -> dict:
        return (self.data.get("meta") or {}).get("config") or {}

    @property
    def recorded_isa(self) -> str | None:
        """machine.cpu_isa_class of a CPU run from what it recorded ("avx2", "scalar", "mixed" or "native");
        "native" for GPU runs; None when it recorded no instruction set."""
        if self.device != "cpu":
            return "native"
        for info in (self.data.get("meta"), self.data.get("machine")):
            if isinstance(info, dict) and (info.get("cpu_kernel_isa") or info.get("env")):
                return cpu_isa_class({**info, "device": "cpu"})
        return None

    @property
    def isa_class(self) -> str:
        """recorded_isa, else the class Results inferred from the machine, else "native" (a machine no run of
        which recorded its class)."""
        return self.recorded_isa or self.inferred_isa or "native"

    @property
    def machine(self) -> str:
        """The hardware and torch version, without date or load (those are in the file)."""
        meta = self.data.get("meta") if self.kind not in ("sparsify_models", "memory", "sparse_rnn") \
            else self.data.get("machine")
        if isinstance(meta, dict) and meta.get("device"):      # machine_info() metadata: reuse report's line
            parts = machine_line(meta).split("; ")       # "CPU: <hardware>", "torch <version>", ..., forced ISAs
            return ", ".join(parts[:2] + [p for p in parts if p.startswith("instruction sets forced")])
        if isinstance(meta, dict):                              # bench_compact.py, bench_train_step.py
            return f"{meta.get('machine', '?')}, {meta.get('threads', '?')} threads, torch {meta.get('torch', '?')}"
        return str(self.data.get("machine", "?"))               # prune_digits.py: one string


def _run(path: Path, data: dict) -> Run | None:
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    kind = next((k for k in SCRIPT_KINDS if path.name.startswith(k + "_")), meta.get("suite"))
    if kind is None:
        return None
    # bench_compact.py and prune_digits.py run on CPU only and do not record a device
    device = meta.get("device") or machine.get("device") or "cpu"
    date = str(meta.get("date") or machine.get("date") or data.get("date") or "")
    return Run(path, kind, device, date, bool(meta.get("quick") or data.get("quick")), data)


def _machine_key(run: Run) -> str | None:
    """machine.cpu_tag of the machine a CPU run recorded (its cpu model and threads, or bench_compact.py's tag)."""
    for info in (run.data.get("meta"), run.data.get("machine")):
        if isinstance(info, dict) and info.get("cpu_model"):
            return cpu_tag(str(info["cpu_model"]), info.get("threads"))
    meta = run.data.get("meta")
    return meta.get("machine") if isinstance(meta, dict) and isinstance(meta.get("machine"), str) else None


def _when(run: Run) -> datetime | None:
    try:
        return datetime.fromisoformat(run.date[:19])
    except ValueError:
        return None


def _infer_legacy_isa(runs: list[Run]) -> list[Run]:
    """Older CPU results that recorded no instruction set take the CPU class that runs of the same machine (cpu
    model and threads, _machine_key) recorded without forcing one: the one class they agree on, or, where one tag
    names several machines (a VM's "AMD EPYC" was a Zen 3 with AVX2 and later a Zen 5 with AVX-512), the class of
    the recorded run nearest in time."""
    recorded: dict[str | None, list[Run]] = {}
    for run in runs:
        env = [k for info in (run.data.get("meta"), run.data.get("machine")) if isinstance(info, dict)
               for k in info.get("env") or {}]
        if run.device == "cpu" and run.recorded_isa and not any(k in ISA_ENV for k in env):
            recorded.setdefault(_machine_key(run), []).append(run)
    recorded.pop(None, None)
    out = []
    for run in runs:
        found = recorded.get(_machine_key(run), [])
        classes = {r.recorded_isa for r in found}
        if run.device == "cpu" and run.recorded_isa is None and classes:
            when = _when(run)
            if len(classes) == 1:
                run = replace(run, inferred_isa=next(iter(classes)))
            elif when is not None and any(_when(r) for r in found):
                nearest = min((r for r in found if _when(r)), key=lambda r: abs((_when(r) - when).total_seconds()))
                run = replace(run, inferred_isa=nearest.recorded_isa)
        out.append(run)
    return out


class Results:
    """Every result file of a directory, loaded once."""

    def __init__(self, directory: str | Path):
        self.runs: list[Run] = []
        for path in sorted(Path(directory).glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            run = _run(path, data) if isinstance(data, dict) else None
            if run is not None:
                self.runs.append(run)
        self.runs = _infer_legacy_isa(self.runs)

    def newest(self, kind: str, device: str, has: Callable[[Run], bool] = lambda run: True,
               isa_class: str | None = None) -> Run | None:
        """The newest ``kind`` file on ``device`` for which ``has`` holds, a full sweep before a quick one (the
        order of report.find_results, which returns the newest file whatever it holds). ``isa_class``: only runs
        of that CPU class (Run.isa_class; the per-class tables); None: native runs first, any class else (the
        targets with one table: the machine line then names the class)."""
        found = [r for r in self.runs if r.kind == kind and r.device == device and has(r)
                 and (isa_class is None or r.isa_class == isa_class)]
        return max(found, key=lambda r: (r.isa_class == "native", not r.quick, r.date), default=None)


# --------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Measured:
    value: str
    status: str
    sources: tuple[Run, ...] = ()


NOT_YET = Measured("-", NOT_MEASURED)


@dataclass(frozen=True)
class Target:
    issue: str
    device: str        # "cpu" | "cpu-avx2" | "cuda": the table it goes in
    text: str
    measure: Callable[[Results], Measured]


def _verdict(values: list[float], threshold: float | None, at_most: bool = False) -> str:
    if threshold is None:
        return REPORTED
    return MET if all((v <= threshold) if at_most else (v >= threshold) for v in values) else NOT_MET


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _span(values: list[float], fmt: Callable[[float], str] = _x) -> str:
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


# ------------------------------------------------------------------------------------- kernel sweeps
@dataclass(frozen=True)
class Points:
    """The kernel-sweep rows a target reads: per shape, the rows at the shape's M of one dtype, of some
    patterns (e.g. "bsr32x32", "csr", "nm2:4") and target sparsities (None: all measured ones)."""

    device: str
    shapes: tuple[str, ...]                     # every one must be in the file ('prefix*' allowed)
    patterns: tuple[str, ...]
    sparsities: tuple[float, ...] | None = None
    dtype: str = "float32"
    m: int | None = None                        # the sweep's --m (conv: the batch); None: the shape's default
    candidate: str | None = "sparsekit_cpu"     # None: the fastest sparsekit_* candidate of each point
    extra: tuple[str, ...] = ()                 # shapes also reported where the file has them
    isa_class: str = "native"                   # the CPU class of the runs read (Run.isa_class)
    config: Callable[[dict], bool] = field(default=lambda cfg: True, compare=False)   # on meta.config

    def m_of(self, shape: str) -> int:
        return get_shapes([shape])[0].gemm(self.device, self.m)[0]

    def rows(self, run: Run, shape: str) -> list[dict]:
        """The rows of ``run`` at one shape, every candidate, any status."""
        m, wanted = self.m_of(shape), None if self.sparsities is None else {round(s, 4) for s in self.sparsities}
        return [r for r in run.rows if r.get("shape") == shape and r.get("M") == m and r.get("dtype") == self.dtype
                and r.get("pattern") in self.patterns
                and (wanted is None or round(r.get("target_sparsity", -1.0), 4) in wanted)]


def _is(row: dict, candidate: str | None) -> bool:
    # any sparsekit kernel, not the reference path (a densified weight through torch's dense product)
    if candidate:
        return row.get("candidate") == candidate
    name = str(row.get("candidate"))
    return name.startswith("sparsekit_") and name != "sparsekit_reference"


def _best(rows: list[dict], candidate: str | None) -> dict | None:
    """The fastest ok row of ``candidate`` (None: of any sparsekit_* candidate)."""
    ok = [r for r in rows if _is(r, candidate) and r.get("status") == "ok" and r.get("speedup")]
    return max(ok, key=lambda r: r["speedup"], default=None)


def _by_point(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    out: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        out.setdefault((r["pattern"], round(r["target_sparsity"], 4)), []).append(r)
    return out


def kernel_rows(res: Results, pts: Points, need: tuple[str, ...] = ()) -> tuple[Run | None, dict[str, list[dict]]]:
    """The newest sweep on ``pts.device`` with rows of ``pts.candidate`` (and of every candidate in ``need``) at
    each of ``pts.shapes`` (at one or more ``pts.extra`` shapes if ``pts.shapes`` is empty), and its rows per
    shape, the extra shapes it has included."""
    required = [s.name for s in get_shapes(pts.shapes)]
    extra = [s.name for s in get_shapes(pts.extra) if s.name not in required]

    def present(run: Run, shape: str) -> bool:
        rows = pts.rows(run, shape)
        return all(any(_is(r, c) for r in rows) for c in (pts.candidate, *need))

    def has(run: Run) -> bool:
        found = [s for s in required + extra if present(run, s)]
        return pts.config(run.config) and all(s in found for s in required) and bool(found)

    run = res.newest("kernels", pts.device, has, pts.isa_class)
    if run is None:
        return None, {}
    return run, {s: pts.rows(run, s) for s in required + extra if present(run, s)}


def _speedups(pts: Points, picked: dict[str, dict | None]) -> str:
    """One speedup per shape, 'a / b' in the order of the target text, each with the candidate when the target
    takes the fastest sparsekit_* one and with the shape when the file has shapes beyond the required ones; with
    more than three shapes, the lowest and the highest."""
    named, label = pts.candidate is None, any(s not in pts.shapes for s in picked)

    def one(shape: str, r: dict | None) -> str:
        notes = ([r["candidate"]] if named and r else []) + ([shape] if label else [])
        return ("failed" if r is None else _x(r["speedup"])) + (f" ({', '.join(notes)})" if notes else "")

    if len(picked) <= 3:
        return " / ".join(one(s, r) for s, r in picked.items())
    ok = {s: r for s, r in picked.items() if r is not None}
    failed = f", {len(picked) - len(ok)} failed" if len(ok) < len(picked) else ""
    if not ok:
        return f"failed on all {len(picked)} shapes"
    lo, hi = (f(ok, key=lambda s: ok[s]["speedup"]) for f in (min, max))
    if _x(ok[lo]["speedup"]) == _x(ok[hi]["speedup"]):
        return f"{_x(ok[lo]['speedup'])} on each of {len(picked)} shapes{failed}"
    return f"{one(lo, ok[lo])} to {one(hi, ok[hi])} over {len(picked)} shapes{failed}"


def speedup_at(pts: Points, threshold: float | None) -> Callable[[Results], Measured]:
    """Speedup over dense eager at one (pattern, sparsity) per shape; met if every shape reaches ``threshold``."""
    def measure(res: Results) -> Measured:
        run, groups = kernel_rows(res, pts)
        if run is None:
            return NOT_YET
        picked = {s: _best(rows, pts.candidate) for s, rows in groups.items()}
        values = [r["speedup"] for r in picked.values() if r is not None]
        status = _verdict(values, threshold) if len(values) == len(picked) else NOT_MET
        return Measured(_speedups(pts, picked) + _vs_fastest_dense(picked), status, (run,))
    return measure


def _vs_fastest_dense(picked: dict[str, dict | None]) -> str:
    """'; vs the fastest dense variant a / b' where a dense variant (torch.compile, channels_last, oneDNN prepacked)
    beat eager by more than 5% on some shape (the target itself is against eager, as the issues state it)."""
    rows = [r for r in picked.values() if r is not None]
    best = [r.get("speedup_vs_best_dense") for r in rows]
    if not rows or len(rows) > 3 or None in best or all(b >= 0.95 * r["speedup"] for b, r in zip(best, rows)):
        return ""
    return "; vs the fastest dense variant " + " / ".join(_x(b) for b in best)


def break_even_at_most(pts: Points, threshold: float) -> Callable[[Results], Measured]:
    """The sparsity where the speedup crosses 1 (report.break_even over the actual sparsities), per shape; met
    if it is at or below ``threshold`` on every shape."""
    def measure(res: Results) -> Measured:
        run, groups = kernel_rows(res, pts)
        if run is None:
            return NOT_YET
        found = {s: break_even([(r["sparsity"], r["speedup"]) for r in rows if _is(r, pts.candidate)
                                and r.get("status") == "ok" and r.get("speedup")]) for s, rows in groups.items()}
        # "below": already faster at the lowest sparsity measured, which must itself be at or below the threshold
        met = all(be.kind in ("below", "interpolated") and be.value <= threshold for be in found.values())
        return Measured(" / ".join(str(be) for be in found.values()), MET if met else NOT_MET, (run,))
    return measure


def faster_than(pts: Points, other: str, threshold: float, min_sparsity: float = 0.0
                ) -> Callable[[Results], Measured]:
    """``other`` ms / sparsekit ms at every point (shape, pattern, sparsity >= min_sparsity) where both ran:
    the range over the points; met if its minimum reaches ``threshold`` and sparsekit ran wherever ``other``
    did (a point ``other`` could not run is left out)."""
    def measure(res: Results) -> Measured:
        run, groups = kernel_rows(res, pts, need=(other,))
        if run is None:
            return NOT_YET
        ratios, skipped, failed = [], 0, 0
        for rows in groups.values():
            for (_, s), point in _by_point(rows).items():
                if s < min_sparsity:
                    continue
                mine, theirs = _best(point, pts.candidate), _best(point, other)
                if theirs is None:
                    skipped += 1
                elif mine is None:
                    failed += 1
                else:
                    ratios.append(theirs["ms"] / mine["ms"])
        if not ratios:
            return Measured(f"no point where both ran ({skipped + failed} tried)", NOT_MET, (run,))
        text = f"{_span(ratios)} ({len(ratios)} point{'s' if len(ratios) > 1 else ''})"
        text += f"; {skipped} where {other} did not run" if skipped else ""
        text += f"; {failed} where sparsekit did not run" if failed else ""
        return Measured(text, NOT_MET if failed else _verdict([min(ratios)], threshold), (run,))
    return measure


def weight_bytes_at_most(pts: Points, threshold_pct: float) -> Callable[[Results], Measured]:
    """The candidate's weight bytes (values + indices) as % of the dense weight's, per shape. A sweep row's
    ``bytes`` is the input and output bytes plus the weight bytes the candidate reads (sweep.make_rows), so the
    sparse weight = dense N*K*itemsize - (dense row's bytes - sparse row's bytes)."""
    def measure(res: Results) -> Measured:
        run, groups = kernel_rows(res, pts, need=("dense",))
        if run is None:
            return NOT_YET
        pcts = []
        for rows in groups.values():
            dense, mine = _best(rows, "dense"), _best(rows, pts.candidate)
            if dense is None or mine is None or dense.get("bytes") is None or mine.get("bytes") is None:
                return Measured("bytes not recorded", NOT_MEASURED, (run,))
            full = dense["N"] * dense["K"] * DTYPES[pts.dtype].itemsize
            pcts.append(100.0 * (full - (dense["bytes"] - mine["bytes"])) / full)
        return Measured(" / ".join(f"{p:.1f}%" for p in pcts), _verdict(pcts, threshold_pct, at_most=True), (run,))
    return measure


def with_info(main: Callable[[Results], Measured], info: Callable[[Results], Measured], label: str
              ) -> Callable[[Results], Measured]:
    """``main``'s figures and status, followed by ``info``'s figures (no verdict) where they were measured."""
    def measure(res: Results) -> Measured:
        a, b = main(res), info(res)
        if b.status == NOT_MEASURED:
            return a
        value = f"{b.value} ({label})" if a.status == NOT_MEASURED else f"{a.value}; {label}: {b.value}"
        return Measured(value, a.status, a.sources + tuple(s for s in b.sources if s not in a.sources))
    return measure


# ----------------------------------------------------------------------------- whole models and pruning
def _model_row(res: Results, device: str, dtype: str, model: str, isa_class: str | None = None
               ) -> tuple[Run | None, dict | None]:
    """The newest bench_sparsify_models.py row of ``model`` (a prefix of its name) in ``dtype`` on ``device``, of
    one CPU class (files written before rows carried a dtype are float32, the script's default)."""
    def rows(run: Run) -> list[dict]:
        return [r for r in run.rows if str(r.get("model", "")).startswith(model)
                and r.get("dtype", "float32") == dtype]

    run = res.newest("sparsify_models", device, lambda r: bool(rows(r)), isa_class)
    return (run, rows(run)[0]) if run else (None, None)


def model_figure(device: str, dtype: str, model: str, key: str, threshold: float | None,
                 fmt: Callable[[dict], str], at_most: bool = False, isa_class: str | None = None
                 ) -> Callable[[Results], Measured]:
    """One figure (``key``) of a bench_sparsify_models.py row, shown with ``fmt``. For key "speedup", a row
    measured with --compile also shows the compiled pair, and the verdict needs both the eager speedup and the
    best sparse variant over the best dense one (eager or compiled) to reach the threshold."""
    def measure(res: Results) -> Measured:
        run, row = _model_row(res, device, dtype, model, isa_class)
        if row is None:
            return NOT_YET
        values, text = [row[key]], fmt(row)
        if key == "speedup" and "speedup_best" in row:
            values.append(row["speedup_best"])
            if "speedup_compiled" in row:
                text += (f"; under torch.compile {row['dense_compile_ms']:.0f} -> {row['sparse_compile_ms']:.0f} ms "
                         f"({_x(row['speedup_compiled'])})")
            if "speedup_vs_onednn" in row:
                text += f"; vs the dense Linears on oneDNN, prepacked, {_x(row['speedup_vs_onednn'])}"
            text += f", best sparse vs best dense {_x(row['speedup_best'])}"
        if row.get("verify_error"):     # (the script still times a model whose outputs are off: not a result)
            return Measured(f"{text}; outputs differ from the dense model: {row['verify_error']}", NOT_MET, (run,))
        return Measured(text, _verdict(values, threshold, at_most), (run,))
    return measure


def models_reported(device: str, dtype: str, models: tuple[str, ...], isa_class: str | None = None
                    ) -> Callable[[Results], Measured]:
    """The end-to-end speedups of several bench_sparsify_models.py models, without a verdict."""
    def measure(res: Results) -> Measured:
        found = [(m, *_model_row(res, device, dtype, m, isa_class)) for m in models]
        found = [(m, run, row) for m, run, row in found if row is not None]
        if not found:
            return NOT_YET
        sources = tuple(dict.fromkeys(run for _, run, _ in found))
        def text(m: str, row: dict) -> str:
            labels = {"speedup_compiled": "compiled", "speedup_vs_onednn": "vs oneDNN-prepacked dense",
                      "speedup_best": "best sparse vs best dense"}
            extra = [f"{label} {_x(row[k])}" for k, label in labels.items() if k in row]
            return f"{m} {_x(row['speedup'])}" + (f" ({', '.join(extra)})" if extra else "")
        return Measured(", ".join(text(m, row) for m, _, row in found), REPORTED, sources)
    return measure


def memory_peak(res: Results) -> Measured:
    """bench_memory.py: peak RSS over the import baseline of a fresh process loading the saved BERT-base encoder
    (12 layers: a run with fewer --layers measures a smaller model)."""
    run = res.newest("memory", "cpu", lambda r: bool(r.rows) and r.data.get("layers", 12) == 12)
    if run is None:
        return NOT_YET
    inc = {(r["kind"], r["skeleton"]): (r["end"]["ru_maxrss"] - r["baseline"]["ru_maxrss"]) / 2**20
           for r in run.rows if not r.get("error")}
    sparse = sorted((v, sk) for (kind, sk), v in inc.items() if kind == "sparse")
    dense = [v for (kind, _), v in inc.items() if kind == "dense"]
    if not sparse or not dense:
        return Measured("incomplete run", NOT_MEASURED, (run,))
    text = "sparse " + ", ".join(f"{v:.0f} MB ({sk} skeleton)" for v, sk in sparse) + \
        f" vs dense {_span(dense, lambda v: f'{v:.0f} MB')}"
    return Measured(text, REPORTED, (run,))


def _compact_rows(res: Results, names: tuple[str, ...], net: str = "resnet50", isa_class: str | None = None
                  ) -> tuple[Run | None, dict[str, dict]]:
    """The newest bench_compact.py run on ``net`` (files from before --model existed are ResNet-50 runs), of CPU
    class ``isa_class`` (None: native first, as Results.newest)."""
    run = res.newest("compact", "cpu", lambda r: set(names) <= {x.get("model") for x in r.rows}
                     and r.data.get("meta", {}).get("net", "resnet50") == net, isa_class)
    return (run, {r["model"]: r for r in run.rows}) if run else (None, {})


def compact_reported(net: str, isa_class: str | None = None) -> Callable[[Results], Measured]:
    """bench_compact.py --model ``net``: every variant's speedup over the dense model and its parameters."""
    def measure(res: Results) -> Measured:
        run, rows = _compact_rows(res, ("sk-global",), net, isa_class)
        if run is None:
            return NOT_YET
        order = [m for m in ("sk-global", "tp-global", "sk@tp-global", "sk-layer", "tp-layer") if m in rows]
        return Measured(", ".join(f"{m} {_x(rows[m]['speedup'])} ({rows[m]['params'] / 1e6:.2f}M params)"
                                  for m in order), REPORTED, (run,))
    return measure


def sparse_rnn_reported(sparsity: float, isa_class: str | None = None) -> Callable[[Results], Measured]:
    """bench_sparse_rnn.py: each recurrent model's whole-model speedup at ``sparsity``, 32x32 blocks and (where
    measured) unstructured, without a verdict."""
    def pick(res: Results, granularity: str) -> tuple[Run | None, list[dict]]:
        def rows(run: Run) -> list[dict]:
            return [r for r in run.rows if r.get("granularity") == granularity
                    and abs(r.get("sparsity", 0) - sparsity) < 1e-9]
        run = res.newest("sparse_rnn", "cpu", lambda r: bool(rows(r)), isa_class)
        return run, rows(run) if run is not None else []

    def measure(res: Results) -> Measured:
        block, brows = pick(res, "block")
        elem, erows = pick(res, "element")
        if block is None:
            return NOT_YET
        text = ", ".join(f"{r['model']} {_x(r['speedup'])}" for r in brows)
        if erows:
            text += "; unstructured (CSR): " + ", ".join(f"{r['model']} {_x(r['speedup'])}" for r in erows)
        return Measured(text, REPORTED, tuple(r for r in (block, elem) if r is not None))
    return measure


def compact_speedup(model: str, threshold: float, isa_class: str | None = None) -> Callable[[Results], Measured]:
    """bench_compact.py: the speedup of one compacted model over dense ResNet-50."""
    def measure(res: Results) -> Measured:
        run, rows = _compact_rows(res, (model,), isa_class=isa_class)
        if run is None:
            return NOT_YET
        return Measured(_x(rows[model]["speedup"]), _verdict([rows[model]["speedup"]], threshold), (run,))
    return measure


def compact_vs(ours: str, theirs: str, also: str | None = None, isa_class: str | None = None
               ) -> Callable[[Results], Measured]:
    """bench_compact.py: sparsekit's model ``ours`` at least as fast as Torch-Pruning's ``theirs`` (no margin).
    When the file says both are one architecture (identical per-layer widths) the row gets that note instead
    of a verdict: their difference is run noise. ``also``: one more sparsekit model, shown for context."""
    def measure(res: Results) -> Measured:
        run, rows = _compact_rows(res, (ours, theirs), isa_class=isa_class)
        if run is None:
            return NOT_YET
        a, b = rows[ours], rows[theirs]
        text = f"{_x(a['speedup'])} ({ours}, {a['params'] / 1e6:.2f}M params) vs {_x(b['speedup'])} ({theirs}, " \
               f"{b['params'] / 1e6:.2f}M)"
        if also and also in rows:
            text += f"; {also} {_x(rows[also]['speedup'])}"
        same = [c for c in str(a.get("note", "")).split("; ") if "identical architecture" in c]
        if same:
            return Measured(f"{text}; {same[0]}", "no verdict (one architecture)", (run,))
        return Measured(text, _verdict([a["speedup"]], b["speedup"]), (run,))
    return measure


def lenet_goal(removed_pct: float, max_loss_pt: float) -> Callable[[Results], Measured]:
    """prune_digits.py: LeNet-5, global structured iterative pruning (the first ablation variant, as the
    script's own goal line): parameters removed and test accuracy lost against the dense baseline."""
    def measure(res: Results) -> Measured:
        def goal(run: Run) -> dict | None:
            return next((r for r in run.data.get("ablation", []) if r.get("model") == "lenet5"
                         and r.get("scope") == "global" and r.get("granularity") == "channel"
                         and r.get("steps", 1) > 1), None)

        run = res.newest("prune_digits", "cpu", lambda r: goal(r) is not None)
        if run is None:
            return NOT_YET
        row = goal(run)
        base = next(b["accuracy"] for b in run.data["baselines"] if b["model"] == "lenet5")
        lost = base - row["accuracy"]
        met = row["params_removed"] >= removed_pct and lost <= max_loss_pt
        return Measured(f"{row['params_removed']:.1f}% removed, {-lost:+.2f} pt ({row['criterion']}, "
                        f"{row['steps']} steps)",
                        MET if met else NOT_MET, (run,))
    return measure


# -------------------------------------------------------------------------------------- the declarations
BERT = ("bert-base.mlp_up", "bert-base.mlp_down")
RESNET_1X1 = tuple(n for n in shape_names("conv2d") if n.startswith("resnet50.") and "conv1x1" in n)


def _gpu(shapes: tuple[str, ...], patterns: tuple[str, ...], sparsity: float | None, m: int | None = None,
         **kw) -> Points:
    return Points("cuda", shapes, patterns, None if sparsity is None else (sparsity,), "float16", m, None, **kw)


def cpu_kernel_targets(isa_class: str = "native", table: str = "cpu") -> list[Target]:
    """Issue 3's CPU kernel targets (fp32, BERT-base MLP at M = 512, sparsekit_cpu vs dense eager in the same
    run), read from the sweeps of one CPU class and listed in ``table``."""
    def pts(shapes: tuple[str, ...], pattern: str, sparsity: float | None = None, **kw) -> Points:
        return Points("cpu", shapes, (pattern,), None if sparsity is None else (sparsity,), isa_class=isa_class,
                      **kw)

    def bert(pattern: str, sparsity: float | None = None, **kw) -> Points:
        return pts(BERT, pattern, sparsity, **kw)

    def gemv(single: bool) -> Points:
        return bert("bsr32x32", 0.9, m=1, config=(lambda c: c.get("min_sample_ms") == 0) if single
                    else (lambda c: c.get("min_sample_ms", 1.0) > 0))

    return [Target("3", table, text, measure) for text, measure in [
        ("BSR 32x32, BERT-base MLP up / down (M = 512, fp32): >= 1.0x dense at 50%",
         speedup_at(bert("bsr32x32", 0.5), 1.0)),
        ("... >= 5x at 90%", speedup_at(bert("bsr32x32", 0.9), 5.0)),
        ("... >= 8x at 95%", speedup_at(bert("bsr32x32", 0.95), 8.0)),
        ("... >= 3x faster than torch.sparse BSR (torch_bsr) at every sparsity from 50% (torch ms / sparsekit ms)",
         faster_than(bert("bsr32x32"), "torch_bsr", 3.0, min_sparsity=0.5)),
        ("BSR 16x16 break-even <= 0.70 (up / down)", break_even_at_most(bert("bsr16x16"), 0.70)),
        ("BSR 1x4 break-even <= 0.70 (up / down)", break_even_at_most(bert("bsr1x4"), 0.70)),
        ("CSR >= 2x at 90% (up / down)", speedup_at(bert("csr", 0.9), 2.0)),
        ("CSR break-even <= 0.75 (up / down)", break_even_at_most(bert("csr"), 0.75)),
        ("GEMV (M = 1), BSR 32x32 at 90% >= 8x (up / down; calls repeated within a sample)",
         with_info(speedup_at(gemv(single=False), 8.0), speedup_at(gemv(single=True), None),
                   "single cold calls (`--min-sample-ms 0`), no target")),
        ("ResNet-50 layer3 3x3 conv (256 ch, 14x14, batch 8), BSR 32x32 at 90% >= 3x",
         speedup_at(pts(("resnet50.layer3.conv3x3",), "bsr32x32", 0.9, m=8), 3.0)),
        ("ResNet-50 1x1 convs (layer4 512->2048 and any other measured, batch 8), BSR 32x32 at 90% >= 3x",
         speedup_at(pts(("resnet50.layer4.conv1x1_out",), "bsr32x32", 0.9, m=8, extra=RESNET_1X1), 3.0)),
        ("BSR 32x32 weight at 90% <= 12% of dense bytes (values + indices; up / down)",
         weight_bytes_at_most(bert("bsr32x32", 0.9), 12.0)),
        ("CSR weight at 90% <= 16% of dense bytes (up / down)", weight_bytes_at_most(bert("csr", 0.9), 16.0)),
    ]]


def cpu_model_targets(isa_class: str = "native", table: str = "cpu") -> list[Target]:
    """Issue 8's whole-model CPU targets (bench_sparsify_models.py, fp32) from the runs of one CPU class."""
    def fig(model: str, key: str, threshold: float, fmt: Callable[[dict], str], at_most: bool = False):
        return model_figure("cpu", "float32", model, key, threshold, fmt, at_most, isa_class)

    return [Target("8", table, text, measure) for text, measure in [
        ("BERT-base encoder (12 layers, seq 128, batch 8), 90% 32x32 blocks, end to end >= 3x",
         fig("BERT-base encoder (12 layers)", "speedup", 3.0,
             lambda r: f"{_x(r['speedup'])} ({r['dense_ms']:.0f} -> {r['sparse_ms']:.0f} ms)")),
        ("... its Linear weights <= 15% of dense bytes",
         fig("BERT-base encoder (12 layers)", "linear_weight_bytes_pct", 15.0,
             lambda r: f"{r['linear_weight_bytes_pct']:.1f}%", at_most=True)),
        ("ResNet-50 (batch 8, 224), 50% channels compacted + 80% 32x32 blocks in 3x3 convs >= 2.5x",
         fig("ResNet-50", "speedup", 2.5,
             lambda r: f"{_x(r['speedup'])} (compaction alone {_x(r['compact_only_speedup'])})")),
    ]]


def compact_targets(isa_class: str | None = None, table: str = "cpu") -> list[Target]:
    """Issue 7's compaction targets (bench_compact.py) from the runs of one CPU class (None: native first)."""
    return [
        Target("7", table, "ResNet-50, 50% global channel pruning, compacted, >= 2.3x",
               compact_speedup("sk-global", 2.3, isa_class)),
        Target("7", table, "... at equal parameter count at least as fast as Torch-Pruning, global",
               compact_vs("sk@tp-global", "tp-global", also="sk-global", isa_class=isa_class)),
        Target("7", table, "... layer-wise recipes", compact_vs("sk-layer", "tp-layer", isa_class=isa_class)),
        Target("7", table, "U-Net (batch 2, 128x128), 50% channels compacted through its concatenated skips and "
               "up-convolutions, sparsekit and Torch-Pruning side by side (not a target)",
               compact_reported("unet", isa_class)),
    ]


LARGE_24 = _gpu(("square.4096",), ("nm2:4",), 0.5, extra=("llama-7b.*", "llama3-8b.mlp*"))

TARGETS: list[Target] = [
    *cpu_kernel_targets(),
    # issue 8: whole models on CPU, fp32 (bench_sparsify_models.py, bench_memory.py)
    *cpu_model_targets(),
    Target("8", "cpu", "the same 90% BERT-base pruning on Hugging Face transformers' BertModel (a transformers "
           "config) >= 3x",
           model_figure("cpu", "float32", "Hugging Face BertModel (12 layers)", "speedup", 3.0,
                        lambda r: f"{_x(r['speedup'])} ({r['dense_ms']:.0f} -> {r['sparse_ms']:.0f} ms)")),
    Target("8", "cpu", "the same pruning on a ViT-B/16 of torch's stock modules (nn.MultiheadAttention's packed "
           "q / k / v included, via sk.nn.mha_to_linear; not a target)",
           models_reported("cpu", "float32", ("ViT-B/16",))),
    Target("8", "cpu", "the ResNet-50 recipe on a video model, R3D-18 (3-D convs, 16x112x112 clips, batch 8: 50% "
           "channels compacted + 80% 32x32 blocks in 3x3x3 convs through SparseConv3d; not a target)",
           models_reported("cpu", "float32", ("R3D-18",))),
    Target("8", "cpu", "the ResNet-50 recipe on a segmentation model, U-Net (128x128, batch 2: 50% channels "
           "compacted through its concatenated skips + 80% 32x32 blocks in its 3x3 convs and 2x2 up-convolutions, "
           "through SparseConvTranspose2d; not a target)",
           models_reported("cpu", "float32", ("U-Net",))),
    Target("8", "cpu", "the same two models in bfloat16 (not a target)",
           models_reported("cpu", "bfloat16", ("BERT-base encoder", "ResNet-50"))),
    Target("8", "cpu", "memory: peak RSS of a fresh process loading the saved 90% BSR encoder vs the dense one "
           "(over its import baseline)", memory_peak),
    # issue 7: structured compaction (bench_compact.py)
    *compact_targets(),
    # issue 6: pruning accuracy (prune_digits.py)
    Target("6", "cpu", "LeNet-5 on digits, global structured pruning, iterative: >= 90% of parameters removed, "
           "<= 0.5 pt accuracy lost",
           lenet_goal(90.0, 0.5)),
    # issues 3 and 8 again on issue 3's machine class (AVX2 + FMA): runs whose sparsekit kernels ran at AVX2
    *cpu_kernel_targets("avx2", "cpu-avx2"),
    *cpu_model_targets("avx2", "cpu-avx2"),
    Target("8", "cpu-avx2", "the ResNet-50 recipe on U-Net, as in the table above (not a target)",
           models_reported("cpu", "float32", ("U-Net",), "avx2")),
    *compact_targets("avx2", "cpu-avx2"),
    Target("8", "cpu-avx2", "recurrent models (bench_sparse_rnn.py: a 2-layer LSTM acoustic model, hidden 1024; a "
           "2-layer bidirectional GRU tagger, hidden 512; a 1-layer LSTM, hidden 1024; batch 8, 100 steps): every "
           "recurrent weight matrix 90% pruned, sparsified (LinearRecurrent) vs the stock model's oneDNN kernels "
           "(not a target)", sparse_rnn_reported(0.9, "avx2")),
    # issue 4: GPU BSR, fp16, vs cuBLAS (dense eager) and torch.sparse
    Target("4", "cuda", "BSR 32x32, square M = N = K = 4096, fp16: >= 1.0x cuBLAS at 50%",
           speedup_at(_gpu(("square.4096",), ("bsr32x32",), 0.5), 1.0)),
    Target("4", "cuda", "... >= 6x at 90%", speedup_at(_gpu(("square.4096",), ("bsr32x32",), 0.9), 6.0)),
    Target("4", "cuda", "... block 64x64 >= 7x at 90%", speedup_at(_gpu(("square.4096",), ("bsr64x64",), 0.9), 7.0)),
    Target("4", "cuda", "... >= 1.5x faster than torch.sparse BSR at every (block, sparsity) measured",
           faster_than(_gpu(("square.4096",), ("bsr16x16", "bsr32x32", "bsr64x64", "bsr128x128"), None),
                       "torch_bsr", 1.5)),
    Target("4", "cuda", "decode M = 16, LLaMA-7B 4096x4096 (attn_proj), BSR 32x32 at 90% >= 4x",
           speedup_at(_gpu(("llama-7b.attn_proj",), ("bsr32x32",), 0.9, m=16), 4.0)),
    Target("4, 5", "cuda", "2:4 on the large GEMMs (square 4096, LLaMA-7B, Llama-3-8B MLP; default M) >= 1.3x "
           "cuBLAS (one row for both issues)",
           with_info(speedup_at(LARGE_24, 1.3), speedup_at(replace(LARGE_24, candidate="torch_2:4"), None),
                     "torch_2:4")),
    # issue 5: GPU CSR, fp16
    Target("5", "cuda", "CSR at 90%, square 4096, fp16: >= 2x cuBLAS",
           speedup_at(_gpu(("square.4096",), ("csr",), 0.9), 2.0)),
    Target("5", "cuda", "... >= 3x cuSPARSE (torch_csr)", faster_than(_gpu(("square.4096",), ("csr",), 0.9),
                                                                     "torch_csr", 3.0)),
    Target("5", "cuda", "skinny M = 16, LLaMA-7B / OPT-30B linears, CSR at 80% >= 1.7x cuBLAS",
           speedup_at(_gpu((), ("csr",), 0.8, m=16, extra=("llama-7b.*", "opt-30b.*")), 1.7)),
    # issue 8: whole models on GPU, fp16 (report only)
    Target("8", "cuda", "BERT-base encoder, ResNet-50 and ViT-B/16 as on CPU, fp16 (report only)",
           models_reported("cuda", "float16", ("BERT-base encoder", "ResNet-50", "ViT-B/16"))),
]


# ----------------------------------------------------------------------------------------- rendering
def evaluate(results: Results, targets: list[Target] | None = None) -> list[tuple[Target, Measured]]:
    return [(t, t.measure(results)) for t in (TARGETS if targets is None else targets)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _report(path: Path) -> Path:
    """A result file's markdown report if it has one, else the file itself."""
    md = path.with_suffix(".md")
    return md if md.exists() else path


TABLES = (("cpu", "CPU"), ("cpu-avx2", "CPU, AVX2 class (issue 3's machine class: AVX2 + FMA, no AVX-512)"),
          ("cuda", "GPU"))
HOW_TO_MEASURE = {
    "cpu": "run the benchmarks (bench/README.md)",
    "cpu-avx2": "on an AVX2 machine, or on an AVX-512 one through `bash bench/avx2_class.sh`, run issue 3's sweeps "
                "(bench/README.md)",
    "cuda": "on a GPU machine `bash bench/gpu_session.sh bench-targets bench-models`, copy its results into "
            "bench/results/"}


def targets_block(results_dir: str | Path, link: Callable[[Path], str],
                  targets: list[Target] | None = None) -> str:
    """The markdown between the targets markers: one table per device, then the machines the figures come
    from. ``link(path)`` makes a file path into a link target (relative to the README)."""
    evaluated = evaluate(Results(results_dir), targets)
    lines = ["<!-- generated by bench/make_readme_table.py from bench/targets.py and bench/results; "
             "do not edit by hand -->", ""]
    for device, title in TABLES:
        rows = [(t, m) for t, m in evaluated if t.device == device]
        if not rows:
            continue
        lines += [f"### {title}", "", "| issue | target | measured | status | source |", "|---|---|---|---|---|"]
        for t, m in rows:
            src = ", ".join(f"[{run.path.stem}]({link(_report(run.path))})" for run in m.sources) or "-"
            lines.append(f"| {t.issue} | {_cell(t.text)} | {_cell(m.value)} | {m.status} | {src} |")
        runs = list(dict.fromkeys(run for _, m in rows for run in m.sources))
        if runs:
            dates = sorted(run.date[:10] for run in runs)
            span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
            lines += ["", f"Result files of {span}; the machines as they record them (each file also has the "
                      "versions and load):", ""]
            lines += [f"- {machine}" for machine in dict.fromkeys(run.machine for run in runs)]
        else:
            lines += ["", f"No {title} results in bench/results yet: {HOW_TO_MEASURE[device]}, then "
                      "`python bench/make_readme_table.py`."]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
