"""SparseConvTranspose1d / 2d / 3d vs dense nn.ConvTranspose* on the up-sampling layers of real models, CPU or CUDA.

    python bench/bench_conv_transpose.py [--reps 15] [--batch 4] [--device cpu] [--dtype float32] [--out DIR]

Shapes: U-Net's 2x2 stride-2 up-convolutions (Ronneberger et al. 2015: 1024 -> 512 channels from 28x28, 512 -> 256
from 52x52), DCGAN's 4x4 stride-2 generator layers (Radford et al. 2016: 512 -> 256 from 8x8, 256 -> 128 from 16x16),
a 3D U-Net 2x2x2 up-convolution (Cicek et al. 2016: 256 -> 128 from 8^3) and a HiFi-GAN up-sampling layer
(Kong et al. 2020: ConvTranspose1d 512 -> 256, kernel 16, stride 8, padding 4, 128 mel frames). Per shape and
pattern (BSR 32x32 blocks at 80 / 90 / 95% block sparsity; unstructured CSR at 90 / 95%) the pruned dense layer
(weight viewed as [C_out * prod(kernel), C_in]) and its SparseConvTranspose*.from_dense run in one interleaved
loop (medians after warm-up, CUDA synchronised) with torch's dense transposed conv (oneDNN / cuDNN) on the same
input; the sparse output is checked against it first. Writes <out>/conv_transpose_<machine>_<UTC stamp>.json / .md.
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

from sparsekit.nn import SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d  # noqa: E402

# name: (C_in, C_out, kernel, stride, padding, input spatial sizes)
SHAPES = {
    "unet.up1_2x2_s2": (1024, 512, 2, 2, 0, (28, 28)),
    "unet.up2_2x2_s2": (512, 256, 2, 2, 0, (52, 52)),
    "dcgan.g2_4x4_s2": (512, 256, 4, 2, 1, (8, 8)),
    "dcgan.g3_4x4_s2": (256, 128, 4, 2, 1, (16, 16)),
    "unet3d.up_2x2x2_s2": (256, 128, 2, 2, 0, (8, 8, 8)),
    "hifigan.up1_k16_s8": (512, 256, 16, 8, 4, (128,)),
}
CLASSES = {1: (nn.ConvTranspose1d, SparseConvTranspose1d), 2: (nn.ConvTranspose2d, SparseConvTranspose2d),
           3: (nn.ConvTranspose3d, SparseConvTranspose3d)}


def run(reps: int, batch: int, device: str, dtype: torch.dtype = torch.float32) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        c_in, c_out, k, stride, padding, size = shape
        dense_cls, sparse_cls = CLASSES[len(size)]
        x = torch.randn(batch, c_in, *size, generator=gen).to(device, dtype)
        geometry = dict(zip(("c_in", "c_out", "kernel", "stride", "padding", "input"), shape))
        rows += time_patterns(name, x, partial(dense_cls, c_in, c_out, k, stride, padding), sparse_cls, geometry,
                              reps, device, gen)
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(__doc__, 4, argv)
    rows = run(a.reps, a.batch, a.device, DTYPES[a.dtype])
    write_results(a.out, "conv_transpose", "SparseConvTranspose* vs nn.ConvTranspose*", a.device, a.dtype, a.reps,
                  f"Batch {a.batch}", "transposed conv (C_in -> C_out, kernel, stride, padding, input)",
                  lambda c: (f"{c['c_in']} -> {c['c_out']}, k {c['kernel']}, s {c['stride']}, p {c['padding']}, "
                             f"{'x'.join(map(str, c['input']))}"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
