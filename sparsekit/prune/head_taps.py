"""Per-head outputs of attention modules (and per-channel outputs of transposed convs), for criteria that score
heads (channels) from data.

``attention_path(model)`` runs every stock ``nn.MultiheadAttention`` of ``model`` through
``PrunedMultiheadAttention``'s code (``pruned_mha.mha_forward``, same results) while it is active: its
``out_proj`` is then called as a module on the heads' concatenated outputs, so hooks (the calibration
``chains.Recorder``, these taps) see it, and torch's fused fast paths, which skip the module calls
(``nn.TransformerEncoderLayer``'s, ``nn.MultiheadAttention``'s own), are off. ``chains.Recorder`` enters it.

``HeadTaps(model, names, on_heads, gates=...)`` hooks the ``out_proj`` input of each attention module in
``names`` (``nn.MultiheadAttention`` under ``attention_path``, or ``PrunedMultiheadAttention``):

* ``on_heads(name, out)`` sees the heads' output before the output projection as ``[batch, heads, tgt,
  head_dim]`` (a head's "feature map": its ``tgt x head_dim`` matrix per sample);
* with ``gates=True`` each call multiplies head ``h``'s output by ``gates[name][h]``, a tensor of ones that
  requires grad (new ones after ``new_gates()``): ``d loss / d gate_h`` is ``sum(out_h * d loss / d out_h)``,
  the first-order change of the loss when the head is removed (the head importance of Michel et al. 2019,
  'Are Sixteen Heads Really Better than One?'), and second-order statistics of the gate are the head's.

``outputs`` names transposed convs (``nn.ConvTranspose1d`` / ``2d`` / ``3d``), whose output channels are scored
the same way: ``on_heads(name, out)`` sees their output ``[batch, C_out, *spatial]`` and, with ``gates=True``,
channel ``c`` is multiplied by ``gates[name][c]`` (a hook that runs before the ``Recorder``'s, so its product is
not an event and the Recorder sees the gated output that the next layer reads). It may also name recurrent
modules (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``), which then run one layer at a time (``recurrent.layer_by_layer``,
same results) while the taps are active: ``on_heads`` sees hidden unit ``j``'s states over layers, directions
and time as channel ``j`` (``[batch, hidden, directions * layers * steps]``) and the gate multiplies unit ``j``
in every layer's output (what the next layer reads, the last layer's being the module's) and final states
(``h_n``, ``c_n``): its gradient is the first-order effect of the unit's outputs on the loss, summed over the
layers (a unit is removed from all of them), not of its recurrent input to the other units of its layer.

Enter ``HeadTaps`` inside a ``Recorder`` (its hooks must run after the Recorder's, so the torch calls they make
are not recorded as events of the forward pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .pruned_mha import mha_forward
from .recurrent import RECURRENT, layer_by_layer, stock_forward

__all__ = ["attention_path", "HeadTaps"]

_MISSING = object()


@contextlib.contextmanager
def attention_path(model: nn.Module) -> Iterator[None]:
    """While active, every stock ``nn.MultiheadAttention`` in ``model`` runs ``mha_forward`` (see module doc)."""
    saved = []
    for mod in model.modules():
        if type(mod) is nn.MultiheadAttention or (isinstance(mod, nn.MultiheadAttention)
                                                   and type(mod).forward is nn.MultiheadAttention.forward):
            saved.append((mod, mod.__dict__.get("forward", _MISSING), mod._qkv_same_embed_dim))
            mod.forward = partial(mha_forward, mod)
            mod._qkv_same_embed_dim = False      # the encoder layer's fused path would skip the call
    try:
        yield
    finally:
        for mod, fwd, same in saved:
            if fwd is _MISSING:
                del mod.forward
            else:
                mod.forward = fwd
            mod._qkv_same_embed_dim = same


class HeadTaps:
    """Context manager reading (and gating) the per-head outputs of attention modules (see module doc)."""

    def __init__(self, model: nn.Module, names: Iterable[str], on_heads: Callable[[str, Tensor], None] | None = None,
                 gates: bool = False, outputs: Iterable[str] = ()) -> None:
        self.model, self.on_heads, self.use_gates = model, on_heads, gates
        self.attention, self.outputs = list(names), list(outputs)
        self.names = self.attention + self.outputs
        self.gates: dict[str, Tensor] = {}
        self._shape: dict[str, tuple[int, int]] = {}
        self._handles: list = []
        self._forwards: list = []      # (recurrent module, its own instance `forward` or _MISSING)

    def new_gates(self) -> dict[str, Tensor]:
        """Fresh gates (ones requiring grad, one per head / output channel) for the next forward pass."""
        for name in self.names:
            mod = self.model.get_submodule(name)
            if isinstance(mod, RECURRENT):
                ref, n = mod.weight_ih_l0, mod.hidden_size
            elif name in self.outputs:
                ref, n = mod.weight, mod.out_channels
            else:
                ref, n = mod.out_proj.weight, mod.num_heads
            self.gates[name] = torch.ones(n, device=ref.device, dtype=ref.dtype, requires_grad=True)
        return self.gates

    def __enter__(self) -> HeadTaps:
        try:
            for name in self.attention:
                mod = self.model.get_submodule(name)
                self._handles.append(mod.register_forward_pre_hook(partial(self._query_shape, name),
                                                                   with_kwargs=True))
                self._handles.append(mod.out_proj.register_forward_pre_hook(partial(self._heads, name, mod)))
            for name in self.outputs:
                mod = self.model.get_submodule(name)
                own = mod.__dict__.get("forward", _MISSING)
                if isinstance(own, partial) and getattr(own.func, "__name__", "") == "_hidden_units":
                    raise ValueError(f"HeadTaps: {name!r} is already tapped by another HeadTaps (they do not "
                                     "nest on one recurrent module)")
                if isinstance(mod, RECURRENT) and stock_forward(mod):
                    self._forwards.append((mod, own))
                    mod.forward = partial(self._hidden_units, name, mod, mod.forward)
                elif isinstance(mod, RECURRENT):   # a forward of its own (subclass, wrapper): gated on its results
                    self._handles.append(mod.register_forward_hook(partial(self._recurrent_output, name),
                                                                   prepend=True))
                else:
                    self._handles.append(mod.register_forward_hook(partial(self._channels, name), prepend=True))
            if self.use_gates:
                self.new_gates()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod, fwd in reversed(self._forwards):
            if fwd is _MISSING:
                del mod.forward
            else:
                mod.forward = fwd
        self._forwards.clear()

    def _query_shape(self, name: str, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        q = args[0] if args else kwargs["query"]
        if q.dim() == 2:
            self._shape[name] = (q.shape[0], 1)
        else:
            self._shape[name] = (q.shape[1], q.shape[0]) if mod.batch_first else (q.shape[0], q.shape[1])

    def _channels(self, name: str, mod: nn.Module, _args: tuple, out: Any) -> Any:
        if self.on_heads is not None:
            self.on_heads(name, out)
        if not self.use_gates:
            return None
        return out * self.gates[name].view(1, -1, *([1] * (out.dim() - 2)))

    def _hidden_units(self, name: str, mod: nn.Module, forward: Callable, input: Any, hx: Any = None) -> Any:
        if not isinstance(input, Tensor):    # a packed sequence: its units are pinned (graph), never tapped
            return forward(input, hx)
        h, outputs = mod.hidden_size, []
        gate = self.gates[name] if self.use_gates else None

        def on_layer(_k: int, out: Tensor, state: tuple) -> tuple:
            outputs.append(out if mod.batch_first else out.transpose(0, 1))      # [B, T, D * H]
            if gate is None:
                return out, state
            g = gate.to(out.dtype)          # autocast: the module's output dtype stays
            return out * g.repeat(out.shape[-1] // h), tuple(s * g for s in state)

        result = layer_by_layer(mod, input, hx, on_layer)
        if self.on_heads is not None:        # [B, L * T, D, H] -> [B, H, D * L * T]: a unit's states as one channel
            seq = torch.cat(outputs, 1)
            batch, steps = seq.shape[:2]
            self.on_heads(name, seq.reshape(batch, steps, -1, h).permute(0, 3, 2, 1).reshape(batch, h, -1))
        return result

    def _recurrent_output(self, name: str, mod: nn.Module, _args: tuple, out: Any) -> tuple | None:
        """A single-layer recurrent module with its own forward: its returned ``(output, state)`` read and gated
        (``pruner._gated`` leaves a multi-layer one whole: its inner layers cannot be reached)."""
        y = out[0]                           # [T, B, D*H], [B, T, D*H] (batch_first) or unbatched [T, D*H]
        if not isinstance(y, Tensor):        # a packed sequence: its units are pinned (graph), never tapped
            return None
        h = mod.hidden_size
        if self.on_heads is not None:
            seq = y.unsqueeze(1) if y.dim() == 2 else y if not mod.batch_first else y.transpose(0, 1)
            steps, batch = seq.shape[:2]     # [T, B, D*H] -> [B, H, D*T]
            self.on_heads(name, seq.reshape(steps, batch, -1, h).permute(1, 3, 2, 0).reshape(batch, h, -1))
        if not self.use_gates:
            return None
        gate, state = self.gates[name].to(y.dtype), out[1]
        if isinstance(state, (tuple, list)):
            gated_state = [s * gate for s in state]
            state = gated_state if isinstance(state, list) else tuple(gated_state)
        else:
            state = state * gate
        res = (y * gate.repeat(y.shape[-1] // h), state, *out[2:])     # what else it returns stays
        return list(res) if isinstance(out, list) else res

    def _heads(self, name: str, mod: nn.Module, _proj: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        tgt, bsz = self._shape[name]
        h, d = mod.num_heads, mod.head_dim
        if self.on_heads is not None:
            self.on_heads(name, x.view(tgt, bsz, h, d).permute(1, 2, 0, 3))
        if not self.use_gates:
            return None
        gate = self.gates[name].view(1, h, 1)
        return ((x.view(-1, h, d) * gate).reshape(x.shape),) + tuple(args[1:])
