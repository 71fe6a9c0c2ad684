"""Dynamic (run-time) channel pruning: a per-input gate that skips output channels (seed 001 "dynamic";
seed 000 sec. 2.1, Zhang et al. 2021: a channel-importance predictor decides which channels to compute).

``ChannelGate`` wraps an ``nn.Conv2d`` / ``nn.Linear``. A small predictor (the input averaged over its
positions -- a conv's pixels, a Linear's tokens -- standardised per feature with running statistics that the
first training batch sets, then a Linear) scores the layer's output channels for each input; the ``keep``
fraction with the highest scores is computed, scaled by ``sigmoid(score)``, and the others are 0. The
standardisation matters: pooled features differ little between inputs next to their mean (e.g. the 6 channel
means a LeNet conv2 sees), so a plain Linear on them ranks the channels the same way for every input. The
predictor starts from the default Linear initialisation (input-dependent scores) plus a bias of the filters'
standardised L1 norms (the static order as a prior, of the same scale as the input-dependent part). In eval
mode only the kept channels are computed, through the channel-compacted ops (``sparsekit.ops.sparse_conv2d``
/ ``channel_linear`` with a ``ChannelIndex`` of the kept rows); in training mode the dense layer runs and the
hard top-k mask times the sigmoid lets gradients reach the predictor.

    add_channel_gates(model, ["conv2", "fc1"], keep=0.5)   # in place
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._compat import set_submodule
from ...formats import ChannelIndex
from ...ops import channel_linear, sparse_conv2d
from .. import masks as _masks

__all__ = ["ChannelGate", "add_channel_gates"]


class ChannelGate(nn.Module):
    """``layer`` with a per-input gate keeping ``ceil(keep * out_channels)`` channels (see module doc)."""

    def __init__(self, layer: nn.Module, keep: float = 0.5) -> None:
        super().__init__()
        if not isinstance(layer, _masks.LINEAR_CONV2D):
            raise TypeError(f"layer must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"grouped convolutions are not gated (groups={layer.groups})")
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
        self.layer = layer
        c_in, c_out = layer.weight.shape[1], layer.weight.shape[0]
        self.k = max(1, int(-(-keep * c_out // 1)))
        self.norm = nn.BatchNorm1d(c_in, affine=False)     # pooled input standardised over the data
        self.predictor = nn.Linear(c_in, c_out)             # default init: scores depend on the input
        with torch.no_grad():                               # + the static L1 order as a prior
            l1 = layer.weight.detach().reshape(c_out, -1).abs().sum(1)
            std = l1.std() if c_out > 1 else l1.new_ones(())
            self.predictor.bias.copy_((l1 - l1.mean()) / std.clamp_min(1e-12) + 2.0)
        self.last_kept: Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a gate saved before the input standardisation existed: identity statistics give its old scores, and
        # one tracked batch keeps the first training batch from overwriting them
        if f"{prefix}predictor.weight" in state_dict and f"{prefix}norm.running_mean" not in state_dict:
            c_in = self.norm.num_features
            state_dict[f"{prefix}norm.running_mean"] = torch.zeros(c_in)
            state_dict[f"{prefix}norm.running_var"] = torch.ones(c_in)
            state_dict[f"{prefix}norm.num_batches_tracked"] = torch.tensor(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pool(self, x: Tensor) -> Tensor:
        """``[batch, in_features]``: a conv's input averaged over pixels, a Linear's over tokens (its features
        are the last dim of ``[batch, ..., features]``)."""
        if isinstance(self.layer, nn.Conv2d):
            return x.flatten(2).mean(2)
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)

    def _per_channel(self, v: Tensor, y: Tensor) -> Tensor:
        """``[batch, out_channels]`` values shaped to broadcast over the layer's output ``y``."""
        if isinstance(self.layer, nn.Conv2d):
            return v.reshape(*v.shape, *([1] * (y.dim() - 2)))
        return v.reshape(v.shape[0], *([1] * (y.dim() - 2)), v.shape[1])

    def scores(self, x: Tensor) -> Tensor:
        """Per-sample channel scores ``[batch, out_channels]``."""
        pooled, n = self._pool(x), self.norm
        if n.training and pooled.shape[0] == 1:          # no batch statistics from one sample
            pooled = F.batch_norm(pooled, n.running_mean, n.running_var, training=False, eps=n.eps)
        else:
            if n.training and int(n.num_batches_tracked) == 0:       # the first batch sets the statistics
                with torch.no_grad():
                    n.running_mean.copy_(pooled.mean(0))
                    n.running_var.copy_(pooled.var(0))
            pooled = n(pooled)
        return self.predictor(pooled)

    def forward(self, x: Tensor) -> Tensor:
        s = self.scores(x)
        top = torch.topk(s, self.k, dim=1, sorted=False).indices.sort(dim=1).values     # [B, k]
        self.last_kept = top
        gate = torch.sigmoid(s)
        if self.training:
            hard = torch.zeros_like(s).scatter_(1, top, 1.0)
            y = self.layer(x)
            return y * self._per_channel(hard * gate, y)
        return self._compact(x, top, gate)

    def _compact(self, x: Tensor, top: Tensor, gate: Tensor) -> Tensor:
        w = self.layer.weight
        w2 = w.reshape(w.shape[0], -1)
        outs = []
        for i in range(x.shape[0]):
            idx = top[i]
            fmt = ChannelIndex(values=w2.index_select(0, idx).contiguous(), indices=idx.contiguous(),
                               shape=tuple(w2.shape), dim=0)
            xi = x[i:i + 1]
            if isinstance(self.layer, nn.Conv2d):
                conv, padding = self.layer, self.layer.padding
                if conv.padding_mode != "zeros" or isinstance(padding, str):   # as nn.Conv2d pads: reflect /
                    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode   # 'same' ...
                    xi, padding = F.pad(xi, conv._reversed_padding_repeated_twice, mode=mode), 0
                y = sparse_conv2d(xi, fmt, None, conv.stride, padding, conv.dilation, kernel_size=conv.kernel_size)
            else:
                y = channel_linear(xi, fmt, None)
            scale = torch.zeros_like(gate[i]).index_copy(0, idx, gate[i, idx])
            bias = self.layer.bias
            if bias is not None:
                y = y + self._per_channel(bias[None], y)
            outs.append(y * self._per_channel(scale[None], y))
        return torch.cat(outs)


def add_channel_gates(model: nn.Module, layers: Iterable[str], keep: float = 0.5) -> dict[str, ChannelGate]:
    """Replace each named layer of ``model`` by a ``ChannelGate`` around it, in place; returns the gates."""
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        if name not in modules:
            raise ValueError(f"layers names {name!r}, which is not a module of model")
        gate = ChannelGate(modules[name], keep)
        set_submodule(model, name, gate)
        out[name] = gate
    return out
