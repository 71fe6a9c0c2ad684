"""A / B: a transposed conv whose kernel equals its stride, with its GEMM stored straight into the output
(``*_mm_xt_tiled``) vs the columns tensor then folded into the output (the path every other geometry takes), CPU.

    python bench/ab_conv_transpose_tiled.py [--reps 15] [--batch 4] [--out DIR]

The kernel = stride shapes of bench_conv_transpose.py (U-Net's 2x2 stride-2 up-convolutions, a 3D U-Net 2x2x2
one), pruned to 90% (BSR 32x32 blocks, and unstructured CSR): per shape and format the dense layer and its
SparseConvTranspose*.from_dense run in one interleaved loop, the sparse module once per path (the tiled ops
hidden from the dispatcher for B); outputs checked equal first. Writes <out>/conv_transpose_tiled_ab_<machine>_
<UTC stamp>.json / .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv1d import parse_args, prune_conv  # noqa: E402
from bench_conv_transpose import CLASSES, SHAPES  # noqa: E402

from sparsekit.benchmark.machine import script_results  # noqa: E402
from sparsekit.ops import _library  # noqa: E402
from sparsekit.timing import interleaved_median_ms  # noqa: E402


def _tiled_ops(on: bool) -> None:
    """Show (A) or hide (B) the tiled ops from the transposed conv's dispatch (it asks has_kernel first)."""
    for family in ("bsr", "csr"):
        _library._KERNELS[(f"{family}_mm_xt_tiled", "CPU")] = on


def main(argv: list[str] | None = None) -> int:
    a = parse_args(__doc__, 4, argv)
    if a.device != "cpu":
        raise SystemExit("--device: the tiled ops are CPU kernels; run this on cpu")
    if not all(_library.has_kernel(f"{family}_mm_xt_tiled", "CPU") for family in ("bsr", "csr")):
        raise SystemExit("the tiled ops have no CPU kernel here (sparsekit._C missing or older): rebuild it")
    try:
        rows = _measure(a)
    finally:
        _tiled_ops(True)
    _write(a, rows)
    return 0


def _measure(a) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (c_in, c_out, k, stride, padding, size) in SHAPES.items():
        if k != stride or padding:
            continue
        dense_cls, sparse_cls = CLASSES[len(size)]
        x = torch.randn(a.batch, c_in, *size, generator=gen)
        for fmt in ("bsr", "csr"):
            dense = prune_conv(dense_cls(c_in, c_out, k, stride, padding), fmt, 0.9, gen, "cpu")
            sparse = sparse_cls.from_dense(dense, format=fmt, block=32)

            def run(on: bool, s=sparse, x=x):
                _tiled_ops(on)
                return s(x)

            with torch.no_grad():
                torch.testing.assert_close(run(True), run(False), rtol=1e-4, atol=1e-4)
                t = interleaved_median_ms({"dense": lambda d=dense, x=x: d(x), "tiled": lambda: run(True),
                                           "fold": lambda: run(False)}, reps=a.reps)
            rows.append({"shape": name, "format": f"{fmt}32x32" if fmt == "bsr" else fmt, "sparsity": 0.9,
                         "dense_ms": t["dense"], "fold_ms": t["fold"], "tiled_ms": t["tiled"]})
            print(f"{name} {fmt}: dense {t['dense']:.1f} ms, columns+fold {t['fold']:.1f} ms, tiled "
                  f"{t['tiled']:.1f} ms", flush=True)
    return rows


def _write(a, rows: list[dict]) -> None:
    base, info, stamp, where = script_results(a.out, "conv_transpose_tiled_ab", "cpu")
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "reps": a.reps, "batch": a.batch,
                                                     "rows": rows}, indent=1, default=str))
    lines = [f"# Transposed conv, kernel = stride: tiled store vs columns + fold ({where}, float32, torch "
             f"{torch.__version__}, {stamp} UTC)", "",
             f"Batch {a.batch}; medians of {a.reps} interleaved samples (dense, then the same sparse module on each "
             "path).", "", "| shape | format | sparsity | dense ms | columns + fold ms (speedup) | tiled ms (speedup) "
             "| tiled vs fold |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['format']} | {r['sparsity']:.0%} | {r['dense_ms']:.1f} | "
                     f"{r['fold_ms']:.1f} ({r['dense_ms'] / r['fold_ms']:.2f}x) | {r['tiled_ms']:.1f} "
                     f"({r['dense_ms'] / r['tiled_ms']:.2f}x) | {r['fold_ms'] / r['tiled_ms']:.2f}x |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")


if __name__ == "__main__":
    sys.exit(main())
