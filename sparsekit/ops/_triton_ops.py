"""Triton kernels wrapped as torch.library custom ops (``sparsekit::<family>_<verb>_triton``).

    bsr_mm_triton     y = x @ W^T + b            kernels/k_bsr_mm.py (split-K path for M <= 64)
    bsr_mm_t_triton   dx = dy @ W                kernels/k_bsr_mm_t.py (transposed pattern, cached per pattern)
    bsr_sddmm_triton  dW on W's stored blocks    kernels/k_bsr_sddmm.py
    nm_mm_triton      y = x @ W^T + b, W n:m     kernels/k_nm_mm.py

The ops take x, dy and bias in any strides (made contiguous for the kernels, as the C++ kernels do); the format
tensors as the formats hold them (contiguous: BSR/NM.validate()). Defining the ops does not import triton;
the kernel module is imported on the first call. The autograd of bsr_mm_triton runs its backward on the
Triton ops above (CUDA, or CPU under TRITON_INTERPRET=1), so training with a fixed block pattern stays on
Triton. nm_mm_triton's backward reuses the registered
``nm_mm_t`` / ``nm_sddmm`` ops (C++ kernels where built, the reference otherwise).

Under torch.cuda.graph capture, each captured shape must have run once eagerly first: the kernels compile one
binary per launch config, and the config (BLOCK_M, the split-K / SDDMM splits) follows M (kernels/_tiles.DYNAMIC_M).
"""

# no `from __future__ import annotations` here: torch.library.custom_op reads the schema from the annotations,
# and torch 2.4 cannot parse them as strings
import torch
from torch import Tensor

from ._library import _nm_backward, _nm_setup, setup_indexed


def _contiguous(t: Tensor | None) -> Tensor | None:
    # the kernels address x / dy / bias as dense row-major arrays (k_*.check_tensor refuses anything else), while
    # the ops accept any layout like the C++ kernels do (a bias sliced from a wider one, a transposed x): a copy
    # only where the layout differs
    return None if t is None else t.contiguous()


def _bsr_mm(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None,
            n: int) -> Tensor:
    from ..kernels import k_bsr_mm

    return k_bsr_mm.bsr_mm(x.contiguous(), crow_indices, col_indices, values, _contiguous(bias), n)


bsr_mm_triton = torch.library.custom_op("sparsekit::bsr_mm_triton", mutates_args=(),
                                        device_types=("cuda", "cpu"))(_bsr_mm)


@bsr_mm_triton.register_fake
def _(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None,
      n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("sparsekit::bsr_mm_t_triton", mutates_args=(), device_types=("cuda", "cpu"))
def bsr_mm_t_triton(dy: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, k: int) -> Tensor:
    from ..kernels import k_bsr_mm_t

    return k_bsr_mm_t.bsr_mm_t(dy.contiguous(), crow_indices, col_indices, values, k)


@bsr_mm_t_triton.register_fake
def _(dy: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, k: int) -> Tensor:
    return dy.new_empty(dy.shape[0], k)


@torch.library.custom_op("sparsekit::bsr_sddmm_triton", mutates_args=(), device_types=("cuda", "cpu"))
def bsr_sddmm_triton(dy: Tensor, x: Tensor, crow_indices: Tensor, col_indices: Tensor, block_n: int,
                     block_k: int) -> Tensor:
    from ..kernels import k_bsr_sddmm

    return k_bsr_sddmm.bsr_sddmm(dy.contiguous(), x.contiguous(), crow_indices, col_indices, block_n, block_k)


@bsr_sddmm_triton.register_fake
def _(dy: Tensor, x: Tensor, crow_indices: Tensor, col_indices: Tensor, block_n: int, block_k: int) -> Tensor:
    return dy.new_empty(col_indices.shape[0], block_n, block_k)


def _bsr_triton_backward(ctx, dy: Tensor):
    x, crow, col, values = ctx.saved_tensors
    dy = dy.contiguous()
    need_x, _, _, need_v, need_b, _ = ctx.needs_input_grad
    dx = bsr_mm_t_triton(dy, crow, col, values, x.shape[1]) if need_x else None
    dv = bsr_sddmm_triton(dy, x, crow, col, values.shape[1], values.shape[2]) if need_v else None
    db = dy.sum(0) if ctx.has_bias and need_b else None
    return dx, None, None, dv, db, None


bsr_mm_triton.register_autograd(_bsr_triton_backward, setup_context=setup_indexed)


def _nm_mm(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, n: int, m: int) -> Tensor:
    from ..kernels import k_nm_mm

    return k_nm_mm.nm_mm(x.contiguous(), values, indices, _contiguous(bias), n, m)


nm_mm_triton = torch.library.custom_op("sparsekit::nm_mm_triton", mutates_args=(),
                                       device_types=("cuda", "cpu"))(_nm_mm)


@nm_mm_triton.register_fake
def _(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, n: int, m: int) -> Tensor:
    return x.new_empty(x.shape[0], values.shape[0])


# same formulas as sparsekit::nm_mm (nm_mm_t / nm_sddmm: C++ where built, the reference otherwise)
nm_mm_triton.register_autograd(_nm_backward, setup_context=_nm_setup)

OPS = {"bsr": bsr_mm_triton, "nm": nm_mm_triton}
# the ops' bodies, which an eager call that needs no autograd, tracing or mode runs directly (_library.call_op): the
# custom-op layer costs tens of microseconds of Python per call, more than a small layer's kernel
EAGER = {"bsr": _bsr_mm, "nm": _nm_mm}
