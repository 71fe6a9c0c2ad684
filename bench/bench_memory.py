"""Peak RSS of a fresh process loading the saved 90%-block-sparse BERT-base encoder vs the dense one.

    python bench/bench_memory.py [--layers 12] [--keep DIR]

1. prepare (its own process): the BERT-base-sized encoder of bench_sparsify_models.py (hidden 768, 12 heads,
   FFN 3072, max_len 128) saved dense with sk.save; then every encoder Linear (not the classifier) pruned to 90%
   with 32x32 blocks (magnitude, layer scope), baked, converted to BSR 32x32 (convert_modules) and saved too.
   Records the encoder's Linear weight bytes (dense vs BSR values + indices), that no dense weight stays
   referenced after the swap (weakrefs), and each model's output on a reference input.
2. measure: for each saved model and skeleton, a FRESH interpreter imports torch + sparsekit (and torch's meta
   kernels, which a meta skeleton imports lazily), reads ru_maxrss (the baseline), builds the skeleton sk.load
   needs, loads, runs one forward (batch 1, seq 128) and reports ru_maxrss again, the output's max |diff| from
   step 1, which dense weights are still referenced and whether any dense-shaped float tensor is alive (gc
   scan). Skeletons:
     init   TransformerEncoder(...) as is: its dense Linear weights are allocated and initialised first
     empty  built under torch.device("meta"), then .to_empty(device="cpu"): storage allocated, never written
     meta   built under torch.device("meta") and passed to sk.load as is
This driver never builds a model itself: a child's ru_maxrss starts at its parent's peak (Linux keeps the
high-water mark across fork/exec), so a large parent would inflate every baseline. VmHWM (/proc) is recorded too.

Writes <--out, default bench/results>/memory_<machine>_<UTC date-time>.md / .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEQ = 128
CASES = (("dense", "init"), ("dense", "empty"), ("sparse", "init"), ("sparse", "empty"), ("sparse", "meta"))
MEMORY_TARGET_PCT = 15.0


# ------------------------------------------------------------------------------ in the child processes
def _config(layers: int) -> dict:
    import sparsekit as sk

    return {**sk.models.bert_base_config(), "layers": layers, "max_len": SEQ, "seq_len": SEQ}


def _encoder_linears(model) -> dict:
    from torch import nn

    from sparsekit.nn import SparseLinear

    return {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, (nn.Linear,
                                                                                                  SparseLinear))}


def _linear_bytes(model) -> int:
    from sparsekit.nn import SparseLinear

    return sum(m.weight_nbytes if isinstance(m, SparseLinear) else m.weight.numel() * m.weight.element_size()
               for m in _encoder_linears(model).values())


def _rss() -> dict[str, int]:
    """ru_maxrss (bytes), and VmRSS / VmHWM of this process from /proc (bytes; absent off Linux)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"ru_maxrss": peak if sys.platform == "darwin" else peak * 1024}   # Linux reports KiB
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def prepare(out_dir: Path, layers: int) -> dict:
    """Build, save dense, prune + convert, save sparse; returns byte counts, checks and machine info."""
    import gc
    import weakref

    import torch
    from safetensors.torch import save_file

    import sparsekit as sk
    from sparsekit.benchmark.machine import machine_info, machine_slug
    from sparsekit.nn import SparseLinear, convert_modules

    torch.manual_seed(0)
    model = sk.models.TransformerEncoder(**_config(layers)).eval()
    x = model.example_input(1)
    with torch.no_grad():
        ref = {"dense": model(x)}
    dense_bytes = _linear_bytes(model)
    sk.save(model, out_dir / "dense")
    pruner = sk.prune.Pruner(model, x, criterion="magnitude", granularity="block", block=(32, 32), scope="layer",
                             sparsity=0.9, ignore=[model.fc])
    pruner.step()
    pruner.bake()
    del pruner   # it holds the layers: the swapped dense weights must have no owner left
    weights = {n: weakref.ref(m.weight) for n, m in _encoder_linears(model).items()}
    convert_modules(model, format="bsr", block=32)
    gc.collect()
    with torch.no_grad():
        ref["sparse"] = model(x)
    sk.save(model, out_dir / "sparse")
    save_file({k: v.contiguous() for k, v in {**ref, "input": x}.items()}, str(out_dir / "reference.safetensors"))
    info = machine_info("cpu")
    return {"machine": info, "slug": machine_slug(info), "dense_linear_bytes": dense_bytes,
            "sparse_linear_bytes": _linear_bytes(model),
            "sparse_layers": sum(isinstance(m, SparseLinear) for m in model.modules()),
            "dense_weights_alive_after_swap": [n for n, r in weights.items() if r() is not None],
            "file_bytes": {k: (out_dir / k / "model.safetensors").stat().st_size for k in ("dense", "sparse")}}


def _skeleton(layers: int, mode: str):
    import torch

    import sparsekit as sk

    if mode == "init":
        return sk.models.TransformerEncoder(**_config(layers)).eval()
    with torch.device("meta"):
        model = sk.models.TransformerEncoder(**_config(layers)).eval()
    return model.to_empty(device="cpu") if mode == "empty" else model


def _dense_shaped_alive(shapes: set[tuple[int, ...]]) -> int:
    """Float tensors alive anywhere in the process (gc scan) with a swapped layer's dense shape, either way round."""
    import gc

    import torch

    gc.collect()
    both = shapes | {s[::-1] for s in shapes}
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"
               and o.is_floating_point() and tuple(o.shape) in both)


def measure(model_dir: Path, ref_file: Path, kind: str, mode: str, layers: int) -> dict:
    """Runs in a fresh interpreter: RSS after imports, after the skeleton, after sk.load, after one forward."""
    t0 = time.perf_counter()
    import gc
    import weakref

    import torch
    from safetensors.torch import load_file

    import sparsekit as sk

    with torch.device("meta"):  # the first meta-device op imports torch's meta kernels (~125 MB of Python
        torch.nn.Embedding(8, 8)  # modules): import them in every case, so every baseline includes them
    res: dict = {"kind": kind, "skeleton": mode, "import_s": time.perf_counter() - t0, "baseline": _rss()}
    spec = json.loads((model_dir / "sparsekit.json").read_text())
    skeleton = _skeleton(layers, mode)
    res["after_skeleton"] = _rss()
    swapped = {n: m for n, m in _encoder_linears(skeleton).items() if n in spec["modules"]}
    shapes = {tuple(m.weight.shape) for m in swapped.values()}
    weights = {n: weakref.ref(m.weight) for n, m in swapped.items()}
    res["swapped"] = len(swapped)
    del swapped
    t0 = time.perf_counter()
    model = sk.load(model_dir, skeleton)
    del skeleton
    gc.collect()
    res["load_s"] = time.perf_counter() - t0
    res["after_load"] = _rss()
    res["meta_tensors_left"] = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    ref = load_file(str(ref_file))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(ref["input"])
        res["forward_s"] = time.perf_counter() - t0
        res["max_diff"] = float((out - ref[kind]).abs().max())
        res["error"] = None
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        res["max_diff"], res["error"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    del ref
    res["end"] = _rss()
    res["dense_weights_alive"] = [n for n, r in weights.items() if r() is not None and not r().is_meta]
    res["dense_shaped_tensors_alive"] = _dense_shaped_alive(shapes) if shapes else 0
    res["linear_bytes"] = _linear_bytes(model)
    res["tensor_bytes"] = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()
                                                                      if not t.is_meta}.values())
    return res


# ------------------------------------------------------------------------------------------ the driver
def _child(args: list[str]) -> dict:
    """Run this file in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _row(r: dict) -> str:
    peak, base = r["end"]["ru_maxrss"], r["baseline"]["ru_maxrss"]
    if r["error"]:
        check = f"fails: {r['error'][:90]}"
    else:
        check = f"max \\|diff\\| {r['max_diff']:.1e}"
    if r["meta_tensors_left"]:
        check += f"; {len(r['meta_tensors_left'])} tensors left on meta (e.g. {r['meta_tensors_left'][0]})"
    alive = len(r["dense_weights_alive"]) + r["dense_shaped_tensors_alive"] if r["swapped"] else "n/a"
    return (f"| {r['kind']} | {r['skeleton']} | {_mb(base)} | {_mb(r['after_skeleton']['VmRSS'])} | "
            f"{_mb(r['after_load']['VmRSS'])} | {_mb(peak)} | **{_mb(peak - base)}** | {_mb(r['end'].get('VmHWM'))} "
            f"| {_mb(r['linear_bytes'])} | {alive} | {check} |")


def report(prep: dict, rows: list[dict], layers: int, stamp: str) -> str:
    info = prep["machine"]
    pct = 100.0 * prep["sparse_linear_bytes"] / prep["dense_linear_bytes"]
    by = {(r["kind"], r["skeleton"]): r for r in rows}
    inc = {k: r["end"]["ru_maxrss"] - r["baseline"]["ru_maxrss"] for k, r in by.items() if not r["error"]}
    lines = [f"# peak RSS loading a saved model in a fresh process ({info.get('cpu_model', '')}, torch "
             f"{info.get('torch')}, {stamp} UTC)", "",
             f"BERT-base-sized encoder ({layers} layers, hidden 768, FFN 3072, vocab 30522), every encoder Linear "
             f"pruned to 90% with 32x32 blocks and converted to BSR; forward on batch 1 x seq {SEQ}.", "",
             f"- encoder Linear weights: dense {_mb(prep['dense_linear_bytes'])} MB -> BSR "
             f"{prep['sparse_linear_bytes'] / 2**20:.1f} MB (values + indices) = **{pct:.1f}%** of dense "
             f"(target <= {MEMORY_TARGET_PCT:.0f}%); the CPU kernels keep no packed copy of the weight",
             f"- files: dense {_mb(prep['file_bytes']['dense'])} MB, sparse {_mb(prep['file_bytes']['sparse'])} MB "
             "(both include the 94 MB token embedding, which is not pruned)",
             f"- after convert_modules, dense weights still referenced in the sparsifying process: "
             f"{len(prep['dense_weights_alive_after_swap'])}", "",
             "| model | skeleton | baseline MB | after skeleton | after load | peak MB | peak - baseline | VmHWM "
             "| encoder Linear MB | dense weights alive | output vs in-memory model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in rows]
    lines += ["", "baseline = ru_maxrss right after `import torch, sparsekit` (+ torch's meta kernels); after "
              "skeleton / after load = VmRSS (current); peak = ru_maxrss after the forward. dense weights alive = "
              "skeleton Linear weights still referenced after sk.load (weakref) + dense-shaped float tensors found "
              "by a gc scan."]
    for mode in ("init", "empty"):
        sparse, dense = inc.get(("sparse", mode)), inc.get(("dense", mode))
        if sparse and dense:
            lines.append(f"peak increase, {mode} skeleton: sparse {sparse / 2**20:.0f} MB vs dense "
                         f"{dense / 2**20:.0f} MB ({sparse / dense:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base)")
    ap.add_argument("--keep", type=Path, default=None, help="save the models here (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                    help="where the .json/.md go (default bench/results)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)   # internal: prepare DIR | measure DIR KIND MODE
    a = ap.parse_args(argv)
    if a.layers < 1:
        raise SystemExit(f"--layers must be a positive int, got {a.layers}")
    if a.child:
        what, folder = a.child[0], Path(a.child[1])
        res = prepare(folder, a.layers) if what == "prepare" else measure(
            folder / a.child[2], folder / "reference.safetensors", a.child[2], a.child[3], a.layers)
        print(json.dumps(res, default=str))
        return
    with tempfile.TemporaryDirectory(prefix="sparsekit-memory-") as tmp:
        folder = a.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        prep = _child(["--child", "prepare", str(folder), "--layers", str(a.layers)])
        rows = [_child(["--child", "measure", str(folder), kind, mode, "--layers", str(a.layers)])
                for kind, mode in CASES]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = report(prep, rows, a.layers, stamp)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"memory_{prep['slug']}_{stamp}"
    base.with_suffix(".json").write_text(json.dumps({**prep, "layers": a.layers, "rows": rows}, indent=1,
                                                    default=str))
    base.with_suffix(".md").write_text(text + "\n")
    print(f"results: {base}.json / .md")


if __name__ == "__main__":
    main()
