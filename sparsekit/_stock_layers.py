"""Subclasses of torch's Linear / conv layers with a forward of their own: whether they still compute the stock
layer's function.

A sparse twin (``sk.nn.SparseLinear`` ...) runs the stock computation, and the dependency graph assumes it when it
cuts channels: a subclass that standardises its weight (timm's ``StdConv2d``), scales its output or carries an
adapter computes something else. ``overridden_forward`` says whether a layer's class overrides the stock forward;
``acts_as_stock`` whether, nonetheless, it holds nothing of its own and gives the stock output on a real input
(Falcon's ``FalconLinear`` writes ``x @ W.T + b`` out by hand).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["STOCK_LAYERS", "stock_base", "overridden_forward", "acts_as_stock", "run_alone", "same_output"]

STOCK_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)
_STOCK_ATTRS: dict[type, frozenset[str]] = {}


def stock_base(mod: nn.Module) -> type[nn.Module]:
    """The torch layer class ``mod`` derives from (one of STOCK_LAYERS)."""
    return next(base for base in STOCK_LAYERS if isinstance(mod, base))


def overridden_forward(mod: nn.Module) -> str | None:
    """Why ``mod`` (an instance of one of STOCK_LAYERS) must stay dense, or None: its class overrides the forward
    of the torch layer it derives from (timm's StdConv2d standardising its weight, a Linear scaling its output),
    which its Sparse* twin, running the stock computation, would drop silently. (A masked layer's parametrize
    class adds no forward of its own.)"""
    base = stock_base(mod)
    for attr in ("forward", "_conv_forward"):     # (the stock conv forward calls _conv_forward)
        if getattr(type(mod), attr, None) is not getattr(base, attr, None):
            return (f"{parametrize.type_before_parametrizations(mod).__name__} overrides nn.{base.__name__}.{attr}: "
                    "kept dense (its sparse twin would run the stock computation)")
    return None


def _stock_attrs(base: type[nn.Module]) -> frozenset[str]:
    """Instance attribute names of a freshly made ``base`` layer (nn.Linear, nn.Conv2d ...)."""
    if base not in _STOCK_ATTRS:
        _STOCK_ATTRS[base] = frozenset(vars(base(1, 1) if base is nn.Linear else base(1, 1, 1)))
    return _STOCK_ATTRS[base]


def run_alone(mod: nn.Module, inp: Tensor, forward: object = None) -> object:
    """``mod``'s forward (or ``forward(mod, x)``) on a copy of ``inp``, without grad and without its hooks: a probe
    must neither change the caller's tensor (a forward that clamps its input in place) nor fire the model's hooks."""
    with torch.no_grad():
        return (forward or type(mod).forward)(mod, inp.clone())


def same_output(got: object, want: Tensor) -> bool:
    """``got`` equals ``want`` to the rounding of their dtype (two ways of writing one product differ there)."""
    if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return False
    rtol = max(1e-4, 16 * torch.finfo(want.dtype).eps) if want.is_floating_point() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=rtol, atol=0.1 * rtol * max(scale, 1.0)))


def acts_as_stock(mod: nn.Module, inp: Tensor) -> bool:
    """Whether a layer whose class overrides the stock forward (``overridden_forward``) still computes the stock
    layer's function, as Falcon's ``FalconLinear`` (``input @ self.weight.T + self.bias``) does: it holds nothing
    the stock layer does not (no parameter, buffer, submodule or attribute of its own: a LoRA layer's zero-started
    adapter is one, a scale factor another) and, on ``inp`` (the layer's real input), its output equals the stock
    forward's to float rounding."""
    base = stock_base(mod)
    own = {n for n, _ in mod.named_parameters(recurse=False)} | {n for n, _ in mod.named_buffers(recurse=False)}
    if own - {"weight", "bias"} or set(mod._modules) - {"parametrizations"}:
        return False
    if any(not a.startswith("_") for a in set(vars(mod)) - _stock_attrs(base)):
        return False        # (private ones are bookkeeping: transformers marks every module _is_hf_initialized)
    try:
        got, want = run_alone(mod, inp), run_alone(mod, inp, base.forward)
    except Exception:  # noqa: BLE001 - it does not run as the stock layer: keep it as it is
        return False
    return same_output(got, want)
