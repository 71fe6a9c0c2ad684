"""Benchmarks people can trust and extend: sparse vs dense side by side, sweeps, plots, reports.

    from sparsekit.benchmark import SweepConfig, run_kernel_sweep, save_results
    res = run_kernel_sweep(SweepConfig.quick_defaults())      # rows: speedup vs dense, % of ideal, roofline
    save_results(res, "bench/results")                        # .json + .csv + .md report + PNG plots

    shapes.py       real model shapes (BERT, LLaMA, ViT, ResNet-50, MobileNetV2)
    patterns.py     weights with an exact sparsity per pattern (BSR blocks, CSR, n:m)
    sweep.py        candidates (dense, torch.compile, torch.sparse, every usable sparsekit backend), the
                    correctness guard, interleaved timing, rows, saving
    whole_model.py  pruned + converted reference models vs dense
    machine.py      machine / versions / flags, measured peaks for the roofline
    report.py       markdown: break-even sparsity, best speedup, % of ideal; README block rewriting
    plots.py        PNG plots (matplotlib, optional)
    command.py      `sparsekit bench kernels|model` and `sparsekit report`

Submodules are imported on first use, so ``import sparsekit`` never pulls in matplotlib or tqdm.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SweepConfig": "sweep", "run_kernel_sweep": "sweep", "save_results": "sweep", "run_model_sweep": "whole_model",
    "break_even": "report", "load_results": "report", "to_markdown": "report", "plot_results": "plots",
    "LINEAR_SHAPES": "shapes", "CONV_SHAPES": "shapes", "get_shapes": "shapes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
