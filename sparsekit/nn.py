"""SparseLinear, SparseConv1d / 2d / 3d and SparseConvTranspose1d / 2d / 3d: drop-in replacements for nn.Linear,
nn.Conv1d / 2d / 3d and nn.ConvTranspose1d / 2d / 3d holding a sparse-format weight.

The format's values are an ``nn.Parameter`` (they train, the pattern stays fixed); its index tensors are
buffers, so ``state_dict()`` holds everything as plain tensors. ``format="dense"`` keeps an ordinary dense weight
(the fallback ``sparsify`` uses when nothing beats dense).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._aliases import module_aliases, replace_modules, shared_weights
from ._compat import set_submodule
from ._stock_layers import overridden_forward
from .formats import BSR, CSR, NM, ChannelIndex, _check_nm, _normalize_block, bitmap_from_indices
from .ops import sparse_conv2d, sparse_conv3d, sparse_linear
from .ops.conv import group_starts
from .ops.conv_transpose import (
    conv_transpose_out_size,
    grouped_weight,
    sparse_conv_transpose2d,
    sparse_conv_transpose3d,
    transposed_weight2d,
)
from .ops.linear import BACKEND_NAMES
from .prune.graph import QKV_PROJ
from .prune.linear_mha import (
    LinearMultiheadAttention,
    attention_children,
    disable_fused_transformer_paths,
    expose_sparse_attention,
    mha_to_linear,
    restore_dense_attention,
)
from .prune.linear_rnn import LinearRecurrent, expose_sparse_recurrent, restore_dense_recurrent, rnn_to_linear
from .prune.module_copy import share_call_hooks, stored_original
from .weight_view import DenseWeightView

FORMAT_NAMES = ("dense", "bsr", "csr", "nm", "channel")
_INDEX_FIELDS = {"bsr": ("crow_indices", "col_indices"), "csr": ("crow_indices", "col_indices"),
                 "nm": ("indices",), "channel": ("indices",), "dense": ()}


def _to_format(weight2d: Tensor, format: str, block, n: int, m: int, bitmap: bool = False):
    if bitmap and format != "csr":
        raise ValueError(f"bitmap=True is a CSR option (format='csr'), got format={format!r}")
    if format == "bsr":
        return BSR.from_dense(weight2d, block=block)
    if format == "csr":
        return CSR.from_dense(weight2d, bitmap=bitmap)
    if format == "nm":
        return NM.from_dense(weight2d, n=n, m=m)
    if format == "channel":
        return ChannelIndex.from_dense(weight2d, dim=0)
    return weight2d.detach().clone()


def _trained_weight(mod: nn.Module) -> Tensor:
    """The weight tensor that trains: a sparse layer's values (weight2d for format "dense"), a masked layer's
    stored original (its .weight is recomputed, without grad under torch.no_grad), else .weight."""
    if isinstance(mod, _SparseWeight):
        return mod.weight2d if mod.format == "dense" else mod.values
    if parametrize.is_parametrized(mod, "weight"):
        return stored_original(mod.parametrizations.weight)
    return mod.weight


def _same_trainability(new: nn.Module, src: nn.Module) -> nn.Module:
    """A converted layer trains what its source trained: a frozen weight (or bias) stays frozen, and it is in the
    source's train / eval mode (a fresh module is in training mode, which would flip an eval model's layers). It
    also runs the source's forward (pre-)hooks and backward hooks: it shares their dicts, so a hook's handle
    removes it from both (a pre-hook that rewrites the input would otherwise be dropped silently)."""
    _trained_weight(new).requires_grad_(_trained_weight(src).requires_grad)
    if new.bias is not None and src.bias is not None:
        bias = stored_original(src.parametrizations.bias) if parametrize.is_parametrized(src, "bias") else src.bias
        new.bias.requires_grad_(bias.requires_grad)
    new.train(src.training)
    share_call_hooks(new, src)
    return new


def _autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype torch.autocast runs nn.Linear / nn.Conv* in for input ``x``, or None outside autocast (or for an
    input autocast leaves alone: not floating, or float64)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    try:
        if not torch.is_autocast_enabled(x.device.type):
            return None
        return torch.get_autocast_dtype(x.device.type)
    except RuntimeError:      # a device type autocast does not know (meta)
        return None


def _check_format(format: object) -> str:
    if format not in FORMAT_NAMES:
        raise ValueError(f"format must be one of {FORMAT_NAMES}, got {format!r}")
    return format  # type: ignore[return-value]


def _check_backend(owner: str, backend: object) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{owner}: backend must be a str or None, got {type(backend).__name__}")
    # a misspelt name would otherwise only fail at the first forward (whether the named backend can run a
    # given call is still the op's check, per call)
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"{owner}: backend must be one of {list(BACKEND_NAMES)} or None, got {backend!r}")


_FORMAT_CLASSES = {"bsr": BSR, "csr": CSR, "nm": NM, "channel": ChannelIndex}


def _check_weight(owner: str, weight: object, format: str) -> None:
    """The constructors' ``weight`` must be the object ``format`` names (else it fails later, deep in a forward or
    an attribute read, far from the mistake)."""
    if format == "dense":
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            got = f"a {weight.dim()}-D Tensor" if isinstance(weight, Tensor) else type(weight).__name__
            raise TypeError(f"{owner}: weight must be a 2-D Tensor for format='dense', got {got}")
        return
    cls = _FORMAT_CLASSES[format]
    if not isinstance(weight, cls):
        raise TypeError(f"{owner}: weight must be a {cls.__name__} for format={format!r}, got "
                        f"{type(weight).__name__}")
    if cls is ChannelIndex and weight.dim != 0:   # the modules keep output rows (dim=0) only
        raise ValueError(f"{owner}: weight must be a ChannelIndex with dim=0 (kept output rows), got dim={weight.dim}")


class _SparseWeight(nn.Module):
    """Holds one weight in a format: values as a Parameter, indices as buffers, metadata as attributes."""

    def _init_weight(self, fmt, format: str, backend: str | None) -> None:
        _check_backend(type(self).__name__, backend)
        _check_weight(type(self).__name__, fmt, format)
        self.format = format
        self.backend = backend
        if format == "dense":
            self.weight2d = nn.Parameter(fmt)
            self.weight_shape = tuple(fmt.shape)
            return
        self.values = nn.Parameter(fmt.values.detach().clone())
        for name in _INDEX_FIELDS[format]:
            self.register_buffer(name, getattr(fmt, name).clone())
        if format == "csr" and fmt.bitmap is not None:   # the skinny-x CPU kernel's index (CSR.bitmap)
            self.register_buffer("bitmap", fmt.bitmap.clone())
        self.weight_shape = tuple(fmt.shape)
        self.nm = (fmt.n, fmt.m) if format == "nm" else None

    def _init_bias(self, bias: object, outputs: int) -> None:
        # (a wrong one would fail only at the first forward)
        if bias is not None and not isinstance(bias, Tensor):
            raise TypeError(f"{type(self).__name__}: bias must be a Tensor or None, got {type(bias).__name__}")
        if bias is not None and tuple(bias.shape) != (outputs,):
            raise ValueError(f"{type(self).__name__}: bias must have shape ({outputs},) (one per output), got "
                             f"{tuple(bias.shape)}")
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def sparse_weight(self) -> BSR | CSR | NM | ChannelIndex | Tensor:
        """The weight as a format object sharing this module's tensors (the dense Parameter for "dense").

        The object is kept while the module holds the same tensor objects (building it is on every forward's
        path); moving, casting or loading into the module gives a fresh one."""
        if self.format == "dense":
            return self.weight2d
        buffers = self._buffers
        tensors = (self._parameters["values"], *(buffers[name] for name in _INDEX_FIELDS[self.format]),
                   buffers.get("bitmap"))
        cached = self.__dict__.get("_format_cache")
        if cached is not None and cached[0] == tuple(map(id, tensors)):
            return cached[1]
        fmt = self._build_format()
        if not torch.compiler.is_compiling():
            self.__dict__["_format_cache"] = (tuple(map(id, tensors)), fmt)
        return fmt

    def _autocast(self, x: Tensor, w: BSR | CSR | NM | ChannelIndex | Tensor,
                  bias: Tensor | None) -> tuple[Tensor, BSR | CSR | NM | ChannelIndex | Tensor, Tensor | None]:
        """x, the weight and the bias as torch.autocast casts them for nn.Linear / nn.Conv*: into its dtype (a
        dense layer before hands on activations in it, and the sparse ops never cast silently). The casts are
        differentiable: gradients reach the full-precision values. Unchanged outside autocast."""
        dt = _autocast_dtype(x)
        if dt is None:
            return x, w, bias
        # (autocast casts every floating argument but a float64 one)
        cast = lambda t: t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        if isinstance(w, Tensor):
            w = cast(w)
        elif w.dtype not in (dt, torch.float64):
            w = self._build_format(self.values.to(dt))    # (the same indices; torch.compile traces it)
        return cast(x), w, cast(bias)

    def __getstate__(self) -> dict:
        # the cached format is keyed by tensor ids, which mean nothing in the copy (and it may hold the op faces'
        # per-call state): pickle, torch.save and deepcopy leave it out; the copy builds its own
        state = super().__getstate__()
        state.pop("_format_cache", None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A CSR layer's bitmap is derived from its indices: whether the layer keeps one is the layer's own setting,
        # a state with or without one loads either way, and a kept one is rebuilt from the indices just loaded (a
        # bitmap that disagreed with them would be read by the forward while the backward reads col_indices).
        bitmap = self._buffers.pop("bitmap", None) if self.format == "csr" else None
        errors_before = len(error_msgs)
        # a state of another pattern fails on the tensors whose shapes differ (values, col_indices) but copies
        # those of the same shape (crow_indices): the layer's own indices come back then, so that it stays
        # consistent (else a grouped conv's offsets, rebuilt next, and every later forward read a mixed pattern)
        indices = {name: self._buffers[name].clone() for name in _INDEX_FIELDS[self.format]}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            if bitmap is not None:
                self._buffers["bitmap"] = bitmap
        if len(error_msgs) > errors_before:
            self._buffers.update(indices)
        if self.format != "csr":
            return
        unexpected_keys[:] = [k for k in unexpected_keys if k != prefix + "bitmap"]
        crow, col = self._buffers["crow_indices"], self._buffers["col_indices"]
        # (a state of another nnz fails to load its col_indices / values: load_state_dict reports that; the indices
        # left may then disagree, and no bitmap is built from them)
        if bitmap is not None and len(error_msgs) == errors_before and not (crow.is_meta or col.is_meta) \
                and int(crow[-1]) == col.numel():
            self._buffers["bitmap"] = bitmap_from_indices(crow, col, *self.weight_shape)

    def _build_format(self, values: Tensor | None = None) -> BSR | CSR | NM | ChannelIndex:
        """The format of this module's tensors (with ``values`` instead of its own: a cast of them)."""
        values = self.values if values is None else values
        if self.format in ("bsr", "csr"):
            cls = BSR if self.format == "bsr" else CSR
            extra = {"bitmap": self._buffers.get("bitmap")} if cls is CSR else {}
            return cls(values=values, crow_indices=self.crow_indices, col_indices=self.col_indices,
                       shape=self.weight_shape, **extra)
        if self.format == "nm":
            return NM(values=values, indices=self.indices, shape=self.weight_shape, n=self.nm[0], m=self.nm[1])
        return ChannelIndex(values=values, indices=self.indices, shape=self.weight_shape, dim=0)

    def dense_weight2d(self) -> Tensor:
        w = self.sparse_weight()
        return w if isinstance(w, Tensor) else w.to_dense()

    def stored_weight(self) -> Tensor:
        """The Parameter holding the weight's values (the dense one for format "dense")."""
        return self.values if self.format != "dense" else self.weight2d

    def stock_weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight of the layer this one replaces (``nn.Linear``: ``[out, in]``)."""
        raise NotImplementedError

    def dense_stock_weight(self) -> Tensor:
        """A new dense tensor holding what the replaced layer's weight would (zeros where nothing is stored)."""
        raise NotImplementedError

    @property
    def weight(self) -> DenseWeightView:
        """The replaced layer's weight as a read-only view: shape, dtype and device without a dense copy; computing
        with it builds one (sparsekit.weight_view)."""
        return DenseWeightView(self)

    @property
    def density(self) -> float:
        w = self.sparse_weight()
        if isinstance(w, Tensor):
            return float(w.ne(0).float().mean()) if w.numel() else 0.0
        return w.density

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight (values + indices)."""
        w = self.sparse_weight()
        return w.numel() * w.element_size() if isinstance(w, Tensor) else w.nbytes

    def _describe(self) -> str:
        w = self.sparse_weight()
        extra = f", block={w.block}" if isinstance(w, BSR) else f", n:m={w.n}:{w.m}" if isinstance(w, NM) \
            else ", bitmap" if isinstance(w, CSR) and w.bitmap is not None else ""
        backend = f", backend={self.backend}" if self.backend else ""
        # (a dense or n:m density counts nonzero values, which meta tensors do not hold)
        p = w if isinstance(w, Tensor) else w.values
        density = "" if p.is_meta and self.format in ("dense", "nm") else f", density={self.density:.3f}"
        return f"format={self.format}{extra}{density}{backend}"


class SparseLinear(_SparseWeight):
    """nn.Linear with a sparse weight: y = x @ W^T + b through sparsekit.ops.

    Its ``.weight`` is a read-only ``DenseWeightView`` (shape, dtype and device of nn.Linear's weight without a
    dense copy; computing with it builds one; sparsekit.weight_view). Placed by hand into an
    ``nn.TransformerEncoderLayer``, it needs nothing more: the view makes torch's fused-path check step aside.
    """

    def __init__(self, weight, bias: Tensor | None, format: str, backend: str | None = None) -> None:
        super().__init__()
        self._init_weight(weight, _check_format(format), backend)
        self.out_features, self.in_features = self.weight_shape
        self._init_bias(bias, self.out_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "bsr", block: int | tuple[int, int] = 32, n: int = 2,
                   m: int = 4, backend: str | None = None, bitmap: bool = False) -> SparseLinear:
        """Convert an nn.Linear (typically pruned). BSR keeps nonzero blocks; CSR nonzero elements; NM requires an
        n:m-sparse weight (see NM.prune); "channel" keeps the nonzero output rows; "dense" keeps it dense.
        ``bitmap=True`` (CSR only) adds the pattern's bitmap, which the CPU kernel reads for inputs of up to 8
        rows (token-by-token decoding) instead of gathering x by column index: faster there (CSR.bitmap)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if not isinstance(bitmap, bool):
            raise TypeError(f"bitmap must be a bool, got {type(bitmap).__name__}")
        fmt = _to_format(linear.weight.detach(), _check_format(format), block, n, m, bitmap)
        return _same_trainability(cls(fmt, linear.bias, format, backend), linear)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(*self._autocast(x, self.sparse_weight(), self.bias), self.backend)

    def stock_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def dense_stock_weight(self) -> Tensor:
        return self.dense_weight2d()

    def to_dense(self) -> nn.Linear:
        """An ordinary nn.Linear with the same weight (zeros where nothing is stored)."""
        p = self.stored_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=p.device,
                        dtype=p.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_stock_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return _same_trainability(out, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               + self._describe()


def _explicit_padding(conv: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            if (d * (k - 1)) % 2:
                raise ValueError("conv.padding='same' with an even effective kernel pads asymmetrically; "
                                 "not supported (use explicit padding)")
            pads.append(d * (k - 1) // 2)
        return tuple(pads)  # type: ignore[return-value]
    return tuple(conv.padding)  # type: ignore[return-value]


def _stock_kernel(layer: nn.Module) -> tuple[int, ...]:
    """A sparse conv's kernel as the layer it replaces has it: a 1-D one keeps its 1 x k view as ``(1, k)``."""
    return layer.kernel_size[1:] if layer._SPATIAL == 1 else layer.kernel_size


def _spatial(cls: type, v: object, fill: int) -> object:
    """An int geometry argument as one entry per spatial dim, as nn.Conv2d takes it (a 1-D class's geometry is its
    1 x k view: ``(fill, v)``); anything else as given."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (fill, v) if cls._SPATIAL == 1 else (v,) * cls._SPATIAL
    return v


def _check_kernel_size(owner: str, kernel_size: object) -> tuple[int, ...]:
    if not isinstance(kernel_size, (tuple, list)) or not kernel_size \
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in kernel_size):
        raise TypeError(f"{owner}: kernel_size must be an int or a tuple of ints (one per spatial dim), got "
                        f"{kernel_size!r}")
    if min(kernel_size) < 1:
        raise ValueError(f"{owner}: kernel_size must be positive, got {tuple(kernel_size)}")
    return tuple(kernel_size)


class SparseConv2d(_SparseWeight):
    """nn.Conv2d with a sparse weight over [C_out, C_in/groups*kh*kw] (sparsekit.ops.sparse_conv2d)."""

    _SPATIAL = 2   # spatial dims an int geometry argument stands for (SparseConv3d: 3; SparseConv1d: its 1 x k view)

    def __init__(self, weight, bias: Tensor | None, format: str, in_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...] | None = None, padding: tuple[int, ...] | None = None,
                 dilation: tuple[int, ...] | None = None, groups: int = 1, backend: str | None = None) -> None:
        """Geometry as tuples of one entry per spatial dim of ``kernel_size`` (stride and dilation default to 1,
        padding to 0); an int stands for every dim, as nn.Conv2d takes it."""
        super().__init__()
        owner = type(self).__name__
        if format == "channel" and groups != 1:   # (sparse_conv2d has no grouped ChannelIndex path)
            raise ValueError(f"format='channel' needs groups=1 (a conv of kept output channels), got groups={groups}; "
                             "use bsr / csr / dense for a grouped conv")
        self._init_weight(weight, _check_format(format), backend)
        self.out_channels = self.weight_shape[0]
        # (a wrong geometry would otherwise fail only at the first forward, in the op)
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"{owner}: in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
                or in_channels % groups or self.out_channels % groups:
            raise ValueError(f"{owner}: groups must be a positive int dividing C_in = {in_channels} and C_out = "
                             f"{self.out_channels}, got {groups!r}")
        kernel_size = _check_kernel_size(owner, _spatial(type(self), kernel_size, 1))
        stride, padding, dilation = (_spatial(type(self), v, fill) for v, fill in ((stride, 1), (padding, 0),
                                                                                    (dilation, 1)))
        nd = len(kernel_size)
        for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
            if v is not None and len(v) != nd:
                raise ValueError(f"{name} must have {nd} entries like kernel_size {kernel_size}, got {v}")
        taps = 1
        for k in kernel_size:
            taps *= k
        if self.weight_shape[1] != in_channels // groups * taps:
            raise ValueError(f"{owner}: weight must have C_in / groups * taps = {in_channels // groups * taps} "
                             f"columns (in_channels={in_channels}, groups={groups}, kernel_size={kernel_size}), got "
                             f"{self.weight_shape[1]}")
        self.kernel_size = kernel_size
        self.stride = tuple(stride) if stride is not None else (1,) * nd
        self.padding = tuple(padding) if padding is not None else (0,) * nd
        self.dilation, self.groups = (tuple(dilation) if dilation is not None else (1,) * nd), groups
        self._init_bias(bias, self.out_channels)
        self._update_group_starts()

    def _update_group_starts(self) -> None:
        """Per-group entry offsets of a grouped BSR/CSR weight as Python ints, read now (eager), so that a trace
        (torch.export, torch.compile) splits the groups without reading tensor data (see ops/conv.py)."""
        self._group_starts = None
        self.__dict__.pop("_format_cache", None)   # it holds the previous offsets
        unit = self.values.shape[1] if self.format == "bsr" else 1   # (not a multiple: the forward says so)
        if self.groups > 1 and self.format in ("bsr", "csr") and not self.crow_indices.is_meta \
                and (self.out_channels // self.groups) % unit == 0:
            self._group_starts = group_starts(self._build_format(), self.groups)

    def _build_format(self, values: Tensor | None = None) -> BSR | CSR | NM | ChannelIndex:
        fmt = super()._build_format(values)
        if getattr(self, "_group_starts", None) is not None:
            fmt.__dict__["_group_starts"] = (self.groups, self._group_starts)
        return fmt

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._update_group_starts()   # a loaded pattern may split differently between the groups

    _DENSE: type[nn.Module] = nn.Conv2d   # the layer from_dense converts (SparseConv3d: nn.Conv3d)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, format: str = "bsr", block: int | tuple[int, int] = 32, n: int = 2,
                   m: int = 4, backend: str | None = None) -> SparseConv2d:
        """Convert an nn.Conv2d (SparseConv3d: nn.Conv3d); the weight is viewed as [C_out, C_in/groups*kh*kw]
        ([C_out, C_in/groups*kd*kh*kw]) for the format."""
        if not isinstance(conv, cls._DENSE):
            raise TypeError(f"conv must be an nn.{cls._DENSE.__name__}, got {type(conv).__name__}")
        padding = _explicit_padding(conv)
        w2d = conv.weight.detach().reshape(conv.out_channels, -1)
        fmt = _to_format(w2d, _check_format(format), block, n, m)
        return _same_trainability(cls(fmt, conv.bias, format, conv.in_channels, conv.kernel_size, conv.stride,
                                      padding, conv.dilation, conv.groups, backend), conv)

    def forward(self, x: Tensor) -> Tensor:
        # unbatched [C, H, W] as nn.Conv2d takes it (the sparse ops want a batch); SparseConv1d passes [N, C, 1, L]
        # here and SparseConv3d checks its own input
        if len(self.kernel_size) == 2 and isinstance(x, Tensor):
            if x.dim() not in (3, 4):
                raise ValueError(f"x must be [N, C, H, W] or unbatched [C, H, W], got shape {tuple(x.shape)}")
            if x.dim() == 3:
                return SparseConv2d.forward(self, x.unsqueeze(0)).squeeze(0)
        x, w, bias = self._autocast(x, self.sparse_weight(), self.bias)
        three_d = len(self.kernel_size) == 3
        if isinstance(w, Tensor):  # dense fallback: torch's own conv (oneDNN / cuDNN)
            weight = w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            conv = F.conv3d if three_d else F.conv2d
            return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        sparse_conv = sparse_conv3d if three_d else sparse_conv2d
        return sparse_conv(x, w, bias, self.stride, self.padding, self.dilation, self.groups,
                           kernel_size=self.kernel_size, backend=self.backend)

    def stock_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *_stock_kernel(self))

    def dense_stock_weight(self) -> Tensor:
        return self.dense_weight2d().reshape(self.stock_weight_shape())

    def to_dense(self) -> nn.Conv2d | nn.Conv3d:
        p = self.stored_weight()
        conv = nn.Conv3d if len(self.kernel_size) == 3 else nn.Conv2d
        out = conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                   self.groups, bias=self.bias is not None, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_stock_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return _same_trainability(out, self)

    def extra_repr(self) -> str:
        # (as nn.Conv2d: dilation only when it is not 1)
        dilation = f"dilation={self.dilation}, " if any(d != 1 for d in self.dilation) else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {dilation}groups={self.groups}, bias={self.bias is not None}, "
                + self._describe())


class SparseConv1d(SparseConv2d):
    """nn.Conv1d with a sparse weight over [C_out, C_in/groups*k]: the same kernels as SparseConv2d, run on the
    input viewed as [N, C, 1, L] with a 1 x k kernel. Its geometry attributes are those 2-D ones
    (``kernel_size == (1, k)``, ``stride == (1, s)`` ...); inputs and outputs are Conv1d's ([N, C, L] or [C, L])."""

    _SPATIAL = 1

    @classmethod
    def from_dense(cls, conv: nn.Conv1d, format: str = "bsr", block: int | tuple[int, int] = 32, n: int = 2,
                   m: int = 4, backend: str | None = None) -> SparseConv1d:
        """Convert an nn.Conv1d; the weight is viewed as [C_out, C_in/groups*k] for the format."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"conv must be an nn.Conv1d, got {type(conv).__name__}")
        (padding,) = _explicit_padding(conv)
        w2d = conv.weight.detach().reshape(conv.out_channels, -1)
        fmt = _to_format(w2d, _check_format(format), block, n, m)
        return _same_trainability(cls(fmt, conv.bias, format, conv.in_channels, (1, conv.kernel_size[0]),
                                      (1, conv.stride[0]), (0, padding), (1, conv.dilation[0]), conv.groups, backend),
                                  conv)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"x must be [N, C, L] or unbatched [C, L], got shape {tuple(x.shape)}")
        if x.dim() == 2:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x.unsqueeze(2)).squeeze(2)

    def to_dense(self) -> nn.Conv1d:
        p = self.stored_weight()
        out = nn.Conv1d(self.in_channels, self.out_channels, self.kernel_size[1], self.stride[1], self.padding[1],
                        self.dilation[1], self.groups, bias=self.bias is not None, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_stock_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return _same_trainability(out, self)


class SparseConv3d(SparseConv2d):
    """nn.Conv3d with a sparse weight over [C_out, C_in/groups*kd*kh*kw] (sparsekit.ops.sparse_conv3d); its
    geometry attributes are 3-tuples, its inputs Conv3d's ([N, C, D, H, W] or unbatched [C, D, H, W])."""

    _DENSE = nn.Conv3d
    _SPATIAL = 3

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be [N, C, D, H, W] or unbatched [C, D, H, W], got shape {tuple(x.shape)}")
        if x.dim() == 4:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)


def _spatial_output_size(output_size: object, nd: int, x_dims: int) -> tuple[int, ...]:
    """The ``nd`` spatial sizes of an ``output_size`` given as nn.ConvTranspose*d.forward takes it: those alone,
    or the whole output shape (``x_dims`` entries)."""
    ok = isinstance(output_size, (tuple, list, torch.Size)) and len(output_size) in (nd, x_dims) \
        and all(isinstance(v, int) and not isinstance(v, bool) for v in output_size)
    if not ok:
        raise ValueError(f"output_size must be the {nd} spatial size(s) or the whole {x_dims}-D output shape, got "
                         f"{output_size!r}")
    return tuple(output_size[-nd:])


class SparseConvTranspose2d(_SparseWeight):
    """nn.ConvTranspose2d with a sparse weight over ``[C_out*kh*kw, C_in]`` (its weight ``[C_in, C_out, kh, kw]``
    as ``ops.conv_transpose.transposed_weight2d``; ``sparsekit.ops.sparse_conv_transpose2d``). A grouped one
    stores the equal ungrouped weight (zero between the groups, which its format must not store: its blocks or
    n:m groups lie within a group's channels)."""

    _DENSE: type[nn.Module] = nn.ConvTranspose2d
    _SPATIAL = 2   # spatial dims an int geometry argument stands for (3d: 3; 1d: its 1 x k view)

    def __init__(self, weight, bias: Tensor | None, format: str, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...] | None = None, padding: tuple[int, ...] | None = None,
                 output_padding: tuple[int, ...] | None = None, dilation: tuple[int, ...] | None = None,
                 backend: str | None = None, groups: int = 1) -> None:
        """Geometry as tuples of one entry per spatial dim of ``kernel_size``; an int stands for every dim, as
        nn.ConvTranspose2d takes it."""
        super().__init__()
        self._init_weight(weight, _check_format(format), backend)
        kernel_size = _check_kernel_size(type(self).__name__, _spatial(type(self), kernel_size, 1))
        stride, padding, output_padding, dilation = (_spatial(type(self), v, fill) for v, fill in (
            (stride, 1), (padding, 0), (output_padding, 0), (dilation, 1)))
        nd, taps = len(kernel_size), 1
        for k in kernel_size:
            taps *= k
        if self.weight_shape[0] % taps:
            raise ValueError(f"weight has {self.weight_shape[0]} rows, not C_out * {taps} kernel taps")
        for name, v in (("stride", stride), ("padding", padding), ("output_padding", output_padding),
                        ("dilation", dilation)):
            if v is not None and len(v) != nd:
                raise ValueError(f"{name} must have {nd} entries like kernel_size {kernel_size}, got {v}")
        self.in_channels, self.out_channels = self.weight_shape[1], self.weight_shape[0] // taps
        self.kernel_size = kernel_size
        self.stride = tuple(stride) if stride is not None else (1,) * nd
        self.padding = tuple(padding) if padding is not None else (0,) * nd
        self.output_padding = tuple(output_padding) if output_padding is not None else (0,) * nd
        self.dilation = tuple(dilation) if dilation is not None else (1,) * nd
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
                or self.in_channels % groups or self.out_channels % groups:
            raise ValueError(f"groups must be a positive int dividing C_in = {self.in_channels} and C_out = "
                             f"{self.out_channels}, got {groups!r}")
        self.groups = groups
        if groups > 1:
            self._check_within_groups(taps)
        self._init_bias(bias, self.out_channels)

    def _check_within_groups(self, taps: int) -> None:
        """A grouped layer's format stores nothing between its groups: a stored zero there would train."""
        w = self.sparse_weight()
        if isinstance(w, Tensor) or w.values.is_meta:
            return      # dense: the groups' blocks are read out of it (forward, to_dense); meta: nothing to read
        stored = dataclasses.replace(w, values=torch.ones_like(w.values)).to_dense() != 0
        rows = torch.arange(stored.shape[0], device=stored.device) // (taps * (self.out_channels // self.groups))
        cols = torch.arange(stored.shape[1], device=stored.device) // (self.in_channels // self.groups)
        if bool((stored & (rows[:, None] != cols[None, :])).any()):
            raise ValueError(f"weight: a {self.format} layout of this grouped transposed conv (groups={self.groups}) "
                             f"stores entries between its groups; choose blocks (or n:m groups) within a group: "
                             f"dividing C_in / groups = {self.in_channels // self.groups} columns and C_out / groups "
                             f"* taps = {self.out_channels // self.groups * taps} rows")

    @classmethod
    def _geometry(cls, conv: nn.Module) -> dict:
        return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
                "output_padding": conv.output_padding, "dilation": conv.dilation, "groups": conv.groups}

    @classmethod
    def from_dense(cls, conv: nn.ConvTranspose2d, format: str = "bsr", block: int | tuple[int, int] = 32,
                   n: int = 2, m: int = 4, backend: str | None = None) -> SparseConvTranspose2d:
        """Convert an nn.ConvTranspose2d (1d / 3d for the other classes); its weight is viewed as
        ``[C_out*prod(kernel), C_in]`` for the format (n:m and blocks run along C_in; a grouped conv's as the
        equal ungrouped weight, whose blocks or n:m groups must lie within a group)."""
        if not isinstance(conv, cls._DENSE):
            raise TypeError(f"conv must be an nn.{cls._DENSE.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        fmt = _to_format(transposed_weight2d(conv.weight.detach(), conv.groups), _check_format(format), block, n, m)
        return _same_trainability(cls(fmt, conv.bias, format, backend=backend, **cls._geometry(conv)), conv)

    def _conv_args(self, output_padding: tuple[int, ...] | None = None) -> tuple:
        return self.stride, self.padding, self.output_padding if output_padding is None else output_padding, \
            self.dilation

    def _output_padding(self, x: Tensor, output_size: object) -> tuple[int, ...]:
        """The output_padding giving ``output_size`` (the spatial sizes; already checked), as
        nn.ConvTranspose2d.forward(x, output_size) takes it: at most stride - 1 beyond the smallest output."""
        nd = len(self.kernel_size)
        sizes = [int(v) for v in output_size][-nd:]
        least = conv_transpose_out_size(tuple(x.shape[-nd:]), self.kernel_size, self.stride, self.padding,
                                        (0,) * nd, self.dilation)
        pad = tuple(o - lo for o, lo in zip(sizes, least))
        if any(not 0 <= p < s for p, s in zip(pad, self.stride)):
            raise ValueError(f"output_size {tuple(sizes)} must be between {least} and "
                             f"{tuple(lo + s - 1 for lo, s in zip(least, self.stride))} for input "
                             f"{tuple(x.shape[-nd:])}")
        return pad

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        nd = len(self.kernel_size)
        if x.dim() not in (nd + 1, nd + 2):
            dims = ", ".join(("D", "H", "W")[3 - nd:])
            raise ValueError(f"x must be [N, C, {dims}] or unbatched [C, {dims}], got shape {tuple(x.shape)}")
        if output_size is not None:
            output_size = _spatial_output_size(output_size, nd, x.dim())
        if x.dim() == nd + 1:
            return self.forward(x.unsqueeze(0), output_size).squeeze(0)
        args = self._conv_args(None if output_size is None else self._output_padding(x, output_size))
        x, w, bias = self._autocast(x, self.sparse_weight(), self.bias)
        three_d = nd == 3
        if isinstance(w, Tensor):  # dense fallback: torch's own transposed conv
            weight = w.reshape(self.out_channels, *self.kernel_size, self.in_channels).movedim(-1, 0)
            if self.groups > 1:
                weight = grouped_weight(weight, self.groups)
            conv = F.conv_transpose3d if three_d else F.conv_transpose2d
            stride, padding, output_padding, dilation = args
            return conv(x, weight, bias, stride, padding, output_padding, self.groups, dilation)
        op = sparse_conv_transpose3d if three_d else sparse_conv_transpose2d
        return op(x, w, bias, *args, kernel_size=self.kernel_size, backend=self.backend)

    def _dense_twin(self) -> nn.Module:
        p = self.stored_weight()
        stride, padding, output_padding, dilation = self._conv_args()
        return self._DENSE(self.in_channels, self.out_channels, self.kernel_size, stride, padding, output_padding,
                           self.groups, self.bias is not None, dilation, device=p.device, dtype=p.dtype)

    def stock_weight_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.out_channels // self.groups, *_stock_kernel(self))

    def dense_stock_weight(self) -> Tensor:
        w = self.dense_weight2d().reshape(self.out_channels, *self.kernel_size, self.in_channels).movedim(-1, 0)
        if self.groups > 1:
            w = grouped_weight(w, self.groups)
        return w.reshape(self.stock_weight_shape())

    def to_dense(self) -> nn.Module:
        """An ordinary nn.ConvTranspose2d (1d / 3d) with the same weight (zeros where nothing is stored)."""
        out = self._dense_twin()
        with torch.no_grad():
            out.weight.copy_(self.dense_stock_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return _same_trainability(out, self)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                + (f"groups={self.groups}, " if self.groups > 1 else "") + f"bias={self.bias is not None}, "
                + self._describe())


class SparseConvTranspose1d(SparseConvTranspose2d):
    """nn.ConvTranspose1d with a sparse weight over ``[C_out*k, C_in]``: the 2-D kernels on a 1 x k view (its
    geometry attributes are Conv2d-style pairs, ``(1, k)``); inputs and outputs are ConvTranspose1d's."""

    _DENSE = nn.ConvTranspose1d
    _SPATIAL = 1

    @classmethod
    def _geometry(cls, conv: nn.Module) -> dict:
        return {"kernel_size": (1, conv.kernel_size[0]), "stride": (1, conv.stride[0]), "padding": (0, conv.padding[0]),
                "output_padding": (0, conv.output_padding[0]), "dilation": (1, conv.dilation[0]), "groups": conv.groups}

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"x must be [N, C, L] or unbatched [C, L], got shape {tuple(x.shape)}")
        length = None if output_size is None else _spatial_output_size(output_size, 1, x.dim())[0]
        if x.dim() == 2:
            return self.forward(x.unsqueeze(0), None if length is None else [length]).squeeze(0)
        return super().forward(x.unsqueeze(2), None if length is None else (1, length)).squeeze(2)

    def _dense_twin(self) -> nn.Module:
        p = self.stored_weight()
        return nn.ConvTranspose1d(self.in_channels, self.out_channels, self.kernel_size[1], self.stride[1],
                                  self.padding[1], self.output_padding[1], self.groups, self.bias is not None,
                                  self.dilation[1], device=p.device, dtype=p.dtype)


class SparseConvTranspose3d(SparseConvTranspose2d):
    """nn.ConvTranspose3d with a sparse weight over ``[C_out*kd*kh*kw, C_in]`` (``sparse_conv_transpose3d``)."""

    _DENSE = nn.ConvTranspose3d
    _SPATIAL = 3


_SPARSE_TWINS = ((nn.Linear, SparseLinear), (nn.Conv1d, SparseConv1d), (nn.Conv2d, SparseConv2d),
                 (nn.Conv3d, SparseConv3d), (nn.ConvTranspose1d, SparseConvTranspose1d),
                 (nn.ConvTranspose2d, SparseConvTranspose2d), (nn.ConvTranspose3d, SparseConvTranspose3d))
SPARSE_MODULES = (SparseLinear, SparseConv2d, SparseConvTranspose2d)   # every Sparse* class derives from one
SPARSE_LAYERS = tuple(dense for dense, _ in _SPARSE_TWINS)   # what the Sparse* modules replace


def sparse_class(mod: nn.Module) -> type[_SparseWeight]:
    """The Sparse* module that replaces ``mod`` (an nn.Linear, nn.Conv1d / 2d / 3d or nn.ConvTranspose1d / 2d / 3d)."""
    for dense, sparse in _SPARSE_TWINS:
        if isinstance(mod, dense):
            return sparse
    raise TypeError(f"mod must be an nn.Linear, nn.Conv1d / 2d / 3d or nn.ConvTranspose1d / 2d / 3d, got "
                    f"{type(mod).__name__}")


def convert_modules(model: nn.Module, format: str = "bsr", block: int | tuple[int, int] = 32, n: int = 2,
                    m: int = 4, backend: str | None = None, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace (in place) every nn.Linear / nn.Conv1d / 2d / 3d / nn.ConvTranspose1d / 2d / 3d whose weight has zeros
    by its Sparse* twin in one format.

    Layers with no zeros, or whose shape the format cannot take (a block that does not divide, K not a multiple
    of m), stay dense and are listed in the returned model's ``sparsekit_skipped`` attribute with the reason.
    An ``nn.MultiheadAttention`` whose projections have zeros becomes a ``LinearMultiheadAttention`` (its q / k /
    v projections as Linear children, converted or skipped like any other; the stock module stays when none of
    the four converts), and an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` whose weights have zeros a
    ``LinearRecurrent`` (the same, for its weight matrices; unlike ``sparsify``, nothing checks that the
    converted module is faster than the stock one). ``sparsekit.sparsify`` (measured per-layer choice) is the
    smarter sibling of this function.

    A layer registered under several names (``nn.ModuleList([layer] * 3)``) is one layer: every name gets the same
    sparse module (a name in ``skip`` keeps it dense under all of them). A layer whose weight Parameter another
    layer or embedding also holds (tied weights) stays dense: a sparse copy would untie them; so does a subclass
    that overrides the layer's forward (its own computation would be lost). A converted layer keeps its hooks,
    train / eval mode and frozen (requires_grad=False) tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, SPARSE_LAYERS):      # (the root is never replaced: the conversion is in place)
        raise ValueError(f"model must contain the layers to convert, got a bare {type(model).__name__}; wrap it "
                         f"(nn.Sequential(layer)) or convert it with {sparse_class(model).__name__}.from_dense(layer)")
    _check_format(format)
    _check_backend("convert_modules", backend)   # (else every layer's from_dense refused it: all listed as skipped)
    # the format's own arguments, once (else each layer's from_dense refused them: all listed as skipped)
    if format == "bsr":
        _normalize_block(block, (0, 0))      # (its type and range; whether it divides a weight is per layer)
    if format == "nm":
        _check_nm(n, m)
    if isinstance(skip, (str, bytes)) or not isinstance(skip, Iterable):
        raise TypeError(f"skip must be a tuple or list of module names, got {type(skip).__name__} {skip!r}"
                        + (f"; for one name pass ({skip!r},)" if isinstance(skip, str) else ""))
    skip = tuple(skip)
    skipped: dict[str, str] = {}
    # attention projections with zeros become nn.Linear children (LinearMultiheadAttention); the stock module
    # comes back where none of them converts
    exposed = expose_sparse_attention(model)
    exposed_rnn = expose_sparse_recurrent(model)   # (the same for recurrent modules: LinearRecurrent)
    inside_attention = attention_children(model)
    # named_modules() lists a shared module once: swapping only that name would leave its other names dense
    aliases = module_aliases(model)
    tied = shared_weights(model, (*SPARSE_LAYERS, nn.Embedding))   # (tied embeddings / LM heads too)
    for name, mod in list(model.named_modules()):
        # masked (parametrized) layers count too
        names = aliases[id(mod)]
        if not name or any(a in skip for a in names) or not isinstance(mod, SPARSE_LAYERS):
            continue
        custom = overridden_forward(mod)
        if any(a in inside_attention for a in names):
            why = "inside nn.MultiheadAttention, whose projections have no zeros"
        elif custom:
            why = custom
        elif not bool((mod.weight == 0).any()):
            why = "no zeros"
        elif name in tied:
            why = f"weight tied to {', '.join(tied[name])}: kept dense (a sparse copy would untie it)"
        else:
            try:
                new = sparse_class(mod).from_dense(mod, format=format, block=block, n=n, m=m, backend=backend)
            except ValueError as exc:
                why = str(exc).split(". ")[0]
            else:
                for alias in names:
                    set_submodule(model, alias, new)
                continue
        for alias in names:
            skipped[alias] = why
    for name in restore_dense_attention(model, exposed):   # its q / k / v Linears are gone again
        why = [f"{p}: {skipped.pop(f'{name}.{p}')}" for p in QKV_PROJ if f"{name}.{p}" in skipped]
        skipped[f"{name}.in_proj_weight"] = "; ".join(why)
    for name in restore_dense_recurrent(model, exposed_rnn):   # its Linears are gone again: their weights' names
        for child in [k for k in skipped if k.startswith(f"{name}.")]:
            kind, _, suffix = child[len(name) + 1:].partition("_")
            skipped[f"{name}.weight_{kind}_{suffix}"] = skipped.pop(child)
    disable_fused_transformer_paths(model)
    model.sparsekit_skipped = skipped
    return model


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and friends): y = x @ W + b with W [nx, nf], i.e. a Linear with its
    weight transposed. Recognised by name and layout, so transformers need not be importable (older versions keep
    no ``nx``: the weight's first dim is it)."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2
            and w.shape[1] == getattr(mod, "nf", None) and getattr(mod, "nx", w.shape[0]) == w.shape[0])


def _conv1d_as_linear(mod: nn.Module) -> nn.Linear:
    """The nn.Linear computing what HF Conv1D ``mod`` computes, trained, hooked and in the mode it was."""
    w = mod.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    return _same_trainability(lin, mod)


def conv1d_to_linear(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every Hugging Face ``Conv1D`` (GPT-2's attention and MLP projections) by the equivalent
    ``nn.Linear`` (weight transposed, same bias, same outputs, its hooks, train / eval mode and frozen tensors
    kept), so that pruning, compaction and ``sparsify``, which work on nn.Linear / nn.Conv2d, see those layers.
    Returns the converted model (a copy unless ``inplace``). A Conv1D registered under several names becomes one
    Linear under all of them. A saved model loads back into a skeleton converted the same way:
    ``sk.load(path, conv1d_to_linear(GPT2Model(config)))``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _is_hf_conv1d(model):
        raise ValueError("model is itself a Conv1D: convert the model that contains it")
    target = model if inplace else copy.deepcopy(model)
    replace_modules(target, _is_hf_conv1d, _conv1d_as_linear)
    return target


__all__ = ["SparseLinear", "SparseConv1d", "SparseConv2d", "SparseConv3d", "SparseConvTranspose1d",
           "SparseConvTranspose2d", "SparseConvTranspose3d", "SPARSE_LAYERS", "SPARSE_MODULES", "sparse_class",
           "convert_modules", "conv1d_to_linear", "mha_to_linear", "LinearMultiheadAttention", "rnn_to_linear",
           "LinearRecurrent", "DenseWeightView",
           "disable_fused_transformer_paths", "FORMAT_NAMES"]
