"""`sparsekit demo`: the whole story on one reference model, every stage verified and timed against dense.

    1. dense original
    2. structured: channel pruning of the hidden channels (Pruner, granularity="channel"), then
       ``pruner.compact()`` -> a physically smaller dense model; verified == the channel-masked model
    3. block pruning of the compacted model's remaining weights (a second Pruner, granularity="block"), baked
       (dense storage, zeros still multiplied)
    4. ``sk.sparsify``: per layer the measured-fastest format (dense fallback); verified == the block-pruned model
    5. unstructured: element (magnitude) pruning of another copy of the compacted model's weights, baked, then
       ``sk.sparsify`` (typically CSR); verified == the element-pruned model
    6. ``sk.save`` -> ``sk.load`` of the block-sparsified model into a fresh instance; verified == it

All latencies come from one loop that runs every stage round-robin with the dense original (medians), so machine
noise hits them alike. Pruning here is one-shot on random weights, without fine-tuning: the demo shows speed and
exactness of each hand-off, not accuracy.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import models
from .models._base import scaled
from .nn import SparseConv2d, SparseLinear
from .prune import Pruner
from .serialize import load, save
from .sparsify import SparsifyReport, sparsify
from .timing import interleaved_median_ms
from .verify import verify

ATOL = 1e-4
DEMO_MODELS = ("ffn", "transformer")


@dataclass
class DemoConfig:
    model: str = "ffn"                    # "ffn" (BERT-base MLP) or "transformer" (2 BERT-base-wide layers)
    width: float = 1.0                    # scales the model's dims (tests use a small width)
    channels: float = 0.5                 # fraction of hidden channels removed by the structured stage
    channel_criterion: str = "l1"
    sparsity: float = 0.9                 # block sparsity of the compacted model's remaining weights
    criterion: str = "magnitude"
    block: int = 32
    unstructured: float = 0.95            # element sparsity of the unstructured stage (on the compacted model)
    formats: tuple[str, ...] | None = None  # sparsify candidates (None = every format)
    min_speedup: float = 1.1              # a sparse format must beat dense by this factor to be kept
    batch: int = 8
    tokens: int = 64
    reps: int = 10
    backend: str | None = None
    save: bool = True                     # include the sk.save -> sk.load round trip


# ------------------------------------------------------------------------------------------- model
def _check_config(cfg: object) -> DemoConfig:
    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    if cfg.model not in DEMO_MODELS:
        raise ValueError(f"model must be one of {DEMO_MODELS}, got {cfg.model!r}")
    for name in ("channels", "sparsity", "unstructured"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
    if not isinstance(cfg.width, (int, float)) or isinstance(cfg.width, bool) or not cfg.width > 0:
        raise ValueError(f"width must be a positive number (1.0 = full size), got {cfg.width!r}")
    for name in ("block", "batch", "tokens", "reps"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return cfg


def _build(cfg: DemoConfig) -> nn.Module:
    """A freshly seeded instance of the demo model (also the skeleton sk.load fills)."""
    torch.manual_seed(0)
    dim, hidden = scaled(768, cfg.width), scaled(3072, cfg.width)
    if cfg.model == "ffn":
        return models.FFN(dim=dim, hidden=hidden, tokens=cfg.tokens).eval()
    if dim % 12:
        raise ValueError(f"width must give a model dim divisible by 12 heads, got width={cfg.width} (dim {dim})")
    return models.TransformerEncoder(dim=dim, heads=12, ffn=hidden, layers=2, max_len=cfg.tokens,
                                     seq_len=cfg.tokens).eval()


def _describe_model(cfg: DemoConfig) -> str:
    dim, hidden = scaled(768, cfg.width), scaled(3072, cfg.width)
    if cfg.model == "ffn":
        return f"FFN {dim}->{hidden}->{dim}{' (BERT-base MLP)' if cfg.width == 1 else ''}"
    return f"2-layer transformer encoder, dim {dim}, FFN {hidden}, 12 heads"


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d))}


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear/Conv weight as stored (a sparse format's values and indices)."""
    total = 0
    for mod in _layers(model).values():
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            total += mod.weight_nbytes
        else:
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _takes_block(mod: nn.Module, block: int) -> bool:
    w = mod.weight
    return w.shape[0] % block == 0 and w[0].numel() % block == 0


# ------------------------------------------------------------------------------------------ stages
def _structured(dense: nn.Module, x: Tensor, cfg: DemoConfig) -> tuple[nn.Module, nn.Module]:
    """(channel-masked model, compacted model). Only the FFN hidden channels are pruned (rows of every fc1,
    coupled to the columns of its fc2): those compact cleanly, whereas attention rows feed per-head and residual
    couplings that compact() may not be able to remove, which would leave zero rows in the "compacted" model."""
    masked = copy.deepcopy(dense)
    others = [n for n in _layers(masked) if not n.endswith("fc1")]
    pruner = Pruner(masked, x, criterion=cfg.channel_criterion, granularity="channel", scope="layer",
                    sparsity=cfg.channels, ignore=others)
    pruner.step()
    return masked, pruner.compact()


def _block_pruned(compacted: nn.Module, x: Tensor, cfg: DemoConfig) -> tuple[nn.Module, list[str]]:
    """Block-prune a copy of every layer the block divides; masks baked so the model is plain and saveable.
    Returns (model, names of the layers left whole because the block does not divide them)."""
    pruned = copy.deepcopy(compacted)
    layers = _layers(pruned)
    whole = [n for n, m in layers.items() if not _takes_block(m, cfg.block)]
    if len(whole) == len(layers):
        raise ValueError(f"block must divide some layer's weight, got block={cfg.block} for weights "
                         f"{sorted({tuple(m.weight.shape) for m in layers.values()})} (width={cfg.width})")
    pruner = Pruner(pruned, x, criterion=cfg.criterion, granularity="block", scope="layer", sparsity=cfg.sparsity,
                    block=(cfg.block, cfg.block), ignore=whole)
    pruner.step()
    pruner.bake()
    return pruned, whole


def _element_pruned(compacted: nn.Module, x: Tensor, cfg: DemoConfig) -> nn.Module:
    """Unstructured: prune a copy of every layer's smallest-magnitude elements (cfg.criterion), masks baked."""
    pruned = copy.deepcopy(compacted)
    pruner = Pruner(pruned, x, criterion=cfg.criterion, granularity="element", scope="layer",
                    sparsity=cfg.unstructured)
    pruner.step()
    pruner.bake()
    return pruned


def _round_trip(fast: nn.Module, cfg: DemoConfig) -> nn.Module:
    """sk.save to a temporary directory, then sk.load into a fresh (full-width) instance."""
    with tempfile.TemporaryDirectory(prefix="sparsekit-demo-") as tmp:
        save(fast, tmp)
        return load(tmp, _build(cfg)).eval()


def _row(stage: str, model: nn.Module, max_diff: float | None, vs: str) -> dict[str, Any]:
    return {"stage": stage, "params": _params(model), "weight_bytes": _weight_bytes(model), "max_diff": max_diff,
            "vs": vs}


def save_demo_result(res: dict, text: str, out: str | Path) -> Path:
    """Write ``text`` (format_result's table) to ``<out>/demo_<machine>_<stamp>.txt`` and the data behind it
    (config, rows, per-layer choices, machine and versions) to the matching .json; returns the path without
    suffix. bench/make_readme_table.py puts the newest default-config one into the README."""
    from .benchmark.machine import script_results

    device = next(iter(res["models"]["dense"].parameters())).device.type
    base, info, _, _ = script_results(out, "demo", device)
    data = {"machine": info, "config": asdict(res["config"]), "default_config": res["config"] == DemoConfig(),
            "rows": res["rows"], "choices": {"block": res["report"].to_dict(),
                                             "unstructured": res["report_unstructured"].to_dict()},
            "text": text}
    base.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    base.with_suffix(".txt").write_text(text + "\n")
    return base


# ----------------------------------------------------------------------------------------- the run
def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage, verify each hand-off (raises sk.VerificationError if one is off by more than 1e-4) and
    time all stages against dense in one interleaved loop. Returns the rows and the models (also printed by
    ``format_result``)."""
    dense = _build(_check_config(cfg))
    x = dense.example_input(cfg.batch)
    masked, compacted = _structured(dense, x, cfg)
    compact_diff = max(verify(masked, compacted, x, atol=ATOL).values())
    pruned, whole = _block_pruned(compacted, x, cfg)
    sparsify_args = dict(formats=cfg.formats, min_speedup=cfg.min_speedup, cache=False, reps=max(3, cfg.reps // 2),
                         backend=cfg.backend, measure_model=False)
    fast, report = sparsify(pruned, x, **sparsify_args)
    sparse_diff = max(verify(pruned, fast, x, atol=ATOL).values())
    elements = _element_pruned(compacted, x, cfg)
    fast_elements, report_elements = sparsify(elements, x, **sparsify_args)
    elements_diff = max(verify(elements, fast_elements, x, atol=ATOL).values())

    stages = {"dense": dense, "compacted": compacted, "block-pruned": pruned, "sparsified": fast,
              "unstructured": fast_elements}
    rows = [_row("dense original", dense, None, "-"),
            _row(f"compacted ({cfg.channels:.0%} hidden ch.)", compacted, compact_diff, "channel-masked"),
            _row(f"block-pruned ({cfg.sparsity:.0%}, {cfg.block}x{cfg.block})", pruned, None,
                 "lossy step, dense storage"),
            _row("sparsified", fast, sparse_diff, "block-pruned"),
            _row(f"unstructured ({cfg.unstructured:.0%} elem.)", fast_elements, elements_diff,
                 "element-pruned compacted")]
    if cfg.save:
        loaded = stages["loaded"] = _round_trip(fast, cfg)
        rows.append(_row("saved -> loaded", loaded, max(verify(fast, loaded, x, atol=ATOL).values()), "sparsified"))
    times = interleaved_median_ms({k: (lambda m=m: m(x)) for k, m in stages.items()}, reps=cfg.reps)
    for row, key in zip(rows, stages):
        row["ms"] = times[key]
        row["speedup"] = times["dense"] / times[key]

    with torch.no_grad():  # what one-shot pruning without fine-tuning does to the outputs (not a verification)
        pruning_error = {"channel": float((dense(x) - masked(x)).abs().max()),
                         "block": float((compacted(x) - pruned(x)).abs().max()),
                         "element": float((compacted(x) - elements(x)).abs().max())}
    return {"config": cfg, "rows": rows, "report": report, "report_unstructured": report_elements,
            "models": stages, "input_shape": tuple(x.shape),
            "formats": {n: m.format for n, m in _layers(fast).items() if isinstance(m, (SparseLinear, SparseConv2d))},
            "formats_unstructured": {n: m.format for n, m in _layers(fast_elements).items()
                                     if isinstance(m, (SparseLinear, SparseConv2d))},
            "left_whole": whole, "pruning_error": pruning_error, "threads": torch.get_num_threads(),
            "dtype": str(next(dense.parameters()).dtype).replace("torch.", ""),
            "torch": torch.__version__}


# ------------------------------------------------------------------------------------------ output
def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _choices(report: SparsifyReport) -> list[str]:
    """One line per layer: the kept format, its measured speedup over dense, the two runners-up and dense."""
    out = []
    for d in report.layers:
        ranked = [(k, v) for k, v in sorted(d.times_ms.items(), key=lambda kv: kv[1]) if k not in (d.choice, "dense")]
        others = [f"{k} {v:.2f}" for k, v in ranked[:2]]
        if d.choice != "dense":
            others.append(f"dense {d.times_ms['dense']:.2f}")
        out.append(f"  {d.name:<20}{'x'.join(map(str, d.weight_shape)):>10} sparsity {d.sparsity:.2f} -> "
                   f"{d.choice:<9}{d.speedup:5.2f}x  (ms: {d.choice} {d.times_ms[d.choice]:.2f}; {', '.join(others)})")
    return out


def format_result(res: dict) -> str:
    cfg: DemoConfig = res["config"]
    inp = "x".join(map(str, res["input_shape"]))
    out = [f"sparsekit demo: {_describe_model(cfg)}, input {inp}",
           f"torch {res['torch']}, {res['threads']} threads, {res['dtype']}; latency = median of {cfg.reps} runs, "
           "every stage interleaved with dense in one loop",
           "",
           f"{'stage':<30}{'params':>9}{'weight MB':>11}{'latency ms':>12}{'speedup':>9}{'max |diff|':>12}  vs",
           ]
    for r in res["rows"]:
        diff = f"{r['max_diff']:.1e}" if r["max_diff"] is not None else "-"
        out.append(f"{r['stage']:<30}{_fmt_count(r['params']):>9}{r['weight_bytes'] / 2**20:>11.2f}"
                   f"{r['ms']:>12.2f}{r['speedup']:>8.2f}x{diff:>12}  {r['vs']}")
    out += ["", f"verified (sk.verify, atol {ATOL:.0e}): compacted == channel-masked, sparsified == block-pruned,",
            "  unstructured == element-pruned compacted" + (", loaded == sparsified" if cfg.save else ""),
            f"sparsify's per-layer choice (measured at the real input, kept only if >= {cfg.min_speedup}x dense):"]
    out += _choices(res["report"])
    if res["left_whole"]:
        out.append(f"  left dense ({cfg.block}x{cfg.block} blocks do not divide them): {', '.join(res['left_whole'])}")
    out.append(f"  unstructured stage ({cfg.unstructured:.0%} of each compacted layer's elements):")
    out += _choices(res["report_unstructured"])
    err = res["pruning_error"]
    out.append(f"pruning is one-shot on random weights, no fine-tuning: output change dense->channel-masked "
               f"{err['channel']:.2g}, compacted->block-pruned {err['block']:.2g}, compacted->element-pruned "
               f"{err['element']:.2g} (accuracy is not the point here)")
    out.append(f"(FLOP-ideal speedup over the compacted model: {1 / (1 - cfg.sparsity):.1f}x at {cfg.sparsity:.0%} "
               f"block sparsity, {1 / (1 - cfg.unstructured):.1f}x at {cfg.unstructured:.0%} element sparsity)")
    return "\n".join(out)
