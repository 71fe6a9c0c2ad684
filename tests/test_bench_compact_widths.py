"""bench/bench_compact.py's width comparison: equal per-layer widths are reported as an identical architecture."""

import copy

import torch
from _scripts import load_bench_script

from sparsekit.models import ResNet20
from sparsekit.prune.compact import compact
from sparsekit.prune.graph import DependencyGraph

bench = load_bench_script("bench_compact")


def test_width_note_same_and_different():
    model = ResNet20(width=0.5).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = DependencyGraph.build(model, x)
    small = compact(model, x, graph.select(0.5, scope="layer"), graph=graph)
    shapes = bench.layer_shapes(small)
    assert shapes["conv1"] == tuple(small.conv1.weight.shape) and shapes["fc"] == (10, small.fc.in_features)
    assert bench.width_note(small, copy.deepcopy(small), "twin") == (
        "same per-layer widths as twin (identical architecture: speed differences are run noise)")
    # one group narrower: its conv, BN and the next conv's input change
    (g,) = [g for g in graph.prunable if any(m.module == "layer1.0.conv1" and m.axis == "out" for m in g.members)]
    other = compact(model, x, {g.id: torch.arange(2)}, graph=graph)
    assert bench.width_note(other, model, "dense") == f"3 of {len(shapes)} layers differ in width from dense"
