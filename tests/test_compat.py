"""sparsekit runs on torch >= 2.4 (pyproject). CI has torch 2.13 only, so the APIs newer than 2.4 that sparsekit
once called directly are routed through sparsekit._compat, and these tests keep it that way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from sparsekit._compat import set_submodule, treespec_child

PACKAGE = Path(__file__).resolve().parents[1] / "sparsekit"


def test_set_submodule_replaces_nested_and_indexed_children():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    set_submodule(model, "1.1", nn.Linear(4, 3))
    set_submodule(model, "0", nn.Identity())
    assert isinstance(model[0], nn.Identity) and model[1][1].out_features == 3
    assert model(torch.randn(2, 4)).shape == (2, 3)
    assert "1.1.weight" in model.state_dict()
    with pytest.raises(ValueError, match="name must be a non-empty dotted module path"):
        set_submodule(model, "", nn.Identity())
    with pytest.raises(AttributeError):
        set_submodule(model, "2.0", nn.Identity())        # no parent "2"


def test_treespec_child_matches_children_specs():
    _, spec = pytree.tree_flatten(((1, 2), {"a": 3, "b": 4}))
    assert treespec_child(spec, 1).context == ["a", "b"]
    assert treespec_child(spec, 0).num_leaves == 2


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_compat.py")


def test_no_direct_calls_of_apis_newer_than_torch_2_4():
    """nn.Module.set_submodule (torch 2.5) and TreeSpec.child (2.6) only through sparsekit._compat."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("set_submodule", "child") \
                    and isinstance(node.ctx, ast.Load):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_custom_op_modules_keep_real_annotations():
    """torch.library.custom_op infers the schema from annotations, and torch 2.4 cannot read string ones, so a
    module defining custom ops must not use `from __future__ import annotations`."""
    for path in _sources():
        source = path.read_text()
        if "custom_op(" not in source:
            continue
        tree = ast.parse(source, str(path))
        future = [a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"
                  for a in n.names]
        assert "annotations" not in future, path
