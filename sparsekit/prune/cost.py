"""Parameters and FLOPs a masked model has once its removed channels are taken out physically.

A layer keeps the output rows that still have a weight and, along plain chains (``chains``), only the
input columns of the channels its producer kept; a BatchNorm between them keeps the producer's channels.
Element / block / n:m zeros inside the kept rows and columns count as removed too (``params``), so compare
unstructured results with ``index_params`` in mind: a sparse format stores an index per kept weight.

    cost = model_cost(model, example_inputs)                  # masks read from the model's parametrizations
    cost = model_cost(model, example_inputs, masks=pruner.select(pruner.scores(), 0.7))   # a preview
    cost["params"], cost["flops"], cost["dense_params"], cost["dense_flops"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import chains as _chains
from . import masks as _masks
from .module_copy import stored_originals
from .recurrent import RECURRENT, parameter_names

__all__ = ["model_cost", "layer_positions"]


def layer_positions(events: list[_chains.Event]) -> dict[str, int]:
    """Output positions per prunable layer (H*W for a conv, tokens for a linear) from traced events, summed over
    its calls (a layer run twice does its products twice); for a transposed conv its input positions (each input
    pixel meets every weight once); for a recurrent layer its time steps."""
    out: dict[str, int] = {}
    for ev in events:
        if ev.kind != "module":
            continue
        n = None
        if isinstance(ev.module, _masks.TRANSPOSED_CONVS) and ev.inputs:
            n = int(torch.Size(ev.inputs[0].shape[2:]).numel())
        elif isinstance(ev.module, RECURRENT) and ev.inputs:
            shape = ev.inputs[0].shape      # [T, B, I], [B, T, I] (batch_first) or unbatched [T, I]
            n = int(shape[1] if ev.module.batch_first and len(shape) == 3 else shape[0])
        elif isinstance(ev.module, _masks.PRUNABLE) and ev.output is not None:
            shape = ev.output.shape
            if isinstance(ev.module, _masks.CONVS):
                n = int(torch.Size(shape[2:]).numel())
            else:
                n = int(torch.Size(shape[1:-1]).numel()) if len(shape) > 2 else 1
        if n is not None:
            out[ev.name] = out.get(ev.name, 0) + n
    # a LinearRecurrent's input projection runs once over all the time steps ([T * B, I] rows), its recurrent one
    # once per step: per sample the input projection does as many products as the recurrent one
    for name in list(out):
        head, _, tail = name.rpartition(".")
        if tail.startswith("ih_l") and (sibling := f"{head}.hh_{tail[3:]}" if head else f"hh_{tail[3:]}") in out:
            out[name] = out[sibling]
    return out


def _own_params(mod: nn.Module, kept: bool = False) -> int:
    """Parameters a module holds itself, masked ones (a parametrization's ``original``) included; ``kept``:
    only the entries its masks keep (an embedding's removed features)."""
    n = sum(p.numel() for p in mod.parameters(recurse=False))
    if parametrize.is_parametrized(mod):
        for t, plist in mod.parametrizations.items():
            p = _masks._mask_param(mod, t) if kept else None
            n += int(sum(t.numel() for t in stored_originals(plist)) if p is None else p.mask.sum())
    return n


def model_cost(model: nn.Module, example_inputs: Any, masks: Mapping[str, Tensor] | None = None,
               events: list[_chains.Event] | None = None) -> dict[str, float]:
    """``params`` / ``flops`` (multiply-accumulates per sample) after structural removal, their dense
    counterparts, and ``index_params`` (``params`` plus one index per weight kept inside a layer that is not
    entirely dense, the storage view of Salama et al. 2019, Table 4)."""
    events = _chains.trace_events(model, example_inputs) if events is None else events
    modules = dict(model.named_modules())
    layers = {k: v for k, v in modules.items() if isinstance(v, _masks.PRUNABLE)}
    masks = dict(_masks.get_masks(model) if masks is None else masks)
    links = _chains.trace_links(model, example_inputs, layers, events=events)
    positions = layer_positions(events)
    rows_keep = {}
    for name, mod in layers.items():
        mask = masks.get(name)
        w = mod.weight
        rows_keep[name] = (torch.ones(w.shape[0], dtype=torch.bool) if mask is None
                           else _masks.as_2d(mask).any(dim=1).cpu())
    cols_keep: dict[str, Tensor] = {}
    bn_keep: dict[nn.Module, Tensor] = {}
    for name, link in links.items():
        if link.consumer is None:
            continue
        cq = _masks.as_2d(layers[link.consumer].weight).shape[1]
        keep = rows_keep[name]
        cols_keep[link.consumer] = keep.repeat_interleave(cq // keep.numel())
        for idx in link.path:
            mod = events[idx].module
            if isinstance(mod, _masks.CHANNEL_NORMS) or (
                    isinstance(mod, nn.PReLU) and mod.num_parameters > 1):   # per-channel parameters
                bn_keep[mod] = keep
    params = dense_params = flops = dense_flops = index_extra = 0.0
    for name, mod in modules.items():
        if name in layers:
            w2 = _masks.as_2d(mod.weight)
            mask = masks.get(name)
            m2 = torch.ones(w2.shape, dtype=torch.bool) if mask is None else _masks.as_2d(mask).cpu()
            rows, cols = rows_keep[name], cols_keep.get(name, torch.ones(w2.shape[1], dtype=torch.bool))
            sub = m2[rows][:, cols]
            kept = float(sub.sum())
            pos = positions.get(name, 1)
            bias = getattr(mod, "bias", None)
            params += kept + (float(rows.sum()) if bias is not None else 0.0)
            dense_params += w2.numel() + (bias.numel() if bias is not None else 0)
            flops += kept * pos
            dense_flops += w2.numel() * pos
            if kept < sub.numel():
                index_extra += kept
        elif "parametrizations" in name.split("."):     # a mask's container: counted with its module
            continue
        elif isinstance(mod, _masks.TRANSPOSED_CONVS):  # its channels go with their groups' masks
            mask = masks.get(name)
            kept = float(mod.weight.numel() if mask is None else mask.sum())
            outs = mod.out_channels if mask is None else int(mask.any(0).flatten(1).any(1).sum())
            bias = mod.bias is not None
            params += kept + (outs if bias else 0)
            dense_params += mod.weight.numel() + (mod.out_channels if bias else 0)
            flops += kept * positions.get(name, 1)
            dense_flops += mod.weight.numel() * positions.get(name, 1)
            if kept < mod.weight.numel():     # element / block zeros: an index per kept weight, as for convs
                index_extra += kept
        elif isinstance(mod, RECURRENT):                # its hidden units go with their groups' masks
            for t in parameter_names(mod):
                full = getattr(mod, t).numel()
                p = _masks._mask_param(mod, t)
                kept = float(full if p is None else p.mask.sum())
                params += kept
                dense_params += full
                if t.startswith("weight"):
                    flops += kept * positions.get(name, 1)
                    dense_flops += full * positions.get(name, 1)
        elif mod in bn_keep:
            n_aff = _own_params(mod)
            params += n_aff * float(bn_keep[mod].float().mean())
            dense_params += n_aff
        elif not any(name.startswith(k + ".") for k in layers):
            params += _own_params(mod, kept=True)
            dense_params += _own_params(mod)
    return {"params": params, "dense_params": dense_params, "flops": flops, "dense_flops": dense_flops,
            "index_params": params + index_extra}
