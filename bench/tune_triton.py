#!/usr/bin/env python
"""Measure the Triton kernels' launch configs on this GPU and write the table kernels/_configs.py loads.

    python bench/tune_triton.py [--families bsr_mm,nm_mm,bsr_sddmm,channel_mm] [--dtype float16]
                                [--out FILE | --out-dir DIR] [--budget-s S] [--max-candidates N] ...

For every row of the hand-written tables in kernels/_configs.py -- bsr_mm: block rows bn (16-128, square
blocks) x the M buckets; nm_mm (2:4) and channel_mm: the M buckets; bsr_sddmm: the block sizes bn x bk -- it
builds a representative problem (N = K = --size, BSR at --density block density, M at the bucket's upper edge,
--large-m for the last bucket and for bsr_sddmm's reduction), times each candidate config
(kernels/_configs.*_candidates: the table's own choice first) with triton.testing.do_bench, checks its output
against the table config's, and keeps the fastest. The JSON table (validated by _configs.validate_tuned) starts
from the hand-written rows, so rows not measured (out of --budget-s, or not selected) keep them; "measured"
records, per row, the table's and the winner's milliseconds. It is rewritten after every row, so a run stopped
at a time limit leaves what it finished.

The file is written for this GPU's arch major: kernels/tuned_sm<major>0.json by default (--out-dir puts that
name in another directory). The launchers read it from there (shipped with the package), or from the file
$SPARSEKIT_TRITON_CONFIGS names. Commit the file with the run's log: the rows' timings are the evidence.

Runs on a CUDA GPU; on CPU only under TRITON_INTERPRET=1 (--device cpu: the tests' tiny runs, timings
meaningless), with the candidate lists of an sm90 GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the working tree's sparsekit when it is not installed

from sparsekit.kernels import _autotune  # noqa: E402
from sparsekit.kernels import _configs as C  # noqa: E402

# the order rows are measured in: what the targets run first (fp16 BSR 32/64, decode and large M)
DEFAULT_FAMILIES = ("bsr_mm", "nm_mm", "bsr_sddmm", "channel_mm")
BSR_SIDE_ORDER = (32, 64, 16, 128)
clock = time.perf_counter  # the budget's clock (tests replace it)
# the tables hold 16-bit tiles (fp32 launches derive theirs: half the BLOCK_K), so they are measured in 16 bits
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}  # candidate vs the reference config, relative


# ------------------------------------------------------------------------------------------------- rows
def bucket_m(bucket: int, large_m: int) -> int:
    """The M a row of bucket ``bucket`` is measured at: the bucket's upper edge, ``large_m`` for the last."""
    return C.M_BUCKETS[bucket] if bucket < len(C.M_BUCKETS) - 1 else max(large_m, C.M_BUCKETS[-2] + 1)


def sddmm_block(size: int, sides: tuple[int, ...]) -> tuple[int, int] | None:
    """A (bn, bk) with bn * bk == size from ``sides``, square where possible (the table is keyed by the size)."""
    pairs = [(a, b) for a in sides for b in sides if a * b == size]
    return min(pairs, key=lambda p: (abs(p[0] - p[1]), -p[0])) if pairs else None


def rows(families: tuple[str, ...], sides: tuple[int, ...], buckets: tuple[int, ...]) -> list[tuple]:
    """The table rows to measure, in order: ("bsr_mm", bn, bucket), ("nm_mm", bucket), ("channel_mm", bucket),
    ("bsr_sddmm", bn, bk)."""
    out: list[tuple] = []
    for family in families:
        if family == "bsr_mm":
            out += [("bsr_mm", bn, b) for bn in [s for s in BSR_SIDE_ORDER if s in sides] for b in buckets]
        elif family in ("nm_mm", "channel_mm"):
            out += [(family, b) for b in buckets]
        elif family == "bsr_sddmm":
            sizes = sorted({a * b for a in sides for b in sides}, key=lambda v: abs(v - 1024))
            out += [("bsr_sddmm", *sddmm_block(v, sides)) for v in sizes]
        else:
            raise ValueError(f"--families: unknown family {family!r} (known: {', '.join(C.FAMILIES)})")
    return out


# ---------------------------------------------------------------------------------------------- problems
def _bsr(
    n: int, k: int, block: tuple[int, int], density: float, dtype: torch.dtype, device: torch.device, g: torch.Generator
):
    from sparsekit.formats import BSR

    bn, bk = block
    keep = torch.rand(n // bn, k // bk, generator=g) < density
    keep[0, 0] = True
    dense = torch.randn(n, k, generator=g) * keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return BSR.from_dense(dense, block=block).to(device=device, dtype=dtype)


def problem(
    row: tuple, args: argparse.Namespace, dtype: torch.dtype, device: torch.device
) -> tuple[Callable[[object], torch.Tensor], list, object]:
    """(run(config) -> output, candidates, the table's config) for one row."""
    from sparsekit.kernels import k_bsr_mm, k_bsr_sddmm, k_channel, k_nm_mm

    g = torch.Generator().manual_seed(0)
    arch = C.arch_of(device)
    size = args.size
    family = row[0]
    if family == "bsr_mm":
        _, bn, bucket = row
        m = bucket_m(bucket, args.large_m)
        w = _bsr(size, size, (bn, bn), args.density, dtype, device, g)
        x = torch.randn(m, size, generator=g).to(device, dtype)
        cands = C.bsr_mm_candidates(m, bn, bn, dtype, arch)

        def run(c):
            return k_bsr_mm.bsr_mm(x, w.crow_indices, w.col_indices, w.values, None, size, config=c)
    elif family == "nm_mm":
        from sparsekit.formats import NM

        m = bucket_m(row[1], args.large_m)
        w = NM.from_dense(NM.prune(torch.randn(size, size, generator=g), 2, 4), 2, 4).to(device=device, dtype=dtype)
        x = torch.randn(m, size, generator=g).to(device, dtype)
        cands = C.tile_candidates("nm_mm", m, dtype, arch)

        def run(c):
            return k_nm_mm.nm_mm(x, w.values, w.indices, None, 2, 4, config=c)
    elif family == "channel_mm":
        m = bucket_m(row[1], args.large_m)
        kc = nc = size // 2
        x = torch.randn(m, size, generator=g).to(device, dtype)
        in_idx = torch.randperm(size, generator=g)[:kc].sort().values.to(device)
        wc = torch.randn(nc, kc, generator=g).to(device, dtype)
        cands = C.tile_candidates("channel_mm", m, dtype, arch)

        def run(c):
            y = torch.empty(m, nc, device=device, dtype=dtype)
            return k_channel.channel_mm(x, in_idx, wc, None, y, (0, size, 1), (0, nc, 1), 1, m, config=c)
    elif family == "bsr_sddmm":
        _, bn, bk = row
        m = args.large_m
        w = _bsr(size, size, (bn, bk), args.density, dtype, device, g)
        dy = torch.randn(m, size, generator=g).to(device, dtype)
        x = torch.randn(m, size, generator=g).to(device, dtype)
        cands = C.bsr_sddmm_candidates(m, w.nnzb, bn, bk, dtype, arch)

        def run(c):
            return k_bsr_sddmm.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, bn, bk, config=c)
    else:
        raise ValueError(f"unknown family {family!r}")
    if args.max_candidates:
        cands = cands[: args.max_candidates]
    return run, cands, cands[0]


def config_row(family: str, cfg) -> list[int]:
    """A config as its table stores it."""
    if family in ("bsr_mm", "bsr_sddmm"):
        return [cfg.block_m, cfg.num_warps, cfg.num_stages]
    return [cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages]


def row_key(row: tuple) -> str:
    family = row[0]
    if family == "bsr_mm":
        return f"bsr_mm[{row[1]}][{row[2]}]"
    if family == "bsr_sddmm":
        return f"bsr_sddmm[{row[1] * row[2]}]"
    return f"{family}[{row[1]}]"


def apply(table: dict, row: tuple, cfg) -> None:
    """Write ``cfg`` into the JSON table at ``row``."""
    family, values = row[0], config_row(row[0], cfg)
    if family == "bsr_mm":
        table["bsr_mm"][str(row[1])][row[2]] = values
    elif family == "bsr_sddmm":
        table["bsr_sddmm"][str(row[1] * row[2])] = values
    else:
        table[family][row[1]] = values


# ------------------------------------------------------------------------------------------------ tuning
def measure_row(
    run: Callable[[object], torch.Tensor], candidates: list, device: torch.device, dtype: torch.dtype, timer: Callable
) -> dict:
    """Time every candidate whose output matches the reference config's (the table's, candidates[0], or where
    that one fails, e.g. out of shared memory, the first that runs); the fastest wins."""
    ref, first_errors = None, {}
    for cfg in candidates:
        try:
            ref = run(cfg).float()
            break
        except Exception as exc:  # noqa: BLE001 - a config that cannot run is recorded, not fatal
            first_errors[cfg] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    if ref is None:
        return {"best": None, "ms": {}, "errors": first_errors}
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    seen: set = set()

    def checked(cfg):
        out = run(cfg)
        if cfg not in seen:  # compared once per candidate: its first (warm-up) call
            seen.add(cfg)
            err = float((out.float() - ref).abs().max()) if ref.numel() else 0.0
            if err > TOL[dtype] * scale:
                raise ValueError(f"output differs from the table config's by {err:.3g} (max |difference|)")
        return out

    best, ms, errors = _autotune.best([c for c in candidates if c not in first_errors], checked, device, timer=timer)
    return {"best": best, "ms": ms, "errors": {**first_errors, **errors}}


def describe(cfg) -> str:
    return (
        "x".join(
            str(v) for v in (cfg.block_m, getattr(cfg, "block_n", None), getattr(cfg, "block_k", None)) if v is not None
        )
        + f" w{cfg.num_warps} s{cfg.num_stages}"
    )


def tune(args: argparse.Namespace, timer: Callable | None = None, log=print) -> dict:
    """Measure the selected rows (within args.budget_s) and write the table; returns it."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune_triton: CUDA is not available (on CPU: --device cpu with TRITON_INTERPRET=1)")
    if device.type == "cpu" and not C.interpreting():
        raise SystemExit("tune_triton: --device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    major, smem = C.arch_of(device)
    out = Path(args.out) if args.out else Path(args.out_dir or C.tuned_path(major).parent) / C.tuned_path(major).name
    if timer is None:

        def timer(fn, dev):
            return _autotune.time_config(fn, dev, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)

    table = {
        "format": C.TUNED_FORMAT,
        "version": C.TUNED_VERSION,
        "arch_major": major,
        "m_buckets": list(C.M_BUCKETS),
        **C.hand_written_tables(major),
    }
    if device.type == "cuda":
        major_minor = torch.cuda.get_device_capability(device)
        name, capability = torch.cuda.get_device_name(device), f"{major_minor[0]}.{major_minor[1]}"
    else:
        name, capability = f"{platform.processor() or 'CPU'} (Triton interpreter)", f"{major}.0 (assumed)"
    info = {
        "device": name,
        "capability": capability,
        "smem": smem,
        "sms": C.sm_count(device, major),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {"size": args.size, "density": args.density, "large_m": args.large_m},
    }
    table.update(info)
    measured: dict = {}
    table["measured"] = measured
    todo = rows(tuple(args.families), tuple(args.sides), tuple(args.buckets))
    start = clock()
    log(
        f"tune_triton: {len(todo)} rows on {info['device']} (sm{major}x, {args.dtype}), budget "
        f"{args.budget_s or 'none'} s -> {out}"
    )
    for i, row in enumerate(todo):
        if args.budget_s and clock() - start > args.budget_s:
            log(f"tune_triton: budget of {args.budget_s} s spent: {len(todo) - i} rows left at the hand-written values")
            measured["not_measured"] = [row_key(r) for r in todo[i:]]
            break
        run, candidates, default = problem(row, args, dtype, device)
        t0 = clock()
        res = measure_row(run, candidates, device, dtype, timer)
        best = res["best"]
        if best is None:
            log(f"  {row_key(row)}: every candidate failed ({next(iter(res['errors'].values()), '?')}); kept")
            measured[row_key(row)] = {"errors": {describe(c): e for c, e in res["errors"].items()}}
            continue
        apply(table, row, best)
        default_ms = res["ms"].get(default)
        measured[row_key(row)] = {
            "table": config_row(row[0], default),
            "chosen": config_row(row[0], best),
            "table_ms": default_ms,
            "chosen_ms": res["ms"][best],
            "candidates": len(candidates),
            "failed": len(res["errors"]),
            "seconds": round(clock() - t0, 1),
        }
        gain = f"{default_ms / res['ms'][best]:.2f}x" if default_ms else "table config failed"
        log(
            f"  {row_key(row):<18} {describe(best):<22} {res['ms'][best]:.4f} ms (table {describe(default)}: "
            f"{gain}; {len(candidates)} candidates, {len(res['errors'])} failed, {clock() - t0:.0f} s)"
        )
        write(table, out)
    write(table, out)
    log(f"tune_triton: wrote {out} in {clock() - start:.0f} s")
    return table


def write(table: dict, out: Path) -> None:
    """Validate, then replace ``out`` atomically (a run killed mid-write leaves the previous file)."""
    C.validate_tuned(json.loads(json.dumps(table)), str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    text = json.dumps(table, indent=1)
    # one table row per line: [16, 2, 5] rather than five lines
    text = re.sub(
        r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text
    )
    tmp.write_text(text + "\n")
    os.replace(tmp, out)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1 (tests)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument(
        "--families",
        type=lambda s: tuple(f for f in s.split(",") if f),
        default=DEFAULT_FAMILIES,
        help=f"comma list, measured in this order (default {','.join(DEFAULT_FAMILIES)})",
    )
    ap.add_argument("--sides", type=_ints, default=C.BLOCK_SIDES, help="block sides (default 16,32,64,128)")
    ap.add_argument(
        "--buckets",
        type=_ints,
        default=tuple(range(len(C.M_BUCKETS))),
        help=f"indices of the M buckets {C.M_BUCKETS} (the last: M > {C.M_BUCKETS[-2]}) to measure",
    )
    ap.add_argument("--size", type=int, default=4096, help="N = K of the problems (default 4096)")
    ap.add_argument("--density", type=float, default=0.1, help="BSR block density (default 0.1: 90%% sparsity)")
    ap.add_argument("--large-m", type=int, default=4096, help="M of the last bucket and of bsr_sddmm (default 4096)")
    ap.add_argument("--max-candidates", type=int, default=0, help="time at most this many per row (0: all)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this many seconds (0: none)")
    ap.add_argument("--warmup-ms", type=float, default=5.0, help="do_bench warm-up per candidate")
    ap.add_argument("--rep-ms", type=float, default=25.0, help="do_bench timing window per candidate")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="the JSON file to write")
    where.add_argument(
        "--out-dir",
        default=None,
        help="write tuned_sm<major>0.json there (default: kernels/, where the launchers find it)",
    )
    return ap


def check_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    for name, values, allowed in (
        ("--sides", args.sides, C.BLOCK_SIDES),
        ("--buckets", args.buckets, tuple(range(len(C.M_BUCKETS)))),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"{name}: values must be among {list(allowed)}, got {list(values)}")
    unknown = [f for f in args.families if f not in C.FAMILIES]
    if unknown or not args.families:
        ap.error(f"--families: must be a comma list of {', '.join(C.FAMILIES)}, got {','.join(args.families)}")
    for name in ("size", "large_m"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % max(args.sides) or args.size % 8:
        ap.error(f"--size must be a multiple of the largest block side ({max(args.sides)}) and of 8, got {args.size}")
    if not 0 < args.density <= 1:
        ap.error(f"--density must be in (0, 1], got {args.density}")
    if args.max_candidates < 0 or args.budget_s < 0:
        ap.error("--max-candidates and --budget-s must be >= 0")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(args, ap)
    tune(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
