"""`sparsekit demo`: prune a reference model, swap in sparse modules, verify, and time sparse vs dense.

Everything is measured in the same run: per layer on the layer's real input, then the whole model, with
medians of interleaved repetitions (dense first, sparse second, round-robin).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import models
from .nn import SparseConv2d, SparseLinear, convert_modules
from .prune import Pruner
from .sparsify import capture_inputs
from .timing import interleaved_median_ms
from .verify import verify


@dataclass
class DemoConfig:
    model: str = "ffn"
    sparsity: float = 0.9
    granularity: str = "block"
    criterion: str = "magnitude"
    format: str = "bsr"
    block: int = 32
    batch: int = 8
    tokens: int = 64
    reps: int = 10
    backend: str | None = None


def _build(cfg: DemoConfig) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if cfg.model == "ffn":
        model = models.FFN(dim=768, hidden=3072, tokens=cfg.tokens)   # BERT-base MLP shapes
    else:
        model = models.build(cfg.model)
    return model.eval(), model.example_input(cfg.batch)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole story; returns the measured rows (also printed by main)."""
    dense, x = _build(cfg)
    masked = copy.deepcopy(dense)
    pruner = Pruner(masked, x, criterion=cfg.criterion, granularity=cfg.granularity, scope="layer",
                    sparsity=cfg.sparsity, block=(cfg.block, cfg.block))
    pruner.step()
    sparse = convert_modules(copy.deepcopy(masked), format=cfg.format, block=cfg.block, backend=cfg.backend)
    diffs = verify(masked, sparse, x, atol=1e-4)

    rows = []
    inputs = capture_inputs(sparse, x, lambda m: isinstance(m, (SparseLinear, SparseConv2d)))
    for name, inp in inputs.items():
        layer = sparse.get_submodule(name)
        dense_layer = dense.get_submodule(name)
        t = interleaved_median_ms({"dense": lambda d=dense_layer, i=inp: d(i), "sparse": lambda s=layer, i=inp: s(i)},
                                  reps=cfg.reps)
        rows.append({"layer": name, "shape": tuple(layer.weight_shape), "input": tuple(inp.shape),
                     "density": layer.density, "format": layer.format, "dense_ms": t["dense"],
                     "sparse_ms": t["sparse"], "speedup": t["dense"] / t["sparse"]})
    t = interleaved_median_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, reps=cfg.reps)
    rows.append({"layer": "whole model", "shape": None, "input": tuple(x.shape), "density": None,
                 "format": cfg.format, "dense_ms": t["dense"], "sparse_ms": t["sparse"],
                 "speedup": t["dense"] / t["sparse"]})
    return {"config": cfg, "rows": rows, "max_abs_diff": max(diffs.values()),
            "skipped": getattr(sparse, "sparsekit_skipped", {}), "threads": torch.get_num_threads()}


def format_result(res: dict) -> str:
    cfg: DemoConfig = res["config"]
    out = [f"sparsekit demo: {cfg.model}, {cfg.criterion} {cfg.granularity} pruning to {cfg.sparsity:.0%} "
           f"(layer scope), {cfg.format} format, block {cfg.block}; torch {torch.__version__}, "
           f"{res['threads']} threads, fp32, medians of {cfg.reps} interleaved runs",
           f"verified: sparse model == masked model (max |diff| {res['max_abs_diff']:.2e} <= 1e-4)", "",
           f"{'layer':<14}{'weight':>14}{'input':>18}{'density':>9}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}"]
    for r in res["rows"]:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else "-"
        dens = f"{r['density']:.3f}" if r["density"] is not None else "-"
        out.append(f"{r['layer']:<14}{shape:>14}{'x'.join(map(str, r['input'])):>18}{dens:>9}"
                   f"{r['dense_ms']:>10.2f}{r['sparse_ms']:>11.2f}{r['speedup']:>8.2f}x")
    for name, why in res["skipped"].items():
        out.append(f"kept dense: {name} ({why})")
    out.append(f"(ideal speedup at {cfg.sparsity:.0%} sparsity: {1 / (1 - cfg.sparsity):.1f}x)")
    return "\n".join(out)
