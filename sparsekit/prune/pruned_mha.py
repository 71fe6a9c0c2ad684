"""``PrunedMultiheadAttention``: ``nn.MultiheadAttention`` with fewer heads than ``embed_dim`` implies.

``nn.MultiheadAttention`` ties its inner width (``num_heads * head_dim``) to ``embed_dim``, so compaction
(``sparsekit.prune.compact``) turns an instance that loses heads into this module: the same forward signature
and results for the kept heads, the same parameter names, the same ``embed_dim`` in and out. It is the one
exception to "compaction keeps the module classes".

Its forward is ``mha_forward(module, ...)``, which also runs a stock ``nn.MultiheadAttention`` (same results)
with ``out_proj`` called as a module on the heads' outputs: ``head_taps`` uses that to read and gate them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import attention_kind, in_proj_parts

__all__ = ["PrunedMultiheadAttention", "mha_forward", "MhaForward"]


class MhaForward(nn.Module):
    """``nn.MultiheadAttention``'s call signature over ``mha_forward`` (shared by its stand-ins)."""

    num_heads: int
    orig_heads: int

    def _set_geometry(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float, kdim: int | None,
                      vdim: int | None, batch_first: bool, add_zero_attn: bool, orig_heads: int | None) -> int:
        """The attributes ``mha_forward`` reads; returns the inner width ``num_heads * head_dim``."""
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.orig_heads = orig_heads or num_heads
        return num_heads * head_dim

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        return mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                           is_causal)

    def extra_repr(self) -> str:
        heads = f"{self.num_heads}" + (f" (of {self.orig_heads})" if self.orig_heads != self.num_heads else "")
        return (f"embed_dim={self.embed_dim}, num_heads={heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")


class PrunedMultiheadAttention(MhaForward):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim`` inner channels, not ``embed_dim``.

    Built by ``compact`` (``from_module(mha, heads)``) when heads are removed. ``forward(query, key, value,
    key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False)``
    returns ``(output, weights or None)`` as ``nn.MultiheadAttention`` does (``batch_first`` honoured,
    unbatched inputs accepted); returned weights cover the kept heads. A 3-D ``attn_mask`` may be given per
    original head (``batch * orig_heads`` rows; the kept heads' rows are used, ``head_index`` holds them) or
    per kept head. Parameter names are those of ``nn.MultiheadAttention`` plus the ``head_index`` buffer.
    """

    # nn.TransformerEncoderLayer / nn.TransformerEncoder take their fused native path (which assumes
    # head_dim = embed_dim / num_heads) only when this flag is True; False routes them through forward()
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, packed: bool = True,
                 orig_heads: int | None = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        inner = self._set_geometry(embed_dim, num_heads, head_dim, dropout, kdim, vdim, batch_first, add_zero_attn,
                                   orig_heads)
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **dd))
            for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(n, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **dd))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **dd))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **dd))
        self.register_parameter("in_proj_bias", nn.Parameter(torch.zeros(3 * inner, **dd)) if bias else None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias, **dd)
        for n in ("bias_k", "bias_v"):
            self.register_parameter(n, nn.Parameter(torch.zeros(1, 1, inner, **dd)) if add_bias_kv else None)
        self.register_buffer("head_index", torch.arange(num_heads, device=device))
        for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if getattr(self, n) is not None:
                nn.init.xavier_uniform_(getattr(self, n))

    @classmethod
    def from_module(cls, mod: nn.Module, heads: Tensor) -> PrunedMultiheadAttention:
        """Keep ``heads`` (indices into ``mod``'s heads) of an ``nn.MultiheadAttention`` or a
        ``PrunedMultiheadAttention``: their q, k, v rows and ``out_proj`` columns (an ``out_proj`` that already
        has the kept heads' width, as ``compact`` may resize it first, is copied as it is)."""
        heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
        if attention_kind(mod) != "mha":
            raise TypeError(f"mod must be an nn.MultiheadAttention or PrunedMultiheadAttention, got "
                            f"{type(mod).__name__}")
        if heads.numel() == 0 or int(heads.min()) < 0 or int(heads.max()) >= mod.num_heads:
            raise ValueError(f"heads must be indices in [0, {mod.num_heads}), got {heads.tolist()}")
        ref = next(t for t in (mod.in_proj_weight, mod.q_proj_weight) if t is not None)
        new = cls(mod.embed_dim, heads.numel(), mod.head_dim, mod.dropout, mod.in_proj_bias is not None,
                  mod.bias_k is not None, mod.add_zero_attn, mod.kdim, mod.vdim, mod.batch_first,
                  packed=mod.in_proj_weight is not None, orig_heads=getattr(mod, "orig_heads", mod.num_heads),
                  device=ref.device, dtype=ref.dtype)
        d, inner = mod.head_dim, mod.num_heads * mod.head_dim
        idx = (heads.reshape(-1, 1) * d + torch.arange(d)).reshape(-1)
        rows = torch.cat([idx, idx + inner, idx + 2 * inner])
        with torch.no_grad():
            for name, first, dim in in_proj_parts(mod):
                t = getattr(mod, name).detach()
                local = rows[(rows >= first) & (rows < first + t.shape[dim])] - first
                getattr(new, name).copy_(t.index_select(dim % t.dim(), local.to(t.device)))
            old_index = getattr(mod, "head_index", torch.arange(mod.num_heads))
            new.head_index.copy_(old_index[heads.to(old_index.device)])
        if mod.out_proj.in_features == inner:
            from .compact import resize_module  # compact imports this module

            new.out_proj = resize_module(mod.out_proj, None, idx)
        elif mod.out_proj.in_features == idx.numel():
            new.out_proj = copy.deepcopy(mod.out_proj)
        else:
            raise ValueError(f"out_proj has {mod.out_proj.in_features} input columns; expected {inner} (all heads) "
                             f"or {idx.numel()} (the kept heads)")
        new.train(mod.training)
        new.requires_grad_(ref.requires_grad)
        return new


def mha_forward(mod: nn.Module, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``PrunedMultiheadAttention.forward`` for any ``"mha"`` module (a stock ``nn.MultiheadAttention`` gives its
    own results). ``mod.out_proj`` is called as a module on the heads' outputs ``[tgt * batch, heads *
    head_dim]`` (rows: target position major, then batch; columns: head major), which is where
    ``head_taps`` reads and gates them."""
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be [L, E] or batched (3-D), got shape {tuple(query.shape)}")
    batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None        # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        is_causal = is_causal and key_padding_mask is None
    query, key, value = _seq_first(mod, query, key, value, batched)
    if not batched and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt, bsz = query.shape[:2]
    q, k, v = _project(mod, query, key, value)
    attn_mask = _head_mask(mod, attn_mask, bsz, tgt, key.shape[0])
    if mod.bias_k is not None:
        k = torch.cat([k, mod.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, mod.bias_v.repeat(1, bsz, 1)])
        attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
    h, d = mod.num_heads, mod.head_dim
    q, k, v = (t.reshape(t.shape[0], bsz * h, d).transpose(0, 1) for t in (q, k, v))
    if mod.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(bsz * h, 1, d)], dim=1) for t in (k, v))
        attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
    src = k.shape[1]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src).expand(-1, h, -1, -1).reshape(bsz * h, 1, src)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    p = mod.dropout if mod.training else 0.0
    if need_weights:
        out, weights = _attend_with_weights(mod, q, k, v, attn_mask, p)
        weights = weights.view(bsz, h, tgt, src)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        weights = weights if batched else weights.squeeze(0)
    else:
        out, weights = _attend(mod, q, k, v, attn_mask, p, is_causal, bsz), None
    out = mod.out_proj(out).view(tgt, bsz, -1)
    if not batched:
        return out.squeeze(1), weights
    return (out.transpose(0, 1) if mod.batch_first else out), weights


def _seq_first(mod: nn.Module, query: Tensor, key: Tensor, value: Tensor, batched: bool) -> tuple[Tensor, ...]:
    """Inputs as ``[L, N, E]``, keeping ``query is key is value`` so self-attention projects once."""
    same_kv, same_qk = key is value, query is key
    if batched and mod.batch_first:
        query = query.transpose(0, 1)
        key = query if same_qk else key.transpose(0, 1)
        value = key if same_kv else value.transpose(0, 1)
    elif not batched:
        query = query.unsqueeze(1)
        key = query if same_qk else key.unsqueeze(1)
        value = key if same_kv else value.unsqueeze(1)
    return query, key, value


def _project(mod: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(getattr(mod, "q_proj", None), nn.Module):      # a LinearMultiheadAttention
        return mod.q_proj(query), mod.k_proj(key), mod.v_proj(value)
    inner = mod.num_heads * mod.head_dim
    b = (None, None, None) if mod.in_proj_bias is None else mod.in_proj_bias.split(inner)
    if mod.in_proj_weight is None:
        ws = (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight)
    else:
        if query is key and key is value:
            return F.linear(query, mod.in_proj_weight, mod.in_proj_bias).split(inner, dim=-1)
        ws = mod.in_proj_weight.split(inner)
    return F.linear(query, ws[0], b[0]), F.linear(key, ws[1], b[1]), F.linear(value, ws[2], b[2])


def _head_mask(mod: nn.Module, attn_mask: Tensor | None, bsz: int, tgt: int, src: int) -> Tensor | None:
    """``attn_mask`` as ``[1 or bsz*heads, tgt, src]``; a 3-D mask per original head keeps the kept heads."""
    orig = getattr(mod, "orig_heads", mod.num_heads)
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (tgt, src):
            raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be "
                               f"{(tgt, src)}.")
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() != 3:
        raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if tuple(attn_mask.shape) == (bsz * orig, tgt, src) and orig != mod.num_heads:
        per_head = attn_mask.view(bsz, orig, tgt, src)
        return per_head.index_select(1, mod.head_index).reshape(bsz * mod.num_heads, tgt, src)
    if tuple(attn_mask.shape) != (bsz * mod.num_heads, tgt, src):
        raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                           f"{(bsz * orig, tgt, src)} (per original head) or "
                           f"{(bsz * mod.num_heads, tgt, src)} (per kept head).")
    return attn_mask


def _attend_with_weights(mod: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                        p: float) -> tuple[Tensor, Tensor]:
    q = q * math.sqrt(1.0 / float(mod.head_dim))
    logits = torch.bmm(q, k.transpose(-2, -1)) if mask is None else torch.baddbmm(mask, q, k.transpose(-2, -1))
    weights = logits.softmax(dim=-1)
    if p > 0.0:
        weights = F.dropout(weights, p=p)
    out = torch.bmm(weights, v).transpose(0, 1)                  # [tgt, bsz*heads, d]
    return out.reshape(-1, mod.num_heads * mod.head_dim), weights


def _attend(mod: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, is_causal: bool,
            bsz: int) -> Tensor:
    h, d = mod.num_heads, mod.head_dim
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.view(bsz, h, -1, k.shape[1])
    q, k, v = (t.view(bsz, h, -1, d) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal)    # [bsz, heads, tgt, d]
    return out.permute(2, 0, 1, 3).reshape(-1, h * d)


def _pad_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """One more key position (bias_k / zero attention), not masked."""
    return (None if attn_mask is None else F.pad(attn_mask, (0, 1)),
            None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1)))
