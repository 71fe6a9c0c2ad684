"""sk.verify: check that a pruned / compacted / sparsified model computes what the reference computes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .prune.pruner import check_example_inputs, run_example

# Hugging Face's key / value cache: a compacted attention keeps fewer heads in it, by design (the outputs computed
# from it are compared); a Cache object is not a tensor container here either
CACHE_KEY = "past_key_values"


class VerificationError(AssertionError):
    """Raised by verify() when outputs differ; the message names the worst output and the first layer off."""


def _tensors(obj: Any, path: str = "output") -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _tensors(o, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, o in obj.items():
            if k != CACHE_KEY:
                yield from _tensors(o, f"{path}[{k!r}]")
    elif hasattr(obj, "to_tuple"):  # Hugging Face ModelOutput
        yield from _tensors(obj.to_tuple(), path)


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


def _max_diff(a: Tensor, b: Tensor) -> float:
    """Max |a - b|; equal infinities match, and a NaN on either side or an infinity facing anything else is an
    infinite difference (never within any tolerance: a model that starts producing NaN is not the reference)."""
    if not a.numel():
        return 0.0
    a, b = a.double(), b.double()
    d = float(torch.where(a == b, 0.0, (a - b).abs()).max())
    return math.inf if math.isnan(d) else d


def _tolerance(ref: Tensor, atol: float, rtol: float) -> float:
    """atol + rtol * the largest finite |reference| (a NaN or inf there would make every difference pass)."""
    if not rtol or not ref.numel():
        return atol
    finite = ref.detach().double().abs()
    finite = finite[torch.isfinite(finite)]
    return atol + rtol * (float(finite.max()) if finite.numel() else 0.0)


def _non_finite_note(a: Tensor, b: Tensor) -> str:
    """Why a difference is infinite: which side has a NaN, or an infinity the other side does not."""
    nan_a, nan_b = bool(torch.isnan(a).any()), bool(torch.isnan(b).any())
    if nan_a or nan_b:
        return f" (NaN in {'the reference' if not nan_b else 'the candidate' if not nan_a else 'both'})"
    return " (an infinity where the other has another value)"


def verify(reference: nn.Module, candidate: nn.Module, example_inputs: Any, atol: float = 1e-4,
           rtol: float = 0.0) -> dict[str, float]:
    """Run both models on example_inputs (a Tensor, a tuple/list of positional args or a dict of keyword args,
    as the Pruner takes them) and compare every output tensor.

    Returns {output path: max abs difference}. Raises VerificationError naming the worst output and the first
    submodule (same name in both models, same output shape) whose output differs by more than the tolerance.
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
    check_example_inputs(example_inputs)
    ref_out, ref_seen = _run_recording(reference, example_inputs)
    cand_out, cand_seen = _run_recording(candidate, example_inputs)
    ref_t, cand_t = dict(_tensors(ref_out)), dict(_tensors(cand_out))
    if ref_t.keys() != cand_t.keys():
        raise VerificationError(f"outputs differ in structure: reference {sorted(ref_t)} vs candidate {sorted(cand_t)}")
    diffs = {}
    for path, a in ref_t.items():
        b = cand_t[path]
        if a.shape != b.shape:
            raise VerificationError(f"{path}: shape {tuple(a.shape)} (reference) vs {tuple(b.shape)} (candidate)")
        diffs[path] = _max_diff(a, b)
    bad = {p: d for p, d in diffs.items() if d > _tolerance(ref_t[p], atol, rtol)}
    if bad:
        worst = max(bad, key=bad.get)
        first_layer = next((n for n in ref_seen if n in cand_seen and ref_seen[n].shape == cand_seen[n].shape
                            and _max_diff(ref_seen[n], cand_seen[n]) > _tolerance(ref_seen[n], atol, rtol)), None)
        where = (f"; first layer off: {first_layer!r} (max |diff| "
                 f"{_max_diff(ref_seen[first_layer], cand_seen[first_layer]):.3g})") if first_layer else ""
        nan = _non_finite_note(ref_t[worst], cand_t[worst]) if math.isinf(bad[worst]) else ""
        raise VerificationError(f"{worst}: max |diff| {bad[worst]:.3g}{nan} > atol {atol}"
                                f"{f' + rtol {rtol} * max|reference|' if rtol else ''}{where}")
    return diffs
