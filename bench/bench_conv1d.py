"""SparseConv1d vs dense nn.Conv1d on 1-D convolutions of real audio / sequence models, CPU or CUDA.

    python bench/bench_conv1d.py [--reps 15] [--batch 8] [--device cpu] [--dtype float32] [--out bench/results]

Shapes: wav2vec 2.0's feature encoder (512 -> 512 channels, kernel 3, stride 2, on 16 kHz audio after the first
layers: 1599 frames), Whisper-base's second input conv (512 -> 512, kernel 3, stride 2, padding 1, 3000 mel
frames) and a TCN block (256 -> 256, kernel 3, dilation 4, 'same', 2048 steps). Per shape and pattern (BSR 32x32
blocks at 80 / 90 / 95% block sparsity; unstructured CSR at 90 / 95%), a pruned nn.Conv1d (weight viewed as
[C_out, C_in * k]) and its SparseConv1d.from_dense run in one interleaved loop (medians after warm-up, CUDA
synchronised) with torch's dense conv1d (oneDNN / cuDNN) on the same input; the sparse output is checked against
it first. fp32 (or --dtype bfloat16). Writes <out>/conv1d_<machine>_<UTC stamp>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sparsekit.benchmark.machine import script_results
from sparsekit.nn import SparseConv1d
from sparsekit.ops.conv_transpose import transposed_weight2d
from sparsekit.prune.masks import TRANSPOSED_CONVS
from sparsekit.timing import interleaved_median_ms

# name: (C_in, C_out, kernel, stride, padding, dilation, length)
SHAPES = {
    "wav2vec2.feature_conv": (512, 512, 3, 2, 0, 1, 1599),
    "whisper-base.conv2": (512, 512, 3, 2, 1, 1, 3000),
    "tcn.dilated": (256, 256, 3, 1, "same", 4, 2048),
}
PATTERNS = (("bsr", 0.8), ("bsr", 0.9), ("bsr", 0.95), ("csr", 0.9), ("csr", 0.95))


def prune_conv(conv: nn.Module, fmt: str, sparsity: float, gen: torch.Generator, device: str,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """``conv`` (any nn.ConvNd) with its weight, viewed as the GEMM matrix its sparse twin stores ([C_out,
    C_in/groups * prod(kernel)]; a transposed conv's [C_out * prod(kernel), C_in]), pruned in place: whole 32x32
    blocks (fmt "bsr") or single weights ("csr") at ``sparsity``; returned on ``device`` in ``dtype``, in eval."""
    w = conv.weight.detach()
    transposed = isinstance(conv, TRANSPOSED_CONVS)
    rows, cols = transposed_weight2d(w).shape if transposed else (conv.out_channels, w.numel() // conv.out_channels)
    with torch.no_grad():
        if fmt == "bsr":
            keep = torch.rand(rows // 32, cols // 32, generator=gen) >= sparsity
            keep = keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
        else:
            keep = torch.rand(rows, cols, generator=gen) >= sparsity
        # back to the weight's own layout ([C_in, C_out, *kernel] for a transposed conv)
        w.mul_(keep.reshape(conv.out_channels, *conv.kernel_size, w.shape[0]).movedim(-1, 0) if transposed
               else keep.reshape(w.shape))
    return conv.to(device, dtype).eval()


def time_patterns(name: str, x: torch.Tensor, make_conv: Callable[[], nn.Module], sparse_cls: type,
                  geometry: dict, reps: int, device: str, gen: torch.Generator) -> list[dict]:
    """One row per PATTERNS entry: a fresh ``make_conv()`` pruned to it and its ``sparse_cls.from_dense``, timed
    in one interleaved loop with the dense conv on ``x`` (the sparse output checked against it first; both in
    ``x``'s dtype)."""
    fns, layers = {}, {}
    tol = 1e-3 if x.dtype == torch.float32 else 3e-2
    for fmt, sparsity in PATTERNS:
        dense = prune_conv(make_conv(), fmt, sparsity, gen, device, x.dtype)
        sparse = sparse_cls.from_dense(dense, format=fmt, block=32)
        with torch.no_grad():
            ref, out = dense(x), sparse(x)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))
        label = f"{fmt}{'32x32' if fmt == 'bsr' else ''}@{sparsity:.2f}"
        # dense time does not depend on where the zeros are: one dense conv per shape is the baseline
        fns.setdefault("dense", lambda d=dense: d(x))
        fns[label] = lambda s=sparse: s(x)
        layers[label] = sparsity
    t = interleaved_median_ms(fns, warmup=3, reps=reps, device=device)
    rows = []
    for label, sparsity in layers.items():
        rows.append({"shape": name, "conv": geometry, "batch": x.shape[0], "dtype": str(x.dtype).split(".")[-1],
                     "format": label.split("@")[0],
                     "sparsity": sparsity, "dense_ms": t["dense"], "sparse_ms": t[label],
                     "speedup": t["dense"] / t[label]})
        print(f"{name} {label}: dense {t['dense']:.2f} ms, sparse {t[label]:.2f} ms, {rows[-1]['speedup']:.2f}x",
              flush=True)
    return rows


def run(reps: int, batch: int, device: str, dtype: torch.dtype = torch.float32) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        c_in, c_out, k, stride, padding, dilation, length = shape
        x = torch.randn(batch, c_in, length, generator=gen).to(device, dtype)
        geometry = dict(zip(("c_in", "c_out", "kernel", "stride", "padding", "dilation", "length"), shape))
        rows += time_patterns(name, x, partial(nn.Conv1d, c_in, c_out, k, stride, padding, dilation), SparseConv1d,
                              geometry, reps, device, gen)
    return rows


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(doc: str, batch: int, argv: list[str] | None) -> argparse.Namespace:
    """The options bench_conv1d.py and bench_conv3d.py share, checked."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="both convs' dtype (default float32)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: CUDA is not available (torch {torch.__version__})")
    if a.reps < 1 or a.batch < 1:
        raise SystemExit("--reps and --batch must be >= 1")
    return a


def write_results(out: str, kind: str, title: str, device: str, dtype: str, reps: int, batch_note: str,
                  geometry_header: str, describe: Callable[[dict], str], rows: list[dict]) -> None:
    """<out>/<kind>_<machine>_<UTC stamp>.json (rows and machine) and .md (a table, ``describe(row["conv"])`` as
    the geometry column), both printed."""
    base, info, stamp, where = script_results(out, kind, device)
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "reps": reps, "rows": rows}, indent=1,
                                                    default=str))
    lines = [f"# {title} ({where}, {dtype}, torch {torch.__version__}, {stamp} UTC)", "",
             f"{batch_note}; medians of {reps} interleaved samples; one dense conv per shape is the baseline.",
             "", f"| shape | {geometry_header} | format | sparsity | dense ms | sparse ms | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {describe(r['conv'])} | {r['format']} | {r['sparsity']:.0%} | "
                     f"{r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(__doc__, 8, argv)
    rows = run(a.reps, a.batch, a.device, DTYPES[a.dtype])
    write_results(a.out, "conv1d", "SparseConv1d vs nn.Conv1d", a.device, a.dtype, a.reps, f"Batch {a.batch}",
                  "conv (C_in -> C_out, k, stride, padding, dilation, length)",
                  lambda c: (f"{c['c_in']} -> {c['c_out']}, k {c['kernel']}, s {c['stride']}, p {c['padding']}, "
                             f"d {c['dilation']}, L {c['length']}"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
