"""Sparse linear (BSR, CSR, n:m) vs dense over the linear shapes of bench/shapes.py.

Per shape, dtype, pattern and sparsity, in one run and after warm-up, interleaved medians of: dense F.linear,
dense under torch.compile, torch.sparse (BSR / CSR; semi-structured 2:4 on CUDA) and every usable sparsekit
backend (bsr_linear / csr_linear / nm_linear with backend=<name>). Each candidate's output is checked against
dense first. Writes <machine>_<date>_kernels.{json,csv,md} and PNG plots to --out (default bench/results).

    python bench/bench_linear.py --quick                       # a couple of minutes on a 2-core CPU
    python bench/bench_linear.py --shapes 'llama-7b.*' --formats bsr --block 32,64
    python bench/bench_linear.py --device cuda                 # on a GPU machine (CUDA events)

Same options as `sparsekit bench kernels` (which also covers conv2d); see --help.
"""

from __future__ import annotations

import argparse
import sys

from sparsekit.benchmark.command import add_sweep_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_linear.py", description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, "kernels", ops=("linear",))
    argv = sys.argv[1:] if argv is None else argv
    return run_bench(p.parse_args(argv), "kernels", ["bench/bench_linear.py", *argv])


if __name__ == "__main__":
    sys.exit(main())
