"""Launch configurations for the Triton kernels: small hand-written tables, no autotuning on first use.

``bsr_mm_config(m, bn, bk, dtype, device)`` picks BLOCK_M / num_warps / num_stages / GROUP_M for
``k_bsr_mm._bsr_mm_kernel`` from a table keyed by (arch major, block rows bn, M bucket):

* the output tile of one program is [BLOCK_M, bn], so bn and M decide the tile and the warp count;
* bk (the K-step of the inner loop) and the element size only decide how many pipeline buffers fit in
  shared memory, so ``num_stages`` is lowered (and, if the loop would then not be pipelined at all,
  BLOCK_M halved) until the buffers fit the device's shared memory.

Pipelining (Triton 3.6, read off the TTGIR that the compile check produces): the x tile's address
depends on the block column loaded in the same iteration, and the pipeliner gives that index load a
stage of its own. So num_stages=S buys fewer buffers than in a dense GEMM: on sm80 (and sm90 tiles that
use mma.sync) S <= 4 keeps one [BLOCK_M, bk] + [bn, bk] buffer (one block of prefetch), S = 5..6 two,
S = 7..8 three; sm90 wgmma tiles (BLOCK_M >= 64) keep one more. Hence S = 5 as the usual choice.

The entries follow the usual Triton GEMM shapes (BLOCK_M = 16 for decode-sized M up to 128 for large M,
8 warps only for 128x128 output tiles). They have NOT been measured on a GPU (none where they were
written): re-tune with bench/ on an A100/H100 and edit the rows below.
``python -m sparsekit.kernels._compile_check --full`` compiles every entry for sm80/sm90 and checks that
its shared memory fits.

This module imports torch only (never triton), so the dispatcher can consult it cheaply.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["KernelConfig", "bsr_mm_config", "bsr_mm_split_k", "bsr_sddmm_config", "nm_mm_config",
           "channel_mm_config", "TileConfig", "M_BUCKETS", "BSR_MM_TABLE", "NM_MM_TABLE", "CHANNEL_MM_TABLE",
           "interpreting", "sm_count"]


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# upper edges of the M buckets; M above the last edge uses the last column
M_BUCKETS = (16, 32, 64, 128, 256)

# (arch major, bn) -> one (BLOCK_M, num_warps, num_stages) per M bucket:
#                     M<=16        M<=32        M<=64        M<=128        M>128
BSR_MM_TABLE: dict[tuple[int, int], tuple[tuple[int, int, int], ...]] = {
    # sm80 / sm86 / sm89 (mma.sync; 163 KB of shared memory per block on A100, 99 KB on sm86/sm89)
    (8, 16):  ((16, 1, 5), (32, 2, 5), (64, 2, 5), (64, 4, 5), (128, 4, 5)),
    (8, 32):  ((16, 2, 5), (32, 2, 5), (64, 4, 5), (64, 4, 5), (128, 4, 5)),
    (8, 64):  ((16, 4, 5), (32, 4, 5), (64, 4, 5), (64, 4, 5), (128, 4, 5)),
    (8, 128): ((16, 4, 5), (32, 4, 5), (64, 4, 5), (64, 8, 5), (128, 8, 5)),
    # sm90 (wgmma for BLOCK_M >= 64, mma.sync below; 227 KB of shared memory per block)
    (9, 16):  ((16, 1, 5), (32, 2, 5), (64, 4, 5), (64, 4, 5), (128, 4, 5)),
    (9, 32):  ((16, 2, 5), (32, 2, 5), (64, 4, 5), (64, 4, 5), (128, 4, 5)),
    (9, 64):  ((16, 4, 5), (32, 4, 5), (64, 4, 5), (128, 4, 5), (128, 4, 5)),
    (9, 128): ((16, 4, 5), (32, 4, 5), (64, 4, 5), (128, 8, 5), (128, 8, 5)),
}

# for an arch the table does not know (sm75, sm100+): modest tiles, then fitted to its shared memory
_DEFAULT_ROW = ((16, 4, 5), (32, 4, 5), (64, 4, 5), (64, 4, 5), (64, 4, 5))

# max dynamic shared memory per block, when torch cannot tell us
_SMEM_FALLBACK = {8: 163 * 1024, 9: 227 * 1024}
_SMEM_DEFAULT = 99 * 1024


def _bucket(m: int) -> int:
    for i, edge in enumerate(M_BUCKETS[:-1]):
        if m <= edge:
            return i
    return len(M_BUCKETS) - 1


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set the way triton reads it (1/true/on/yes, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _device_info(index: int) -> tuple[int, int]:
    """(arch major, max dynamic shared memory per block in bytes) of CUDA device ``index``."""
    major, _minor = torch.cuda.get_device_capability(index)
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_FALLBACK.get(major, _SMEM_DEFAULT)
    return major, int(smem)


def _buffers(stages: int, major: int, block_m: int) -> int:
    """Shared-memory buffers Triton 3.6 allocates for this kernel (see the module docstring)."""
    n = 1 if stages <= 4 else 1 + (stages - 3) // 2
    if major >= 9 and block_m >= 64 and stages >= 2:
        n += 1  # wgmma keeps the buffer of the dot in flight
    return n


def smem_bytes(block_m: int, stages: int, bn: int, bk: int, elem: int, major: int) -> int:
    """Shared memory the kernel needs: the pipeline buffers, or the epilogue's [BLOCK_M, bn] layout
    conversion scratch (it reuses the buffers' space once the loop is done), plus the column index."""
    buffers = _buffers(stages, major, block_m) * (block_m * bk + bn * bk) * elem
    return max(buffers, block_m * bn * elem) + 64


def _fit(block_m: int, stages: int, bn: int, bk: int, elem: int, major: int, smem: int) -> tuple[int, int]:
    budget = int(smem * 0.9)  # ~10% margin for what the model above does not know
    while True:
        s = stages
        while s > 1 and smem_bytes(block_m, s, bn, bk, elem, major) > budget:
            s -= 1
        # S <= 2 means no async copies at all: a smaller tile that is pipelined beats a big one that is not
        if s >= 3 or block_m <= 16:
            return block_m, s
        block_m //= 2


def bsr_mm_config(m: int, bn: int, bk: int, dtype: torch.dtype, device: torch.device | None = None,
                  arch: tuple[int, int] | None = None) -> KernelConfig:
    """Launch config for ``_bsr_mm_kernel`` with x of M rows and (bn x bk) blocks.

    ``arch`` = (major, shared memory bytes) overrides the device query (the compile check uses it; it
    runs without a GPU). Under TRITON_INTERPRET=1 (and no ``arch``) it returns a 16-row tile: the
    interpreter runs every program in numpy, where small tiles are cheap and warps/stages mean nothing.
    """
    if arch is None and interpreting():
        return KernelConfig(block_m=16, num_warps=1, num_stages=1, group_m=8)
    if arch is None:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        arch = _device_info(index)
    major, smem = arch
    row = BSR_MM_TABLE.get((major, bn), _DEFAULT_ROW)
    block_m, num_warps, num_stages = row[_bucket(m)]
    elem = torch.empty((), dtype=dtype).element_size()
    block_m, num_stages = _fit(block_m, num_stages, bn, bk, elem, major, smem)
    return KernelConfig(block_m=block_m, num_warps=num_warps, num_stages=num_stages, group_m=8)


# ---------------------------------------------------------------------------------- split-K (decode shapes)
SPLIT_K_MAX_M = 64          # split-K only for M up to this (decode / small batch)
SPLIT_K_MAX = 16
_SM_FALLBACK = {8: 108, 9: 132}   # A100, H100 SXM


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device | None = None, arch_major: int | None = None) -> int:
    """Streaming multiprocessors of the device (or of an A100/H100 when only the arch is known)."""
    if device is not None and torch.device(device).type == "cuda":
        dev = torch.device(device)
        return _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    return _SM_FALLBACK.get(arch_major or 9, 108)


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def bsr_mm_split_k(m: int, n_block_rows: int, nnzb: int, bn: int, bk: int, device: torch.device | None = None,
                   sms: int | None = None) -> int:
    """How many programs share one block-row in ``k_bsr_mm`` (1 = the plain kernel).

    Split only when M <= 64 and the plain grid (row tiles x block-rows) gives fewer than two programs
    per SM; then split so that the grid reaches about two waves, keeping at least 2 stored blocks per
    program on average (the atomics of a split that has nothing to do are skipped, but its launch is
    not free). Uses nnzb (a shape, no GPU sync) rather than the per-row counts. Under the interpreter
    the answer is 1 (tests force split_k explicitly). Not measured on a GPU yet (none here).
    """
    if m > SPLIT_K_MAX_M or n_block_rows == 0 or nnzb == 0:
        return 1
    if sms is None:
        if interpreting() or device is None or torch.device(device).type != "cuda":
            return 1
        sms = sm_count(device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    programs = n_block_rows * -(-m // block_m)
    if programs >= 2 * sms:
        return 1
    avg_blocks = nnzb / n_block_rows
    by_work = int(avg_blocks // 2)
    by_grid = -(-2 * sms // programs)
    return max(1, min(SPLIT_K_MAX, _pow2_floor(min(by_work, by_grid))))


# ------------------------------------------------------------------------------- SDDMM / N:M / channel
@dataclass(frozen=True)
class TileConfig:
    """A GEMM-like tile: BLOCK_M x BLOCK_N output, BLOCK_K reduction step (kernels that fix a side ignore it)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split: int = 1


# bsr_sddmm: one program per stored block [bn, bk] (reduction over M in steps of BLOCK_M).
# (arch major, bn * bk) -> (BLOCK_M step, num_warps, num_stages)
BSR_SDDMM_TABLE: dict[tuple[int, int], tuple[int, int, int]] = {
    (8, 256): (64, 2, 4), (8, 512): (64, 4, 4), (8, 1024): (64, 4, 4), (8, 2048): (64, 4, 4),
    (8, 4096): (64, 4, 3), (8, 8192): (32, 8, 3), (8, 16384): (32, 8, 3),
    (9, 256): (64, 2, 4), (9, 512): (64, 4, 4), (9, 1024): (64, 4, 4), (9, 2048): (64, 4, 4),
    (9, 4096): (64, 4, 4), (9, 8192): (64, 8, 3), (9, 16384): (64, 8, 3),
}


def bsr_sddmm_config(m: int, nnzb: int, bn: int, bk: int, dtype: torch.dtype, device: torch.device | None = None,
                     arch: tuple[int, int] | None = None) -> TileConfig:
    """Config for ``k_bsr_sddmm``: the M step, warps, stages, and a split of M over programs (fp32 atomics)
    when there are too few stored blocks to fill the GPU and M is long."""
    if arch is None and interpreting():
        return TileConfig(block_m=16, block_n=bn, block_k=bk, num_warps=1, num_stages=1, split=1)
    if arch is None:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        arch = _device_info(dev.index if dev.index is not None else torch.cuda.current_device())
    major, smem = arch
    block_m, warps, stages = BSR_SDDMM_TABLE.get((major, bn * bk), (32, 4, 3))
    elem = torch.empty((), dtype=dtype).element_size()
    while stages > 1 and stages * block_m * (bn + bk) * elem + bn * bk * 4 > smem * 0.9:
        stages -= 1
    sms = sm_count(device, major) if device is not None else _SM_FALLBACK.get(major, 108)
    split = 1
    if 0 < nnzb < 2 * sms:
        split = max(1, min(SPLIT_K_MAX, _pow2_floor(min(-(-2 * sms // nnzb), m // (4 * block_m) or 1))))
    return TileConfig(block_m=block_m, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, split=split)


# nm_mm and channel_mm: (arch major) -> one (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket
#                 M<=16                M<=32                M<=64                M<=128               M>128
NM_MM_TABLE: dict[int, tuple[tuple[int, int, int, int, int], ...]] = {
    8: ((16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)),
    9: ((16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 3)),
}
CHANNEL_MM_TABLE: dict[int, tuple[tuple[int, int, int, int, int], ...]] = {
    8: ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3)),
    9: ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 3)),
}


def _tile_config(table: dict, m: int, dtype: torch.dtype, device: torch.device | None,
                 arch: tuple[int, int] | None) -> TileConfig:
    if arch is None and interpreting():
        return TileConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)
    if arch is None:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        arch = _device_info(dev.index if dev.index is not None else torch.cuda.current_device())
    major, smem = arch
    bm, bn, bk, warps, stages = table.get(major, table[8])[_bucket(m)]
    elem = torch.empty((), dtype=dtype).element_size()
    if elem == 4 and bk > 32:   # fp32 tiles: halve the K step (twice the bytes per element)
        bk //= 2
    while stages > 2 and stages * (bm + bn) * bk * elem > smem * 0.9:
        stages -= 1
    return TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def nm_mm_config(m: int, dtype: torch.dtype, device: torch.device | None = None,
                 arch: tuple[int, int] | None = None) -> TileConfig:
    """Config for ``k_nm_mm``: [BLOCK_M, BLOCK_N] output tile, BLOCK_K dense columns per step."""
    return _tile_config(NM_MM_TABLE, m, dtype, device, arch)


def channel_mm_config(m: int, dtype: torch.dtype, device: torch.device | None = None,
                      arch: tuple[int, int] | None = None) -> TileConfig:
    """Config for ``k_channel._channel_mm_kernel`` (gathered-input GEMM)."""
    return _tile_config(CHANNEL_MM_TABLE, m, dtype, device, arch)
