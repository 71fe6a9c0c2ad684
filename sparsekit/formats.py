"""Sparse weight formats: small dataclasses of plain tensors.

Every format describes a 2-D weight W of logical shape [N, K] (out_features x in_features; for a conv,
[C_out, C_in/groups * kh * kw]). Formats are data, not behaviour: each one can be turned into a flat
``dict[str, Tensor]`` (``state_dict()``) and back (``from_state_dict``), so it goes into a module's state_dict
and through safetensors without pickling.

    BSR           block-sparse rows: only the nonzero (bn x bk) blocks are stored
    CSR           compressed sparse rows: only the nonzero elements are stored
    NM            n:m semi-structured: n kept values in every group of m along K, with their positions
    ChannelIndex  whole rows (output channels) or columns (input channels) removed: a compact dense block

``from_dense`` builds a valid object. One built from its arrays directly must keep the invariants each class
lists (indices in range, sorted and unique within a row, NM positions strictly ascending in a group):
``validate()`` checks them, in O(nnz), so the ops do not on every call. The kernels assume them: a repeated or
unsorted index gives wrong results on some paths (the CUDA tensor-core kernels drop a repeat that the others
add), so call ``validate()`` once on such an object before use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["BSR", "CSR", "NM", "ChannelIndex", "FORMATS"]

MAX_BLOCK = 128
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- checks
def _check_weight(weight: object, name: str = "weight") -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K] (out_features x in_features), got shape {tuple(weight.shape)}; "
                         "flatten a conv weight with weight.reshape(weight.shape[0], -1)")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float64/float16/bfloat16), got {weight.dtype}")
    if weight.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {weight.layout}")
    return weight


def _divisors(n: int, limit: int = MAX_BLOCK) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _normalize_block(block: object, shape: tuple[int, int]) -> tuple[int, int]:
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
        raise TypeError(f"block must be an int or a pair of ints (rows, cols), got {block!r}")
    bn, bk = int(block[0]), int(block[1])
    if not (1 <= bn <= MAX_BLOCK and 1 <= bk <= MAX_BLOCK):
        raise ValueError(f"block must have both sides in [1, {MAX_BLOCK}], got {(bn, bk)}")
    n, k = shape
    if n % bn or k % bk:
        bad = []
        if n % bn:
            bad.append(f"N={n} is not a multiple of {bn} (block rows that fit: {_divisors(n)[-6:]})")
        if k % bk:
            bad.append(f"K={k} is not a multiple of {bk} (block cols that fit: {_divisors(k)[-6:]})")
        raise ValueError(f"block {(bn, bk)} does not divide the weight of shape {(n, k)}: " + "; ".join(bad)
                         + ". Remedy: choose a block that divides both dims, or pad the weight with zero "
                           "rows/columns to a multiple of the block before converting (sparsekit never pads "
                           "silently).")
    return bn, bk


def _check_index(t: Tensor, name: str, dtypes: tuple[torch.dtype, ...], dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    _check_contiguous(t, name)


def _check_contiguous(t: Tensor, name: str) -> None:
    # the C++/CUDA kernels read every format tensor as one dense run of memory
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}; "
                         f"pass {name}.contiguous()")


def _check_shape(shape: object) -> tuple[int, int]:
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise ValueError(f"shape must be a pair of ints (N, K), got {shape!r}")
    if min(shape) < 0:
        raise ValueError(f"shape must be non-negative, got {shape!r}")
    return shape  # type: ignore[return-value]


def _check_crow(crow: Tensor, rows: int, nnz: int, name: str = "crow_indices") -> None:
    _check_index(crow, name, (torch.int32,), 1)
    if crow.numel() != rows + 1:
        raise ValueError(f"{name} must have {rows + 1} entries, got {crow.numel()}")
    if crow.numel() and (int(crow[0]) != 0 or int(crow[-1]) != nnz):
        raise ValueError(f"{name} must start at 0 and end at nnz={nnz}, got {int(crow[0])}..{int(crow[-1])}")
    if rows and bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")


def _check_cols_sorted(crow: Tensor, col: Tensor, ncols: int, name: str = "col_indices") -> None:
    if col.numel() == 0:
        return
    c = col.long()
    if int(c.min()) < 0 or int(c.max()) >= ncols:
        raise ValueError(f"{name} must lie in [0, {ncols}), got range [{int(c.min())}, {int(c.max())}]")
    # strictly increasing inside each row: a decrease is only allowed where a new row starts
    dec = torch.nonzero(c[1:] <= c[:-1]).flatten() + 1
    if dec.numel():
        starts = set(crow.long().tolist())
        if any(int(i) not in starts for i in dec):
            raise ValueError(f"{name} must be strictly increasing within each row (sorted, no duplicates)")


_OPTIONAL_TENSOR = "Tensor | None"   # the annotation of a tensor field that may be absent (CSR.bitmap)


class _Format:
    """Shared plumbing for the dataclass formats: state_dict round trip, .to(), byte counts."""

    shape: tuple[int, int]
    # per-call state the op faces keep on a format object (not a dataclass field): ops/linear.py's _RepeatCall
    # holds an op handle, which cannot be pickled; pickle, torch.save and copy.deepcopy leave it out and the
    # copy's first call makes its own
    _TRANSIENT = ("_repeat_call",)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    @classmethod
    def _tensor_fields(cls) -> list[str]:
        """Every tensor field, optional ones (``Tensor | None``, e.g. CSR.bitmap) included."""
        return [f.name for f in fields(cls) if f.name != "shape" and f.type in ("Tensor", Tensor, _OPTIONAL_TENSOR)]

    def _present_tensors(self) -> list[str]:
        """The tensor fields that hold a tensor (an optional one may be None)."""
        return [name for name in self._tensor_fields() if getattr(self, name) is not None]

    @property
    def values_tensor(self) -> Tensor:
        return self.values  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        return self.values_tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.values_tensor.device

    @property
    def nbytes(self) -> int:
        """Bytes held by every tensor of the format (values and indices)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self._present_tensors())

    @property
    def density(self) -> float:
        """Stored elements / N*K (explicit zeros inside stored blocks count as stored)."""
        n, k = self.shape
        return self.nnz / (n * k) if n * k else 0.0

    @property
    def nnz(self) -> int:
        return self.values_tensor.numel()

    def to(self, device: torch.device | str | int | torch.dtype | None = None, dtype: torch.dtype | None = None):
        """Move to a device and/or cast the values (indices keep their integer dtype).

        Like ``Tensor.to``, a dtype may also come first: ``fmt.to(torch.float16)``."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"to() got a dtype as its first argument ({device}) and dtype={dtype}; pass one")
            device, dtype = None, device
        if device is not None and (isinstance(device, bool) or not isinstance(device, (torch.device, str, int))):
            raise TypeError(f"device must be a torch.device, str, int or None (or a dtype as the first argument), "
                            f"got {type(device).__name__} {device!r}")
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        kw = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            if t is None:
                kw[name] = None
            elif name == "values":
                kw[name] = t.to(device=device, dtype=dtype)
            else:
                kw[name] = t.to(device=device)
        return type(self)(shape=self.shape, **{**self._extra_fields(), **kw})

    def _extra_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "shape" and f.name not in self._tensor_fields()}

    def state_dict(self) -> dict[str, Tensor]:
        """Flat dict of tensors (shape and integer parameters stored as int64 tensors)."""
        d = {name: getattr(self, name) for name in self._present_tensors()}
        d["shape"] = torch.tensor(self.shape, dtype=torch.int64)
        for name, v in self._extra_fields().items():
            d[name] = torch.tensor(v, dtype=torch.int64)
        return d

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]):
        """Rebuild from ``state_dict()`` output and validate."""
        optional = {f.name for f in fields(cls) if f.type == _OPTIONAL_TENSOR}
        missing = [f.name for f in fields(cls) if f.name not in state and f.name not in optional]
        if missing:
            raise ValueError(f"state is missing {missing} for {cls.__name__}; got keys {sorted(state)}")
        kw = {}
        for f in fields(cls):
            v = state.get(f.name)
            if v is None:
                kw[f.name] = None
            elif f.name == "shape":
                kw[f.name] = tuple(int(s) for s in v.tolist())
            elif f.name in cls._tensor_fields():
                kw[f.name] = v.contiguous()   # validate() and the kernels need dense runs; a saved view may not be
            else:
                kw[f.name] = int(v)
        obj = cls(**kw)
        obj.validate()
        return obj

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._extra_fields().items())
        extra = f", {extra}" if extra else ""
        return (f"{type(self).__name__}(shape={self.shape}{extra}, nnz={self.nnz}, density={self.density:.3f}, "
                f"dtype={self.dtype}, device={self.device})")


# ------------------------------------------------------------------------------------------------- BSR
@dataclass(repr=False, eq=False)
class BSR(_Format):
    """Block-sparse rows. Block (bn, bk) is any shape up to 128x128 that divides [N, K], rectangular too.

    values       [nnzb, bn, bk]   the stored blocks, row-major inside a block
    crow_indices int32 [N/bn + 1] block-row pointers
    col_indices  int32 [nnzb]     block-column index of each stored block, sorted and unique within a block-row
    """

    values: Tensor
    crow_indices: Tensor
    col_indices: Tensor
    shape: tuple[int, int]

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @property
    def block_density(self) -> float:
        """Fraction of blocks stored."""
        bn, bk = self.block
        total = (self.shape[0] // bn) * (self.shape[1] // bk)
        return self.nnzb / total if total else 0.0

    @classmethod
    def from_dense(cls, weight: Tensor, block: int | tuple[int, int] = (32, 32)) -> BSR:
        """Keep every (bn x bk) block of ``weight`` that has a nonzero."""
        weight = _check_weight(weight)
        n, k = weight.shape
        bn, bk = _normalize_block(block, (n, k))
        blocks = weight.detach().reshape(n // bn, bn, k // bk, bk).transpose(1, 2)  # [R, C, bn, bk]
        keep = blocks.ne(0).any(dim=-1).any(dim=-1)                                 # [R, C]
        rows, cols = keep.nonzero(as_tuple=True)                                    # row-major order
        if rows.numel() >= 2**31:    # crow_indices are int32 (tiny blocks on a multi-billion-element weight)
            raise ValueError(f"weight has {rows.numel()} nonzero {bn}x{bk} blocks; BSR supports at most 2**31 - 1: "
                             "use a larger block")
        values = blocks[rows, cols].contiguous()
        counts = keep.sum(dim=1)
        crow = torch.zeros(n // bn + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = counts.cumsum(0)
        return cls(values=values, crow_indices=crow, col_indices=cols.to(torch.int32).contiguous(), shape=(n, k))

    def to_dense(self) -> Tensor:
        """The dense [N, K] weight (differentiable w.r.t. values). A block stored twice counts twice (summed, as
        the kernels and torch's uncoalesced sparse tensors do)."""
        n, k = self.shape
        bn, bk = self.block
        rows = _row_of_each_entry(self.crow_indices, self.nnzb)
        dense = self.values.new_zeros(n // bn, k // bk, bn, bk)
        dense = dense.index_put((rows, self.col_indices.long()), self.values, accumulate=True)
        return dense.transpose(1, 2).reshape(n, k)

    def validate(self) -> BSR:
        """Check every invariant; raises ValueError/TypeError naming the field. Returns self."""
        _check_shape(self.shape)
        if not isinstance(self.values, Tensor) or self.values.dim() != 3:
            raise ValueError("values must be a 3-D tensor [nnzb, bn, bk], got "
                             f"{getattr(self.values, 'shape', type(self.values).__name__)}")
        if self.values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be floating, got {self.values.dtype}")
        _check_contiguous(self.values, "values")
        bn, bk = _normalize_block(self.block, self.shape)
        _check_crow(self.crow_indices, self.shape[0] // bn, self.nnzb)
        _check_index(self.col_indices, "col_indices", (torch.int32,), 1)
        if self.col_indices.numel() != self.nnzb:
            raise ValueError(f"col_indices has {self.col_indices.numel()} entries, values has {self.nnzb} blocks")
        _check_cols_sorted(self.crow_indices, self.col_indices, self.shape[1] // bk)
        _check_same_device(self)
        return self


# ------------------------------------------------------------------------------------------------- CSR
def _csr_col_dtype(k: int) -> torch.dtype:
    # 16-bit column indices halve the index bytes whenever K fits
    return torch.int16 if k <= 2**15 else torch.int32


@dataclass(repr=False, eq=False)
class CSR(_Format):
    """Compressed sparse rows of the nonzero elements.

    values       [nnz]
    crow_indices int32 [N + 1]
    col_indices  int16 [nnz] when K <= 32768, else int32; sorted and unique within each row
    bitmap       optional uint8 [N, 8 * ceil(K / 64)]: bit k % 8 of byte k / 8 of row r is set iff W[r, k] is
                 stored. It lets the CPU kernel for skinny inputs (decoding, a few rows of x) expand each row's
                 values into dense vectors instead of gathering x by col_indices (``sparsekit::csr_bitmap_mm``);
                 K / 8 bytes per row (3% of the fp32 weight). ``from_dense(..., bitmap=True)`` or ``with_bitmap()``.
    """

    values: Tensor
    crow_indices: Tensor
    col_indices: Tensor
    shape: tuple[int, int]
    bitmap: Tensor | None = None

    @classmethod
    def from_dense(cls, weight: Tensor, bitmap: bool = False) -> CSR:
        """Keep every nonzero element of ``weight`` (with ``bitmap=True`` also the pattern's bitmap)."""
        weight = _check_weight(weight)
        if not isinstance(bitmap, bool):
            raise TypeError(f"bitmap must be a bool, got {type(bitmap).__name__}")
        n, k = weight.shape
        w = weight.detach()
        mask = w.ne(0)
        rows, cols = mask.nonzero(as_tuple=True)
        if rows.numel() >= 2**31:
            raise ValueError(f"weight has {rows.numel()} nonzeros; CSR supports at most 2**31 - 1")
        crow = torch.zeros(n + 1, dtype=torch.int32, device=w.device)
        crow[1:] = mask.sum(dim=1).cumsum(0)
        cols = cols.to(_csr_col_dtype(k)).contiguous()
        return cls(values=w[rows, cols.long()].contiguous(), crow_indices=crow, col_indices=cols, shape=(n, k),
                   bitmap=bitmap_from_indices(crow, cols, n, k) if bitmap else None)

    def with_bitmap(self) -> CSR:
        """The same CSR (sharing its tensors) carrying the bitmap of its pattern."""
        return CSR(values=self.values, crow_indices=self.crow_indices, col_indices=self.col_indices,
                   shape=self.shape, bitmap=bitmap_from_indices(self.crow_indices, self.col_indices, *self.shape))

    def without_bitmap(self) -> CSR:
        """The same CSR (sharing its tensors) without a bitmap."""
        return CSR(values=self.values, crow_indices=self.crow_indices, col_indices=self.col_indices, shape=self.shape)

    def to_dense(self) -> Tensor:
        """The dense [N, K] weight; an entry stored twice counts twice (summed, as the kernels do)."""
        n, k = self.shape
        rows = _row_of_each_entry(self.crow_indices, self.nnz)
        dense = self.values.new_zeros(n, k)
        return dense.index_put((rows, self.col_indices.long()), self.values, accumulate=True)

    def validate(self) -> CSR:
        _check_shape(self.shape)
        if not isinstance(self.values, Tensor) or self.values.dim() != 1:
            raise ValueError("values must be a 1-D tensor [nnz]")
        if self.values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be floating, got {self.values.dtype}")
        _check_contiguous(self.values, "values")
        _check_crow(self.crow_indices, self.shape[0], self.nnz)
        _check_index(self.col_indices, "col_indices", (torch.int16, torch.int32), 1)
        if self.col_indices.numel() != self.nnz:
            raise ValueError(f"col_indices has {self.col_indices.numel()} entries, values has {self.nnz}")
        if self.col_indices.dtype == torch.int16 and self.shape[1] > 2**15:
            raise ValueError(f"int16 col_indices cannot address K={self.shape[1]} columns; use int32")
        _check_cols_sorted(self.crow_indices, self.col_indices, self.shape[1])
        if self.bitmap is not None:
            n, k = self.shape
            _check_index(self.bitmap, "bitmap", (torch.uint8,), 2)
            if tuple(self.bitmap.shape) != bitmap_shape(n, k):
                raise ValueError(f"bitmap must have shape {bitmap_shape(n, k)} ([N, 8 * ceil(K / 64)]), got "
                                 f"{tuple(self.bitmap.shape)}")
            if self.bitmap.device == self.crow_indices.device and not torch.equal(
                    self.bitmap, bitmap_from_indices(self.crow_indices, self.col_indices, n, k)):
                raise ValueError("bitmap does not match crow_indices / col_indices (or sets bits past K): rebuild "
                                 "it with with_bitmap()")
        _check_same_device(self)
        return self


def bitmap_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of a CSR bitmap for a weight [n, k]: each row padded to whole 64-bit words."""
    return n, 8 * ((k + 63) // 64)


def pack_bitmap(mask: Tensor) -> Tensor:
    """bool [N, K] -> uint8 [N, 8 * ceil(K / 64)], bit k % 8 of byte k / 8 set iff mask[:, k] (little-endian)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask must be a 2-D bool tensor [N, K], got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    n, k = mask.shape
    width = bitmap_shape(n, k)[1] * 8
    bits = torch.zeros(n, width, dtype=torch.uint8, device=mask.device)
    bits[:, :k] = mask.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits.view(n, width // 8, 8) * weights).sum(-1, dtype=torch.uint8).contiguous()


def bitmap_from_indices(crow: Tensor, col: Tensor, n: int, k: int) -> Tensor:
    """The bitmap of a CSR pattern from its indices, in O(nnz) (no [N, K] mask): pack_bitmap(pattern)."""
    _check_index(crow, "crow", (torch.int32, torch.int64), 1)
    _check_index(col, "col", (torch.int16, torch.int32, torch.int64), 1)
    if crow.numel() != n + 1 or int(crow[-1]) != col.numel():
        raise ValueError(f"crow must have n + 1 = {n + 1} entries ending at col.numel() = {col.numel()}, got "
                         f"{crow.numel()} entries" + (f" ending at {int(crow[-1])}" if crow.numel() else ""))
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= k):
        raise ValueError(f"col must lie in [0, k={k}), got range [{int(col.min())}, {int(col.max())}]")
    width = bitmap_shape(n, k)[1]
    itype = torch.int32 if n * width < 2**31 else torch.int64     # 9 bytes of temporaries per entry, not 24
    counts = (crow[1:] - crow[:-1]).to(itype)
    byte = torch.repeat_interleave(torch.arange(n, dtype=itype, device=col.device), counts, output_size=col.numel())
    # the kernels give a row's k-th stored value to its k-th set bit: the values must be in column order
    unsorted = (byte[1:] == byte[:-1]) & (col[1:] <= col[:-1])
    if bool(unsorted.any()):
        at = int(unsorted.nonzero()[0, 0])
        raise ValueError(f"col must be strictly increasing within each row for a bitmap (values are matched to its "
                         f"bits in column order), got column {int(col[at + 1])} after {int(col[at])} in row "
                         f"{int(byte[at])}; sort each row's columns (and values) first")
    byte.mul_(width).add_(col.to(itype).div(8, rounding_mode="floor"))
    bits = torch.ones(col.numel(), dtype=torch.uint8, device=col.device).bitwise_left_shift_(
        col.remainder(8).to(torch.uint8))
    # the bits of one byte are distinct columns: their sum is their OR
    return torch.zeros(n * width, dtype=torch.uint8, device=col.device).index_add_(0, byte, bits).reshape(n, width)


def unpack_bitmap(bitmap: Tensor, k: int) -> Tensor:
    """uint8 [N, B] -> bool [N, k]: the inverse of pack_bitmap."""
    _check_index(bitmap, "bitmap", (torch.uint8,), 2)
    if not isinstance(k, int) or not 0 <= k <= 8 * bitmap.shape[1]:
        raise ValueError(f"k must be an int in [0, {8 * bitmap.shape[1]}] (the bitmap's bits per row), got {k!r}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    bits = bitmap.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1).bool()
    return bits.reshape(bitmap.shape[0], bitmap.shape[1] * 8)[:, :k]


# -------------------------------------------------------------------------------------------------- NM
def _check_nm(n: object, m: object) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if not (1 <= m <= 256):  # type: ignore[operator]
        raise ValueError(f"m must be in [1, 256], got {m}")
    if not (1 <= n < m):  # type: ignore[operator]
        raise ValueError(f"n must satisfy 1 <= n < m (n:m keeps n of every m), got n={n}, m={m}")
    return int(n), int(m)  # type: ignore[arg-type]


@dataclass(repr=False, eq=False)
class NM(_Format):
    """n:m semi-structured sparsity along K: in every group of m consecutive inputs at most n are nonzero.

    values  [N, K/m*n]        the kept values, groups in order, positions strictly ascending inside a group
    indices uint8 [N, K/m*n]  position (0..m-1) of each kept value inside its group
    """

    values: Tensor
    indices: Tensor
    shape: tuple[int, int]
    n: int
    m: int

    @staticmethod
    def prune(weight: Tensor, n: int, m: int) -> Tensor:
        """Return a copy of ``weight`` keeping the n largest-magnitude values of every m along K."""
        weight = _check_weight(weight)
        n, m = _check_nm(n, m)
        rows, k = weight.shape
        _check_k_multiple(k, m)
        groups = weight.detach().reshape(rows, k // m, m)
        top = groups.abs().topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return (groups * mask).reshape(rows, k).to(weight.dtype)

    @classmethod
    def from_dense(cls, weight: Tensor, n: int = 2, m: int = 4) -> NM:
        """Compress an n:m-sparse ``weight``; raises ValueError if a group has more than n nonzeros."""
        weight = _check_weight(weight)
        n, m = _check_nm(n, m)
        rows, k = weight.shape
        _check_k_multiple(k, m)
        groups = weight.detach().reshape(rows, k // m, m)
        nz = groups.ne(0)
        worst = int(nz.sum(-1).max()) if nz.numel() else 0
        if worst > n:
            raise ValueError(f"weight is not {n}:{m} sparse: a group of {m} along K has {worst} nonzeros "
                             f"(at most {n} allowed); make it so with NM.prune(weight, {n}, {m})")
        # take the n positions with the largest "nonzero first, then lowest position" key, then sort them
        pos = torch.arange(m, device=weight.device)
        key = nz.to(torch.int64) * (2 * m) + (m - pos)
        idx = key.topk(n, dim=-1).indices.sort(dim=-1).values
        values = groups.gather(-1, idx).reshape(rows, k // m * n).contiguous()
        return cls(values=values, indices=idx.to(torch.uint8).reshape(rows, k // m * n).contiguous(),
                   shape=(rows, k), n=n, m=m)

    def to_dense(self) -> Tensor:
        rows, k = self.shape
        g = k // self.m
        dense = self.values.new_zeros(rows, g, self.m)
        idx = self.indices.long().reshape(rows, g, self.n)
        # (a position given twice in a group counts twice, as the kernels sum it)
        return dense.scatter_add(-1, idx, self.values.reshape(rows, g, self.n)).reshape(rows, k)

    @property
    def density(self) -> float:
        """Fraction of elements that are nonzero (explicit zeros inside kept slots not counted)."""
        n, k = self.shape
        return int(self.values.ne(0).sum()) / (n * k) if n * k else 0.0

    def validate(self) -> NM:
        n, m = _check_nm(self.n, self.m)
        rows, k = _check_shape(self.shape)
        _check_k_multiple(k, m)
        if not isinstance(self.values, Tensor) or tuple(self.values.shape) != (rows, k // m * n):
            raise ValueError(f"values must have shape {(rows, k // m * n)}, got "
                             f"{getattr(self.values, 'shape', type(self.values).__name__)}")
        if self.values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be floating, got {self.values.dtype}")
        _check_contiguous(self.values, "values")
        _check_index(self.indices, "indices", (torch.uint8,), 2)
        if tuple(self.indices.shape) != tuple(self.values.shape):
            raise ValueError(f"indices shape {tuple(self.indices.shape)} != values shape {tuple(self.values.shape)}")
        idx = self.indices.long().reshape(rows, k // m, n)
        if idx.numel() and (int(idx.max()) >= m):
            raise ValueError(f"indices must lie in [0, {m}), got max {int(idx.max())}")
        if n > 1 and idx.numel() and bool((idx[..., 1:] <= idx[..., :-1]).any()):
            raise ValueError("indices must be strictly increasing inside each group")
        _check_same_device(self)
        return self


def _check_k_multiple(k: int, m: int) -> None:
    if k % m:
        raise ValueError(f"K={k} (weight.shape[1]) is not a multiple of m={m}; n:m groups run along K. "
                         f"Remedy: choose m dividing K or zero-pad the weight's columns to {math.ceil(k / m) * m}")


# ----------------------------------------------------------------------------------------- ChannelIndex
@dataclass(repr=False, eq=False)
class ChannelIndex(_Format):
    """Whole channels removed: ``values`` is the dense weight restricted to the kept rows (dim=0, output
    channels) or kept columns (dim=1, input features), ``indices`` (int64, ascending) says which.

    For dim=0, y = scatter(x @ values^T) into N outputs; for dim=1, y = gather(x, indices) @ values^T.
    """

    values: Tensor
    indices: Tensor
    shape: tuple[int, int]
    dim: int

    @classmethod
    def from_dense(cls, weight: Tensor, dim: int = 0) -> ChannelIndex:
        """Keep the rows (dim=0) or columns (dim=1) of ``weight`` that have a nonzero."""
        weight = _check_weight(weight)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output channels) or 1 (input channels), got {dim!r}")
        w = weight.detach()
        keep = w.ne(0).any(dim=1 - dim).nonzero().flatten()
        values = w.index_select(dim, keep).contiguous()
        return cls(values=values, indices=keep.to(torch.int64).contiguous(), shape=tuple(w.shape), dim=dim)

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.shape)
        return dense.index_copy(self.dim, self.indices, self.values)

    def validate(self) -> ChannelIndex:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim not in (0, 1):
            raise ValueError(f"dim must be 0 or 1, got {self.dim!r}")
        _check_shape(self.shape)
        _check_index(self.indices, "indices", (torch.int64,), 1)
        expect = list(self.shape)
        expect[self.dim] = self.indices.numel()
        if not isinstance(self.values, Tensor) or list(self.values.shape) != expect:
            raise ValueError(f"values must have shape {tuple(expect)}, got "
                             f"{getattr(self.values, 'shape', type(self.values).__name__)}")
        if self.values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be floating, got {self.values.dtype}")
        _check_contiguous(self.values, "values")
        if self.indices.numel():
            if int(self.indices.min()) < 0 or int(self.indices.max()) >= self.shape[self.dim]:
                raise ValueError(f"indices must lie in [0, {self.shape[self.dim]})")
            if bool((self.indices[1:] <= self.indices[:-1]).any()):
                raise ValueError("indices must be strictly increasing")
        _check_same_device(self)
        return self


# ---------------------------------------------------------------------------------------------- shared
def _row_of_each_entry(crow: Tensor, nnz: int) -> Tensor:
    """Row index of every stored entry, from CSR-style row pointers."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts, output_size=nnz)


def _check_same_device(fmt: _Format) -> None:
    devices = {getattr(fmt, f).device for f in fmt._present_tensors()}
    if len(devices) > 1:
        raise ValueError(f"all tensors of a {type(fmt).__name__} must be on one device, "
                         f"got {sorted(map(str, devices))}")


FORMATS = {"bsr": BSR, "csr": CSR, "nm": NM, "channel": ChannelIndex}
