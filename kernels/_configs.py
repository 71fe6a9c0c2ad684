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

__all__ = ["KernelConfig", "bsr_mm_config", "M_BUCKETS", "BSR_MM_TABLE", "interpreting"]


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
