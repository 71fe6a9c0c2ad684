"""End-to-end: pruned models through sk.sparsify, timed against the dense original in the same run.

    python bench/bench_sparsify_models.py [--models bert,resnet50] [--reps 5] [--layers 12]

bert      BERT-base-sized encoder (hidden 768, 12 heads, FFN 3072, seq 128, batch 8; sparsekit.models), every
          Linear but the classifier pruned to 90% with 32x32 blocks (magnitude, layer scope), then sparsified.
resnet50  ResNet-50 (batch 8, 224x224): 50% global channel pruning compacted (dependency graph), then 80% 32x32
          block sparsity in the remaining 3x3 convs, then sparsified.

Writes bench/results/sparsify_models_<machine>_<date>.json/.md with medians (interleaved dense/sparse runs),
per-model speedup, and the Linear weight bytes after sparsify vs dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import sparsekit as sk
from sparsekit.benchmark.machine import machine_info
from sparsekit.nn import SparseConv2d, SparseLinear
from sparsekit.prune.compact import compact
from sparsekit.prune.graph import DependencyGraph
from sparsekit.timing import interleaved_median_ms

RESULTS = Path(__file__).resolve().parent / "results"


def bert(reps: int, layers: int) -> dict:
    cfg = {**sk.models.bert_base_config(), "layers": layers, "max_len": 128}
    torch.manual_seed(0)
    dense = sk.models.TransformerEncoder(**cfg, seq_len=128).eval()
    x = dense.example_input(8)
    masked = copy.deepcopy(dense)
    pruner = sk.prune.Pruner(masked, x, criterion="magnitude", granularity="block", block=(32, 32),
                             scope="layer", sparsity=0.9, ignore=[masked.fc])
    pruner.step()
    t0 = time.perf_counter()
    fast, report = sk.sparsify(masked, x, formats=["dense", "bsr"], blocks=[(32, 32), (16, 16)], cache=False,
                               reps=3, measure_model=False)
    sparsify_s = time.perf_counter() - t0
    diffs = sk.verify(masked, fast, x, atol=1e-3)
    t = interleaved_median_ms({"dense": lambda: dense(x), "sparse": lambda: fast(x)}, warmup=1, reps=reps)
    lin_dense = sum(m.weight.numel() * 4 for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "fc")
    lin_sparse = sum(m.weight_nbytes for m in fast.modules() if isinstance(m, SparseLinear))
    n_sparse = sum(isinstance(m, SparseLinear) for m in fast.modules())
    return {"model": f"BERT-base encoder ({layers} layers), seq 128, batch 8", "pruning": "90% 32x32 blocks, magnitude",
            "dense_ms": t["dense"], "sparse_ms": t["sparse"], "speedup": t["dense"] / t["sparse"], "target": 3.0,
            "sparse_layers": n_sparse, "choices": sorted({d.choice for d in report.layers}),
            "linear_weight_bytes_pct": 100.0 * lin_sparse / lin_dense, "memory_target_pct": 15.0,
            "verify_max_diff": max(diffs.values()), "sparsify_s": sparsify_s}


def resnet50(reps: int) -> dict:
    torch.manual_seed(0)
    dense = sk.models.ResNet50().eval()
    x = dense.example_input(8)
    graph = DependencyGraph.build(dense, x[:1])
    # channel counts rounded to 32 so the remaining 3x3 convs take 32x32 blocks
    keep = graph.select(0.5, graph.group_scores("l1"), scope="global", round_to=32)
    small = compact(dense, x[:1], keep, graph=graph)
    blockable = [m for m in small.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                 and m.out_channels % 32 == 0 and m.in_channels % 32 == 0 and m.groups == 1]
    pruner = sk.prune.Pruner(small, x[:1], criterion="magnitude", granularity="block", block=(32, 32),
                             scope="layer", sparsity=0.8,
                             ignore=[m for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                                     and m not in blockable])
    pruner.step()
    t0 = time.perf_counter()
    fast, report = sk.sparsify(small, x, formats=["dense", "bsr"], blocks=[(32, 32)], cache=False, reps=3,
                               measure_model=False)
    sparsify_s = time.perf_counter() - t0
    diffs = sk.verify(small, fast, x, atol=1e-3)
    t = interleaved_median_ms({"dense": lambda: dense(x), "compact": lambda: small(x), "sparse": lambda: fast(x)},
                              warmup=1, reps=reps)
    return {"model": "ResNet-50, batch 8, 224x224", "pruning": "50% global channels compacted + 80% 32x32 blocks "
            "in 3x3 convs", "dense_ms": t["dense"], "compact_ms": t["compact"], "sparse_ms": t["sparse"],
            "speedup": t["dense"] / t["sparse"], "compact_only_speedup": t["dense"] / t["compact"], "target": 2.5,
            "sparse_layers": sum(isinstance(m, SparseConv2d) for m in fast.modules()),
            "choices": sorted({d.choice for d in report.layers}), "verify_max_diff": max(diffs.values()),
            "sparsify_s": sparsify_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert,resnet50")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12, help="BERT encoder layers (12 = BERT-base)")
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        if name not in ("bert", "resnet50"):
            raise SystemExit(f"--models: unknown model {name!r}; expected bert and/or resnet50")
        row = bert(a.reps, a.layers) if name == "bert" else resnet50(a.reps)
        print(json.dumps(row, indent=1))
        rows.append(row)
    info = machine_info("cpu")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"sparsify_models_cpu-{torch.get_num_threads()}t_{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1, default=str))
    lines = [f"# sparsify end to end ({info.get('cpu_model', '')}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, {stamp} UTC)", "",
             "| model | pruning | dense ms | sparse ms | speedup | target | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = (f"Linear weights {r['linear_weight_bytes_pct']:.1f}% of dense bytes (target <= 15%)"
                if "linear_weight_bytes_pct" in r else f"compaction alone {r['compact_only_speedup']:.2f}x")
        lines.append(f"| {r['model']} | {r['pruning']} | {r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | "
                     f"{r['speedup']:.2f}x | >= {r['target']}x | {note}; choices {', '.join(r['choices'])} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")


if __name__ == "__main__":
    main()
