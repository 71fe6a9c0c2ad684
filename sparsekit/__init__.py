"""sparsekit: make pruned networks actually faster.

    import sparsekit as sk
    pruner = sk.prune.Pruner(model, example_inputs, criterion="magnitude", granularity="block", sparsity=0.9)
    pruner.step()
    layer = sk.nn.SparseLinear.from_dense(linear, format="bsr", block=32)
    y = sk.ops.bsr_linear(x, w)

Importing sparsekit never initialises CUDA and does not fail when the C++ extension is missing
(`sparsekit info` shows what is missing and why).
"""

from . import _extension

_extension.load()

from . import formats, models, nn, ops, prune  # noqa: E402
from .formats import BSR, CSR, NM, ChannelIndex  # noqa: E402
from .serialize import load, save  # noqa: E402
from .sparsify import SparsifyReport, sparsify  # noqa: E402
from .verify import VerificationError, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = ["formats", "ops", "nn", "prune", "models", "verify", "VerificationError", "sparsify", "SparsifyReport",
           "save", "load", "BSR", "CSR", "NM", "ChannelIndex", "__version__"]
