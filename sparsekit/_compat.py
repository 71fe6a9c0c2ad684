"""Stand-ins for torch APIs newer than the oldest torch sparsekit supports (2.4).

``nn.Module.set_submodule`` and ``TreeSpec.child`` first shipped in torch 2.5 / 2.6; sparsekit calls these
instead so that a model can be sparsified, compacted and loaded on torch 2.4 too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["set_submodule", "treespec_child"]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule of ``root`` at the dotted path ``name`` (``root.set_submodule(name, module)``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty dotted module path, got {name!r}")
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def treespec_child(spec: Any, index: int) -> Any:
    """The ``index``-th child of a pytree TreeSpec (``spec.child(index)``; ``children_specs`` before torch 2.6)."""
    return spec.child(index) if hasattr(spec, "child") else spec.children_specs[index]
