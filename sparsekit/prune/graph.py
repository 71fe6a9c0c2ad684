"""Dependency graph: which channels of which layers must be removed together.

    graph = DependencyGraph.build(model, example_inputs)
    graph.groups                       # list[Group]; g.prunable, g.size (units), g.unit (channels per unit)
    scores = graph.group_scores()      # {group id: one score per unit} (L1 of every member, aggregated)
    keep = graph.select(0.5, scores)   # {group id: kept unit indices}, global or layer-wise
    small = sparsekit.prune.compact.compact(model, example_inputs, keep, graph=graph)

Tracing: ``torch.fx`` symbolic tracing at module level (convs, Linear, norms, embeddings and the attention
modules below are leaves, ``is_leaf_module``); Hugging Face ``PreTrainedModel``s go through
``transformers.utils.fx.HFTracer`` (same leaf rules). Control flow on traced values is decided by the
positional example inputs. Where fx fails (``range(x.shape[0])``, ``len(x)``, other Python on traced
values), the graph comes from ``torch.export`` on ``example_inputs`` instead, mapped back to the model's
leaf modules (``export_graph``), and the same rules below run on it. Concrete shapes come from running the
graph once on ``example_inputs``. When both fail the ``GraphError`` names, for each attempt, the module
being traced and the failing op.

Channel spaces. Every tensor value carries a *tag*: its channel dim and the list of segments along it, each
``(space, span)``; a space is a set of coupled channels split into ``n_units`` equal units. A unit ``u`` of a
space covers indices ``offset + [u*span/n, (u+1)*span/n)`` of every *member* ``(module, axis, offset,
span)`` (axis ``"out"``: weight dim 0, bias, norm params; ``"in"``: weight dim 1). Rules:

* Conv1d / Conv2d / Conv3d (groups=1) / Linear: the input segments gain ``in`` members; the output is a new space
  (``out``).
* a module with weights called more than once (shared, or in a loop): one set of spaces, its inputs of every call
  coupled channel by channel and every call's output in the first call's spaces; where the inputs' layouts
  differ (or a BatchNorm selects from two streams) they are pinned.
* depthwise / grouped convs: output channels stay in the input's space (whole conv groups are units).
* BatchNorm: ``out`` members on its input's spaces; when its input is shared with other ops (pre-activation
  blocks, DenseNet concat streams, seed 000 section 2.3) its output is a new *selection* space: the
  compacted model picks the kept channels out of the unshrunk stream with ``ChannelSelect``. Without affine
  parameters but with running statistics its input is pinned: a removed (zeroed) channel would come out as
  the constant ``-mean / sqrt(var + eps)``, not 0, and the compacted model would lose it.
* GroupNorm: units coarsen to whole norm groups. LayerNorm normalises over its channels, so removing any
  changes its statistics: its space is pinned. InstanceNorm: ``out`` members like BatchNorm (its channels
  never mix), pinned without affine parameters but with running statistics. PReLU: one shared slope passes
  channels through; per-channel slopes are ``out`` members.
* elementwise activations and dropouts, pooling, resampling (``Upsample``, ``interpolate``) and padding of
  the dims after the channels: channels pass through (padding that reaches the channel dim is unknown).
* ConvTranspose1d / 2d / 3d (groups=1; weight ``[C_in, C_out, *kernel]``, ``weight_dim`` maps member axes to its dims):
  ``in`` members on its input (weight dim 0) and a new output space (weight dim 1) like a conv's.
* RNN / LSTM / GRU (``proj_size=0``; ``recurrent``): ``in`` members on its input features (the columns of
  ``weight_ih_l0``) and a new space of ``hidden_size`` units, one member ``(rnn, "out", 0, hidden_size)``
  standing for hidden unit ``j`` of every layer and direction (its gate rows, its recurrent column, the next
  layer's input columns). The output ``[..., directions * hidden]`` holds one segment per direction, ``h_n``
  / ``c_n`` one on their last dim. An initial state passed in must come from the same space (an encoder's
  final state given to a decoder couples the two; a module run again on its own carried state keeps one
  space), else the hidden units are pinned; so are a packed sequence's. An LSTM with ``proj_size`` is pinned
  whole (inputs and hidden units).
* residual add / mul between tagged tensors: spaces merged (coarsened to a common unit); concat: segments
  appended (index offsets); ``chunk`` / ``tensor_split`` into k equal parts along channels (or ``split`` by a
  traced ``x.shape[d] // k``): the pieces keep their segments when the cuts fall on segment boundaries, and the
  pieces' segments are merged position by position (the compacted pieces must stay equally wide to be cut at
  the same channels); a single segment (one layer's output, ``gate, up = gate_up(x).chunk(2, -1)``) becomes
  k interleaved blocks of one space: unit ``j`` is channel ``j`` of every piece (the layer's rows ``j``,
  ``j + C/k``, ...; a space's ``factor`` records the interleaving); other cuts, and fixed sizes
  (``split(8)``, ``split([8, 8])``, slicing), pinned; flatten after a conv: span times H*W (feature expansion).
* attention: Hugging Face ``BertSelfAttention``-style (``query``/``key``/``value``, ``num_attention_heads``)
  and fused-qkv modules (``qkv``, ``proj``, ``heads``/``num_heads``, ``head_dim``; or GPT-2's ``c_attn``,
  ``c_proj``, ``num_heads``, ``head_dim``, ``split_size``) get a head space (unit =
  one head: q, k, v rows and the output projection's columns); Llama-style grouped-query attention
  (``q/k/v/o_proj``, ``num_heads``, ``num_key_value_heads``, ``head_dim``) one whose unit is a key/value group
  (its k and v rows, the query heads sharing it, their ``o_proj`` columns). Whether the module's forward still
  runs with fewer heads is probed once; if not, the heads are pinned with the reason. The attention weights
  such a module returns (``output_attentions=True``) carry its heads on dim 1: returned by the model, they pin
  them; a key / value cache shrinks with the heads (the compacted model makes and reads its own). A tuple
  ``(h,) + outputs[1:]`` keeps its elements' channels.
* ``nn.MultiheadAttention`` (and ``compact.PrunedMultiheadAttention``): a head space whose unit is one head:
  rows of ``in_proj_weight`` / ``in_proj_bias`` (or ``q/k/v_proj_weight``), member ``(mha, "out", ...)``
  over the packed q|k|v rows, and the columns of ``out_proj`` (``(mha.out_proj, "in", ...)``). The
  ``embed_dim`` streams (inputs and output) keep their width: they are pinned. Heads are pinned when the
  returned attention weights are used (they average over all heads). ``LinearMultiheadAttention`` the same,
  its head rows being the rows of its ``q_proj`` / ``k_proj`` / ``v_proj`` Linears (heads pinned with
  ``add_bias_kv``). ``nn.TransformerEncoderLayer`` /
  ``nn.TransformerDecoderLayer`` / ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` / ``nn.Transformer``
  (torch's forward, ``transformer_layers``) are leaves with the same rule for every layer's ``self_attn``
  and a decoder layer's cross-attention ``multihead_attn`` (its queries come from the target stream, its
  keys and values from the memory stream, which keeps its width), plus a prunable feed-forward space per
  layer (``linear1`` rows, ``linear2`` columns); their LayerNorms pin the streams.
* embeddings: a new space on the embedding dim; model outputs and anything an unknown op touches: pinned.
* a weight tied across layers (``dec.weight = enc.weight``, the tied word language model): its holders' members
  along each of its dims are coupled position by position (the embedding dim, the LSTM's units and the decoder's
  inputs become one group); a dim one holder does not cut (an embedding's vocabulary rows) is pinned for all.

Pinned groups (``prunable=False``, ``reason``) are never pruned: this is what keeps the classifier intact.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.fx import _symbolic_trace

from .._aliases import tied_layers
from .._compat import set_submodule
from .._stock_layers import STOCK_LAYERS, acts_as_stock, overridden_forward, run_alone, same_output
from .linear_rnn import LinearRecurrent
from .masks import BATCH_NORMS, CHANNEL_NORMS, CONVS, INSTANCE_NORMS, TRANSPOSED_CONVS, floor_product
from .recurrent import RECURRENT, hidden_unit_rows, input_columns

__all__ = ["GraphError", "Member", "Group", "DependencyGraph", "attention_kind", "set_heads", "in_proj_parts",
           "is_leaf_module", "transformer_layers", "weight_dim", "NORMS", "QKV_PROJ"]

NORMS = (*CHANNEL_NORMS, nn.GroupNorm, nn.LayerNorm)
QKV_PROJ = ("q_proj", "k_proj", "v_proj")   # a LinearMultiheadAttention's in-projection Linears
_LEAVES = (*CONVS, *TRANSPOSED_CONVS, nn.Linear, nn.Embedding, *RECURRENT, LinearRecurrent, nn.MultiheadAttention,
           nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer, nn.TransformerDecoder,
           nn.Transformer, nn.PReLU) + NORMS
# elementwise modules without per-channel state: channels pass through unchanged
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                 nn.Identity, nn.Hardsigmoid, nn.Mish, nn.Hardtanh, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign,
                 nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU)
_POOL_MODULES = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool3d, nn.Upsample)
# pad the last len(padding) // 2 dims: channels pass through when they are not among those
_PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
                nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_RESAMPLE_FN = {"adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool1d", "avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_max_pool2d", "max_pool2d", "avg_pool2d", "interpolate", "upsample", "upsample_nearest",
                "upsample_bilinear", "upsample_nearest1d", "upsample_linear1d", "upsample_nearest2d",
                "upsample_bilinear2d", "upsample_bicubic2d", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d",
                "adaptive_max_pool3d", "upsample_nearest3d", "upsample_trilinear3d"}
_PASS_FN = {"relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "hardswish", "elu",
            "dropout", "contiguous", "clone", "detach", "float", "to", "type_as", "mish", "hardtanh",
            "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "neg", "abs", "exp",
            "alias", "to_copy", "square", "sqrt", "rsqrt", "erf", "softplus", "selu", "celu", "softsign",
            "logsigmoid", "log_sigmoid", "hardsigmoid", "hardshrink", "softshrink", "tanhshrink", "threshold", "rrelu",
            "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
            # stochastic depth (torchvision.ops.stochastic_depth, timm's drop_path): whole samples dropped or scaled
            "stochastic_depth", "drop_path"}
_BINARY_FN = {"add", "iadd", "sub", "isub", "mul", "imul", "truediv", "div", "add_", "mul_"}
_REDUCE_FN = {"mean", "sum", "amax", "max", "amin", "min"}


def weight_dim(mod: nn.Module, axis: str) -> int:
    """The weight dim a member's channels index: ``out`` -> 0 and ``in`` -> 1, swapped for a transposed conv
    (weight ``[C_in, C_out, *kernel]``)."""
    if isinstance(mod, TRANSPOSED_CONVS):
        return 1 if axis == "out" else 0
    return 0 if axis == "out" else 1


def _tensor_dim(mod: nn.Module, axis: str) -> int:
    """The weight dim of a member (``weight_dim``; an embedding's channels are its weight's dim 1)."""
    return 1 if isinstance(mod, nn.Embedding) else weight_dim(mod, axis)


class GraphError(RuntimeError):
    """Tracing or analysis failed; the message names the module and the op."""


# ----------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Member:
    """Indices ``offset + [u*span/n, (u+1)*span/n)`` along ``axis`` of ``module`` belong to unit ``u``."""

    module: str
    axis: str        # "out" (weight dim 0 / bias / norm params / embedding dim) | "in" (weight dim 1)
    offset: int
    span: int


@dataclass
class _Space:
    n_units: int
    members: list[Member] = field(default_factory=list)
    pinned: str = ""
    kind: str = "channel"       # "channel" | "heads" | "selection"
    parent: int | None = None   # union-find
    factor: int = 1             # a segment of this space is ``factor`` interleaved blocks in ``parent`` (chunk)


@dataclass
class Group:
    """Channels that are removed together: ``size`` units of ``unit`` channels (heads: head_dim)."""

    id: int
    size: int
    members: list[Member]
    kind: str
    prunable: bool
    reason: str = ""

    @property
    def unit(self) -> int:
        """Indices per unit in the group's first member (1 for plain channels, head_dim for heads)."""
        return self.members[0].span // self.size if self.members else 1

    def member_indices(self, m: Member, units: Tensor) -> Tensor:
        """Indices along ``m.axis`` covered by the given units."""
        per = m.span // self.size
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
        return (m.offset + units * per + torch.arange(per)).reshape(-1)


@dataclass
class _Seg:
    space: int | None    # None: fixed channels (model input, unknown producer): never removed
    span: int


@dataclass
class _Tag:
    dim: int
    segs: list[_Seg]

    @property
    def width(self) -> int:
        return sum(s.span for s in self.segs)


# ------------------------------------------------------------------------------------------ attention
def attention_kind(mod: nn.Module) -> str | None:
    """``"hf"`` (query/key/value + num_attention_heads), ``"fused"`` (qkv + proj + heads), ``"gqa"`` (Llama-style
    grouped-query attention: q/k/v/o_proj + num_heads, num_key_value_heads, head_dim), ``"mha"``
    (``nn.MultiheadAttention`` or ``compact.PrunedMultiheadAttention``), ``"mha_linear"``
    (``LinearMultiheadAttention``: the same with Linear projections) or None."""
    from .linear_mha import LinearMultiheadAttention  # (both import this module)
    from .pruned_mha import PrunedMultiheadAttention

    if isinstance(mod, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        return "mha"
    if isinstance(mod, LinearMultiheadAttention):
        return "mha_linear"
    if (all(isinstance(getattr(mod, n, None), nn.Linear) for n in ("query", "key", "value"))
            and hasattr(mod, "num_attention_heads") and hasattr(mod, "attention_head_size")):
        return "hf"
    if fused_parts(mod) is not None:
        return "fused"
    if (all(isinstance(getattr(mod, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(hasattr(mod, a) for a in ("num_heads", "num_key_value_heads", "head_dim"))):
        return "gqa"
    return None


def fused_parts(mod: nn.Module) -> tuple[str, str] | None:
    """(qkv, proj) attribute names of a fused-qkv self-attention module: ``qkv`` / ``proj`` with
    ``heads``/``num_heads`` and ``head_dim``, or GPT-2's ``c_attn`` / ``c_proj`` (after
    ``sparsekit.nn.conv1d_to_linear``) with ``num_heads``, ``head_dim`` and ``split_size``; None otherwise
    (GPT-2 cross-attention, whose queries come from ``q_attn``, included)."""
    if not hasattr(mod, "head_dim"):
        return None
    for qkv, proj in (("qkv", "proj"), ("c_attn", "c_proj")):
        if not (isinstance(getattr(mod, qkv, None), nn.Linear) and isinstance(getattr(mod, proj, None), nn.Linear)):
            continue
        if qkv == "qkv" and (hasattr(mod, "heads") or hasattr(mod, "num_heads")):
            return qkv, proj
        if (qkv == "c_attn" and hasattr(mod, "num_heads") and hasattr(mod, "split_size")
                and not getattr(mod, "is_cross_attention", False)
                and getattr(mod, qkv).out_features % (3 * mod.head_dim) == 0):
            return qkv, proj
    return None


def in_proj_parts(mod: nn.Module) -> list[tuple[str, int, int]]:
    """The tensors of an ``"mha"`` module that hold its packed q|k|v rows (``3 * heads * head_dim``):
    ``(parameter name, first row it covers, dim its rows run along)``. ``bias_k`` / ``bias_v`` cover the k / v
    rows; ``q/k/v_proj_weight`` replace ``in_proj_weight`` when key / value widths differ."""
    inner = mod.num_heads * mod.head_dim
    if getattr(mod, "in_proj_weight", None) is not None:
        parts = [("in_proj_weight", 0, 0)]
    else:
        parts = [("q_proj_weight", 0, 0), ("k_proj_weight", inner, 0), ("v_proj_weight", 2 * inner, 0)]
    if getattr(mod, "in_proj_bias", None) is not None:
        parts.append(("in_proj_bias", 0, 0))
    if getattr(mod, "bias_k", None) is not None:
        parts += [("bias_k", inner, -1), ("bias_v", 2 * inner, -1)]
    return parts


def _stock(mod: nn.Module, cls: type) -> bool:
    # a subclass with its own forward may wire its parts differently: then it stays an unknown op
    return isinstance(mod, cls) and type(mod).forward is cls.forward


def transformer_layers(mod: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``(relative name, layer)`` of every encoder / decoder layer of a stock ``nn.TransformerEncoderLayer``,
    ``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` or ``nn.Transformer``
    (every part with torch's own forward), or None."""
    if _stock(mod, nn.TransformerEncoderLayer) or _stock(mod, nn.TransformerDecoderLayer):
        return [("", mod)]
    if _stock(mod, nn.TransformerEncoder) or _stock(mod, nn.TransformerDecoder):
        layers = [(f"layers.{i}", layer) for i, layer in enumerate(mod.layers)]
        return layers if all(transformer_layers(layer) for _, layer in layers) else None
    if _stock(mod, nn.Transformer) and _stock(mod.encoder, nn.TransformerEncoder) and _stock(
            mod.decoder, nn.TransformerDecoder):
        enc, dec = transformer_layers(mod.encoder), transformer_layers(mod.decoder)
        if enc is None or dec is None:
            return None
        return [(f"encoder.{n}", layer) for n, layer in enc] + [(f"decoder.{n}", layer) for n, layer in dec]
    return None


def _heads_attr(mod: nn.Module) -> str:
    return "heads" if hasattr(mod, "heads") else "num_heads"


def set_heads(mod: nn.Module) -> None:
    """After q/k/v Linears were resized, update the attention module's head-count attributes."""
    kind = attention_kind(mod)
    if kind == "hf":
        mod.num_attention_heads = mod.query.out_features // mod.attention_head_size
        mod.all_head_size = mod.query.out_features
    elif kind == "fused":
        qkv, _ = fused_parts(mod)
        heads = getattr(mod, qkv).out_features // 3 // mod.head_dim
        setattr(mod, _heads_attr(mod), heads)
        if isinstance(getattr(mod, "attn_dim", None), int):   # timm's Attention views its heads' output that wide
            mod.attn_dim = heads * mod.head_dim
        if qkv == "c_attn":     # GPT-2 splits q|k|v at split_size and merges the heads back to embed_dim wide
            mod.split_size = mod.embed_dim = heads * mod.head_dim
    elif kind == "gqa":         # whole key/value groups go: num_key_value_groups (query heads per group) stays
        if getattr(mod, "hidden_size", None) == mod.num_heads * mod.head_dim:
            # Qwen2 (transformers 4.4x) views the heads' output as [B, T, hidden_size] before o_proj: that is the
            # heads' width there (the probe tells a module that also uses it as the model width: pinned)
            mod.hidden_size = mod.q_proj.out_features
        mod.num_heads = mod.q_proj.out_features // mod.head_dim
        mod.num_key_value_heads = mod.k_proj.out_features // mod.head_dim
    elif kind == "mha_linear":  # (compact also selects its head_index: which original heads are left)
        mod.num_heads = mod.q_proj.out_features // mod.head_dim


# -------------------------------------------------------------------------------------------- tracing
def is_leaf_module(m: nn.Module) -> bool:
    """Whether tracing keeps ``m`` as one call (Conv2d, Linear, norms, embeddings, attention modules, other
    ``torch.nn`` modules but containers) rather than tracing through its forward."""
    if isinstance(m, _LEAVES) or attention_kind(m) is not None:
        return True
    return m.__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class _LeafMixin:
    stack: list[str]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D401
        return is_leaf_module(m)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if not getattr(self, "failed_at", None):
                self.failed_at = self.stack[-1]
            raise
        finally:
            self.stack.pop()
        return out


class _Tracer(_LeafMixin, fx.Tracer):
    """fx tracer whose control flow on traced values (``if x.dim() != 2``) is decided by the concrete values
    of the example inputs: the partial graph is run to get the bool (the graph records the branch taken)."""

    def __init__(self, example: tuple | None = None) -> None:
        super().__init__()
        self.stack = []
        self.example = example

    def _concrete(self, node: fx.Node) -> Any:
        gm = fx.GraphModule(self.root, self.graph)
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        it = iter(self.example or ())
        # while tracing, fx patches nn.Module.__call__ / __getattr__ to emit proxies; running the partial graph
        # under those patches would recurse into tracing (and into this method) instead of computing a value
        unpatched = getattr(_symbolic_trace, "_maybe_revert_all_patches", nullcontext)
        with torch.no_grad(), unpatched():
            for n in self.graph.nodes:
                if n.op == "placeholder":
                    interp.env[n] = next(it, n.args[0] if n.args else None)
                else:
                    interp.env[n] = interp.run_node(n)
                if n is node:
                    return interp.env[n]
        raise GraphError(f"node {node.name} not found")

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.example is None:
            return super().to_bool(obj)
        return bool(self._concrete(obj.node))

    def iter(self, obj: fx.Proxy):  # noqa: ANN201
        if self.example is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(len(self._concrete(obj.node)))])


def _trace(model: nn.Module, example_inputs: Any) -> tuple[fx.GraphModule, tuple, dict]:
    """Module-level fx graph of ``model`` plus the positional / keyword inputs to run it with."""
    if isinstance(example_inputs, Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(f"example_inputs must be a Tensor, a tuple/list or a dict, got {type(example_inputs).__name__}")
    is_hf = type(model).__module__.startswith("transformers.")
    try:
        if is_hf:
            # HFTracer swaps torch functions (torch.finfo, ...) for tracing stand-ins while it traces; a first
            # import of torch._dynamo inside that window would keep the stand-ins in its constant-type tables
            # and break every later torch.compile in the process. Import it before.
            import torch._dynamo  # noqa: F401
            from transformers.utils import fx as hfx

            class _HF(_LeafMixin, hfx.HFTracer):
                def __init__(self, *a: Any, **k: Any) -> None:
                    super().__init__(*a, **k)
                    self.stack = []

            names = list(kwargs) or ["input_ids"]
            # symbolic_trace sets model.config.use_cache = False (and warns so) when past_key_values is not an
            # input: the graph is traced that way, the model keeps its own setting
            config = getattr(model, "config", None)
            saved = getattr(config, "use_cache", _MISSING)
            log = logging.getLogger(hfx.__name__)
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                gm = hfx.symbolic_trace(model, input_names=names, tracer_cls=_HF)
            finally:
                log.setLevel(level)
                if saved is not _MISSING:
                    config.use_cache = saved
            return gm, args, kwargs
        import inspect

        params = list(inspect.signature(model.forward).parameters.values())
        concrete = {p.name: p.default for p in params[len(args):]
                    if p.default is not inspect.Parameter.empty and p.name not in kwargs}
        tracer = _Tracer()
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception:  # noqa: BLE001 - retry deciding control flow on the example inputs
            if kwargs:
                raise
            tracer = _Tracer(args)
            graph = tracer.trace(model, concrete_args=concrete or None)
        return fx.GraphModule(model, graph), args, kwargs
    except Exception as e:  # noqa: BLE001 - re-raised with where it happened
        where = getattr(tracer, "failed_at", None) if not is_hf else None
        where = where or type(model).__name__
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename
                  and not f.filename.endswith("graph.py")]
        op = f"`{frames[-1].line}` ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else "?"
        fx_error = (f"in module {where!r}, op {op} failed with {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}")
        fx_exc = e
    from .export_graph import export_failure, export_trace

    try:   # fallback: torch.export on the example inputs, rebuilt as a module-level graph
        with _no_hf_cache(model, kwargs):
            gm, flat = export_trace(model, args, kwargs, is_leaf_module)
        return gm, flat, {}
    except Exception as e:  # noqa: BLE001 - both attempts are reported
        raise GraphError(f"torch.fx could not trace {type(model).__name__}: {fx_error}; the torch.export fallback "
                         f"failed too: {export_failure(model, e)}. Make that module a leaf, rewrite the "
                         "data-dependent control flow, or prune with granularity 'element'/'block' (no "
                         "dependency graph needed)") from fx_exc


_MISSING = object()


@contextlib.contextmanager
def _no_hf_cache(model: nn.Module, kwargs: Mapping) -> Iterator[None]:
    """A Hugging Face model traced by torch.export with ``config.use_cache`` off, as HFTracer traces it, unless a
    cache is among the inputs: its attention layers (leaves) would otherwise be handed a ``Cache`` object, which
    export cannot take (Gemma, which HFTracer does not support, failed so). The model keeps its own setting."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", _MISSING)
    if not type(model).__module__.startswith("transformers.") or saved is _MISSING or "past_key_values" in kwargs:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = saved


def _size_follows(n: fx.Node, args: tuple, dim: int) -> bool:
    """Whether a traced view / reshape's size at the channel position ``dim`` follows the tensor: ``-1`` or
    computed from it (``x.size(1)``, ``x.shape``), not a number written in the code (``x.view(-1, 16 * 5 * 5)``
    would break once the channels shrink). Graphs rebuilt from torch.export hold concrete sizes only: not
    decidable there, taken as following."""
    if isinstance(n.target, torch._ops.OpOverload):
        return True
    sizes = n.kwargs.get("shape", n.kwargs.get("size"))
    if sizes is None:     # torch.reshape(x, shape); x.view(*sizes) / x.view(sizes) / Tensor.view(x, ...)
        sizes = args[1:2] if n.target is torch.reshape else args[1:]
    if isinstance(sizes, (tuple, list)) and len(sizes) == 1:
        sizes = sizes[0]
    if isinstance(sizes, fx.Node):     # the whole shape computed from a tensor (x.view(h.shape), x.size())
        return True
    if not isinstance(sizes, (tuple, list, torch.Size)) or dim >= len(sizes):
        return False
    size = sizes[dim]
    return isinstance(size, fx.Node) or size == -1


def _fn_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):     # graphs rebuilt from torch.export: aten.add.Tensor -> add
        return target._opname.strip("_")
    name = getattr(target, "__name__", str(target))
    return name.strip("_")


def _meta(v: Any) -> Any:
    if isinstance(v, Tensor):
        return torch.Size(v.shape)
    if isinstance(v, (tuple, list)) and not isinstance(v, torch.Size):
        return [_meta(x) for x in v]
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}
        self.attn_args: dict[str, tuple] = {}
        self.own_forward_inputs: dict[str, Tensor] = {}   # layers whose class overrides the stock forward

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = _meta(out)
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            if attention_kind(mod) in ("hf", "fused", "gqa"):
                a, k = self.fetch_args_kwargs_from_env(n)
                self.attn_args[n.target] = (a, k)
            elif isinstance(mod, STOCK_LAYERS) and overridden_forward(mod) and n.target not in self.own_forward_inputs:
                a, _ = self.fetch_args_kwargs_from_env(n)
                if a and isinstance(a[0], Tensor):
                    self.own_forward_inputs[n.target] = a[0]
        return out


# ---------------------------------------------------------------------------------------------- graph
class DependencyGraph:
    """Groups of coupled channels of a model (see the module docstring). Build with ``build``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self._spaces: list[_Space] = []
        self.groups: list[Group] = []
        self.selections: dict[str, dict] = {}   # BN name -> {"space": id, "segs": input segments}
        self.space_of_group: dict[int, int] = {}
        self._calls: dict[str, tuple[list, list[int]]] = {}   # module -> (input tags, spaces made) of its 1st call

    # --------------------------------------------------------------------- union-find over spaces
    def _new(self, n: int, kind: str = "channel") -> int:
        self._spaces.append(_Space(n, kind=kind))
        return len(self._spaces) - 1

    def _find(self, s: int) -> int:
        return self._resolve(s)[0]

    def _resolve(self, s: int) -> tuple[int, int]:
        """Root of space ``s`` and into how many equal interleaved blocks its root cuts a segment of ``s``."""
        f = 1
        while self._spaces[s].parent is not None:
            f *= self._spaces[s].factor
            s = self._spaces[s].parent  # type: ignore[assignment]
        return s, f

    def _link(self, child: int, root: int, q: int) -> bool:
        """Root ``child`` goes under root ``root``, each of its segments as ``q`` interleaved blocks there (a
        chunk into ``q`` coupled pieces): every member splits into ``q`` and unit ``j`` covers channel ``j``
        of each block. False (nothing changed) when its units do not split that way."""
        c, p = self._spaces[child], self._spaces[root]
        if q > 1:
            if c.n_units % q or c.kind != "channel" or any(m.span % q for m in c.members):
                return False
            c.members = [Member(m.module, m.axis, m.offset + i * (m.span // q), m.span // q)
                         for m in c.members for i in range(q)]
            c.n_units //= q
        p.n_units = math.gcd(p.n_units, c.n_units)
        p.members += c.members
        p.pinned = p.pinned or c.pinned
        if c.kind != "channel":
            p.kind = c.kind
        c.parent, c.factor = root, q
        return True

    def _union(self, a: int, b: int) -> None:
        """Couple two segments of equal span channel by channel."""
        (ra, fa), (rb, fb) = self._resolve(a), self._resolve(b)
        if ra == rb and fa == fb:
            return
        if ra != rb and fa % fb == 0 and self._link(rb, ra, fa // fb):
            return
        if ra != rb and fb % fa == 0 and self._link(ra, rb, fb // fa):
            return
        for r in (ra, rb):
            sp = self._spaces[r]
            sp.pinned = sp.pinned or "coupled channels are chunked into different numbers of pieces"

    def _coarsen(self, s: int, span: int, per: int) -> bool:
        """Units of the segment ``(s, span)`` become whole runs of ``per`` channels (norm / conv groups); False
        when its interleaved blocks (chunk) cut such a run."""
        r, f = self._resolve(s)
        if span % f or (span // f) % per:
            return False
        sp = self._spaces[r]
        sp.n_units = math.gcd(sp.n_units, span // f // per)
        return True

    def _pin(self, tag: Any, reason: str) -> None:
        for t in _flat_tags(tag):
            for seg in t.segs:
                if seg.space is not None:
                    sp = self._spaces[self._find(seg.space)]
                    sp.pinned = sp.pinned or reason

    def _feed(self, x: _Tag | None, modules: list[str], axis: str = "in") -> None:
        """The channels of ``x`` (if tagged), in order, are those of each of ``modules`` along ``axis``."""
        if x is None:
            return
        for module in modules:
            off = 0
            for seg in x.segs:
                self._add(seg, module, axis, off)
                off += seg.span

    def _out_proj(self, n: fx.Node, module: str, width: int, shape: Any, space: int,
                  head_counts: tuple) -> _Tag | list | None:
        """An attention module's output: a new channel space, the rows of its output projection ``module``;
        the tag of its output, or of the first element when it returns a tuple (GPT-2 and Llama return
        (output, cache / weights, ...); the rest tagged by ``_head_extras``)."""
        o = self._new(width)
        self._add(_Seg(o, width), module, "out", 0)
        return self._attention_output(n, shape, _Seg(o, width), space, head_counts)

    def _attention_output(self, n: fx.Node, shape: Any, seg: _Seg, heads: int, head_counts: tuple) -> Any:
        """The tags of what an attention module returns: its output (channels ``seg`` on the last dim) alone or
        first in a tuple (the rest tagged by ``_head_extras``); anything else pins those channels."""
        if isinstance(shape, torch.Size):
            return _Tag(len(shape) - 1, [seg])
        if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], torch.Size):
            return [_Tag(len(shape[0]) - 1, [seg])] + self._head_extras(n, shape, heads, head_counts)
        self._pin(_Tag(0, [seg]), f"{n.target!r} returns no tensor first")
        return None

    def _head_extras(self, n: fx.Node, shape: list, space: int, head_counts: tuple) -> list:
        """Tags of what an attention module returns after its output (``shape[1:]``): a tensor with one dim whose
        size is a head count (``head_counts``: query or key/value heads; attention weights ``[B, heads, T, S]``)
        carries the head space there, so a model that returns it (``output_attentions=True``) keeps its heads,
        pinned as an output; with several such dims the heads are pinned if it is used at all. A key / value
        cache (a tuple of tensors, or a ``Cache`` object) is left untagged: it is state the compacted model makes
        and reads itself, and it shrinks with the heads."""
        out = []
        for i, s in enumerate(shape[1:], 1):
            dims = _head_dims(s, head_counts) if isinstance(s, torch.Size) else []
            if len(dims) > 1 and len(s) == 4 and 1 in dims:
                # [B, heads, T, S] / [B, heads, T, D]: the attention convention when T = heads (a [B, T, heads, D]
                # tensor with T = heads would be tagged on T: returned, it pins the heads either way)
                dims = [1]
            if len(dims) == 1:
                out.append(_Tag(dims[0], [_Seg(space, s[dims[0]])]))
                continue
            if len(dims) > 1 and _element_used(n, i, len(shape)):
                sp = self._spaces[self._find(space)]
                sp.pinned = sp.pinned or (f"{n.target!r} returns a per-head tensor of shape {tuple(s)} whose head "
                                          "dim cannot be told from the others, and it is used")
            out.append(_mirror(s))
        return out

    def _add(self, seg: _Seg, module: str, axis: str, offset: int, span: int | None = None) -> None:
        if seg.space is None:
            return
        r, f = self._resolve(seg.space)
        span = seg.span if span is None else span
        sp = self._spaces[r]
        if span % f:
            sp.pinned = sp.pinned or f"{module!r} takes chunked channels in runs that do not split into the chunks"
            return
        sp.members += [Member(module, axis, offset + i * (span // f), span // f) for i in range(f)]

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any) -> DependencyGraph:
        """Trace ``model`` on ``example_inputs`` (eval mode, no grad; training flags restored) and group it."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            gm, args, kwargs = _trace(model, example_inputs)
            rec = _Recorder(gm)
            with torch.no_grad():
                try:
                    if kwargs:
                        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
                        rec.run(*[kwargs.get(p) for p in placeholders])
                    else:
                        rec.run(*args)
                except Exception as e:
                    raise GraphError(f"running the traced graph of {type(model).__name__} on example_inputs "
                                     f"failed: {type(e).__name__}: {e}") from e
            g = cls(model)
            g._propagate(gm, rec.shapes)
            g._probe_heads(rec.attn_args)
            g._pin_own_forwards(rec.own_forward_inputs)
            g._finish()
        finally:
            for m, mode in modes.items():
                m.training = mode
        return g

    def _propagate(self, gm: fx.GraphModule, shapes: dict) -> None:
        tags: dict[fx.Node, Any] = {}
        self._shapes = shapes
        users = {n: len(n.users) for n in gm.graph.nodes}

        def tag(a: Any) -> Any:
            return tags.get(a) if isinstance(a, fx.Node) else None

        for n in gm.graph.nodes:
            shape = shapes.get(n)
            where = f"{n.op} {n.target if n.op != 'call_module' else repr(n.target)} (node {n.name})"
            if n.op in ("placeholder", "get_attr"):
                tags[n] = None
            elif n.op == "output":
                self._pin([tag(a) for a in _flat_args(n.args)], "model output (classifier / returned tensor)")
            elif n.op == "call_module":
                tags[n] = self._module(n, gm.get_submodule(n.target), tag, shape, users, where)
            else:
                tags[n] = self._function(n, tag, shape, shapes, where)

    # ------------------------------------------------------------------------------- module rules
    def _module(self, n: fx.Node, mod: nn.Module, tag: Callable, shape: Any, users: dict, where: str) -> Any:
        """The rule of ``mod``'s kind; a module with channel-indexed weights that runs again (shared, or in a
        loop) keeps one set of spaces: this call's inputs are coupled with the first call's channel by channel,
        and the spaces it makes are those of the first call."""
        name = n.target
        ins = [tag(a) for a in _flat_args(n.args) + list(n.kwargs.values())]
        if isinstance(mod, RECURRENT):   # the initial state is coupled by the rule itself (a carried state differs)
            ins = [tag(n.args[0] if n.args else n.kwargs.get("input"))]
        first = self._calls.get(name)
        before, selection = len(self._spaces), self.selections.get(name)
        out = self._module_rule(n, mod, tag, shape, users, where)
        made = list(range(before, len(self._spaces)))
        if not (isinstance(mod, _LEAVES) or attention_kind(mod) is not None):
            return out       # activations, pooling ...: nothing to share
        if first is None:
            self._calls[name] = (ins, made)
            return out
        old_ins, old_made = first
        if selection is not None or name in self.selections or len(made) != len(old_made):
            # one ChannelSelect cannot pick the kept channels of two different streams
            reason = f"{name!r} is called more than once and selects channels of a shared stream"
            self._pin([old_ins, ins] + [_Tag(0, [_Seg(s, 1)]) for s in old_made + made], reason)
            if selection is not None:
                self.selections[name] = selection
            return out
        for a, b in zip(old_made, made):
            self._union(a, b)
        self._couple_calls(name, old_ins, ins)
        return out

    def _couple_calls(self, name: str, old: list, new: list) -> None:
        """Couple the inputs of two calls of ``name`` position by position (its weights read both)."""
        reason = f"{name!r} is called more than once on inputs of different channel layouts or fixed channels"
        if len(old) != len(new):
            self._pin([old, new], reason)
            return
        for a, b in zip(old, new):
            ta, tb = _flat_tags(a), _flat_tags(b)
            if len(ta) != len(tb) or any([s.span for s in x.segs] != [s.span for s in y.segs] for x, y in zip(ta, tb)):
                self._pin([a, b], reason)
                continue
            for x, y in zip(ta, tb):
                for sa, sb in zip(x.segs, y.segs):
                    if sa.space is not None and sb.space is not None:
                        self._union(sa.space, sb.space)
                    elif sa.space is not None or sb.space is not None:
                        self._pin([x, y], reason)

    def _module_rule(self, n: fx.Node, mod: nn.Module, tag: Callable, shape: Any, users: dict, where: str) -> Any:
        name = n.target
        # the input: the first positional argument, else the first keyword one (conv(input=h), attn(x=h))
        x = tag(n.args[0]) if n.args else tag(next(iter(n.kwargs.values()))) if n.kwargs else None
        kind = attention_kind(mod)
        if isinstance(mod, (*CONVS, *TRANSPOSED_CONVS)) and isinstance(shape, torch.Size) \
                and len(shape) == mod.weight.dim() - 1:
            # unbatched input [C, *spatial]: channels on dim 0, which no rule below follows
            reason = f"{name!r} runs on an unbatched input (channels on dim 0)"
            self._pin(x, reason)
            s = self._new(mod.out_channels)
            self._add(_Seg(s, mod.out_channels), name, "out", 0)
            self._pin(_Tag(0, [_Seg(s, mod.out_channels)]), reason)
            return _Tag(0, [_Seg(s, mod.out_channels)])
        if isinstance(mod, CONVS):
            return self._conv(name, mod, x, shape)
        if isinstance(mod, TRANSPOSED_CONVS):
            # its input channels follow the producer (weight dim 0); its outputs are a new space (the Pruner
            # scores it through a view of weight dim 1, with criteria reading weights alone)
            if mod.groups != 1:
                self._pin(x, f"{name!r} ({type(mod).__name__}, groups={mod.groups}) reads fixed input channels")
            else:
                self._feed(x, [name])
            s = self._new(mod.out_channels)
            self._add(_Seg(s, mod.out_channels), name, "out", 0)
            if mod.groups != 1:
                self._pin(_Tag(1, [_Seg(s, 1)]), f"{name!r} ({type(mod).__name__}, groups={mod.groups})")
            return _Tag(1, [_Seg(s, mod.out_channels)])
        if isinstance(mod, RECURRENT):
            return self._recurrent(n, mod, tag, shape)
        if isinstance(mod, LinearRecurrent):   # its Linears inside a time loop: the rules follow stock modules
            self._pin([tag(a) for a in _flat_args(n.args) + list(n.kwargs.values())],
                      f"{name!r} (LinearRecurrent) keeps its widths: prune hidden units on the stock "
                      f"nn.{mod.stock_class.__name__} and compact before rnn_to_linear")
            return [None, [None, None]] if mod.mode == "LSTM" else [None, None]
        if isinstance(mod, nn.Linear):
            if x is not None:
                if x.dim != len(shape) - 1:
                    self._pin(x, f"{name!r} (Linear) takes channels on a non-last dim")
                else:
                    self._feed(x, [name])
            s = self._new(mod.out_features)
            self._add(_Seg(s, mod.out_features), name, "out", 0)
            return _Tag(len(shape) - 1, [_Seg(s, mod.out_features)])
        if isinstance(mod, nn.Embedding):
            s = self._new(mod.embedding_dim)
            self._add(_Seg(s, mod.embedding_dim), name, "out", 0)
            return _Tag(len(shape) - 1, [_Seg(s, mod.embedding_dim)])
        if isinstance(mod, BATCH_NORMS):
            if x is None:
                return None
            if x.dim != 1:     # e.g. BatchNorm1d over the tokens of a [N, T, C] Linear output
                self._pin(x, f"{name!r} ({type(mod).__name__}) normalises along dim 1, not along these channels")
                return x
            if not mod.affine and mod.track_running_stats:
                # no gamma / beta to zero: a removed (zeroed) channel comes out as -mean / sqrt(var + eps), a
                # constant the layers after it add up, which the compacted model would not have
                self._pin(x, f"{name!r} ({type(mod).__name__}, affine=False) turns a removed channel into the "
                             "constant -running_mean / sqrt(running_var + eps), which compaction would drop")
                self._feed(x, [name], "out")
                return x
            src = n.args[0]
            if x.dim == 1 and users.get(src, 1) > 1 and any(s.space is not None for s in x.segs):
                # pre-activation: the stream is shared, so this BN (and what it feeds) selects its own channels
                self._feed(x, [name], "out")
                s = self._new(mod.num_features, "selection")
                self._add(_Seg(s, mod.num_features), name, "out", 0)
                self.selections[name] = {"space": s, "segs": [(seg.space, seg.span) for seg in x.segs]}
                return _Tag(x.dim, [_Seg(s, mod.num_features)])
            self._feed(x, [name], "out")
            return x
        if isinstance(mod, INSTANCE_NORMS):
            # per sample and channel: channels never mix; a removed (zero) channel normalises to 0 unless running
            # statistics turn it into a constant that nothing would mask (affine: its shift is masked)
            if x is None:
                return None
            if x.dim != 1:
                self._pin(x, f"{name!r} ({type(mod).__name__}) normalises along dim 1, not along these channels")
            elif mod.track_running_stats and not mod.affine:
                self._pin(x, f"{name!r} ({type(mod).__name__}, running statistics, affine=False) turns a removed "
                             "channel into a constant, which compaction would drop")
            self._feed(x, [name], "out")        # resized with them (num_features), sliced where it has tensors
            return x
        if isinstance(mod, nn.GroupNorm):
            if x is not None and x.dim != 1:
                self._pin(x, f"{name!r} (GroupNorm) normalises along dim 1, not along these channels")
                return x
            if x is not None:
                per = mod.num_channels // mod.num_groups
                off = 0
                for seg in x.segs:
                    if off % per or seg.span % per or (seg.space is not None
                                                       and not self._coarsen(seg.space, seg.span, per)):
                        self._pin(x, f"{name!r} (GroupNorm) groups straddle concatenated segments or chunks")
                        break
                    self._add(seg, name, "out", off)
                    off += seg.span
            return x
        if isinstance(mod, nn.LayerNorm):
            self._pin(x, f"{name!r} (LayerNorm) normalises over these channels; removing any changes its "
                         "statistics")
            return x
        if kind in ("mha", "mha_linear"):
            self._pin([tag(a) for a in _flat_args(n.args) + list(n.kwargs.values())],
                      f"{name!r} ({type(mod).__name__}) keeps its embed_dim: its input and output width stay")
            s = self._mha_heads(name, mod)
            if _element_used(n, 1, 2):      # (output, weights): the weights average over all heads
                self._spaces[self._find(s)].pinned = (f"{name!r}: the attention weights it returns are used "
                                                      "(they average over all heads)")
            return [None, None]
        layers = transformer_layers(mod)
        if layers is not None:
            self._pin([tag(a) for a in _flat_args(n.args) + list(n.kwargs.values())],
                      f"{name!r} (nn.{type(mod).__name__}) normalises over these channels (LayerNorm)")
            for rel, layer in layers:
                self._transformer_layer(f"{name}.{rel}" if rel else name, layer)
            return None
        if kind == "hf":
            self._feed(x, [f"{name}.{lin}" for lin in ("query", "key", "value")])
            h, width = mod.num_attention_heads, mod.all_head_size
            s = self._new(h, "heads")
            for lin in ("query", "key", "value"):
                self._add(_Seg(s, width), f"{name}.{lin}", "out", 0)
            return self._attention_output(n, shape, _Seg(s, width), s, (h,))   # (MobileViT's: the context alone)
        if kind == "gqa":
            # unit = one key/value group: its k and v rows, its num_key_value_groups query heads' q rows and the
            # o_proj columns they feed (repeat_kv pairs query head j with key/value head j // groups)
            self._feed(x, [f"{name}.{lin}" for lin in ("q_proj", "k_proj", "v_proj")])
            s = self._new(mod.num_key_value_heads, "heads")
            for lin in ("q_proj", "k_proj", "v_proj"):
                self._add(_Seg(s, getattr(mod, lin).out_features), f"{name}.{lin}", "out", 0)
            self._add(_Seg(s, mod.q_proj.out_features), f"{name}.o_proj", "in", 0)
            return self._out_proj(n, f"{name}.o_proj", mod.o_proj.out_features, shape, s,
                                  (mod.num_heads, mod.num_key_value_heads))
        if kind == "fused":
            qkv, proj = fused_parts(mod)
            self._feed(x, [f"{name}.{qkv}"])
            h = getattr(mod, _heads_attr(mod))
            inner = h * mod.head_dim
            s = self._new(h, "heads")
            for i in range(3):
                self._add(_Seg(s, inner), f"{name}.{qkv}", "out", i * inner)
            self._add(_Seg(s, inner), f"{name}.{proj}", "in", 0)
            return self._out_proj(n, f"{name}.{proj}", getattr(mod, proj).out_features, shape, s, (h,))
        if isinstance(mod, nn.PReLU):
            if x is None or mod.num_parameters == 1:      # one shared slope: elementwise
                return x
            if x.dim != 1:
                self._pin(x, f"{name!r} (PReLU, {mod.num_parameters} slopes) applies them along dim 1, not along "
                             "these channels")
                return x
            self._feed(x, [name], "out")                   # one slope per channel: sliced with them
            return x
        if isinstance(mod, _PASS_MODULES):
            return x
        if isinstance(mod, _POOL_MODULES):     # pooling / resampling of the dims after the channels
            return x if x is not None and x.dim == 1 else self._unknown(n, x, where)
        if isinstance(mod, _PAD_MODULES):
            return self._pad(x, len(mod.padding) // 2, shape, n, where)
        if isinstance(mod, nn.Flatten):
            return self._flatten(x, shape, mod.start_dim, n, where, tag)
        return self._unknown(n, [tag(a) for a in _flat_args(n.args)], where)

    def _recurrent(self, n: fx.Node, mod: nn.Module, tag: Callable, shape: Any) -> Any:
        """An RNN / LSTM / GRU call ``mod(x, hx=None)``: the tags of ``(output, h_n)`` / ``(output, (h_n, c_n))``."""
        name, kind = n.target, type(mod).__name__
        src = n.args[0] if n.args else n.kwargs.get("input")
        x, in_shape = tag(src), self._shapes.get(src)
        hx = n.args[1] if len(n.args) > 1 else n.kwargs.get("hx")
        # the initial state's tensors (a getitem of another LSTM's output may hold the (h, c) pair)
        hx_tags = [t for a in _flat_args(hx) for t in _flat_states(tag(a))] if hx is not None else []
        h = mod.hidden_size
        s = self._new(h)
        self._add(_Seg(s, h), name, "out", 0)
        if not (isinstance(in_shape, torch.Size) and isinstance(shape, list) and isinstance(shape[0], torch.Size)):
            self._pin([x] + hx_tags + [_Tag(0, [_Seg(s, h)])], f"{name!r} ({kind}) runs on a packed sequence")
            return None
        if getattr(mod, "proj_size", 0):    # its outputs and h_n are projections, and it is not resized at all
            self._pin([x] + hx_tags + [_Tag(0, [_Seg(s, h)])], f"{name!r} (LSTM, proj_size={mod.proj_size}) is not "
                                                               "resized")
            return [None, [None, None]]
        if x is not None:
            if x.dim != len(in_shape) - 1:
                self._pin(x, f"{name!r} ({kind}) takes features on the last dim, not on these channels")
            else:
                self._feed(x, [name])
        for t in hx_tags:       # a state has the input's rank, its hidden units on the last dim
            if (isinstance(t, _Tag) and t.dim == len(in_shape) - 1 and len(t.segs) == 1 and t.segs[0].span == h
                    and t.segs[0].space is not None):
                self._union(t.segs[0].space, s)
            else:
                self._pin([t, _Tag(0, [_Seg(s, h)])], f"{name!r} ({kind}) starts from an initial state of fixed "
                                                      "width (passed in, or made by an untracked op)")
        state = _Tag(len(shape[0]) - 1, [_Seg(s, h)])   # h_n / c_n: [layers * directions, (batch,) hidden]
        out = _Tag(len(shape[0]) - 1, [_Seg(s, h)] * (2 if mod.bidirectional else 1))
        return [out, [state, state]] if isinstance(mod, nn.LSTM) else [out, state]

    def _mha_heads(self, name: str, mod: nn.Module) -> int:
        """Head space of an ``"mha"`` module (packed q|k|v in-projection rows) or ``"mha_linear"`` one (rows of
        its q / k / v Linears), and the ``out_proj`` columns."""
        inner = mod.num_heads * mod.head_dim
        s = self._new(mod.num_heads, "heads")
        if attention_kind(mod) == "mha_linear":
            for lin in QKV_PROJ:
                self._add(_Seg(s, inner), f"{name}.{lin}", "out", 0)
            if mod.bias_k is not None:
                self._spaces[self._find(s)].pinned = (f"{name!r}: its bias_k / bias_v (add_bias_kv) are not "
                                                      "sliced by head")
        else:
            for i in range(3):
                self._add(_Seg(s, inner), name, "out", i * inner)
        self._add(_Seg(s, inner), f"{name}.out_proj", "in", 0)
        return s

    def _transformer_layer(self, name: str, layer: nn.Module) -> None:
        """``self_attn`` heads, a decoder layer's cross-attention (``multihead_attn``) heads (both called with
        need_weights=False; the memory stream keeps its width) and the feed-forward hidden channels."""
        self._mha_heads(f"{name}.self_attn", layer.self_attn)
        if isinstance(layer, nn.TransformerDecoderLayer):
            self._mha_heads(f"{name}.multihead_attn", layer.multihead_attn)
        s = self._new(layer.linear1.out_features)
        self._add(_Seg(s, layer.linear1.out_features), f"{name}.linear1", "out", 0)
        self._add(_Seg(s, layer.linear1.out_features), f"{name}.linear2", "in", 0)

    def _conv(self, name: str, mod: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: _Tag | None, shape: Any) -> _Tag:
        if x is not None and x.dim != 1:    # e.g. a Linear's [N, T, C] output: the conv reads dim 1 (T)
            self._pin(x, f"{name!r} ({type(mod).__name__}) reads its input channels on dim 1, not these channels")
            x = None
        if mod.groups == 1:
            self._feed(x, [name])
            s = self._new(mod.out_channels)
            self._add(_Seg(s, mod.out_channels), name, "out", 0)
            return _Tag(1, [_Seg(s, mod.out_channels)])
        ipg, opg = mod.in_channels // mod.groups, mod.out_channels // mod.groups
        if x is None or any(seg.space is None for seg in x.segs):
            s = self._new(mod.groups)     # conv groups are units of a fresh space, input fixed
            self._pin(_Tag(1, [_Seg(s, 1)]), f"{name!r} (grouped conv) reads fixed input channels")
            self._add(_Seg(s, mod.out_channels), name, "out", 0)
            return _Tag(1, [_Seg(s, mod.out_channels)])
        out_segs, off = [], 0
        for seg in x.segs:
            if off % ipg or seg.span % ipg or not self._coarsen(seg.space, seg.span, ipg):
                self._pin(x, f"{name!r} (groups={mod.groups}) conv groups straddle concatenated segments or chunks")
                s = self._new(mod.out_channels)
                self._pin(_Tag(1, [_Seg(s, 1)]), "see above")
                return _Tag(1, [_Seg(s, mod.out_channels)])
            span = seg.span // ipg * opg
            self._add(seg, name, "out", off // ipg * opg, span)
            out_segs.append(_Seg(seg.space, span))
            off += seg.span
        return _Tag(1, out_segs)

    def _flatten(self, x: _Tag | None, shape: Any, start: int, n: fx.Node, where: str, tag: Callable) -> Any:
        if x is None:
            return None
        if x.dim == start and len(shape) == start + 1:
            in_shape = None
            src = n.args[0]
            if isinstance(src, fx.Node):
                in_shape = self._shapes.get(src)
            factor = shape[start] // x.width if in_shape is None else math.prod(in_shape[start + 1:])
            return _Tag(start, [_Seg(s.space, s.span * factor) for s in x.segs])
        if x.dim < start:
            return x
        return self._unknown(n, x, where)

    def _pad(self, x: _Tag | None, k: int, shape: Any, n: fx.Node, where: str) -> Any:
        """Padding of the last ``k`` dims: channels pass through unless they are one of those dims."""
        if x is None or (isinstance(shape, torch.Size) and len(shape) - k > x.dim):
            return x
        return self._unknown(n, x, where)

    def _unknown(self, n: fx.Node, tags: Any, where: str) -> None:
        self._pin(tags, f"unsupported op {where}")
        return None

    # ----------------------------------------------------------------------------- function rules
    def _function(self, n: fx.Node, tag: Callable, shape: Any, shapes: dict, where: str) -> Any:
        fname = _fn_name(n.target)
        args = list(n.args)
        in_tags = [tag(a) for a in _flat_args(args) + list(n.kwargs.values())]
        if not any(t is not None for t in _flat_tags(in_tags)):
            return None
        if shape is None:       # size(), dim(), shape access: no tensor comes out
            if fname in ("size", "dim", "getattr", "numel") or n.op == "call_method":
                return None
            if fname == "getitem":
                return None
            return self._unknown(n, in_tags, where)
        x = tag(args[0]) if args else None
        if fname == "getitem":
            src = args[0]
            if isinstance(x, list):
                if isinstance(args[1], slice) or (isinstance(args[1], int) and -len(x) <= args[1] < len(x)):
                    return x[args[1]]          # a piece, or a list of pieces (chunk(4)[1:])
                return self._unknown(n, in_tags, where)
            if isinstance(x, _Tag):
                return self._index(x, args[1], shapes.get(src), shape, n, where)
            return None
        # x ** c with a constant c (GPT-2's tanh GELU is written with torch.pow): elementwise, like the ones below
        scalar_pow = fname in ("pow", "pow_") and len(args) > 1 and isinstance(args[1], (int, float))
        if scalar_pow or fname in _PASS_FN or (n.op == "call_method" and fname in (
                "relu", "sigmoid", "contiguous", "float", "clone", "detach", "to", "gelu")):
            if isinstance(x, _Tag) and isinstance(shape, torch.Size):
                return x
            return self._unknown(n, in_tags, where)
        if fname in ("add", "iadd") and isinstance(shape, list):    # tuple concatenation: outputs = (h,) + outs[1:]
            return [t for a in args[:2] for t in _tuple_tags(a, tag, shapes)]
        if fname in _BINARY_FN:
            return self._binary(n, args, tag, shapes, shape, where)
        if fname in ("flatten",):
            start = args[1] if len(args) > 1 else n.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else n.kwargs.get("end_dim", -1)
            in_shape = shapes.get(args[0])
            if end not in (-1, len(in_shape) - 1):
                return self._unknown(n, in_tags, where)
            return self._flatten(x, shape, start % len(in_shape), n, where, tag)
        if fname in ("view", "reshape"):
            in_shape = shapes.get(args[0])
            if isinstance(x, _Tag) and in_shape is not None and _size_follows(n, args, x.dim):
                if tuple(in_shape) == tuple(shape):
                    return x
                if (len(shape) == x.dim + 1 and tuple(shape[:x.dim]) == tuple(in_shape[:x.dim])):
                    return self._flatten(x, shape, x.dim, n, where, tag)
            return self._unknown(n, in_tags, where)
        if fname in ("cat", "concat", "concatenate"):
            return self._cat(n, tag, shapes, shape, where)
        if fname in ("split", "split_with_sizes", "chunk", "tensor_split"):
            return self._split(n, x, args, shapes, where, in_tags)
        if fname in ("slice", "select") and isinstance(x, _Tag):     # aten ops of x[...] (torch.export graphs)
            in_shape = shapes.get(args[0])
            dim = (args[1] if len(args) > 1 else n.kwargs.get("dim", 0)) % len(in_shape)
            if dim != x.dim:
                return _Tag(x.dim - int(fname == "select" and dim < x.dim), x.segs)
            if fname == "slice" and tuple(shape) == tuple(in_shape):
                return x
            return self._unknown(n, in_tags, where)
        if fname in ("max", "min", "maximum", "minimum") and len(args) > 1 and isinstance(args[1], fx.Node):
            return self._binary(n, args, tag, shapes, shape, where)        # torch.max(a, b): elementwise
        if fname in _REDUCE_FN:
            dims = args[1] if len(args) > 1 else n.kwargs.get("dim")
            keep = n.kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            if isinstance(x, _Tag) and dims is not None:
                nd = len(shapes.get(args[0]))
                dims = [d % nd for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
                if x.dim not in dims:
                    out = _Tag(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.segs)
                    # max / min over a dim return (values, indices): the values carry the channels
                    return [out, None] if isinstance(shape, list) else out
            return self._unknown(n, in_tags, where)
        if fname in _RESAMPLE_FN and isinstance(x, _Tag) and x.dim == 1:
            return x
        if fname in ("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                     "replication_pad1d", "replication_pad2d", "replication_pad3d", "circular_pad1d",
                     "circular_pad2d", "circular_pad3d") and isinstance(x, _Tag):
            pad = args[1] if len(args) > 1 else n.kwargs.get("pad")
            if isinstance(pad, (tuple, list)):
                return self._pad(x, len(pad) // 2, shape, n, where)
        return self._unknown(n, in_tags, where)

    def _index(self, x: _Tag, idx: Any, in_shape: Any, shape: Any, n: fx.Node, where: str) -> Any:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in idx):
            return self._unknown(n, x, where)
        if len(idx) > x.dim and idx[x.dim] != slice(None):
            return self._unknown(n, x, where)
        dropped = sum(isinstance(i, int) for i in idx[:x.dim])
        return _Tag(x.dim - dropped, x.segs)

    def _binary(self, n: fx.Node, args: list, tag: Callable, shapes: dict, shape: Any, where: str) -> Any:
        tensors = [a for a in args if isinstance(a, fx.Node) and isinstance(shapes.get(a), torch.Size)]
        tg = [tag(a) for a in tensors]
        nd = len(shape)
        known = [(t, shapes[a]) for t, a in zip(tg, tensors) if t is not None]
        if not known:
            return None
        out = known[0][0]
        out = _Tag(out.dim + nd - len(known[0][1]), out.segs)
        for a, t in zip(tensors, tg):
            s = shapes[a]
            if t is None:
                d = out.dim - (nd - len(s))
                if 0 <= d < len(s) and s[d] != 1:
                    self._pin(out, f"{where}: combines the channels with an untracked tensor")
                continue
            t = _Tag(t.dim + nd - len(s), t.segs)
            if t.dim != out.dim or [sg.span for sg in t.segs] != [sg.span for sg in out.segs]:
                self._pin([out, t], f"{where}: operands have different channel layouts")
                continue
            for sa, sb in zip(out.segs, t.segs):
                if sa.space is None or sb.space is None:
                    self._pin([out, t], f"{where}: adds fixed channels")
                else:
                    self._union(sa.space, sb.space)
        return out

    def _cat(self, n: fx.Node, tag: Callable, shapes: dict, shape: Any, where: str) -> Any:
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        dim %= len(shape)
        if isinstance(tensors, fx.Node):       # one node holding a list (a slice of chunk pieces)
            held, sizes = tag(tensors), shapes.get(tensors)
            if not (isinstance(held, list) and isinstance(sizes, list) and len(held) == len(sizes)
                    and all(isinstance(t, (_Tag, type(None))) for t in held)):
                return self._unknown(n, [held], where)
            tg, widths = held, [s[dim] for s in sizes]
        else:
            tg, widths = [tag(a) for a in tensors], [shapes[a][dim] if isinstance(shapes.get(a), torch.Size) else None
                                                     for a in tensors]
        if any(t is not None and t.dim != dim for t in tg):
            ref = next(t for t in tg if t is not None)
            if all(t is not None and [s.span for s in t.segs] == [s.span for s in ref.segs] for t in tg):
                for t in tg[1:]:
                    for sa, sb in zip(ref.segs, t.segs):
                        if sa.space is not None and sb.space is not None:
                            self._union(sa.space, sb.space)
                return ref
            return self._unknown(n, tg, where)
        segs: list[_Seg] = []
        for width, t in zip(widths, tg):
            segs += t.segs if t is not None else [_Seg(None, width)]
        return _Tag(dim, segs)

    def _split(self, n: fx.Node, x: Any, args: list, shapes: dict, where: str, in_tags: list) -> Any:
        if not isinstance(x, _Tag):
            return None
        in_shape = shapes.get(args[0])
        out_shapes = shapes.get(n)
        dim = args[2] if len(args) > 2 else n.kwargs.get("dim", 0)
        dim %= len(in_shape)
        if dim != x.dim:
            return [x for _ in out_shapes]
        # The compacted model splits its *compacted* width: chunk(k) / tensor_split(k) into equal parts (or a split
        # whose size is traced as ``x.shape[d] // k``) cut at the same channels only if every piece keeps as many
        # channels as the others (coupled position by position); sizes or indices in the code (split(8),
        # split([8, 8])) cannot follow a smaller input at all.
        k = args[1] if len(args) > 1 else next((n.kwargs[a] for a in ("chunks", "sections", "indices_or_sections",
                                                                      "split_size_or_sections", "split_size")
                                                if a in n.kwargs), None)
        fname = _fn_name(n.target)
        follows = ((fname in ("chunk", "tensor_split") and isinstance(k, int))
                   or (fname == "split" and _traced_chunks(k, args[0], dim, len(in_shape)) is not None))
        widths = [o[dim] for o in out_shapes]
        if follows and len(x.segs) == 1 and len(widths) > 1 and widths == [x.width // len(widths)] * len(widths):
            pieces = self._chunk_space(x, len(widths))
            if pieces is not None:
                return pieces
        pieces, start = [], 0
        bounds = [0]
        for s in x.segs:
            bounds.append(bounds[-1] + s.span)
        for o in out_shapes:
            end = start + o[dim]
            if start not in bounds or end not in bounds:
                self._pin(x, f"{where}: splits inside a channel group")
                pieces.append(None)
            else:
                i, j = bounds.index(start), bounds.index(end)
                pieces.append(_Tag(dim, x.segs[i:j]))
            start = end
        if not follows:
            self._pin(x, f"{where}: splits the channels at fixed sizes")
        elif all(p is not None for p in pieces):
            if any([s.span for s in p.segs] != [s.span for s in pieces[0].segs] for p in pieces):
                self._pin(x, f"{where}: chunks of different channel layouts")
            else:
                for p in pieces[1:]:
                    for sa, sb in zip(pieces[0].segs, p.segs):
                        if sa.space is not None and sb.space is not None:
                            self._union(sa.space, sb.space)
                        elif sa.space is not None or sb.space is not None:
                            self._pin(x, f"{where}: chunks fixed channels with prunable ones")
        return pieces

    def _chunk_space(self, x: _Tag, k: int) -> list[_Tag] | None:
        """``k`` equal pieces of a one-segment tag, coupled channel by channel: unit ``j`` of their space is
        channel ``j`` of every piece (the producer's rows ``j``, ``j + C/k``, ...). None when the segment's units
        do not split into ``k`` interleaved blocks (e.g. whole norm groups across the cut)."""
        seg = x.segs[0]
        width = seg.span // k
        if seg.space is None:
            return [_Tag(x.dim, [_Seg(None, width)]) for _ in range(k)]
        root, f = self._resolve(seg.space)
        blocks = math.lcm(f, k)
        if blocks > f:      # a new root over the old one, whose segments it cuts into more interleaved blocks
            top = self._new(self._spaces[root].n_units)
            if not self._link(root, top, blocks // f):
                return None
            root = top
        piece = root
        if blocks > k:      # each piece is blocks // k consecutive blocks of the root
            piece = self._new(1)
            self._spaces[piece].parent, self._spaces[piece].factor = root, blocks // k
        return [_Tag(x.dim, [_Seg(piece, width)]) for _ in range(k)]

    # ------------------------------------------------------------------------------ heads probing
    def _probe_heads(self, attn_args: dict) -> None:
        from .compact import resize_module

        for name, (a, k) in attn_args.items():
            mod = self.modules[name]
            hs = [s for s in range(len(self._spaces)) if self._spaces[s].kind == "heads" and any(
                m.module.startswith(name + ".") for m in self._spaces[s].members)]
            if not hs:
                continue
            sp = self._spaces[self._find(hs[0])]
            if sp.n_units < 2:
                sp.pinned = sp.pinned or f"{name!r} has a single head"
                continue
            probe = copy.deepcopy(mod)
            copied_a, copied_k = pytree.tree_map(_probe_copy, (a, k))   # a cache the probe updates stays as it was
            reason = ""
            try:
                members = [m for m in sp.members if m.module.startswith(name + ".")]
                g = Group(0, sp.n_units, members, "heads", True)
                gone: dict[tuple[str, str], list[Tensor]] = {}
                for m in members:
                    gone.setdefault((m.module[len(name) + 1:], m.axis), []).append(
                        g.member_indices(m, torch.tensor([sp.n_units - 1])))
                plan: dict[str, dict[str, Tensor]] = {}
                for (sub_name, axis), idx in gone.items():
                    sub = probe.get_submodule(sub_name)
                    full = torch.arange(sub.weight.shape[0 if axis == "out" else 1])
                    plan.setdefault(sub_name, {})[axis] = full[~torch.isin(full, torch.cat(idx))]
                for sub_name, ax in plan.items():
                    new = resize_module(probe.get_submodule(sub_name), ax.get("out"), ax.get("in"))
                    set_submodule(probe, sub_name, new)
                set_heads(probe)
                with torch.no_grad():
                    probe(*copied_a, **copied_k)
            except Exception as e:  # noqa: BLE001 - the reason is reported on the group
                reason = (f"{name!r} ({type(mod).__name__}) does not run with fewer heads "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            if reason:
                sp.pinned = sp.pinned or reason

    # ---------------------------------------------------------------------------------- finishing
    def _couple_tied(self) -> None:
        """A weight held by several layers (a tied embedding and decoder, ``dec.weight = enc.weight``) has one
        set of channels along each dim: the spaces of its holders' members along a dim are coupled position by
        position; where the holders' layouts along a dim differ (one has no member there, as an embedding's
        vocabulary rows, or the offsets differ) those spaces are pinned."""
        for names in tied_layers(self.model):
            for dim in (0, 1):
                roots = [r for r in range(len(self._spaces)) if self._spaces[r].parent is None]  # (as merged so far)
                # (a set: a layer called twice has each member twice)
                layouts = {name: sorted({(m.offset, m.span, r) for r in roots for m in self._spaces[r].members
                                         if m.module == name and _tensor_dim(self.modules[name], m.axis) == dim})
                           for name in names}
                if not any(layouts.values()):
                    continue
                if len({tuple((o, span) for o, span, _ in lay) for lay in layouts.values()}) == 1:
                    first, *rest = layouts.values()
                    for entries in rest:
                        for (_, _, a), (_, _, b) in zip(first, entries):
                            self._union(a, b)
                    continue
                idle = [n for n in names if not any(m.module == n for r in roots for m in self._spaces[r].members)]
                reason = (f"{sorted(names)} hold one weight tensor and {idle} is not called in the traced forward"
                          if idle else f"{sorted(names)} hold one weight tensor whose dim {dim} they cut differently")
                for lay in layouts.values():
                    for _, _, r in lay:
                        sp = self._spaces[self._find(r)]
                        sp.pinned = sp.pinned or reason

    def _pin_own_forwards(self, inputs: Mapping[str, Tensor]) -> None:
        """A layer whose class overrides the stock forward is cut only where cutting it gives what the uncut one
        gives on the kept channels (``_cuts_like_stock``, probed on its real input): an output scaled afterwards
        cuts so, a weight standardised over its inputs (timm's StdConv2d) or state per channel that compaction
        cannot cut (NFNet's ScaledStdConv2d gain, an adapter) does not, and its channels stay."""
        for name, inp in inputs.items():
            mod = self.modules[name]
            if _cuts_like_stock(mod, inp):
                continue
            reason = (f"{name!r} ({type(mod).__name__}) computes its own forward, which gives other outputs once "
                      "cut")
            for r in range(len(self._spaces)):
                sp = self._spaces[r]
                if sp.parent is None and any(m.module == name for m in sp.members):
                    sp.pinned = sp.pinned or reason

    def _finish(self) -> None:
        self._couple_tied()
        # a pinned selection keeps all its channels, so the stream it selects from must keep them all too (a
        # selection loses every channel its stream loses); a stream may itself be a selection: until stable
        changed = True
        while changed:
            changed = False
            for bn, sel in self.selections.items():
                reason = self._spaces[self._find(sel["space"])].pinned
                for s, _span in sel["segs"] if reason else ():
                    sp = None if s is None else self._spaces[self._find(s)]
                    if sp is not None and not sp.pinned:
                        sp.pinned, changed = f"{bn!r} selects from these channels and is pinned ({reason})", True
        roots = sorted({self._find(s) for s in range(len(self._spaces))})
        for r in roots:
            sp = self._spaces[r]
            members = list(dict.fromkeys(sp.members))
            if not members:
                continue
            gid = len(self.groups)
            pinned = sp.pinned
            if not pinned and sp.n_units < 2:
                pinned = "a single unit"
            self.groups.append(Group(gid, sp.n_units, members, sp.kind, not pinned, pinned))
            self.space_of_group[gid] = r
        self.group_of_space = {r: g for g, r in self.space_of_group.items()}
        for sel in self.selections.values():
            sel["group"] = self.group_of_space.get(self._find(sel["space"]))
            segs = []
            for s, span in sel["segs"]:
                r, f = (None, 1) if s is None else self._resolve(s)
                # a chunked segment is f interleaved blocks of its group: the stream's order, block by block
                segs += [(None if r is None else self.group_of_space.get(r), span // f)] * f
            sel["segs"] = segs

    # --------------------------------------------------------------------------------- public API
    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def __repr__(self) -> str:
        return (f"DependencyGraph({len(self.groups)} groups, {len(self.prunable)} prunable, "
                f"{len(self.selections)} channel selections)")

    def describe(self) -> str:
        """One line per group: id, kind, size x unit, members, and why pinned groups are pinned."""
        lines = []
        for g in self.groups:
            mem = ", ".join(f"{m.module}.{m.axis}[{m.offset}:{m.offset + m.span}]" for m in g.members[:6])
            more = f" (+{len(g.members) - 6})" if len(g.members) > 6 else ""
            state = "prunable" if g.prunable else f"pinned: {g.reason}"
            lines.append(f"#{g.id} {g.kind} {g.size}x{g.unit}: {mem}{more}  [{state}]")
        return "\n".join(lines)

    def member_channel_scores(self, m: Member, fn: str = "l1") -> Tensor:
        """Per-index score of a member: L1 (or L2) of weight rows (``out``) or columns (``in``); for an
        attention module's in-projection, of its q|k|v weight rows."""
        mod = self.modules[m.module]
        if attention_kind(mod) == "mha":
            rows = [_row_norms(getattr(mod, t).detach(), fn) for t, _, _ in in_proj_parts(mod) if "weight" in t]
            return torch.cat(rows)[m.offset:m.offset + m.span]
        if isinstance(mod, RECURRENT):
            if m.axis == "out":
                v = hidden_unit_rows(mod, lambda t: getattr(mod, t).detach())
            else:
                v = torch.cat([getattr(mod, t).detach().t() for t in input_columns(mod)], 1)
            return _row_norms(v, fn)[m.offset:m.offset + m.span]
        w = mod.weight.detach()
        if isinstance(mod, nn.Embedding):
            v = w.abs() if fn == "l1" else w.pow(2)
            return v.sum(0)[m.offset:m.offset + m.span]
        if w.dim() == 1:     # norms: |gamma|
            return w.abs()[m.offset:m.offset + m.span]
        v = w.abs() if fn == "l1" else w.pow(2)
        dims = [d for d in range(v.dim()) if d != weight_dim(mod, m.axis)]
        return v.sum(dim=dims)[m.offset:m.offset + m.span]

    def group_scores(self, score_fn: Callable[[nn.Module, Member], Tensor | None] | str = "l1",
                     reduce: str = "mean", prunable_only: bool = True, normalize: bool = False) -> dict[int, Tensor]:
        """One score per unit of each group, aggregated over its weight members (conv / linear / embedding).

        ``score_fn``: ``"l1"`` / ``"l2"`` or a callable ``(module, member) -> Tensor[member.span]`` of
        per-index scores, or None to leave that member out. Each member's scores are averaged per unit;
        ``reduce`` (``"mean"``, ``"sum"``, ``"max"``) combines the members. BN/GN/LN gammas are left out of
        ``"l1"``/``"l2"`` (different scale); a callable sees them too. ``normalize``: each member's unit
        scores are first divided by their mean magnitude ``c`` (so a layer with large weights does not
        outvote the others) and the combined scores multiplied by the members' mean ``c`` (so they stay on
        the criterion's scale and compare across groups; a one-member group keeps its scores exactly).
        Non-finite scores (units removed before, at -inf) stay -inf and are left out of ``c``. A group
        with no member scored gets zeros.
        """
        if reduce not in ("mean", "sum", "max"):
            raise ValueError(f"reduce must be 'mean', 'sum' or 'max', got {reduce!r}")
        out = {}
        for g in self.groups:
            if prunable_only and not g.prunable:
                continue
            rows = []
            for m in g.members:
                mod = self.modules[m.module]
                if isinstance(score_fn, str):
                    if isinstance(mod, (*NORMS, nn.PReLU)):     # scales / slopes, not weights
                        continue
                    s = self.member_channel_scores(m, score_fn)
                else:
                    s = score_fn(mod, m)
                    if s is None:
                        continue
                    s = torch.as_tensor(s).detach()
                rows.append(s.reshape(g.size, -1).double().mean(1))
            if not rows:
                rows = [torch.zeros(g.size, dtype=torch.float64)]
            out[g.id] = _combine(torch.stack(rows), reduce, normalize)
        return out

    def select(self, sparsity: float, scores: Mapping[int, Tensor] | None = None, scope: str = "global",
               round_to: int | None = None, min_keep: int = 1, normalize: bool = True) -> dict[int, Tensor]:
        """Kept unit indices per prunable group removing ``sparsity`` of the units (lowest scores first).

        ``scope="global"`` ranks all groups' units together (scores divided by their group's mean when
        ``normalize``); ``"layer"`` removes the fraction from each group. ``round_to`` (a positive int or None)
        rounds every group's kept channel count up to a multiple, heads included (``round_keep``). Every
        group keeps at least ``min_keep`` units; a selection group (``ChannelSelect``) counts only the units
        its stream keeps too (``keep_selections``).
        """
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        _check_round_to(round_to)
        scores = self.group_scores() if scores is None else scores
        groups = [g for g in self.prunable if g.id in scores]
        keep: dict[int, Tensor] = {}
        if scope == "layer":
            for g in groups:
                k = max(min_keep, g.size - floor_product(sparsity, g.size))
                keep[g.id] = torch.sort(torch.argsort(scores[g.id], descending=True, stable=True)[:k]).values
        elif scope == "global":
            flat, owner = [], []
            for g in groups:
                s = scores[g.id].double()
                if normalize:
                    s = s / s.mean().clamp_min(1e-12)
                s = s.clone()
                s[torch.argsort(s, descending=True, stable=True)[:min_keep]] = float("inf")
                flat.append(s)
                owner.append(torch.full((g.size,), g.id))
            if not flat:
                return {}
            allf = torch.cat(flat)
            k = floor_product(sparsity, allf.numel())
            removed = torch.zeros(allf.numel(), dtype=torch.bool)
            removed[torch.argsort(allf, stable=True)[:k]] = True
            removed &= torch.isfinite(allf)
            start = 0
            for g in groups:
                r = removed[start:start + g.size]
                keep[g.id] = torch.nonzero(~r).reshape(-1)
                start += g.size
        else:
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        keep = self.keep_selections(self.fit_selections(keep, scores), scores, min_keep)
        return self.round_keep(keep, round_to, scores)

    def fit_selections(self, keep: Mapping[int, Tensor], scores: Mapping[int, Tensor] | None = None
                       ) -> dict[int, Tensor]:
        """``keep`` where every selection group keeps as many units as it chose, taken among the units its stream
        keeps (its best-scoring there; lowest index without ``scores``): all of them where the stream keeps
        fewer.

        A selection group (the channels a ``ChannelSelect`` picks out of a shared stream) chosen independently of
        its stream loses both what it dropped and what the stream dropped (``compact`` intersects them); along
        a chain of selections, each reading the one before (RepVGG's identity BatchNorm branch in every block),
        that compounds until a group keeps nothing. Picked within the stream, a group keeps its own share.
        """
        from .compact import _effective_keep, _stream_mask

        out = _kept_indices(keep)
        for sel in self.selections.values():
            gid = sel["group"]
            if gid not in out:
                continue
            size = self.groups[gid].size
            eff = _effective_keep(self, out)      # per selection: its stream may hold an earlier one
            stream = _stream_mask(self, sel["segs"], eff)
            in_stream = torch.nonzero(stream.reshape(size, -1).all(1)).reshape(-1)
            if scores is not None and gid in scores:
                # (units an earlier step removed score -inf: they stay removed, even where the stream kept them)
                s = scores[gid][in_stream]
                alive = s > float("-inf")
                in_stream = in_stream[alive][torch.argsort(s[alive], descending=True, stable=True)]
            picked = in_stream[:out[gid].numel()]
            if picked.numel():        # (none in the stream: keep_selections brings some back)
                out[gid] = torch.sort(picked).values
        return out

    def keep_selections(self, keep: Mapping[int, Tensor], scores: Mapping[int, Tensor] | None = None,
                        min_keep: int = 1) -> dict[int, Tensor]:
        """``keep`` where every selection group keeps at least ``min_keep`` units that its stream keeps too.

        A selection group (the channels a ``ChannelSelect`` picks out of a shared stream, e.g. a DenseNet layer's
        BN and conv input) and its stream's groups are chosen independently, and a unit survives only where
        both keep it (``compact`` intersects them); when too few survive, the best-scoring surviving units
        (lowest index without ``scores``) are added back. Without this a layer could read no channel at all,
        which ``compact`` refuses (like any group that keeps no unit).
        """
        from .compact import _effective_keep, _stream_mask

        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
        out = _kept_indices(keep)
        for sel in self.selections.values():
            gid = sel["group"]
            if gid not in out:
                continue
            eff = _effective_keep(self, out)      # again per selection: one stream may hold an earlier selection
            short = min(min_keep, self.groups[gid].size) - int(eff[gid].sum())
            if short <= 0:
                continue
            size = self.groups[gid].size
            stream = _stream_mask(self, sel["segs"], eff)
            in_stream = stream.reshape(size, -1).all(1)
            extra = torch.nonzero(in_stream & ~eff[gid]).reshape(-1)
            if scores is not None and gid in scores:
                extra = extra[torch.argsort(scores[gid][extra], descending=True, stable=True)]
            if extra.numel() < short:      # coarser units than the stream's (a GroupNorm after the BN): none is
                rest = torch.nonzero(~in_stream).reshape(-1)     # whole in the stream; bring the stream back
                if scores is not None and gid in scores:        # for the best of the others
                    rest = rest[torch.argsort(scores[gid][rest], descending=True, stable=True)]
                for u in rest[:short - extra.numel()].tolist():
                    self._keep_stream_channels(out, sel["segs"], u * (stream.numel() // size),
                                               (u + 1) * (stream.numel() // size))
                extra = torch.cat([extra, rest[:short - extra.numel()]])
            out[gid] = torch.unique(torch.cat([out[gid], extra[:short]]))
        return out

    def _keep_stream_channels(self, out: dict[int, Tensor], segs: list, lo: int, hi: int) -> None:
        """Add to ``out`` the units of the stream's groups that hold stream channels ``[lo, hi)``."""
        pos = 0
        for sgid, span in segs:
            if sgid is not None and sgid in out and pos < hi and lo < pos + span:
                per = span // self.groups[sgid].size
                units = torch.arange(max(lo, pos) - pos, min(hi, pos + span) - pos) // per
                out[sgid] = torch.unique(torch.cat([out[sgid], units]))
            pos += span

    def round_keep(self, keep: Mapping[int, Tensor], round_to: int | None,
                   scores: Mapping[int, Tensor] | None = None) -> dict[int, Tensor]:
        """Round every kept group's channel count up to a multiple of ``round_to`` (None: unchanged), adding
        back the best-scoring removed units (lowest index without ``scores``).

        Counts are in channels, not units: a group steps by ``round_to / gcd(round_to, channels per unit)``
        units, so a head group whose ``head_dim`` is a multiple keeps any number of heads, and a unit of 16
        channels (GroupNorm, grouped conv) is already a multiple of 8. Where the next multiple is wider than
        the group, it keeps its full width (e.g. 12 channels with ``round_to=8``). A selection group
        (``ChannelSelect``) keeps only what its stream keeps too, so it is rounded after the other groups on
        those surviving channels, and capped at what its stream keeps (a multiple when every stream group
        rounded to one).
        """
        _check_round_to(round_to)
        out = {k: torch.as_tensor(v) for k, v in keep.items()}
        out = {k: (torch.nonzero(v) if v.dtype == torch.bool else v.to(torch.long)).reshape(-1)
               for k, v in out.items()}
        if round_to is None or round_to == 1:
            return out
        from .compact import _effective_keep, _stream_mask

        def add_best(gid: int, kept: Tensor, n_kept: int, candidates: Tensor) -> None:
            """Add the best ``candidates`` (bool over units) so ``n_kept`` reaches the rounded count."""
            g = self.groups[gid]
            # channels, not units: a unit can be several channels (head_dim, GroupNorm / grouped-conv groups)
            per = math.gcd(*(m.span // g.size for m in g.members))
            step = round_to // math.gcd(round_to, per)
            short = min(-(-n_kept // step) * step, g.size) - n_kept
            extra = torch.nonzero(candidates).reshape(-1)
            if short <= 0 or extra.numel() == 0:
                return
            if scores is not None and gid in scores:
                extra = extra[torch.argsort(scores[gid][extra], descending=True, stable=True)]
            out[gid] = torch.sort(torch.cat([kept, extra[:short]])).values

        selection_groups = {sel["group"] for sel in self.selections.values()}
        for gid, kept in list(out.items()):
            if gid not in selection_groups:
                missing = torch.ones(self.groups[gid].size, dtype=torch.bool)
                missing[kept] = False
                add_best(gid, kept, kept.numel(), missing)
        # compact intersects a selection with its stream, so rounding its own keep-set proves nothing: round
        # what survives, with units the stream keeps; in graph order (a stream may hold an earlier selection)
        for sel in self.selections.values():
            gid = sel["group"]
            if gid not in out:
                continue
            eff = _effective_keep(self, out)
            in_stream = _stream_mask(self, sel["segs"], eff).reshape(self.groups[gid].size, -1).all(1)
            add_best(gid, out[gid], int(eff[gid].sum()), in_stream & ~eff[gid])
        return out


def _check_round_to(round_to: Any) -> None:
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")


def _row_norms(w: Tensor, fn: str) -> Tensor:
    v = w.abs() if fn == "l1" else w.pow(2)
    return v.reshape(v.shape[0], -1).sum(1) if v.dim() > 1 else v


def _combine(rows: Tensor, reduce: str, normalize: bool) -> Tensor:
    """Combine per-member unit scores ``[members, units]`` (see ``group_scores``)."""
    if not normalize or rows.shape[0] == 1:   # one member: its scores exactly, so selections match per-layer ones
        return {"mean": rows.mean(0), "sum": rows.sum(0), "max": rows.amax(0)}[reduce]
    finite = torch.isfinite(rows)
    c = torch.where(finite, rows.abs(), 0.0).sum(1) / finite.sum(1).clamp_min(1)
    out = rows / c.clamp_min(1e-30).unsqueeze(1)
    out = {"mean": out.mean(0), "sum": out.sum(0), "max": out.amax(0)}[reduce]
    return torch.where(torch.isfinite(out), out * c.mean(), out)


def _head_dims(shape: torch.Size, head_counts: tuple) -> list[int]:
    """The dims of a tensor an attention module returns whose size is a head count (dim 0 is the batch)."""
    return [d for d in range(1, len(shape)) if shape[d] in head_counts]


def _mirror(shape: Any) -> Any:
    """No tags, in the structure of ``shape`` (a nested list stays indexable by later getitems)."""
    return [_mirror(s) for s in shape] if isinstance(shape, list) else None


def _tuple_tags(a: Any, tag: Callable, shapes: dict) -> list:
    """The tags of a tuple operand of ``+``, one per element (a literal tuple of nodes, or a node)."""
    if isinstance(a, fx.Node):
        t = tag(a)
        return t if isinstance(t, list) else [None] * len(shapes.get(a) or [])
    if isinstance(a, (tuple, list)):
        return [_tuple_tags(x, tag, shapes) if isinstance(x, (tuple, list)) else tag(x) for x in a]
    return []


def _kept_indices(keep: Mapping[int, Any]) -> dict[int, Tensor]:
    """Group id -> kept unit indices (long), from indices or bool masks."""
    out = {k: torch.as_tensor(v) for k, v in keep.items()}
    return {k: (torch.nonzero(v) if v.dtype == torch.bool else v.to(torch.long)).reshape(-1) for k, v in out.items()}


def _cuts_like_stock(mod: nn.Module, inp: Tensor) -> bool:
    """Whether ``mod`` (a Linear / conv subclass with its own forward) cut by one output and one input channel
    (``compact.resize_module``) gives, on ``inp`` without that input channel, what the whole layer gives on the kept
    outputs with that channel zeroed, as a stock layer does. A cut it refuses (state it cannot cut) or an input
    without a channel dim to cut is False."""
    from .compact import resize_module

    if acts_as_stock(mod, inp):
        return True
    linear = isinstance(mod, nn.Linear)
    ch = inp.dim() - 1 if linear else 1
    if not linear and inp.dim() != mod.weight.dim():     # (an unbatched conv input: not probed)
        return False
    n_out, n_in = (mod.out_features, mod.in_features) if linear else (mod.out_channels, mod.in_channels)
    groups = getattr(mod, "groups", 1)
    # one channel off each side; a grouped (depthwise) conv loses its first group whole, inputs and outputs
    cut_out, cut_in = (n_out // groups, n_in // groups) if groups > 1 else (1, 1)
    if n_out <= cut_out or n_in <= cut_in:
        return False
    keep_out, keep_in = torch.arange(cut_out, n_out), torch.arange(cut_in, n_in)
    zeroed = inp.clone()
    zeroed.narrow(ch, 0, cut_in).zero_()
    try:
        cut = resize_module(mod, keep_out, keep_in if groups == 1 else None)   # (groups follow the outputs)
        want = run_alone(mod, zeroed)
        got = run_alone(cut, zeroed.index_select(ch, keep_in))
    except Exception:  # noqa: BLE001 - a layer that cannot be cut (or run cut) keeps its channels
        return False
    return isinstance(want, Tensor) and same_output(got, want.index_select(want.dim() - 1 if linear else 1, keep_out))


def _probe_copy(v: Any) -> Any:
    try:
        return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is passed as it is
        return v


def _element_used(n: fx.Node, idx: int, length: int) -> bool:
    """Whether element ``idx`` of the tuple ``n`` returns is read: by an index, a slice, or a use of the tuple."""
    for u in n.users:
        if u.op == "call_function" and _fn_name(u.target) == "getitem":
            k = u.args[1]
            if isinstance(k, int) and k % length != idx:
                continue
            if isinstance(k, slice) and idx not in range(*k.indices(length)):
                continue
            if not u.users:
                continue
        return True
    return False


def _traced_chunks(size: Any, src: Any, dim: int, nd: int) -> int | None:
    """``k`` when a split size is traced as ``src.shape[dim] // k`` or ``src.size(dim) // k`` (it then follows a
    compacted width), else None."""
    if not (isinstance(size, fx.Node) and _fn_name(size.target) == "floordiv" and len(size.args) == 2
            and isinstance(size.args[1], int) and isinstance(size.args[0], fx.Node)):
        return None
    a, d = size.args[0], None
    if _fn_name(a.target) == "size" and a.args and a.args[0] is src:
        d = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
    elif (_fn_name(a.target) == "getitem" and isinstance(a.args[0], fx.Node)
          and _fn_name(a.args[0].target) == "getattr" and tuple(a.args[0].args) == (src, "shape")):
        d = a.args[1]
    return size.args[1] if isinstance(d, int) and d % nd == dim else None


def _flat_args(args: Any) -> list:
    out = []
    for a in args if isinstance(args, (tuple, list)) else (args,):
        if isinstance(a, (tuple, list)):
            out += _flat_args(a)
        elif isinstance(a, dict):
            out += _flat_args(list(a.values()))
        else:
            out.append(a)
    return out


def _flat_states(t: Any) -> list[_Tag | None]:
    """The tags of the tensors in a (nested) list, untagged ones as None."""
    return [x for a in t for x in _flat_states(a)] if isinstance(t, (list, tuple)) else [t]


def _flat_tags(t: Any) -> list[_Tag]:
    if isinstance(t, _Tag):
        return [t]
    if isinstance(t, (list, tuple)):
        return [x for a in t for x in _flat_tags(a)]
    return []


_ = operator  # operator.add etc. are matched by name
