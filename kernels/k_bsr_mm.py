"""BSR x dense on Triton: y = x @ W^T (+ bias), W block-sparse [N, K] in BSR.

Layout (sparsekit.formats.BSR): values [nnzb, bn, bk], crow_indices int32 [N/bn + 1], col_indices int32
[nnzb] (block columns, sorted within a block-row). x is [M, K] row-major, y is [M, N] in x's dtype.

One program computes the output tile y[m0:m0+BLOCK_M, r*bn:(r+1)*bn] of block-row r: it walks the stored
blocks of that row (crow[r]..crow[r+1]), and for each block (column c) loads the x tile
x[m0:m0+BLOCK_M, c*bk:(c+1)*bk] and the block [bn, bk] and accumulates tl.dot(x_tile, block^T) in fp32.
Block-rows without stored blocks write zeros (or the bias). Rows past M are masked, so any M works.
Programs are ordered in groups of GROUP_M row tiles per block-row (the usual L2 swizzle): neighbouring
programs share a weight block-row and, across a group, the same x tiles.

Decode shapes (M <= 64, kernels/_configs.bsr_mm_split_k): with one program per (row tile, block-row) a
small M gives too few programs to fill the GPU, each walking a whole block-row. The split-K kernel
``_bsr_mm_splitk_kernel`` gives each block-row SPLIT_K programs; program s takes the stored blocks
crow[r] + s, crow[r] + s + SPLIT_K, ... (strided, so uneven block-rows still balance) and atomically adds
its fp32 partial [BLOCK_M, bn] into an fp32 buffer that starts as zeros (or the bias); one cast to x's
dtype follows (none for fp32). The order of the atomic adds is not fixed, so split-K results can differ
in the last bits from run to run; pass ``split_k=1`` for bitwise reproducibility. Under
``torch.use_deterministic_algorithms(True)`` the default is 1, and a forced split_k > 1 raises (warns with
``warn_only=True``), as torch's own nondeterministic ops do.

CUDA graphs: the kernels here, like every kernel in kernels/ that takes M, are not specialised on M
(_tiles.DYNAMIC_M), so one binary serves every M of a launch config. The config (BLOCK_M) and split_k still follow
M, and a kernel cannot be compiled and loaded while torch.cuda.graph captures: run each captured shape once
eagerly first.

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation. fp32 inputs use TF32 tensor
cores on the GPU when torch lets cuBLAS use TF32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or
the legacy ``allow_tf32``: torch's switch for exactly this trade-off; off by default; _launch.default_input_precision),
and full-precision fp32 ("ieee") dots otherwise; ``input_precision``
overrides it. The accumulator is always fp32; the bias is added in fp32 before the final cast.

Importing this module imports triton; keep it out of sparsekit's import path (sparsekit.ops imports it
lazily on the first call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._configs import (
    SPLIT_LIMIT,
    KernelConfig,
    arch_of,
    bsr_mm_candidates,
    bsr_mm_config,
    bsr_mm_split_k,
    interpreting,
    m_bucket,
)
from ._launch import (
    SUPPORTED_DTYPES,
    check_activation,
    check_bias,
    check_deterministic,
    check_grid,
    check_index,
    check_int,
    check_optional_positive_int,
    check_runnable,
    check_tensor,
    device_ctx,
    resolve_input_precision,
)
from ._tiles import DYNAMIC_M, grouped_pid, row_tile

__all__ = ["bsr_mm", "SUPPORTED_BLOCK_SIDES", "SUPPORTED_DTYPES"]

SUPPORTED_BLOCK_SIDES = (16, 32, 64, 128)


@triton.jit
def _bsr_mm_acc_block(acc, x_tile_ptrs, mask_m, col_ptr, val_ptr, w_offs, i,
                      BN: tl.constexpr, BK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += x[:, col_i*BK : (col_i+1)*BK] @ block_i^T for stored block i."""
    col = tl.load(col_ptr + i)
    x_tile = tl.load(x_tile_ptrs + col * BK, mask=mask_m[:, None], other=0.0)   # [BLOCK_M, BK]
    blk = tl.load(val_ptr + i.to(tl.int64) * (BN * BK) + w_offs)   # [BN, BK]; nnzb * bn * bk may pass 2**31
    return tl.dot(x_tile, tl.trans(blk), acc, input_precision=INPUT_PRECISION)


@triton.jit
def bsr_row_tile(pid_m, M, BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Row tile pid_m of the BSR kernels here and in k_bsr_mm_t: (int64 rows, row mask, arange(BN), arange(BK))."""
    rows, mask_m = row_tile(pid_m * BLOCK_M, M, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    return rows, mask_m, offs_n, offs_k


@triton.jit(do_not_specialize=DYNAMIC_M)
def _bsr_mm_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, y_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr = False,
):
    # ---- which (row tile, block-row) this program owns: grouped order for L2 reuse
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), N // BN, GROUP_M)
    rows, mask_m, offs_n, offs_k = bsr_row_tile(pid_m, M, BLOCK_M, BN, BK)
    x_tile_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]   # [BLOCK_M, BK] at block column 0
    w_offs = offs_n[:, None] * BK + offs_k[None, :]              # [BN, BK] inside one block

    start = tl.load(crow_ptr + pid_n)
    end = tl.load(crow_ptr + pid_n + 1)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    if WHILE_LOOP:
        # Interpreter only: Triton 3.6's interpreter cannot take a tensor as a range() bound under
        # numpy >= 2.4 (triton-lang/triton#9171). Same body; a while loop is not software-pipelined, so
        # compiled code always takes the for loop below.
        i = start
        while i < end:
            acc = _bsr_mm_acc_block(acc, x_tile_ptrs, mask_m, col_ptr, val_ptr, w_offs, i,
                                    BN, BK, INPUT_PRECISION)
            i += 1
    else:
        for i in range(start, end):
            acc = _bsr_mm_acc_block(acc, x_tile_ptrs, mask_m, col_ptr, val_ptr, w_offs, i,
                                    BN, BK, INPUT_PRECISION)

    out_cols = pid_n * BN + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * N + out_cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit(do_not_specialize=DYNAMIC_M)
def _bsr_mm_splitk_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, acc_ptr,
    M, N, K,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr = False,
):
    """acc[m0:m0+BLOCK_M, r*BN:(r+1)*BN] += sum over this program's share of block-row r (fp32 atomics).

    grid = (N // BN, SPLIT_K, cdiv(M, BLOCK_M)); acc is fp32 [M, N], pre-filled with zeros or the bias."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows, mask_m, offs_n, offs_k = bsr_row_tile(tl.program_id(2), M, BLOCK_M, BN, BK)
    x_tile_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]
    w_offs = offs_n[:, None] * BK + offs_k[None, :]

    start = tl.load(crow_ptr + pid_n) + split
    end = tl.load(crow_ptr + pid_n + 1)
    if start < end:   # nothing to add: skip the atomics (empty block-rows cost one load per program)
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        if WHILE_LOOP:   # interpreter only, see _bsr_mm_kernel
            i = start
            while i < end:
                acc = _bsr_mm_acc_block(acc, x_tile_ptrs, mask_m, col_ptr, val_ptr, w_offs, i,
                                        BN, BK, INPUT_PRECISION)
                i += SPLIT_K
        else:
            for i in range(start, end, SPLIT_K):
                acc = _bsr_mm_acc_block(acc, x_tile_ptrs, mask_m, col_ptr, val_ptr, w_offs, i,
                                        BN, BK, INPUT_PRECISION)
        out_cols = pid_n * BN + offs_n
        tl.atomic_add(acc_ptr + rows[:, None] * N + out_cols[None, :], acc, mask=mask_m[:, None], sem="relaxed")


# ---------------------------------------------------------------------------------------------- launcher
def check_bsr_operands(act: object, act_name: str, act_shape: str, crow_indices: object, col_indices: object,
                       values: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checks shared by the BSR launchers: the 2-D activation (x or dy), index tensors, and the values' dims,
    dtype and block sides."""
    act = check_tensor(act, act_name)
    crow_indices = check_tensor(crow_indices, "crow_indices")
    col_indices = check_tensor(col_indices, "col_indices")
    values = check_tensor(values, "values")
    check_activation(act, act_name, act_shape)
    if values.dim() != 3:
        raise ValueError(f"values must be 3-D [nnzb, bn, bk], got shape {tuple(values.shape)}")
    if values.dtype != act.dtype:
        raise TypeError(f"values dtype {values.dtype} does not match {act_name} dtype {act.dtype}; cast one of them")
    bn, bk = int(values.shape[1]), int(values.shape[2])
    if bn not in SUPPORTED_BLOCK_SIDES or bk not in SUPPORTED_BLOCK_SIDES:
        raise ValueError(f"values has blocks of {(bn, bk)}; the Triton kernel supports block sides "
                         f"{SUPPORTED_BLOCK_SIDES} only (rectangular combinations allowed)")
    return act, crow_indices, col_indices, values


def bsr_mm(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None,
           n: int, *, input_precision: str | None = None, split_k: int | None = None,
           config: KernelConfig | None = None) -> Tensor:
    """y = x @ W^T (+ bias) for a BSR weight W of shape [n, K] (K = x.shape[1]); y is [M, n] in x's dtype.

    x            [M, K] contiguous, float16 / bfloat16 / float32
    crow_indices int32 [n/bn + 1] contiguous
    col_indices  int32 [nnzb] contiguous (block columns, sorted per block-row)
    values       [nnzb, bn, bk] contiguous, x's dtype; bn, bk each one of 16, 32, 64, 128
    bias         None or [n] contiguous, x's dtype
    input_precision  fp32 only: "ieee", "tf32" or "tf32x3"; default follows
                 torch's cuBLAS TF32 setting (_launch.default_input_precision: TF32 tensor cores when on).
    split_k      None: the launcher decides (split-K only for M <= 64 when the plain grid would leave
                 the GPU idle, kernels/_configs.bsr_mm_split_k; never under torch.use_deterministic_algorithms(True));
                 1: never; 2..SPLIT_LIMIT (64): force that many splits (refused in deterministic mode).
    config       the launch config (BLOCK_M, warps, stages); None: the table's (_configs.bsr_mm_config), or the
                 fastest candidate under SPARSEKIT_TRITON_AUTOTUNE=1 (_autotune). bench/tune_triton.py passes it.

    Shapes, dtypes and devices are checked; the index *contents* are not (that would synchronise the
    GPU): pass a validated BSR (``BSR.validate()``). Runs on CUDA tensors, or on CPU tensors under
    TRITON_INTERPRET=1. M == 0 or n == 0 returns an empty result without launching.
    """
    x, crow_indices, col_indices, values = check_bsr_operands(x, "x", "[M, K]", crow_indices, col_indices, values)
    nnzb, bn, bk = (int(s) for s in values.shape)
    n = check_int(n, "n")
    m, k = (int(s) for s in x.shape)
    if n < 0 or n % bn:
        raise ValueError(f"n={n} must be a non-negative multiple of the block rows bn={bn}")
    if k % bk:
        raise ValueError(f"x.shape[1]={k} (K) must be a multiple of the block columns bk={bk}")
    check_index(crow_indices, "crow_indices")
    check_index(col_indices, "col_indices")
    if crow_indices.numel() != n // bn + 1:
        raise ValueError(f"crow_indices must have n/bn + 1 = {n // bn + 1} entries, "
                         f"got {crow_indices.numel()}")
    if col_indices.numel() != nnzb:
        raise ValueError(f"col_indices has {col_indices.numel()} entries but values has {nnzb} blocks")
    bias = check_bias(bias, x, n)
    named = [("x", x), ("crow_indices", crow_indices), ("col_indices", col_indices), ("values", values)]
    if bias is not None:
        named.append(("bias", bias))
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        raise ValueError("x, crow_indices, col_indices, values and bias must be on one device, got "
                         + ", ".join(f"{name}={t.device}" for name, t in named))
    device = x.device
    check_runnable(device, "x is")
    input_precision = resolve_input_precision(x.dtype, input_precision)

    check_optional_positive_int(split_k, "split_k", SPLIT_LIMIT)

    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=device)
    if split_k is None:
        split_k = bsr_mm_split_k(m, n // bn, nnzb, bn, bk, device)   # 1 under deterministic algorithms
    if split_k > 1:
        check_deterministic(f"bsr_mm with split_k={split_k}", "pass split_k=1, or None (then it is 1)")
    cfg = config
    if cfg is None:
        cfg = _autotune.pick(
            ("bsr_mm", str(device), x.dtype, bn, bk, m_bucket(m), split_k, input_precision),
            bsr_mm_config(m, bn, bk, x.dtype, device),
            lambda: bsr_mm_candidates(m, bn, bk, x.dtype, arch_of(device)),
            lambda c: bsr_mm(x, crow_indices, col_indices, values, bias, n, input_precision=input_precision,
                             split_k=split_k, config=c),
            device)
    if split_k > 1:
        return _bsr_mm_split(x, crow_indices, col_indices, values, bias, n, bn, bk, input_precision, split_k, cfg)

    y = torch.empty((m, n), dtype=x.dtype, device=device)
    grid = (triton.cdiv(m, cfg.block_m) * (n // bn),)
    with device_ctx(device):
        _bsr_mm_kernel[grid](
            x, crow_indices, col_indices, values, bias, y,
            m, n, k,
            HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BN=bn, BK=bk,
            GROUP_M=cfg.group_m, INPUT_PRECISION=input_precision, WHILE_LOOP=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y


def _bsr_mm_split(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int, bn: int,
                  bk: int, input_precision: str, split_k: int, cfg: KernelConfig) -> Tensor:
    m, k = (int(s) for s in x.shape)
    device = x.device
    if bias is None:
        acc = torch.zeros((m, n), dtype=torch.float32, device=device)
    else:
        acc = torch.empty((m, n), dtype=torch.float32, device=device).copy_(bias.expand(m, n))  # never a view of bias
    grid = (n // bn, split_k, triton.cdiv(m, cfg.block_m))
    check_grid("bsr_mm (split-K)", grid)     # M tiles on axis 2: only a forced split_k reaches its limit
    with device_ctx(device):
        _bsr_mm_splitk_kernel[grid](
            x, crow, col, values, acc, m, n, k,
            BLOCK_M=cfg.block_m, BN=bn, BK=bk, SPLIT_K=split_k, INPUT_PRECISION=input_precision,
            WHILE_LOOP=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return acc if x.dtype == torch.float32 else acc.to(x.dtype)
