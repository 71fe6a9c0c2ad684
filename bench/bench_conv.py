"""sparse_conv2d vs F.conv2d on the ResNet-50 and MobileNetV2 convolutions of bench/shapes.py.

Per shape, dtype, pattern (over the weight viewed as [C_out, C_in*kh*kw]) and sparsity, in one run and after
warm-up, interleaved medians of: dense F.conv2d (NCHW), F.conv2d on channels_last tensors, dense under
torch.compile, and sparse_conv2d with every usable sparsekit backend. torch.sparse has no convolution, so
there is no torch sparse candidate. Each candidate's output is checked against dense first.

    python bench/bench_conv.py --quick
    python bench/bench_conv.py --shapes 'resnet50.*' --sparsity 0.8,0.9,0.95

Same options as `sparsekit bench kernels`; see --help.
"""

from __future__ import annotations

import argparse
import sys

from sparsekit.benchmark.command import add_sweep_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_conv.py", description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, "kernels", ops=("conv2d",))
    argv = sys.argv[1:] if argv is None else argv
    return run_bench(p.parse_args(argv), "kernels", ["bench/bench_conv.py", *argv])


if __name__ == "__main__":
    sys.exit(main())
