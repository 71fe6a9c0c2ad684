"""BSR backward for the weight on Triton (SDDMM): dW restricted to W's stored blocks.

For every stored block b (block-row r, block-column c = col[b]):

    dvalues[b] = dy[:, r*bn:(r+1)*bn]^T @ x[:, c*bk:(c+1)*bk]          ([bn, bk], a reduction over M)

One program per stored block (grid axis 0) accumulates the [bn, bk] tile in fp32 while it walks M in
steps of BLOCK_M, loading a [bn, BLOCK_M] tile of dy^T (dy read transposed, so that both dot operands are
pipelined on sm80) and a [BLOCK_M, bk] tile of x per step. Only the
blocks present are computed, so the cost is density x the dense dW GEMM. When there are too few stored
blocks to fill the GPU and M is long (kernels/_configs.bsr_sddmm_config), M is split over SPLIT programs
per block (grid axis 1) that atomically add fp32 partials (run-to-run last-bit differences; pass
split=1 for reproducible results; under torch.use_deterministic_algorithms(True) the default split is 1 and a
forced one raises, or warns with warn_only=True). The block-row of each block comes from crow with a device-side
repeat_interleave (no sync).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._configs import SPLIT_LIMIT, TileConfig, arch_of, bsr_sddmm_candidates, bsr_sddmm_config, interpreting, m_bucket
from ._launch import (
    check_activation,
    check_deterministic,
    check_index,
    check_int,
    check_optional_positive_int,
    check_runnable,
    check_tensor,
    device_ctx,
    resolve_input_precision,
)
from ._tiles import DYNAMIC_M
from ._transpose import block_rows
from .k_bsr_mm import SUPPORTED_BLOCK_SIDES

__all__ = ["bsr_sddmm"]


@triton.jit
def _bsr_sddmm_step(acc, dyt_ptrs, x_ptrs, offs_m, m0, M, N, K,
                    INPUT_PRECISION: tl.constexpr):
    rows = m0 + offs_m
    mask = rows < M
    rows64 = rows.to(tl.int64)
    # dy^T loaded as it is used ([BN, BLOCK_M], the index roles swapped) rather than tl.trans of a [BLOCK_M, BN]
    # load: a loaded operand that feeds the dot directly is what the software pipeliner multi-buffers on sm80
    at = tl.load(dyt_ptrs + rows64[None, :] * N, mask=mask[None, :], other=0.0)   # [BN, BLOCK_M]
    b = tl.load(x_ptrs + rows64[:, None] * K, mask=mask[:, None], other=0.0)      # [BLOCK_M, BK]
    return tl.dot(at, b, acc, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=DYNAMIC_M)
def _bsr_sddmm_kernel(
    dy_ptr, x_ptr, row_ptr, col_ptr, out_ptr,
    M, N, K,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr = False,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.load(row_ptr + b)
    c = tl.load(col_ptr + b)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    dyt_ptrs = dy_ptr + (r * BN + offs_n)[:, None]   # dy^T: block-row r's columns of dy, as rows
    x_ptrs = x_ptr + (c * BK + offs_k)[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    if WHILE_LOOP:   # interpreter only (triton-lang/triton#9171), see k_bsr_mm
        m0 = s * BLOCK_M
        while m0 < M:
            acc = _bsr_sddmm_step(acc, dyt_ptrs, x_ptrs, offs_m, m0, M, N, K, INPUT_PRECISION)
            m0 += SPLIT * BLOCK_M
    else:
        for m0 in range(s * BLOCK_M, M, SPLIT * BLOCK_M):
            acc = _bsr_sddmm_step(acc, dyt_ptrs, x_ptrs, offs_m, m0, M, N, K, INPUT_PRECISION)
    out_ptrs = out_ptr + b.to(tl.int64) * (BN * BK) + offs_n[:, None] * BK + offs_k[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.atomic_add(out_ptrs, acc, sem="relaxed")


def bsr_sddmm(dy: Tensor, x: Tensor, crow_indices: Tensor, col_indices: Tensor, block_n: int, block_k: int, *,
              input_precision: str | None = None, split: int | None = None, config: TileConfig | None = None
              ) -> Tensor:
    """dvalues [nnzb, block_n, block_k] = (dy^T @ x) on the stored blocks of the pattern (crow, col).

    dy [M, N], x [M, K] contiguous, same float dtype (fp16/bf16/fp32); the result has that dtype.
    ``split``: None = from the config table (1 under torch.use_deterministic_algorithms(True)); 1 = no split of M
    (reproducible); 2..SPLIT_LIMIT (64) forces it (refused in deterministic mode).
    ``config``: the launch config (its block_n/block_k ignored); None: the table's (_configs.bsr_sddmm_config), or
    the fastest candidate under SPARSEKIT_TRITON_AUTOTUNE=1 (_autotune).
    """
    dy = check_tensor(dy, "dy")
    x = check_tensor(x, "x")
    crow_indices = check_tensor(crow_indices, "crow_indices")
    col_indices = check_tensor(col_indices, "col_indices")
    check_activation(dy, "dy")
    check_activation(x, "x")
    if x.dtype != dy.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match dy dtype {dy.dtype}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} must have the same number of rows M")
    bn, bk = check_int(block_n, "block_n"), check_int(block_k, "block_k")
    if bn not in SUPPORTED_BLOCK_SIDES or bk not in SUPPORTED_BLOCK_SIDES:
        raise ValueError(f"block ({bn}, {bk}) not supported; block sides must be one of {SUPPORTED_BLOCK_SIDES}")
    m, n = (int(s) for s in dy.shape)
    k = int(x.shape[1])
    if n % bn or k % bk:
        raise ValueError(f"N={n} and K={k} must be multiples of the block ({bn}, {bk})")
    check_index(crow_indices, "crow_indices")
    check_index(col_indices, "col_indices")
    if crow_indices.numel() != n // bn + 1:
        raise ValueError(f"crow_indices must have N/bn + 1 = {n // bn + 1} entries, got {crow_indices.numel()}")
    devices = {t.device for t in (dy, x, crow_indices, col_indices)}
    if len(devices) > 1:
        raise ValueError(f"dy, x, crow_indices and col_indices must be on one device, got {sorted(map(str, devices))}")
    device = dy.device
    check_runnable(device, "dy is")
    check_optional_positive_int(split, "split", SPLIT_LIMIT)
    input_precision = resolve_input_precision(dy.dtype, input_precision)

    nnzb = int(col_indices.numel())
    if nnzb == 0 or m == 0:
        return torch.zeros((nnzb, bn, bk), dtype=dy.dtype, device=device)
    rows = block_rows(crow_indices, nnzb)
    cfg = config
    if cfg is None:
        table = bsr_sddmm_config(m, nnzb, bn, bk, dy.dtype, device)
        cfg = _autotune.pick(
            ("bsr_sddmm", str(device), dy.dtype, bn, bk, m_bucket(m), split, input_precision), table,
            lambda: bsr_sddmm_candidates(m, nnzb, bn, bk, dy.dtype, arch_of(device)),
            lambda c: bsr_sddmm(dy, x, crow_indices, col_indices, bn, bk, input_precision=input_precision,
                                split=split, config=c),
            device)
        # the split of M follows this call's block count (the tuned key holds none: a tuned tile for a small
        # layer must not bring its split, fp32 atomics and run-to-run differences, to a large one)
        cfg = dataclasses.replace(cfg, split=table.split)
    split = cfg.split if split is None else split
    split = max(1, min(split, triton.cdiv(m, cfg.block_m)))
    if split > 1:   # (the table's split is 1 under deterministic algorithms: only a forced one gets here then)
        check_deterministic(f"bsr_sddmm with split={split}", "pass split=1, or None (then it is 1)")
    out = (torch.empty if split == 1 else torch.zeros)(
        (nnzb, bn, bk), dtype=dy.dtype if split == 1 else torch.float32, device=device)
    with device_ctx(device):
        _bsr_sddmm_kernel[(nnzb, split)](
            dy, x, rows, col_indices, out, m, n, k,
            BLOCK_M=cfg.block_m, BN=bn, BK=bk, SPLIT=split, INPUT_PRECISION=input_precision,
            WHILE_LOOP=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out if out.dtype == dy.dtype else out.to(dy.dtype)
