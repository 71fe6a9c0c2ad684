"""Compaction: structured keep-sets -> a physically smaller plain model of the same module classes.

    graph = DependencyGraph.build(model, x)
    keep = graph.select(0.5, scope="global", round_to=8)     # {group id: kept unit indices}
    small = compact(model, x, keep, graph=graph)             # deepcopy; Conv2d/Linear/BN/GN/Embedding resized
    ref = mask_groups(model, x, keep, graph=graph)           # same shapes, every group member zeroed
    sk.verify(ref, small, x, atol=1e-4)

What "equal outputs" compares against. A removed channel is removed from *every* member of its group: the
producer's rows and bias, the BN/GN gamma and beta (so the masked channel outputs exactly 0, not BN's
beta), and the consumers' input columns. ``mask_groups`` builds that reference (a deepcopy with those
entries zeroed); ``compact`` equals it to float rounding. ``member_tensor_masks`` gives the same zeros as
masks (the Pruner applies them, so its masked model *is* that reference). ``compact_from_masks`` derives the
keep-sets from a masked model (a unit goes when every masked producer in its group masks all its rows) and
returns ``(small, keep)``; for masks that zero only producer rows, the reference is ``mask_groups(model, x,
keep)``, which differs from the row-masked model only by the BN beta of removed channels.

Channel selection (seed 000, section 2.3): where a BatchNorm reads a shared stream, the compacted model
wraps it as ``ChannelSelect(index, bn)`` (``torch.index_select`` over the kept channels of the stream; none
where that is the whole compacted stream in order). The selection keeps the units its own group keeps *and*
its stream keeps; like every group it must keep at least one (``graph.select`` ensures ``min_keep``;
``graph.keep_selections`` repairs hand-made keep-sets), else ``compact`` refuses: the layer would read no channel.

Attention heads. One exception to "same module classes": ``nn.MultiheadAttention`` cannot have an inner
width (``num_heads * head_dim``) other than ``embed_dim``, so an instance that loses heads becomes a
``PrunedMultiheadAttention``: same forward signature and results, same parameter names (``in_proj_weight``,
``in_proj_bias``, ``out_proj``, ``bias_k`` / ``bias_v``, ``q/k/v_proj_weight``; plus a ``head_index`` buffer),
fewer heads, the same ``embed_dim`` in and out (works inside ``nn.TransformerEncoderLayer``, which then
calls it rather than its fused native kernel, and as ``nn.TransformerDecoderLayer``'s self- and
cross-attention). An ``nn.TransformerEncoder`` holding one stops converting
padded batches to nested tensors (its fast path assumes a stock attention): outputs at padded positions are
then computed rather than zeroed.

Resized layers are copies of the originals (``module_copy.resized_copy``), not rebuilt through their
constructors: a subclass keeps its class, attributes and hooks (state of its own sized like a cut dim is a
ValueError: it cannot be cut). A weight tied across layers is one Parameter again in the compacted model (and
after ``sk.load``).

Save / load: ``compacted_widths(model)`` is a JSON-able spec of every resized module and selection;
``apply_widths(fresh, widths)`` rebuilds those shapes in a fresh instance of the original class, after which
``load_state_dict`` of the compacted weights succeeds (``sk.save`` / ``sk.load`` call these).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._aliases import module_aliases, retie, tied_layers
from .._compat import set_submodule
from .channel_select import ChannelSelect
from .graph import QKV_PROJ, DependencyGraph, Group, attention_kind, in_proj_parts, set_heads, weight_dim
from .linear_mha import LinearMultiheadAttention, disable_fused_transformer_paths
from .linear_rnn import LinearRecurrent
from .masks import CHANNEL_NORMS, CONVS, TRANSPOSED_CONVS, unmasked
from .module_copy import cut, resized_copy
from .pruned_mha import PrunedMultiheadAttention
from .recurrent import RECURRENT, hidden_unit_rows, index_masks, resize_recurrent, unit_index

__all__ = ["resize_module", "module_keeps", "member_masks", "member_tensor_masks", "mask_groups", "compact",
           "compact_from_masks", "keep_from_masks", "compacted_widths", "apply_widths", "ChannelSelect",
           "PrunedMultiheadAttention"]



def _sel(t: Tensor | None, dim: int, idx: Tensor | None) -> Tensor | None:
    """Entries ``idx`` of ``t`` along ``dim`` (all of them when ``idx`` is None), in a tensor of their own."""
    return cut(t, idx, None) if dim == 0 else cut(t, None, idx)


def resize_module(mod: nn.Module, keep_out: Tensor | None = None, keep_in: Tensor | None = None,
                  within: nn.Module | None = None) -> nn.Module:
    """A copy of ``mod`` keeping indices ``keep_out`` (weight dim 0 / channels / embedding dim) and ``keep_in``
    (weight dim 1); ``None`` keeps everything. The copy is of ``mod``'s class (a subclass too, with its attributes
    and hooks: ``module_copy.resized_copy``; ``within``, the model it is part of, is referenced rather than copied),
    its masks baked in. An attention module (``"mha"``)
    keeps whole heads: ``keep_out`` indexes its packed q|k|v rows and it becomes a ``PrunedMultiheadAttention``."""
    if attention_kind(mod) == "mha":
        return _resize_mha(mod, keep_out, keep_in)
    if isinstance(mod, RECURRENT):     # keep_out: hidden units (of every layer and direction)
        return resize_recurrent(mod, keep_out, keep_in, within)
    w = mod.weight.detach() if getattr(mod, "weight", None) is not None else None
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    if isinstance(mod, CONVS):
        sizes = {"out_channels": _size(mod.out_channels, keep_out), "in_channels": _size(mod.in_channels, keep_in)}
        if mod.groups > 1:
            if keep_in is not None:
                raise ValueError(f"a grouped conv ({mod.groups} groups) loses whole groups, not input columns")
            sizes["groups"] = mod.groups * sizes["out_channels"] // mod.out_channels
            sizes["in_channels"] = mod.in_channels // mod.groups * sizes["groups"]
        tensors = {"weight": cut(w, keep_out, keep_in), "bias": _sel(b, 0, keep_out)}
    elif isinstance(mod, TRANSPOSED_CONVS):
        if mod.groups != 1:
            raise ValueError(f"a grouped transposed conv ({mod.groups} groups) is not resized")
        sizes = {"out_channels": _size(mod.out_channels, keep_out), "in_channels": _size(mod.in_channels, keep_in)}
        tensors = {"weight": cut(w, keep_in, keep_out), "bias": _sel(b, 0, keep_out)}
    elif isinstance(mod, nn.Linear):
        sizes = {"out_features": _size(mod.out_features, keep_out), "in_features": _size(mod.in_features, keep_in)}
        tensors = {"weight": cut(w, keep_out, keep_in), "bias": _sel(b, 0, keep_out)}
    elif isinstance(mod, CHANNEL_NORMS):
        sizes = {"num_features": _size(mod.num_features, keep_out)}
        tensors = {"weight": _sel(w, 0, keep_out), "bias": _sel(b, 0, keep_out),
                   "running_mean": _sel(mod.running_mean, 0, keep_out),
                   "running_var": _sel(mod.running_var, 0, keep_out)}
        if mod.num_batches_tracked is not None:
            tensors["num_batches_tracked"] = mod.num_batches_tracked.detach().clone()
    elif isinstance(mod, nn.GroupNorm):
        n = _size(mod.num_channels, keep_out)
        sizes = {"num_channels": n, "num_groups": mod.num_groups * n // mod.num_channels}
        tensors = {"weight": _sel(w, 0, keep_out), "bias": _sel(b, 0, keep_out)}
    elif isinstance(mod, nn.Embedding):
        sizes = {"embedding_dim": _size(mod.embedding_dim, keep_out)}
        tensors = {"weight": _sel(w, 1, keep_out)}
    elif isinstance(mod, nn.PReLU):
        per_channel = mod.num_parameters > 1 and keep_out is not None
        sizes = {"num_parameters": keep_out.numel() if per_channel else mod.num_parameters}
        tensors = {"weight": _sel(w, 0, keep_out if per_channel else None)}
    elif isinstance(mod, nn.LayerNorm) and keep_out is None:
        return copy.deepcopy(mod)
    else:
        raise TypeError(f"cannot resize a {type(mod).__name__} (resizable: Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                        "Linear, BatchNorm, GroupNorm, InstanceNorm, Embedding, PReLU, RNN, LSTM, GRU)")
    return resized_copy(mod, tensors, sizes, within=within)


def _size(n: int, keep: Tensor | None) -> int:
    return n if keep is None else keep.numel()


def _resize_mha(mod: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    if keep_in is not None:
        raise ValueError(f"{type(mod).__name__} keeps its embed_dim: keep_in must be None, got {keep_in.numel()} "
                         "indices")
    if keep_out is None:
        return copy.deepcopy(mod)
    inner, d = mod.num_heads * mod.head_dim, mod.head_dim
    rows = torch.sort(torch.as_tensor(keep_out, dtype=torch.long).reshape(-1)).values
    heads = torch.unique(rows[rows < inner] // d)
    idx = (heads.reshape(-1, 1) * d + torch.arange(d)).reshape(-1)
    if not torch.equal(rows, torch.cat([idx, idx + inner, idx + 2 * inner])):
        raise ValueError(f"keep_out of a {type(mod).__name__} must keep whole heads (the same heads' q, k and v "
                         f"rows of {d}); got {rows.numel()} of {3 * inner} rows")
    return PrunedMultiheadAttention.from_module(mod, heads)


def _unit_mask(g: Group, kept: Tensor | None) -> Tensor:
    m = torch.ones(g.size, dtype=torch.bool)
    if kept is not None:
        m[:] = False
        m[torch.as_tensor(kept, dtype=torch.long)] = True
    return m


def _effective_keep(graph: DependencyGraph, keep: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """Unit keep-masks per group; a selection group also loses the channels its stream loses."""
    eff = {g.id: _unit_mask(g, keep.get(g.id)) for g in graph.groups}
    for gid, kept in keep.items():
        g = graph.groups[gid]
        if not g.prunable and not bool(_unit_mask(g, kept).all()):
            raise ValueError(f"group {gid} is not prunable ({g.reason}) but its keep-set removes units")
    for sel in graph.selections.values():
        sg = sel["group"]
        if sg is None:
            continue
        stream = _stream_mask(graph, sel["segs"], eff)
        g = graph.groups[sg]
        per = stream.numel() // g.size
        eff[sg] = eff[sg] & stream.reshape(g.size, per).all(1)
    return eff


def _stream_mask(graph: DependencyGraph, segs: list, eff: Mapping[int, Tensor]) -> Tensor:
    parts = []
    for gid, span in segs:
        if gid is None:
            parts.append(torch.ones(span, dtype=torch.bool))
        else:
            um = eff[gid]
            parts.append(um.repeat_interleave(span // um.numel()))
    return torch.cat(parts)


def module_keeps(graph: DependencyGraph, keep: Mapping[int, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {"out"|"in": kept indices}}`` for every module a keep-set shrinks."""
    eff = _effective_keep(graph, keep)
    removed: dict[tuple[str, str], set[int]] = {}
    for g in graph.groups:
        gone = torch.nonzero(~eff[g.id]).reshape(-1)
        if gone.numel() == 0:
            continue
        for m in g.members:
            removed.setdefault((m.module, m.axis), set()).update(g.member_indices(m, gone).tolist())
    out: dict[str, dict[str, Tensor]] = {}
    for (name, axis), gone_idx in removed.items():
        mod = graph.modules[name]
        n = _axis_size(mod, axis)
        km = torch.ones(n, dtype=torch.bool)
        km[torch.tensor(sorted(gone_idx), dtype=torch.long)] = False
        out.setdefault(name, {})[axis] = torch.nonzero(km).reshape(-1)
    return out


def _axis_size(mod: nn.Module, axis: str) -> int:
    if attention_kind(mod) == "mha" and axis == "out":
        return 3 * mod.num_heads * mod.head_dim
    if isinstance(mod, RECURRENT):
        return mod.hidden_size if axis == "out" else mod.input_size
    if isinstance(mod, nn.Embedding):
        return mod.embedding_dim
    if isinstance(mod, CHANNEL_NORMS):   # affine=False:
        return mod.num_features                                                                  # no weight
    if isinstance(mod, nn.GroupNorm):
        return mod.num_channels
    return mod.weight.shape[weight_dim(mod, axis)]


def _check_keep(graph: DependencyGraph, keep: Mapping[int, Any], allow_empty: bool = False) -> dict[int, Tensor]:
    out = {}
    for gid, k in keep.items():
        if not isinstance(gid, int) or not 0 <= gid < len(graph.groups):
            raise ValueError(f"keep has group id {gid!r}; the graph has groups 0..{len(graph.groups) - 1}")
        t = torch.as_tensor(k)
        g = graph.groups[gid]
        if t.dtype == torch.bool:
            if t.numel() != g.size:
                raise ValueError(f"keep[{gid}] is a mask of {t.numel()} units; group {gid} has {g.size}")
            t = torch.nonzero(t).reshape(-1)
        t = t.to(torch.long).reshape(-1)
        if t.numel() == 0 and not allow_empty:
            raise ValueError(f"keep[{gid}] keeps no unit of group {gid}: a layer would lose all its channels")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= g.size):
            raise ValueError(f"keep[{gid}] has indices outside [0, {g.size})")
        out[gid] = torch.unique(t)
    if not allow_empty:     # a selection keeps only what its stream keeps: that too must not be empty
        eff = _effective_keep(graph, out)
        for bn, sel in graph.selections.items():
            if sel["group"] is not None and not bool(eff[sel["group"]].any()):
                raise ValueError(f"keep[{sel['group']}] keeps none of the channels its stream keeps: {bn!r} and the "
                                 "layer after it would read no channel; keep one of them (graph.select does; "
                                 "graph.keep_selections(keep) adds the best ones back)")
    return out


def member_tensor_masks(graph: DependencyGraph, keep: Mapping[int, Any],
                        allow_empty: bool = False) -> dict[str, dict[str, Tensor]]:
    """``{module: {tensor name: keep-mask}}`` zeroing every member of every removed unit (weights, biases,
    attention in-projections): applied with ``masks.apply_tensor_mask`` the masked model equals ``mask_groups``
    (and so ``compact``). ``allow_empty`` accepts groups that lose every unit (masks only; no compaction)."""
    keep = _check_keep(graph, keep, allow_empty)
    out: dict[str, dict[str, Tensor]] = {}
    for name, ax in module_keeps(graph, keep).items():
        mod = graph.modules[name]
        if attention_kind(mod) == "mha":
            out[name] = _mha_masks(mod, ax["out"])
            continue
        if isinstance(mod, RECURRENT):
            out[name] = index_masks(mod, ax.get("out"), ax.get("in"))
            continue
        if getattr(mod, "weight", None) is None:     # a norm without affine parameters: nothing to mask
            continue
        w = torch.zeros(mod.weight.shape, dtype=torch.bool)
        if isinstance(mod, nn.Embedding):
            w[:, ax.get("out", torch.arange(mod.embedding_dim))] = True
            out[name] = {"weight": w}
            continue
        rows = ax.get("out", torch.arange(mod.weight.shape[weight_dim(mod, "out")]))
        w.index_fill_(weight_dim(mod, "out"), rows, True)
        if "in" in ax and w.dim() > 1:
            d = weight_dim(mod, "in")
            cols = torch.zeros(mod.weight.shape[d], dtype=torch.bool)
            cols[ax["in"]] = True
            w &= cols.reshape((1,) * d + (-1,) + (1,) * (w.dim() - d - 1))
        out[name] = {"weight": w}
        if getattr(mod, "bias", None) is not None:
            b = torch.zeros(mod.bias.shape, dtype=torch.bool)
            b[rows] = True
            out[name]["bias"] = b
    return out


def _mha_masks(mod: nn.Module, rows: Tensor) -> dict[str, Tensor]:
    """Keep-masks of the in-projection tensors of an attention module keeping packed q|k|v ``rows``."""
    out = {}
    for name, first, dim in in_proj_parts(mod):
        t = getattr(mod, name)
        n = t.shape[dim]
        kept = torch.zeros(n, dtype=torch.bool)
        kept[rows[(rows >= first) & (rows < first + n)] - first] = True
        shape = [1] * t.dim()
        shape[dim] = n
        out[name] = kept.reshape(shape).expand(t.shape).clone()
    return out


def member_masks(graph: DependencyGraph, keep: Mapping[int, Any]) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{module: (weight keep-mask, bias keep-mask or None)}`` of ``member_tensor_masks`` for the modules with
    a ``weight`` (what ``masks.apply_mask`` takes); attention in-projections are in ``member_tensor_masks``."""
    return {name: (t["weight"], t.get("bias")) for name, t in member_tensor_masks(graph, keep).items()
            if "weight" in t}


def mask_groups(model: nn.Module, example_inputs: Any, keep: Mapping[int, Any],
                graph: DependencyGraph | None = None) -> nn.Module:
    """Reference for ``compact``: a deepcopy (same shapes) with every member of every removed unit zeroed."""
    graph = DependencyGraph.build(model, example_inputs) if graph is None else graph
    keep = _check_keep(graph, keep)
    ref = copy.deepcopy(model)
    from .masks import bake_masks
    bake_masks(ref)
    mods = dict(ref.named_modules())
    eff = _effective_keep(graph, keep)
    with torch.no_grad():
        for g in graph.groups:
            gone = torch.nonzero(~eff[g.id]).reshape(-1)
            if gone.numel() == 0:
                continue
            for m in g.members:
                mod = mods[m.module]
                idx = g.member_indices(m, gone)
                if attention_kind(mod) == "mha":
                    _zero_mha_rows(mod, idx)
                    continue
                if isinstance(mod, RECURRENT):
                    _zero_recurrent(mod, m.axis, idx)
                    continue
                if isinstance(mod, nn.Embedding):
                    mod.weight[:, idx] = 0
                    continue
                if getattr(mod, "weight", None) is None:     # a norm without affine parameters
                    continue
                mod.weight.index_fill_(weight_dim(mod, m.axis), idx, 0.0)
                if m.axis == "out" and getattr(mod, "bias", None) is not None:
                    mod.bias.index_fill_(0, idx, 0.0)
    return ref


def _zero_mha_rows(mod: nn.Module, rows: Tensor) -> None:
    for name, first, dim in in_proj_parts(mod):
        t = getattr(mod, name)
        local = rows[(rows >= first) & (rows < first + t.shape[dim])] - first
        t.index_fill_(dim % t.dim(), local.to(t.device), 0.0)


def _zero_recurrent(mod: nn.Module, axis: str, idx: Tensor) -> None:
    """Zero hidden units ``idx`` (``out``: every row and column of theirs) or input features ``idx`` (``in``)."""
    keep = torch.ones(_axis_size(mod, axis), dtype=torch.bool)
    keep[idx] = False
    kept = torch.nonzero(keep).reshape(-1)
    for name, mk in index_masks(mod, *((kept, None) if axis == "out" else (None, kept))).items():
        getattr(mod, name).masked_fill_(~mk.to(getattr(mod, name).device), 0.0)


def compact(model: nn.Module, example_inputs: Any, keep: Mapping[int, Any], round_to: int | None = None,
            graph: DependencyGraph | None = None, scores: Mapping[int, Tensor] | None = None) -> nn.Module:
    """A plain, physically smaller copy of ``model`` keeping ``keep[group id]`` units of each group.

    ``keep`` maps group ids (``graph.groups``) to kept unit indices (channels; heads for head groups) or
    a bool mask over the units; groups not in ``keep`` stay whole. ``round_to`` first rounds kept channel
    counts up to multiples (``graph.round_keep``; best ``scores`` added back). Masks (parametrizations)
    left on untouched modules are baked. The model is not modified.
    """
    graph = DependencyGraph.build(model, example_inputs) if graph is None else graph
    keep = _check_keep(graph, keep)
    if round_to is not None:   # round_keep rejects anything but a positive int
        keep = graph.round_keep(keep, round_to, scores)
    plan = module_keeps(graph, keep)
    small = copy.deepcopy(model)
    mods = dict(small.named_modules())
    aliases = module_aliases(small)
    ties = tied_layers(small)
    for name, ax in plan.items():
        new = resize_module(mods[name], ax.get("out"), ax.get("in"), within=small)
        for alias in aliases[id(mods[name])]:      # a module registered under several names is one module
            set_submodule(small, alias, new)
    # channel selection before BNs that read a shared stream
    eff = _effective_keep(graph, keep)
    for bn, sel in graph.selections.items():
        stream = _stream_mask(graph, sel["segs"], eff)
        own = plan.get(bn, {}).get("out")
        own = torch.arange(stream.numel()) if own is None else own
        if own.numel() == stream.numel() and bool(stream.all()):
            continue
        pos = torch.cumsum(stream.long(), 0) - 1          # position of each kept stream channel after compaction
        index = pos[own]
        if torch.equal(index, torch.arange(int(stream.sum()))):
            continue      # the BN reads the whole compacted stream in order: nothing to select
        select = ChannelSelect(index, small.get_submodule(bn))
        for alias in aliases.get(id(mods[bn]), [bn]):     # (the BN's names before it was resized)
            set_submodule(small, alias, select)
    q_rows = {m.module: g.id for g in graph.groups for m in g.members if m.axis == "out"}
    for mod in small.modules():
        if attention_kind(mod) in ("hf", "fused", "gqa", "mha_linear"):
            set_heads(mod)
    sync_kv_heads_config(small)
    for name, mod in small.named_modules():
        gid = q_rows.get(f"{name}.q_proj")
        if attention_kind(mod) == "mha_linear" and gid is not None:   # which original heads are left (3-D masks)
            mod.head_index = mod.head_index[eff[gid].to(mod.head_index.device)]
    disable_fused_transformer_paths(small)   # a PrunedMultiheadAttention has no packed weights to hand them
    from .masks import bake_masks
    bake_masks(small)
    for names in retie(small, ties):     # (the graph couples a tied weight's channels: only differing masks get here)
        warnings.warn(f"{names} held one weight, masked differently: the compacted model ties only those whose "
                      "weights are still equal", RuntimeWarning, stacklevel=2)
    small._sparsekit_keep = {k: v.clone() for k, v in keep.items()}  # type: ignore[attr-defined]
    return small


def _masked_rows(mod: nn.Module, masks: Mapping[str, Tensor]) -> Tensor | None:
    """Per output row (attention: per packed q|k|v row) whether any weight entry is kept; None if unmasked."""
    if attention_kind(mod) == "mha":
        parts = [(n, getattr(mod, n).shape[0]) for n, _, _ in in_proj_parts(mod) if n.endswith("weight")]
        if not any(n in masks for n, _ in parts):
            return None
        return torch.cat([masks[n].reshape(r, -1).any(1).cpu() if n in masks else torch.ones(r, dtype=torch.bool)
                          for n, r in parts])
    if isinstance(mod, RECURRENT):     # per hidden unit: any of its gate rows kept in any layer or direction
        if not any(n in masks for n in unit_index(mod)):
            return None
        def rows(name: str) -> Tensor:
            t = getattr(mod, name)
            return masks[name].cpu() if name in masks else torch.ones(t.shape, dtype=torch.bool)
        return hidden_unit_rows(mod, rows).any(1)
    mk = masks.get("weight")
    if mk is None:
        return None
    if isinstance(mod, nn.Embedding):   # weight [num_embeddings, dim]: its channels (features) are the columns
        return mk.any(0).cpu()
    d = weight_dim(mod, "out")                          # 1 for a transposed conv
    return mk.movedim(d, 0).reshape(mk.shape[d], -1).any(1).cpu()    # keep-sets are index math on the CPU


def keep_from_masks(model: nn.Module, graph: DependencyGraph, allow_empty: bool = False) -> dict[int, Tensor]:
    """Keep-sets from the Pruner's channel masks: a unit goes when every masked producer (conv / linear /
    embedding / norm ``out`` member with a ``WeightMask``; attention in-projection rows) in its group masks
    all of its rows. A group whose masked producers remove every unit raises ValueError (nothing to compact
    to) unless ``allow_empty``, which gives it an empty keep-set (for masks, not for ``compact``)."""
    from .masks import tensor_masks

    masks = tensor_masks(model)
    keep = {}
    for g in graph.prunable:
        gone = None
        for m in g.members:
            if m.axis != "out" or m.module not in masks:
                continue
            rows = _masked_rows(graph.modules[m.module], masks[m.module])
            if rows is None:
                continue
            unit_gone = ~rows[m.offset:m.offset + m.span].reshape(g.size, -1).any(1)
            gone = unit_gone if gone is None else gone & unit_gone
        if gone is not None and bool(gone.all()) and not allow_empty:
            raise ValueError(f"the masks remove every unit of group {g.id} ({g.members[0].module} ...): a compacted "
                             "layer would have no channels; keep at least one (e.g. Pruner(min_channels=1))")
        if gone is not None and bool(gone.any()):
            keep[g.id] = torch.nonzero(~gone).reshape(-1)
    return keep


def compact_from_masks(model: nn.Module, example_inputs: Any, round_to: int | None = None,
                       graph: DependencyGraph | None = None) -> tuple[nn.Module, dict[int, Tensor]]:
    """Compact a masked model: keep-sets from its channel masks (``keep_from_masks``). Returns
    ``(small, keep)``; ``small`` equals ``mask_groups(model, example_inputs, keep)``. With ``round_to``, the
    pruned channels added back to reach a multiple are the best-scoring (L1) by their weights from before
    pruning, and come back with those weights (not the masks' zeros; the masks themselves are left as they are)."""
    graph = DependencyGraph.build(model, example_inputs) if graph is None else graph
    keep = keep_from_masks(model, graph)
    if round_to is None:
        return compact(model, example_inputs, keep, graph=graph), keep
    with unmasked(model):
        keep = graph.round_keep(keep, round_to, graph.group_scores())
        small = compact(model, example_inputs, keep, graph=graph)
    return small, keep


# ------------------------------------------------------------------------------------------ save / load
def sync_kv_heads_config(model: nn.Module) -> None:
    """A Hugging Face model whose grouped-query attention layers all kept the same heads gets them in its config
    (``num_key_value_heads``, ``num_attention_heads`` and ``head_dim``, which no longer follows from
    ``hidden_size``): static caches (Gemma-2's HybridCache, ``cache_implementation="static"``) are allocated from
    it, and a model built from it has these attention widths. The config is copied first (a skeleton built from
    another model's config object shares it) and the copy given to every module that held the old one. Layers
    left with different numbers leave the config as it is (a dynamic cache follows the tensors)."""
    config = getattr(model, "config", None)
    if getattr(config, "num_key_value_heads", None) is None:
        return
    widths = {(m.num_key_value_heads, m.num_heads, m.head_dim) for m in model.modules() if attention_kind(m) == "gqa"}
    if len(widths) != 1:
        return
    kv, heads, head_dim = widths.pop()
    if (config.num_key_value_heads, config.num_attention_heads, getattr(config, "head_dim", head_dim)) == \
            (kv, heads, head_dim):
        return
    new = copy.deepcopy(config)
    new.num_key_value_heads, new.num_attention_heads, new.head_dim = kv, heads, head_dim
    for mod in model.modules():
        if getattr(mod, "config", None) is config:
            mod.config = new


def compacted_widths(model: nn.Module) -> dict[str, dict]:
    """JSON-able shapes of every resizable module and every ``ChannelSelect`` in ``model``."""
    spec: dict[str, dict] = {}
    # q / k / v projections of a LinearMultiheadAttention follow from its heads: the fresh model lacks them
    implied = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, LinearMultiheadAttention)
               for p in QKV_PROJ}
    # so do a LinearRecurrent's Linears from its stock module's widths
    implied |= {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LinearRecurrent) for c in m.layer_names()}
    for name, mod in model.named_modules():
        if name in implied:
            continue
        if isinstance(mod, ChannelSelect):
            spec[name] = {"select": int(mod.index.numel()), "dim": mod.dim}
        elif isinstance(mod, PrunedMultiheadAttention) or (
                isinstance(mod, LinearMultiheadAttention) and mod.num_heads != mod.orig_heads):
            spec[name] = {"heads": mod.num_heads}
        elif isinstance(mod, CONVS):
            spec[name] = {"in": mod.in_channels, "out": mod.out_channels, "groups": mod.groups}
        elif isinstance(mod, nn.Linear):
            spec[name] = {"in": mod.in_features, "out": mod.out_features}
        elif isinstance(mod, TRANSPOSED_CONVS):
            spec[name] = {"in": mod.in_channels, "out": mod.out_channels}
        elif isinstance(mod, (*RECURRENT, LinearRecurrent)):
            spec[name] = {"in": mod.input_size, "hidden": mod.hidden_size}
        elif isinstance(mod, CHANNEL_NORMS):
            spec[name] = {"out": mod.num_features}
        elif isinstance(mod, nn.GroupNorm):
            spec[name] = {"out": mod.num_channels, "groups": mod.num_groups}
        elif isinstance(mod, nn.Embedding):
            spec[name] = {"out": mod.embedding_dim}
        elif isinstance(mod, nn.PReLU):       # also 1: a per-channel PReLU may keep a single channel
            spec[name] = {"out": mod.num_parameters}
    return spec


def _blank(mod: nn.Module, w: dict, within: nn.Module | None = None) -> nn.Module:
    """Resize ``mod`` to the widths ``w`` (values are placeholders until load_state_dict)."""
    out = torch.arange(w["out"]) if "out" in w else None
    if "heads" in w:
        if attention_kind(mod) == "mha_linear":     # q / k / v rows and out_proj columns of the first heads
            rows = torch.arange(w["heads"] * mod.head_dim)
            for p in QKV_PROJ:
                setattr(mod, p, resize_module(getattr(mod, p), rows, None, within))
            mod.out_proj = resize_module(mod.out_proj, None, rows, within)
            mod.num_heads = w["heads"]
            mod.head_index = mod.head_index[:w["heads"]].clone()    # (loaded with the state dict)
            return mod
        if attention_kind(mod) != "mha":
            raise ValueError(f"widths give {w['heads']} attention heads to a {type(mod).__name__}")
        return PrunedMultiheadAttention.from_module(mod, torch.arange(w["heads"]))
    if isinstance(mod, CONVS):
        if "groups" in w:       # the saved groups: a conv compacted twice need not follow the original class's
            return _blank_conv(mod, w["in"], w["out"], w["groups"], within)
        if mod.groups > 1:
            return resize_module(mod, torch.arange(w["out"]) % mod.out_channels, within=within)
        return resize_module(mod, out % mod.out_channels, torch.arange(w["in"]) % mod.in_channels, within=within)
    if isinstance(mod, nn.Linear):
        return resize_module(mod, out % mod.out_features, torch.arange(w["in"]) % mod.in_features, within=within)
    if isinstance(mod, TRANSPOSED_CONVS):
        return resize_module(mod, out % mod.out_channels, torch.arange(w["in"]) % mod.in_channels, within=within)
    if isinstance(mod, nn.Embedding):
        return resize_module(mod, out % mod.embedding_dim, within=within)
    if isinstance(mod, RECURRENT):
        return resize_recurrent(mod, torch.arange(w["hidden"]) % mod.hidden_size,
                                torch.arange(w["in"]) % mod.input_size, within)
    if isinstance(mod, LinearRecurrent):     # a skeleton converted by rnn_to_linear: resized as its stock module
        return LinearRecurrent.from_module(_blank(mod.to_stock(), w, within))
    if isinstance(mod, nn.PReLU):
        return resize_module(mod, out % mod.num_parameters, within=within)
    n = mod.num_channels if isinstance(mod, nn.GroupNorm) else mod.num_features
    return resize_module(mod, out % n, within=within)


def _blank_conv(mod: nn.Conv1d | nn.Conv2d | nn.Conv3d, in_c: Any, out_c: Any, groups: Any,
                within: nn.Module | None = None) -> nn.Module:
    """A conv like ``mod`` with ``in_c`` / ``out_c`` channels in ``groups`` groups (placeholder values)."""
    for what, v in (("in", in_c), ("out", out_c), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"widths of a {type(mod).__name__}: {what!r} must be a positive int, got {v!r}")
    if in_c % groups or out_c % groups:
        raise ValueError(f"widths of a {type(mod).__name__}: groups={groups} must divide in={in_c} and out={out_c}")
    w, b = mod.weight, mod.bias
    tensors = {"weight": w.new_zeros(out_c, in_c // groups, *w.shape[2:]),
               "bias": None if b is None else b.new_zeros(out_c)}
    sizes = {"in_channels": in_c, "out_channels": out_c, "groups": groups}
    return resized_copy(mod, tensors, sizes, within=within)


def apply_widths(model: nn.Module, widths: Mapping[str, dict]) -> nn.Module:
    """Rebuild the compacted shapes ``widths`` (from ``compacted_widths``) in ``model``, a fresh instance of
    the original class; then ``model.load_state_dict(compacted.state_dict())`` works. Returns ``model``."""
    selects = {n: w for n, w in widths.items() if "select" in w}
    ties = tied_layers(model)
    for name, w in widths.items():
        if name in selects:
            continue
        inner = name
        parent = name.rpartition(".")[0]
        if parent in selects and name.endswith(".module"):
            inner = parent
        try:
            mod = model.get_submodule(inner)
        except AttributeError:
            raise ValueError(f"widths name module {name!r}, which the given {type(model).__name__} lacks") from None
        same = compacted_widths(nn.ModuleDict({"m": mod})).get("m") == w
        if not same:
            blank = _blank(mod, w, model)
            for alias in module_aliases(model).get(id(mod), [inner]):
                set_submodule(model, alias, blank)
    for name, w in selects.items():
        inner = model.get_submodule(name)
        select = ChannelSelect(torch.zeros(w["select"], dtype=torch.long), inner, w["dim"])
        for alias in module_aliases(model).get(id(inner), [name]):
            set_submodule(model, alias, select)
    retie(model, ties, same_values=False)     # (a tie whose layers got different widths stays broken, as saved)
    for _, mod in model.named_modules():
        if attention_kind(mod) in ("hf", "fused", "gqa"):
            set_heads(mod)
    sync_kv_heads_config(model)
    disable_fused_transformer_paths(model)
    return model
