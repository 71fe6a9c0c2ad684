"""Pure-PyTorch reference implementations of every sparsekit op (same signatures as the schemas).

They densify the weight and use torch's matmul: slow, simple, always available, and the ground truth
every fast backend is tested against. They are differentiable through ordinary autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import BSR, CSR, NM, unpack_bitmap


def conv_out_size(sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> tuple[int, ...]:
    """The output's spatial sizes of a convolution of input ``sizes`` (one entry per spatial dim everywhere)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation))


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias


def tile_taps(yt: Tensor, sizes: Sequence[int], kernel: Sequence[int]) -> Tensor:
    """A transposed conv's columns ``y^T [B, C_out * prod(kernel), prod(sizes)]`` (rows ``(c, *tap)``, columns the
    input pixels) as its output ``[B, C_out, *(sizes * kernel)]`` when the kernel equals the stride: output pixel
    ``pixel * kernel + tap`` of channel c is row ``(c, *tap)``, column ``pixel`` (the taps tile the output)."""
    nd, b, n = len(sizes), yt.shape[0], yt.shape[1]
    c = n // math.prod(kernel)
    order = [0, 1] + [i for d in range(nd) for i in (2 + nd + d, 2 + d)]
    return yt.reshape(b, c, *kernel, *sizes).permute(order).reshape(b, c, *(s * k for s, k in zip(sizes, kernel)))


def untile_taps(y: Tensor, sizes: Sequence[int], kernel: Sequence[int]) -> Tensor:
    """The inverse of ``tile_taps``: ``[B, C_out, *(sizes * kernel)]`` back to ``[B, C_out * prod(kernel),
    prod(sizes)]``."""
    nd, b, c = len(sizes), y.shape[0], y.shape[1]
    split = y.reshape(b, c, *(v for s, k in zip(sizes, kernel) for v in (s, k)))
    order = [0, 1] + [3 + 2 * d for d in range(nd)] + [2 + 2 * d for d in range(nd)]
    return split.permute(order).reshape(b, c * math.prod(kernel), math.prod(sizes))


def _dense_bsr(crow: Tensor, col: Tensor, values: Tensor, n: int, k: int) -> Tensor:
    return BSR(values=values, crow_indices=crow, col_indices=col, shape=(int(n), int(k))).to_dense()


def _dense_csr(crow: Tensor, col: Tensor, values: Tensor, n: int, k: int) -> Tensor:
    return CSR(values=values, crow_indices=crow, col_indices=col, shape=(int(n), int(k))).to_dense()


def _dense_nm(values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    rows, kept = values.shape
    return NM(values=values, indices=indices, shape=(rows, kept // n * m), n=n, m=m).to_dense()


# ------------------------------------------------------------------------------------------------- BSR
def bsr_mm(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return _add_bias(x @ _dense_bsr(crow, col, values, n, x.shape[1]).t(), bias)


def _add_bias_rows(yt: Tensor, bias: Tensor | None) -> Tensor:
    return yt if bias is None else yt + bias[:, None]


def bsr_mm_xt(xt: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return _add_bias_rows(_dense_bsr(crow, col, values, n, xt.shape[1]) @ xt, bias)


def bsr_mm_xt_tiled(xt: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int,
                    sizes: list[int], kernel: list[int]) -> Tensor:
    return tile_taps(bsr_mm_xt(xt, crow, col, values, bias, n), sizes, kernel)


def bsr_conv2d(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, kernel_size: list[int],
               padding: list[int], dilation: list[int], stride: Sequence[int] = (1, 1)) -> Tensor:
    n, c = (crow.numel() - 1) * values.shape[1], x.shape[1]
    w = _dense_bsr(crow, col, values, n, c * math.prod(kernel_size)).reshape(n, c, *kernel_size)
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))


def bsr_conv3d(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, kernel_size: list[int],
               padding: list[int], dilation: list[int], stride: Sequence[int] = (1, 1, 1)) -> Tensor:
    n, c = (crow.numel() - 1) * values.shape[1], x.shape[1]
    w = _dense_bsr(crow, col, values, n, c * math.prod(kernel_size)).reshape(n, c, *kernel_size)
    return F.conv3d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))


def bsr_mm_t(dy: Tensor, crow: Tensor, col: Tensor, values: Tensor, k: int) -> Tensor:
    return dy @ _dense_bsr(crow, col, values, dy.shape[1], k)


def bsr_sddmm(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, block_n: int, block_k: int) -> Tensor:
    n, k = dy.shape[1], x.shape[1]
    full = (dy.t() @ x).reshape(n // block_n, block_n, k // block_k, block_k).transpose(1, 2)
    rows = torch.repeat_interleave(torch.arange(n // block_n, device=dy.device), (crow[1:] - crow[:-1]).long(),
                                   output_size=col.numel())
    return full[rows, col.long()].contiguous()


# ------------------------------------------------------------------------------------------------- CSR
def csr_mm(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return _add_bias(x @ _dense_csr(crow, col, values, n, x.shape[1]).t(), bias)


def csr_bitmap_mm(x: Tensor, crow: Tensor, col: Tensor, bitmap: Tensor, values: Tensor, bias: Tensor | None,
                  n: int) -> Tensor:
    # from the bitmap, as the CPU kernel reads it (col_indices serve the backward)
    mask = unpack_bitmap(bitmap, x.shape[1])
    dense = values.new_zeros(n, x.shape[1]).masked_scatter(mask, values)
    return _add_bias(x @ dense.t(), bias)


def csr_mm_xt(xt: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return _add_bias_rows(_dense_csr(crow, col, values, n, xt.shape[1]) @ xt, bias)


def csr_mm_xt_tiled(xt: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, n: int,
                    sizes: list[int], kernel: list[int]) -> Tensor:
    return tile_taps(csr_mm_xt(xt, crow, col, values, bias, n), sizes, kernel)


def csr_conv2d(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, kernel_size: list[int],
               padding: list[int], dilation: list[int], stride: Sequence[int] = (1, 1)) -> Tensor:
    n, c = crow.numel() - 1, x.shape[1]
    w = _dense_csr(crow, col, values, n, c * math.prod(kernel_size)).reshape(n, c, *kernel_size)
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))


def csr_conv3d(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, kernel_size: list[int],
               padding: list[int], dilation: list[int], stride: Sequence[int] = (1, 1, 1)) -> Tensor:
    n, c = crow.numel() - 1, x.shape[1]
    w = _dense_csr(crow, col, values, n, c * math.prod(kernel_size)).reshape(n, c, *kernel_size)
    return F.conv3d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))


def csr_mm_t(dy: Tensor, crow: Tensor, col: Tensor, values: Tensor, k: int) -> Tensor:
    return dy @ _dense_csr(crow, col, values, dy.shape[1], k)


def csr_sddmm(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    n = dy.shape[1]
    rows = torch.repeat_interleave(torch.arange(n, device=dy.device), (crow[1:] - crow[:-1]).long(),
                                   output_size=col.numel())
    # one dot product per stored entry: sum_m dy[m, row] * x[m, col]
    return (dy.t()[rows] * x.t()[col.long()]).sum(dim=1)


# -------------------------------------------------------------------------------------------------- NM
def nm_mm(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, n: int, m: int) -> Tensor:
    return _add_bias(x @ _dense_nm(values, indices, n, m).t(), bias)


def nm_mm_t(dy: Tensor, values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    return dy @ _dense_nm(values, indices, n, m)


def nm_sddmm(dy: Tensor, x: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    rows, kept = indices.shape
    groups = kept // n
    cols = (torch.arange(groups, device=x.device).repeat_interleave(n) * m).unsqueeze(0) + indices.long()
    full = dy.t() @ x                      # [N, K]
    return full.gather(1, cols)


# ---------------------------------------------------------------------------------------------- channel
def channel_conv_memory_format(x: Tensor) -> torch.memory_format:
    """Memory format of channel_gather_conv2d's output: channels_last when x is channels_last-contiguous and not
    NCHW-contiguous, else contiguous (the same rule in the fake and the CUDA kernel)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def channel_gather_conv2d(x: Tensor, in_idx: Tensor, weight: Tensor, bias: Tensor | None, out_idx: Tensor | None,
                          n_out: int | None, stride: list[int], padding: list[int], dilation: list[int],
                          groups: int) -> Tensor:
    """conv2d(x[:, in_idx], weight, bias, ...), with out_idx scattered into channels out_idx of n_out zeros."""
    if (out_idx is None) != (n_out is None):
        raise ValueError("channel_gather_conv2d: out_idx and n_out must be given together")
    if in_idx.numel() == 0:   # F.conv2d gets zero input channels wrong (returns zero output channels)
        out = conv_out_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        y = x.new_zeros(x.shape[0], weight.shape[0], *out)
        if bias is not None:
            y = y + bias[:, None, None]
    else:
        y = F.conv2d(x.index_select(1, in_idx), weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if out_idx is not None:
        y = y.new_zeros(y.shape[0], n_out, *y.shape[2:]).index_copy(1, out_idx.long(), y)
    return y.contiguous(memory_format=channel_conv_memory_format(x))


RNN_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")   # rnn_cell's mode numbers


def rnn_cell(gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    """One recurrent step's gates from its input projection ``gi`` and recurrent projection ``gh`` (both
    ``[rows, gates * H]``, biases included) and state ``h`` (``c``: an LSTM's cell state, ``[rows, H]``), in torch's
    gate orders (LSTM i f g o, GRU r z n): ``(h_new, c_new)``, ``c_new`` empty unless an LSTM (whose step reads
    ``c`` only: its ``h`` may be a projection of another width)."""
    if mode == 0:
        i, f, g, o = (gi + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    if mode == 1:
        ir, iz, i_n = gi.chunk(3, 1)
        hr, hz, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        cand = torch.tanh(i_n + r * h_n)
        h_new = cand + z * (h - cand)
    else:
        h_new = torch.tanh(gi + gh) if mode == 2 else torch.relu(gi + gh)
    return h_new, gi.new_empty(0)


REFERENCES = {
    "bsr_mm": bsr_mm, "bsr_mm_t": bsr_mm_t, "bsr_mm_xt": bsr_mm_xt, "bsr_mm_xt_tiled": bsr_mm_xt_tiled,
    "bsr_conv2d": bsr_conv2d, "bsr_conv3d": bsr_conv3d, "bsr_sddmm": bsr_sddmm,
    "csr_mm": csr_mm, "csr_mm_t": csr_mm_t, "csr_mm_xt": csr_mm_xt, "csr_mm_xt_tiled": csr_mm_xt_tiled,
    "csr_conv2d": csr_conv2d, "csr_conv3d": csr_conv3d, "csr_sddmm": csr_sddmm, "csr_bitmap_mm": csr_bitmap_mm,
    "nm_mm": nm_mm, "nm_mm_t": nm_mm_t, "nm_sddmm": nm_sddmm,
    "channel_gather_conv2d": channel_gather_conv2d, "rnn_cell": rnn_cell,
}
