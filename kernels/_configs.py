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
written). ``python -m sparsekit.kernels._compile_check --full`` compiles every entry for sm80/sm90 and checks
that its shared memory fits.

Measured tables take precedence over the hand-written rows, per arch major (``tuned_tables``):
``bench/tune_triton.py`` times the candidate configs (``*_candidates`` below) of every family and table row on a
GPU and writes a JSON table; the launchers read ``$SPARSEKIT_TRITON_CONFIGS`` (a file, applied when its
``arch_major`` is the device's) or else ``tuned_sm<major>0.json`` shipped next to this module, validated on first
use (a ValueError names the file and the bad entry), read once per process (``reload_tuned()`` forgets). Rows a
table leaves out keep the hand-written values. ``SPARSEKIT_TRITON_AUTOTUNE=1`` times the candidates live instead,
on the first launch of each key (kernels/_autotune.py).

This module imports torch only (never triton), so the dispatcher can consult it cheaply.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["KernelConfig", "bsr_mm_config", "bsr_mm_split_k", "bsr_sddmm_config", "nm_mm_config",
           "channel_mm_config", "TileConfig", "M_BUCKETS", "SPLIT_LIMIT", "tuned_tables", "load_tuned",
           "validate_tuned", "reload_tuned", "tuned_path", "TUNED_ENV", "FAMILIES", "bsr_mm_candidates",
           "bsr_sddmm_candidates", "tile_candidates", "hand_written_tables", "arch_of", "m_bucket", "BSR_MM_TABLE",
           "NM_MM_TABLE", "CHANNEL_MM_TABLE", "interpreting", "sm_count"]


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


def _cuda_arch(device: torch.device | str | None) -> tuple[int, int]:
    """_device_info of a CUDA ``device`` (None or no index: the current device)."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    return _device_info(dev.index if dev.index is not None else torch.cuda.current_device())


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
        arch = _cuda_arch(device)
    return _bsr_mm_row_config(_bucket(m), bn, bk, dtype.itemsize, *arch, os.environ.get(TUNED_ENV))


# Memoized per (bucket, block, element size, arch, $SPARSEKIT_TRITON_CONFIGS): every launch asks, and working the
# row out again cost ~25 us of host time per call on an H100's host (more than a small layer's kernel).
# reload_tuned() forgets them with the tables.
@functools.cache
def _bsr_mm_row_config(bucket: int, bn: int, bk: int, elem: int, major: int, smem: int,
                       tuned_env: str | None) -> KernelConfig:
    row = _tuned_for(major, elem).get("bsr_mm", {}).get(bn) or BSR_MM_TABLE.get((major, bn), _DEFAULT_ROW)
    block_m, num_warps, num_stages = row[bucket]
    block_m, num_stages = _fit(block_m, num_stages, bn, bk, elem, major, smem)
    block_m, num_warps = _fit_registers(block_m, num_warps, bn, bk, elem)
    return KernelConfig(block_m=block_m, num_warps=num_warps, num_stages=num_stages, group_m=8)


def _fit_registers(block_m: int, num_warps: int, bn: int, bk: int, elem: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of a bsr_mm / split-K / bsr_mm_t config (table row or tuning candidate) that does not
    spill registers: fp32 with a 128-deep K step gets 8 warps from 4096 outputs and at most 8192 outputs.

    Why: the "ieee" dot (an FMA loop, torch's default) spilled with big tiles (ptxas -v, bytes of spill stores per
    thread; see NM_MM_TABLE for how): bsr_mm sm90 bn 64 BLOCK_M 128 w4: 1480, bn 128 BLOCK_M 64 w4: 860, bn 32
    BLOCK_M 128 w4: 172; sm80 1300 / 720 / 72 and bn 128 BLOCK_M 128 w8: 700; split-K sm90 bn 128 BLOCK_M 64 w4:
    13524; bsr_mm_t up to 508. With the rule every such config spills at most 48 B (sm80 and sm90)."""
    if elem == 4 and bk >= 128:
        if block_m * bn >= 4096:
            num_warps = max(num_warps, 8)
        while block_m * bn > 8192 and block_m > 16:
            block_m //= 2
    return block_m, num_warps


# ---------------------------------------------------------------------------------- split-K (decode shapes)
SPLIT_K_MAX_M = 64          # split-K only for M up to this (decode / small batch)
SPLIT_K_MAX = 16
# explicit split_k (k_bsr_mm) / split (k_bsr_sddmm) above this are refused: the split is a grid dimension (CUDA
# allows 65535) and a constexpr (every value compiles a kernel of its own), and past a few dozen programs per
# block-row the atomics cost more than the parallelism gains
SPLIT_LIMIT = 64
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
    the answer is 1 (tests force split_k explicitly), and under torch.use_deterministic_algorithms(True) too
    (split-K adds fp32 partials with atomics, in an order that varies). The rule itself is not tuned on a GPU yet.
    """
    if m > SPLIT_K_MAX_M or n_block_rows == 0 or nnzb == 0 or torch.are_deterministic_algorithms_enabled():
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


def _sddmm_smem(block_m: int, stages: int, bn: int, bk: int, elem: int, major: int) -> int:
    """Shared memory of k_bsr_sddmm: the pipeline buffers of the dy^T and x tiles, or the epilogue's [bn, bk] layout
    conversion, whichever is larger. Triton 3.6 keeps ``stages - 1`` buffers on sm80 (at least one: an unpipelined
    dot still stages its operands there) and ``stages`` on sm90; this matches kernel.metadata.shared of
    triton.compile for sm80/sm90 (fp16/fp32, BLOCK_M 16-256, 16x16 to 128x128 blocks, split 1 and 4) or exceeds it."""
    buffers = (max(stages - 1, 1) if major < 9 else stages) * block_m * (bn + bk) * elem
    return max(buffers, bn * bk * elem)


def _fit_sddmm(block_m: int, stages: int, bn: int, bk: int, elem: int, major: int, smem: int) -> tuple[int, int]:
    """(BLOCK_M, stages) lowered until they fit ~90% of ``smem``: stages down to 1, then BLOCK_M halved (down to
    16), so that a measured row too big for this device (or for 4-byte elements) still launches."""
    budget = smem * 0.9
    while stages > 1 and _sddmm_smem(block_m, stages, bn, bk, elem, major) > budget:
        stages -= 1
    while block_m > 16 and _sddmm_smem(block_m, stages, bn, bk, elem, major) > budget:
        block_m //= 2
    return block_m, stages


def bsr_sddmm_config(m: int, nnzb: int, bn: int, bk: int, dtype: torch.dtype, device: torch.device | None = None,
                     arch: tuple[int, int] | None = None) -> TileConfig:
    """Config for ``k_bsr_sddmm``: the M step, warps, stages, and a split of M over programs (fp32 atomics)
    when there are too few stored blocks to fill the GPU and M is long; never under
    torch.use_deterministic_algorithms(True) (the atomics' order varies from run to run)."""
    if arch is None and interpreting():
        return TileConfig(block_m=16, block_n=bn, block_k=bk, num_warps=1, num_stages=1, split=1)
    if arch is None:
        arch = _cuda_arch(device)
    major, smem = arch
    elem = dtype.itemsize
    block_m, warps, stages = _tuned_for(major, elem).get("bsr_sddmm", {}).get(bn * bk) \
        or BSR_SDDMM_TABLE.get((major, bn * bk), (32, 4, 3))
    block_m, stages = _fit_sddmm(block_m, stages, bn, bk, elem, major, smem)
    sms = sm_count(device, major) if device is not None else _SM_FALLBACK.get(major, 108)
    split = 1
    if 0 < nnzb < 2 * sms and not torch.are_deterministic_algorithms_enabled():
        split = max(1, min(SPLIT_K_MAX, _pow2_floor(min(-(-2 * sms // nnzb), m // (4 * block_m) or 1))))
    return TileConfig(block_m=block_m, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, split=split)


# nm_mm and channel_mm: (arch major) -> one (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket, for
# 2-byte elements (fp16/bf16); 4-byte (fp32) tiles follow from them by _FP32_RULE, then every tile (measured rows
# too) is fitted to the device's shared memory (_fit_tile).
#
# Sized by registers, not only shared memory. Measured without a GPU: triton.compile for GPUTarget sm80 / sm90 with
# triton 3.6 and its bundled ptxas, reading ptxas -v (what the compile check reads, _compile_check.SPILL_LIMIT);
# figures are bytes of spill stores / registers per thread, 2:4 with bias unless said otherwise, old -> new row.
# Not timed (no GPU): among the rows that do not spill, the biggest tile, more warps rather than a smaller tile.
#   nm_mm (the weight tile is densified in registers; it is not cp.async-pipelined, stages hardly matter):
#     sm80 16x64x128 w4: 0/240 (4:8 28, 3:5 316)  -> w8: 0/203 (4:8 0/223, 3:5 0/249)
#     sm80 32x64x128 w4: 324                      -> w8: 0/250 (4:8 0/249)
#     sm80 64x64x64 w4: 404                       -> w8: 0/228 (4:8 0/255)
#     sm80 64x128x64 w4: 4732 (at 32 registers)   -> 64x128x32 w8: 0/167 (4:8 0/234; 64x128x64 w8: 80)
#     sm80 128x128x64 w8: 388                     -> 128x128x16 w8: 0/166 (4:8 0/197; 128x128x32 w8: 0/246, 4:8 128)
#     sm90 16x64x128 w4: 0/255 (4:8 20)           -> w8: 0/205 (4:8 0/161)
#     sm90 32x64x128 w4: 96                       -> w8: 0/246 (4:8 0/233)
#     sm90 64x64x64 w4: 104                       -> w8: 0/218 (4:8 0/241)
#     sm90 128x128x64 w8: 120 (w16: 56)           -> 128x128x32 w8: 0/242 (4:8 36/255)
#     bf16 = fp16. fp32 used to halve BLOCK_K only: input_precision "ieee" (torch's default, TF32 off: an FMA dot)
#     spilled 5-12 KB in every bucket on both arches (sm90 16x64x64: 5028, 128x128x32 w8: 11128), "tf32" up to 900.
#     Now fp32 takes BLOCK_K 16 and at most 1024 outputs per warp: ieee / tf32, sm80: 16x64x16 w8 0/110 / 0/101,
#     32x64x16 w8 4/128 / 0/112, 64x64x16 w8 0/186 / 0/122, 64x128x16 w8 0/255 / 0/165, 128x64x16 w8 0/255 / 0/151;
#     sm90: 0/110 / 0/95, 0/143 / 0/101, 0/188 / 0/116, 128x64x16 w8 0/255 / 0/146 (ieee 4:8 at most 8 B; ieee
#     128x128x16 spills 5888 at w8 and 2488 at w16, 64x128x16 w4 5728).
#   channel_mm (the x tile is gathered through the index vector): rows up to 64x64 do not spill (fp16 0/155-208,
#   fp32 ieee / tf32 0/94-227);
#     sm80 64x128x32 w4: fp16 0/255, ieee 36, tf32 52 -> w8: fp16 0/128, fp32 (BLOCK_K 16) 0/115
#     128x128 w8: sm80 (BLOCK_K 32) fp16 84, ieee 148, tf32 60; sm90 (BLOCK_K 64) fp16 184, ieee (32) 168, tf32 48
#       -> 128x128x32 w16, fp32 BLOCK_K 16: sm80 fp16 16/128, ieee 0/110, tf32 0/120; sm90 fp16 0/128, ieee 20/128,
#          tf32 0/128 (fp32 with BLOCK_K 32 at w16 still spills 60-88; 128x64x32 w8 would not spill either)
#                 M<=16                M<=32                M<=64                M<=128               M>128
NM_MM_TABLE: dict[int, tuple[tuple[int, int, int, int, int], ...]] = {
    8: ((16, 64, 128, 8, 3), (32, 64, 128, 8, 3), (64, 64, 64, 8, 3), (64, 128, 32, 8, 3), (128, 128, 16, 8, 3)),
    9: ((16, 64, 128, 8, 3), (32, 64, 128, 8, 3), (64, 64, 64, 8, 3), (128, 128, 32, 8, 3), (128, 128, 32, 8, 3)),
}
CHANNEL_MM_TABLE: dict[int, tuple[tuple[int, int, int, int, int], ...]] = {
    8: ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 8, 4), (128, 128, 32, 16, 3)),
    9: ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 16, 3), (128, 128, 32, 16, 3)),
}
_TILE_TABLES = {"nm_mm": NM_MM_TABLE, "channel_mm": CHANNEL_MM_TABLE}
# 4-byte elements, per family: (BLOCK_K, most outputs per warp); BLOCK_K None = half the 2-byte row's (not below 16)
_FP32_RULE = {"nm_mm": (16, 1024), "channel_mm": (None, None)}
_MIN_SIDE = 16


def _tile_smem(bm: int, bn: int, bk: int, stages: int, elem: int) -> int:
    """Shared memory a GEMM-like tile needs (model): ``stages`` buffers of the x and w tiles, or the epilogue's
    [BLOCK_M, BLOCK_N] layout conversion, whichever is larger."""
    return max(stages * (bm + bn) * bk * elem, bm * bn * elem)


def _fit_tile(family: str, bm: int, bn: int, bk: int, warps: int, stages: int, elem: int,
              smem: int) -> TileConfig:
    """A (hand-written or measured) row made launchable: the 4-byte rule (_FP32_RULE), then stages lowered (down to
    2), then BLOCK_K halved (down to 16), then the larger of BLOCK_M / BLOCK_N (BLOCK_N on a tie), until the tile
    fits ~90% of ``smem``."""
    if elem == 4:
        k32, per_warp = _FP32_RULE[family]
        bk = k32 if k32 is not None else max(_MIN_SIDE, bk // 2)
        while per_warp is not None and bm * bn > per_warp * warps and max(bm, bn) > _MIN_SIDE:
            if bn >= bm:
                bn //= 2
            else:
                bm //= 2
    budget = smem * 0.9
    while stages > 2 and _tile_smem(bm, bn, bk, stages, elem) > budget:
        stages -= 1
    while _tile_smem(bm, bn, bk, stages, elem) > budget:
        if bk > _MIN_SIDE:
            bk //= 2
        elif max(bm, bn) > _MIN_SIDE:
            if bn >= bm:
                bn //= 2
            else:
                bm //= 2
        else:
            break
    return TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def _tile_config(family: str, m: int, dtype: torch.dtype, device: torch.device | None,
                 arch: tuple[int, int] | None) -> TileConfig:
    if arch is None and interpreting():
        return TileConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)
    if arch is None:
        arch = _cuda_arch(device)
    return _tile_row_config(family, _bucket(m), dtype.itemsize, *arch, os.environ.get(TUNED_ENV))


@functools.cache
def _tile_row_config(family: str, bucket: int, elem: int, major: int, smem: int, tuned_env: str | None) -> TileConfig:
    """_tile_config's row, memoized as _bsr_mm_row_config (the family names its hand-written table)."""
    table = _TILE_TABLES[family]
    rows = _tuned_for(major, elem).get(family) or table.get(major, table[8])
    bm, bn, bk, warps, stages = rows[bucket]
    return _fit_tile(family, bm, bn, bk, warps, stages, elem, smem)


def nm_mm_config(m: int, dtype: torch.dtype, device: torch.device | None = None,
                 arch: tuple[int, int] | None = None) -> TileConfig:
    """Config for ``k_nm_mm``: [BLOCK_M, BLOCK_N] output tile, BLOCK_K dense columns per step."""
    return _tile_config("nm_mm", m, dtype, device, arch)


def channel_mm_config(m: int, dtype: torch.dtype, device: torch.device | None = None,
                      arch: tuple[int, int] | None = None) -> TileConfig:
    """Config for ``k_channel._channel_mm_kernel`` (gathered-input GEMM)."""
    return _tile_config("channel_mm", m, dtype, device, arch)


# ------------------------------------------------------------------------------ measured tables (JSON)
TUNED_ENV = "SPARSEKIT_TRITON_CONFIGS"
TUNED_FORMAT = "sparsekit-triton-configs"
TUNED_VERSION = 1
FAMILIES = ("bsr_mm", "bsr_sddmm", "nm_mm", "channel_mm")
BLOCK_SIDES = (16, 32, 64, 128)
# informative fields of a table file (what it was measured on), not validated beyond their JSON type
_INFO_KEYS = ("device", "capability", "smem", "sms", "dtype", "torch", "triton", "created", "shapes", "measured")
_WARPS = (1, 2, 4, 8, 16)
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}   # a table's "dtype": the element size its rows serve


def tuned_path(major: int) -> Path:
    """The measured table shipped for arch ``major`` next to this module (it may not exist)."""
    return Path(__file__).with_name(f"tuned_sm{major}0.json")


def _pow2(v: int, lo: int, hi: int) -> bool:
    return lo <= v <= hi and v & (v - 1) == 0


def _ints(value: object, n: int, where: str, source: str, fields: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n or \
            any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{source}: {where} must be a list of {n} ints [{fields}], got {value!r}")
    return tuple(value)


def _launch_row(value: object, where: str, source: str) -> tuple[int, int, int]:
    """[BLOCK_M, num_warps, num_stages] (bsr_mm per M bucket, bsr_sddmm per block size)."""
    bm, warps, stages = _ints(value, 3, where, source, "BLOCK_M, num_warps, num_stages")
    if not _pow2(bm, 16, 256) or warps not in _WARPS or not 1 <= stages <= 8:
        raise ValueError(f"{source}: {where} = {list(value)}: BLOCK_M must be a power of two in [16, 256], num_warps "
                         f"one of {_WARPS}, num_stages in [1, 8]")
    return bm, warps, stages


def _tile_row(value: object, where: str, source: str) -> tuple[int, int, int, int, int]:
    """[BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages] (nm_mm / channel_mm per M bucket)."""
    bm, bn, bk, warps, stages = _ints(value, 5, where, source, "BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages")
    if not all(_pow2(v, 16, 256) for v in (bm, bn, bk)) or warps not in _WARPS or not 1 <= stages <= 8:
        raise ValueError(f"{source}: {where} = {list(value)}: BLOCK_M, BLOCK_N and BLOCK_K must be powers of two in "
                         f"[16, 256], num_warps one of {_WARPS}, num_stages in [1, 8]")
    return bm, bn, bk, warps, stages


def _check_tile_smem(row: tuple[int, int, int, int, int], major: int, where: str, source: str) -> None:
    """A tile row that needs more shared memory than any GPU of its arch has, even at 2 stages of 2-byte elements,
    cannot have been measured there: refuse it (rows that fit only in fp16, or only on the arch's bigger GPUs, are
    fitted at launch by _fit_tile)."""
    bm, bn, bk, _warps, stages = row
    need = _tile_smem(bm, bn, bk, min(stages, 2), 2)
    most = _SMEM_FALLBACK.get(major, max(_SMEM_FALLBACK.values()))
    if need > most:
        raise ValueError(f"{source}: {where} = {list(row)} needs ~{need // 1024} KB of shared memory (2 stages of "
                         f"fp16 [BLOCK_M + BLOCK_N, BLOCK_K] tiles), more than an sm{major}x GPU has "
                         f"({most // 1024} KB): not a row the tuner can have measured")


def _per_bucket(value: object, where: str, source: str, row) -> tuple:
    if not isinstance(value, list) or len(value) != len(M_BUCKETS):
        raise ValueError(f"{source}: {where} must be a list of {len(M_BUCKETS)} rows, one per M bucket (M <= "
                         f"{', '.join(map(str, M_BUCKETS[:-1]))}, more), got {value!r}")
    return tuple(row(v, f"{where}[{i}]", source) for i, v in enumerate(value))


def _int_keys(value: object, where: str, source: str, allowed: tuple[int, ...]) -> dict[int, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {where} must be an object keyed by {allowed}, got {type(value).__name__}")
    out = {}
    for key, v in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) in allowed):
            raise ValueError(f"{source}: {where} has key {key!r}; keys must be one of {[str(a) for a in allowed]}")
        out[int(key)] = v
    return out


def validate_tuned(data: object, source: str = "<table>") -> dict:
    """A measured table (as bench/tune_triton.py writes it, parsed from JSON) checked and normalised:
    {"arch_major": int, "bsr_mm": {bn: rows}, "bsr_sddmm": {bn*bk: row}, "nm_mm": rows, "channel_mm": rows} with
    only the families present. ValueError naming ``source`` (the file) and the bad entry otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a measured Triton table must be a JSON object, got {type(data).__name__}")
    allowed = ("format", "version", "arch_major", "m_buckets", *FAMILIES, *_INFO_KEYS)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; a table has {list(allowed)}")
    if data.get("format") != TUNED_FORMAT or data.get("version") != TUNED_VERSION:
        raise ValueError(f"{source}: format/version must be {TUNED_FORMAT!r}/{TUNED_VERSION}, got "
                         f"{data.get('format')!r}/{data.get('version')!r} (written by bench/tune_triton.py?)")
    major = data.get("arch_major")
    if isinstance(major, bool) or not isinstance(major, int) or not 7 <= major <= 20:
        raise ValueError(f"{source}: arch_major must be the GPU's compute capability major (an int such as 8 or 9), "
                         f"got {major!r}")
    if data.get("m_buckets") != list(M_BUCKETS):
        raise ValueError(f"{source}: m_buckets must be {list(M_BUCKETS)} (this sparsekit's M buckets), got "
                         f"{data.get('m_buckets')!r}: re-run bench/tune_triton.py")
    out: dict = {"arch_major": major}
    if "bsr_mm" in data:
        rows = _int_keys(data["bsr_mm"], "bsr_mm", source, BLOCK_SIDES)
        out["bsr_mm"] = {bn: _per_bucket(v, f"bsr_mm[{bn}]", source, _launch_row) for bn, v in rows.items()}
    if "bsr_sddmm" in data:
        sizes = tuple(sorted({a * b for a in BLOCK_SIDES for b in BLOCK_SIDES}))
        rows = _int_keys(data["bsr_sddmm"], "bsr_sddmm", source, sizes)
        out["bsr_sddmm"] = {size: _launch_row(v, f"bsr_sddmm[{size}]", source) for size, v in rows.items()}
    for family in ("nm_mm", "channel_mm"):
        if family in data:
            out[family] = _per_bucket(data[family], family, source, _tile_row)
            for i, row in enumerate(out[family]):
                _check_tile_smem(row, major, f"{family}[{i}]", source)
    if isinstance(data.get("measured"), (list, str, int, float)):
        raise ValueError(f"{source}: measured must be an object (the timings), got {type(data['measured']).__name__}")
    if "dtype" in data:   # what the rows were timed in: decides which element size they serve (_tuned_for)
        if data["dtype"] not in _DTYPE_BYTES:
            raise ValueError(f"{source}: dtype must be one of {sorted(_DTYPE_BYTES)}, got {data['dtype']!r}")
        out["dtype"] = data["dtype"]
    return out


def load_tuned(path: str | os.PathLike) -> dict:
    """Read and validate a measured table file (see validate_tuned); ValueError naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the measured Triton table ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return validate_tuned(data, str(path))


@functools.cache
def _cached(path: str) -> dict:
    return load_tuned(path)


@functools.cache
def _shipped(major: int) -> str | None:
    p = tuned_path(major)
    return str(p) if p.is_file() else None


def tuned_tables(major: int) -> dict:
    """The measured table for arch ``major``: the file named by $SPARSEKIT_TRITON_CONFIGS when its arch_major is
    ``major``, else the one shipped next to this module, else {} (the hand-written tables serve)."""
    env = os.environ.get(TUNED_ENV)
    if env:
        try:
            table = _cached(env)
        except ValueError as exc:
            raise ValueError(f"{exc} (named by {TUNED_ENV})") from None
        if table["arch_major"] == major:
            return table
    shipped = _shipped(major)
    return _cached(shipped) if shipped is not None else {}


def _tuned_for(major: int, elem: int) -> dict:
    """The measured table for arch ``major`` if it was measured at element size ``elem`` (its "dtype": fp16 and
    bf16 share 2-byte rows), else {}: a row timed in fp16, refitted for fp32, can spill registers (the compile
    check showed 1.4 KB per thread for channel_mm), so 4-byte launches keep the hand-written rows, which were
    sized against spills, unless the table was measured in fp32. A table that names no dtype serves every size."""
    table = tuned_tables(major)
    measured = table.get("dtype")
    return table if measured is None or _DTYPE_BYTES.get(measured) == elem else {}


def reload_tuned() -> None:
    """Forget the tables read so far and the configs worked out from them (the next launch reads the files
    again)."""
    _cached.cache_clear()
    _shipped.cache_clear()
    _bsr_mm_row_config.cache_clear()
    _tile_row_config.cache_clear()


def hand_written_tables(major: int) -> dict:
    """The hand-written rows for arch ``major`` in the measured tables' JSON layout (what tune_triton.py starts
    from, so a table it writes is complete even where it measured nothing)."""
    return {
        "bsr_mm": {str(bn): [list(r) for r in BSR_MM_TABLE.get((major, bn), _DEFAULT_ROW)] for bn in BLOCK_SIDES},
        "bsr_sddmm": {str(size): list(BSR_SDDMM_TABLE.get((major, size), (32, 4, 3)))
                      for size in sorted({a * b for a in BLOCK_SIDES for b in BLOCK_SIDES})},
        "nm_mm": [list(r) for r in NM_MM_TABLE.get(major, NM_MM_TABLE[8])],
        "channel_mm": [list(r) for r in CHANNEL_MM_TABLE.get(major, CHANNEL_MM_TABLE[8])],
    }


# ------------------------------------------------------------------------------ candidates (tuning, autotune)
def arch_of(device: torch.device) -> tuple[int, int]:
    """(arch major, shared memory bytes) of a CUDA device; for CPU tensors (the interpreter, tests only) an H100's,
    so that the candidate lists are those an sm90 GPU would time."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 9, _SMEM_FALLBACK[9]
    return _cuda_arch(dev)


def m_bucket(m: int) -> int:
    """Index of M's bucket in M_BUCKETS (the tables' columns; part of the live autotuner's keys)."""
    return _bucket(m)


def _block_ms(m: int, top: int = 128) -> list[int]:
    """BLOCK_M worth trying for M rows: 16 up to M rounded up to a power of two (at most ``top``); for large M the
    three largest."""
    hi = min(top, max(16, 1 << max(0, (max(m, 1) - 1).bit_length())))
    sides = [b for b in (16, 32, 64, 128) if b <= hi]
    return sides[-3:]


def _nearest_first(items: list) -> list:
    """Duplicates dropped, the first (the table's config) kept first and the rest ordered by how far they are from
    it (powers of two of the tile sides and warps, then stages), so that a truncated list (the tuner's
    --max-candidates) keeps the table's neighbourhood."""
    from math import log2

    items = list(dict.fromkeys(items))
    first = items[0]

    def distance(c) -> float:
        d = sum(abs(log2(getattr(c, f)) - log2(getattr(first, f))) for f in ("block_m", "block_n", "block_k",
                                                                               "num_warps") if hasattr(c, f))
        return d + abs(c.num_stages - first.num_stages) / 2

    return [first] + sorted(items[1:], key=distance)


def bsr_mm_candidates(m: int, bn: int, bk: int, dtype: torch.dtype, arch: tuple[int, int]) -> list[KernelConfig]:
    """Configs of ``_bsr_mm_kernel`` (and bsr_mm_t's, sides swapped) worth timing for M rows and (bn x bk) blocks on
    ``arch`` = (major, shared memory bytes): the table's own choice first, then BLOCK_M from the M bucket, 2-8
    warps, 3/5/7 stages (one, two or three pipeline buffers, see the module docstring), each fitted to the shared
    memory and to the fp32 register rule (_fit_registers) as the table's rows are, duplicates dropped, nearest to
    the table's first."""
    major, smem = arch
    elem = dtype.itemsize
    out = [bsr_mm_config(m, bn, bk, dtype, arch=arch)]
    for bm in _block_ms(m):
        for warps in (2, 4, 8):
            for stages in (3, 5, 7):
                fbm, fst = _fit(bm, stages, bn, bk, elem, major, smem)
                fbm, fw = _fit_registers(fbm, warps, bn, bk, elem)
                out.append(KernelConfig(block_m=fbm, num_warps=fw, num_stages=fst, group_m=8))
    return _nearest_first(out)


def bsr_sddmm_candidates(m: int, nnzb: int, bn: int, bk: int, dtype: torch.dtype,
                         arch: tuple[int, int]) -> list[TileConfig]:
    """Configs of ``k_bsr_sddmm`` worth timing: the table's first, then BLOCK_M (the M step) 32/64/128, 2-8 warps,
    2-4 stages, fitted to the shared memory; the split of M as the table's rule gives it."""
    major, smem = arch
    elem = dtype.itemsize
    first = bsr_sddmm_config(m, nnzb, bn, bk, dtype, arch=arch)
    out = [first]
    for bm in (32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (2, 3, 4):
                fbm, fst = _fit_sddmm(bm, stages, bn, bk, elem, major, smem)
                out.append(TileConfig(block_m=fbm, block_n=bn, block_k=bk, num_warps=warps, num_stages=fst,
                                      split=first.split))
    return _nearest_first(out)


def tile_candidates(family: str, m: int, dtype: torch.dtype, arch: tuple[int, int]) -> list[TileConfig]:
    """Configs of ``k_nm_mm`` (family "nm_mm") or ``k_channel._channel_mm_kernel`` ("channel_mm") worth timing:
    the table's first, then BLOCK_M from the M bucket x (BLOCK_N, BLOCK_K) in (64, 64), (64, 128), (128, 64),
    (128, 32) x 4/8 warps x 3/4 stages, fitted as the table's rows are (_fit_tile: the fp32 rule, shared memory)."""
    if family not in ("nm_mm", "channel_mm"):
        raise ValueError(f"family must be 'nm_mm' or 'channel_mm', got {family!r}")
    major, smem = arch
    elem = dtype.itemsize
    out = [_tile_config(family, m, dtype, None, arch)]
    for bm in _block_ms(m):
        for bn, bk in ((64, 64), (64, 128), (128, 64), (128, 32)):
            for warps in (4, 8):
                for stages in (3, 4):
                    out.append(_fit_tile(family, bm, bn, bk, warps, stages, elem, smem))
    return _nearest_first(out)
