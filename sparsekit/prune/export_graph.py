"""torch.export fallback for the dependency graph's tracing (``graph.DependencyGraph.build``).

When ``torch.fx`` symbolic tracing fails (``range(x.shape[0])``, ``len(x)``, other Python on traced values),
the model is exported with ``torch.export.export`` (non-strict) on the example inputs, with the call
signature of every outermost leaf module (``graph.is_leaf_module``) preserved. The exported ATen graph is
then rebuilt as the module-level fx graph that fx tracing would have given, so the same grouping rules run
on it:

* the ATen nodes one call of a leaf module made (their ``nn_module_stack`` metadata names it, ``@k`` for
  its k-th call) become one ``call_module`` node taking the call's recorded args and kwargs (tensors and
  constants, from the preserved signature); the outputs used later are ``getitem`` nodes of it;
* every other ATen op stays a ``call_function`` node (the rules match it by its op name: ``aten.add.Tensor``
  is ``add``, ``aten.slice.Tensor`` is ``slice``); ops returning nothing (asserts) are dropped;
* parameters, buffers and lifted constants read outside leaf modules become ``get_attr`` nodes (untracked
  tensors, as in the fx graph).

``export_failure`` describes why an export failed: the innermost module of the model whose ``forward`` was
running and the source line of the failing op.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import operator
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import ConstantArgument, InputKind, TensorArgument
from torch.utils import _pytree as pytree

from .._compat import treespec_child

__all__ = ["export_trace", "export_failure"]


def outer_leaves(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> list[str]:
    """Paths of the leaf modules not inside another leaf module (the root itself is traced through)."""
    out: list[str] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod._modules.items():      # every name of a module registered twice: calls use either
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if is_leaf(child):
                out.append(path)
            else:
                walk(child, path)

    walk(model, "")
    return list(dict.fromkeys(out))


def export_trace(model: nn.Module, args: tuple, kwargs: dict,
                 is_leaf: Callable[[nn.Module], bool]) -> tuple[fx.GraphModule, tuple]:
    """Module-level fx graph of ``model`` from ``torch.export`` and the flat inputs to run it with."""
    leaves = outer_leaves(model, is_leaf)
    # a failing export logs and prints its partial graph; the GraphError built from the exception says why
    logs = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch.export")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False,
                                     preserve_module_call_signature=tuple(leaves))
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    in_spec = ep.module_call_graph[0].signature.in_spec
    order = treespec_child(in_spec, 1).context if in_spec is not None else list(kwargs)
    flat = pytree.tree_leaves((tuple(args), {k: kwargs[k] for k in order}))
    return _rebuild(model, ep, set(leaves)), tuple(flat)


def _leaf_call(n: fx.Node, leaves: set[str]) -> tuple[str, str] | None:
    """``(module path, call id)`` of the outermost leaf module whose call made ATen node ``n``."""
    for key, val in (n.meta.get("nn_module_stack") or {}).items():
        path = val[0] if isinstance(val, tuple) else ""
        if path in leaves:
            head, _, idx = key.rpartition("@")
            return path, (f"{path}@{idx}" if head and idx.isdigit() else path)
    return None


def _paths(spec: pytree.TreeSpec) -> list[tuple]:
    """Access path (keys / indices) of every leaf of a pytree spec, in flattening order."""
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    out: dict[int, tuple] = {}

    def walk(t: Any, path: tuple) -> None:
        if isinstance(t, (tuple, list)):
            for i, x in enumerate(t):
                walk(x, path + (i,))
        elif isinstance(t, dict):
            for k, x in t.items():
                walk(x, path + (k,))
        elif isinstance(t, int):
            out[t] = path

    walk(tree, ())
    return [out.get(i, ()) for i in range(spec.num_leaves)]


def _rebuild(model: nn.Module, ep: Any, leaves: set[str]) -> fx.GraphModule:
    sigs = {e.fqn: e.signature for e in ep.module_call_graph if e.fqn and e.signature is not None}
    canonical = {id(m): name for name, m in model.named_modules()}     # the names the graph's members use
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    graph = fx.Graph()
    root: dict[str, Any] = {}
    env: dict[str, Any] = {}
    owner: dict[str, str] = {}          # exported node name -> the leaf call it was made in
    done: set[str] = set()

    def lookup(name: str) -> Any:
        if name in env:
            return env[name]
        spec = specs.get(name)
        if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = ep.state_dict.get(spec.target) if spec.target in ep.state_dict else ep.constants[spec.target]
            root[name] = value
            env[name] = graph.get_attr(name)
            return env[name]
        where = f" inside the call of {owner[name]!r}" if name in owner else ""
        raise RuntimeError(f"exported value {name!r} computed{where} is used outside it (not a declared output)")

    def arg(a: Any) -> Any:
        return fx.map_arg(a, lambda x: lookup(x.name))

    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if specs[n.name].kind == InputKind.USER_INPUT:
                env[n.name] = graph.placeholder(n.name)
            continue
        if n.op == "output":
            graph.output(arg(n.args[0]))
            continue
        call = _leaf_call(n, leaves) if n.op == "call_function" else None
        if call is not None and call[1] in sigs:
            owner[n.name] = call[1]
            if call[1] not in done:
                done.add(call[1])
                mod = model.get_submodule(call[0])
                _emit_call(graph, canonical[id(mod)], sigs[call[1]], lookup, env)
                root[canonical[id(mod)]] = mod
            continue
        if n.op == "call_function" and n.meta.get("val", 0) is None:
            continue      # runtime asserts and other ops returning nothing
        if n.op == "get_attr":
            root[n.target] = getattr(ep.graph_module, n.target)
            env[n.name] = graph.get_attr(n.target)
            continue
        env[n.name] = graph.call_function(n.target, arg(n.args), arg(n.kwargs))
    return fx.GraphModule(root, graph)


def _emit_call(graph: fx.Graph, path: str, sig: Any, lookup: Callable[[str], Any], env: dict[str, Any]) -> None:
    """One ``call_module`` node for a leaf call; its tensor outputs are mapped to ``getitem`` nodes of it."""
    values = []
    for a in sig.inputs:
        if isinstance(a, ConstantArgument):
            values.append(a.value)
        elif isinstance(a, TensorArgument):
            values.append(lookup(a.name))
        else:
            raise RuntimeError(f"the call of {path!r} takes {type(a).__name__} {a!r}: not supported")
    args, kwargs = pytree.tree_unflatten(values, sig.in_spec)
    node = graph.call_module(path, tuple(args), dict(kwargs))
    paths = _paths(sig.out_spec)
    for out, path_ in zip(sig.outputs, paths):
        if not isinstance(out, TensorArgument) or out.name in env:
            continue      # a constant, or an input returned as it is
        cur = node
        for key in path_:
            cur = graph.call_function(operator.getitem, (cur, key))
        env[out.name] = cur


def export_failure(model: nn.Module, e: BaseException) -> str:
    """``in module 'name', op `line` (file:line) failed with Type: message`` for an export error."""
    names = {id(m): name for name, m in model.named_modules()}
    where, op = None, "?"
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        fname = frame.f_code.co_filename
        if "/torch/" in fname or fname.endswith(("graph.py", "export_graph.py")):
            continue
        self_ = frame.f_locals.get("self")
        if isinstance(self_, nn.Module) and id(self_) in names:
            where = names[id(self_)] or type(model).__name__
        line = linecache.getline(fname, lineno).strip()
        op = f"`{line}` ({fname.rsplit('/', 1)[-1]}:{lineno})"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"in module {(where or type(model).__name__)!r}, op {op} failed with {type(e).__name__}: {msg}"
