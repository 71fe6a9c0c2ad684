"""One training step (forward + backward) of a sparse Linear vs the dense one, on CPU.

    python bench/bench_train_step.py [--reps 15] [--dtypes float32,bfloat16] [--out bench/results]

For each BERT-base MLP shape (x [512, 768] -> 3072 and [512, 3072] -> 768), dtype and format (BSR 32x32 at 90%
block sparsity, CSR at 90% unstructured sparsity) a pruned nn.Linear (bias included) and its SparseLinear
(SparseLinear.from_dense) each run y = layer(x); y.backward(dy) with x requiring grad: the sparse backward is
dx = dy @ W (sparse) and dW on the pattern only (SDDMM). One dense step per shape and dtype (its time does not
depend on where the zeros are) alternates with every format's sparse step in one loop, medians of --reps samples
after warm-up. Writes bench/results/train_step_<machine>_<UTC date-time>.md / .json.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparsekit.nn import SparseLinear
from sparsekit.timing import interleaved_median_ms

SHAPES = {"bert-base.mlp_up": (512, 3072, 768), "bert-base.mlp_down": (512, 768, 3072)}
CASES = (("bsr", (32, 32), 0.9), ("csr", None, 0.9))


def _pruned_linear(n: int, k: int, fmt: str, block, sparsity: float, dtype: torch.dtype, gen) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        if fmt == "bsr":
            bn, bk = block
            keep = (torch.rand(n // bn, k // bk, generator=gen) >= sparsity)
            keep = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        else:
            keep = torch.rand(n, k, generator=gen) >= sparsity
        lin.weight.mul_(keep)
    return lin.to(dtype)


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with torch.enable_grad():            # the timing helper runs its samples under no_grad
        layer(x).backward(dy)


def run(reps: int, dtypes: list[torch.dtype]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, (m, n, k) in SHAPES.items():
        for dtype in dtypes:
            x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
            dy = torch.randn(m, n, generator=gen).to(dtype)
            # one dense step (its time does not depend on where the zeros are) interleaved with every format's
            # sparse step, so all rows of a shape share one baseline
            steps = {}
            for fmt, block, sparsity in CASES:
                dense = _pruned_linear(n, k, fmt, block, sparsity, dtype, gen)
                steps.setdefault("dense", lambda d=dense, x=x, dy=dy: _step(d, x, dy))
                sparse = SparseLinear.from_dense(dense, format=fmt, block=block or 32)
                steps[fmt] = lambda s=sparse, x=x, dy=dy: _step(s, x, dy)
            t = interleaved_median_ms(steps, warmup=3, reps=reps)
            for fmt, block, sparsity in CASES:
                rows.append({"shape": f"{shape} ({m}x{n}x{k})", "dtype": str(dtype).split(".")[-1],
                             "format": fmt + (f"{block[0]}x{block[1]}" if block else ""), "sparsity": sparsity,
                             "dense_ms": t["dense"], "sparse_ms": t[fmt], "speedup": t["dense"] / t[fmt]})
                print(f"{rows[-1]['shape']} {rows[-1]['dtype']} {rows[-1]['format']}: dense {t['dense']:.2f} ms, "
                      f"sparse {t[fmt]:.2f} ms, {rows[-1]['speedup']:.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    rows = run(a.reps, dtypes)
    isa = torch.ops.sparsekit.cpu_kernel_isa() if hasattr(torch.ops.sparsekit, "cpu_kernel_isa") else "n/a"
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_kernel_isa": isa, "reps": a.reps,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"cpu-{torch.get_num_threads()}t_{stamp}"
    (out / f"train_step_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# One training step (forward + backward), sparse Linear vs dense, CPU ({meta['date']})", "",
             f"{meta['threads']} threads, torch {meta['torch']}, sparsekit CPU kernels {isa}; medians of "
             f"{a.reps} interleaved samples; the sparse step's dW is computed on the pattern only (SDDMM).", "",
             "| shape (MxNxK) | dtype | format | sparsity | dense ms | sparse ms | speedup |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['dtype']} | {r['format']} | {r['sparsity']:.0%} | {r['dense_ms']:.2f} | "
              f"{r['sparse_ms']:.2f} | {r['speedup']:.2f}x |" for r in rows]
    (out / f"train_step_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"results: {out / f'train_step_{tag}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
