"""sk.sparsify: swap every Linear / Conv1d / 2d / 3d / ConvTranspose1d / 2d / 3d whose weight has zeros for the
format measured fastest at its real shape.

For each layer: capture its real input (one run of example_inputs), list the candidate formats the zero pattern
allows (dense; bsr with each block shape whose blocks are mostly empty; csr; nm with each n:m pattern the weight
fits; channel when whole output rows are zero), check each candidate's output against dense, time them side by
side (interleaved medians), keep the fastest, and fall back to dense unless a sparse format beats it by
``min_speedup``. Timings go to a tuning cache keyed by device, dtype, shape, pattern statistics and sparsekit's code
revision, so a second call on the same model is near-instant (and one after an upgrade measures again). Layers
already sparsified (SparseLinear / SparseConv* / SparseConvTranspose*, e.g. from ``sk.load``) are turned back
into dense candidates and measured again: the best format differs between machines.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ._aliases import module_aliases, shared_weights
from ._compat import set_submodule
from ._stock_layers import acts_as_stock, overridden_forward
from .nn import (
    FORMAT_NAMES,
    SPARSE_LAYERS,
    SPARSE_MODULES,
    SparseLinear,
    _is_hf_conv1d,
    sparse_class,
)
from .ops._dispatch import BACKENDS, recording_choices
from .ops.conv_transpose import transposed_weight2d
from .prune.linear_mha import (
    LinearMultiheadAttention,
    attention_children,
    disable_fused_transformer_paths,
    expose_sparse_attention,
    no_nested_tensors,
    restore_dense_attention,
    restore_nested_tensors,
)
from .prune.linear_rnn import LinearRecurrent, expose_sparse_recurrent, restore_dense_recurrent
from .prune.masks import TRANSPOSED_CONVS, bake_masks
from .prune.pruner import check_example_inputs, run_example
from .timing import graph_replay_median_ms, interleaved_median_ms
from .tuning_cache import TuningCache, code_revision, device_name, kernel_switches, resolve_cache

DEFAULT_BLOCKS: tuple[tuple[int, int], ...] = ((1, 4), (4, 1), (16, 16), (32, 32), (64, 64))
MAX_STORED_DENSITY = 0.75   # a format storing more than this fraction of the weight cannot beat dense
NM_PATTERNS = ((1, 4), (2, 4), (4, 8))   # sparsest (smallest n/m) first


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
    backend: str | None = None   # what runs the chosen format here ("torch" for dense/channel GEMMs)
    scattered: bool = False      # single zeros: no block pattern fits but 1x4 / 4x1 (``_scattered``)
    stock_attention: bool = False   # a layer of an attention / recurrent module kept stock after timing it whole


@dataclass
class SparsifyReport:
    layers: list[LayerDecision]
    device: str
    dtype: str
    min_speedup: float
    dense_ms: float | None = None
    sparse_ms: float | None = None
    notes: list[str] = field(default_factory=list)   # about the model as a whole (layers it leaves out)

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
        pw = max([9, *(len(d.pattern) + 2 for d in self.layers)])
        cw = max([10, *(len(d.choice) + 2 for d in self.layers)])
        lines = [f"sparsify on {self.device}, {self.dtype}, min_speedup {self.min_speedup}",
                 f"{'layer':<{nw}}{'weight':>{sw}}{'input':>{iw}}{'sparsity':>9}  {'pattern':<{pw}}"
                 f"{'choice':<{cw}}{'speedup':>8}  candidates (ms)"]
        for d in self.layers:
            cands = " ".join(f"{k}={v:.2f}" for k, v in sorted(d.times_ms.items(), key=lambda kv: kv[1]))
            shape, inp = "x".join(map(str, d.weight_shape)), "x".join(map(str, d.input_shape))
            lines.append(f"{d.name:<{nw}}{shape:>{sw}}{inp:>{iw}}{d.sparsity:>9.3f}  {d.pattern:<{pw}}"
                         f"{d.choice:<{cw}}{d.speedup:>7.2f}x  {cands}{' (cached)' if d.cached else ''}")
            lines += [f"{'':<{nw}}note: {n}" for n in d.notes]
        lines += [f"note: {n}" for n in self.notes]
        if self.speedup is not None:
            lines.append(f"whole model: dense {self.dense_ms:.2f} ms -> sparse {self.sparse_ms:.2f} ms "
                         f"({self.speedup:.2f}x)")
        lines += self._dense_hint()
        return "\n".join(lines)

    def _dense_hint(self) -> list[str]:
        """Why sparse layers stayed dense, and what pattern would pay off (the "pruned but not faster" case)."""
        sparse = [d for d in self.layers if d.sparsity > 0 and not d.stock_attention]
        stayed = [d for d in sparse if d.choice == "dense"]
        if not stayed:
            return []
        unstructured = [d for d in stayed if d.scattered]
        lines = [f"{len(stayed)} of {len(sparse)} layers with zeros stayed dense: no candidate format was >= "
                 f"{self.min_speedup}x faster at its pattern and sparsity (times above; a layer's notes say what "
                 "could not run)."]
        if unstructured:
            top = max(d.sparsity for d in unstructured)
            lines += [f"  {len(unstructured)} of them hold single zeros (up to {top:.0%}), which pay off only at high "
                      "sparsity; the same sparsity as whole blocks",
                      "  (granularity='block', e.g. 16x16 or 1x4) or as removed channels (granularity='channel', "
                      "then pruner.compact()) runs faster."]
        return lines


# ------------------------------------------------------------------------------------------ capture
def capture_inputs(model: nn.Module, example_inputs: Any, predicate: Callable[[nn.Module], bool],
                   second_call: Iterable[str] = ()) -> dict[str, Tensor]:
    """The first input tensor each matching submodule sees when the model runs on example_inputs (for the names
    in ``second_call``, the largest input of its later calls when it has any: a recurrent weight's first input is
    the initial state)."""
    seen: dict[str, Tensor] = {}
    later = set(second_call)
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(_mod, inp, _out) -> None:  # returning a value would replace the module's output
            if inp and isinstance(inp[0], Tensor):
                counts[name] = counts.get(name, 0) + 1
                n = counts[name]
                # (a packed sequence's later steps have fewer rows: the largest of calls 2, 3, ... is kept)
                if name not in seen or (name in later and n >= 2 and (n == 2 or inp[0].shape[0] > seen[name].shape[0])):
                    seen[name] = inp[0].detach()
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and predicate(m)]
    try:
        with torch.no_grad():
            run_example(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ------------------------------------------------------------------------------------- the pattern
def _weight2d(mod: nn.Module) -> Tensor:
    """The weight as the GEMM matrix its sparse twin stores: [out, in * taps]; a transposed conv's [C_out * taps,
    C_in]."""
    w = mod.weight.detach()
    return transposed_weight2d(w, mod.groups) if isinstance(mod, TRANSPOSED_CONVS) else w.reshape(w.shape[0], -1)


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


# inputs of up to this many rows run csr_bitmap_mm's own kernel on a CPU (csrc/cpu/csr_bitmap.cpp kMaxRows)
BITMAP_MAX_ROWS = 8


def _candidates(mod: nn.Module, w: Tensor, stats: dict, formats: tuple[str, ...], blocks: tuple[tuple[int, int], ...],
                backend: str | None, exact: bool, rows: int) -> dict[str, Callable[[], nn.Module]]:
    """Factories of the sparse modules worth timing for layer ``mod`` (weight ``w``) on inputs of ``rows`` rows."""
    cls = sparse_class(mod)
    out: dict[str, Callable[[], nn.Module]] = {}
    if "bsr" in formats:
        for b in blocks:
            d = stats["blocks"].get(f"{b[0]}x{b[1]}")
            if d is not None and d <= MAX_STORED_DENSITY:
                out[f"bsr{b[0]}x{b[1]}"] = lambda b=b: cls.from_dense(mod, format="bsr", block=b, backend=backend)
    if "csr" in formats and 1 - stats["sparsity"] <= MAX_STORED_DENSITY:
        out["csr"] = lambda: cls.from_dense(mod, format="csr", backend=backend)
        if cls is SparseLinear and w.device.type == "cpu" and rows <= BITMAP_MAX_ROWS and backend in (None, "cpu"):
            # skinny inputs (decoding): the CPU kernel that expands rows by the pattern's bitmap (CSR.bitmap)
            out["csr+bitmap"] = lambda: cls.from_dense(mod, format="csr", backend=backend, bitmap=True)
    if "nm" in formats:  # every n:m pattern the weight fits: the sparsest is not always the fastest kernel
        for label in stats["nm"]:
            n, m = map(int, label.split(":"))
            out[f"nm{label}"] = lambda n=n, m=m: cls.from_dense(mod, format="nm", n=n, m=m, backend=backend)
    if "channel" in formats and stats["zero_rows"] >= 1 - MAX_STORED_DENSITY:
        out["channel"] = lambda: cls.from_dense(mod, format="channel")
    if exact:  # only formats whose stored entries are exactly the nonzeros: fine-tuning then keeps every zero
        nnz = int(w.ne(0).sum())
        out = {label: f for label, f in out.items() if _stored_elements(w, label) == nnz}
    return out


def _kind(mod: nn.Module) -> dict:
    """The layer's kind and everything besides the weight that decides which candidates can be built and how
    fast they run (the cache key holds it: a decision for a zero-padded conv must not be reused for a
    reflect-padded one, whose sparse candidates cannot be built)."""
    bias = {"bias": mod.bias is not None, "weight_dtype": str(mod.weight.dtype)}
    if isinstance(mod, TRANSPOSED_CONVS):
        return {"kind": f"conv_transpose{mod.weight.dim() - 2}d", "kernel": list(mod.kernel_size),
                "stride": list(mod.stride), "padding": list(mod.padding), "output_padding": list(mod.output_padding),
                "dilation": list(mod.dilation), "groups": mod.groups, "padding_mode": mod.padding_mode, **bias}
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {"kind": f"conv{mod.weight.dim() - 2}d", "kernel": list(mod.kernel_size), "stride": list(mod.stride),
                "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
                "padding_mode": mod.padding_mode, "dilation": list(mod.dilation), "groups": mod.groups, **bias}
    return {"kind": "linear", **bias}


def _plain_dense(mod: nn.Module) -> nn.Module:
    """A fresh plain nn.Linear/nn.Conv1d/nn.Conv2d/nn.Conv3d with the layer's (masked) weight baked in: the fair dense
    baseline.

    (Not deepcopy + remove_parametrizations: a copy shares the parametrized class, and removing the
    parametrization from it would strip the original too.)
    """
    w = mod.weight.detach()
    bias = mod.bias.detach() if mod.bias is not None else None
    if isinstance(mod, TRANSPOSED_CONVS):
        conv = next(c for c in TRANSPOSED_CONVS if isinstance(mod, c))
        new = conv(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.output_padding,
                   mod.groups, bias=bias is not None, dilation=mod.dilation, padding_mode=mod.padding_mode,
                   device=w.device, dtype=w.dtype)
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(mod, c))
        new = conv(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                   mod.groups, bias=bias is not None, padding_mode=mod.padding_mode, device=w.device, dtype=w.dtype)
    else:
        new = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new.eval()


def _median_ms(fns: dict[str, Callable[[], object]], reps: int, device: torch.device, cuda_graphs: bool,
               notes: list[str]) -> dict[str, float]:
    """Interleaved medians (ms) of ``fns``: eager calls, or with ``cuda_graphs`` CUDA-graph replays (what the calls
    cost inside a graphed model); a set that cannot be captured is timed eagerly, with a note."""
    if cuda_graphs:
        try:
            return graph_replay_median_ms(fns, warmup=2, reps=reps, device=device)
        except RuntimeError as exc:
            notes.append(f"CUDA-graph capture failed ({_first_line(exc)}): timed eagerly")
    return interleaved_median_ms(fns, warmup=2, reps=reps, device=device)


def _measure(mod: nn.Module, inp: Tensor, factories: dict[str, Callable[[], nn.Module]], reps: int,
             notes: list[str], cuda_graphs: bool = False) -> tuple[dict[str, float], dict[str, nn.Module], bool]:
    """Each candidate's median time (the ones that run and match the layer), the built modules, and whether a
    candidate failed at run time (RuntimeError: maybe transient, so the result is not for the cache).

    Modules run through ``forward``: ``inp`` is what the layer's forward received (after its pre-hooks), and the
    candidates share the layer's hooks (``from_dense`` keeps them), which would run, side effects and all, on
    every timed call, while the plain dense baseline has none."""
    dense = _plain_dense(mod)
    transient = False
    built: dict[str, nn.Module] = {"dense": dense}
    with torch.no_grad():
        ref = mod.forward(inp)      # the layer itself: what the candidates must compute
        for label, make in factories.items():
            try:
                cand = make()
                out = cand.forward(inp)
            except (ValueError, TypeError) as exc:     # the arguments: the same every call
                notes.append(f"{label} skipped: {_first_line(exc)}")
                continue
            except RuntimeError as exc:
                notes.append(f"{label} failed at run time: {_first_line(exc)}")
                transient = True
                continue
            tol = 1e-3 if inp.dtype == torch.float32 else 3e-2
            if not torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol * max(1.0, float(ref.abs().max()))):
                notes.append(f"{label} skipped: output differs from the dense layer's")
                continue
            built[label] = cand
    times = _median_ms({k: (lambda m=m: m.forward(inp)) for k, m in built.items()}, reps, inp.device, cuda_graphs,
                       notes)
    return times, built, transient


def _first_line(exc: BaseException, limit: int = 120) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def _densify_sparse_layers(model: nn.Module) -> None:
    """Turn every Sparse* layer back into its plain nn.Linear / conv / transposed conv (same zeros), and every
    attention an earlier sparsify converted back into the stock module, so that an already-sparsified model is
    measured again like any pruned one: its best formats and backends were measured on another machine, or with
    other inputs. A forced backend is dropped: the dispatcher re-selects."""
    for names in module_aliases(model).values():
        mod = model.get_submodule(names[0])
        if isinstance(mod, SPARSE_MODULES):
            dense = mod.to_dense()
            for name in names:      # a layer registered under several names is one layer
                set_submodule(model, name, dense)
    # an attention a sparsify converted to get at its projections goes back to the stock module, whose packed,
    # fused path is measured against the converted one again (expose_sparse_attention converts it anew)
    converted = [(names, mod) for names in module_aliases(model).values()
                 if isinstance(mod := model.get_submodule(names[0]), (LinearMultiheadAttention, LinearRecurrent))
                 and mod.sparsify_converted]
    for names, mod in converted:
        try:
            stock = mod.to_stock()
        except TypeError:     # masked projections since (a user's pruning): measured as they are
            continue
        for name in names:
            set_submodule(model, name, stock)


def _dense_baseline(model: nn.Module) -> nn.Module:
    """What the whole model is timed against: a plain dense eval-mode stand-in for ``model``.

    The module tree is copied with every parameter and buffer shared (no weight copied but a converted recurrent
    module's, below; ``model`` itself is
    neither run nor changed: a train-mode model would update its BatchNorm statistics), then each masked
    Linear/Conv2d is replaced by a plain one with its mask baked in (``_plain_dense``): a pruner's
    parametrizations cost about half a dense forward again, which would count as sparsify's speedup. Every other
    parametrized module (a masked norm, nn.MultiheadAttention's in_proj_weight) gets its values baked into
    tensors of its own (``_bake_copy``). A recurrent module converted to a ``LinearRecurrent`` (by the user, to
    prune its weights) is timed as the stock module it computes: dense, torch's fused RNN kernel is its best
    path, and the converted module's Python time loop is several times slower."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    base = copy.deepcopy(model, memo)
    for name, mod in list(base.named_modules()):
        if name and isinstance(mod, SPARSE_LAYERS) and parametrize.is_parametrized(mod):
            set_submodule(base, name, _plain_dense(mod))
        elif parametrize.is_parametrized(mod):
            _bake_copy(mod)
    converted = [(names, mod) for names in module_aliases(base).values()
                 if isinstance(mod := base.get_submodule(names[0]), LinearRecurrent)]
    for names, mod in converted:
        stock = mod.to_stock()       # (its children are plain Linear layers by now; their weights are copied)
        if not names[0]:
            return stock.eval()      # (the model is itself a LinearRecurrent)
        for name in names:
            set_submodule(base, name, stock)
    return base.eval()


def _bake_copy(mod: nn.Module) -> None:
    """Bake a *copied* module's parametrizations into new tensors of its own. Not remove_parametrizations: the
    copy shares parametrize's generated class with the original (deleting its properties would strip the
    original too) and leave_parametrized=True writes into the shared original tensors."""
    values = {name: getattr(mod, name).detach().clone() for name in mod.parametrizations}
    del mod._modules["parametrizations"]
    mod.__class__ = mod.__class__.__bases__[0]     # parametrize's class derives from the module's own
    for name, value in values.items():
        mod._parameters[name] = nn.Parameter(value, requires_grad=False)


def _backend_used(mod: nn.Module, inp: Tensor) -> str | None:
    """The backend that runs ``mod`` on ``inp`` on this machine (sk.save records it, as information): the
    dispatcher's pick, recorded while the layer runs once ("cpu" where the CPU kernels are called without the
    dispatcher: convolutions and repeated calls; "torch" for the dense and channel formats, plain torch GEMMs)."""
    if not isinstance(mod, SPARSE_MODULES) or mod.format in ("dense", "channel"):
        return "torch"
    with recording_choices() as seen, torch.no_grad():
        mod.forward(inp)        # (the layer alone: the user's hooks on it need not run again here)
    # the last pick is the real one (a call the dispatcher measures times every candidate first)
    return seen[-1] if seen else ("cpu" if inp.device.type == "cpu" else None)


# ------------------------------------------------------------------------------------------ the call
def _check_args(model: object, formats: object, min_speedup: object, blocks: object, reps: object,
                backend: object, flags: dict[str, object]) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (*SPARSE_LAYERS, *SPARSE_MODULES)):     # (it swaps submodules: the root never is)
        raise ValueError(f"model must contain the layers to sparsify, got a bare {type(model).__name__}; wrap it "
                         "(sk.sparsify(nn.Sequential(layer), ...), then take [0] of the result)")
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(f"model has tensors on the meta device ({', '.join(on_meta[:3])}"
                         f"{', ...' if len(on_meta) > 3 else ''}); sparsify needs real weights: load them first "
                         "(load_state_dict(..., assign=True) or sk.load)")
    if formats is None:
        formats = FORMAT_NAMES
    if isinstance(formats, str) or not isinstance(formats, Iterable):
        raise ValueError(f"formats must be a list drawn from {FORMAT_NAMES} (or None for all), got {formats!r}")
    formats = tuple(formats)  # once: a generator would be used up by the check
    if not formats or not all(isinstance(f, str) and f in FORMAT_NAMES for f in formats):
        raise ValueError(f"formats must be a non-empty list drawn from {FORMAT_NAMES} (or None for all), "
                         f"got {list(formats)!r}")
    if not isinstance(min_speedup, (int, float)) or isinstance(min_speedup, bool) or not math.isfinite(min_speedup) \
            or min_speedup <= 0:
        raise ValueError(f"min_speedup must be a positive finite number, got {min_speedup!r}")
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise ValueError(f"reps must be a positive int (timed rounds per candidate), got {reps!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None (the dispatcher's choice), "
                         f"got {backend!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if blocks is None:
        blocks = DEFAULT_BLOCKS
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
        raise ValueError(f"blocks must be a list of (rows, cols) pairs of ints in [1, 128], got {blocks!r}")
    checked = []
    for b in blocks:
        pair = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 128 for i in pair):
            raise ValueError(f"blocks must be pairs of ints in [1, 128], got {b!r}")
        checked.append(pair)
    return formats, tuple(checked)


def sparsify(model: nn.Module, example_inputs: Any, formats: list[str] | tuple[str, ...] | None = None,
             min_speedup: float = 1.1, cache: Any = None, blocks: list[tuple[int, int]] | None = None,
             reps: int = 7, backend: str | None = None, exact: bool = False, inplace: bool = False,
             measure_model: bool = True, cuda_graphs: bool = False) -> tuple[nn.Module, SparsifyReport]:
    """Return (fast_model, report). ``fast_model`` is a copy (``inplace=False``) in which every Linear / conv /
    transposed conv whose weight has zeros is replaced by the measured-fastest Sparse* twin
    (sparse_class), or left dense.
    Sparse* layers already in ``model`` (e.g. from ``sk.load``) are measured again from
    their dense equivalent. ``fast_model`` is in eval mode; ``model`` is not run (nor changed, unless inplace).
    An ``nn.MultiheadAttention`` whose projections have zeros is measured as a ``LinearMultiheadAttention`` (its
    packed q / k / v as three Linear layers beside ``out_proj``); it stays stock when none of the four goes sparse
    or when, timed on its real call, the converted module does not beat the stock one by ``min_speedup``. An
    attention converted beforehand (``sk.nn.mha_to_linear``) stays converted: its projections are layers.

    example_inputs  a Tensor, a tuple/list of positional args or a dict of keyword args (as the Pruner and
                 ``sk.verify`` take them); each layer is timed at the input shape it sees on them
    formats      non-empty subset of ("dense", "bsr", "csr", "nm", "channel"); None = all
    min_speedup  a sparse format must beat dense by this factor (positive, finite) to be chosen
    cache        None: the default JSON file (~/.cache/sparsekit/sparsify.json or $SPARSEKIT_CACHE_DIR);
                 False: in memory; a file path (a directory: its sparsify.json); or a TuningCache. A file
                 that cannot be written costs a RuntimeWarning, not the run
    blocks       BSR block shapes to try (those that divide the weight and leave blocks mostly empty)
    reps         timed rounds per candidate (interleaved medians)
    backend      force a backend for the sparse candidates (a name in sparsekit.ops.BACKENDS; default: the
                 dispatcher's choice)
    exact        only formats that store exactly the nonzeros (no explicit zeros inside stored blocks), so that
                 fine-tuning the result keeps every zero, as fine-tuning the masked model would; layers kept
                 dense then keep their mask parametrizations (bake them before sk.save). False allows coarser
                 blocks whose stored zeros become trainable and bakes every mask left in the model (a layer
                 kept dense becomes a plain layer with its zeros baked in: what it was timed as)
    measure_model  also time the whole model: a plain dense eval-mode copy (masks baked) against the result
    cuda_graphs  (CUDA only) time every candidate, and the whole model, as CUDA-graph replays: the speeds of a model
                 run under CUDA graphs (torch.compile(mode="reduce-overhead"), torch.cuda.make_graphed_callables),
                 where the host's per-call time (Python, launches) is gone. The default times eager calls, host
                 time included, so a small layer whose kernel beats dense but whose call does not stays dense;
                 with cuda_graphs it goes sparse, and is then faster only when the model runs under graphs
    """
    formats, blocks = _check_args(model, formats, min_speedup, blocks, reps, backend,
                                  {"exact": exact, "inplace": inplace, "measure_model": measure_model,
                                   "cuda_graphs": cuda_graphs})
    check_example_inputs(example_inputs)
    if cuda_graphs:
        # the model's tensors and its floating-point inputs on CUDA (integer ones such as the lengths of a packed
        # sequence may stay on the CPU), and at least one tensor there
        weights = [*model.parameters(), *model.buffers()]
        inputs = [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, Tensor)]
        must = weights + [t for t in inputs if t.is_floating_point()]
        kinds = sorted({t.device.type for t in must})
        if not all(t.is_cuda for t in must) or not any(t.is_cuda for t in weights + inputs):
            raise ValueError(f"cuda_graphs=True times CUDA-graph replays: the model and its floating-point "
                             f"example_inputs must be on a CUDA device, got devices {kinds or ['none']}")
    tcache: TuningCache = resolve_cache(cache)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    _densify_sparse_layers(target)
    baseline = _dense_baseline(target) if measure_model else None   # before any layer is swapped
    # attention projections with zeros become nn.Linear children (LinearMultiheadAttention) to be measured;
    # no nested tensors while layers are hooked or converted (put back for the encoders that stay stock)
    nested = no_nested_tensors(target)
    exposed = expose_sparse_attention(target)
    # so do the weight matrices of recurrent modules with zeros (LinearRecurrent)
    exposed_rnn = expose_sparse_recurrent(target)
    is_layer = lambda m: isinstance(m, SPARSE_LAYERS) and not isinstance(m, SPARSE_MODULES)
    calls: dict[str, tuple] = {}       # each converted attention's first call, to time it against the stock one
    hooks = [target.get_submodule(n).register_forward_pre_hook(_record_call(calls, n), with_kwargs=True)
             for n in (*exposed, *exposed_rnn)]
    # a recurrent module the user converted (to prune its weights) is timed against its stock form too, as are
    # the ones converted here (unless exact=True must keep its masked children)
    converted_rnn = {n: m.to_stock(masked_values=True) for n, m in target.named_modules()
                     if isinstance(m, LinearRecurrent) and n not in exposed_rnn and n
                     and all(isinstance(getattr(m, c), nn.Linear) for c in m.layer_names())
                     and not (exact and any(parametrize.is_parametrized(getattr(m, c)) for c in m.layer_names()))}
    hooks += [target.get_submodule(n).register_forward_pre_hook(_record_call(calls, n), with_kwargs=True)
              for n in converted_rnn]
    # a recurrent weight's first input is the initial state (zeros, unless given): a later call is measured
    recurrent = {f"{n}.{c}" for n, m in target.named_modules() if isinstance(m, LinearRecurrent)
                 for c in m.layer_names() if c[:2] == "hh"}
    try:
        try:
            inputs = capture_inputs(target, example_inputs, is_layer, second_call=recurrent)
        except Exception as exc:
            if not exposed_rnn:
                raise
            # model code may use the stock module in ways the converted one does not mirror: keep it stock
            restore_dense_recurrent(target, exposed_rnn)
            failed, exposed_rnn = sorted(exposed_rnn), {}
            calls = {k: v for k, v in calls.items() if k not in failed}
            inputs = capture_inputs(target, example_inputs, is_layer, second_call=recurrent)
            warnings.warn(f"sparsify: the model failed to run with its recurrent modules {failed} converted "
                          f"({type(exc).__name__}: {_first_line(exc)}); they stay stock nn.RNN / LSTM / GRU "
                          "modules (dense)", RuntimeWarning, stacklevel=2)
    except BaseException as exc:
        restore_dense_attention(target, exposed)      # (inplace=True: its attention and nested-tensor flags back)
        restore_dense_recurrent(target, exposed_rnn)
        restore_nested_tensors(nested)
        if not isinstance(exc, (RuntimeError, ValueError, TypeError, IndexError)):
            raise
        given = pytree.tree_map(lambda a: tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__,
                                example_inputs)
        raise ValueError(f"example_inputs: the model failed to run on them ({type(exc).__name__}: "
                         f"{_first_line(exc, 200)}); expected inputs the model accepts (a Tensor, positional args "
                         f"or a dict of keyword args), got {given}") from exc
    finally:
        for h in hooks:
            h.remove()
    inside_mha = attention_children(target)
    aliases = module_aliases(target)
    tied = shared_weights(target, (*SPARSE_LAYERS, nn.Embedding))   # (tied embeddings / LM heads too)
    first = next(iter(inputs.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    report = SparsifyReport([], device_name(device), str(first.dtype if first is not None else torch.float32),
                            float(min_speedup))
    if cuda_graphs:
        report.notes.append("timed as CUDA-graph replays (cuda_graphs=True): the speeds of this model run under CUDA "
                            "graphs, e.g. torch.compile(mode=\"reduce-overhead\"); eager calls also pay their host "
                            "time")
    hf = [n for n, m in target.named_modules() if n and _is_hf_conv1d(m)]
    if hf:
        report.notes.append(f"{len(hf)} Hugging Face Conv1D layer(s) left dense ({', '.join(hf[:3])}"
                            f"{', ...' if len(hf) > 3 else ''}): sparsify swaps nn.Linear / conv layers; convert "
                            "them first with sparsekit.nn.conv1d_to_linear(model)")
    for name, inp in inputs.items():
        mod = target.get_submodule(name)
        if any(a in inside_mha for a in aliases[id(mod)]):
            continue  # nn.MultiheadAttention reads its projection weights directly
        w = _weight2d(mod)
        if not bool(w.eq(0).any()):
            continue
        stats = pattern_stats(w, blocks)
        factories = _candidates(mod, w, stats, formats, blocks, backend, exact, math.prod(inp.shape[:-1]))
        custom = overridden_forward(mod)
        as_stock = bool(custom) and acts_as_stock(mod, inp)
        if as_stock:
            custom = None
        if name in tied or custom:     # no candidate to time: only dense is measured (a sparse copy would untie
            factories = {}             # the weight, or drop the subclass's own forward)
        key = TuningCache.key({"device": device_name(inp.device), "switches": kernel_switches(inp.device),
                               "code": code_revision(), "dtype": str(inp.dtype), **_kind(mod),
                               "weight": list(w.shape), "input": list(inp.shape), "stats": stats,
                               "candidates": sorted(factories), "backend": backend, "exact": exact,
                               **({"timing": "cuda_graphs"} if cuda_graphs else {})})
        notes: list[str] = []
        built: dict[str, nn.Module] = {}
        hit = tcache.get(key)
        if hit is not None:
            times = hit["times_ms"]
            notes = list(hit.get("notes", []))
        else:
            times, built, transient = _measure(mod, inp, factories, reps, notes, cuda_graphs)
            if transient:   # (a run-time error may pass, out of memory for one: measured again next call)
                notes.append("not cached: a candidate failed at run time")
            else:
                tcache.put(key, {"times_ms": times, "notes": notes})
            notes = list(notes)   # notes added below are about this call, not the stored measurement
        sparse_times = {k: v for k, v in times.items() if k in factories}
        best = min(sparse_times, key=sparse_times.get) if sparse_times else "dense"
        choice = best if best != "dense" and times["dense"] / sparse_times[best] >= min_speedup else "dense"
        if name in tied:
            notes.append(f"weight tied to {', '.join(tied[name])}: kept dense (a sparse copy would untie it)")
        if custom:
            notes.append(custom)
        if as_stock:
            notes.append(f"{parametrize.type_before_parametrizations(mod).__name__} overrides its forward but holds "
                         "nothing of its own and gave the stock layer's output on this layer's input: measured as "
                         "the stock layer")
        others = [a for a in aliases[id(mod)] if a != name]
        if others:
            notes.append(f"the same module as {', '.join(others)}")
        used = "torch"
        if choice != "dense":
            try:  # a cached choice is built here for the first time: it may still fail
                new = built[choice] if choice in built else factories[choice]()
            except (ValueError, TypeError, RuntimeError) as exc:
                notes.append(f"{choice} could not be built ({_first_line(exc)}); kept dense")
                choice = "dense"
            else:
                for alias in (name, *others):
                    set_submodule(target, alias, new)
                used = new.chosen_backend = _backend_used(new, inp)   # sk.save records it (information only)
        report.layers.append(LayerDecision(
            name=name, kind=_kind(mod)["kind"], weight_shape=tuple(mod.weight.shape), input_shape=tuple(inp.shape),
            sparsity=stats["sparsity"], pattern=_describe(stats), times_ms=times, choice=choice,
            speedup=times["dense"] / times[choice], cached=hit is not None, notes=notes, backend=used,
            scattered=_scattered(stats)))
    tcache.save()
    _keep_faster_converted(target, exposed, calls, report, reps, device, cuda_graphs=cuda_graphs)
    _keep_faster_converted(target, exposed_rnn, calls, report, reps, device, cuda_graphs=cuda_graphs)
    # (one the user converted is compared even with no sparse layer: its dense time loop is the slower one)
    _keep_faster_converted(target, converted_rnn, calls, report, reps, device, always=True, cuda_graphs=cuda_graphs)
    restored = {n: "nn.MultiheadAttention" for n in restore_dense_attention(target, exposed)}
    restored.update({n: f"nn.{type(exposed_rnn[n]).__name__}" for n in restore_dense_recurrent(target, exposed_rnn)})
    for name in (*exposed, *exposed_rnn):
        if name not in restored:      # kept converted: a later sparsify (a loaded model) packs it back first
            target.get_submodule(name).sparsify_converted = True
    for d in report.layers:     # (a converted module kept converted has its timing note already)
        parent = d.name.rpartition(".")[0]
        if parent in restored:
            d.notes.append(f"nothing in {parent} beat dense: it stays an {restored[parent]}")
    restore_nested_tensors(nested)
    disable_fused_transformer_paths(target)
    if not exact:
        # what is left masked (layers kept dense, masked norms and attention projections) becomes plain
        # parameters with the zeros baked in: that is what the dense candidates were timed as (a mask
        # parametrization costs about a dense forward again) and what sk.save stores
        bake_masks(target)
    if baseline is not None and report.layers:
        t = _median_ms({"dense": lambda: run_example(baseline, example_inputs),
                        "sparse": lambda: run_example(target, example_inputs)}, reps, device, cuda_graphs, report.notes)
        report.dense_ms, report.sparse_ms = t["dense"], t["sparse"]
    return target, report


def _record_call(calls: dict[str, tuple], name: str) -> Callable:
    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.setdefault(name, (args, dict(kwargs)))
    return hook


def _keep_faster_converted(target: nn.Module, exposed: dict[str, nn.Module], calls: dict[str, tuple],
                           report: SparsifyReport, reps: int, device: torch.device, always: bool = False,
                           cuda_graphs: bool = False) -> None:
    """Time every converted attention / recurrent module that got sparse layers against the stock module it
    replaced, on its recorded call (same loop, medians); the stock module comes back (and leaves ``exposed``)
    unless the converted one beats it by ``min_speedup`` too: one packed q|k|v GEMM and fused kernels (an
    attention's, oneDNN's or cuDNN's fused RNN) can outweigh a sparse layer. ``always``: also when none of its
    layers went sparse."""
    for name, original in list(exposed.items()):
        mod = target.get_submodule(name)
        layers = [getattr(mod, p) for p in mod.layer_names()]
        if name not in calls or not (always or any(isinstance(p, SPARSE_MODULES) for p in layers)):
            continue
        a, kw = calls[name]
        fns = {"stock": lambda m=original, a=a, kw=kw: m(*a, **kw), "converted": lambda m=mod, a=a, kw=kw: m(*a, **kw)}
        with parametrize.cached():   # masked weights computed once per call, as the baked model will hold them
            t = _median_ms(fns, reps, device, cuda_graphs, report.notes)
        keep = t["stock"] / t["converted"] >= report.min_speedup
        if not keep:
            for alias in module_aliases(target)[id(mod)]:      # (one module under several names stays one)
                set_submodule(target, alias, original)
            del exposed[name]
        stock = f"nn.{type(original).__name__}"
        for d in report.layers:
            if d.name.rpartition(".")[0] != name:
                continue
            d.notes.append(f"{name} with its sparse layers took {t['converted']:.2f} ms, the stock {stock} "
                           f"{t['stock']:.2f} ms" + ("" if keep else f" (not {report.min_speedup}x faster): it stays "
                                                                      "stock"))
            if not keep:
                d.choice, d.speedup, d.backend, d.stock_attention = "dense", 1.0, "torch", True


def _fitting_blocks(stats: dict) -> dict[str, float]:
    """The block shapes whose stored fraction of the weight could beat dense."""
    return {k: v for k, v in stats["blocks"].items() if v is not None and v <= MAX_STORED_DENSITY}


def _scattered(stats: dict) -> bool:
    """Single zeros: no block fits but 1x4 / 4x1 (which a scattered pattern also fills partly: a random 90% mask
    leaves a third of its 1x4 blocks nonzero)."""
    return all(k in ("1x4", "4x1") for k in _fitting_blocks(stats))


def _describe(stats: dict) -> str:
    blocks = [f"{k}:{v:.2f}" for k, v in _fitting_blocks(stats).items()]
    parts = [f"blocks {' '.join(blocks)}" if blocks else "unstructured"]
    if stats["nm"]:
        parts.append(f"n:m {stats['nm'][0]}")
    if stats["zero_rows"]:
        parts.append(f"zero rows {stats['zero_rows']:.2f}")
    return ", ".join(parts)


__all__ = ["sparsify", "SparsifyReport", "LayerDecision", "capture_inputs", "pattern_stats"]
