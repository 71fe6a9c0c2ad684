"""Tile indexing shared by the Triton kernels (k_bsr_mm, k_bsr_mm_t, k_nm_mm, k_channel), written once.

These are ``@triton.jit`` helpers: Triton inlines them into the calling kernel, so a kernel that calls them
compiles to the same code as one that spells them out.

    grouped_pid     the grouped ("L2 swizzle") program order of the 2-D output-tile kernels
    row_tile        the int64 row indices and the row mask of a BLOCK_M tile of rows
    DYNAMIC_M       ``do_not_specialize`` of every kernel that takes the row count M

Importing this module imports triton.
"""

import triton
import triton.language as tl

__all__ = ["grouped_pid", "row_tile", "DYNAMIC_M"]

# Triton compiles an int argument equal to 1, or divisible by 16, into a binary of its own. For the row count M (the
# batch) that would mean a new compile and module load whenever the batch crosses those classes: extra compiles in
# a decode loop, and a failure inside torch.cuda.graph capture when M differs from the eager warm-up's (a kernel
# must be compiled and loaded before capture). M is only a mask bound, a loop bound and a tile count in these
# kernels, so the specialisation buys nothing. BLOCK_M and the split factors still follow M's bucket
# (kernels/_configs.py): under capture every captured shape must have run once eagerly first.
DYNAMIC_M = ["M"]


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` over a num_pid_m x num_pid_n grid of output tiles, in groups of
    GROUP_M row tiles per column tile (the usual L2 swizzle): neighbouring programs share a column tile of the
    weight and, across a group, the same row tiles of the input."""
    pids_per_group = GROUP_M * num_pid_n
    group = pid // pids_per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_size
    pid_n = (pid % pids_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def row_tile(m0, M, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0+BLOCK_M-1 as int64 (M * K and M * N may pass 2**31) and the mask of those below M."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    return offs_m.to(tl.int64), mask_m
