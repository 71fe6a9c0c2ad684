"""Channel-compacted layers on Triton: the gather of kept input channels fused into a GEMM's input load,
and the scatter of compact output channels into a wider tensor.

``channel_mm``: y[b, m, out(n)] = sum_k x[b, m, in_idx[k]] * w[n, k] (+ bias[n]) for a compact weight w
[Nc, Kc] of a layer whose input channels were pruned to ``in_idx`` (int32/int64 [Kc]) — the unfused path
is ``x.index_select(dim, in_idx)`` (a full copy of the kept activations) followed by the GEMM. Here the
GEMM's x-tile load reads the kept channels in place through the index vector. x and y are addressed by
strides (batch, row, channel), so one kernel serves a linear layer (x [M, K] rows) and a 1x1 convolution
on NCHW or channels_last activations (rows = spatial positions, channel stride H*W or 1). With
``out_idx`` the result columns are stored straight into channels out_idx[n] of a wider output (the
fused scatter); the other channels are left as the caller initialised them.

``channel_scatter``: out[o, out_idx[c], i] = y[o, c, i] + bias[out_idx[c]] into an output the launcher
fills with zeros or the (full-width) bias first: the unfused path is a fill followed by index_add/copy.

GPU speed is unmeasured here (no GPU where this was written); whether the fused gather beats
index_select + cuBLAS depends on the shape (it saves one read+write of the kept activations, but its
x loads are gathers, not TMA/cp.async-friendly contiguous tiles): benchmark before preferring it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._configs import TileConfig, arch_of, channel_mm_config, interpreting, m_bucket, tile_candidates
from ._launch import SUPPORTED_DTYPES, check_grid, check_runnable, device_ctx, resolve_input_precision
from ._tiles import DYNAMIC_M, grouped_pid, row_tile

__all__ = ["channel_mm", "channel_scatter"]


@triton.jit
def _channel_mm_step(acc, x_base, in_idx_ptr, w_ptr, rows, cols, mask_m, mask_n, k0, KC, sxm, sxk,
                     BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < KC
    kin = tl.load(in_idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)   # kept input channels
    x_tile = tl.load(x_base + rows[:, None] * sxm + kin[None, :] * sxk, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
    # int64 row offsets: Nc * Kc passes 2^31 on wide heads (a 256k vocabulary with 8.4k kept inputs)
    w_tile = tl.load(w_ptr + cols.to(tl.int64)[:, None] * KC + offs_k[None, :],
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=DYNAMIC_M)
def _channel_mm_kernel(
    x_ptr, in_idx_ptr, w_ptr, bias_ptr, out_idx_ptr, y_ptr,
    M, NC, KC,
    sxb, sxm, sxk, syb, sym, syn,
    HAS_BIAS: tl.constexpr, HAS_OUT_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr = False,
):
    # one grid axis for (batch, tile): axis 1 would cap the batch (images of a 1x1 conv) at 65535
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(NC, BLOCK_N)
    pid = tl.program_id(0)
    batch = (pid // tiles).to(tl.int64)
    pid_m, pid_n = grouped_pid(pid % tiles, tl.cdiv(M, BLOCK_M), tl.cdiv(NC, BLOCK_N), GROUP_M)
    rows, mask_m = row_tile(pid_m * BLOCK_M, M, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < NC
    x_base = x_ptr + batch * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WHILE_LOOP:   # interpreter only (triton-lang/triton#9171), see k_bsr_mm
        k0 = 0
        while k0 < KC:
            acc = _channel_mm_step(acc, x_base, in_idx_ptr, w_ptr, rows, cols, mask_m, mask_n, k0, KC, sxm, sxk,
                                   BLOCK_K, INPUT_PRECISION)
            k0 += BLOCK_K
    else:
        for k0 in range(0, KC, BLOCK_K):
            acc = _channel_mm_step(acc, x_base, in_idx_ptr, w_ptr, rows, cols, mask_m, mask_n, k0, KC, sxm, sxk,
                                   BLOCK_K, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_OUT_IDX:
        out_cols = tl.load(out_idx_ptr + cols, mask=mask_n, other=0).to(tl.int64)
    else:
        out_cols = cols.to(tl.int64)
    y_ptrs = y_ptr + batch * syb + rows[:, None] * sym + out_cols[None, :] * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _channel_scatter_kernel(
    y_ptr, idx_ptr, bias_ptr, out_ptr,
    C, INNER,
    syo, syc, syi, soo, soc, soi,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # (outer, inner tile) on axis 0: inner is the row count of a linear output and would overflow axis 2's
    # 65535 tiles past ~8.4M rows
    i_tiles = tl.cdiv(INNER, BLOCK_I)
    o = (tl.program_id(0) // i_tiles).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_i = ((tl.program_id(0) % i_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_i < INNER)[None, :]
    dst = tl.load(idx_ptr + offs_c, mask=mask_c, other=0).to(tl.int64)
    v = tl.load(y_ptr + o * syo + offs_c.to(tl.int64)[:, None] * syc + offs_i[None, :] * syi, mask=mask, other=0.0)
    if HAS_BIAS:
        v = (v.to(tl.float32) + tl.load(bias_ptr + dst, mask=mask_c, other=0.0).to(tl.float32)[:, None])
    tl.store(out_ptr + o * soo + dst[:, None] * soc + offs_i[None, :] * soi, v.to(out_ptr.dtype.element_ty), mask=mask)


def _check_runnable(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    check_runnable(device, "tensors are")


def channel_mm(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor,
               x_strides: tuple[int, int, int], y_strides: tuple[int, int, int], batch: int, m: int,
               out_idx: Tensor | None = None, *, input_precision: str | None = None,
               config: TileConfig | None = None) -> Tensor:
    """Low-level launcher (arguments validated by sparsekit.ops.channel): writes
    y[b, r, out(n)] = sum_k x[b, r, in_idx[k]] * weight[n, k] + bias[n] for b < batch, r < m, n < Nc, where
    element (b, r, c) of x is at x.data_ptr() + b*x_strides[0] + r*x_strides[1] + c*x_strides[2] (elements;
    y likewise with y_strides and out(n) = out_idx[n] or n). weight [Nc, Kc] contiguous. Returns y. ``config``: the
    launch tile; None: the table's (_configs.channel_mm_config), or the fastest candidate under
    SPARSEKIT_TRITON_AUTOTUNE=1 (_autotune; timed into a scratch copy of y)."""
    _check_runnable(x.device, x.dtype)
    nc, kc = (int(s) for s in weight.shape)
    if batch == 0 or m == 0 or nc == 0:
        return y
    input_precision = resolve_input_precision(x.dtype, input_precision)
    cfg = config
    if cfg is None:
        cfg = _autotune.pick(
            ("channel_mm", str(x.device), x.dtype, m_bucket(m), out_idx is not None, input_precision),
            channel_mm_config(m, x.dtype, x.device),
            lambda: tile_candidates("channel_mm", m, x.dtype, arch_of(x.device)),
            lambda c: channel_mm(x, in_idx, weight, bias, torch.empty_like(y), x_strides, y_strides, batch, m,
                                 out_idx, input_precision=input_precision, config=c),
            x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(nc, cfg.block_n) * batch,)
    check_grid("channel_mm", grid)
    with device_ctx(x.device):
        _channel_mm_kernel[grid](
            x, in_idx, weight, bias, out_idx, y, m, nc, kc, *x_strides, *y_strides,
            HAS_BIAS=bias is not None, HAS_OUT_IDX=out_idx is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            INPUT_PRECISION=input_precision, WHILE_LOOP=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y


def channel_scatter(y: Tensor, out_idx: Tensor, bias: Tensor | None, out: Tensor, outer: int, c: int, inner: int,
                    y_strides: tuple[int, int, int], out_strides: tuple[int, int, int]) -> Tensor:
    """Low-level launcher: out[o, out_idx[j], i] = y[o, j, i] (+ bias[out_idx[j]]) for o < outer, j < c,
    i < inner, elements addressed by (outer, channel, inner) strides. ``out`` is pre-filled by the caller."""
    _check_runnable(y.device, y.dtype)
    if outer == 0 or c == 0 or inner == 0:
        return out
    block_i = 16 if interpreting() else min(128, triton.next_power_of_2(inner))
    block_c = 16 if interpreting() else max(1, 4096 // block_i) if inner < 128 else 32
    block_c = min(block_c, 128)
    grid = (outer * triton.cdiv(inner, block_i), triton.cdiv(c, block_c))
    check_grid("channel_scatter", grid)
    with device_ctx(y.device):
        _channel_scatter_kernel[grid](
            y, out_idx, bias, out, c, inner, *y_strides, *out_strides,
            HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_I=block_i, num_warps=4,
        )
    return out
