"""sparsekit's ops: ``torch.ops.sparsekit.*`` (registered on import) and their Python faces.

    bsr_linear / csr_linear / nm_linear(x, w, bias=None, backend=None)   y = x @ W^T + bias
    sparse_linear(x, w, bias=None, backend=None)                          dispatch on w's format
    sparse_conv2d / sparse_conv3d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1)
    sparse_conv_transpose2d / 3d(x, w, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                                 kernel_size=...)                      w over [C_out * prod(kernel), C_in]
    channel_gather_linear / channel_gather_conv2d / channel_scatter   channel-compacted layer helpers
"""

from . import _library, _triton_ops  # noqa: F401  (registration side effects)
from ._dispatch import BACKENDS, PRIORITY, all_reasons, choose
from .channel import channel_gather_conv2d, channel_gather_linear, channel_scatter
from .conv import sparse_conv2d, sparse_conv3d
from .conv_transpose import sparse_conv_transpose2d, sparse_conv_transpose3d, transposed_weight2d
from .linear import bsr_linear, channel_linear, csr_linear, nm_linear, sparse_linear

__all__ = ["bsr_linear", "csr_linear", "nm_linear", "channel_linear", "sparse_linear", "sparse_conv2d",
           "sparse_conv3d", "sparse_conv_transpose2d", "sparse_conv_transpose3d", "transposed_weight2d",
           "channel_gather_linear", "channel_gather_conv2d", "channel_scatter",
           "BACKENDS", "PRIORITY", "all_reasons", "choose"]
