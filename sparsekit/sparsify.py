"""sk.sparsify: swap every Linear/Conv2d whose weight has zeros for the format measured fastest at its real shape.

For each layer: capture its real input (one run of example_inputs), list the candidate formats the zero pattern
allows (dense; bsr with each block shape whose blocks are mostly empty; csr; nm when the weight is n:m sparse;
channel when whole output rows are zero), check each candidate's output against dense, time them side by side
(interleaved medians), keep the fastest, and fall back to dense unless a sparse format beats it by
``min_speedup``. Timings go to a tuning cache keyed by device, dtype, shape and pattern statistics, so a second
call on the same model is near-instant.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .nn import FORMAT_NAMES, SparseConv2d, SparseLinear
from .timing import interleaved_median_ms
from .tuning_cache import TuningCache, device_name, resolve_cache
from .verify import as_args

DEFAULT_BLOCKS: tuple[tuple[int, int], ...] = ((1, 4), (4, 1), (16, 16), (32, 32), (64, 64))
MAX_STORED_DENSITY = 0.75   # a format storing more than this fraction of the weight cannot beat dense
NM_PATTERNS = ((2, 4), (1, 4), (4, 8))


@dataclass
class LayerDecision:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    sparsity: float
    pattern: str
    times_ms: dict[str, float]
    choice: str
    speedup: float
    cached: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class SparsifyReport:
    layers: list[LayerDecision]
    device: str
    dtype: str
    min_speedup: float
    dense_ms: float | None = None
    sparse_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.sparse_ms if self.dense_ms and self.sparse_ms else None

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}

    def __str__(self) -> str:
        # column widths from the longest entry (Hugging Face names run to 40+ characters)
        nw = max([28, *(len(d.name) + 2 for d in self.layers)])
        sw = max([16, *(len("x".join(map(str, d.weight_shape))) + 2 for d in self.layers)])
        iw = max([18, *(len("x".join(map(str, d.input_shape))) + 2 for d in self.layers)])
        lines = [f"sparsify on {self.device}, {self.dtype}, min_speedup {self.min_speedup}",
                 f"{'layer':<{nw}}{'weight':>{sw}}{'input':>{iw}}{'sparsity':>9}  {'choice':<10}{'speedup':>8}  "
                 "candidates (ms)"]
        for d in self.layers:
            cands = " ".join(f"{k}={v:.2f}" for k, v in sorted(d.times_ms.items(), key=lambda kv: kv[1]))
            shape, inp = "x".join(map(str, d.weight_shape)), "x".join(map(str, d.input_shape))
            lines.append(f"{d.name:<{nw}}{shape:>{sw}}{inp:>{iw}}{d.sparsity:>9.3f}  {d.choice:<10}"
                         f"{d.speedup:>7.2f}x  {cands}{' (cached)' if d.cached else ''}")
            lines += [f"{'':<{nw}}note: {n}" for n in d.notes]
        if self.speedup is not None:
            lines.append(f"whole model: dense {self.dense_ms:.2f} ms -> sparse {self.sparse_ms:.2f} ms "
                         f"({self.speedup:.2f}x)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ capture
def capture_inputs(model: nn.Module, example_inputs: Any,
                   predicate: Callable[[nn.Module], bool]) -> dict[str, Tensor]:
    """The first input tensor each matching submodule sees when the model runs on example_inputs."""
    seen: dict[str, Tensor] = {}

    def record(name: str):
        def hook(_mod, inp, _out) -> None:  # returning a value would replace the module's output
            if inp and isinstance(inp[0], Tensor):
                seen.setdefault(name, inp[0].detach())
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and predicate(m)]
    try:
        with torch.no_grad():
            model(*as_args(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return seen


# ------------------------------------------------------------------------------------- the pattern
def _weight2d(mod: nn.Module) -> Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def _block_density(w: Tensor, block: tuple[int, int]) -> float | None:
    n, k = w.shape
    bn, bk = block
    if n % bn or k % bk:
        return None
    nz = w.ne(0).reshape(n // bn, bn, k // bk, bk).any(3).any(1)
    return float(nz.float().mean())


def _nm_fits(w: Tensor, n: int, m: int) -> bool:
    rows, k = w.shape
    return k % m == 0 and int(w.ne(0).reshape(rows, k // m, m).sum(-1).max()) <= n


def pattern_stats(w: Tensor, blocks: tuple[tuple[int, int], ...]) -> dict:
    """Sparsity, stored density per usable block shape, n:m fit, fraction of all-zero rows."""
    return {
        "sparsity": round(float(w.eq(0).float().mean()), 3),
        "blocks": {f"{b[0]}x{b[1]}": (None if (d := _block_density(w, b)) is None else round(d, 3)) for b in blocks},
        "nm": [f"{n}:{m}" for n, m in NM_PATTERNS if _nm_fits(w, n, m)],
        "zero_rows": round(float(w.eq(0).all(1).float().mean()), 3),
    }


def _stored_elements(w: Tensor, label: str) -> int:
    """How many elements a candidate format stores for w (explicit zeros included)."""
    n, k = w.shape
    if label.startswith("bsr"):
        bn, bk = map(int, label[3:].split("x"))
        return int(w.ne(0).reshape(n // bn, bn, k // bk, bk).any(3).any(1).sum()) * bn * bk
    if label.startswith("nm"):
        kept, m = map(int, label[2:].split(":"))
        return n * (k // m) * kept
    if label == "channel":
        return int(w.ne(0).any(1).sum()) * k
    return int(w.ne(0).sum())  # csr


def _candidates(mod: nn.Module, w: Tensor, stats: dict, formats: tuple[str, ...], blocks: tuple[tuple[int, int], ...],
                backend: str | None, exact: bool) -> dict[str, Callable[[], nn.Module]]:
    cls = SparseLinear if isinstance(mod, nn.Linear) else SparseConv2d
    out: dict[str, Callable[[], nn.Module]] = {}
    if "bsr" in formats:
        for b in blocks:
            d = stats["blocks"].get(f"{b[0]}x{b[1]}")
            if d is not None and d <= MAX_STORED_DENSITY:
                out[f"bsr{b[0]}x{b[1]}"] = lambda b=b: cls.from_dense(mod, format="bsr", block=b, backend=backend)
    if "csr" in formats and 1 - stats["sparsity"] <= MAX_STORED_DENSITY:
        out["csr"] = lambda: cls.from_dense(mod, format="csr", backend=backend)
    if "nm" in formats and stats["nm"]:
        n, m = map(int, stats["nm"][0].split(":"))   # the sparsest n:m pattern the weight fits
        out[f"nm{n}:{m}"] = lambda: cls.from_dense(mod, format="nm", n=n, m=m, backend=backend)
    if "channel" in formats and isinstance(mod, nn.Linear) and stats["zero_rows"] >= 1 - MAX_STORED_DENSITY:
        out["channel"] = lambda: cls.from_dense(mod, format="channel")
    if exact:  # only formats whose stored entries are exactly the nonzeros: fine-tuning then keeps every zero
        nnz = int(w.ne(0).sum())
        out = {label: f for label, f in out.items() if _stored_elements(w, label) == nnz}
    return out


def _kind(mod: nn.Module) -> dict:
    if isinstance(mod, nn.Conv2d):
        return {"kind": "conv2d", "kernel": list(mod.kernel_size), "stride": list(mod.stride),
                "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
                "dilation": list(mod.dilation), "groups": mod.groups}
    return {"kind": "linear"}


def _plain_dense(mod: nn.Module) -> nn.Module:
    """A fresh plain nn.Linear/nn.Conv2d with the layer's (masked) weight baked in: the fair dense baseline.

    (Not deepcopy + remove_parametrizations: a copy shares the parametrized class, and removing the
    parametrization from it would strip the original too.)
    """
    w = mod.weight.detach()
    bias = mod.bias.detach() if mod.bias is not None else None
    if isinstance(mod, nn.Conv2d):
        new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        mod.groups, bias=bias is not None, padding_mode=mod.padding_mode, device=w.device,
                        dtype=w.dtype)
    else:
        new = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new.eval()


def _measure(mod: nn.Module, inp: Tensor, factories: dict[str, Callable[[], nn.Module]], reps: int,
             notes: list[str]) -> tuple[dict[str, float], dict[str, nn.Module]]:
    dense = _plain_dense(mod)
    built: dict[str, nn.Module] = {"dense": dense}
    with torch.no_grad():
        ref = dense(inp)
        for label, make in factories.items():
            try:
                cand = make()
                out = cand(inp)
            except (ValueError, TypeError, RuntimeError) as exc:
                notes.append(f"{label} skipped: {str(exc).splitlines()[0][:120]}")
                continue
            tol = 1e-3 if inp.dtype == torch.float32 else 3e-2
            if not torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol * max(1.0, float(ref.abs().max()))):
                notes.append(f"{label} skipped: output differs from dense")
                continue
            built[label] = cand
    times = interleaved_median_ms({k: (lambda m=m: m(inp)) for k, m in built.items()}, warmup=2, reps=reps,
                                  device=inp.device)
    return times, built


# ------------------------------------------------------------------------------------------ the call
def _check_args(model: object, formats: object, min_speedup: object, blocks: object) -> tuple[tuple, tuple]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if formats is None:
        formats = FORMAT_NAMES
    if isinstance(formats, str) or not all(f in FORMAT_NAMES for f in formats):  # type: ignore[union-attr]
        raise ValueError(f"formats must be a list drawn from {FORMAT_NAMES} (or None for all), got {formats!r}")
    if not isinstance(min_speedup, (int, float)) or isinstance(min_speedup, bool) or min_speedup <= 0:
        raise ValueError(f"min_speedup must be a positive number, got {min_speedup!r}")
    blocks = DEFAULT_BLOCKS if blocks is None else tuple(tuple(b) for b in blocks)  # type: ignore[union-attr]
    for b in blocks:
        if len(b) != 2 or not all(isinstance(i, int) and 1 <= i <= 128 for i in b):
            raise ValueError(f"blocks must be pairs of ints in [1, 128], got {b!r}")
    return tuple(formats), blocks  # type: ignore[arg-type]


def sparsify(model: nn.Module, example_inputs: Any, formats: list[str] | tuple[str, ...] | None = None,
             min_speedup: float = 1.1, cache: Any = None, blocks: list[tuple[int, int]] | None = None,
             reps: int = 7, backend: str | None = None, exact: bool = False, inplace: bool = False,
             measure_model: bool = True) -> tuple[nn.Module, SparsifyReport]:
    """Return (fast_model, report). ``fast_model`` is a copy (``inplace=False``) in which every Linear/Conv2d
    whose weight has zeros is replaced by the measured-fastest SparseLinear/SparseConv2d, or left dense.

    formats      subset of ("dense", "bsr", "csr", "nm", "channel"); None = all
    min_speedup  a sparse format must beat dense by this factor to be chosen
    cache        None: the default JSON file (~/.cache/sparsekit/sparsify.json or $SPARSEKIT_CACHE_DIR);
                 False: in memory; a path; or a TuningCache
    blocks       BSR block shapes to try (those that divide the weight and leave blocks mostly empty)
    backend      force a backend for the sparse candidates (default: the dispatcher's choice)
    exact        only formats that store exactly the nonzeros (no explicit zeros inside stored blocks), so that
                 fine-tuning the result keeps every zero, as fine-tuning the masked model would; False allows
                 coarser blocks whose stored zeros become trainable
    """
    formats, blocks = _check_args(model, formats, min_speedup, blocks)
    tcache: TuningCache = resolve_cache(cache)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    is_layer = lambda m: isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, (SparseLinear, SparseConv2d))
    inputs = capture_inputs(target, example_inputs, is_layer)
    inside_mha = {f"{n}.{c}" if n else c for n, m in target.named_modules()
                  if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    first = next(iter(inputs.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    report = SparsifyReport([], device_name(device), str(first.dtype if first is not None else torch.float32),
                            float(min_speedup))
    for name, inp in inputs.items():
        mod = target.get_submodule(name)
        if name in inside_mha:
            continue  # nn.MultiheadAttention reads its projection weights directly
        w = _weight2d(mod)
        if not bool(w.eq(0).any()):
            continue
        stats = pattern_stats(w, blocks)
        factories = _candidates(mod, w, stats, formats, blocks, backend, exact)
        key = TuningCache.key({"device": report.device, "dtype": str(inp.dtype), **_kind(mod),
                               "weight": list(w.shape), "input": list(inp.shape), "stats": stats,
                               "candidates": sorted(factories), "backend": backend, "exact": exact})
        notes: list[str] = []
        hit = tcache.get(key)
        if hit is not None:
            times = hit["times_ms"]
            notes = list(hit.get("notes", []))
        else:
            times, _ = _measure(mod, inp, factories, reps, notes)
            tcache.put(key, {"times_ms": times, "notes": notes})
        sparse_times = {k: v for k, v in times.items() if k != "dense"}
        best = min(sparse_times, key=sparse_times.get) if sparse_times else "dense"
        choice = best if best != "dense" and times["dense"] / sparse_times[best] >= min_speedup else "dense"
        if choice != "dense":
            new = factories[choice]()
            parent, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, child, new)
        report.layers.append(LayerDecision(
            name=name, kind=_kind(mod)["kind"], weight_shape=tuple(mod.weight.shape), input_shape=tuple(inp.shape),
            sparsity=stats["sparsity"], pattern=_describe(stats), times_ms=times, choice=choice,
            speedup=times["dense"] / times[choice], cached=hit is not None, notes=notes))
    tcache.save()
    if measure_model and report.layers:
        args = as_args(example_inputs)
        t = interleaved_median_ms({"dense": lambda: model(*args), "sparse": lambda: target(*args)}, warmup=2,
                                  reps=reps, device=device)
        report.dense_ms, report.sparse_ms = t["dense"], t["sparse"]
    return target, report


def _describe(stats: dict) -> str:
    blocks = [f"{k}:{v:.2f}" for k, v in stats["blocks"].items() if v is not None and v <= MAX_STORED_DENSITY]
    parts = [f"blocks {' '.join(blocks)}" if blocks else "unstructured"]
    if stats["nm"]:
        parts.append(f"n:m {stats['nm'][0]}")
    if stats["zero_rows"]:
        parts.append(f"zero rows {stats['zero_rows']:.2f}")
    return ", ".join(parts)


__all__ = ["sparsify", "SparsifyReport", "LayerDecision", "capture_inputs", "pattern_stats"]
