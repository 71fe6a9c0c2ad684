"""Hidden units of recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): where a unit lives in the weights.

A recurrent module has one ``hidden_size`` for all its layers and directions, so a *unit* ``j`` is hidden unit
``j`` of every layer and direction: its rows ``g * H + j`` in each gate ``g`` of every ``weight_ih_l{k}``,
``weight_hh_l{k}`` and bias (4 gates for an LSTM, 3 for a GRU, 1 for an RNN), column ``j`` of every
``weight_hh_l{k}``, and columns ``d * H + j`` of the next layer's ``weight_ih_l{k+1}`` (``d`` = direction).
Removing a unit takes all of them; the input features (``input_size``) are the columns of ``weight_ih_l0``.

Zeroing a unit's gate rows (weights and biases) makes its state exactly 0 from a zero initial state: an LSTM's
cell becomes ``0.5 * c`` (input gate 0.5 times ``tanh(0)``) and its output ``0.5 * tanh(c)``, a GRU's
``0.5 * h`` (candidate ``tanh(0)``), an RNN's ``act(0)``; so the masked module equals the smaller one.

    params = unit_index(lstm, keep_hidden, keep_in)   # {param name: (kept rows or None, kept columns or None)}
    small = resize_recurrent(lstm, keep_hidden, keep_in)
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn

from .module_copy import cut, resized_copy

__all__ = ["RECURRENT", "gates", "unit_index", "index_masks", "resize_recurrent", "hidden_unit_rows",
           "input_columns", "parameter_names", "keep_copyable", "drop_copy_hook", "layer_by_layer", "stock_forward"]

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def gates(mod: nn.Module) -> int:
    """Gate blocks stacked in each weight's rows."""
    if isinstance(mod, nn.LSTM):
        return 4
    return 3 if isinstance(mod, nn.GRU) else 1


def _directions(mod: nn.Module) -> list[str]:
    return ["", "_reverse"] if mod.bidirectional else [""]


def unit_index(mod: nn.Module, keep_hidden: Tensor | None = None,
               keep_in: Tensor | None = None) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """``{parameter name: (kept rows, kept columns)}`` of every weight and bias of ``mod`` when it keeps hidden
    units ``keep_hidden`` and input features ``keep_in`` (``None``: all; in the result, ``None``: every row or
    column of that parameter)."""
    h, g = mod.hidden_size, gates(mod)
    dirs = _directions(mod)
    rows = None
    cols_hh = cols_next = None
    if keep_hidden is not None:
        keep_hidden = torch.as_tensor(keep_hidden, dtype=torch.long).reshape(-1)
        rows = (torch.arange(g).reshape(-1, 1) * h + keep_hidden).reshape(-1)
        cols_hh = keep_hidden
        cols_next = torch.cat([keep_hidden + d * h for d in range(len(dirs))])
    out: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for layer in range(mod.num_layers):
        for sfx in dirs:
            out[f"weight_ih_l{layer}{sfx}"] = (rows, keep_in if layer == 0 else cols_next)
            out[f"weight_hh_l{layer}{sfx}"] = (rows, cols_hh)
            if mod.bias:
                out[f"bias_ih_l{layer}{sfx}"] = (rows, None)
                out[f"bias_hh_l{layer}{sfx}"] = (rows, None)
    return out


def index_masks(mod: nn.Module, keep_hidden: Tensor | None = None,
                keep_in: Tensor | None = None) -> dict[str, Tensor]:
    """Keep-masks (bool, the parameters' shapes) of the parameters ``unit_index`` changes."""
    out = {}
    for name, (rows, cols) in unit_index(mod, keep_hidden, keep_in).items():
        if rows is None and cols is None:
            continue
        t = getattr(mod, name)
        keep = torch.zeros(t.shape, dtype=torch.bool)
        r = torch.arange(t.shape[0]) if rows is None else rows
        keep[r] = True
        if cols is not None:
            c = torch.zeros(t.shape[1], dtype=torch.bool)
            c[cols] = True
            keep &= c
        out[name] = keep
    return out


def resize_recurrent(mod: nn.Module, keep_hidden: Tensor | None = None, keep_in: Tensor | None = None,
                     within: nn.Module | None = None) -> nn.Module:
    """A copy of ``mod`` (its class, attributes and hooks: ``module_copy.resized_copy``) with ``len(keep_hidden)``
    hidden units and ``len(keep_in)`` inputs, the kept rows and columns copied (``None`` keeps all)."""
    if getattr(mod, "proj_size", 0):
        raise ValueError(f"an LSTM with proj_size={mod.proj_size} is not resized (its outputs are projections)")
    if keep_hidden is None and keep_in is None:
        return copy.deepcopy(mod)
    h = mod.hidden_size if keep_hidden is None else len(keep_hidden)
    i = mod.input_size if keep_in is None else len(keep_in)
    if h < 1 or i < 1:
        raise ValueError(f"a {type(mod).__name__} keeps at least one hidden unit and one input, got hidden {h}, "
                         f"input {i}")
    tensors = {name: cut(getattr(mod, name), rows, cols)
               for name, (rows, cols) in unit_index(mod, keep_hidden, keep_in).items()}
    # (the flat-weight caches hold the old tensors: made again from the new ones)
    new = resized_copy(mod, tensors, {"hidden_size": h, "input_size": i}, skip=("_flat_weights", "_flat_weight_refs"),
                       within=within)
    new._init_flat_weights()
    drop_copy_hook(new)
    return new


def hidden_unit_rows(mod: nn.Module, get: Callable[[str], Tensor]) -> Tensor:
    """``[hidden_size, n]``: row ``j`` holds every weight of unit ``j``'s gate rows (all layers, directions and
    gates, input and recurrent weights), from ``get(parameter name)`` (the weights, or their masks)."""
    h, g = mod.hidden_size, gates(mod)
    parts = []
    for name in unit_index(mod):
        if name.startswith("weight"):
            t = get(name)
            parts.append(t.reshape(g, h, -1).transpose(0, 1).reshape(h, -1))
    return torch.cat(parts, 1)


def parameter_names(mod: nn.Module) -> list[str]:
    """Every weight and bias of a recurrent module (``unit_index``'s, plus an LSTM's ``weight_hr_l{k}``)."""
    return list(mod._flat_weights_names)


def _reread_flat_weights(mod: nn.Module, args: object, output: object) -> None:
    # nn.RNNBase caches the tensors a forward ran on (_flat_weights); masked weights are parametrizations, so
    # after a forward under grad those are non-leaf tensors, which copy.deepcopy refuses (a masked model could not
    # be compacted or copied after a fine-tuning step). Re-read them without grad; the next forward re-reads them
    # anyway (the parametrized tensors change identity on every access), and autograd keeps what it needs.
    with torch.no_grad():
        mod._flat_weights = [getattr(mod, n) if hasattr(mod, n) else None for n in mod._flat_weights_names]
        mod._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in mod._flat_weights]


def drop_copy_hook(mod: nn.Module) -> None:
    """Undo ``keep_copyable`` on a recurrent module whose weights are plain again (the hook is sparsekit's, and
    torch.jit.script refuses a module holding it)."""
    if mod.__dict__.pop("_sparsekit_copyable", False):
        for key in [k for k, hook in mod._forward_hooks.items() if hook is _reread_flat_weights]:
            del mod._forward_hooks[key]


def keep_copyable(mod: nn.Module) -> None:
    """Make a recurrent module with masked weights stay deep-copyable after forwards (once per module)."""
    if isinstance(mod, nn.RNNBase) and not getattr(mod, "_sparsekit_copyable", False):
        mod.register_forward_hook(_reread_flat_weights)
        mod._sparsekit_copyable = True


def input_columns(mod: nn.Module) -> list[str]:
    """The parameters whose columns are the input features (``weight_ih_l0`` of each direction)."""
    return [f"weight_ih_l0{sfx}" for sfx in _directions(mod)]


_STOCK_FORWARDS = (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)


def stock_forward(mod: nn.Module) -> bool:
    """Whether ``mod`` runs torch's own RNN / LSTM / GRU forward (a subclass may define its own, and a wrapper
    may set one on the instance, as accelerate's hooks do; the class's own method bound to ``mod`` and set back
    on it, as such hooks leave it when removed, is still torch's)."""
    own = mod.__dict__.get("forward")
    if own is not None and not (getattr(own, "__self__", None) is mod
                                and getattr(own, "__func__", None) in _STOCK_FORWARDS):
        return False
    return type(mod).forward in _STOCK_FORWARDS


@contextlib.contextmanager
def _cudnn_disabled() -> Iterator[None]:
    # only the `enabled` flag (torch.backends.cudnn.flags would reset the others too); process-global state.
    # The mutation is allowed even after torch.backends.disable_global_flags() (as flags() itself does it).
    allow = getattr(torch.backends, "__allow_nonbracketed_mutation", contextlib.nullcontext)
    with allow():
        saved, torch.backends.cudnn.enabled = torch.backends.cudnn.enabled, False
    try:
        yield
    finally:
        with allow():
            torch.backends.cudnn.enabled = saved


LayerHook = Callable[[int, Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]]


def layer_by_layer(mod: nn.Module, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None,
                   on_layer: LayerHook | None = None) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """``mod(input, hx)`` for a recurrent module (no packed sequence, no ``proj_size``), one layer at a time, so
    that ``on_layer(k, output, state)`` can read and replace layer ``k``'s output (``[T, B, D * H]``, or batch
    first) and final state (``(h,)`` or ``(h, c)``, each ``[D, B, H]``) before the next layer reads the output.
    The same results as ``mod`` (inter-layer dropout included, with its own random draws); the weights are read
    through ``getattr``, so masks (parametrizations) apply. cuDNN's RNN has no backward in eval mode, so a CUDA
    module in eval mode runs torch's own kernels while gradients are recorded (cuDNN switched off for the call:
    process-global, not thread-safe)."""
    if not isinstance(mod, RECURRENT):
        raise TypeError(f"layer_by_layer: mod must be an nn.RNN, nn.LSTM or nn.GRU, got {type(mod).__name__}")
    if getattr(mod, "proj_size", 0):
        raise ValueError(f"layer_by_layer: an LSTM with proj_size={mod.proj_size} is not supported (its layers' "
                         "outputs are projections)")
    if not isinstance(input, Tensor):
        raise TypeError(f"layer_by_layer: input must be a Tensor (packed sequences are not supported), got "
                        f"{type(input).__name__}")
    no_cudnn = input.is_cuda and torch.is_grad_enabled() and not mod.training
    with _cudnn_disabled() if no_cudnn else contextlib.nullcontext():
        return _layer_by_layer(mod, input, hx, on_layer)


def _layer_by_layer(mod: nn.Module, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None,
                    on_layer: LayerHook | None) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    lstm = isinstance(mod, nn.LSTM)
    if isinstance(mod, nn.GRU):
        fn = _VF.gru
    elif isinstance(mod, nn.RNN):
        fn = _VF.rnn_tanh if mod.nonlinearity == "tanh" else _VF.rnn_relu
    else:
        fn = _VF.lstm
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(0 if mod.batch_first else 1)
    d = 2 if mod.bidirectional else 1
    if hx is None:
        zeros = x.new_zeros(mod.num_layers * d, x.shape[0 if mod.batch_first else 1], mod.hidden_size)
        hx = (zeros, zeros) if lstm else zeros
    elif not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    weights = [getattr(mod, n) for n in mod._flat_weights_names]
    per = len(weights) // mod.num_layers
    states: list[tuple[Tensor, ...]] = []
    for k in range(mod.num_layers):
        h0 = tuple(h[k * d:(k + 1) * d] for h in hx) if lstm else hx[k * d:(k + 1) * d]
        out, *state = fn(x, h0, weights[k * per:(k + 1) * per], mod.bias, 1, 0.0, mod.training, mod.bidirectional,
                         mod.batch_first)
        state = tuple(state)
        if on_layer is not None:
            out, state = on_layer(k, out, state)
        states.append(state)
        x = F.dropout(out, mod.dropout, True) if mod.training and mod.dropout and k < mod.num_layers - 1 else out
    final = tuple(torch.cat(parts) for parts in zip(*states))
    if not batched:
        out, final = out.squeeze(0 if mod.batch_first else 1), tuple(s.squeeze(1) for s in final)
    return out, final if lstm else final[0]
