"""What a sparse layer shows as ``.weight``: the stock layer's weight, read-only, without a dense copy.

Model code often reads a layer's weight for its metadata only: Hugging Face's ViT, DeiT, Dinov2 and CLIP cast their
pixels to ``patch_embeddings.projection.weight.dtype``, T5's feed-forward compares its activations' dtype with
``wo.weight.dtype``. A ``SparseLinear`` / ``SparseConv*`` has no dense weight, so such models failed once
sparsified. ``DenseWeightView`` answers those reads from the stored values (``shape`` is the stock layer's weight
shape, ``dtype``, ``device``, ``requires_grad``) and builds the dense weight only when it is computed with: a
torch function given the view (``F.linear(x, layer.weight)``) or a tensor method (``layer.weight.abs()``) runs on
a fresh dense copy (zeros where nothing is stored; gradients reach the stored values). Writing through it would
write into that copy and be lost, so in-place methods, ``out=`` and ``.data`` raise: change a sparse layer's
``values``, or ``to_dense()`` it.

It is not a ``torch.Tensor`` (``isinstance`` is False): code that takes another path for tensors-or-not (T5 casts
only when ``wo.weight`` is a Tensor) takes the not-a-tensor one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = ["DenseWeightView"]


def _in_place(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _holds_view(tree: Any) -> bool:
    return any(isinstance(leaf, DenseWeightView) for leaf in pytree.tree_leaves(tree))


class DenseWeightView:
    """A sparse layer's weight as the stock layer would hold it, materialised only when used (module doc)."""

    __slots__ = ("_layer",)

    def __init__(self, layer: nn.Module) -> None:
        if not (isinstance(layer, nn.Module) and hasattr(layer, "stored_weight")):
            raise TypeError("layer must be a sparsekit sparse layer (SparseLinear, SparseConv*, SparseConvTranspose*), "
                            f"got {type(layer).__name__}")
        self._layer = layer

    # ---- metadata: read from the stored values, no dense copy
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._layer.stock_weight_shape())

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.stored_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._layer.stored_weight().device

    @property
    def requires_grad(self) -> bool:
        return self._layer.stored_weight().requires_grad

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    # ---- computing with it: a fresh dense copy
    def dense(self) -> Tensor:
        """The dense weight (a new tensor each call; differentiable with respect to the stored values)."""
        w = self._layer.dense_stock_weight()
        return w.clone() if self._layer.format == "dense" else w     # (never the stored Parameter itself)

    def requires_grad_(self, requires_grad: bool = True) -> DenseWeightView:
        """Freeze or unfreeze the stored values (what the layer trains), as on a dense weight."""
        self._layer.stored_weight().requires_grad_(requires_grad)
        return self

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        # (reading the view into another tensor, x.add_(view) or out=buf, is fine)
        if (_in_place(name) and args and isinstance(args[0], DenseWeightView)) or _holds_view(kwargs.get("out")):
            raise TypeError(f"{name} would write into the dense view of a sparse layer's weight, a temporary copy: "
                            "change the layer's values, or convert it with to_dense() first")
        args, kwargs = pytree.tree_map(lambda a: a.dense() if isinstance(a, DenseWeightView) else a, (args, kwargs))
        return func(*args, **kwargs)

    # Python looks operators up on the class, past __getattr__: each runs on a dense copy
    def __getitem__(self, index: Any) -> Tensor:
        return self.dense()[index]

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Any:
        return iter(self.dense())

    def __neg__(self) -> Tensor:
        return -self.dense()

    def __getattr__(self, name: str) -> Any:
        if name == "data" or _in_place(name):
            raise TypeError(f"{type(self._layer).__name__}.weight.{name}: the weight is a read-only dense view of "
                            "the sparse values (writes would go to a temporary copy); change the layer's values, or "
                            "convert it with to_dense() first")
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dense(), name)

    def __repr__(self) -> str:
        return (f"DenseWeightView(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"of a {type(self._layer).__name__} with format={self._layer.format!r})")


def _on_dense(op: str) -> Any:
    def method(self: DenseWeightView, other: Any) -> Tensor:
        return getattr(self.dense(), op)(other)

    method.__name__ = op
    return method


for _op in ("add", "sub", "mul", "truediv", "matmul", "pow"):      # arithmetic either way round, on a dense copy
    for _name in (f"__{_op}__", f"__r{_op}__"):
        setattr(DenseWeightView, _name, _on_dense(_name))
