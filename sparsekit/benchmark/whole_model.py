"""Whole-model benchmark: a reference model pruned (``sparsekit.prune.Pruner``), converted
(``sparsekit.nn.convert_modules``) and timed against the same pruned model run dense, in one loop.

Models (``sparsekit.models``):

    ffn          FFN 768 -> 3072 -> 768 (the BERT-base MLP), batch x 128 tokens
    transformer  TransformerEncoder with BERT-base widths (768, 12 heads, FFN 3072), 2 layers on CPU / 12 on
                 CUDA, sequence 128; the classifier head (768 -> 2) is left dense

Candidates: dense (the pruned model with masks baked, eager), dense_compile (torch.compile of it, compiled
once per model/dtype; pruned weights are loaded in place so nothing recompiles), sparsekit_<backend> for every
usable backend (the converted model with that backend forced). Correctness: each converted model's output is
checked against the dense pruned model's before timing. The ideal 1/(1-s) is an upper bound here: attention
scores, softmax, LayerNorm and activations are not sparse.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .machine import restore_tf32, set_tf32
from .patterns import Pattern, nm_for_sparsity
from .progress import Progress
from .sweep import (
    DTYPES,
    TF32_TOLERANCE,
    TOLERANCE,
    Candidate,
    SweepConfig,
    compile_dense,
    make_rows,
    mark_interrupted,
    measure,
    new_results,
    note_unusable,
)

__all__ = ["MODELS", "ModelSpec", "run_model_sweep"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str
    batch_cpu: int
    batch_cuda: int

    def build(self, device: str, quick: bool, seed: int = 0) -> nn.Module:
        """The model, its weights drawn from ``seed`` (so are its magnitude masks: the same every run); the
        caller's random state is left as it was."""
        from .. import models

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.name == "ffn":
                return models.FFN(dim=768, hidden=3072, tokens=64 if quick else 128)
            cfg = {**models.bert_base_config(), "layers": 12 if device == "cuda" else (1 if quick else 2),
                   "seq_len": 64 if quick else 128}
            return models.TransformerEncoder(**cfg)

    def batch(self, device: str, override: int | None) -> int:
        return override if override is not None else (self.batch_cuda if device == "cuda" else self.batch_cpu)


MODELS: dict[str, ModelSpec] = {
    "ffn": ModelSpec("ffn", "FFN 768-3072-768 (BERT-base MLP)", 4, 64),
    "transformer": ModelSpec("transformer", "TransformerEncoder, BERT-base widths", 2, 32),
}
QUICK_MODELS = ("ffn",)


def _model_patterns(cfg: SweepConfig, k_min: int, notes: dict[str, str]) -> list[tuple[Pattern, float]]:
    """(pattern, target sparsity) pairs; an n:m pattern prunes to its own sparsity 1 - n/m."""
    out: list[tuple[Pattern, float]] = []
    for kind in cfg.formats:
        for s in cfg.sparsities:
            if kind == "bsr":
                out += [(Pattern("bsr", block=b), s) for b in cfg.blocks]
            elif kind == "csr":
                out.append((Pattern("csr"), s))
            else:
                nm = nm_for_sparsity(s, k_min)
                if nm is None:
                    notes.setdefault(f"nm@{s}", f"no n:m within 0.02 of sparsity {s}; skipped")
                elif all(p.name != f"nm{nm[0]}:{nm[1]}" for p, _ in out):
                    out.append((Pattern("nm", n=nm[0], m=nm[1]), s))
    return out


def _granularity(p: Pattern) -> dict:
    if p.kind == "bsr":
        return {"granularity": "block", "block": p.block}
    if p.kind == "nm":
        return {"granularity": "nm", "n": p.n, "m": p.m}
    return {"granularity": "element"}


def _prune(master: nn.Module, x: object, p: Pattern, s: float, ignore: list[str]) -> tuple[nn.Module, float]:
    from ..prune import Pruner

    model = copy.deepcopy(master)
    pruner = Pruner(model, x, criterion="magnitude", scope="layer", sparsity=s, ignore=ignore, **_granularity(p))
    pruner.step()
    rep = pruner.sparsity_report()
    numel = sum(math.prod(r["shape"]) for r in rep)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in rep)
    pruner.bake()
    return model, zeros / numel if numel else 0.0


def run_model_sweep(cfg: SweepConfig) -> dict:
    """Run the whole-model sweep; returns the results dict (``sweep.save_results`` writes it)."""
    from ..nn import SparseConv2d, SparseLinear, convert_modules
    from ..ops import all_reasons

    cfg.validate()
    names = cfg.models or (QUICK_MODELS if cfg.quick else tuple(MODELS))
    for n in names:
        if n not in MODELS:
            raise ValueError(f"models: unknown model {n!r}; expected a subset of {sorted(MODELS)}")
    old_tf32 = set_tf32(cfg.tf32)
    try:
        results = new_results("model", cfg)
        notes = results["notes"]
        plan = []
        for name in names:
            spec = MODELS[name]
            master = spec.build(cfg.device, cfg.quick, cfg.seed).eval()
            k_min = min(m.in_features for m in master.modules() if isinstance(m, nn.Linear))
            for dtype in cfg.dtypes:
                for p, s in _model_patterns(cfg, k_min, notes):
                    plan.append((spec, master, dtype, p, s))
        with Progress(len(plan), "sparsekit bench model", enabled=cfg.progress) as bar:
            state: dict = {}
            for done, (spec, master, dtype_name, p, s) in enumerate(plan):
                try:
                    results["rows"] += _run_model_job(cfg, spec, master, dtype_name, p, s, notes, state,
                                                      SparseLinear, SparseConv2d, convert_modules, all_reasons)
                except KeyboardInterrupt:
                    mark_interrupted(results, done, len(plan), "sparsekit bench model")
                    break
                bar.update(1, desc=f"{spec.name} {dtype_name} {p.name} s={s:g}")
        with contextlib.suppress(OSError):
            results["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        return results
    finally:
        restore_tf32(old_tf32)


def _run_model_job(cfg, spec, master, dtype_name, p, s, notes, state, SparseLinear, SparseConv2d,
                   convert_modules, all_reasons) -> list[dict]:
    device, dtype = cfg.device, DTYPES[dtype_name]
    key = (spec.name, dtype_name)
    batch = spec.batch(device, cfg.m)
    if state.get("key") != key:
        state.clear()
        state["key"] = key
        x = master.example_input(batch)
        state["x"] = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        state["x_master"] = x
        holder = copy.deepcopy(master).to(device=device, dtype=dtype).eval()
        state["holder"] = holder
        if cfg.compile:
            state["compiled"] = compile_dense(holder, cfg.compile_mode)
    x: Tensor = state["x"]
    holder: nn.Module = state["holder"]
    ignore = ["fc"] if spec.name == "transformer" else []
    pruned, actual = _prune(master, state["x_master"], p, p.sparsity(s), ignore)
    holder.load_state_dict(pruned.state_dict())
    tokens = x.shape[0] * (x.shape[1] if x.dim() >= 2 else 1)
    base = {"suite": "model", "device": device, "op": "model", "shape": spec.name, "M": tokens, "N": None,
            "K": None,
            "geometry": f"{spec.label}, input {tuple(x.shape)}", "dtype": dtype_name, "pattern": p.name,
            "format": p.family, "block": p.block_str, "nm": f"{p.n}:{p.m}" if p.kind == "nm" else "",
            "target_sparsity": s, "sparsity": actual}
    cands = [Candidate("dense", "dense", lambda: holder(x))]
    if cfg.compile:
        compiled = state["compiled"]
        cands.append(Candidate("dense_compile", "dense", lambda: compiled(x)))
    conv_kw = {"block": p.block or 32, "n": p.n or 2, "m": p.m or 4}
    probe_model = convert_modules(copy.deepcopy(pruned), format=p.family, **conv_kw)
    sparse_mods = [m for m in probe_model.modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    if not sparse_mods:
        skipped = getattr(probe_model, "sparsekit_skipped", {})
        notes.setdefault(f"{spec.name}/{p.name}", f"no layer converted: {skipped}")
        return []
    first = sparse_mods[0]
    fmt = first.sparse_weight().to(device=device, dtype=dtype)
    x_probe = torch.empty(1, first.weight_shape[1], dtype=dtype, device=device)
    nbytes = 0
    for name, reasons in all_reasons(p.family, x_probe, fmt).items():
        if name == "reference" and not cfg.include_reference:
            continue
        if reasons:
            note_unusable(notes, name, p.family, p.name, reasons)
            continue
        sparse = convert_modules(copy.deepcopy(pruned), format=p.family, backend=name, **conv_kw)
        sparse = sparse.to(device=device, dtype=dtype).eval()
        nbytes = sum(m.weight_nbytes for m in sparse.modules() if isinstance(m, (SparseLinear, SparseConv2d)))
        cands.append(Candidate(f"sparsekit_{name}", "sparsekit", lambda m=sparse: m(x), nbytes,
                               note=f"{len(sparse_mods)} layers sparse"))
    tol = TF32_TOLERANCE if (dtype == torch.float32 and cfg.tf32 and device == "cuda") else TOLERANCE[dtype]
    # whole models add LayerNorm/softmax rounding on top of the GEMMs: allow a little more than one op
    res, reps = measure(cands, tol * 10, device, cfg)
    return make_rows(base, cands, res, reps, None, 0, 0, None)
