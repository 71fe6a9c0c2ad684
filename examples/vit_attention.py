"""A transformer on torch's own attention (nn.TransformerEncoder / nn.MultiheadAttention), end to end: remove
whole heads and MLP channels, convert the attention so its q / k / v are Linear layers, prune every projection
to 90% 16x16 blocks, sparsify, check, save and load. Random weights: speed and equivalence are the point."""

import tempfile

import torch

import sparsekit as sk

torch.manual_seed(0)
model = sk.models.VisionTransformer(image=64, patch=8, dim=256, heads=8, mlp=1024, layers=4).eval()
x = model.example_input(8)
params = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731

# 1. structured: a quarter of the heads and MLP channels, through the dependency graph (stock modules)
heads = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.25)
heads.step()
small = heads.compact()
print(f"compacted: {params(model)} -> {params(small)} params, heads per layer "
      f"{[layer.self_attn.num_heads for layer in small.encoder.layers]}")

# 2. unstructured within the projections: nn.MultiheadAttention keeps q / k / v in one packed parameter, which
# element / block pruning does not reach; mha_to_linear gives it Linear children (same outputs)
small = sk.nn.mha_to_linear(small)
blocks = sk.prune.Pruner(small, x, criterion="magnitude", granularity="block", block=(16, 16), sparsity=0.9,
                         ignore=["patch", "fc"])
blocks.step()
blocks.bake()

# 3. hand-off: each projection measured at its real input, kept sparse where it is faster
fast, report = sk.sparsify(small, x, cache=False)
print(report)
diffs = sk.verify(small, fast, x, atol=1e-4)
print(f"sparsified == block-pruned: max |diff| {max(diffs.values()):.2e}")

with tempfile.TemporaryDirectory() as path:
    sk.save(fast, path)
    loaded = sk.load(path, sk.models.VisionTransformer(image=64, patch=8, dim=256, heads=8, mlp=1024, layers=4))
    print(f"loaded == sparsified: max |diff| {max(sk.verify(fast, loaded, x, atol=0).values()):.2e}")
