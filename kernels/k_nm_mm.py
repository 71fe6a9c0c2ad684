"""N:M semi-structured x dense on Triton: y = x @ W^T (+ bias), W [N, K] n:m sparse along K (sparsekit NM).

Layout (sparsekit.formats.NM): values [N, K/m*n] (the kept values, groups in order), indices uint8
[N, K/m*n] (position 0..m-1 of each kept value inside its group of m, strictly increasing). Any n <= m
works (2:4, 1:4, 4:8, 2:3, ...), including m that is not a power of two.

One program computes a [BLOCK_M, BLOCK_N] tile of y (grouped program order, GROUP_M row tiles per
column tile). Per K step it loads the dense x tile [BLOCK_M, BLOCK_K] and *densifies* the weight tile
[BLOCK_N, BLOCK_K] in registers from the compressed data: dense column k is in group g = k // m at
position k % m, and its value is the kept slot j (0 <= j < n) of group g whose index equals k % m, else 0.
That is n gathered loads of values and indices (the same compressed bytes are re-read from L1 by the m
columns of a group; from DRAM the weight costs only its compressed size, n/m of dense plus 1 byte per
kept value) and n selects. Then one tl.dot with fp32 accumulation (TF32 rules for fp32 as in k_bsr_mm).
This saves memory traffic on the weight, not FLOPs; it does not use the sparse tensor cores (mma.sp),
which Triton does not expose. On an H100 (fp16, 2:4, 2026-11-23) it ran at 0.03-0.09x cuBLAS (the n gathers
per K step dominate): on CUDA the dispatcher measures it against the cuSPARSELt backend (1.9-2.3x cuBLAS at
large M) and the CUDA kernels, and keeps the fastest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._configs import TileConfig, arch_of, interpreting, m_bucket, nm_mm_config, tile_candidates
from ._launch import (
    check_activation,
    check_bias,
    check_int,
    check_runnable,
    check_tensor,
    device_ctx,
    resolve_input_precision,
)
from ._tiles import DYNAMIC_M, grouped_pid, row_tile

__all__ = ["nm_mm"]


@triton.jit
def _nm_mm_step(acc, x_ptr, val_ptr, idx_ptr, rows, wrows, mask_m, mask_n, k0, K, KC,
                NN: tl.constexpr, MM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """acc += x[:, k0:k0+BLOCK_K] @ densify(W[:, k0:k0+BLOCK_K])^T."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x_tile = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    group_k = offs_k // MM
    pos = (offs_k % MM).to(tl.int32)
    w_mask = mask_n[:, None] & mask_k[None, :]
    w_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=val_ptr.dtype.element_ty)
    for j in tl.static_range(NN):
        offs_c = wrows[:, None] * KC + (group_k * NN + j)[None, :]
        v = tl.load(val_ptr + offs_c, mask=w_mask, other=0.0)
        ix = tl.load(idx_ptr + offs_c, mask=w_mask, other=255).to(tl.int32)
        w_tile = tl.where(ix == pos[None, :], v, w_tile)
    return tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=DYNAMIC_M)
def _nm_mm_kernel(
    x_ptr, val_ptr, idx_ptr, bias_ptr, y_ptr,
    M, N, K, KC,
    HAS_BIAS: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr = False,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows, mask_m = row_tile(pid_m * BLOCK_M, M, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    wrows = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WHILE_LOOP:   # interpreter only (triton-lang/triton#9171: no tensor range() bounds), see k_bsr_mm
        k0 = 0
        while k0 < K:
            acc = _nm_mm_step(acc, x_ptr, val_ptr, idx_ptr, rows, wrows, mask_m, mask_n, k0, K, KC,
                              NN, MM, BLOCK_N, BLOCK_K, INPUT_PRECISION)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _nm_mm_step(acc, x_ptr, val_ptr, idx_ptr, rows, wrows, mask_m, mask_n, k0, K, KC,
                              NN, MM, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def nm_mm(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, n: int, m: int, *,
          input_precision: str | None = None, config: TileConfig | None = None) -> Tensor:
    """y = x @ W^T (+ bias) for an n:m W given as NM values [N, K/m*n] and uint8 indices; y [M, N] in x's dtype.

    x [M, K] contiguous (fp16/bf16/fp32), values in x's dtype, bias None or [N]. Index contents are not
    checked (that would sync): pass a validated NM (``NM.validate()``). ``config``: the launch tile; None: the
    table's (_configs.nm_mm_config), or the fastest candidate under SPARSEKIT_TRITON_AUTOTUNE=1 (_autotune).
    """
    x = check_tensor(x, "x")
    values = check_tensor(values, "values")
    indices = check_tensor(indices, "indices")
    check_activation(x, "x", "[M, K]")
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} does not match x dtype {x.dtype}; cast one of them")
    if indices.dtype != torch.uint8:
        raise TypeError(f"indices must be uint8, got {indices.dtype}")
    n, m = check_int(n, "n"), check_int(m, "m")
    if not 1 <= n <= m or m > 255:
        raise ValueError(f"need 1 <= n <= m <= 255 (the Triton kernel pads groups with position 255; the "
                         f"CUDA and CPU kernels take m = 256), got n={n}, m={m}")
    mx, k = (int(s) for s in x.shape)
    if k % m:
        raise ValueError(f"x.shape[1]={k} (K) must be a multiple of m={m}")
    if values.dim() != 2 or int(values.shape[1]) != k // m * n:
        raise ValueError(f"values must be [N, K/m*n] = [N, {k // m * n}], got {tuple(values.shape)}")
    if tuple(indices.shape) != tuple(values.shape):
        raise ValueError(f"indices shape {tuple(indices.shape)} must equal values shape {tuple(values.shape)}")
    rows = int(values.shape[0])
    bias = check_bias(bias, x, rows)
    tensors = [x, values, indices] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"x, values, indices and bias must be on one device, got {[str(t.device) for t in tensors]}")
    device = x.device
    check_runnable(device, "x is")
    input_precision = resolve_input_precision(x.dtype, input_precision)

    y = torch.empty((mx, rows), dtype=x.dtype, device=device)
    if mx == 0 or rows == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(mx, rows))
    cfg = config
    if cfg is None:
        cfg = _autotune.pick(
            ("nm_mm", str(device), x.dtype, n, m, m_bucket(mx), input_precision),
            nm_mm_config(mx, x.dtype, device),
            lambda: tile_candidates("nm_mm", mx, x.dtype, arch_of(device)),
            lambda c: nm_mm(x, values, indices, bias, n, m, input_precision=input_precision, config=c),
            device)
    grid = (triton.cdiv(mx, cfg.block_m) * triton.cdiv(rows, cfg.block_n),)
    with device_ctx(device):
        _nm_mm_kernel[grid](
            x, values, indices, bias, y, mx, rows, k, k // m * n,
            HAS_BIAS=bias is not None, NN=n, MM=m,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            INPUT_PRECISION=input_precision, WHILE_LOOP=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y
