"""The kernel sweep: every candidate for an op, side by side, over shapes x dtypes x patterns x sparsities.

For each configuration (shape, dtype, pattern, target sparsity) a weight with exactly that sparsity is made
(``patterns.make_weight``), every candidate is built and run once and checked against the dense output (a
candidate that differs is recorded as ``status="mismatch"``, one that raises as ``"unsupported"``, neither is
timed), then all the good ones are timed in the same interleaved loop after warm-up (``timers``).

Candidates (``kind`` in brackets):

    dense            [dense]     torch eager: F.linear / F.conv2d (MKL/oneDNN on CPU, cuBLAS/cuDNN on CUDA)
    dense_cl         [dense]     conv only: F.conv2d on channels_last tensors
    dense_onednn     [dense]     linear on CPU: oneDNN with the weight prepacked once for this M
                                 (torch.ops.mkldnn._reorder_linear_weight + _linear_pointwise); F.linear runs
                                 MKL, which on AMD CPUs takes its AVX2 path: measured 2.2-2.4x slower in fp32 on a
                                 Zen 5 EPYC (torch.compile with weight freezing did not speed up a dense BERT there)
    dense_compile    [dense]     torch.compile of the same call (dynamic=False), compiled once per shape/dtype
    torch_bsr        [torch]     W.to_sparse_bsr(block); y = (W_bsr @ x.T).T  (torch.sparse.mm; on CPU this is
                                 ~2x faster than F.linear with a sparse weight); linear only
    torch_csr        [torch]     W.to_sparse_csr(); same call; linear only
    torch_2:4        [torch]     torch.sparse.to_sparse_semi_structured(W) + F.linear; CUDA, pattern 2:4 only
    sparsekit_<b>    [sparsekit] the op face (bsr_linear/csr_linear/nm_linear/sparse_conv2d) with backend=<b>,
                                 for every backend in sparsekit.ops.BACKENDS that ``all_reasons`` allows here
                                 ("reference" only with include_reference: it is densify + matmul). This
                                 includes sparsekit_cusparselt (2:4 NM, fp16/bf16, CUDA sm80+): the same torch
                                 kernels as torch_2:4, compressed from the NM weight, through sparsekit's face
                                 (its one-time compression happens in the correctness check, before timing);
                                 where it cannot run, the notes say why
    sparsekit_cuda_noskinny      csr on CUDA, fp16/bf16, M <= 64 only: the cuda backend with its skinny
                     [sparsekit] tensor-core path switched off (SPARSEKIT_CSR_SKINNY=0 around each call: the
                                 generic CSR kernels), so one run times csr_mm with and without it
    sparsekit_cpu_bitmap         csr on a CPU, M <= 8 only: the cpu backend on the same CSR carrying its
                     [sparsekit] pattern's bitmap (CSR.with_bitmap(): csr_bitmap_mm expands rows by the bitmap
                                 instead of gathering x); its bytes include the bitmap

Every row carries ``speedup`` = dense_ms / ms (dense = torch eager), ``speedup_vs_best_dense`` (best of the dense
kinds), ``ideal`` = 1 / (1 - sparsity), ``pct_ideal`` = 100 * speedup / ideal, and roofline figures against
this run's measured peaks (``machine.measure_peaks``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .machine import machine_info, machine_slug, measure_peaks, restore_tf32, set_tf32
from .patterns import PATTERN_KINDS, Pattern, make_weight, patterns_for, to_format
from .progress import Progress
from .report import SCHEMA
from .shapes import QUICK_CONV, QUICK_LINEAR, ConvShape, LinearShape, get_shapes, shape_names
from .timers import CUDA_TIMERS, TIMERS, time_candidates

__all__ = ["SweepConfig", "DTYPES", "DEFAULT_SPARSITIES", "DEFAULT_BLOCKS", "QUICK_SPARSITIES", "QUICK_BLOCKS",
           "ROW_FIELDS", "Candidate", "check_output", "measure", "run_kernel_sweep", "save_results",
           "results_stem", "new_results", "with_env", "csr_skinny_off_candidates", "mark_interrupted"]

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
DEFAULT_BLOCKS = ((1, 4), (16, 16), (32, 32), (64, 64))
QUICK_SPARSITIES = (0.5, 0.9, 0.95)
QUICK_BLOCKS = ((32, 32),)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
OPS = ("linear", "conv2d")
# max |y - y_dense| / max |y_dense| allowed: accumulation order differs between kernels, nothing else may
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_TOLERANCE = 1e-2

ROW_FIELDS = ("suite", "device", "op", "shape", "M", "N", "K", "geometry", "dtype", "pattern", "format", "block", "nm",
              "target_sparsity", "sparsity", "candidate", "kind", "status", "ms", "noise_pct", "dense_ms",
              "dense_noise_pct", "best_dense_ms", "speedup", "speedup_vs_best_dense", "ideal", "pct_ideal",
              "rel_err", "reps", "flops", "bytes", "gflops_per_s", "pct_peak_flops", "gb_per_s", "pct_peak_bw",
              "note")


def _tuple(name: str, v: object) -> tuple:
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)):
        raise TypeError(f"{name} must be a tuple or list, got {type(v).__name__} {v!r}")
    if not v:
        raise ValueError(f"{name} must not be empty")
    return tuple(v)


@dataclass
class SweepConfig:
    """What to sweep and how to time it. ``validate()`` (called by the sweeps) names any bad field."""

    device: str = "cpu"
    ops: tuple[str, ...] = OPS
    shapes: tuple[str | LinearShape | ConvShape, ...] | None = None   # names from shapes.py or shape objects;
    #                                                   None = all (quick: a small set)
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    formats: tuple[str, ...] = PATTERN_KINDS
    blocks: tuple[tuple[int, int], ...] = DEFAULT_BLOCKS
    dtypes: tuple[str, ...] = ("float32",)
    m: int | None = None                             # rows (linear) / batch (conv) instead of the shape's default
    compile: bool = True
    compile_mode: str = "default"
    torch_sparse: bool = True
    include_reference: bool = False
    timer: str = "auto"
    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 30
    budget_s: float = 1.0                            # timing budget per configuration (all candidates)
    min_sample_ms: float = 1.0                       # CPU: shorter calls repeated back-to-back per sample
    tf32: bool = False
    peaks: bool = True
    seed: int = 0
    quick: bool = False
    progress: bool = True
    models: tuple[str, ...] | None = None            # model sweep only
    argv: list[str] = field(default_factory=list)    # the command line, recorded with the results

    @classmethod
    def quick_defaults(cls, **overrides: object) -> SweepConfig:
        """The --quick sweep: few shapes, sparsities {0.5, 0.9, 0.95}, BSR 32x32 + CSR, few reps."""
        base = {"sparsities": QUICK_SPARSITIES, "blocks": QUICK_BLOCKS, "formats": ("bsr", "csr"), "warmup": 2,
                "min_reps": 5, "max_reps": 25, "budget_s": 0.5, "quick": True}
        return cls(**{**base, **overrides})

    def validate(self) -> SweepConfig:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device='cuda' but CUDA is not available ({why}, torch {torch.__version__}); "
                             "use device='cpu'")
        for name in ("ops", "sparsities", "formats", "blocks", "dtypes"):
            setattr(self, name, _tuple(name, getattr(self, name)))
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"ops: expected a subset of {OPS}, got {op!r}")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise ValueError(f"sparsities: each must be a number in [0, 1), got {s!r}")
        self.sparsities = tuple(sorted({float(s) for s in self.sparsities}))
        for f in self.formats:
            if f not in PATTERN_KINDS:
                raise ValueError(f"formats: expected a subset of {PATTERN_KINDS}, got {f!r}")
        for b in self.blocks:
            if (not isinstance(b, (tuple, list)) or len(b) != 2
                    or not all(isinstance(i, int) and 1 <= i <= 128 for i in b)):
                raise ValueError(f"blocks: each must be a pair (rows, cols) with sides in [1, 128], got {b!r}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"dtypes: expected a subset of {sorted(DTYPES)}, got {d!r}")
        if self.shapes is not None:
            self.shapes = _tuple("shapes", self.shapes)
            get_shapes([s for s in self.shapes if isinstance(s, str)])   # raises naming an unknown shape
            for s in self.shapes:
                if not isinstance(s, (str, LinearShape, ConvShape)):
                    raise TypeError(f"shapes: each must be a shape name, LinearShape or ConvShape, got "
                                    f"{type(s).__name__} {s!r}")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ValueError(f"m must be a positive int or None, got {self.m!r}")
        if self.timer not in TIMERS:
            raise ValueError(f"timer must be one of {TIMERS}, got {self.timer!r}")
        if self.tf32 and self.device != "cuda":   # (it would only flip CUDA flags and label the results "TF32 on")
            raise ValueError(f"tf32 applies to CUDA fp32 products only, got tf32=True with device={self.device!r}")
        if self.timer in CUDA_TIMERS and self.device != "cuda":   # else the sweep fails at its first timing
            raise ValueError(f"timer={self.timer!r} times on a CUDA device and needs device='cuda', got "
                             f"device={self.device!r}; use timer='auto' or 'interleaved' on the CPU")
        if not (isinstance(self.min_reps, int) and isinstance(self.max_reps, int) and 1 <= self.min_reps
                <= self.max_reps):
            raise ValueError(f"reps: need 1 <= min_reps <= max_reps, got min_reps={self.min_reps!r}, "
                             f"max_reps={self.max_reps!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float)) \
                or not math.isfinite(self.budget_s) or self.budget_s <= 0:
            raise ValueError(f"budget_s must be > 0 seconds, got {self.budget_s!r}")
        if isinstance(self.min_sample_ms, bool) or not isinstance(self.min_sample_ms, (int, float)) \
                or not math.isfinite(self.min_sample_ms) or self.min_sample_ms < 0:
            raise ValueError(f"min_sample_ms must be a finite number >= 0, got {self.min_sample_ms!r}")
        return self

    def selected_shapes(self, op: str) -> list[LinearShape | ConvShape]:
        """The shapes of one op this sweep covers (a name list may mix linear and conv shapes)."""
        if self.shapes is None:
            names = (QUICK_LINEAR if op == "linear" else QUICK_CONV) if self.quick \
                else tuple(shape_names(op, self.device))
            return get_shapes(names)
        out: list[LinearShape | ConvShape] = []
        for item in self.shapes:
            out += [s for s in (get_shapes([item]) if isinstance(item, str) else [item])
                    if s.op == op and s not in out]
        return out


# ------------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One way of computing the op: ``fn()`` returns the output; timed only if it matches the dense output."""

    name: str
    kind: str                     # "dense" | "torch" | "sparsekit"
    fn: Callable[[], Tensor]
    nbytes: int | None = None     # weight bytes this candidate reads (format values + indices), for the roofline
    note: str = ""


def _dense_linear(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w)


def _dense_conv(x: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    return F.conv2d(x, w, None, stride, padding)


def compile_dense(fn: Callable, mode: str) -> Callable:
    """torch.compile(fn, dynamic=False) after a dynamo reset (compiled once per shape/dtype, reused across
    sparsities, so no sweep ever reaches dynamo's recompile limit and silently falls back to eager)."""
    import torch._dynamo

    torch._dynamo.reset()          # one compiled graph per shape/dtype; never hit the recompile limit
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)


def _semi_structured_nbytes(ws: Tensor) -> int | None:
    """Bytes of a torch semi-structured (2:4) weight: its packed values and metadata (for the roofline)."""
    parts = [getattr(ws, name, None) for name in ("packed", "meta")]     # (cuSPARSELt packs both in `packed`)
    nbytes = sum(p.numel() * p.element_size() for p in parts if isinstance(p, Tensor))
    return nbytes or None


def _sparse_nbytes(t: Tensor) -> int | None:
    if t.layout in (torch.sparse_bsr, torch.sparse_csr):
        return sum(a.numel() * a.element_size() for a in (t.values(), t.crow_indices(), t.col_indices()))
    return None


def note_unusable(notes: dict[str, str], backend: str, family: str, label: str, reasons: list[str]) -> None:
    """Record once per backend/family why it was not run; a different reason (e.g. for another block) is added."""
    key, text = f"sparsekit_{backend}/{family}", "; ".join(reasons)
    old = notes.get(key)
    if old is None:
        notes[key] = f"not usable here ({label}): {text}"
    elif text not in old:
        notes[key] = f"{old} | ({label}): {text}"


def _sparsekit_candidates(family: str, x_probe: Tensor, fmt, run: Callable[[str], Tensor],
                          include_reference: bool, notes: dict[str, str], label: str = "") -> list[Candidate]:
    from ..ops import all_reasons

    out = []
    for name, reasons in all_reasons(family, x_probe, fmt).items():
        if name == "reference" and not include_reference:
            continue
        if reasons:
            note_unusable(notes, name, family, label or family, reasons)
            continue
        out.append(Candidate(f"sparsekit_{name}", "sparsekit", lambda b=name: run(b), fmt.nbytes))
    return out


def _onednn_candidates(device: str, w: Tensor, x: Tensor, m: int, notes: dict[str, str]) -> list[Candidate]:
    """dense_onednn (CPU linear): oneDNN's linear with ``w`` prepacked for ``m`` rows, where torch has it."""
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return []
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:   # (a torch without it, a dtype it lacks)
        notes.setdefault(f"dense_onednn/{w.dtype}", f"oneDNN prepacked linear unavailable: {str(exc)[:120]}")
        return []
    return [Candidate("dense_onednn", "dense", lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                                          [], ""))]


def _torch_sparse_candidates(pattern: Pattern, w: Tensor, x: Tensor, device: str,
                             notes: dict[str, str]) -> list[Candidate]:
    out = []
    if pattern.kind in ("bsr", "csr"):
        name = f"torch_{pattern.kind}"
        try:
            with warnings.catch_warnings():   # "Sparse BSR tensor support is in beta state"
                warnings.filterwarnings("ignore", message=".*is in beta state.*")
                wt = w.to_sparse_bsr(pattern.block) if pattern.kind == "bsr" else w.to_sparse_csr()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            return [Candidate(name, "torch", _raiser(exc))]
        out.append(Candidate(name, "torch", lambda: (wt @ x.t()).t(), _sparse_nbytes(wt)))
    elif pattern.kind == "nm":
        if device != "cuda":
            notes.setdefault("torch_2:4", "torch semi-structured sparsity (to_sparse_semi_structured) needs CUDA")
        elif (pattern.n, pattern.m) != (2, 4):
            notes.setdefault("torch_2:4", "torch semi-structured sparsity exists for the 2:4 pattern only")
        else:
            try:
                from torch.sparse import to_sparse_semi_structured

                ws = to_sparse_semi_structured(w)
            except Exception as exc:   # unsupported dtype / shape / GPU: recorded, not fatal
                return [Candidate("torch_2:4", "torch", _raiser(exc))]
            out.append(Candidate("torch_2:4", "torch", lambda: F.linear(x, ws), _semi_structured_nbytes(ws)))
    return out


CSR_SKINNY_ENV = "SPARSEKIT_CSR_SKINNY"   # read by csrc/cuda on every csr_mm call (selfcheck.cuh: path_mode)
CSR_SKINNY_MAX_M = 64                    # csr_skinny.cu's kMaxM: larger M never takes the skinny path


def with_env(fn: Callable[[], Tensor], name: str, value: str) -> Callable[[], Tensor]:
    """``fn`` run with the environment variable ``name`` set to ``value``, its old value (or absence) restored
    after, also when fn raises. For switches the C++ kernels read per call."""
    def run() -> Tensor:
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run


def csr_skinny_off_candidates(family: str, device: str, m: int, dtype: torch.dtype,
                              cands: list[Candidate]) -> list[Candidate]:
    """Where csr_mm may take the skinny tensor-core path (CUDA, fp16/bf16, M <= 64), the cuda candidate again
    with the path switched off, so the same run times both; nothing elsewhere."""
    if family != "csr" or device != "cuda" or m > CSR_SKINNY_MAX_M or dtype not in (torch.float16, torch.bfloat16):
        return []
    return [Candidate("sparsekit_cuda_noskinny", "sparsekit", with_env(c.fn, CSR_SKINNY_ENV, "0"), c.nbytes,
                      note=f"{CSR_SKINNY_ENV}=0: generic CSR kernels") for c in cands if c.name == "sparsekit_cuda"]


def csr_bitmap_candidates(family: str, device: str, m: int, fmt, x: Tensor, cands: list[Candidate]
                          ) -> list[Candidate]:
    """For a CSR product of at most 8 rows on a CPU, the cpu candidate again with the pattern's bitmap attached
    (CSR.with_bitmap: sparsekit::csr_bitmap_mm expands rows instead of gathering x), so one run times both."""
    from ..ops import csr_linear
    from ..sparsify import BITMAP_MAX_ROWS

    if family != "csr" or device != "cpu" or m > BITMAP_MAX_ROWS or not any(c.name == "sparsekit_cpu" for c in cands):
        return []
    fmt_bm = fmt.with_bitmap()
    return [Candidate("sparsekit_cpu_bitmap", "sparsekit", lambda: csr_linear(x, fmt_bm, None, backend="cpu"),
                      fmt_bm.nbytes, note="CSR.bitmap: rows expanded by the pattern's bitmap")]


def _raiser(exc: BaseException) -> Callable[[], Tensor]:
    def fn() -> Tensor:
        raise exc
    return fn


# ----------------------------------------------------------------------------------------- measuring
def check_output(y: Tensor, ref: Tensor, tol: float) -> tuple[bool, float]:
    """(ok, max |y - ref| / max |ref|): the correctness guard every candidate passes before it is timed."""
    if tuple(y.shape) != tuple(ref.shape):
        return False, math.inf
    y32, r32 = y.detach().double(), ref.detach().double()
    scale = max(float(r32.abs().max()) if r32.numel() else 0.0, 1e-12)
    err = float((y32 - r32).abs().max()) / scale if r32.numel() else 0.0
    if not math.isfinite(err):
        return False, math.inf
    return err <= tol, err


def measure(candidates: list[Candidate], tol: float, device: str, cfg: SweepConfig
            ) -> tuple[dict[str, dict], int]:
    """Check each candidate against the first (the dense reference), then time the good ones interleaved.

    Returns ({name: {"status", "ms", "noise_pct", "rel_err", "note"}}, reps).
    """
    res: dict[str, dict] = {}
    fns: dict[str, Callable[[], object]] = {}
    ref: Tensor | None = None
    with torch.no_grad():
        for c in candidates:
            try:
                y = c.fn()
            except Exception as exc:   # a candidate that cannot run is a result, not a crash
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                res[c.name] = {"status": "unsupported", "ms": None, "rel_err": None, "note": msg[:300]}
                continue
            if ref is None:
                ref = y
                ok, err = True, 0.0
            else:
                ok, err = check_output(y, ref, tol)
            res[c.name] = {"status": "ok" if ok else "mismatch", "ms": None, "rel_err": err,
                           "note": c.note if ok else f"output differs from dense: max rel err {err:.3g} > {tol:g}"}
            if ok:
                fns[c.name] = c.fn
            del y
    timed, noise, reps = time_candidates(fns, device=device, timer=cfg.timer, warmup=cfg.warmup,
                                         min_reps=cfg.min_reps, max_reps=cfg.max_reps, budget_s=cfg.budget_s,
                                         min_sample_ms=cfg.min_sample_ms)
    for name, ms in timed.items():
        res[name]["ms"] = ms
        res[name]["noise_pct"] = noise.get(name)
    return res, reps


def make_rows(base: dict, candidates: list[Candidate], res: dict[str, dict], reps: int, flops_dense: float | None,
              io_bytes: int, dense_bytes: int, peak: dict | None) -> list[dict]:
    dense_ms = res.get("dense", {}).get("ms")
    dense_like = [res[c.name]["ms"] for c in candidates if c.kind == "dense" and res[c.name]["ms"]]
    best_dense = min(dense_like) if dense_like else None
    s = base["sparsity"]
    ideal = 1.0 / (1.0 - s) if s < 1 else math.inf
    rows = []
    for c in candidates:
        r = res[c.name]
        ms = r["ms"]
        sparse = c.kind != "dense"
        if flops_dense is None:          # whole models: no roofline
            flops, nbytes = None, None
        else:
            flops = flops_dense * (1.0 - s) if sparse else flops_dense
            nbytes = io_bytes + (c.nbytes if (sparse and c.nbytes is not None) else dense_bytes)
        row = {**base, "candidate": c.name, "kind": c.kind, "status": r["status"], "ms": ms,
               "noise_pct": r.get("noise_pct"), "dense_ms": dense_ms,
               "dense_noise_pct": res.get("dense", {}).get("noise_pct"),
               "best_dense_ms": best_dense, "speedup": None, "speedup_vs_best_dense": None, "ideal": ideal,
               "pct_ideal": None, "rel_err": r["rel_err"], "reps": reps, "flops": flops, "bytes": nbytes,
               "gflops_per_s": None, "pct_peak_flops": None, "gb_per_s": None, "pct_peak_bw": None,
               "note": r["note"]}
        if ms:
            if dense_ms:
                row["speedup"] = dense_ms / ms
                row["pct_ideal"] = 100.0 * row["speedup"] / ideal
            if best_dense:
                row["speedup_vs_best_dense"] = best_dense / ms
            if flops is not None:
                row["gflops_per_s"] = flops / ms / 1e6
                row["gb_per_s"] = nbytes / ms / 1e6
            if peak and flops is not None:
                row["pct_peak_flops"] = 100.0 * flops / (ms / 1e3) / peak["flops"]
                row["pct_peak_bw"] = 100.0 * nbytes / (ms / 1e3) / peak["bytes_per_s"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ the sweep
def _jobs(cfg: SweepConfig, notes: dict[str, str]) -> list[tuple]:
    jobs = []
    for op in cfg.ops:
        for shape in cfg.selected_shapes(op):
            for dtype in cfg.dtypes:
                seen: set[str] = set()
                for kind in cfg.formats:
                    for s in cfg.sparsities:
                        pats = patterns_for(kind, s, shape.k, cfg.blocks)
                        if kind == "nm" and not pats:
                            notes.setdefault(f"nm@{s}/{shape.name}", f"no n:m (m in 4..128 dividing K={shape.k}) "
                                             f"within 0.02 of sparsity {s}; skipped")
                        for p in pats:
                            why = p.reasons(shape.n, shape.k)
                            if why:
                                notes.setdefault(f"{p.name}/{shape.name}",
                                                 f"{p.name} skipped for {shape.name}: {'; '.join(why)}")
                                continue
                            key = f"{p.name}@{p.sparsity(s):.4f}"
                            if key in seen:
                                continue
                            seen.add(key)
                            jobs.append((op, shape, dtype, p, s))
    return jobs


def new_results(suite: str, cfg: SweepConfig) -> dict:
    """The results skeleton (schema, machine, config, peaks) shared by the kernel and model sweeps."""
    meta = machine_info(cfg.device)
    meta.update({"suite": suite, "quick": cfg.quick, "argv": cfg.argv or sys.argv,
                 "config": {k: v for k, v in asdict(cfg).items() if k != "argv"},   # shape objects -> dicts
                 "timing": _timing_text(cfg), "dense_baseline": _dense_text(cfg, suite)})
    peaks: dict[str, dict] = {}
    if cfg.peaks and suite != "model":     # (model rows get no roofline: no FLOP / byte counts per layer)
        for d in cfg.dtypes:
            peaks[d] = measure_peaks(cfg.device, DTYPES[d])
    return {"schema": SCHEMA, "meta": meta, "peaks": peaks, "notes": {}, "rows": []}


def mark_interrupted(results: dict, done: int, total: int, what: str) -> None:
    """Ctrl-C / SIGINT (e.g. `timeout -s INT`) during a sweep: keep the finished configurations, say so in
    meta["interrupted"], and let the caller save them instead of losing the run."""
    results["meta"]["interrupted"] = f"interrupted (SIGINT) after {done} of {total} configurations"
    print(f"{what}: interrupted after {done} of {total} configurations; keeping those", file=sys.stderr, flush=True)


def _timing_text(cfg: SweepConfig) -> str:
    timer = cfg.timer if cfg.timer != "auto" else ("events" if cfg.device == "cuda" else "interleaved")
    repeat = (f"; when the fastest candidate's call is under {cfg.min_sample_ms:g} ms, every candidate's calls are "
              "repeated back-to-back the same number of times per sample, enough for the fastest to fill it (mean "
              "per call; operands cache-resident within a sample, for dense and sparse alike)"
              if cfg.min_sample_ms > 0 else "; single calls (no back-to-back repeats)")
    how = {"interleaved": "time.perf_counter around each sample, candidates round-robin in one loop" + repeat,
           "events": "CUDA events around each call (L2 flushed before each), candidates round-robin in one loop",
           "do_bench": "triton.testing.do_bench, median, per candidate"}[timer]
    if timer == "do_bench":     # time_candidates leaves the reps to do_bench: the rep / budget settings do not apply
        return (f"{how}, with do_bench's own 25 ms warm-up and 100 ms of reps (the warm-up, reps and budget "
                "settings do not apply); no noise_pct")
    return (f"median over {cfg.min_reps}-{cfg.max_reps} reps (as many as fit {cfg.budget_s:g} s per "
            f"configuration) after {cfg.warmup} warm-up rounds; {how}; noise_pct = interquartile range / median")


def _dense_text(cfg: SweepConfig, suite: str = "kernels") -> str:
    lib = "cuBLAS/cuDNN" if cfg.device == "cuda" else "MKL/oneDNN"
    tf32 = "TF32 on" if cfg.tf32 else "TF32 off"
    if suite == "model":
        return (f"the dense model in eager mode (torch's own layers: {lib}, {tf32}); also under torch.compile("
                f"dynamic=False, mode={cfg.compile_mode}); speedup is vs eager, speedup_vs_best_dense vs the faster "
                "of the two")
    onednn = ("; for linear, oneDNN with the weight prepacked (dense_onednn: on AMD CPUs F.linear's MKL takes its "
              "AVX2 path)" if cfg.device == "cpu" else "")
    return (f"torch eager F.linear / F.conv2d ({lib}, {tf32}); also torch.compile(dynamic=False, "
            f"mode={cfg.compile_mode}) and, for conv, channels_last{onednn}; speedup is vs eager, "
            "speedup_vs_best_dense vs the fastest dense variant")


def run_kernel_sweep(cfg: SweepConfig) -> dict:
    """Run the op-level sweep described by ``cfg``; returns the results dict (see ``save_results``)."""
    cfg.validate()
    old_tf32 = set_tf32(cfg.tf32)
    try:
        results = new_results("kernels", cfg)
        notes: dict[str, str] = results["notes"]
        jobs = _jobs(cfg, notes)
        if not jobs:
            why = "; ".join(f"{k}: {v}" for k, v in notes.items())
            raise ValueError(f"nothing to run: every pattern was skipped ({why[:400]})" if notes else
                             f"nothing to run: no shape of ops={cfg.ops} matches shapes={cfg.shapes}")
        state: dict = {}
        with Progress(len(jobs), "sparsekit bench kernels", enabled=cfg.progress) as bar:
            for done, (op, shape, dtype, pattern, s) in enumerate(jobs):
                try:
                    results["rows"] += _run_job(cfg, op, shape, dtype, pattern, s, results["peaks"].get(dtype),
                                                notes, state)
                except KeyboardInterrupt:
                    mark_interrupted(results, done, len(jobs), "sparsekit bench kernels")
                    break
                bar.update(1, desc=f"{shape.name} {dtype} {pattern.name} s={s:g}")
        with contextlib.suppress(OSError):
            results["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        return results
    finally:
        restore_tf32(old_tf32)


def _run_job(cfg: SweepConfig, op: str, shape: LinearShape | ConvShape, dtype_name: str, pattern: Pattern,
             target: float, peak: dict | None, notes: dict[str, str], state: dict) -> list[dict]:
    device, dtype = cfg.device, DTYPES[dtype_name]
    key = (op, shape.name, dtype_name)
    if state.get("key") != key:            # new shape/dtype: new input, new compiled dense
        state.clear()
        state["key"] = key
        gen = torch.Generator().manual_seed(cfg.seed)
        if op == "linear":
            m = shape.m(device, cfg.m)
            state["x"] = torch.randn(m, shape.k, generator=gen).to(device=device, dtype=dtype)
        else:
            b = shape.batch(device, cfg.m)
            state["x"] = torch.randn(b, shape.c_in, shape.hw, shape.hw, generator=gen).to(device=device, dtype=dtype)
            state["x_cl"] = state["x"].contiguous(memory_format=torch.channels_last)
        if cfg.compile:
            state["compiled"] = compile_dense(_dense_linear if op == "linear" else _dense_conv, cfg.compile_mode)
    x: Tensor = state["x"]
    m, n, k = shape.gemm(device, cfg.m)
    w2d = make_weight(n, k, pattern, target, dtype=dtype, device=device, seed=cfg.seed + 1)
    actual = 1.0 - int(torch.count_nonzero(w2d)) / w2d.numel()
    fmt = to_format(w2d, pattern)
    es = w2d.element_size()
    base = {"suite": "kernels", "device": device, "op": op, "shape": shape.name, "M": m, "N": n, "K": k,
            "geometry": shape.describe(device, cfg.m), "dtype": dtype_name, "pattern": pattern.name,
            "format": pattern.family, "block": pattern.block_str,
            "nm": f"{pattern.n}:{pattern.m}" if pattern.kind == "nm" else "", "target_sparsity": target,
            "sparsity": actual}
    from ..ops import bsr_linear, csr_linear, nm_linear, sparse_conv2d

    cands: list[Candidate] = []
    x_probe = torch.empty(1, k, dtype=dtype, device=device)
    if op == "linear":
        cands.append(Candidate("dense", "dense", lambda: F.linear(x, w2d)))
        if cfg.compile:
            compiled = state["compiled"]
            cands.append(Candidate("dense_compile", "dense", lambda: compiled(x, w2d)))
        cands += _onednn_candidates(device, w2d, x, m, notes)
        if cfg.torch_sparse:
            cands += _torch_sparse_candidates(pattern, w2d, x, device, notes)
        face = {"bsr": bsr_linear, "csr": csr_linear, "nm": nm_linear}[pattern.family]
        run = lambda b: face(x, fmt, None, backend=b)
        io_bytes = (m * k + m * n) * es
    else:
        w4 = w2d.reshape(n, shape.c_in, shape.kernel, shape.kernel)
        w4_cl = w4.contiguous(memory_format=torch.channels_last)
        x_cl = state["x_cl"]
        st, pad, ks = shape.stride, shape.padding, shape.kernel
        cands.append(Candidate("dense", "dense", lambda: F.conv2d(x, w4, None, st, pad)))
        cands.append(Candidate("dense_cl", "dense", lambda: F.conv2d(x_cl, w4_cl, None, st, pad)))
        if cfg.compile:
            compiled = state["compiled"]
            cands.append(Candidate("dense_compile", "dense", lambda: compiled(x, w4, st, pad)))
        notes.setdefault("torch_sparse/conv2d", "torch.sparse has no sparse convolution; conv rows compare "
                         "sparsekit against dense only")
        run = lambda b: sparse_conv2d(x, fmt, None, st, pad, kernel_size=(ks, ks), backend=b)
        io_bytes = (x.numel() + m * n) * es
    sk_cands = _sparsekit_candidates(pattern.family, x_probe, fmt, run, cfg.include_reference, notes, pattern.name)
    cands += sk_cands
    if op == "linear":
        cands += csr_skinny_off_candidates(pattern.family, device, m, dtype, sk_cands)
        cands += csr_bitmap_candidates(pattern.family, device, m, fmt, x, sk_cands)
    tol = TF32_TOLERANCE if (dtype == torch.float32 and cfg.tf32 and device == "cuda") else TOLERANCE[dtype]
    res, reps = measure(cands, tol, device, cfg)
    return make_rows(base, cands, res, reps, 2.0 * m * n * k, io_bytes, n * k * es, peak)


# ------------------------------------------------------------------------------------------- saving
def results_stem(results: dict) -> str:
    """'<machine>_<UTC date-time>_<suite>[-quick]': the file name of a result set (no extension)."""
    meta = results["meta"]
    when = _dt.datetime.fromisoformat(meta["date"]).strftime("%Y%m%d-%H%M%S")
    return f"{machine_slug(meta)}_{when}_{meta['suite']}{'-quick' if meta.get('quick') else ''}"


def _csv_value(v: object) -> object:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _finite(obj: object) -> object:
    """JSON has no inf/nan: non-finite floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_results(results: dict, out_dir: str | os.PathLike, plots: bool = True,
                 report: bool = True) -> dict[str, object]:
    """Write <stem>.json (everything), <stem>.csv (rows), <stem>.md (report) and <stem>/ (PNG plots) to out_dir.

    Returns {"json": Path, "csv": Path, "report": Path | None, "plots": [Path, ...], "plot_message": str}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(results)
    results["meta"]["stem"] = stem
    paths: dict[str, object] = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "report": None,
                                "plots": [], "plot_message": ""}
    with open(paths["json"], "w") as f:
        json.dump(_finite(results), f, indent=1, default=str, allow_nan=False)
        f.write("\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in results["rows"]:
            writer.writerow({k: _csv_value(row.get(k)) for k in ROW_FIELDS})
    if plots:
        from .plots import plot_results

        paths["plots"], paths["plot_message"] = plot_results(results, out / stem)
    if report:
        from .report import to_markdown

        paths["report"] = out / f"{stem}.md"
        plotted = bool(paths["plots"]) and (out / stem).is_dir()
        Path(paths["report"]).write_text(to_markdown(results, plots_dir=stem if plotted else None))
    return paths
