"""``ChannelSelect``: pick a subset of channels of a shared stream before a module (seed 000, section 2.3).

In pre-activation blocks (BN before the conv) and DenseNet-style concat streams, the stream a BatchNorm reads
is also read by other layers (the shortcut, later concats), so it cannot shrink to what this layer keeps.
Compaction shrinks the BN and the conv after it and wraps the BN as ``ChannelSelect(index, bn)``:
``forward(x) = bn(x.index_select(dim, index))``. ``index`` is a registered buffer (saved in the state_dict,
restored by ``apply_widths``), so no pickling is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelSelect"]


class ChannelSelect(nn.Module):
    """``module(x.index_select(dim, index))``: a channel-selection step through ``torch.index_select``."""

    def __init__(self, index: Tensor, module: nn.Module, dim: int = 1) -> None:
        super().__init__()
        if not isinstance(index, Tensor) or index.dim() != 1:
            raise ValueError(f"index must be a 1-D LongTensor of channel indices, got {index!r}")
        self.dim = dim
        self.register_buffer("index", index.to(torch.long).clone())
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.index_select(self.dim, self.index))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, selects={self.index.numel()}"
