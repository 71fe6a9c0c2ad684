"""Transposed BSR metadata for dx = dy @ W (kernels/k_bsr_mm_t.py), computed on the device with torch ops.

``bsr_transpose_meta(crow, col, n_block_rows, n_block_cols) -> (t_crow, t_row, t_perm)``:
the pattern of W^T in CSR-of-blocks form, without moving any values:

    t_crow int32 [n_block_cols + 1]   stored blocks of block-column c are t_perm[t_crow[c]:t_crow[c+1]]
    t_row  int32 [nnzb]               block-row of each of them (ascending within a block-column)
    t_perm int32 [nnzb]               index of the block in values (values[t_perm[j]] is block j of W^T, untransposed)

No host synchronisation: repeat_interleave gets output_size, the counts come from a scatter_add into a
fixed-size tensor (bincount would sync on CUDA to find its length) and the sort is a device sort.

The sparse pattern of a layer is fixed during training, so ``cached_transpose_meta`` memoises the result
per index tensors (keyed on data_ptr, version counter, shape and device, and checked against weak
references, so a freed tensor whose memory is reused, or an in-place edit of the indices, recomputes);
not while a CUDA graph is being captured (then it computes without the cache).
This module imports torch only.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import Tensor

__all__ = ["bsr_transpose_meta", "cached_transpose_meta", "block_rows", "clear_cache"]

_CACHE_SIZE = 256
_cache: OrderedDict[tuple, tuple] = OrderedDict()


def block_rows(crow: Tensor, nnzb: int) -> Tensor:
    """int32 [nnzb]: the block-row of every stored block (device op, no sync)."""
    n_rows = crow.numel() - 1
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(n_rows, device=crow.device, dtype=torch.int32), counts,
                                   output_size=nnzb)


def bsr_transpose_meta(crow: Tensor, col: Tensor, n_block_rows: int, n_block_cols: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(t_crow, t_row, t_perm) of W^T for a BSR pattern (crow [n_block_rows + 1], col [nnzb]); see the module doc."""
    if crow.dim() != 1 or crow.numel() != n_block_rows + 1:
        raise ValueError(f"crow must be 1-D with n_block_rows + 1 = {n_block_rows + 1} entries, "
                         f"got shape {tuple(crow.shape)}")
    if col.dim() != 1:
        raise ValueError(f"col must be 1-D, got shape {tuple(col.shape)}")
    nnzb = col.numel()
    device = col.device
    rows = block_rows(crow, nnzb).long()
    col64 = col.long()
    # block-rows ascend within each block-row's run already; a stable sort by column keeps them ascending
    key = col64 * max(n_block_rows, 1) + rows
    perm = torch.sort(key, stable=True).indices
    counts = torch.zeros(n_block_cols, dtype=torch.int64, device=device)
    counts.scatter_add_(0, col64, torch.ones_like(col64))
    t_crow = torch.zeros(n_block_cols + 1, dtype=torch.int32, device=device)
    t_crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return t_crow, rows[perm].to(torch.int32).contiguous(), perm.to(torch.int32).contiguous()


def _key(t: Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), str(t.device))


def _capturing(t: Tensor) -> bool:
    """Whether ops on ``t`` are being recorded into a CUDA graph (torch.cuda.graph capture) rather than run."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def cached_transpose_meta(crow: Tensor, col: Tensor, n_block_rows: int, n_block_cols: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """``bsr_transpose_meta`` memoised per (crow, col) tensors: a training loop with a fixed block pattern
    computes it once, not every backward. Falls back to computing when the tensors are fakes/traced, and while a
    CUDA graph is captured (the graph then recomputes it on every replay)."""
    if _capturing(crow):
        # captured ops are recorded, not run: cached, these tensors would reach later eager calls uninitialised.
        # Nor is a cached entry used: the graph would keep reading its memory after an eviction freed it.
        return bsr_transpose_meta(crow, col, n_block_rows, n_block_cols)
    try:
        key = (_key(crow), _key(col), int(n_block_rows), int(n_block_cols))
    except (RuntimeError, NotImplementedError):   # fake / functional tensors have no real data_ptr
        return bsr_transpose_meta(crow, col, n_block_rows, n_block_cols)
    hit = _cache.get(key)
    if hit is not None:
        crow_ref, col_ref, meta = hit
        c, k = crow_ref(), col_ref()
        if c is not None and k is not None and c.data_ptr() == key[0][0] and k.data_ptr() == key[1][0]:
            _cache.move_to_end(key)
            return meta
        del _cache[key]
    meta = bsr_transpose_meta(crow, col, n_block_rows, n_block_cols)
    try:
        _cache[key] = (weakref.ref(crow), weakref.ref(col), meta)
    except TypeError:   # not weak-referenceable: do not cache
        return meta
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return meta


def clear_cache() -> None:
    _cache.clear()
