"""The `sparsekit` command: info | demo | bench | report | sparsify."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_result, run_demo, save_demo_result

    for name in ("sparsity", "channels", "unstructured"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise SystemExit(f"sparsekit demo: --{name} must be in [0, 1), got {value}")
    cfg = DemoConfig(model=args.model, width=args.width, channels=args.channels,
                     channel_criterion=args.channel_criterion, sparsity=args.sparsity, criterion=args.criterion,
                     block=args.block, unstructured=args.unstructured, formats=args.formats,
                     min_speedup=args.min_speedup, batch=args.batch, tokens=args.tokens, reps=args.reps,
                     backend=args.backend, save=not args.no_save)
    if args.out is not None:     # (before the run: an unwritable --out failed only at its end)
        from .sparsify_command import _check_out

        _check_out(Path(args.out), "sparsekit demo")
    try:
        result = run_demo(cfg)
    except ValueError as exc:    # a bad option value (width, block, reps, criterion, backend ...): named, no traceback
        raise SystemExit(f"sparsekit demo: {exc}") from None
    text = format_result(result)
    print(text)
    if args.out is not None:
        print(f"results: {save_demo_result(result, text, args.out)}.json / .txt")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # bench / report / sparsify: argument parsing only here; the sweep itself is imported when the command runs
    from .benchmark.command import add_bench_parser, add_report_parser
    from .sparsify_command import add_sparsify_parser, formats_arg, min_speedup_arg

    p = argparse.ArgumentParser(prog="sparsekit", description="Make pruned networks actually faster.")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("info", help="versions, CPU/GPU features, which backends can run and why not")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=_cmd_info)

    pd = sub.add_parser("demo", help="dense -> channel-pruned + compacted -> block- or element-pruned -> "
                                      "sparsified -> saved/loaded: each stage verified and timed against dense in "
                                      "one table")
    pd.add_argument("--model", default="ffn", choices=["ffn", "transformer"],
                    help="ffn: BERT-base MLP 768->3072->768 (default); transformer: 2 encoder layers of BERT-base "
                         "width")
    pd.add_argument("--width", type=float, default=1.0, help="scale the model's dims (default 1.0)")
    pd.add_argument("--channels", type=float, default=0.5,
                    help="fraction of the FFN hidden channels removed and compacted (default 0.5)")
    pd.add_argument("--channel-criterion", default="l1", help="criterion of the channel stage (default l1)")
    pd.add_argument("--sparsity", type=float, default=0.9,
                    help="block sparsity of the compacted model's weights (default 0.9)")
    pd.add_argument("--criterion", default="magnitude",
                    help="criterion of the block and unstructured stages (default magnitude)")
    pd.add_argument("--block", type=int, default=32, help="block side of the block stage (default 32)")
    pd.add_argument("--unstructured", type=float, default=0.95,
                    help="element sparsity of the unstructured stage, on the compacted model (default 0.95)")
    pd.add_argument("--formats", type=formats_arg, default=None,
                    help="formats sparsify may choose, comma-separated (default: all of dense,bsr,csr,nm,channel)")
    pd.add_argument("--min-speedup", type=min_speedup_arg, default=1.1,
                    help="a sparse format must beat dense by this factor to be kept (default 1.1)")
    pd.add_argument("--batch", type=int, default=8, help="sequences per input (default 8)")
    pd.add_argument("--tokens", type=int, default=64, help="tokens per sequence (default 64)")
    pd.add_argument("--reps", type=int, default=10,
                    help="timed rounds per stage (default 10; sparsify's per-layer timing takes max(3, reps // 2))")
    pd.add_argument("--backend", default=None,
                    help="force a backend (cpu, cuda, triton, cusparselt, reference; default: the dispatcher's)")
    pd.add_argument("--no-save", action="store_true", help="skip the sk.save -> sk.load round trip")
    pd.add_argument("--out", default=None, metavar="DIR",
                    help="also write the table (.txt) and its data (.json, with machine and versions) to DIR, e.g. "
                         "bench/results (README's demo block is generated from there)")
    pd.set_defaults(fn=_cmd_demo)

    add_bench_parser(sub)
    add_report_parser(sub)
    add_sparsify_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
