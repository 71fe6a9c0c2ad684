"""Whole models: the FFN (BERT-base MLP) and a BERT-base-width TransformerEncoder from sparsekit.models, pruned
with sparsekit.prune.Pruner (block / element / n:m, magnitude, per layer), converted with
sparsekit.nn.convert_modules, checked against the dense pruned model and timed against it (eager and
torch.compile) in one loop.

    python bench/bench_model.py --quick          # FFN only
    python bench/bench_model.py --models transformer --sparsity 0.8,0.9 --block 32

Same options as `sparsekit bench model`; see --help.
"""

from __future__ import annotations

import argparse
import sys

from sparsekit.benchmark.command import add_sweep_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_model.py", description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, "model")
    argv = sys.argv[1:] if argv is None else argv
    return run_bench(p.parse_args(argv), "model", ["bench/bench_model.py", *argv])


if __name__ == "__main__":
    sys.exit(main())
