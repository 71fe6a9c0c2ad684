"""``LinearRecurrent``: ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` with each weight matrix as an ``nn.Linear`` child.

A stock recurrent module hands its flat weights to one fused kernel (oneDNN on CPU, cuDNN on GPU), so nothing
that works on ``nn.Linear`` layers reaches them: element / block / N:M pruning, ``sk.sparsify``'s per-layer
formats, ``SparseLinear``. This module computes the same thing with, per layer ``k`` and direction, an input
projection ``ih_l{k}`` (run once over the whole sequence: one GEMM with M = tokens), a recurrent projection
``hh_l{k}`` (run every time step: M = batch, the GEMV-like case where a sparse weight that fits in cache pays
most) and, for an LSTM with ``proj_size``, ``hr_l{k}``; the reverse direction's are ``ih_l{k}_reverse`` and so
on, as torch names the parameters. Any of them can be a ``SparseLinear``.

``sk.nn.rnn_to_linear(model)`` converts every stock recurrent module of a model (before element / block / N:M
pruning, which then prunes the weight matrices like any Linear); ``sk.sparsify`` converts the ones whose
weights hold zeros by itself, and keeps the stock module wherever the converted one is not faster on its real
call. Channel pruning (hidden units) works on the stock modules: prune and compact first, then convert.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from .._aliases import module_aliases, replace_modules
from .._compat import set_submodule
from ..ops.rnn_cell import below_autograd, fused_cell, rnn_cell
from .masks import _mask_param, _masked_original, apply_tensor_mask
from .module_copy import share_call_hooks
from .recurrent import RECURRENT, stock_forward

__all__ = ["LinearRecurrent", "rnn_to_linear", "is_stock_recurrent", "expose_sparse_recurrent",
           "restore_dense_recurrent"]

_STOCK = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def is_stock_recurrent(mod: nn.Module) -> bool:
    """An ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` running torch's own forward (a subclass with its own forward may
    use its weights differently)."""
    return isinstance(mod, RECURRENT) and stock_forward(mod)


def _stock_kwargs(mod: nn.Module) -> dict[str, Any]:
    """The stock constructor's arguments of ``mod`` (a stock recurrent module or a LinearRecurrent)."""
    kw = {k: getattr(mod, k) for k in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                                       "bidirectional")}
    if mod.mode == "LSTM":
        kw["proj_size"] = mod.proj_size
    if mod.mode.startswith("RNN_"):
        kw["nonlinearity"] = mod.mode[4:].lower()
    return kw


class LinearRecurrent(nn.Module):
    """An ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (``mode`` "RNN_TANH", "RNN_RELU", "LSTM" or "GRU", as torch
    names them) whose weight matrices are ``nn.Linear`` children (or any module computing ``x @ W.T + b``, e.g.
    ``SparseLinear``): ``ih_l{k}`` (``weight_ih_l{k}`` and ``bias_ih_l{k}``), ``hh_l{k}`` (``weight_hh_l{k}``,
    ``bias_hh_l{k}``), ``hr_l{k}`` (an LSTM's ``weight_hr_l{k}``, no bias) and their ``_reverse`` twins.

    Same constructor arguments, forward signature and results as the stock module: ``forward(input, hx=None)``
    with ``input`` ``[T, B, input_size]`` (``[B, T, ...]`` with ``batch_first``), unbatched ``[T, input_size]`` or
    a ``PackedSequence``; returns ``(output, h_n)``, an LSTM ``(output, (h_n, c_n))``. Inter-layer dropout in
    training mode as torch applies it (its own random draws). Each layer's input projection runs once over all
    time steps; the recurrent projection and the gates run once per step in Python, so the per-step cost is a
    few small kernels: it beats the stock fused kernel when the recurrent weights are sparse (the dense weights
    are read from memory every step; 10% of them stay in cache), not when they are dense.
    """

    # set by sparsify on the modules it converted itself (sk.save records it): sparsifying the model again (on
    # another machine) packs them back first (to_stock), so stock vs converted is measured again
    sparsify_converted = False

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if mode not in _STOCK:
            raise ValueError(f"mode must be one of {tuple(_STOCK)}, got {mode!r}")
        if proj_size and mode != "LSTM":
            raise ValueError(f"proj_size is an LSTM option, got proj_size={proj_size!r} with mode {mode!r}")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers, self.bias = input_size, hidden_size, num_layers, bias
        self.batch_first, self.dropout, self.bidirectional = batch_first, dropout, bidirectional
        self.proj_size = proj_size
        _STOCK[mode](**_stock_kwargs(self), device="meta")   # torch's own argument checks (and messages), no memory
        self.dropout = float(dropout)
        dd = {"device": device, "dtype": dtype}
        out = proj_size or hidden_size
        gates = _GATES[mode] * hidden_size
        for k in range(num_layers):
            for sfx in self._directions():
                width = input_size if k == 0 else out * len(self._directions())
                setattr(self, f"ih_l{k}{sfx}", nn.Linear(width, gates, bias=bias, **dd))
                setattr(self, f"hh_l{k}{sfx}", nn.Linear(out, gates, bias=bias, **dd))
                if proj_size:
                    setattr(self, f"hr_l{k}{sfx}", nn.Linear(hidden_size, proj_size, bias=False, **dd))
        bound = 1.0 / math.sqrt(hidden_size)       # as nn.RNNBase.reset_parameters
        with torch.no_grad():
            for p in self.parameters():
                nn.init.uniform_(p, -bound, bound)

    @property
    def stock_class(self) -> type[nn.Module]:
        """The torch module this one computes: nn.RNN, nn.LSTM or nn.GRU."""
        return _STOCK[self.mode]

    def _directions(self) -> list[str]:
        return ["", "_reverse"] if self.bidirectional else [""]

    def layer_names(self) -> list[str]:
        """The names of the weight-matrix children, in torch's parameter order."""
        kinds = ("ih", "hh", "hr") if self.proj_size else ("ih", "hh")
        return [f"{kind}_l{k}{sfx}" for k in range(self.num_layers) for sfx in self._directions() for kind in kinds]

    # -------------------------------------------------- what model code reads on the stock module
    def __getattr__(self, name: str) -> Any:
        # weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0 ...: the child's tensor (a SparseLinear's dense view)
        child = self._mirrored(name)
        if child is not None:
            if name.startswith("weight") and not isinstance(getattr(child, "weight", None), Tensor):
                return child.dense_weight2d()
            return getattr(child, name.partition("_")[0])
        return super().__getattr__(name)

    def _mirrored(self, name: str) -> nn.Module | None:
        """The child a stock parameter name (``weight_hh_l0``, ``bias_ih_l1_reverse``) reads from, if any."""
        kind, sep, rest = name.partition("_")
        if not sep or kind not in ("weight", "bias") or rest[:3] not in ("ih_", "hh_", "hr_") or (
                kind == "bias" and (rest.startswith("hr_") or not self.__dict__.get("bias", True))):
            return None
        return self.__dict__.get("_modules", {}).get(rest)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._mirrored(name) is not None:       # (a stock name would shadow the child's tensor, unread)
            raise AttributeError(f"{name} of a LinearRecurrent is its child's tensor: assign "
                                 f"{name.partition('_')[2]}.{name.partition('_')[0]} instead")
        super().__setattr__(name, value)

    @property
    def _flat_weights_names(self) -> list[str]:
        """The stock module's parameter names, in its order (per layer and direction: w_ih, w_hh, b_ih, b_hh,
        w_hr)."""
        names = []
        for k in range(self.num_layers):
            for sfx in self._directions():
                tail = f"l{k}{sfx}"
                names += [f"weight_ih_{tail}", f"weight_hh_{tail}"]
                names += [f"bias_ih_{tail}", f"bias_hh_{tail}"] if self.bias else []
                names += [f"weight_hr_{tail}"] if self.proj_size else []
        return names

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """Per layer and direction, its tensors in the stock module's order."""
        per = len(self._flat_weights_names) // (self.num_layers * len(self._directions()))
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i:i + per]] for i in range(0, len(names), per)]

    @property
    def nonlinearity(self) -> str:
        """An RNN's activation ("tanh" or "relu"), as nn.RNN has it."""
        if not self.mode.startswith("RNN_"):
            raise AttributeError(f"'LinearRecurrent' ({self.mode}) has no attribute 'nonlinearity'")
        return self.mode[4:].lower()

    def flatten_parameters(self) -> None:
        """Nothing to do (models call the stock module's ``flatten_parameters()`` in their forward): the weights
        are separate Linear layers."""

    # ------------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_module(cls, mod: nn.Module) -> LinearRecurrent:
        """The same recurrent module as ``mod`` (a stock ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``), its weights and
        biases copied into the Linear children. Masks (``sparsekit.prune`` parametrizations, e.g. removed hidden
        units) follow their tensors, and each tensor keeps its ``requires_grad``."""
        if not is_stock_recurrent(mod):
            raise TypeError(f"mod must be an nn.RNN, nn.LSTM or nn.GRU running torch's own forward, got "
                            f"{type(mod).__name__}")
        ref = getattr(mod, mod._flat_weights_names[0])
        kw = _stock_kwargs(mod)
        kw.pop("nonlinearity", None)
        new = cls(mod.mode, **kw, device=ref.device, dtype=ref.dtype)
        for child in new.layer_names():
            kind, _, suffix = child.partition("_")
            linear = getattr(new, child)
            for mine in ("weight", "bias"):
                theirs = f"{mine}_{kind}_{suffix}"
                if getattr(linear, mine) is None:
                    continue
                mask = _mask_param(mod, theirs)
                original = _masked_original(mod, theirs) if mask is not None else None
                with torch.no_grad():   # the unmasked values, so that un-pruning the copy gives them back
                    getattr(linear, mine).copy_(getattr(mod, theirs) if original is None else original)
                getattr(linear, mine).requires_grad_(getattr(mod, theirs).requires_grad)
                if mask is not None:
                    apply_tensor_mask(linear, mine, mask.mask)
        new.train(mod.training)
        share_call_hooks(new, mod)       # (a hook on the stock module keeps running where it is replaced)
        return new

    def to_stock(self, masked_values: bool = False) -> nn.Module:
        """The inverse of ``from_module``: the stock ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` computing the same
        outputs (weights copied; the hooks shared; a subclass converted with ``from_module`` comes back as its
        torch class). The children must be unmasked ``nn.Linear`` layers, or with ``masked_values`` masked ones
        too, whose masked values are copied (the masks themselves are not carried over)."""
        children = [getattr(self, n) for n in self.layer_names()]
        plain = [isinstance(c, nn.Linear) and (masked_values or not parametrize.is_parametrized(c)) for c in children]
        if not all(plain):
            raise TypeError(f"to_stock needs nn.Linear children{'' if masked_values else ' (unmasked)'}, got "
                            f"{sorted({type(c).__name__ for c in children})}")
        w = children[0].weight
        new = self.stock_class(**_stock_kwargs(self), device=w.device, dtype=w.dtype)
        for child in self.layer_names():
            kind, _, suffix = child.partition("_")
            for mine in ("weight", "bias"):
                src = getattr(getattr(self, child), mine)
                if src is None:
                    continue
                dst = getattr(new, f"{mine}_{kind}_{suffix}")
                with torch.no_grad():
                    dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        new.train(self.training)
        share_call_hooks(new, self)
        return new

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input: Tensor | PackedSequence,
                hx: Tensor | tuple[Tensor, Tensor] | None = None) -> tuple[Any, Any]:
        lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            steps = [int(b) for b in batch_sizes.tolist()]
            batch, batched = steps[0], True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"input must be 3-D [T, B, {self.input_size}] (batch_first: [B, T, ...]) or "
                                 f"unbatched 2-D [T, {self.input_size}], got shape {tuple(input.shape)}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            if x.shape[0] == 0:
                raise ValueError(f"input must have at least one time step, got shape {tuple(input.shape)}")
            batch = x.shape[1]
            steps = [batch] * x.shape[0]
            data = x.reshape(x.shape[0] * batch, x.shape[2])
            sorted_indices = unsorted_indices = None
        if data.shape[-1] != self.input_size:
            raise ValueError(f"input must have {self.input_size} features (input_size), got {data.shape[-1]}")
        h0, c0 = self._initial_state(hx, data, batch, batched, lstm, sorted_indices)
        d = len(self._directions())
        layer_input, h_n, c_n = data, [], []
        for k in range(self.num_layers):
            outs = []
            for j, sfx in enumerate(self._directions()):
                i = k * d + j
                out, h, c = self._direction(k, sfx, layer_input, steps, h0[i], c0[i] if lstm else None, j == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if d == 1 else torch.cat(outs, 1)
            if self.training and self.dropout and k < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        h_state = torch.stack(h_n)
        state: Any = (h_state, torch.stack(c_n)) if lstm else h_state
        if packed:
            if unsorted_indices is not None:
                state = tuple(s.index_select(1, unsorted_indices) for s in state) if lstm else \
                    state.index_select(1, unsorted_indices)
            return PackedSequence(layer_input, batch_sizes, sorted_indices, unsorted_indices), state
        output = layer_input.reshape(len(steps), batch, layer_input.shape[-1])
        if not batched:
            return output.squeeze(1), tuple(s.squeeze(1) for s in state) if lstm else state.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), state

    def _initial_state(self, hx: Any, data: Tensor, batch: int, batched: bool, lstm: bool,
                       sorted_indices: Tensor | None) -> tuple[Tensor, Tensor | list[None]]:
        layers = self.num_layers * len(self._directions())
        out = self.proj_size or self.hidden_size
        if hx is None:
            h0 = data.new_zeros(layers, batch, out)
            return h0, (data.new_zeros(layers, batch, self.hidden_size) if lstm else [None] * layers)
        states = hx if lstm else (hx,)
        if lstm and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"hx must be a tuple (h_0, c_0) for an LSTM, got {type(hx).__name__}")
        widths = (out, self.hidden_size) if lstm else (out,)
        fixed = []
        for name, s, width in zip(("h_0", "c_0"), states, widths):
            if not isinstance(s, Tensor):
                raise TypeError(f"hx: {name} must be a Tensor, got {type(s).__name__}")
            expected = (layers, batch, width) if batched else (layers, width)
            if tuple(s.shape) != expected:
                raise ValueError(f"hx: {name} must have shape {expected}, got {tuple(s.shape)}")
            s = s if batched else s.unsqueeze(1)
            fixed.append(s.index_select(1, sorted_indices) if sorted_indices is not None else s)
        return fixed[0], (fixed[1] if lstm else [None] * layers)

    def _direction(self, k: int, sfx: str, data: Tensor, steps: list[int], h: Tensor, c: Tensor | None,
                   reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer and direction over the sequence: ``(outputs [tokens, width], h_T, c_T)``. ``steps[t]``
        sequences are active at step t (all of them unless packed; a packed batch is sorted by length, so the
        active ones are the first rows: the others keep their state, the final one of a sequence that ended,
        the initial one of a sequence the reverse direction has not reached)."""
        gi = getattr(self, f"ih_l{k}{sfx}")(data)       # every step's input projection in one product
        hh = getattr(self, f"hh_l{k}{sfx}")
        hr = getattr(self, f"hr_l{k}{sfx}") if self.proj_size else None
        # the fused step runs below autograd: only when nothing of this layer's recurrence needs a gradient
        # (hr's weights feed every later step), and on a state of gi's dtype (autocast gives bf16 projections
        # of an fp32 state: the reference ops promote)
        needs_grad = torch.is_grad_enabled() and (gi.requires_grad or h.requires_grad or (
            c is not None and c.requires_grad) or any(p.requires_grad for m in (hh, hr) if m is not None
                                                      for p in m.parameters()))
        same = h.dtype == gi.dtype and (c is None or c.dtype == gi.dtype)
        fused = fused_cell(self.mode, gi, needs_grad) if same else None
        parts = gi.split(steps)          # each step's rows (one call; a slice per step costs as much again)
        outs: list[Tensor | None] = [None] * len(steps)
        with below_autograd() if fused is not None else contextlib.nullcontext():
            for t in (reversed(range(len(steps))) if reverse else range(len(steps))):
                n = steps[t]
                h_t = h if n == h.shape[0] else h[:n]
                c_t = None if c is None else c if n == c.shape[0] else c[:n]
                gh = hh(h_t)
                h_new, c_new = fused(parts[t], gh, h_t, c_t) if fused is not None else \
                    rnn_cell(parts[t], gh, h_t, c_t, self.mode)
                if hr is not None:
                    h_new = hr(h_new)
                if c is not None:
                    c = c_new if n == c.shape[0] else torch.cat([c_new, c[n:]])
                h = h_new if n == h.shape[0] else torch.cat([h_new, h[n:]])
                outs[t] = h_new
        return torch.cat(outs), h, c

    def extra_repr(self) -> str:
        s = f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                           ("proj_size", 0)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s


# ------------------------------------------------------------------------------------------ model conversion
def rnn_to_linear(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every stock ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` in ``model`` by the equivalent
    ``LinearRecurrent`` (same outputs), so that element / block / N:M pruning and ``sparsify`` reach its weight
    matrices as ``nn.Linear`` layers. Returns the converted model (a copy unless ``inplace``). Parameter names
    change (``rnn.weight_hh_l0`` -> ``rnn.hh_l0.weight``); a model saved with ``sk.save`` loads back into the
    original class (``sk.load`` converts again). Prune hidden units (channel granularity) and compact before
    converting: the dependency graph follows the stock modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_stock_recurrent(model):
        raise ValueError("model is itself a recurrent module: convert the model that contains it, or use "
                         "LinearRecurrent.from_module(rnn)")
    target = model if inplace else copy.deepcopy(model)
    _convert(target, lambda mod: True)
    return target


def _convert(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """Replace (in place) every stock recurrent module ``wanted`` picks; returns name -> the module it replaced."""
    return replace_modules(model, lambda m: is_stock_recurrent(m) and wanted(m), LinearRecurrent.from_module)


def expose_sparse_recurrent(model: nn.Module) -> dict[str, nn.Module]:
    """Replace (in place) every stock recurrent module of ``model`` whose weight matrices hold zeros by a
    ``LinearRecurrent``; returns name -> the module it replaced (for ``restore_dense_recurrent``)."""
    def has_zeros(mod: nn.Module) -> bool:
        # (torch's own classes only: a subclass's attributes and methods would not survive to_stock)
        return type(mod) in _STOCK.values() and any(
            bool(getattr(mod, n).eq(0).any()) for n in mod._flat_weights_names if n.startswith("weight"))
    return _convert(model, has_zeros)


def restore_dense_recurrent(model: nn.Module, exposed: dict[str, nn.Module]) -> list[str]:
    """Put back (in place) the stock module of every ``exposed`` entry whose children all stayed ``nn.Linear``
    (nothing was made sparse: the stock module runs its fused kernel); returns those names."""
    restored = []
    aliases = module_aliases(model)
    for name, original in exposed.items():
        mod = model.get_submodule(name)
        if all(isinstance(getattr(mod, n), nn.Linear) for n in mod.layer_names()):
            for alias in aliases[id(mod)]:
                set_submodule(model, alias, original)
            restored.append(name)
    return restored
