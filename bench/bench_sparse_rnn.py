"""Recurrent models (CPU): the stock dense model vs its recurrent weights block-sparse (or unstructured), sparsified.

    python bench/bench_sparse_rnn.py                         # 90% of 32x32 blocks, batch 8, 100 steps
    python bench/bench_sparse_rnn.py --sparsity 0.8 0.95 --granularity element

The models of bench/bench_compact_rnn.py (batch ``--batch``, ``--steps`` time steps, float32, eval):

* speech-lstm   Linear 80 -> 512, 2-layer LSTM (hidden 1024), Linear 1024 -> 500 per frame (an acoustic model)
* tagger-bigru  Embedding 10000 x 256, 2-layer bidirectional GRU (hidden 512), Linear 1024 -> 20 per token
* lstm-1layer   Linear 80 -> 256, 1-layer LSTM (hidden 1024), Linear 1024 -> 10 on the last step

Recipe: ``sk.nn.rnn_to_linear`` exposes each recurrent weight matrix as a Linear, ``Pruner(criterion=
"magnitude", granularity=--granularity, block=32x32, sparsity=s)`` prunes those matrices only (layer-wise; the
model's other layers stay dense), the masks are baked and the weights packed back into the stock module: the
pruned stock model a user would hold. ``sk.sparsify(model, x)`` then measures every weight matrix's formats at
its real shape (the input projection over all time steps, the recurrent one at M = batch), swaps in the
fastest, and keeps the converted module only where it beats the stock fused kernel (oneDNN's LSTM / GRU) on
the real call. Its report gives the whole-model time of the dense stock model and of the result, measured in one
interleaved loop (medians of ``--reps``); the outputs are checked with ``sk.verify`` (atol 1e-4).
Results: bench/results/sparse_rnn_<machine>_<stamp>.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import sparsekit as sk
from sparsekit.benchmark.machine import script_results
from sparsekit.prune.masks import bake_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compact_rnn import MODELS  # noqa: E402  (the same three models)


def pruned_stock(model: torch.nn.Module, x: torch.Tensor, sparsity: float, granularity: str) -> torch.nn.Module:
    """``model`` with ``sparsity`` of every recurrent weight matrix's 32x32 blocks (or elements) zeroed."""
    conv = sk.nn.rnn_to_linear(copy.deepcopy(model))
    layers = [n for n, m in conv.named_modules() if isinstance(m, sk.nn.LinearRecurrent)]
    ignore = [n for n, m in conv.named_modules() if isinstance(m, torch.nn.Linear)
              and not any(n.startswith(f"{r}.") for r in layers)]
    pruner = sk.prune.Pruner(conv, (x,), criterion="magnitude", granularity=granularity, block=(32, 32),
                             sparsity=sparsity, ignore=ignore)
    pruner.step()
    bake_masks(conv)
    for name in layers:
        parent, _, child = name.rpartition(".")
        setattr(conv.get_submodule(parent) if parent else conv, child, conv.get_submodule(name).to_stock())
    return conv.eval()


def run(names: list[str], batch: int, steps: int, sparsities: list[float], granularity: str, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in names:
        make, data = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        x = data(batch, steps, gen)
        for s in sparsities:
            pruned = pruned_stock(model, data(2, 5, gen), s, granularity)
            with torch.no_grad():
                fast, report = sk.sparsify(pruned, (x,), cache=False, reps=reps)
            sk.verify(pruned, fast, (x,), atol=1e-4)
            converted = [n for n, m in fast.named_modules() if isinstance(m, sk.nn.LinearRecurrent)]
            layers = [{"name": d.name, "input": list(d.input_shape), "choice": d.choice,
                       "speedup": round(d.speedup, 3), "notes": d.notes} for d in report.layers]
            rows.append({"model": name, "batch": batch, "steps": steps, "sparsity": s, "granularity": granularity,
                         "dense_ms": report.dense_ms, "sparse_ms": report.sparse_ms, "speedup": report.speedup,
                         "converted": converted, "ideal": 1 / (1 - s), "layers": layers})
            print(f"{name} {granularity} {s:.0%}: dense {report.dense_ms:.1f} ms, sparse {report.sparse_ms:.1f} ms "
                  f"({report.speedup:.2f}x); converted: {converted or 'none (stock kept)'}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    ap.add_argument("--granularity", choices=["block", "element"], default="block")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    if a.batch < 1 or a.steps < 1 or a.reps < 1:
        raise SystemExit("--batch, --steps and --reps must be >= 1")
    if not all(0 < s < 1 for s in a.sparsity):
        raise SystemExit(f"--sparsity values must be in (0, 1), got {a.sparsity}")
    rows = run(a.models, a.batch, a.steps, a.sparsity, a.granularity, a.reps)
    base, info, stamp, where = script_results(a.out, "sparse_rnn", "cpu")
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "reps": a.reps, "rows": rows}, indent=1,
                                                    default=str))
    what = "32x32 blocks" if a.granularity == "block" else "single weights (unstructured)"
    lines = [f"# Recurrent models, recurrent weights sparse, sparsified ({where}, float32, torch {torch.__version__}, "
             f"{stamp} UTC)", "",
             f"Batch {a.batch}, {a.steps} steps; every recurrent weight matrix pruned to the sparsity by magnitude in "
             f"{what}, the other layers dense; `sk.sparsify` chose the formats. Dense = the stock model (oneDNN's "
             f"fused RNN kernels); medians of {a.reps} interleaved samples.", "",
             "| model | sparsity | dense ms | sparse ms | speedup | ideal | converted modules | recurrent weights' "
             "formats |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        formats = ", ".join(f"{d['name'].rpartition('.')[2]} {d['choice']}" for d in r["layers"]
                            if d["name"].rpartition(".")[0] in r["converted"])
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['ideal']:.0f}x | {', '.join(r['converted']) or 'none (stock kept)'} | "
                     f"{formats or '-'} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
