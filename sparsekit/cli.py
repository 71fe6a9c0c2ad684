"""The `sparsekit` command: info | demo | bench | report."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_result, run_demo

    if not 0.0 <= args.sparsity < 1.0:
        raise SystemExit(f"sparsekit demo: --sparsity must be in [0, 1), got {args.sparsity}")
    cfg = DemoConfig(model=args.model, sparsity=args.sparsity, granularity=args.granularity,
                     criterion=args.criterion, format=args.format, block=args.block, batch=args.batch,
                     reps=args.reps, backend=args.backend)
    print(format_result(run_demo(cfg)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekit", description="Make pruned networks actually faster.")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("info", help="versions, CPU/GPU features, which backends can run and why not")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=_cmd_info)

    pd = sub.add_parser("demo", help="prune a reference model, sparsify it, verify, time sparse vs dense")
    pd.add_argument("--model", default="ffn", help="reference model from sparsekit.models (default: ffn, "
                                                   "BERT-base MLP shapes 768->3072->768)")
    pd.add_argument("--sparsity", type=float, default=0.9)
    pd.add_argument("--granularity", default="block", choices=["element", "block", "channel"])
    pd.add_argument("--criterion", default="magnitude")
    pd.add_argument("--format", default="bsr", choices=["bsr", "csr", "channel", "dense"])
    pd.add_argument("--block", type=int, default=32)
    pd.add_argument("--batch", type=int, default=8)
    pd.add_argument("--reps", type=int, default=10)
    pd.add_argument("--backend", default=None, help="force a backend (cpu, triton, reference, cuda)")
    pd.set_defaults(fn=_cmd_demo)

    # bench / report: argument parsing only here; the sweep itself is imported when the command runs
    from .benchmark.command import add_bench_parser, add_report_parser
    from .sparsify_command import add_sparsify_parser

    add_bench_parser(sub)
    add_report_parser(sub)
    add_sparsify_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
