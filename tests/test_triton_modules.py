"""The modules added on top of the ops, through the Triton backend: SparseConv1d (the conv path with a 1 x k
kernel, strided and dilated; forward and dx) and a LinearMultiheadAttention whose projections are Triton
SparseLinears (forward). Interpreter runs on CPU (`pytest -m triton --triton-interpret`); compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
from _triton import DEVICE, close, needs_runner
from torch import nn

from sparsekit.nn import LinearMultiheadAttention, SparseConv1d, SparseLinear

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

pytestmark = [pytest.mark.triton, needs_runner]
DTYPES = [torch.float32, torch.float16]
DT_IDS = ["fp32", "fp16"]


def _block_zeros(w: torch.Tensor, block: tuple[int, int], keep: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    n, k = w.shape[0], w[0].numel()
    mask = torch.rand(n // block[0], k // block[1], generator=g) < keep
    mask[0] = False                                        # an empty block-row
    with torch.no_grad():
        w.view(n, k).mul_(mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1))


@pytest.mark.parametrize("conv_kw", [dict(padding=1), dict(stride=2, dilation=2, padding=3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sparse_conv1d_on_triton(dtype, conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv1d(16, 32, 3, **conv_kw)
    _block_zeros(conv.weight, (16, 16), 0.5)
    conv = conv.to(DEVICE, dtype)
    sc = SparseConv1d.from_dense(conv, format="bsr", block=16, backend="triton")
    x = torch.randn(2, 16, 13, device=DEVICE, dtype=dtype, requires_grad=True)
    ref_x = x.detach().double().requires_grad_()
    ref = nn.functional.conv1d(ref_x, conv.weight.double(), conv.bias.double(), **conv_kw)
    y = sc(x)
    close(y, ref, dtype, scale=4)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    close(x.grad, ref_x.grad, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_attention_with_triton_projections(dtype):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    for w in (mha.in_proj_weight, mha.out_proj.weight):
        _block_zeros(w, (16, 16), 0.5, seed=2)
    mha = mha.to(DEVICE, dtype).eval()
    lin = LinearMultiheadAttention.from_module(mha)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(lin, p, SparseLinear.from_dense(getattr(lin, p), format="bsr", block=16, backend="triton"))
    x = torch.randn(2, 5, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref = mha.double()(x.double(), x.double(), x.double(), need_weights=False)[0]
    close(lin(x, x, x, need_weights=False)[0], ref, dtype, scale=4)


@pytest.mark.cuda
def test_modules_compiled_on_a_gpu():
    """The same checks compiled (the GPU session runs `-m cuda` files; DEVICE is then "cuda")."""
    for dtype in DTYPES:
        for conv_kw in (dict(padding=1), dict(stride=2, dilation=2, padding=3)):
            test_sparse_conv1d_on_triton(dtype, conv_kw)
        test_linear_attention_with_triton_projections(dtype)
