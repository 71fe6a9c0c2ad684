"""Follow each prunable layer's output to its feature map and to the one layer that consumes it.

One forward pass on ``example_inputs`` is recorded as a list of top-level *events*: calls of leaf modules
(``nn.Linear``/``nn.Conv2d`` count as leaves even when masked) and torch functions called outside any leaf
module (``torch.flatten``, ``x + y``, ``F.relu`` ...), each with its tensor inputs and output. Tensors are
matched by identity, so a residual add or a concat is seen as a second consumer and ends the chain.

For a producer layer ``P`` the walk from its output goes through

* elementwise steps (BatchNorm, activations, dropout, identity): the last of these gives the *feature
  map* (what activation criteria such as APoZ look at);
* pooling and flatten/view/reshape steps;

and stops at the first prunable layer ``Q`` that takes the tensor: the *consumer*. A conv consumer must
take the ``C`` channels as its input channels (``groups=1``); a linear consumer takes them flattened, ``C``
contiguous groups of ``in_features / C`` features. Anything else (two consumers, an add, a concat, an
unknown op) leaves ``consumer=None`` with the ``reason``.

    links = trace_links(model, example_inputs, ["conv1", "conv2"])
    links["conv1"].consumer      # "conv2"
    links["conv1"].feature       # event index whose output is conv1's feature map (after BN/ReLU)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .masks import CHANNEL_NORMS, CONVS, PRUNABLE

__all__ = ["Event", "Link", "Recorder", "trace_events", "trace_links", "ELEMENTWISE", "RESHAPING"]

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    *CHANNEL_NORMS, nn.PReLU, nn.ReLU, nn.ReLU6,
    nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
RESHAPING: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
                                          nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                          nn.AdaptiveMaxPool2d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                                          nn.AdaptiveMaxPool3d, nn.Flatten)
_ELEMENTWISE_FN = {"relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "hardswish",
                   "elu", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
                   "feature_alpha_dropout", "batch_norm", "mish", "hardtanh", "softplus", "selu", "celu",
                   "hardsigmoid",
                   "contiguous", "clone", "detach"}
_RESHAPING_FN = {"flatten", "view", "reshape", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d",
                 "adaptive_max_pool1d", "max_pool1d_with_indices", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                 "adaptive_max_pool2d", "_max_pool2d", "max_pool2d_with_indices",
                 "adaptive_avg_pool2d_with_indices", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d",
                 "adaptive_max_pool3d", "max_pool3d_with_indices", "adaptive_max_pool3d_with_indices"}


@dataclass
class Event:
    """One top-level step of a forward pass: a leaf module call or a torch function outside modules."""

    index: int
    kind: str                  # "module" | "function"
    name: str                  # module name, or the function's name
    module: nn.Module | None
    inputs: tuple[Tensor, ...]
    output: Tensor | None


@dataclass
class Link:
    """Where a prunable layer's output channels go (see the module docstring)."""

    producer: str
    event: int                           # the producer's own event index
    feature: int                         # event whose output is the feature map (== event if none follows)
    consumer: str | None = None
    consumer_event: int | None = None
    group: int = 1                       # consumer input features per producer channel (linear after flatten)
    path: list[int] = field(default_factory=list)   # events between producer and consumer
    reason: str = ""                     # why consumer is None


def _fn_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") if name.startswith("__") else name


def _leaves(model: nn.Module) -> dict[nn.Module, str]:
    """Leaf modules to hook: prunable layers (never descended into) and modules without children."""
    out: dict[nn.Module, str] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        # a mask parametrization (e.g. on a BatchNorm) is not a child: the module stays one leaf
        children = [(n, c) for n, c in mod.named_children() if n != "parametrizations"]
        if isinstance(mod, PRUNABLE) or not children:
            out.setdefault(mod, prefix)
            return
        for child_name, child in children:
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


class Recorder:
    """Context manager recording top-level events of forward passes; ``on_event(event)`` sees each one.

    While recording, stock ``nn.MultiheadAttention`` modules run ``head_taps.attention_path`` (same results),
    so their ``out_proj`` is a module call (an event) like any Linear's.

    ``keep=True`` stores the events (with their tensors) in ``events``; ``counter`` restarts with
    ``reset()`` (call it before each forward pass so event indices repeat from 0).
    """

    def __init__(self, model: nn.Module, on_event: Callable[[Event], None] | None = None,
                 keep: bool = False) -> None:
        self.model, self.on_event, self.keep = model, on_event, keep
        self.events: list[Event] = []
        self.counter = 0
        self._depth = 0
        self._handles: list[Any] = []
        self._mode: _Mode | None = None
        self._path: Any = None

    def reset(self) -> None:
        self.counter = 0

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Torch calls inside are not events (e.g. a DataLoader fetching the next batch: its getitem / stack)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def _enter_quiet(self, _mod: nn.Module, _args: tuple) -> None:
        self._depth += 1

    def _leave_quiet(self, _mod: nn.Module, _args: tuple, _out: Any) -> None:
        self._depth -= 1

    def _emit(self, kind: str, name: str, module: nn.Module | None, inputs: Iterable[Any], output: Any) -> None:
        tensors = tuple(t for t in inputs if isinstance(t, Tensor))
        ev = Event(self.counter, kind, name, module, tensors, output if isinstance(output, Tensor) else None)
        self.counter += 1
        if self.keep:
            self.events.append(ev)
        if self.on_event is not None:
            self._depth += 1          # torch calls made by the callback are not events
            try:
                self.on_event(ev)
            finally:
                self._depth -= 1

    def __enter__(self) -> Recorder:
        from .head_taps import attention_path  # it imports pruned_mha, which imports graph

        self._path = attention_path(self.model)    # out_proj of nn.MultiheadAttention: a module call
        self._path.__enter__()
        for mod, name in _leaves(self.model).items():
            def pre(m: nn.Module, args: tuple) -> None:
                self._depth += 1

            def post(m: nn.Module, args: tuple, out: Any, _name: str = name) -> None:
                self._depth -= 1
                if self._depth == 0:
                    self._emit("module", _name, m, args, out)

            self._handles.append(mod.register_forward_pre_hook(pre))
            self._handles.append(mod.register_forward_hook(post))
        # a masked tensor read outside a leaf (a stock attention's in_proj_weight) runs its parametrization:
        # not a step of the forward pass (and not run when nothing is masked yet, so it would shift the events)
        for mod in self.model.modules():
            if isinstance(mod, parametrize.ParametrizationList):
                self._handles.append(mod.register_forward_pre_hook(self._enter_quiet))
                self._handles.append(mod.register_forward_hook(self._leave_quiet))
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0
        self._path.__exit__(*exc)


class _Mode(TorchFunctionMode):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        # a call returning several tensors (chunk, split, unbind, topk ...) is a use of its input too: an event
        # without an output (it ends a chain); sizes and other non-tensor results are not steps
        several = isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out)
        if self.rec._depth == 0 and (isinstance(out, Tensor) or several):
            flat = list(args) + list((kwargs or {}).values())
            flat = [a for x in flat for a in (x if isinstance(x, (list, tuple)) else (x,))]
            self.rec._emit("function", _fn_name(func), None, flat, out)
        return out


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(example_inputs)`` for a Tensor, a tuple/list of positional args or a dict of kwargs."""
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(*example_inputs)


def trace_events(model: nn.Module, example_inputs: Any) -> list[Event]:
    """Record one forward pass (eval mode, no grad; training flags restored) as a list of events."""
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), Recorder(model, keep=True) as rec:
            run_model(model, example_inputs)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    return rec.events


def _is_elementwise(ev: Event) -> bool:
    if ev.kind == "module":
        return isinstance(ev.module, ELEMENTWISE)
    return ev.name in _ELEMENTWISE_FN


def _is_reshaping(ev: Event) -> bool:
    if ev.kind == "module":
        return isinstance(ev.module, RESHAPING)
    return ev.name in _RESHAPING_FN


def _follow(events: Sequence[Event], start: int, name: str) -> Link:
    producer = events[start]
    link = Link(producer=name, event=start, feature=start)
    cur = producer.output
    # a Linear's features are its output's last dim; a conv's channels dim 1
    last_dim = isinstance(producer.module, nn.Linear) and cur is not None and cur.dim() > 2
    channels = (cur.shape[-1] if last_dim else cur.shape[1]) if cur is not None and cur.dim() >= 2 else None
    shape_changed = False
    j = start
    while True:
        users = [ev for ev in events[j + 1:] if any(t is cur for t in ev.inputs)]
        if users and users[0].output is cur:      # an in-place step (ReLU(inplace=True)): follow it first
            users = users[:1]
        if not users:
            link.reason = (f"the output of {name!r} is not used by a module or torch function after it "
                           "(it is the model's output)")
            return link
        if len(users) > 1:
            link.reason = (f"the channels of {name!r} reach {len(users)} operations "
                           f"({', '.join(u.name for u in users[:3])}): not a plain sequential chain")
            return link
        ev = users[0]
        if ev.kind == "module" and isinstance(ev.module, PRUNABLE):
            if last_dim and isinstance(ev.module, CONVS):
                link.reason = (f"consumer {ev.name!r} is a conv, which reads dim 1 of the [..., tokens, features] "
                               f"output of {name!r}, not its features")
                return link
            if last_dim and shape_changed:      # flattened tokens x features: a feature's columns are strided
                link.reason = (f"the [..., tokens, features] output of {name!r} is reshaped before {ev.name!r}: "
                               "its features are no longer contiguous column groups")
                return link
            return _attach_consumer(link, ev, cur, channels)
        if ev.output is None:
            link.reason = f"{ev.name!r} after {name!r} does not return a tensor"
            return link
        if _is_elementwise(ev) and ev.output.shape == cur.shape:
            if not shape_changed:
                link.feature = ev.index
        elif _is_reshaping(ev) and ev.output.shape[0] == cur.shape[0]:
            shape_changed = True
        else:
            link.reason = (f"{name!r} reaches {ev.name!r} ({ev.kind}), which is neither elementwise, pooling "
                           "nor a reshape: not a plain sequential chain")
            return link
        link.path.append(ev.index)
        cur, j = ev.output, ev.index


def _attach_consumer(link: Link, ev: Event, cur: Tensor, channels: int | None) -> Link:
    mod = ev.module
    if isinstance(mod, CONVS):
        if mod.groups != 1 or mod.in_channels != channels:
            link.reason = (f"consumer {ev.name!r} is a conv with groups={mod.groups}, in_channels="
                           f"{mod.in_channels}; expected groups=1 and {channels} input channels")
            return link
        link.group = 1
    else:
        feat = mod.in_features
        if channels is None or feat % channels or cur.dim() != 2 or cur.shape[1] != feat:
            link.reason = (f"consumer {ev.name!r} (Linear, in_features={feat}) does not take the {channels} "
                           "channels as contiguous groups of a flattened input")
            return link
        link.group = feat // channels
    link.consumer, link.consumer_event = ev.name, ev.index
    return link


def trace_links(model: nn.Module, example_inputs: Any, names: Iterable[str],
                events: Sequence[Event] | None = None) -> dict[str, Link]:
    """``Link`` for each prunable module in ``names`` (executed exactly once on ``example_inputs``)."""
    events = trace_events(model, example_inputs) if events is None else events
    calls: dict[str, list[int]] = {}
    for ev in events:
        if ev.kind == "module" and isinstance(ev.module, PRUNABLE):
            calls.setdefault(ev.name, []).append(ev.index)
    out = {}
    for name in names:
        idx = calls.get(name, [])
        if len(idx) != 1:
            out[name] = Link(producer=name, event=-1, feature=-1,
                             reason=f"{name!r} runs {len(idx)} times in one forward pass; expected once")
            continue
        out[name] = _follow(events, idx[0], name)
    return out
