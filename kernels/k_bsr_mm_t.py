"""BSR backward for the input on Triton: dx = dy @ W, W block-sparse [N, K] in BSR, dy [M, N], dx [M, K].

It walks the pattern of W^T (kernels/_transpose.py: t_crow / t_row / t_perm, computed on the device and
cached per pattern), so it has the forward's structure with the roles of bn and bk swapped: one program
computes dx[m0:m0+BLOCK_M, c*bk:(c+1)*bk] for block-column c by walking the stored blocks of that column
(block-row r = t_row[j], block values[t_perm[j]] of shape [bn, bk]) and accumulating
tl.dot(dy[m0:m0+BLOCK_M, r*bn:(r+1)*bn], block) in fp32. Empty block-columns write zeros. The values are
read in place (no transposed copy of the weights). Programs are grouped (GROUP_M row tiles per block-
column) like the forward. Launch configs: kernels/_configs.bsr_mm_config with (bn, bk) swapped (the output
tile is [BLOCK_M, bk], the reduction step bn). Precision as in k_bsr_mm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._configs import KernelConfig, arch_of, bsr_mm_candidates, bsr_mm_config, interpreting, m_bucket
from ._launch import check_index, check_int, check_runnable, device_ctx, resolve_input_precision
from ._tiles import DYNAMIC_M, grouped_pid
from ._transpose import cached_transpose_meta
from .k_bsr_mm import bsr_row_tile, check_bsr_operands

__all__ = ["bsr_mm_t"]


@triton.jit
def _bsr_mm_t_acc_block(acc, dy_tile_ptrs, mask_m, t_row_ptr, t_perm_ptr, val_ptr, w_offs, j,
                        BN: tl.constexpr, BK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    r = tl.load(t_row_ptr + j)
    b = tl.load(t_perm_ptr + j)
    dy_tile = tl.load(dy_tile_ptrs + r * BN, mask=mask_m[:, None], other=0.0)   # [BLOCK_M, BN]
    blk = tl.load(val_ptr + b.to(tl.int64) * (BN * BK) + w_offs)             # [BN, BK]
    return tl.dot(dy_tile, blk, acc, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=DYNAMIC_M)
def _bsr_mm_t_kernel(
    dy_ptr, t_crow_ptr, t_row_ptr, t_perm_ptr, val_ptr, dx_ptr,
    M, N, K,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr = False,
):
    pid_m, pid_c = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), K // BK, GROUP_M)
    rows, mask_m, offs_n, offs_k = bsr_row_tile(pid_m, M, BLOCK_M, BN, BK)
    dy_tile_ptrs = dy_ptr + rows[:, None] * N + offs_n[None, :]   # [BLOCK_M, BN] at block-row 0
    w_offs = offs_n[:, None] * BK + offs_k[None, :]

    start = tl.load(t_crow_ptr + pid_c)
    end = tl.load(t_crow_ptr + pid_c + 1)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    if WHILE_LOOP:   # interpreter only (triton-lang/triton#9171), see k_bsr_mm
        j = start
        while j < end:
            acc = _bsr_mm_t_acc_block(acc, dy_tile_ptrs, mask_m, t_row_ptr, t_perm_ptr, val_ptr, w_offs, j,
                                      BN, BK, INPUT_PRECISION)
            j += 1
    else:
        for j in range(start, end):
            acc = _bsr_mm_t_acc_block(acc, dy_tile_ptrs, mask_m, t_row_ptr, t_perm_ptr, val_ptr, w_offs, j,
                                      BN, BK, INPUT_PRECISION)
    out_cols = pid_c * BK + offs_k
    tl.store(dx_ptr + rows[:, None] * K + out_cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None])


def bsr_mm_t(dy: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, k: int, *,
             input_precision: str | None = None, meta: tuple[Tensor, Tensor, Tensor] | None = None,
             config: KernelConfig | None = None) -> Tensor:
    """dx = dy @ W for a BSR W of shape [N, k] (N = dy.shape[1]); dx is [M, k] in dy's dtype.

    Same conventions and checks as ``k_bsr_mm.bsr_mm``. ``meta`` = (t_crow, t_row, t_perm) from
    ``kernels._transpose.bsr_transpose_meta``; by default it is computed on the device and cached per
    (crow_indices, col_indices). ``config``: as in bsr_mm (the table's: bsr_mm_config with the block sides
    swapped).
    """
    dy, crow_indices, col_indices, values = check_bsr_operands(dy, "dy", "[M, N]", crow_indices, col_indices,
                                                               values)
    nnzb, bn, bk = (int(s) for s in values.shape)
    k = check_int(k, "k")
    m, n = (int(s) for s in dy.shape)
    if n % bn:
        raise ValueError(f"dy.shape[1]={n} (N) must be a multiple of the block rows bn={bn}")
    if k < 0 or k % bk:
        raise ValueError(f"k={k} must be a non-negative multiple of the block columns bk={bk}")
    check_index(crow_indices, "crow_indices")
    check_index(col_indices, "col_indices")
    if crow_indices.numel() != n // bn + 1:
        raise ValueError(f"crow_indices must have N/bn + 1 = {n // bn + 1} entries, got {crow_indices.numel()}")
    if col_indices.numel() != nnzb:
        raise ValueError(f"col_indices has {col_indices.numel()} entries but values has {nnzb} blocks")
    devices = {t.device for t in (dy, crow_indices, col_indices, values)}
    if len(devices) > 1:
        raise ValueError("dy, crow_indices, col_indices and values must be on one device, got "
                         f"{sorted(map(str, devices))}")
    device = dy.device
    check_runnable(device, "dy is")
    input_precision = resolve_input_precision(dy.dtype, input_precision)

    dx = torch.empty((m, k), dtype=dy.dtype, device=device)
    if m == 0 or k == 0:
        return dx
    if n == 0 or nnzb == 0:
        return dx.zero_()
    if meta is None:
        meta = cached_transpose_meta(crow_indices, col_indices, n // bn, k // bk)
    t_crow, t_row, t_perm = meta
    cfg = config   # output tile [BLOCK_M, bk], reduction step bn: bsr_mm's table with the sides swapped
    if cfg is None:
        cfg = _autotune.pick(
            ("bsr_mm_t", str(device), dy.dtype, bn, bk, m_bucket(m), input_precision),
            bsr_mm_config(m, bk, bn, dy.dtype, device),
            lambda: bsr_mm_candidates(m, bk, bn, dy.dtype, arch_of(device)),
            lambda c: bsr_mm_t(dy, crow_indices, col_indices, values, k, input_precision=input_precision, meta=meta,
                               config=c),
            device)
    grid = (triton.cdiv(m, cfg.block_m) * (k // bk),)
    with device_ctx(device):
        _bsr_mm_t_kernel[grid](
            dy, t_crow, t_row, t_perm, values, dx, m, n, k,
            BLOCK_M=cfg.block_m, BN=bn, BK=bk, GROUP_M=cfg.group_m, INPUT_PRECISION=input_precision,
            WHILE_LOOP=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dx
