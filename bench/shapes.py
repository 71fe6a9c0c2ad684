"""Real model shapes for the benchmarks: BERT-base/large MLP and attention projections, LLaMA-7B / Llama-3-8B
linears, ViT-B MLP, OPT-30B linears and a square 4096 GEMM (these two in the default sweep on CUDA only),
ResNet-50 1x1 and 3x3 convolutions, MobileNetV2 pointwise convolutions.

The table itself lives in ``sparsekit/benchmark/shapes.py`` (installed, so ``sparsekit bench`` can use it);
this module re-exports it for the scripts in bench/ and prints it:

    python bench/shapes.py
"""

from __future__ import annotations

import sys

from sparsekit.benchmark.shapes import (
    CONV_SHAPES,
    LINEAR_SHAPES,
    QUICK_CONV,
    QUICK_LINEAR,
    ConvShape,
    LinearShape,
    get_shapes,
    shape_names,
)

__all__ = ["LINEAR_SHAPES", "CONV_SHAPES", "QUICK_LINEAR", "QUICK_CONV", "LinearShape", "ConvShape", "get_shapes",
           "shape_names"]


def main() -> int:
    """Print every shape with its GEMM size and dense GFLOP per call (CPU and CUDA defaults)."""
    print(f"{'shape':<30}{'GEMM MxNxK (cpu)':>20}{'GFLOP':>8}{'GEMM MxNxK (cuda)':>22}{'GFLOP':>9}  source")
    for s in LINEAR_SHAPES + CONV_SHAPES:
        cpu, cuda = s.gemm("cpu"), s.gemm("cuda")
        print(f"{s.name:<30}{'x'.join(map(str, cpu)):>20}{2 * cpu[0] * cpu[1] * cpu[2] / 1e9:>8.2f}"
              f"{'x'.join(map(str, cuda)):>22}{2 * cuda[0] * cuda[1] * cuda[2] / 1e9:>9.1f}  {s.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
