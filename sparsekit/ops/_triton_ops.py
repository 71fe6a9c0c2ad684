"""Triton kernels wrapped as torch.library custom ops (``sparsekit::<family>_mm_triton``).

Defining the op does not import triton; the kernel module is imported on the first call. The backward
reuses the registered ``*_mm_t`` / ``*_sddmm`` ops (C++ kernels where built, the reference otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import bsr_backward, setup_indexed


@torch.library.custom_op("sparsekit::bsr_mm_triton", mutates_args=(), device_types=("cuda", "cpu"))
def bsr_mm_triton(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None,
                  n: int) -> Tensor:
    from ..kernels import k_bsr_mm

    return k_bsr_mm.bsr_mm(x, crow_indices, col_indices, values, bias, n)


@bsr_mm_triton.register_fake
def _(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None,
      n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


# same formulas as sparsekit::bsr_mm
bsr_mm_triton.register_autograd(bsr_backward, setup_context=setup_indexed)

OPS = {"bsr": bsr_mm_triton}
