"""Pruning on real data: scikit-learn's bundled digits (1797 8x8 images, no download).

Trains LeNet-5, a small VGG-16-BN and a small ResNet-20 from ``sparsekit.models``, then

1. reproduces Salama et al. 2019's ablation (seed 003, Table 4) at small scale on LeNet-5: structured vs
   unstructured, global vs layer-wise, one-shot vs iterative, all at the same parameter budget;
2. compares every criterion at equal parameter counts (layer-wise channel pruning at one sparsity gives
   every criterion the same structure) on each model, before and after a short fine-tune.

Parameters and FLOPs are counted after physical removal of the pruned channels (``sparsekit.prune.cost``);
CPU latency is measured on the physically smaller model ``sparsekit.prune.compact`` builds from the masks
(the dependency graph removes coupled channels together: residual streams too) and on the masked model for
unstructured pruning. Results go to ``bench/results/prune_digits_<machine>_<date>.md`` and ``.json``.

Iterative pruning (seed 003, sec. 3: prune, retrain, raise the pruning percentage): ``--steps`` steps, each
removing the same fraction of the parameters still there (the parameter budget falls geometrically to
``1 - target``), ``--ft-epochs`` of fine-tuning after each and ``--final-epochs`` after the last. Global
channel pruning keeps at least ``--min-channels`` channels in every layer: without a floor the threshold
leaves LeNet's conv2 2 of its 16 filters and the model loses 1-2 points. The default floor (6) was chosen on
a validation split (a stratified quarter of the training split; the test split unused) among 1, 3, 4 and 6
with 10 or 15 steps: 10 steps lost 1.6 / 0.3 / 0.6 points and gained 1.3 at 6.

    python bench/prune_digits.py            # everything (about 15 minutes on 2 otherwise idle cores)
    python bench/prune_digits.py --quick    # fewer epochs and criteria, a smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit import models
from sparsekit.prune import Pruner, criteria
from sparsekit.prune.compact import compact_from_masks
from sparsekit.prune.cost import model_cost
from sparsekit.timing import interleaved_median_ms

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------- data
def load_digits(seed: int = 0) -> dict[str, Tensor]:
    """Stratified 70/30 train/test split of sklearn's digits, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - a clear message instead of a traceback
        sys.exit("bench/prune_digits.py needs scikit-learn: pip install scikit-learn")
    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.3, stratify=d.target, random_state=seed)
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


class Resized(nn.Module):
    """Upsamples 8x8 digits to ``size`` before ``inner`` (VGG-16 needs 32x32 for its five poolings)."""

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__()
        self.inner, self.size = inner, size

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "lenet5":
        return models.LeNet5(num_classes=10, in_channels=1, image_size=8)
    if name == "vgg16_bn":
        return Resized(models.VGG16_BN(num_classes=10, width=0.125, in_channels=1, image_size=32), 32)
    if name == "resnet20":
        return models.ResNet20(num_classes=10, width=0.5, in_channels=1, image_size=8)
    raise ValueError(name)


# -------------------------------------------------------------------------------------------- training
def train(model: nn.Module, data: dict[str, Tensor], epochs: int, lr: float, seed: int = 0,
          batch: int = 64) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    g = torch.Generator().manual_seed(seed)
    x, y = data["x_train"], data["y_train"]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, Tensor]) -> float:
    model.eval()
    pred = model(data["x_test"]).argmax(1)
    return 100.0 * float((pred == data["y_test"]).float().mean())


def calib_batches(data: dict[str, Tensor], n: int = 4, size: int = 64) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(data["y_train"]), generator=g)[: n * size]
    return [(data["x_train"][idx[i:i + size]], data["y_train"][idx[i:i + size]]) for i in range(0, n * size, size)]


# ------------------------------------------------------------------------------- compact copy (latency)
def compact_copy(model: nn.Module, example: Tensor) -> nn.Module | None:
    """The physically smaller model of a channel-masked ``model`` (``compact_from_masks``: the dependency
    graph's keep-sets, coupled channels removed together); None when it cannot be built (e.g. a group lost
    every channel), and then latency is measured on the masked model."""
    try:
        small, _ = compact_from_masks(model, example)
    except ValueError:
        return None
    return small.eval()


# ----------------------------------------------------------------------------------------- experiments
def cost_row(model: nn.Module, example: Tensor) -> dict[str, float]:
    c = model_cost(model, example)
    return {"params": c["params"], "index_params": c["index_params"], "flops": c["flops"],
            "params_removed": 100.0 * (1 - c["params"] / c["dense_params"]),
            "flops_removed": 100.0 * (1 - c["flops"] / c["dense_flops"])}


def sparsity_for_budget(pruner: Pruner, example: Tensor, keep_fraction: float) -> float:
    """Smallest sparsity whose masks (previewed, nothing applied) keep <= keep_fraction of the params."""
    scores = pruner.scores()
    dense = model_cost(pruner.model, example, masks={})["dense_params"]
    lo, hi = 0.0, 0.999
    for _ in range(22):
        mid = (lo + hi) / 2
        kept = model_cost(pruner.model, example, masks=pruner.select(scores, mid))["params"] / dense
        lo, hi = (lo, mid) if kept <= keep_fraction else (mid, hi)
    return hi


def prune_finetune(base: nn.Module, data: dict[str, Tensor], example: Tensor, *, criterion: str,
                   granularity: str, scope: str, keep_fraction: float, steps: int, ft_epochs: int,
                   final_epochs: int, lr: float, min_channels: int = 1) -> tuple[nn.Module, float]:
    """Prune ``base`` (a copy) to ``keep_fraction`` of its parameters in ``steps`` steps, fine-tuning
    ``ft_epochs`` after each step and ``final_epochs`` at the end. Step ``i`` keeps ``keep_fraction **
    ((i + 1) / steps)`` of the parameters (each step removes the same fraction of those left); its sparsity
    is searched so that budget is met on the current weights. ``min_channels``: see ``Pruner``."""
    model = copy.deepcopy(base)
    calib = calib_batches(data)
    needs_calib = criteria.get(criterion).data_dependent
    target = [0.0]
    p = Pruner(model, example, criterion=criterion, granularity=granularity, scope=scope, sparsity=0.999,
               calib=calib if needs_calib else None, schedule=lambda t: target[0], min_channels=min_channels)
    for i in range(steps):
        budget = keep_fraction ** ((i + 1) / steps)
        target[0] = sparsity_for_budget(p, example, budget)
        p.step()
        train(model, data, ft_epochs if i < steps - 1 else final_epochs, lr=lr, seed=100 + i)
    return model, target[0]


def latency_ms(named: dict[str, nn.Module], example: Tensor) -> dict[str, float]:
    torch.set_num_threads(1)
    with torch.no_grad():
        fns = {k: (lambda m=m: m(example)) for k, m in named.items()}
        return interleaved_median_ms(fns, warmup=5, reps=30)


def ablation(base: nn.Module, data: dict[str, Tensor], example: Tensor, args: argparse.Namespace) -> list[dict]:
    """Seed 003 Table 4 at small scale, LeNet-5, all variants at the same parameter budget."""
    keep = 1.0 - args.target
    variants = [
        ("Ours (global, structured l1_mean, iterative)", "l1_mean", "channel", "global", args.steps),
        ("Ours one-shot", "l1_mean", "channel", "global", 1),
        ("Non-global (layer-wise channel l1, iterative)", "l1", "channel", "layer", args.steps),
        ("Non-structured (global magnitude, iterative)", "magnitude", "element", "global", args.steps),
    ]
    rows = []
    for label, crit, gran, scope, steps in variants:
        t0 = time.perf_counter()
        ft = args.ft_epochs
        final = args.final_epochs + (args.steps - 1) * ft if steps == 1 else args.final_epochs
        model, s = prune_finetune(base, data, example, criterion=crit, granularity=gran, scope=scope,
                                  keep_fraction=keep, steps=steps, ft_epochs=ft, final_epochs=final, lr=args.ft_lr,
                                  min_channels=args.min_channels)
        row = {"model": "lenet5", "variant": label, "criterion": crit, "granularity": gran, "scope": scope,
               "steps": steps, "min_channels": args.min_channels if scope == "global" and gran == "channel" else None,
               "sparsity": s, "accuracy": accuracy(model, data), **cost_row(model, example),
               "seconds": time.perf_counter() - t0, "_model": model}
        rows.append(row)
        print(f"  {label}: acc {row['accuracy']:.2f} params -{row['params_removed']:.1f}% "
              f"({row['seconds']:.0f}s)", flush=True)
    return rows


def criteria_table(name: str, base: nn.Module, data: dict[str, Tensor], example: Tensor, sparsity: float,
                   names: list[str], ft_epochs: int, lr: float) -> list[dict]:
    rows = []
    calib = calib_batches(data, n=2)
    for crit in names:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        # bn_scale scores the BatchNorm after a layer: leave out the Linear layers, which have none
        ignore = [k for k, v in model.named_modules() if isinstance(v, nn.Linear)] if crit == "bn_scale" else None
        try:
            p = Pruner(model, example, criterion=crit, granularity="channel", scope="layer", sparsity=sparsity,
                       calib=calib if criteria.get(crit).data_dependent else None, ignore=ignore)
        except ValueError as e:
            rows.append({"model": name, "criterion": crit, "skipped": str(e).split(";")[0][:90]})
            print(f"  {crit}: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        p.step()
        acc0 = accuracy(model, data)
        train(model, data, ft_epochs, lr=lr, seed=7)
        rows.append({"model": name, "criterion": crit, "sparsity": sparsity, "accuracy_pruned": acc0,
                     "accuracy": accuracy(model, data), **cost_row(model, example),
                     "seconds": time.perf_counter() - t0, "_model": model})
        print(f"  {crit}: {acc0:.2f} -> {rows[-1]['accuracy']:.2f} ({rows[-1]['seconds']:.1f}s)", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def write_report(out: dict[str, Any], path: Path) -> None:
    L = [f"# Pruning on scikit-learn digits ({out['date']})", "",
         f"Machine: {out['machine']}. Script: `bench/prune_digits.py{' --quick' if out['quick'] else ''}` "
         f"({out['seconds']:.0f} s). Data: 1797 8x8 digits, stratified 70/30 split "
         f"({out['n_train']} train / {out['n_test']} test), accuracy on the held-out test split.",
         "Params/FLOPs: after physically removing pruned channels (and their consumers' inputs), classifier "
         "included; FLOPs = multiply-accumulates per image. Index params: unstructured weights stored with "
         "one index each (Salama et al. 2019, Table 4 'Eff. Param'). Latency: median ms for a batch of "
         f"{out['latency_batch']} on 1 thread, interleaved runs; 'compact' = physically smaller copy, "
         "'masked' = same shapes as dense (no sparse kernel).", "",
         "## Baselines", "", "| model | test acc % | params | MFLOPs | latency ms |", "|---|---|---|---|---|"]
    for b in out["baselines"]:
        L.append(f"| {b['model']} | {b['accuracy']:.2f} | {b['params']:.0f} | {b['flops'] / 1e6:.3f} | "
                 f"{fmt(b.get('latency_ms'), '.3f')} |")
    base = out["baselines"][0]["accuracy"]
    L += ["", f"## Ablation of seed 003 on LeNet-5 (target: remove >= {100 * out['target']:.0f}% of parameters)",
          "", f"Iterative: {out['recipe']['steps']} steps, each removing the same fraction of the remaining "
          f"parameters, {out['recipe']['ft_epochs']} fine-tune epochs after each and {out['recipe']['final_epochs']} "
          f"after the last (Adam, lr {out['recipe']['ft_lr']:g}, cosine); one-shot: the same epochs in one "
          f"fine-tune. Global channel pruning keeps >= {out['recipe']['min_channels']} channels per layer (a floor "
          "chosen on a validation split of the training data, see the script's docstring).",
          "", "| variant | test acc % | acc change | params | params removed % | index params | MFLOPs | "
          "FLOPs removed % | latency ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["ablation"]:
        L.append(f"| {r['variant']} | {r['accuracy']:.2f} | {r['accuracy'] - base:+.2f} | {r['params']:.0f} | "
                 f"{r['params_removed']:.1f} | {r['index_params']:.0f} | {r['flops'] / 1e6:.4f} | "
                 f"{r['flops_removed']:.1f} | {fmt(r.get('latency_ms'), '.3f')} ({r.get('latency_kind', '-')}) |")
    goal = out["ablation"][0]
    ok = goal["params_removed"] >= 100 * out["target"] and goal["accuracy"] >= base - 0.5
    L += ["", f"Goal (global structured l1_mean, iterative: >= {100 * out['target']:.0f}% params removed, "
          f"<= 0.5 points lost): **{'met' if ok else 'NOT met'}** ({goal['params_removed']:.1f}% removed, "
          f"{goal['accuracy'] - base:+.2f} points)."]
    for model_name, rows in out["criteria"].items():
        b = next(x for x in out["baselines"] if x["model"] == model_name)
        done = [r for r in rows if "skipped" not in r]
        if not done:
            continue
        L += ["", f"## Criteria at equal parameter counts: {model_name} (layer-wise channel sparsity "
              f"{done[0]['sparsity']:.2f}, {out['criteria_ft_epochs']} fine-tune epochs; dense "
              f"{b['accuracy']:.2f}%)", "",
              "| criterion | acc % pruned | acc % fine-tuned | params | params removed % | MFLOPs | latency ms |",
              "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r:
                L.append(f"| {r['criterion']} | n/a: {r['skipped']} | | | | | |")
                continue
            L.append(f"| {r['criterion']} | {r['accuracy_pruned']:.2f} | {r['accuracy']:.2f} | {r['params']:.0f} "
                     f"| {r['params_removed']:.1f} | {r['flops'] / 1e6:.4f} | {fmt(r.get('latency_ms'), '.3f')} |")
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, LeNet criteria only")
    ap.add_argument("--target", type=float, default=0.9, help="fraction of LeNet-5 parameters to remove")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, help="iterative pruning steps (default 10; --quick 3)")
    ap.add_argument("--ft-epochs", type=int, help="fine-tuning epochs after each step (default 15; --quick 2)")
    ap.add_argument("--final-epochs", type=int, help="fine-tuning epochs after the last step (default 80; --quick 4)")
    ap.add_argument("--min-channels", type=int, default=6,
                    help="channels every layer keeps under global channel pruning (default 6)")
    args = ap.parse_args(argv)
    q = args.quick
    steps, ft, final = (3, 2, 4) if q else (10, 15, 80)
    args.steps = steps if args.steps is None else args.steps
    args.ft_epochs = ft if args.ft_epochs is None else args.ft_epochs
    args.final_epochs = final if args.final_epochs is None else args.final_epochs
    args.ft_lr = 1e-3
    epochs = {"lenet5": 8 if q else 60, "vgg16_bn": 4 if q else 12, "resnet20": 4 if q else 20}
    torch.set_num_threads(1)      # small models: one thread is as fast and robust to a busy machine
    t_start = time.perf_counter()
    data = load_digits()
    example = data["x_test"][:2]
    lat_batch = data["x_test"][:64]
    out: dict[str, Any] = {"date": dt.date.today().isoformat(), "machine": machine(), "quick": q,
                           "target": args.target, "n_train": len(data["y_train"]), "n_test": len(data["y_test"]),
                           "latency_batch": len(lat_batch), "baselines": [], "criteria": {},
                           "criteria_ft_epochs": 1 if q else 3,
                           "recipe": {k: getattr(args, k) for k in ("steps", "ft_epochs", "final_epochs", "ft_lr",
                                                                    "min_channels")}}
    bases = {}
    for name in (["lenet5"] if q else ["lenet5", "vgg16_bn", "resnet20"]):
        t0 = time.perf_counter()
        model = build(name)
        train(model, data, epochs[name], lr=2e-3)
        bases[name] = model
        c = model_cost(model, example)
        out["baselines"].append({"model": name, "accuracy": accuracy(model, data), "params": c["params"],
                                 "flops": c["flops"], "epochs": epochs[name], "_model": model})
        print(f"{name}: {out['baselines'][-1]['accuracy']:.2f}% in {time.perf_counter() - t0:.0f}s", flush=True)

    print("ablation (LeNet-5)", flush=True)
    out["ablation"] = ablation(bases["lenet5"], data, example, args)

    all_names = criteria.available()
    quick_names = ["magnitude", "l1", "l1_mean", "fpgm", "apoz", "taylor", "thinet"]
    sparsity = {"lenet5": 0.5, "vgg16_bn": 0.5, "resnet20": 0.3}
    for name, base in bases.items():
        print(f"criteria ({name})", flush=True)
        out["criteria"][name] = criteria_table(name, base, data, example, sparsity[name],
                                               quick_names if q else all_names, out["criteria_ft_epochs"], 1e-3)

    # latency: dense vs compact (plain chains) or masked
    for b in out["baselines"]:
        lat = {"dense": b["_model"]}
        rows = [r for r in out["ablation"] if b["model"] == "lenet5"] + \
               [r for r in out["criteria"].get(b["model"], []) if "_model" in r]
        for i, r in enumerate(rows):
            small = compact_copy(r["_model"], example) if r.get("granularity", "channel") == "channel" else None
            r["latency_kind"] = "compact" if small is not None else "masked"
            lat[str(i)] = small if small is not None else r["_model"]
        ms = latency_ms(lat, lat_batch)
        b["latency_ms"] = ms["dense"]
        for i, r in enumerate(rows):
            r["latency_ms"] = ms[str(i)]
    out["seconds"] = time.perf_counter() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{platform.machine()}-{os.cpu_count()}c"
    stem = args.out / f"prune_digits_{tag}_{out['date']}{'_quick' if q else ''}"
    clean = json.loads(json.dumps(out, default=lambda o: None))
    for section in [clean["baselines"], clean["ablation"], *clean["criteria"].values()]:
        for r in section:
            r.pop("_model", None)
    stem.with_suffix(".json").write_text(json.dumps(clean, indent=1) + "\n")
    write_report(out, stem.with_suffix(".md"))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
