"""SparseConv3d vs dense nn.Conv3d on 3-D convolutions of real video / volumetric models, CPU or CUDA.

    python bench/bench_conv3d.py [--reps 15] [--batch 2] [--device cpu] [--dtype float32] [--out bench/results]

Shapes (16-frame 112x112 clips for the video models, as in their papers): R3D-18's 3x3x3 convs (Tran et al.
2018, "A Closer Look at Spatiotemporal Convolutions"): layer2 (128 channels, 8x28x28), the stride-2 entry of
layer3 (128 -> 256, to 4x14x14) and layer4 (512 channels, 2x7x7); R(2+1)D's temporal 3x1x1 conv at layer2; and a
3D U-Net encoder conv (Cicek et al. 2016; 32 -> 64 channels on a 32^3 patch). Per shape and pattern (BSR 32x32
blocks at 80 / 90 / 95% block sparsity; unstructured CSR at 90 / 95%), a pruned nn.Conv3d (weight viewed as
[C_out, C_in * kd * kh * kw]) and its SparseConv3d.from_dense run in one interleaved loop (medians after warm-up,
CUDA synchronised) with torch's dense conv3d (oneDNN / cuDNN) on the same input; the sparse output is checked
against it first. fp32 (or --dtype bfloat16). Writes <out>/conv3d_<machine>_<UTC stamp>.json / .md.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:   # bench_conv1d, also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv1d import DTYPES, parse_args, time_patterns, write_results  # noqa: E402

from sparsekit.nn import SparseConv3d  # noqa: E402

# name: (C_in, C_out, kernel, stride, padding, (D, H, W) of the input)
SHAPES = {
    "r3d18.layer2.conv3x3x3": (128, 128, 3, 1, 1, (8, 28, 28)),
    "r3d18.layer3.conv3x3x3_s2": (128, 256, 3, 2, 1, (8, 28, 28)),
    "r3d18.layer4.conv3x3x3": (512, 512, 3, 1, 1, (2, 7, 7)),
    "r2plus1d.layer2.temporal3x1x1": (128, 128, (3, 1, 1), 1, (1, 0, 0), (8, 28, 28)),
    "unet3d.encoder.conv3x3x3": (32, 64, 3, 1, 1, (32, 32, 32)),
}


def _dims(v: int | tuple[int, ...]) -> str:
    return "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def run(reps: int, batch: int, device: str, dtype: torch.dtype = torch.float32) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        c_in, c_out, k, stride, padding, size = shape
        x = torch.randn(batch, c_in, *size, generator=gen).to(device, dtype)
        geometry = dict(zip(("c_in", "c_out", "kernel", "stride", "padding", "input"), shape))
        rows += time_patterns(name, x, partial(nn.Conv3d, c_in, c_out, k, stride, padding), SparseConv3d, geometry,
                              reps, device, gen)
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(__doc__, 2, argv)
    rows = run(a.reps, a.batch, a.device, DTYPES[a.dtype])
    write_results(a.out, "conv3d", "SparseConv3d vs nn.Conv3d", a.device, a.dtype, a.reps, f"Batch {a.batch}",
                  "conv (C_in -> C_out, kernel, stride, padding, input D x H x W)",
                  lambda c: (f"{c['c_in']} -> {c['c_out']}, k {_dims(c['kernel'])}, s {_dims(c['stride'])}, "
                             f"p {_dims(c['padding'])}, {_dims(c['input'])}"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
