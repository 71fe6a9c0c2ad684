"""sk.verify: check that a pruned / compacted / sparsified model computes what the reference computes."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .prune.pruner import check_example_inputs, run_example

# Hugging Face's key / value cache: a compacted attention keeps fewer heads in it, by design (the outputs computed
# from it are compared); a Cache object is not a tensor container here either
CACHE_KEY = "past_key_values"


class VerificationError(AssertionError):
    """Raised by verify() when outputs differ; the message names the worst output and the first layer off."""


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _leaves(obj: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    """Every tensor and every other leaf (numbers, strings, None, objects) of an output, with its path: through
    tuples, lists, dicts (Hugging Face's ModelOutput is one) and dataclasses."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _leaves(o, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, o in obj.items():
            if k != CACHE_KEY:
                yield from _leaves(o, f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif hasattr(obj, "to_tuple"):  # a ModelOutput-like object that is not a dict
        yield from _leaves(obj.to_tuple(), path)
    else:
        yield path, obj


def _tensors(obj: Any, path: str = "output") -> Iterator[tuple[str, Tensor]]:
    return ((p, v) for p, v in _leaves(obj, path) if isinstance(v, Tensor))


def _same_leaf(a: Any, b: Any, tol: float) -> bool:
    """Two non-tensor leaves match: numbers within the tolerance, anything else by ==."""
    if isinstance(a, (int, float, complex)) and isinstance(b, (int, float, complex)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or abs(a - b) <= tol
    try:
        same = a == b
    except Exception:                    # noqa: BLE001 -- an object without a usable ==
        return False
    return same is True or (isinstance(same, bool) and same)


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Both models in eval mode (no BatchNorm statistics updated, no dropout), their flags restored after."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _cloned(example_inputs: Any) -> Any:
    """A copy of the inputs' tensors, so that a forward changing its input in place changes neither the other
    run's input nor the caller's."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, example_inputs)


def _run_recording(model: nn.Module, example_inputs: Any) -> tuple[Any, dict[str, Tensor]]:
    """Run the model, recording each named submodule's (first tensor) output."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name:
            def hook(_m, _i, out, name=name):
                first = next(_tensors(out), None)
                if first is not None and name not in seen:
                    seen[name] = first[1].detach()
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = run_example(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _max_diff(a: Tensor, b: Tensor, equal_nan: bool = False) -> float:
    """Max |a - b|; equal infinities match, and a NaN on either side or an infinity facing anything else is an
    infinite difference (never within any tolerance: a model that starts producing NaN is not the reference),
    except NaN facing NaN with ``equal_nan``. Complex outputs are compared as complex numbers."""
    if not a.numel():
        return 0.0
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a, b = a.to(wide), b.to(wide)
    same = a == b
    if equal_nan:
        same |= a.isnan() & b.isnan()
    d = float(torch.where(same, 0.0, (a - b).abs()).max())
    return math.inf if math.isnan(d) else d


def _largest_finite(ref: Tensor) -> float:
    """The largest finite |reference| (0 when there is none)."""
    finite = ref.detach().double().abs()
    finite = finite[torch.isfinite(finite)]
    return float(finite.max()) if finite.numel() else 0.0


def _tolerance(ref: Tensor, atol: float, rtol: float) -> float:
    """atol + rtol * the largest finite |reference| (a NaN or inf there would make every difference pass)."""
    if not rtol or not ref.numel():
        return atol
    return atol + rtol * _largest_finite(ref)


def _scale_note(ref: Tensor, diff: float) -> str:
    """Where the outputs are large (an untrained model whose activations grow layer by layer), a difference
    over atol can be float rounding: then say so, against the reference's scale."""
    scale = _largest_finite(ref)
    if not math.isfinite(diff) or scale <= 1.0 or diff / scale >= 1e-5:
        return ""
    return (f" (the reference reaches |{scale:.3g}|: {diff / scale:.2g} of that; float rounding alone reaches that "
            "at this scale: pass rtol= (e.g. rtol=1e-5) to compare relative to it)")


def _non_finite_note(a: Tensor, b: Tensor) -> str:
    """Why a difference is infinite: which side has a NaN, or an infinity the other side does not."""
    nan_a, nan_b = bool(torch.isnan(a).any()), bool(torch.isnan(b).any())
    if nan_a or nan_b:
        return f" (NaN in {'the reference' if not nan_b else 'the candidate' if not nan_a else 'both'})"
    return " (an infinity where the other has another value)"


def verify(reference: nn.Module, candidate: nn.Module, example_inputs: Any, atol: float = 1e-4,
           rtol: float = 0.0, equal_nan: bool = False) -> dict[str, float]:
    """Run both models on example_inputs (a Tensor, a tuple/list of positional args or a dict of keyword args,
    as the Pruner takes them) and compare every output tensor.

    Both run in eval mode under no_grad, each on its own copy of the inputs (their training flags are restored
    after; a train-mode reference would update its BatchNorm statistics). The outputs' structure must match,
    through tuples, lists, dicts and dataclasses; non-tensor leaves (numbers within atol, anything else by
    ``==``) must match too, and there must be a tensor to compare.
    A NaN fails against anything, another NaN too unless ``equal_nan`` (a model whose reference output has NaN
    by design, e.g. fully masked attention rows). Returns {output path: max abs difference}. Raises
    VerificationError naming the worst output and the first submodule (same name in both models, same output
    shape) whose output differs by more than the tolerance.
    A key / value cache (Hugging Face's ``past_key_values``) is not compared: a model whose attention lost heads
    caches fewer of them.
    """
    for name, m in (("reference", reference), ("candidate", candidate)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not isinstance(tol, (int, float)) or isinstance(tol, bool):
            raise TypeError(f"{name} must be a number, got {type(tol).__name__} {tol!r}")
        if not math.isfinite(tol) or tol < 0:   # a NaN tolerance would let every difference pass
            raise ValueError(f"{name} must be a finite non-negative number, got {tol!r}")
    if not isinstance(equal_nan, bool):
        raise TypeError(f"equal_nan must be a bool, got {type(equal_nan).__name__} {equal_nan!r}")
    check_example_inputs(example_inputs)
    with _eval_mode(reference, candidate):
        ref_out, ref_seen = _run_recording(reference, _cloned(example_inputs))
        cand_out, cand_seen = _run_recording(candidate, _cloned(example_inputs))
    ref_all, cand_all = dict(_leaves(ref_out)), dict(_leaves(cand_out))
    if ref_all.keys() != cand_all.keys():
        raise VerificationError(f"outputs differ in structure: reference {sorted(ref_all)} vs candidate "
                                f"{sorted(cand_all)}")
    ref_t = {p: v for p, v in ref_all.items() if isinstance(v, Tensor)}
    cand_t = {p: v for p, v in cand_all.items() if isinstance(v, Tensor)}
    if ref_t.keys() != cand_t.keys():
        raise VerificationError(f"outputs differ in structure (tensors): reference {sorted(ref_t)} vs candidate "
                                f"{sorted(cand_t)}")
    if not ref_t:
        raise VerificationError(f"no tensor outputs to compare (the reference returned {type(ref_out).__name__})")
    for path, a in ref_all.items():
        if not isinstance(a, Tensor) and not _same_leaf(a, cand_all[path], atol):
            raise VerificationError(f"{path}: {a!r} (reference) vs {cand_all[path]!r} (candidate)")
    diffs = {}
    for path, a in ref_t.items():
        b = cand_t[path]
        if a.shape != b.shape:
            raise VerificationError(f"{path}: shape {tuple(a.shape)} (reference) vs {tuple(b.shape)} (candidate)")
        diffs[path] = _max_diff(a, b, equal_nan)
    bad = {p: d for p, d in diffs.items() if d > _tolerance(ref_t[p], atol, rtol)}
    if bad:
        worst = max(bad, key=bad.get)
        first_layer = next((n for n in ref_seen if n in cand_seen and ref_seen[n].shape == cand_seen[n].shape
                            and _max_diff(ref_seen[n], cand_seen[n], equal_nan) > _tolerance(ref_seen[n], atol, rtol)),
                           None)
        where = (f"; first layer off: {first_layer!r} (max |diff| "
                 f"{_max_diff(ref_seen[first_layer], cand_seen[first_layer], equal_nan):.3g})") if first_layer else ""
        nan = _non_finite_note(ref_t[worst], cand_t[worst]) if math.isinf(bad[worst]) else ""
        raise VerificationError(f"{worst}: max |diff| {bad[worst]:.3g}{nan} > atol {atol}"
                                f"{f' + rtol {rtol} * max|reference|' if rtol else ''}"
                                f"{_scale_note(ref_t[worst], bad[worst])}{where}")
    return diffs
