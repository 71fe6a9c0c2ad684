"""`sparsekit bench kernels|model` and `sparsekit report`: argument parsing (no heavy imports at module level,
so `sparsekit info` stays fast) and the commands themselves (they import the sweep lazily).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_bench_parser", "add_report_parser", "add_sweep_arguments", "config_from_args", "run_bench",
           "run_report"]

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
_FORMATS = ("bsr", "csr", "nm")
_OPS = ("linear", "conv2d")
DEFAULT_OUT = "bench/results"


def _list_of(kind: str, convert: Callable[[str], object], example: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind} like {example}, got {text!r}")
        return tuple(convert(t) for t in items)
    return parse


def _sparsity(t: str) -> float:
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{t!r} is not a number; expected sparsities in [0, 1) like 0.5,0.9") \
            from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{t!r} is not in [0, 1); expected sparsities like 0.5,0.9")
    return v


def _block(t: str) -> tuple[int, int]:
    from .patterns import parse_block  # light: formats + torch are already imported with sparsekit

    try:
        return parse_block(t)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _choice(allowed: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(t: str) -> str:
        if t not in allowed:
            raise argparse.ArgumentTypeError(f"{t!r} is not a {what}; expected one of {', '.join(allowed)}")
        return t
    return parse


def _positive_int(t: str) -> int:
    try:
        v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{t!r} is not an integer; expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{t!r} must be >= 1")
    return v


def _positive_float(t: str) -> float:
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{t!r} is not a number; expected seconds > 0") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{t!r} must be > 0 seconds")
    return v


def add_sweep_arguments(p: argparse.ArgumentParser, suite: str, ops: tuple[str, ...] | None = None) -> None:
    """Arguments shared by `sparsekit bench kernels|model` and the bench/*.py scripts (``ops`` fixes --ops)."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--quick", action="store_true",
                   help="small sweep: sparsity 0.5,0.9,0.95, BSR 32x32 + CSR, few reps (< 2 min on a 2-core CPU)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where results (.json/.csv/.md) and plots go (default: {DEFAULT_OUT})")
    if suite == "kernels":
        if ops is None:
            p.add_argument("--ops", type=_list_of("ops", _choice(_OPS, "op"), "linear,conv2d"), default=None,
                           help="ops to sweep (default: linear,conv2d)")
        else:       # a bench/*.py script of one op family
            p.set_defaults(ops=ops)
        p.add_argument("--shapes", type=_list_of("shape names", str, "bert-base.mlp_up,llama-7b.*"), default=None,
                       help="shape names from sparsekit/benchmark/shapes.py (a 'prefix*' selects a family; "
                            "--list-shapes prints them); default: all (--quick: a small set)")
        p.add_argument("--m", type=_positive_int, default=None,
                       help="rows M for linear shapes / batch for conv shapes (default: per shape and device)")
        p.add_argument("--list-shapes", action="store_true", help="print the shapes and exit")
    else:
        p.add_argument("--models", type=_list_of("models", _choice(("ffn", "transformer"), "model"),
                                                 "ffn,transformer"), default=None,
                       help="models to run (default: ffn,transformer; --quick: ffn)")
        p.add_argument("--batch", type=_positive_int, default=None, help="batch size (default: per model/device)")
    p.add_argument("--sparsity", type=_list_of("sparsities", _sparsity, "0.5,0.9"), default=None,
                   help="sparsities (default: 0.5,0.7,0.8,0.9,0.95,0.98; --quick: 0.5,0.9,0.95)")
    p.add_argument("--block", type=_list_of("blocks", _block, "1x4,16,32,64"), default=None,
                   help="BSR blocks, 'rows x cols' or a square side (default: 1x4,16,32,64; --quick: 32)")
    p.add_argument("--formats", type=_list_of("formats", _choice(_FORMATS, "format"), "bsr,csr,nm"), default=None,
                   help="bsr, csr, nm (default: all three; --quick: bsr,csr)")
    p.add_argument("--dtype", type=_list_of("dtypes", _choice(_DTYPE_NAMES, "dtype"), "float32,bfloat16"),
                   default=None, help="dtypes (default cpu: float32,bfloat16; cuda: float16,bfloat16,float32; "
                                      "--quick: the first of those)")
    p.add_argument("--timer", default="auto", choices=["auto", "interleaved", "events", "do_bench"],
                   help="auto: interleaved perf_counter on CPU, interleaved CUDA events on GPU")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; --quick 2)")
    p.add_argument("--min-reps", type=_positive_int, default=None, help="fewest timed rounds (default 5)")
    p.add_argument("--max-reps", type=_positive_int, default=None, help="most timed rounds (default 30; --quick 25)")
    p.add_argument("--budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="timing budget per configuration; reps fill it within [min, max] (default 1; --quick 0.5)")
    p.add_argument("--min-sample-ms", type=float, default=None, metavar="MS",
                   help="interleaved timer: repeat calls shorter than this back-to-back within one sample "
                        "(default 1; 0 = time single calls)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmul/conv on CUDA (default: off)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile dense baseline")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    if suite == "kernels":
        p.add_argument("--no-torch-sparse", dest="torch_sparse", action="store_false",
                       help="skip the torch.sparse candidates (BSR, CSR, semi-structured 2:4)")
    p.add_argument("--include-reference", action="store_true",
                   help="also time the 'reference' backend (densify + matmul; skipped by default)")
    p.add_argument("--no-peaks", dest="peaks", action="store_false",
                   help="skip measuring peak FLOP/s and bandwidth (no roofline)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`sparsekit bench kernels|model`."""
    pb = sub.add_parser("bench", help="benchmark sparse vs dense side by side (kernels or whole models)",
                        description="Sweep sparsity x block x dtype, write results (JSON, CSV, markdown) and plots.")
    bsub = pb.add_subparsers(dest="suite", required=True, metavar="{kernels,model}")
    pk = bsub.add_parser("kernels", help="op-level sweep over real model shapes (linear, conv2d)")
    add_sweep_arguments(pk, "kernels")
    pk.set_defaults(fn=lambda a: run_bench(a, "kernels"))
    pm = bsub.add_parser("model", help="whole-model sweep: pruned + converted reference models vs dense")
    add_sweep_arguments(pm, "model")
    pm.set_defaults(fn=lambda a: run_bench(a, "model"))


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """`sparsekit report RESULTS`."""
    pr = sub.add_parser("report", help="markdown summary of benchmark results (break-even, best speedup, %% ideal)")
    pr.add_argument("results", metavar="RESULTS",
                    help="a results .json or .csv, or a directory (its newest results .json)")
    pr.add_argument("--out", default=None, metavar="FILE", help="write the markdown here instead of stdout")
    pr.set_defaults(fn=run_report)


def config_from_args(args: argparse.Namespace, suite: str, argv: list[str] | None = None):
    """A validated SweepConfig from parsed arguments (defaults depend on --device and --quick)."""
    from .sweep import DEFAULT_BLOCKS, DEFAULT_SPARSITIES, SweepConfig

    dtypes = args.dtype or (("float16", "bfloat16", "float32") if args.device == "cuda"
                            else ("float32", "bfloat16"))
    if args.quick and not args.dtype:
        dtypes = dtypes[:1]
    kw = {"device": args.device, "dtypes": dtypes, "compile": args.compile, "compile_mode": args.compile_mode,
          "include_reference": args.include_reference, "timer": args.timer, "tf32": args.tf32, "peaks": args.peaks,
          "seed": args.seed, "progress": args.progress, "argv": list(argv) if argv is not None else sys.argv[1:]}
    for key, name in (("sparsities", "sparsity"), ("blocks", "block"), ("formats", "formats"),
                      ("warmup", "warmup"), ("min_reps", "min_reps"), ("max_reps", "max_reps"),
                      ("budget_s", "budget"), ("min_sample_ms", "min_sample_ms")):
        if getattr(args, name) is not None:
            kw[key] = getattr(args, name)
    if suite == "kernels":
        kw.update({"ops": args.ops or ("linear", "conv2d"), "shapes": args.shapes, "m": args.m,
                   "torch_sparse": args.torch_sparse})
    else:
        kw.update({"models": args.models, "m": args.batch})
    if kw.get("min_reps") and kw.get("max_reps") and kw["min_reps"] > kw["max_reps"]:
        raise ValueError(f"--min-reps ({kw['min_reps']}) must be <= --max-reps ({kw['max_reps']})")
    if args.quick:
        cfg = SweepConfig.quick_defaults(**kw)
    else:
        cfg = SweepConfig(**{"sparsities": DEFAULT_SPARSITIES, "blocks": DEFAULT_BLOCKS, **kw})
    if cfg.min_reps > cfg.max_reps:    # only one of them given: the other follows it
        if args.max_reps is not None:
            cfg.min_reps = cfg.max_reps
        else:
            cfg.max_reps = cfg.min_reps
    return cfg.validate()


def _list_shapes() -> int:
    from .shapes import CONV_SHAPES, LINEAR_SHAPES

    print(f"{'linear shape':<28}{'N(out)':>8}{'K(in)':>8}{'M cpu':>7}{'M cuda':>8}  source")
    for s in LINEAR_SHAPES:
        only = "" if "cpu" in s.default_devices else " [in the default sweep on cuda only]"
        print(f"{s.name:<28}{s.n:>8}{s.k:>8}{s.m_cpu:>7}{s.m_cuda:>8}  {s.source}{only}")
    print(f"\n{'conv shape':<30}{'C_in':>6}{'C_out':>6}{'k':>3}{'HxW':>5}{'B cpu':>6}{'B cuda':>7}  source")
    for c in CONV_SHAPES:
        print(f"{c.name:<30}{c.c_in:>6}{c.c_out:>6}{c.kernel:>3}{c.hw:>5}{c.batch_cpu:>6}{c.batch_cuda:>7}  "
              f"{c.source}")
    return 0


def run_bench(args: argparse.Namespace, suite: str, argv: list[str] | None = None) -> int:
    """Run a sweep from parsed arguments, save everything under --out, print where and a summary."""
    if suite == "kernels" and args.list_shapes:
        return _list_shapes()
    try:
        cfg = config_from_args(args, suite, argv)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"sparsekit bench {suite}: {exc}") from None
    from ..sparsify_command import _check_out
    from .report import speedup_table
    from .sweep import run_kernel_sweep, save_results

    _check_out(Path(args.out), f"sparsekit bench {suite}")     # (before the sweep: its results would be lost)
    t0 = time.perf_counter()
    try:
        if suite == "kernels":
            results = run_kernel_sweep(cfg)
        else:
            from .whole_model import run_model_sweep

            results = run_model_sweep(cfg)
    except ValueError as exc:       # e.g. nothing to run once every pattern was skipped
        raise SystemExit(f"sparsekit bench {suite}: {exc}") from None
    elapsed = time.perf_counter() - t0
    results["meta"]["elapsed_s"] = round(elapsed, 1)
    paths = save_results(results, args.out, plots=args.plots)
    ok = sum(1 for r in results["rows"] if r["status"] == "ok")
    bad = len(results["rows"]) - ok
    print(f"sparsekit bench {suite}: {len(results['rows'])} rows ({ok} ok, {bad} not measured) in {elapsed:.0f} s")
    if results["meta"].get("interrupted"):
        print(f"sparsekit bench {suite}: {results['meta']['interrupted']}: the results hold those only")
    table = speedup_table(results, kinds=("sparsekit", "torch"))
    if table.count("\n") <= 60:
        print(table)
    print(f"results: {paths['json']}\n         {paths['csv']}\nreport:  {paths['report']}")
    print(f"plots:   {paths['plot_message'] or 'disabled (--no-plots)'}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """`sparsekit report RESULTS [--out FILE]`."""
    from .report import find_results, load_results, to_markdown

    try:
        results = load_results(args.results)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"sparsekit report: {exc}") from None
    stem = results["meta"].get("stem")
    plotted = bool(stem) and (find_results(args.results).parent / str(stem)).is_dir()   # written beside the JSON
    md = to_markdown(results, plots_dir=stem if plotted else None)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        print(f"sparsekit report: wrote {args.out}")
    else:
        print(md)
    return 0
