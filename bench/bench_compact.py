"""ResNet-50 (batch 8, 224x224, CPU): dense vs channel-pruned + compacted, sparsekit vs Torch-Pruning.

    python bench/bench_compact.py                 # sparsity 0.5, 5 timed reps per model
    python bench/bench_compact.py --reps 3 --threads 2
    python bench/bench_compact.py --model unet    # U-Net (batch 2, 128x128): concatenated skips, up-convolutions

Variants, timed side by side in one run (round-robin over the models, median of ``--reps``):

* dense                 the original ResNet-50 (or U-Net)
* sk-global             sparsekit: L1 group scores (mean over members, normalised per group), one global
                        threshold removing ``--sparsity`` of all prunable channel units, compacted
* tp-global / tp-layer  Torch-Pruning (``torch-pruning`` on PyPI, if installed): MagnitudePruner L1,
                        pruning_ratio ``--sparsity``, global_pruning True / False, fc ignored
* sk-layer              sparsekit layer-wise: ``--sparsity`` of every group (Torch-Pruning layer-wise's recipe)
* sk@tp-global / sk@tp-layer   sparsekit with its global sparsity searched so the parameter count equals
                        the Torch-Pruning model's (within 0.5%): the equal-parameter comparison

sparsekit's compacted model is checked against its group-masked reference with ``sk.verify`` (atol 1e-4,
on a small batch). The notes of sk-layer and sk@tp-global say whether their per-layer widths equal tp-layer's
and tp-global's (``width_note``): identical architectures can differ in speed only by run noise.
Results: bench/results/compact_<machine>_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsekit as sk
from sparsekit.benchmark.machine import cpu_tag, machine_info
from sparsekit.models import ResNet50, UNet
from sparsekit.prune.compact import compact, mask_groups
from sparsekit.prune.graph import DependencyGraph


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def layer_shapes(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Conv2d / ConvTranspose2d / Linear / BatchNorm2d, by module name."""
    return {n: tuple(mod.weight.shape) for n, mod in m.named_modules()
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, torch.nn.BatchNorm2d))}


def width_note(a: torch.nn.Module, b: torch.nn.Module, b_label: str) -> str:
    """Whether ``a`` and ``b`` have the same per-layer widths: if so, their speeds can only differ by noise."""
    sa, sb = layer_shapes(a), layer_shapes(b)
    differ = sum(sa.get(n) != sb.get(n) for n in sa.keys() | sb.keys())
    if not differ:
        return f"same per-layer widths as {b_label} (identical architecture: speed differences are run noise)"
    return f"{differ} of {len(sa.keys() | sb.keys())} layers differ in width from {b_label}"


def gmacs(m: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass on ``x`` (conv + transposed conv + linear), in G."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            total[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.ConvTranspose2d):    # every input value meets C_out * kh * kw weights
            total[0] += inp[0].numel() * mod.out_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total[0] += out.numel() * mod.in_features

    hs = [mod.register_forward_hook(hook) for mod in m.modules()
          if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]
    with torch.no_grad():
        m(x)
    for h in hs:
        h.remove()
    return total[0] / 1e9


def sk_model(model, x_small, graph, scores, sparsity, round_to=None):
    keep = graph.select(sparsity, scores, scope="global", round_to=round_to)
    return compact(model, x_small, keep, graph=graph), keep


def tp_model(model, x_small, ratio, global_pruning):
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(m, x_small, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=[m.fc])
    pruner.step()
    return m


def match_params(model, x_small, graph, scores, target, round_to=None):
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        small, _ = sk_model(model, x_small, graph, scores, mid, round_to)
        p = params(small)
        best = (mid, small) if best is None or abs(params(best[1]) - target) > abs(p - target) else best
        if abs(p - target) / target < 0.005:
            break
        lo, hi = (mid, hi) if p > target else (lo, mid)
    return best


def time_models(models: dict, x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)                                      # warm-up
        order = list(models)
        for i in range(reps):
            for k in order[i % len(order):] + order[:i % len(order)]:      # rotate who runs first
                m = models[k]
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "unet"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="default 8 (ResNet-50) / 2 (U-Net)")
    ap.add_argument("--size", type=int, default=None, help="image side, default 224 (ResNet-50) / 128 (U-Net)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--round-to", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    batch = a.batch or (8 if a.model == "resnet50" else 2)
    size = a.size or (224 if a.model == "resnet50" else 128)
    title = {"resnet50": "ResNet-50", "unet": "U-Net"}[a.model]
    torch.manual_seed(0)
    model = (ResNet50() if a.model == "resnet50" else UNet()).eval()
    with torch.no_grad():      # trained-looking BN statistics so L1 choices are not all ties
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.0)
                mod.bias.uniform_(-0.1, 0.1)
    x_small = torch.randn(1, 3, 64, 64)
    x = torch.randn(batch, 3, size, size)
    t0 = time.perf_counter()
    graph = DependencyGraph.build(model, x_small)
    scores = graph.group_scores()
    small, keep = sk_model(model, x_small, graph, scores, a.sparsity, a.round_to or None)
    build_s = time.perf_counter() - t0
    diffs = sk.verify(mask_groups(model, x_small, keep, graph=graph), small, x_small, atol=1e-4)
    models = {"dense": model, "sk-global": small}
    notes = {"sk-global": f"sparsity {a.sparsity} of {sum(g.size for g in graph.prunable)} channel units, "
                          f"verify max|diff| {max(diffs.values()):.2e}, graph+select+compact {build_s:.1f}s"}
    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except ImportError:
        have_tp = False
        notes["tp"] = "torch-pruning not installed: Torch-Pruning variants skipped"
    if have_tp:
        for label, glob in (("tp-global", True), ("tp-layer", False)):
            tpm = tp_model(model, x_small, a.sparsity, glob).eval()
            models[label] = tpm
            sp, m = match_params(model, x_small, graph, scores, params(tpm), a.round_to or None)
            models[f"sk@{label}"] = m
            notes[f"sk@{label}"] = f"sparsekit global sparsity {sp:.3f} to match {label} parameters"
    keep_l = graph.select(a.sparsity, scores, scope="layer", round_to=a.round_to or None)
    models["sk-layer"] = compact(model, x_small, keep_l, graph=graph)
    notes["sk-layer"] = f"sparsekit layer-wise: {a.sparsity} of every group's units (TP layer-wise's recipe)"
    for sk_label, tp_label in (("sk-layer", "tp-layer"), ("sk@tp-global", "tp-global")):
        if tp_label in models:
            notes[sk_label] += "; " + width_note(models[sk_label], models[tp_label], tp_label)
    load = os.getloadavg()
    times = time_models(models, x, a.reps)
    base = statistics.median(times["dense"])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        paired = statistics.median(d / t for d, t in zip(times["dense"], ts))   # same round, same load
        rows.append({"model": k, "params": params(models[k]), "gmacs": gmacs(models[k], x[:1]) * batch,
                     "median_s": med, "min_s": min(ts),
                     "speedup": base / med, "speedup_paired": paired, "speedup_min": min(times["dense"]) / min(ts),
                     "times_s": ts, "note": notes.get(k, "")})
    now = dt.datetime.now()
    meta = {"machine": cpu_tag(), "date": now.isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "net": a.model, "batch": batch, "size": size, "reps": a.reps, "sparsity": a.sparsity,
            "round_to": a.round_to,
            "argv": sys.argv}
    info = machine_info("cpu")     # the CPU class (bench/targets.py: which table these figures go in)
    meta.update({k: info.get(k) for k in ("cpu_model", "cpu_kernel_isa", "env")})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compact_{meta['machine']}_{now:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {title} channel pruning + compaction, batch {batch}, {size}x{size}, CPU",
             "", f"machine {meta['machine']}, torch {torch.__version__}, {meta['threads']} threads, load average "
             f"before {load[0]:.2f} / after {meta['loadavg_after'][0]:.2f}, {a.reps} reps (median), "
             f"sparsity {a.sparsity}", "",
             "| model | params (M) | GMACs | median s | speedup (medians) | speedup (paired per round, median) "
             "| speedup (mins) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gmacs']:.1f} | {r['median_s']:.3f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['speedup_paired']:.2f}x | {r['speedup_min']:.2f}x | {r['note']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
