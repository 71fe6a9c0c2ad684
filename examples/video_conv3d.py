"""A video model (3-D convolutions), end to end: remove half the channels of an R3D-18 through the 3-D dependency
graph (residuals, BatchNorm3d), prune the remaining 3x3x3 convs to 80% 32x32 blocks, sparsify (nn.Conv3d ->
SparseConv3d where it is measured faster), check, save and load. Random weights and small clips: speed and
equivalence are the point."""

import tempfile
import time

import torch
from torch import nn

import sparsekit as sk
from sparsekit.prune.compact import compact
from sparsekit.prune.graph import DependencyGraph

torch.manual_seed(0)
model = sk.models.R3D18(num_classes=10, frames=8, image_size=64).eval()
x = model.example_input(2)
params = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731

# 1. structured: half the channels by global L1 over whole coupled groups (the residual streams included), the
# counts rounded to multiples of 32 so that the convs left take 32x32 blocks; compact builds the smaller model
graph = DependencyGraph.build(model, x)
keep = graph.select(0.5, graph.group_scores("l1"), scope="global", round_to=32)
small = compact(model, x, keep, graph=graph)
print(f"compacted: {params(model)} -> {params(small)} params")

# 2. block sparsity in the 3x3x3 convs (the stem, the 1x1x1 shortcuts and the classifier stay dense)
convs = [m for m in small.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)]
blocks = sk.prune.Pruner(small, x, criterion="magnitude", granularity="block", block=(32, 32), sparsity=0.8,
                         ignore=[m for m in small.modules() if isinstance(m, (nn.Conv3d, nn.Linear))
                                 and m not in convs])
blocks.step()
blocks.bake()

# 3. hand-off: each conv measured at its real input, kept sparse where it is faster
fast, report = sk.sparsify(small, x, cache=False)
print(report)
diffs = sk.verify(small, fast, x, atol=1e-4)
print(f"sparsified == pruned: max |diff| {max(diffs.values()):.2e}")


def ms(m: nn.Module) -> float:
    with torch.no_grad():
        m(x)
        t = time.perf_counter()
        for _ in range(3):
            m(x)
    return (time.perf_counter() - t) / 3 * 1e3


print(f"dense {ms(model):.1f} ms, compacted {ms(small):.1f} ms, compacted + sparse {ms(fast):.1f} ms per batch")

with tempfile.TemporaryDirectory() as path:
    sk.save(fast, path)
    loaded = sk.load(path, sk.models.R3D18(num_classes=10, frames=8, image_size=64)).eval()
    print(f"loaded == sparsified: max |diff| {max(sk.verify(fast, loaded, x, atol=0).values()):.2e}")
