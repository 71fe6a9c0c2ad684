"""End-to-end: pruned models through sk.sparsify, timed against the dense original in the same run.

    python bench/bench_sparsify_models.py [--models bert,resnet50] [--reps 5] [--layers 12]
    python bench/bench_sparsify_models.py --device cuda --dtype float16 --batch 32 --out gpu_out/results
    python bench/bench_sparsify_models.py --compile        # also both models under torch.compile
    python bench/bench_sparsify_models.py --device cuda --dtype float16 --cuda-graphs   # also as CUDA-graph replays

bert      BERT-base-sized encoder (hidden 768, 12 heads, FFN 3072, seq 128, batch 8; sparsekit.models), every
          Linear but the classifier pruned to 90% with 32x32 blocks (magnitude, layer scope), then sparsified.
resnet50  ResNet-50 (batch 8, 224x224): 50% global channel pruning compacted (dependency graph), then 80% 32x32
          block sparsity in the remaining 3x3 convs, then sparsified.
r3d18     R3D-18 (sparsekit.models; 3-D convs, 16x112x112 video clips, batch 8): the same as resnet50, the 3x3x3
          convs block-sparse (SparseConv3d).
unet      U-Net (sparsekit.models; 128x128 images, batch 2 unless --batch): the same as resnet50 through its
          concatenated skips, the 3x3 convs and the 2x2 stride-2 up-convolutions block-sparse (SparseConv2d,
          SparseConvTranspose2d).
hf-bert   the same pruning as bert on Hugging Face transformers' BertModel (BERT-base config, random weights, no
          download, no pooler; every Linear pruned): the user's own model, not ours (needs transformers).
hf-gpt2   the same on transformers' GPT2Model (GPT-2 small config, seq 128), after sk.nn.conv1d_to_linear.
vit       ViT-B/16 built from torch's stock nn.TransformerEncoder (nn.MultiheadAttention; sparsekit.models,
          224x224, batch 8): the same pruning on every Linear but the classifier, the attention's packed q / k / v
          included (sk.nn.mha_to_linear; the patch embedding stays dense), against the stock model and its fused
          eval kernels.

Pruning (and the CNNs' compaction) runs on CPU in float32; the models are then moved to --device/--dtype, where
sparsify measures its candidates and the timing runs (CUDA: synchronised). Writes
<--out, default bench/results>/sparsify_models_<machine>_<date>.json/.md with medians (interleaved dense/sparse
runs), per-model speedup, and the Linear weight bytes after sparsify vs dense. A model whose sparsified output
differs from the pruned dense one by more than the dtype's tolerance is still timed; the row says so.

--compile adds torch.compile(dynamic=False) of the dense original and of the sparsified model (fullgraph=True:
the sparse ops go through their fake implementations) to the same interleaved loop, and reports the speedup of
the compiled pair and of the best sparse variant over the best dense one (dense compiled is not always faster
than eager: the slower is still shown).

On CPU the dense original is also timed with every nn.Linear on oneDNN with its weight prepacked for the rows it
sees (dense_onednn: torch.ops.mkldnn._reorder_linear_weight + _linear_pointwise; F.linear runs MKL, which on AMD
CPUs takes its AVX2 path, 2.2-2.4x slower in fp32 on a Zen 5 EPYC); "best sparse vs best dense" counts it among
the dense variants. Not for a model whose Linears never run as modules (a stock nn.TransformerEncoderLayer's fused
eval path): the row says why.

--cuda-graphs (CUDA): sparsify times its candidates as CUDA-graph replays (sk.sparsify(cuda_graphs=True): a layer
is judged by its kernels, not by the host time of an eager call), and the dense original and the sparsified model
are also timed as CUDA-graph replays (sparsekit.timing.graph_replay_median_ms), beside the eager calls: the speeds
of the two models run under CUDA graphs (torch.compile(mode="reduce-overhead"), torch.cuda.make_graphed_callables).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsekit as sk
from sparsekit.benchmark.machine import script_results
from sparsekit.nn import SparseConv2d, SparseConvTranspose2d, SparseLinear
from sparsekit.prune.compact import compact
from sparsekit.prune.graph import DependencyGraph
from sparsekit.timing import graph_replay_median_ms, interleaved_median_ms

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# sk.verify tolerance (atol, rtol x max |dense output|) per dtype: fp32 as before; half types round every layer
VERIFY_TOL = {torch.float32: (1e-3, 0.0), torch.float16: (1e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def _place(model: nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """Model and input on the benchmark's device/dtype (token ids keep their integer dtype)."""
    model = model.to(device=device, dtype=dtype).eval()
    return model, (x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device))


def _verify(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict:
    """{"verify_max_diff": ..., "verify_error": message or None}: a mismatch is reported, not raised."""
    atol, rtol = VERIFY_TOL[dtype]
    try:
        diffs = sk.verify(reference, candidate, x, atol=atol, rtol=rtol)
    except sk.VerificationError as exc:
        with torch.no_grad():   # a Hugging Face model returns a ModelOutput: compare its first tensor
            first = lambda out: out if isinstance(out, torch.Tensor) else out[0]
            diff = float((first(reference(x)).float() - first(candidate(x)).float()).abs().max())
        return {"verify_max_diff": diff, "verify_error": str(exc)[:500]}
    return {"verify_max_diff": max(diffs.values()), "verify_error": None}


class _OneDNNLinear(nn.Module):
    """A dense nn.Linear on oneDNN with its weight prepacked once for ``rows`` rows of input
    (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise)."""

    def __init__(self, lin: nn.Linear, rows: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), rows)
        # the layer's own parameters stay readable (nn.TransformerEncoderLayer's fused path reads them)
        self.weight, self.bias = lin.weight, lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _onednn_dense(dense: nn.Module, x: torch.Tensor) -> tuple[nn.Module | None, str]:
    """(a copy of ``dense`` with every nn.Linear on oneDNN, each weight prepacked for the rows the layer sees on
    ``x``, or None; why not). None too where no swapped layer runs (nn.TransformerEncoderLayer's fused eval path
    reads the weights itself: that copy would be the MKL model under another name)."""
    if not torch.backends.mkldnn.is_available():
        return None, "torch has no oneDNN here"
    rows: dict[str, int] = {}

    def seen(name: str):
        def hook(_mod: nn.Module, inp: tuple, _out: object) -> None:   # (a hook's return value replaces the output)
            rows.setdefault(name, inp[0].numel() // inp[0].shape[-1])
        return hook

    hooks = [m.register_forward_hook(seen(n)) for n, m in dense.named_modules() if type(m) is nn.Linear]
    try:
        with torch.no_grad():
            dense(x)
    finally:
        for h in hooks:
            h.remove()
    model = copy.deepcopy(dense)
    swapped = []
    try:
        for name, rows_seen in rows.items():
            parent, _, child = name.rpartition(".")
            layer = _OneDNNLinear(model.get_submodule(name), rows_seen)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            swapped.append(layer)
        with torch.no_grad():
            model(x)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    if not any(layer.calls for layer in swapped):
        return None, "no nn.Linear of the model runs as a module (fused paths read the weights)"
    return model, ""


def _timed(dense: nn.Module, fast: nn.Module, x: torch.Tensor, reps: int, device: str, compile_: bool,
           extra: dict | None = None, graphs: bool = False) -> dict:
    """Interleaved medians of dense and sparse (and ``extra``), plus their torch.compile'd versions with
    ``compile_``: {"dense_ms", "sparse_ms", ..., "dense_compile_ms", "sparse_compile_ms", "dense_compile_s",
    "sparse_compile_s", "speedup_compiled", "speedup_best"}; with ``graphs`` also dense and sparse as CUDA-graph
    replays: {"dense_graph_ms", "sparse_graph_ms", "speedup_graphs"} (or "graph_error")."""
    fns = {"dense": lambda: dense(x), "sparse": lambda: fast(x), **(extra or {})}
    out: dict = {}
    if device == "cpu":
        onednn, why = _onednn_dense(dense, x)
        if onednn is None:      # reported, not fatal
            out["onednn_note"] = why
        else:
            fns["dense_onednn"] = lambda: onednn(x)
    if compile_:
        torch._dynamo.reset()
        dense_c = torch.compile(dense, dynamic=False)
        sparse_c = torch.compile(fast, dynamic=False, fullgraph=True)
        try:
            with torch.no_grad():
                for name, fn in (("dense", dense_c), ("sparse", sparse_c)):
                    t0 = time.perf_counter()
                    fn(x)
                    out[f"{name}_compile_s"] = time.perf_counter() - t0
        except Exception as exc:   # a compile failure is a result to report; the eager timing goes on
            out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            compile_ = False
        else:
            fns |= {"dense_compile": lambda: dense_c(x), "sparse_compile": lambda: sparse_c(x)}
    t = interleaved_median_ms(fns, warmup=1, reps=reps, device=device)
    out |= {f"{k}_ms": v for k, v in t.items()}
    out["speedup"] = t["dense"] / t["sparse"]
    best_dense = min(t[k] for k in ("dense", "dense_compile", "dense_onednn") if k in t)
    if "dense_onednn" in t:
        out["speedup_vs_onednn"] = t["dense_onednn"] / t["sparse"]
    if compile_:
        out["speedup_compiled"] = t["dense_compile"] / t["sparse_compile"]
    if compile_ or "dense_onednn" in t:
        out["speedup_best"] = best_dense / min(t[k] for k in ("sparse", "sparse_compile") if k in t)
    if graphs:
        try:
            g = graph_replay_median_ms({"dense": lambda: dense(x), "sparse": lambda: fast(x)}, warmup=2, reps=reps,
                                       calls_per_graph=1)
        except RuntimeError as exc:   # a model that cannot be captured is a result to report
            out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        else:
            out |= {"dense_graph_ms": g["dense"], "sparse_graph_ms": g["sparse"],
                    "speedup_graphs": g["dense"] / g["sparse"]}
    return out


def _transformer_model(kind: str, layers: int, batch: int) -> tuple[nn.Module, torch.Tensor, list[str], str]:
    """(model, token ids [batch, 128], names of the Linears left dense, label) for ``kind``: "bert" is
    sparsekit.models' encoder (its classifier `fc` stays dense); "hf-bert" Hugging Face transformers' BertModel
    from the BERT-base config (no pooler); "hf-gpt2" transformers' GPT2Model (GPT-2 small config), its Conv1D
    projections turned into nn.Linear by sk.nn.conv1d_to_linear first. Random weights, no download."""
    torch.manual_seed(0)
    if kind == "bert":
        cfg = {**sk.models.bert_base_config(), "layers": layers, "max_len": 128}
        dense = sk.models.TransformerEncoder(**cfg, seq_len=128).eval()
        return dense, dense.example_input(batch), ["fc"], f"BERT-base encoder ({layers} layers)"
    if kind == "vit":
        dense = sk.models.VisionTransformer(**{**sk.models.vit_b_16_config(), "layers": layers}).eval()
        return dense, dense.example_input(batch), ["fc", "patch"], f"ViT-B/16 of stock torch modules ({layers} layers)"
    try:
        import transformers
    except ImportError:
        raise SystemExit(f"--models {kind} needs the transformers package (pip install transformers)") from None
    if kind == "hf-bert":
        cfg = transformers.BertConfig(num_hidden_layers=layers)       # the defaults are BERT-base's
        dense = transformers.BertModel(cfg, add_pooling_layer=False).eval()
        label = f"Hugging Face BertModel ({layers} layers)"
    else:
        cfg = transformers.GPT2Config(n_layer=layers)                  # the defaults are GPT-2 small's
        dense = sk.nn.conv1d_to_linear(transformers.GPT2Model(cfg).eval(), inplace=True)
        label = f"Hugging Face GPT2Model ({layers} layers)"
    return dense, torch.randint(0, cfg.vocab_size, (batch, 128)), [], label


def transformer(kind: str, reps: int, layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                batch: int = 8, compile_: bool = False, min_speedup: float = 1.1, graphs: bool = False) -> dict:
    dense, x, keep_dense, label = _transformer_model(kind, layers, batch)
    # nn.MultiheadAttention's packed q / k / v become Linear layers to be pruned; the stock model (its fused
    # eval kernels) stays the dense baseline
    masked = sk.nn.mha_to_linear(dense)
    pruner = sk.prune.Pruner(masked, x, criterion="magnitude", granularity="block", block=(32, 32),
                             scope="layer", sparsity=0.9, ignore=[masked.get_submodule(n) for n in keep_dense])
    pruner.step()
    dense, _ = _place(dense, x, device, dtype)
    masked, x = _place(masked, x, device, dtype)
    t0 = time.perf_counter()
    fast, report = sk.sparsify(masked, x, formats=["dense", "bsr"], blocks=[(32, 32), (16, 16)], cache=False,
                               reps=3, measure_model=False, min_speedup=min_speedup, cuda_graphs=graphs)
    sparsify_s = time.perf_counter() - t0
    check = _verify(masked, fast, x, dtype)
    t = _timed(dense, fast, x, reps, device, compile_, graphs=graphs)
    lin_dense = sum(m.weight.numel() * m.weight.element_size() for n, m in sk.nn.mha_to_linear(dense).named_modules()
                    if isinstance(m, nn.Linear) and n not in keep_dense)     # (attention's q / k / v included)
    # the Linear weights after sparsify, the ones left dense included (all dense would read 100%, not 0%)
    lin_sparse = sum(m.weight_nbytes if isinstance(m, SparseLinear) else m.weight.numel() * m.weight.element_size()
                     for n, m in fast.named_modules()
                     if isinstance(m, (SparseLinear, nn.Linear)) and n not in keep_dense)
    # an attention sparsify kept stock holds its q / k / v in in_proj_weight
    lin_sparse += sum(m.in_proj_weight.numel() * m.in_proj_weight.element_size() for m in fast.modules()
                      if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)
    n_sparse = sum(isinstance(m, SparseLinear) for m in fast.modules())
    shape = "224x224" if kind == "vit" else "seq 128"
    return {"model": f"{label}, {shape}, batch {batch}",
            "pruning": "90% 32x32 blocks, magnitude", "device": device, "dtype": str(dtype).split(".")[-1],
            **t, "target": 3.0 if kind in ("bert", "hf-bert") else None,   # issue 8 names BERT-base only
            "sparse_layers": n_sparse, "choices": sorted({d.choice for d in report.layers}),
            "linear_weight_bytes_pct": 100.0 * lin_sparse / lin_dense, "memory_target_pct": 15.0,
            **check, "sparsify_s": sparsify_s}


def _compacted_cnn(kind: str, reps: int, device: str, dtype: torch.dtype, batch: int, compile_: bool,
                   min_speedup: float, graphs: bool = False) -> dict:
    """ResNet-50 (2-D), R3D-18 (3-D, video clips) or U-Net (2-D, with up-convolutions): 50% global channel
    pruning compacted, then 80% 32x32 block sparsity in the remaining 3x3(x3) convs (and U-Net's transposed
    convs), sparsified, timed against the dense original."""
    torch.manual_seed(0)
    if kind == "resnet50":
        dense, conv, label = sk.models.ResNet50().eval(), nn.Conv2d, f"ResNet-50, batch {batch}, 224x224"
    elif kind == "unet":
        dense, conv = sk.models.UNet().eval(), nn.Conv2d
        label = f"U-Net, batch {batch}, {dense.image_size}x{dense.image_size}"
    else:
        dense, conv, label = sk.models.R3D18().eval(), nn.Conv3d, f"R3D-18, batch {batch}, 16x112x112 clips"
    x = dense.example_input(batch)
    graph = DependencyGraph.build(dense, x[:1])
    # channel counts rounded to 32 so the remaining 3x3 convs take 32x32 blocks
    keep = graph.select(0.5, graph.group_scores("l1"), scope="global", round_to=32)
    small = compact(dense, x[:1], keep, graph=graph)
    blockable = [m for m in small.modules() if isinstance(m, (conv, nn.ConvTranspose2d))
                 and (set(m.kernel_size) == {3} or isinstance(m, nn.ConvTranspose2d))
                 and m.out_channels % 32 == 0 and m.in_channels % 32 == 0 and m.groups == 1]
    pruner = sk.prune.Pruner(small, x[:1], criterion="magnitude", granularity="block", block=(32, 32),
                             scope="layer", sparsity=0.8,
                             ignore=[m for m in small.modules() if isinstance(m, (conv, nn.ConvTranspose2d, nn.Linear))
                                     and m not in blockable])
    pruner.step()
    dense, _ = _place(dense, x, device, dtype)
    small, x = _place(small, x, device, dtype)
    t0 = time.perf_counter()
    fast, report = sk.sparsify(small, x, formats=["dense", "bsr"], blocks=[(32, 32)], cache=False, reps=3,
                               measure_model=False, min_speedup=min_speedup, cuda_graphs=graphs)
    sparsify_s = time.perf_counter() - t0
    check = _verify(small, fast, x, dtype)
    t = _timed(dense, fast, x, reps, device, compile_, extra={"compact": lambda: small(x)}, graphs=graphs)
    where = {"resnet50": "3x3 convs", "r3d18": "3x3x3 convs", "unet": "3x3 convs and 2x2 up-convolutions"}[kind]
    return {"model": label, "pruning": f"50% global channels compacted + 80% 32x32 blocks in {where}",
            "device": device, "dtype": str(dtype).split(".")[-1],
            **t, "compact_only_speedup": t["dense_ms"] / t["compact_ms"],
            "target": 2.5 if kind == "resnet50" else None,      # issue 8 names ResNet-50 only
            "sparse_layers": sum(isinstance(m, (SparseConv2d, SparseConvTranspose2d)) for m in fast.modules()),
            "sparse_transposed": sum(isinstance(m, SparseConvTranspose2d) for m in fast.modules()),
            "choices": sorted({d.choice for d in report.layers}), **check, "sparsify_s": sparsify_s}


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert,resnet50",
                    help="comma-separated: bert, resnet50, r3d18, unet, vit, hf-bert, hf-gpt2 (the Hugging Face "
                         "models need transformers)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (12 = BERT-base, GPT-2 small)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where sparsify and timing run")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size of every model (default 8; U-Net 2)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile'd dense and sparsified models in the same loop")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA: sparsify times CUDA-graph replays, and both models are also timed as replays")
    ap.add_argument("--min-speedup", type=float, default=1.1,
                    help="sk.sparsify's min_speedup: a layer goes sparse only if it beats dense by this (default 1.1)")
    ap.add_argument("--out", default=str(RESULTS), metavar="DIR", help="where the .json/.md go (default bench/results)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    for name in names:
        if name not in ("bert", "resnet50", "r3d18", "unet", "vit", "hf-bert", "hf-gpt2"):
            raise SystemExit(f"--models: unknown model {name!r}; expected bert, resnet50, r3d18, unet, vit, "
                             "hf-bert and/or hf-gpt2")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: CUDA is not available (torch {torch.__version__})")
    if a.cuda_graphs and a.device != "cuda":
        raise SystemExit("--cuda-graphs needs --device cuda (CUDA graphs are a CUDA feature)")
    if a.reps < 1 or (a.batch is not None and a.batch < 1) or a.layers < 1:
        raise SystemExit("--reps, --batch and --layers must be >= 1")
    if not a.min_speedup > 0:
        raise SystemExit(f"--min-speedup must be > 0, got {a.min_speedup}")
    dtype = DTYPES[a.dtype]
    rows = []
    for name in names:
        batch = a.batch if a.batch is not None else 2 if name == "unet" else 8
        if name in ("resnet50", "r3d18", "unet"):
            row = _compacted_cnn(name, a.reps, a.device, dtype, batch, a.compile, a.min_speedup, a.cuda_graphs)
        else:
            row = transformer(name, a.reps, a.layers, a.device, dtype, batch, a.compile, a.min_speedup, a.cuda_graphs)
        print(json.dumps(row, indent=1))
        rows.append(row)
    base, info, stamp, where = script_results(a.out, "sparsify_models", a.device)
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1, default=str))
    lines = [f"# sparsify end to end ({where}, {a.dtype}, torch {torch.__version__}, {stamp} UTC)", "",
             "| model | pruning | dense ms | sparse ms | speedup | target | notes |", "|---|---|---|---|---|---|---|"]
    compiled = [r for r in rows if "speedup_compiled" in r]
    for r in rows:
        note = (f"Linear weights {r['linear_weight_bytes_pct']:.1f}% of dense bytes (target <= 15%)"
                if "linear_weight_bytes_pct" in r else f"compaction alone {r['compact_only_speedup']:.2f}x")
        if "speedup_vs_onednn" in r:
            note += (f"; vs the dense model's Linears on oneDNN, prepacked ({_ms(r['dense_onednn_ms'])} ms): "
                     f"{r['speedup_vs_onednn']:.2f}x")
        if r.get("compile_error"):
            note += f"; torch.compile FAILED: {r['compile_error'][:200]}"
        if r.get("verify_error"):
            note += f"; OUTPUT MISMATCH (max |diff| {r['verify_max_diff']:.3g})"
        target = "-" if r["target"] is None else f">= {r['target']}x"
        lines.append(f"| {r['model']} | {r['pruning']} | {_ms(r['dense_ms'])} | {_ms(r['sparse_ms'])} | "
                     f"{r['speedup']:.2f}x | {target} | {note}; choices {', '.join(r['choices'])} |")
    if compiled:
        lines += ["", "Under torch.compile(dynamic=False) (sparsified model with fullgraph=True), same loop:", "",
                  "| model | dense compiled ms | sparse compiled ms | speedup compiled | best sparse vs best dense |"
                  " compile s (dense / sparse) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {_ms(r['dense_compile_ms'])} | {_ms(r['sparse_compile_ms'])} | "
                  f"{r['speedup_compiled']:.2f}x | {r['speedup_best']:.2f}x | "
                  f"{r['dense_compile_s']:.0f} / {r['sparse_compile_s']:.0f} |" for r in compiled]
    graphed = [r for r in rows if "speedup_graphs" in r or "graph_error" in r]
    if graphed:
        lines += ["", "As CUDA-graph replays (host time gone; sparsify chose its layers the same way), same run:", "",
                  "| model | dense graph ms | sparse graph ms | speedup under CUDA graphs |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | FAILED: {r['graph_error'][:200]} | - | - |" if "graph_error" in r else
                  f"| {r['model']} | {_ms(r['dense_graph_ms'])} | {_ms(r['sparse_graph_ms'])} | "
                  f"{r['speedup_graphs']:.2f}x |" for r in graphed]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
