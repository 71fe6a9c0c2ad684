"""``LinearMultiheadAttention``: ``nn.MultiheadAttention`` with its four projections as ``nn.Linear`` children.

``nn.MultiheadAttention`` keeps its q / k / v projections in one raw parameter (``in_proj_weight``) and hands
``out_proj.weight`` straight to ``F.multi_head_attention_forward``, so nothing that works on ``nn.Linear``
modules reaches them: element / block / N:M pruning, ``sk.sparsify``'s per-layer formats, ``SparseLinear``.
This module computes the same thing (``pruned_mha.mha_forward``, which calls ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` as modules) with the projections as children that any of those can replace.

``sk.nn.mha_to_linear(model)`` converts every attention of a model (before pruning, to prune the projections
like any Linear); ``sk.sparsify`` converts the ones whose projections hold zeros by itself.

``disable_fused_transformer_paths`` keeps ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` off
their fused eval-mode kernels once a layer inside them is no longer a plain ``nn.Linear`` or
``nn.MultiheadAttention``: those kernels read ``linear1.weight`` and ``self_attn.in_proj_weight`` directly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._aliases import module_aliases, replace_modules
from .._compat import set_submodule
from .graph import QKV_PROJ, attention_kind
from .masks import _mask_param, _masked_original, apply_tensor_mask
from .module_copy import share_call_hooks
from .pruned_mha import MhaForward, PrunedMultiheadAttention

__all__ = ["LinearMultiheadAttention", "mha_to_linear", "disable_fused_transformer_paths", "is_stock_mha",
           "expose_sparse_attention", "restore_dense_attention", "no_nested_tensors", "restore_nested_tensors",
           "attention_children"]


class LinearMultiheadAttention(MhaForward):
    """``nn.MultiheadAttention`` (or ``PrunedMultiheadAttention``) with ``q_proj``, ``k_proj``, ``v_proj`` and
    ``out_proj`` as ``nn.Linear`` children (or any module computing ``x @ W.T + b``, e.g. ``SparseLinear``).

    Same forward signature and results as the module it was built from (``from_module``): ``forward(query,
    key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
    is_causal=False)`` returns ``(output, weights or None)``; ``batch_first``, unbatched inputs, ``bias_k`` /
    ``bias_v``, ``add_zero_attn`` and heads removed by compaction (``head_index``, ``orig_heads``) carry over.
    Self-attention runs three projections of the same input instead of one packed GEMM.
    """

    # nn.TransformerEncoderLayer / nn.TransformerEncoder read these before taking their fused native path,
    # which would use the packed in_proj_weight: with them, they call forward() instead
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None
    # set by sparsify on the attentions it converted itself (sk.save records it): sparsifying the model again (on
    # another machine) packs them back first (to_stock), so stock vs converted is measured again
    sparsify_converted = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, *, head_dim: int | None = None,
                 orig_heads: int | None = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim),
                        ("kdim", kdim), ("vdim", vdim), ("orig_heads", orig_heads)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"num_heads must divide embed_dim={embed_dim} (or pass head_dim=), got {num_heads}")
            head_dim = embed_dim // num_heads
        dd = {"device": device, "dtype": dtype}
        inner = self._set_geometry(embed_dim, num_heads, head_dim, dropout, kdim, vdim, batch_first, add_zero_attn,
                                   orig_heads)
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **dd)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias, **dd)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias, **dd)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **dd)
        for n in ("bias_k", "bias_v"):
            self.register_parameter(n, nn.Parameter(torch.zeros(1, 1, inner, **dd)) if add_bias_kv else None)
        self.register_buffer("head_index", torch.arange(num_heads, device=device))
        with torch.no_grad():   # as nn.MultiheadAttention initialises its projections
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                nn.init.xavier_uniform_(proj.weight)
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
            for t in (self.bias_k, self.bias_v):
                if t is not None:
                    nn.init.xavier_normal_(t)

    @classmethod
    def from_module(cls, mod: nn.Module) -> LinearMultiheadAttention:
        """The same attention as ``mod`` (an ``nn.MultiheadAttention`` or ``PrunedMultiheadAttention``): its
        q / k / v rows become ``q_proj`` / ``k_proj`` / ``v_proj`` (copies), its ``out_proj`` module is taken
        over as it is. Masks (``sparsekit.prune`` parametrizations) on the in-projection follow their rows."""
        if not is_stock_mha(mod):
            raise TypeError(f"mod must be an nn.MultiheadAttention or PrunedMultiheadAttention (with their own "
                            f"forward), got {type(mod).__name__}")
        packed = mod.in_proj_weight is not None
        ref = mod.in_proj_weight if packed else mod.q_proj_weight    # (device and dtype)
        new = cls(mod.embed_dim, mod.num_heads, mod.dropout, mod.in_proj_bias is not None, mod.bias_k is not None,
                  mod.add_zero_attn, mod.kdim, mod.vdim, mod.batch_first, head_dim=mod.head_dim,
                  orig_heads=getattr(mod, "orig_heads", mod.num_heads), device=ref.device, dtype=ref.dtype)
        inner = mod.num_heads * mod.head_dim
        for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
            rows = slice(i * inner, (i + 1) * inner)
            wname = "in_proj_weight" if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")[i]
            parts = [("weight", wname, rows if packed else slice(None))]
            if mod.in_proj_bias is not None:
                parts.append(("bias", "in_proj_bias", rows))
            for mine, theirs, sel in parts:
                mask = _mask_param(mod, theirs)
                original = _masked_original(mod, theirs) if mask is not None else None
                with torch.no_grad():   # the unmasked values, so that un-pruning the copy gives them back
                    getattr(proj, mine).copy_((getattr(mod, theirs) if original is None else original)[sel])
                getattr(proj, mine).requires_grad_(getattr(mod, theirs).requires_grad)
                if mask is not None:
                    apply_tensor_mask(proj, mine, mask.mask[sel])
        with torch.no_grad():
            if mod.bias_k is not None:
                new.bias_k.copy_(mod.bias_k)
                new.bias_v.copy_(mod.bias_v)
            new.head_index.copy_(getattr(mod, "head_index", torch.arange(mod.num_heads)))
        if mod.bias_k is not None:
            new.bias_k.requires_grad_(mod.bias_k.requires_grad)
            new.bias_v.requires_grad_(mod.bias_v.requires_grad)
        new.out_proj = mod.out_proj      # (shared as it is: its flags and masks stay the user's)
        new.train(mod.training)
        share_call_hooks(new, mod)       # (a hook on the stock module keeps running where it is replaced)
        return new

    def layer_names(self) -> list[str]:
        """The names of the projection children (the Linear layers sparsify measures)."""
        return [*QKV_PROJ, "out_proj"]

    def to_stock(self) -> nn.Module:
        """The inverse of ``from_module``: the ``nn.MultiheadAttention`` (a ``PrunedMultiheadAttention`` when heads
        were removed) computing the same outputs, q / k / v packed back (copies; ``out_proj`` taken over as it
        is). The projections must be plain, unmasked ``nn.Linear`` layers."""
        projections = [getattr(self, p) for p in self.layer_names()]
        if not all(isinstance(p, nn.Linear) and not parametrize.is_parametrized(p) for p in projections):
            raise TypeError(f"to_stock needs plain nn.Linear projections (unmasked), got "
                            f"{[type(p).__name__ for p in projections]}")
        q = self.q_proj.weight
        bias = self.q_proj.bias is not None
        inner = self.num_heads * self.head_dim
        packed = self.kdim == self.vdim == self.embed_dim
        dd = {"device": q.device, "dtype": q.dtype}
        if inner == self.embed_dim and self.orig_heads == self.num_heads:
            new = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias, self.bias_k is not None,
                                        self.add_zero_attn, self.kdim, self.vdim, self.batch_first, **dd)
        else:
            new = PrunedMultiheadAttention(self.embed_dim, self.num_heads, self.head_dim, self.dropout, bias,
                                           self.bias_k is not None, self.add_zero_attn, self.kdim, self.vdim,
                                           self.batch_first, packed=packed, orig_heads=self.orig_heads, **dd)
        weights = [p.weight for p in (self.q_proj, self.k_proj, self.v_proj)]
        with torch.no_grad():
            if new.in_proj_weight is not None:
                new.in_proj_weight.copy_(torch.cat(weights))
            else:
                for name, w in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), weights):
                    getattr(new, name).copy_(w)
            if bias:
                new.in_proj_bias.copy_(torch.cat([p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]))
            if self.bias_k is not None:
                new.bias_k.copy_(self.bias_k)
                new.bias_v.copy_(self.bias_v)
            if isinstance(new, PrunedMultiheadAttention):
                new.head_index.copy_(self.head_index)
        new.out_proj = self.out_proj
        new.train(self.training)
        share_call_hooks(new, self)
        return new


def is_stock_mha(mod: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` / ``PrunedMultiheadAttention`` running its own class's forward (a subclass
    with another forward may use its weights differently)."""
    return (attention_kind(mod) == "mha"
            and type(mod).forward in (nn.MultiheadAttention.forward, PrunedMultiheadAttention.forward))


def mha_to_linear(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` (and ``PrunedMultiheadAttention``) in ``model`` by the equivalent
    ``LinearMultiheadAttention`` (same outputs), so that element / block / N:M pruning and ``sparsify`` reach
    the attention projections as ``nn.Linear`` layers. Returns the converted model (a copy unless ``inplace``).
    Parameter names change (``self_attn.in_proj_weight`` -> ``self_attn.q_proj.weight`` ...): a model saved with
    ``sk.save`` loads back into the original class (``sk.load`` converts again). Channel pruning removes whole
    heads before or after the conversion (the dependency graph knows both modules)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_stock_mha(model):
        raise ValueError("model is itself an attention module: convert the model that contains it, or use "
                         "LinearMultiheadAttention.from_module(attention)")
    target = model if inplace else copy.deepcopy(model)
    _convert_attention(target, lambda mod: True)
    disable_fused_transformer_paths(target)
    return target


def _convert_attention(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """Replace (in place) every stock attention of ``model`` that ``wanted`` picks by a
    ``LinearMultiheadAttention``; returns name -> the module it replaced."""
    return replace_modules(model, lambda m: is_stock_mha(m) and wanted(m), LinearMultiheadAttention.from_module)


def attention_children(model: nn.Module) -> set[str]:
    """Names of the children of every ``nn.MultiheadAttention`` / ``PrunedMultiheadAttention`` left in ``model``
    (a subclass included): such a module may read them directly (``out_proj.weight``), so they are not swapped."""
    return {f"{n}.{c}" if n else c for n, m in model.named_modules()
            if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)) for c, _ in m.named_children()}


def _plain_linear(mod: nn.Module) -> bool:
    """An nn.Linear the fused kernels can read (a masked one too: its weight is computed on access)."""
    return type(mod) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear) or (
        parametrize.is_parametrized(mod) and isinstance(mod, nn.Linear))


def disable_fused_transformer_paths(model: nn.Module) -> int:
    """Route every ``nn.TransformerEncoderLayer`` whose ``linear1`` / ``linear2`` / ``self_attn`` was replaced
    (by a ``SparseLinear``, a ``LinearMultiheadAttention`` ...) through its Python forward: its fused eval-mode
    kernel (and ``nn.TransformerEncoder``'s nested-tensor path) reads those weights directly. Returns how many
    layers were switched. The switch is the layer's ``activation_relu_or_gelu`` flag, which torch reads only
    to pick the fused path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    switched = 0
    for mod in model.modules():
        if not isinstance(mod, nn.TransformerEncoderLayer):
            continue
        attention = mod.self_attn      # a masked (parametrized) stock one still hands the kernel its weights
        replaced = (not _plain_linear(mod.linear1) or not _plain_linear(mod.linear2)
                    or not (isinstance(attention, nn.MultiheadAttention) and is_stock_mha(attention)))
        if replaced and mod.activation_relu_or_gelu:
            mod.activation_relu_or_gelu = 0
            switched += 1
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
                isinstance(layer, nn.TransformerEncoderLayer) and not layer.activation_relu_or_gelu
                for layer in mod.layers):
            mod.use_nested_tensor = False
    return switched


def no_nested_tensors(model: nn.Module) -> dict[nn.Module, bool]:
    """Turn off (in place) every ``nn.TransformerEncoder``'s nested-tensor path and return the previous flags
    (``restore_nested_tensors`` puts them back): with hooks on its layers (``sparsify`` capturing inputs) or a
    converted attention, nested tensors would reach modules that cannot take them."""
    flags = {m: m.use_nested_tensor for m in model.modules()
             if isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor")}
    for m in flags:
        m.use_nested_tensor = False
    return flags


def restore_nested_tensors(flags: dict[nn.Module, bool]) -> None:
    for m, flag in flags.items():
        m.use_nested_tensor = flag


def _projection_weights(mod: nn.Module) -> list[Tensor]:
    names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    ws = [getattr(mod, n) for n in names if getattr(mod, n, None) is not None]
    out = getattr(mod.out_proj, "weight", None)
    return ws + ([out] if isinstance(out, Tensor) else [])


def expose_sparse_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Replace (in place) every stock attention of ``model`` whose projection weights hold zeros by a
    ``LinearMultiheadAttention``; returns name -> the module it replaced (for ``restore_dense_attention``)."""
    return _convert_attention(model, lambda mod: any(bool(w.eq(0).any()) for w in _projection_weights(mod)))


def restore_dense_attention(model: nn.Module, exposed: dict[str, nn.Module]) -> list[str]:
    """Put back (in place) the stock attention of every ``exposed`` entry whose four projections all stayed
    ``nn.Linear`` (nothing was made sparse: the stock module runs its fused kernels); returns those names.
    Its ``out_proj``, shared with the converted module, is the one the model holds now."""
    restored = []
    aliases = module_aliases(model)
    for name, original in exposed.items():
        mod = model.get_submodule(name)
        if all(isinstance(getattr(mod, p), nn.Linear) for p in mod.layer_names()):
            original.out_proj = mod.out_proj
            for alias in aliases[id(mod)]:
                set_submodule(model, alias, original)
            restored.append(name)
    return restored
