"""``rnn_cell``: the pointwise part of one recurrent step, fused on CPU.

``LinearRecurrent`` runs its recurrent product (``h @ W_hh^T``, sparse or dense) every time step; the gates
after it are ~10 small elementwise ops, whose dispatch cost more than a 90%-sparse product at batch sizes of a
few rows. ``sparsekit::rnn_cell`` (csrc/cpu/rnn_cell.cpp) computes them in one pass for fp32 / bf16 CPU tensors
that need no gradient; everything else (gradients, CUDA, other dtypes, torch.compile, which fuses the reference
itself) runs the reference ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import reference
from ._library import has_kernel

__all__ = ["rnn_cell", "fused_cell", "below_autograd", "MODES"]

MODES = reference.RNN_MODES
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_BelowAutograd = torch._C._AutoDispatchBelowAutograd


def _check_mode(mode: object) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return MODES.index(mode)


def fused_cell(mode: str, like: Tensor, needs_grad: bool) -> Callable[..., tuple[Tensor, Tensor | None]] | None:
    """The fused C++ step ``cell(gi, gh, h, c) -> (h_new, c_new)`` for a recurrence whose tensors are all like
    ``like`` (device, dtype) and need no gradient (``needs_grad`` False; nor a forward-mode tangent), or None
    where it cannot run (then ``rnn_cell`` runs the reference). Call it under ``below_autograd()`` (nothing needs
    a gradient: the Python autograd formula's layer is skipped; a recurrence enters it once, not per step).
    Checked once per sequence, not per step: the checks cost as much as a step's arithmetic."""
    code = _check_mode(mode)
    if (needs_grad or like.device.type != "cpu" or like.dtype not in _FUSED_DTYPES or type(like) is not Tensor
            or not has_kernel("rnn_cell", "CPU") or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0):
        return None
    raw = torch.ops.sparsekit.rnn_cell.default._op

    def cell(gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h_new, c_new = raw(gi, gh, h, c, code)
        return h_new, (c_new if code == 0 else None)
    return cell


def below_autograd() -> torch._C._AutoDispatchBelowAutograd:
    """The context ``fused_cell``'s step runs in."""
    return _BelowAutograd()


def _check_step(gi: object, gh: object, h: object, c: object, code: int) -> None:
    """Shapes and types of one step's operands, named (the fused op's and the reference's own errors are not)."""
    gates = (4, 3, 1, 1)[code]
    for name, t in (("gi", gi), ("gh", gh), ("h", h)) + ((("c", c),) if code == 0 else ()):
        if not isinstance(t, Tensor):
            raise TypeError(f"rnn_cell: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"rnn_cell: {name} must be a 2-D floating tensor, got {t.dim()}-D {t.dtype}")
    if code != 0 and c is not None:
        raise ValueError(f"rnn_cell: c is an LSTM's cell state; mode {MODES[code]!r} takes c=None")
    rows, width = gi.shape
    hidden = width // gates
    if width % gates or tuple(gh.shape) != (rows, width):
        raise ValueError(f"rnn_cell: gi and gh must both be [rows, {gates} * H], got {tuple(gi.shape)} and "
                         f"{tuple(gh.shape)}")
    states = [("c", c, hidden)] if code == 0 else [("h", h, hidden)]   # (an LSTM's h may be a projection)
    for name, t, size in states:
        if tuple(t.shape) != (rows, size):
            raise ValueError(f"rnn_cell: {name} must have shape {(rows, size)}, got {tuple(t.shape)}")


def rnn_cell(gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, mode: str) -> tuple[Tensor, Tensor | None]:
    """``(h_new, c_new)`` of one step of a ``mode`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") recurrent layer from
    its input projection ``gi`` and recurrent projection ``gh`` (``[rows, gates * H]``, biases included), state
    ``h`` and (LSTM) cell state ``c`` (``[rows, H]``); ``c_new`` is None unless an LSTM. Fused on CPU (fp32 /
    bf16, no gradient needed), the reference ops otherwise."""
    code = _check_mode(mode)
    _check_step(gi, gh, h, c, code)
    tensors = (gi, gh, h) if c is None else (gi, gh, h, c)
    same = all(t.dtype == gi.dtype and t.device == gi.device for t in tensors)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    cell = fused_cell(mode, gi, needs_grad) if same else None
    if cell is not None:
        with _BelowAutograd():
            return cell(gi, gh, h, c)
    h_new, c_new = reference.rnn_cell(gi, gh, h, c, code)
    return h_new, (c_new if code == 0 else None)
