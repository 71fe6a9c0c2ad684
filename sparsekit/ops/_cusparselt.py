"""The ``cusparselt`` backend's machinery: 2:4 semi-structured GEMM on sparse tensor cores through torch's own
semi-structured sparsity (``torch.sparse.SparseSemiStructuredTensor*``), for NM weights with n:m = 2:4.

Forward
    y = x @ W^T + b with W held as torch's compressed 2:4 tensor and run by ``F.linear``: cuSPARSELt
    (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``) when torch was built with it
    (``torch.backends.cusparselt.is_available()``) and ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is not set,
    else torch's CUTLASS kernels (``torch._sparse_semi_structured_mm`` / ``_addmm``). The public subclass is used
    rather than the private ops so that torch keeps owning the layout and the dense operand's constraints:
    torch itself zero-pads x's rows (and columns) up to its dense minimum (8 for fp16/bf16) and slices the
    result, so M is free; W's N and K must be multiples of the class's sparse minimum (cuSPARSELt 16 x 16,
    CUTLASS 32 x 64 for fp16/bf16), which ``shape_reasons`` reports. This path is the same as the benchmark's
    ``torch_2:4`` candidate (``to_sparse_semi_structured(W)`` + ``F.linear``), with the class chosen here: torch
    2.13's ``to_sparse_semi_structured`` always picks cuSPARSELt, even in a build without it.

Backward (training)
    dx = dy @ W and d values = dy^T x on W's pattern, db = sum(dy), through sparsekit's own ops
    (``torch.ops.sparsekit.nm_mm_t`` / ``nm_sddmm``: C++/CUDA kernels where built, the reference otherwise), in a
    ``torch.autograd.Function`` (the same formulas as ``nm_mm``'s registered autograd). Calls that need no
    gradient skip the Function. The backend is not traceable: the dispatcher gives it a reason (and so never
    picks it) while torch.compile / torch.export trace or functorch transforms (vmap, grad) are active.

The compressed weight
    Built on first use from the NM weight (values + indices -> a temporary dense [N, K] -> ``from_dense``) and
    cached in a ``WeakIdKeyDictionary`` keyed by the NM's ``values`` tensor: no dense copy is kept, the entry dies
    with the values tensor (the cache holds no strong reference to it or to ``indices``), and it is rebuilt
    when ``values`` or ``indices`` change in place (version counter, data pointer) or are swapped for other
    tensors. NM views made per call (e.g. ``sparse_conv2d(groups > 1)`` slicing rows) therefore rebuild on every
    call. During CUDA-graph capture a missing entry is built (the compression becomes part of the graph) but
    not cached: its memory would belong to the graph's pool. The dispatcher drops an entry when cusparselt
    loses a measurement (``forget``), so a weight served by another backend does not keep a compressed copy.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

DTYPES = (torch.float16, torch.bfloat16)
PATTERN = (2, 4)
MIN_CAPABILITY = (8, 0)
# sparse (W) minimum rows/cols per class when torch's class does not say (torch 2.13 values)
_FALLBACK_MIN = {"cusparselt": (16, 16), "cutlass": (32, 64)}


# ------------------------------------------------------------------------------------------ torch's API
def semi_structured_class() -> type | None:
    """The class torch would compress W with here: cuSPARSELt when torch has it (and CUTLASS is not forced),
    else CUTLASS; None when this torch has neither class."""
    sparse = torch.sparse
    base = getattr(sparse, "SparseSemiStructuredTensor", None)
    cusparselt = getattr(sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    cutlass = getattr(sparse, "SparseSemiStructuredTensorCUTLASS", None)
    if cusparselt is not None and cusparse_lt_available() and not getattr(base, "_FORCE_CUTLASS", False):
        return cusparselt
    return cutlass


def cusparse_lt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except (AttributeError, RuntimeError):
        return False


def kernel_name() -> str:
    """'cuSPARSELt' or 'CUTLASS': what the forward runs on in this torch (for messages and `sparsekit info`)."""
    cls = semi_structured_class()
    return "cuSPARSELt" if cls is not None and getattr(cls, "BACKEND", "") == "cusparselt" else "CUTLASS"


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except RuntimeError:   # op not defined in this torch
        return False


_ENV_REASONS: list[list[str]] = []   # computed once: [reasons]


def environment_reasons() -> list[str]:
    """Why torch's semi-structured sparsity cannot run at all here (independent of the inputs)."""
    if not _ENV_REASONS:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is a CPU build: torch's 2:4 semi-structured kernels "
                           "(cuSPARSELt / CUTLASS) exist only in CUDA builds")
        elif semi_structured_class() is None or not hasattr(torch.sparse, "SparseSemiStructuredTensor"):
            reasons.append(f"torch {torch.__version__} has no torch.sparse.SparseSemiStructuredTensorCUSPARSELT / "
                           "SparseSemiStructuredTensorCUTLASS (semi-structured sparsity)")
        elif not cusparse_lt_available() and not _has_cuda_kernel("aten::_sparse_semi_structured_mm"):
            reasons.append(f"torch {torch.__version__} has neither cuSPARSELt (torch.backends.cusparselt."
                           "is_available() is False) nor CUDA kernels for aten::_sparse_semi_structured_mm (CUTLASS)")
        _ENV_REASONS.append(reasons)
    return list(_ENV_REASONS[0])


def min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) W = [N, K] must be multiples of (and at least) for this dtype, from torch's own table."""
    cls = semi_structured_class()
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}) if cls is not None else {}
    cfg = table.get(dtype)
    if cfg is not None:
        return int(cfg.sparse_min_rows), int(cfg.sparse_min_cols)
    return _FALLBACK_MIN["cusparselt" if kernel_name() == "cuSPARSELt" else "cutlass"]


def shape_reasons(n: int, k: int, dtype: torch.dtype) -> list[str]:
    rows, cols = min_shape(dtype)
    out = []
    if n < rows or n % rows:
        out.append(f"N = {n} (w.shape[0]) must be a positive multiple of {rows} for {kernel_name()} "
                   f"{str(dtype).replace('torch.', '')} 2:4 (torch's sparse minimum {rows} x {cols}; pad W's rows)")
    if k < cols or k % cols:
        out.append(f"K = {k} (w.shape[1]) must be a positive multiple of {cols} for {kernel_name()} "
                   f"{str(dtype).replace('torch.', '')} 2:4 (torch's sparse minimum {rows} x {cols}; pad W's columns)")
    return out


def tracing_reasons(x: Tensor | None = None) -> list[str]:
    if torch.compiler.is_compiling():
        return ["not traceable: torch.compile / torch.export is tracing (the compressed weight is built and "
                "cached eagerly); the dispatcher uses another backend there"]
    if torch._C._are_functorch_transforms_active():
        return ["functorch transforms (vmap / grad / jacrev) are active: the backend's autograd.Function does not "
                "support them"]
    if x is not None and type(x) not in (Tensor, torch.nn.Parameter):
        return [f"x is a {type(x).__name__} (tracing or a tensor subclass): the compressed weight is built eagerly "
                "on plain tensors only"]
    return []


# ---------------------------------------------------------------------------------------- the cache
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()   # NM values tensor -> (stamp, indices weakref, compressed)


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:   # inference tensors have no version counter
        return -1


def _stamp(w) -> tuple:
    v, i = w.values, w.indices
    return (_version(v), v.data_ptr(), _version(i), i.data_ptr(), tuple(w.shape), w.n, w.m, v.dtype, v.device)


def _compress(dense: Tensor) -> Tensor:
    """torch's compressed 2:4 tensor of a dense [N, K] CUDA tensor (monkeypatched by the CPU tests)."""
    cls = semi_structured_class()
    if cls is None:
        raise RuntimeError(environment_reasons()[0] if environment_reasons() else "no semi-structured class")
    with warnings.catch_warnings():   # "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"
        warnings.filterwarnings("ignore", message=".*prototype stage.*")
        return cls.from_dense(dense)


def _mm(x: Tensor, ws: Tensor, bias: Tensor | None) -> Tensor:
    """x [M, K] @ W^T + bias on the compressed W (monkeypatched by the CPU tests)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, ws.shape[0])
    return F.linear(x, ws, bias)


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def compressed(w) -> Tensor:
    """The compressed form of NM weight ``w`` (built once per values tensor, see the module docstring)."""
    values = w.values
    stamp = _stamp(w)
    entry = _CACHE.get(values)
    if entry is not None and entry[0] == stamp and entry[1]() is w.indices:
        return entry[2]
    with torch.no_grad():   # the dense [N, K] is a temporary: only the compressed form is kept
        ws = _compress(w.to_dense().contiguous())
    if not _capturing(values):
        _CACHE[values] = (stamp, weakref.ref(w.indices), ws)
    return ws


def forget(w) -> None:
    """Drop ``w``'s compressed copy (if any)."""
    _CACHE.pop(w.values, None)


def cache_size() -> int:
    return len(_CACHE)


# --------------------------------------------------------------------------------------------- autograd
class _SemiStructuredLinear(torch.autograd.Function):
    """y = x @ W^T + b on the compressed W; backward on sparsekit's nm ops (W's stored values get the grad)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, n: int, m: int,
                ws: Tensor) -> Tensor:
        ctx.save_for_backward(x, values, indices)
        ctx.has_bias = bias is not None
        ctx.nm = (n, m)
        return _mm(x, ws, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, values, indices = ctx.saved_tensors
        n, m = ctx.nm
        dy = dy.contiguous()
        need_x, need_v, _, need_b, _, _, _ = ctx.needs_input_grad
        dx = torch.ops.sparsekit.nm_mm_t(dy, values, indices, n, m) if need_x else None
        dv = torch.ops.sparsekit.nm_sddmm(dy, x, indices, n, m) if need_v else None
        db = dy.sum(0) if ctx.has_bias and need_b else None
        return dx, dv, None, db, None, None, None


def linear(x: Tensor, w, bias: Tensor | None) -> Tensor:
    """y = x @ W^T + bias for a 2:4 NM weight, x [M, K] contiguous (the dispatcher checked everything)."""
    ws = compressed(w)
    if torch.is_grad_enabled() and (x.requires_grad or w.values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _SemiStructuredLinear.apply(x, w.values, w.indices, bias, w.n, w.m, ws)
    return _mm(x, ws, bias)


environment_reasons()   # decided now, outside any torch.compile trace (it asks torch's dispatcher)
