"""``Pruner``: score, select and apply masks to a model's ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``
layers."""

from __future__ import annotations

import difflib
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import calibration as _calibration
from . import chains as _chains
from . import criteria as _criteria
from . import distributed as _dist
from . import masks as _masks
from . import schedules as _schedules
from .graph import QKV_PROJ, _check_round_to, attention_kind, in_proj_parts
from .linear_mha import is_stock_mha
from .recurrent import RECURRENT, hidden_unit_rows, stock_forward, unit_index
from .scores_reconstruction import refit_consumer

__all__ = ["Pruner", "SCOPES", "check_example_inputs", "run_example", "execution_order"]
# producers the Pruner scores through a stand-in Linear of their weights, by criteria reading weights alone
_WEIGHT_VIEWS = (nn.Embedding, *_masks.TRANSPOSED_CONVS, *RECURRENT)


def _gated(mod: nn.Module) -> bool:
    """Whether data-dependent criteria score ``mod``'s output channels through a gate on its outputs (head_taps):
    a transposed conv, or a recurrent module (a gate per hidden unit on every layer's outputs; one with its own
    forward only with a single layer: its inner layers cannot be reached)."""
    return isinstance(mod, _masks.TRANSPOSED_CONVS) or (
        isinstance(mod, RECURRENT) and not getattr(mod, "proj_size", 0) and (mod.num_layers == 1 or stock_forward(mod)))


SCOPES = ("layer", "global")


def _unit_indices(keep: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """Bool unit keep-masks -> kept unit indices (what the graph's keep-sets hold)."""
    return {gid: torch.nonzero(k).reshape(-1) for gid, k in keep.items()}


def _gate_view(mod: nn.Module) -> nn.Module:
    """What a criterion scoring an attention module's heads (a transposed conv's output channels) sees as the
    layer: weight = their gates (ones, ``[heads, 1]``); its statistics are theirs (``calibration.collect(heads=...,
    outputs=...)``)."""
    n = mod.out_channels if isinstance(mod, _masks.TRANSPOSED_CONVS) else \
        mod.hidden_size if isinstance(mod, RECURRENT) else mod.num_heads
    view = nn.Linear(1, n, bias=False, device="meta")
    view.weight = nn.Parameter(torch.ones(n, 1), requires_grad=False)
    return view


def check_example_inputs(example_inputs: Any) -> None:
    """Raise TypeError unless ``example_inputs`` is a Tensor, a tuple/list (positional) or a dict (kwargs)."""
    if not isinstance(example_inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError(f"example_inputs must be a Tensor, a tuple/list of positional args or a dict of "
                        f"keyword args, got {type(example_inputs).__name__}")


def run_example(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on ``example_inputs``: a Tensor, a tuple/list of positional args or a dict of kwargs."""
    check_example_inputs(example_inputs)
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


def execution_order(model: nn.Module, example_inputs: Any, types: tuple[type, ...] = _masks.PRUNABLE) -> list[str]:
    """Names of the modules of ``types`` (default: the prunable Linear / conv layers) in the order their last call
    happens during one forward pass.

    Runs under ``torch.no_grad`` in eval mode (no BN statistics updated, no dropout) and restores every
    module's training flag afterwards.
    """
    check_example_inputs(example_inputs)
    names = {id(mod): name for name, mod in model.named_modules() if isinstance(mod, types)}
    calls: list[str] = []
    hooks = [mod.register_forward_hook(lambda mod, _i, _o: calls.append(names[id(mod)]))
             for mod in model.modules() if id(mod) in names]
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            try:
                run_example(model, example_inputs)
            except Exception as e:
                raise ValueError(f"example_inputs could not be run through the model ({type(e).__name__}: "
                                 f"{e}); pass what model(...) accepts") from e
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    last = {name: i for i, name in enumerate(calls)}
    return sorted(last, key=last.__getitem__)


def _layer_types(granularity: str, criterion: Any, reconstruct: bool) -> tuple[type, ...]:
    """The module types a Pruner masks itself. Transposed convs join Linear / conv layers for element, block and
    n:m pruning by criteria that read the weight (and its gradients) alone: their masks are weight-shaped (blocks
    in the weight's own 2-D view ``[C_in, C_out * taps]``; n:m groups along C_in, dim 0, the reduction dim of
    the GEMM their sparse twin runs); activation / BN / next-layer statistics are traced for Linear / conv
    layers only. (Channel pruning reaches them through the dependency graph.)"""
    if granularity in ("element", "block", "nm") and not reconstruct and set(criterion.needs) <= {"seed", "grads",
                                                                                                 "hessian"}:
        return (*_masks.PRUNABLE, *_masks.TRANSPOSED_CONVS)
    return _masks.PRUNABLE


def _warn_unpruned_transposed(modules: Mapping[str, nn.Module], ignored: set[str], criterion: Any) -> None:
    names = [n for n, m in modules.items() if isinstance(m, _masks.TRANSPOSED_CONVS) and n not in ignored]
    if names:
        why = f"criterion {criterion.name!r} reads statistics traced for Linear / conv layers only"
        warnings.warn(f"the transposed convs {names[:3]}{'...' if len(names) > 3 else ''} are not pruned: {why}; "
                      "element / block / n:m pruning by a weight or gradient criterion (magnitude, l1, taylor ...) "
                      "reaches them", UserWarning, stacklevel=3)


def _warn_unpruned_in_projections(modules: Mapping[str, nn.Module], ignored: set[str]) -> None:
    """``nn.MultiheadAttention`` keeps its q / k / v projections in one raw parameter, which element, block and
    N:M pruning (made for Linear / Conv layers) do not reach; say so, with the remedy."""
    names = [n for n, m in modules.items() if n and is_stock_mha(m) and f"{n}.out_proj" not in ignored]
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        warnings.warn(f"the q / k / v in-projections of {len(names)} nn.MultiheadAttention module(s) ({names[:3]}"
                      f"{more}) are not pruned at this granularity (only their out_proj is): they are one raw "
                      "parameter, not Linear layers. Convert the model first, model = sparsekit.nn.mha_to_linear("
                      "model), to prune them as Linear layers (same outputs; sk.sparsify and sk.save handle it)",
                      UserWarning, stacklevel=3)


def _warn_unpruned_recurrent(modules: Mapping[str, nn.Module], ignored: set[str]) -> None:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` hand their flat weights to a fused kernel; element, block and N:M
    pruning do not reach them. Say so, with the remedy."""
    names = [n for n, m in modules.items() if n and isinstance(m, RECURRENT) and n not in ignored]
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        warnings.warn(f"the weights of {len(names)} recurrent module(s) ({names[:3]}{more}) are not pruned at this "
                      "granularity: nn.RNN / LSTM / GRU keep them as flat parameters, not Linear layers. Convert the "
                      "model first, model = sparsekit.nn.rnn_to_linear(model), to prune them as Linear layers (same "
                      "outputs; sk.sparsify and sk.save handle it)", UserWarning, stacklevel=3)


class Pruner:
    """Prune a model's ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` layers with masks (reversible
    parametrizations); element, block and n:m pruning by criteria reading weights (or their gradients) alone also
    prune ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` (blocks over their weight viewed as ``[C_in, C_out * taps]``,
    n:m groups along C_in).

    Args:
        model: the ``nn.Module`` to prune (modified in place by ``step``); a ``DistributedDataParallel``
            model is unwrapped (its ``.module`` is pruned) and pruned in ``"replicated"`` mode.
        example_inputs: what ``model(...)`` accepts: a Tensor, a tuple/list of positional args, or a dict of
            keyword args. Run once (eval mode, no grad) to find the layers' execution order and, for
            criteria that need it, how each layer's channels flow to the next layer (``chains``).
        criterion: a name from ``criteria.available()`` or a ``Criterion``.
        granularity: ``"element"`` | ``"block"`` (``block=(bn, bk)`` tiles of the 2-D weight
            ``[out, in*kh*kw]``) | ``"nm"`` (keep ``n`` of every ``m`` along the input dim; ``sparsity`` must
            equal ``1 - n/m``) | ``"channel"`` (whole output channels, bias entry included; ``sparsity`` is
            the fraction of channels removed).
        scope: ``"layer"``: every layer (channels: every group) loses exactly ``floor(sparsity * units)``
            units. ``"global"``: one threshold over all layers' units (element, block or channel; channel
            groups' units). For channels use a criterion whose scores compare across layers, e.g.
            ``"l1_mean"`` (Salama et al. 2019: the filter L1 norm over its number of weights); every channel
            group keeps at least ``min_channels`` units.
        sparsity: final target in [0, 1).
        ignore: modules or module names (a container covers every layer inside it) left unpruned. For
            ``granularity="channel"`` with ``ignore=None`` the model's final layer (the last prunable module
            to run on ``example_inputs``, normally the classifier) is left out; pass ``ignore=[]`` to
            score it too. Under group selection (below) a channel group with an ignored producer stays
            whole, and the model's outputs are never removed (the dependency graph pins them).
        calib: calibration data for data-dependent criteria: an iterable of batches, or of
            ``(input, target)`` pairs for gradient-based ones (``taylor``, ``hessian``). Read again at every
            ``step()``; a one-shot iterator is turned into a list first.
        schedule: ``None`` / ``"oneshot"``, a ``schedules.Schedule`` (``Iterative(steps=k)``,
            ``AGP(steps=n, initial=0.0)``) or a callable ``schedule(step_index) -> target sparsity`` with
            ``step_index`` counting ``step()`` calls from 0.
        block, n, m: pattern parameters for ``"block"`` and ``"nm"``.
        loss_fn: ``loss_fn(output, target)`` for gradient-based criteria; it gets ``target=None`` for plain
            batches (a self-supervised loss). Default: cross-entropy against the pair's target, and for a batch
            without one the ``.loss`` the model returns (a Hugging Face model given ``labels`` in its inputs).
        seed: seed for randomised criteria (``random``, the Hutchinson probes, row sampling).
        reconstruct: refit the next layer by least squares after masking (default: what the criterion
            asks for; ``lasso`` and ``thinet`` do).
        min_channels: units (channels; heads of head groups) every channel group keeps under global channel
            pruning (default 1; 0 is the pure threshold, which may empty a group: then compact() refuses).
        max_sparsity: under ``scope="global"``, the most of one layer's units (channels: of one channel group's)
            the threshold removes, in (0, 1] (default 1.0: no cap). One threshold over layers whose scores
            differ in scale can strip some almost bare (plain ``l1`` over a torchvision RegNet left its stem one
            filter of 32); ``max_sparsity=0.8`` keeps every layer at 20% or more, as Torch-Pruning's
            ``max_pruning_ratio`` does. The total then falls short of ``sparsity`` if the cap binds (warned).
        distributed: ``None`` (single process; ``"replicated"`` for a DDP model), ``"replicated"`` or
            ``"sharded"`` (see ``sparsekit.prune.distributed``).

    ``step()`` computes masks for the current target and applies them at once. Units removed by an earlier
    step are scored lowest, so they stay removed while the target does not decrease. Results depend only
    on the model's weights, ``calib`` and ``seed`` (ties go to the lower index).

    Channels are selected per dependency group (``sparsekit.prune.graph``): the channels that residual adds,
    concatenation, norms, depthwise convs and attention heads couple are one group, removed from all its
    members together, so the masked model is exactly the model ``compact()`` builds. A group's unit scores
    aggregate the criterion's channel scores over its *producers* (the pruned Linear / conv layers whose
    output rows it holds, ``nn.MultiheadAttention`` in-projections, and -- for criteria reading weights alone --
    ``nn.Embedding`` layers, whose features are the columns of their weight, scored as the rows of
    ``weight.T`` like a Linear's neurons, ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` layers, whose output
    channels are dim 1 of their weight, and ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` layers, whose hidden units
    are scored as rows holding each unit's gate rows of every layer and direction; ``ignore`` such a module to
    keep its channels): for producer ``m`` let ``s_m[u]`` be the mean score of unit ``u``'s rows (a head's ``head_dim``
    rows of q, k and v are three producers) and ``c_m`` the mean ``|s_m|``; the group scores
    ``mean_m(s_m / c_m) * mean_m(c_m)``. Dividing by ``c_m``
    keeps a layer with large weights from outvoting the others; multiplying by the mean ``c_m`` keeps the
    criterion's scale, so ``scope="global"`` compares groups as the criterion compares layers (``l1_mean``
    stays comparable) and a one-producer group keeps its layer's scores exactly (the selection of plain
    chains is unchanged). ``scope="layer"`` removes ``floor(sparsity * units)`` units of every group;
    ``"global"`` ranks all groups' units (channels; heads of head groups) with one threshold, every group
    keeping ``min_channels`` units. Groups the graph pins (model outputs such as the classifier, LayerNorm
    streams, an attention's ``embed_dim``) and groups with an ignored producer stay whole. The heads of an
    ``nn.MultiheadAttention`` (also inside ``nn.Transformer*`` layers; and of a ``LinearMultiheadAttention``,
    whose q / k / v Linears are layers) are scored from its in-projection weights (each q / k / v weight scored
    as a Linear) by criteria reading weights alone, and from
    calibration data by data-dependent ones (activation, rank, ``taylor``, ``hessian``): the criterion then
    sees each head as one channel of a layer whose weight is a per-head gate (ones) on the heads' output
    before ``out_proj``, with the head's output ``[tokens, head_dim]`` as its feature map and the gate's
    gradient (``sum(out_h * d loss / d out_h)``) as its gradient (``head_taps``); a criterion needing
    anything else (``bn``, ``consumer``) leaves heads whole. A transposed conv's output channels, and a
    recurrent module's hidden units, are scored the same way by data-dependent criteria (a gate per channel /
    unit on the module's outputs, which are its feature map; a recurrent module runs one layer at a time while
    scored, each layer's outputs gated).
    Per-layer selection remains where aggregation does not apply: reconstruction criteria (``reconstruct=True``,
    ``lasso``, ``thinet``) refit each layer's consumer for that layer's own selection along a plain chain, and
    ``distributed="sharded"`` ranks see only their own layers; there a coupled unit goes only when every
    producer removed it.

    Several pruners may mask one model (e.g. one per layer to apply searched widths): each ANDs its masks with
    the ones already on a tensor, so a second pruner never unmasks what a first one removed (such as the
    consumer columns of its channels), and ``remove()`` takes back only its own.
    """

    def __init__(self, model: nn.Module, example_inputs: Any,
                 criterion: str | _criteria.Criterion = "magnitude", granularity: str = "element",
                 scope: str = "layer", sparsity: float = 0.5,
                 ignore: Iterable[nn.Module | str] | nn.Module | str | None = None, calib: Any = None,
                 schedule: str | _schedules.Schedule | Callable[[int], float] | None = None,
                 block: int | tuple[int, int] = (32, 32), n: int = 2, m: int = 4, *,
                 loss_fn: Callable[[Any, Any], Tensor] | None = None, seed: int = 0,
                 reconstruct: bool | None = None, min_channels: int = 1, max_sparsity: float = 1.0,
                 distributed: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model, wrapped = _dist.unwrap(model)
        check_example_inputs(example_inputs)
        self.model = model
        self.example_inputs = example_inputs
        self.criterion = _criteria.get(criterion)
        self.granularity = _masks.check_granularity(granularity)
        if not isinstance(scope, str):
            raise TypeError(f"scope must be a str, one of {SCOPES}, got {type(scope).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.sparsity = _masks.check_sparsity(sparsity)
        self.block = _masks.check_block(block)
        self.n, self.m = _masks.check_nm(n, m)
        self.schedule = _schedules.resolve(schedule)
        if isinstance(self.schedule, _schedules.AGP) and self.schedule.initial > self.sparsity:
            raise ValueError(f"schedule AGP(initial={self.schedule.initial}) starts above sparsity={self.sparsity}: "
                             "the cubic schedule goes from initial up to the final sparsity; pass "
                             "initial <= sparsity")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        if not isinstance(min_channels, int) or isinstance(min_channels, bool) or min_channels < 0:
            raise ValueError(f"min_channels must be an int >= 0, got {min_channels!r}")
        self.min_channels = min_channels
        self.max_sparsity = _masks.check_max_sparsity(max_sparsity)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (output, target) -> loss, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.reconstruct = self.criterion.reconstructs if reconstruct is None else bool(reconstruct)
        self.distributed = _dist.check_mode(distributed, wrapped)
        self._check_combination()
        if self.reconstruct and calib is None:
            raise ValueError("reconstruct=True refits the next layer on calibration data: pass calib=<batches>")
        if self.criterion.data_dependent or self.reconstruct:
            if calib is None:
                raise ValueError(f"criterion {self.criterion.name!r} is data-dependent: pass calib=<batches> "
                                 "(an iterable of batches, or of (input, target) pairs for gradient-based "
                                 "criteria)")
            if not isinstance(calib, Iterable) or isinstance(calib, (Tensor, str)):
                raise TypeError(f"calib must be an iterable of batches (a list, a DataLoader), got "
                                f"{type(calib).__name__}")
            if iter(calib) is calib:   # a one-shot iterator: keep its batches for later steps
                calib = list(calib)
        self.calib = calib

        types = _layer_types(self.granularity, self.criterion, self.reconstruct)
        modules = dict(model.named_modules())
        ran = execution_order(model, example_inputs, (*_masks.PRUNABLE, *_masks.TRANSPOSED_CONVS))
        executed = [k for k in ran if isinstance(modules[k], types)]
        unexecuted = [k for k, v in modules.items() if isinstance(v, types) and k not in executed]
        order = executed + unexecuted
        if ignore is None and self.granularity == "channel" and ran:
            ignore = [ran[-1]]  # the classifier / output layer (a transposed conv too): its outputs are the model's
        self.ignored = self._resolve_ignore(ignore, modules)
        self.layers: dict[str, nn.Module] = {k: modules[k] for k in order if k not in self.ignored}
        # channel pruning also scores embeddings, transposed convs and recurrent layers through their weights
        views = [k for k, v in modules.items() if isinstance(v, _WEIGHT_VIEWS) and k not in self.ignored]
        # (a "sharded" rank may hold none of the layers: it takes part in the collectives with no scores)
        if not self.layers and not (self.granularity == "channel" and views) and self.distributed != "sharded":
            recurrent = [k for k, v in modules.items() if isinstance(v, RECURRENT) and k not in self.ignored]
            raise ValueError("no nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d left to prune in model (after ignore="
                             f"{sorted(self.ignored)})" + (f"; granularity='channel' would prune the channels of "
                                                           f"{views}" if views else "")
                             + (f"; sparsekit.nn.rnn_to_linear(model) gives {recurrent} Linear layers to prune"
                                if recurrent else ""))
        gated = [k for k in views if _gated(modules[k])]   # scored through gates by data-dependent criteria
        if not self.layers and not self._scores_weight_views() and not (self._scores_head_taps() and gated) \
                and self.distributed != "sharded":
            weight_only = [n for n in _criteria.available() if not _criteria.get(n).data_dependent
                           and set(_criteria.get(n).needs) <= {"seed"}]
            raise ValueError(f"criterion {self.criterion.name!r} scores Linear / conv layers (from data, gradients, "
                             f"a BatchNorm or a next layer); none is left to prune in model (after ignore="
                             f"{sorted(self.ignored)}), and {views} are scored by criteria reading weights alone "
                             f"({', '.join(weight_only)})" + (", or, for transposed convs, by activation / rank / "
                                                              "taylor / hessian criteria" if gated else ""))
        for name, mod in self.layers.items():
            shape = tuple(mod.weight.shape)
            if self.granularity == "nm" and isinstance(mod, _masks.TRANSPOSED_CONVS):   # groups along C_in
                shape = (math.prod(shape[1:]), shape[0])
            _masks.check_layer(shape, self.granularity, block=self.block, n=self.n, m=self.m, name=name)
        if self.granularity != "channel":
            self._check_element_scores()
            _warn_unpruned_in_projections(modules, self.ignored)
            _warn_unpruned_recurrent(modules, self.ignored)
            if types == _masks.PRUNABLE:
                _warn_unpruned_transposed(modules, self.ignored, self.criterion)
        self._events: list[_chains.Event] | None = None
        self.links: dict[str, _chains.Link] = {}
        if set(self.criterion.needs) - {"seed", "grads", "hessian"} or self.reconstruct:
            self._trace_links()
        self._masks: dict[str, Tensor] = {}
        self._keep: dict[int, Tensor] = {}      # group id -> unit keep-mask of the last grouped step
        self._coupled: set[str] = set()          # masked modules other than self.layers (norms, attention ...)
        self._groups: dict[int, list] | None = None
        self._applied: set[tuple[str, str]] = set()   # (module, tensor) this pruner masked
        # what remove() puts back besides the masked values: a norm's running statistics of the channels this
        # pruner masked (mean, var as they were when masked, and this pruner's last keep-mask), and what the
        # least-squares refits (lasso, thinet) added to each consumer's weight
        self._norm_stats: dict[str, list[Tensor]] = {}
        self._refit_undo: dict[nn.Module, Tensor] = {}
        self._owner = f"Pruner-{uuid.uuid4().hex}"      # its name among a tensor's mask owners
        self._target = 0.0
        self._steps = 0

    def _trace_links(self) -> None:
        self._events = _chains.trace_events(self.model, self.example_inputs)
        self.links = _chains.trace_links(self.model, self.example_inputs, self.layers, events=self._events)
        needs = set(self.criterion.needs)
        if "consumer" in needs or self.reconstruct:
            bad = {k: v.reason for k, v in self.links.items() if v.consumer is None}
            if bad:
                lines = "; ".join(f"{k}: {r}" for k, r in bad.items())
                raise ValueError(f"criterion {self.criterion.name!r} reconstructs the layer that consumes each "
                                 f"pruned layer's channels, which is found only along plain sequential chains; "
                                 f"{lines}. Leave these layers out with ignore={sorted(bad)} or use a "
                                 "criterion that needs no next layer")
        if "bn" in needs:
            missing = [k for k in self.layers if self._bn_of(k) is None]
            if missing:
                raise ValueError(f"criterion {self.criterion.name!r} needs a BatchNorm right after each pruned "
                                 f"layer; {missing} have none. Leave them out with ignore={missing}")

    def _bn_of(self, name: str) -> nn.Module | None:
        link = self.links.get(name)
        if link is None or self._events is None:
            return None
        for idx in link.path:
            if idx > link.feature:
                break
            mod = self._events[idx].module
            if isinstance(mod, _masks.BATCH_NORMS):
                return mod
        return None

    # ------------------------------------------------------------------------------------ validation
    def _check_element_scores(self, scores: Tensor | None = None) -> None:
        """Element / block / n:m masks need a score per weight: a criterion that gives one per output channel is
        refused naming it, at construction where it reads weights only (one layer is scored), else at the
        first step()."""
        if scores is None and not self.criterion.needs and self.layers:
            scores = self.criterion.score(next(iter(self.layers.values())))
        if scores is not None and scores.dim() == 1:
            raise ValueError(f"criterion {self.criterion.name!r} gives one score per output channel; use "
                             f"granularity='channel', got {self.granularity!r}")

    def _check_combination(self) -> None:
        g, s = self.granularity, self.scope
        if g == "nm":
            implied = 1.0 - self.n / self.m
            if abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"granularity='nm' with n={self.n}, m={self.m} has sparsity {implied:g}; "
                                 f"got sparsity={self.sparsity!r}. Pass sparsity={implied:g} or change n/m")
            if not isinstance(self.schedule, _schedules.OneShot):
                raise ValueError("granularity='nm' fixes the pattern in one step; use schedule=None")
        if s == "global" and g == "nm":
            raise ValueError("scope='global' with granularity='nm' is not supported: n:m keeps n of every m "
                             "in each group, so one global threshold has no meaning")
        if s == "global" and not self.criterion.comparable:
            raise ValueError(f"scope='global' with criterion {self.criterion.name!r} is not supported: its scores "
                             "do not compare across layers (ranks or distances within a layer); use scope='layer'")
        if (self.criterion.reconstructs or self.reconstruct) and g != "channel":
            raise ValueError(f"criterion {self.criterion.name!r} (reconstruct=True) selects whole channels; "
                             f"use granularity='channel', got {g!r}")

    def _resolve_ignore(self, ignore: Any, modules: dict[str, nn.Module]) -> set[str]:
        if ignore is None:
            return set()
        if isinstance(ignore, (nn.Module, str)):
            ignore = [ignore]
        if not isinstance(ignore, Iterable):
            raise TypeError(f"ignore must be None or a list of modules / module names, "
                            f"got {type(ignore).__name__}")
        by_id = {id(mod): name for name, mod in modules.items()}
        out: set[str] = set()
        for i, item in enumerate(ignore):
            if isinstance(item, str):
                if item not in modules:
                    close = difflib.get_close_matches(item, [k for k in modules if k], n=3)
                    raise ValueError(f"ignore[{i}] = {item!r} is not a module name in model"
                                     + (f"; did you mean {close}?" if close else ""))
                prefix = item
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"ignore[{i}] ({type(item).__name__}) is not a submodule of model")
                prefix = by_id[id(item)]
            else:
                raise TypeError(f"ignore[{i}] must be an nn.Module or a module name, "
                                f"got {type(item).__name__}")
            found = {k for k, v in modules.items() if isinstance(v, (*_masks.PRUNABLE, *_WEIGHT_VIEWS))
                     and (prefix == "" or k == prefix or k.startswith(prefix + "."))}
            if not found:     # (a norm's channels follow the layer that produces them)
                warnings.warn(f"ignore[{i}] = {prefix!r} ({type(modules[prefix]).__name__}) holds no prunable layer, "
                              "so it changes nothing; to keep channels, ignore the layer that produces them",
                              UserWarning, stacklevel=3)
            out |= found
        return out

    # ------------------------------------------------------------------------------------------ steps
    def current_target(self) -> float:
        """The target sparsity the next ``step()`` prunes to."""
        if self.granularity == "nm":
            return 1.0 - self.n / self.m
        name = f"schedule({self._steps})"
        if isinstance(self.schedule, _schedules.Schedule):
            return _masks.check_sparsity(self.schedule.target(self._steps, self.sparsity), name=name)
        return _masks.check_sparsity(self.schedule(self._steps), name=name)

    @property
    def steps_taken(self) -> int:
        """How many times ``step()`` has run."""
        return self._steps

    @property
    def done(self) -> bool:
        """True once a ``Schedule`` has reached the final sparsity (always False for a plain callable)."""
        if isinstance(self.schedule, _schedules.Schedule):
            return self.schedule.done(self._steps)
        return False

    def contexts(self) -> dict[str, _calibration.LayerContext]:
        """Per layer the ``LayerContext`` the criterion sees; collects calibration statistics if needed. Under
        group selection with a data-dependent criterion, also one per attention module whose heads it scores
        (its per-head statistics, see ``calibration.collect``)."""
        needs = set(self.criterion.needs)
        heads, outputs = self._tapped_heads(), self._tapped_outputs()
        stats: dict[str, dict[str, Tensor]] = {k: {} for k in self.layers}
        if self.criterion.data_dependent or self.reconstruct:
            if self.reconstruct:
                needs.add("consumer")
            stats = _calibration.collect(self.model, self.layers, self.links, self.calib, needs,
                                         granularity=self.granularity, loss_fn=self.loss_fn, seed=self.seed,
                                         events=self._events, heads=heads, outputs=outputs)
            if self.distributed == "replicated":
                _dist.reduce_stats(stats)
        modules = dict(self.model.named_modules())
        out = {}
        for name in self.layers:
            link = self.links.get(name)
            consumer = modules.get(link.consumer) if link is not None and link.consumer else None
            out[name] = _calibration.LayerContext(
                name=name, granularity=self.granularity, seed=self.seed, link=link, bn=self._bn_of(name),
                consumer=consumer, group=link.group if link is not None else 1, stats=stats[name])
        for name in heads + outputs:
            out[name] = _calibration.LayerContext(name=name, granularity=self.granularity, seed=self.seed,
                                                  stats=stats[name])
        return out

    def scores(self) -> dict[str, Tensor]:
        """Layer name -> the criterion's scores now (units removed by earlier steps at -inf); applies nothing.
        Attention modules whose heads a data-dependent criterion scores (group selection) get one score per
        head under their own name.

        With ``select`` this previews masks for any sparsity, e.g. to search the sparsity that meets a
        parameter budget without collecting calibration statistics again for every candidate.
        """
        return self._scores(self.contexts())

    def select(self, scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
        """Keep-masks (layer name -> bool, weight-shaped) that ``scores`` give at ``sparsity``; applies nothing."""
        return self._select(dict(scores), _masks.check_sparsity(sparsity))

    def _scores(self, ctxs: Mapping[str, _calibration.LayerContext]) -> dict[str, Tensor]:
        out = {name: self.criterion.score(_gate_view(self.model.get_submodule(name)), ctxs[name])
               for name in self._tapped_heads() + self._tapped_outputs()}    # one score per head / channel
        for name, mod in self.layers.items():
            s = self.criterion.score(mod, ctxs[name])
            if self.granularity in ("channel", "block") and s.dtype in (torch.float16, torch.bfloat16):
                # half-precision scores summed per channel / block in their own dtype collapse into ties, which
                # the lower index then breaks ("remove the first channels"); element scores stay as they are
                s = s.float()
            prev = self._masks.get(name)
            if prev is not None:  # units removed before score lowest: they stay removed
                low = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
                keep = prev.to(s.device) if s.dim() > 1 else _masks.as_2d(prev).any(dim=1).to(s.device)
                s = torch.where(keep, s, low)
            out[name] = s
        return out

    def _select(self, scores: dict[str, Tensor], target: float) -> dict[str, Tensor]:
        if self._grouped:
            return self._row_masks(self._group_keep(scores, target))
        shapes = {k: tuple(self.layers[k].weight.shape) for k in scores}
        if self.scope == "layer":
            return {k: _masks.transposed_nm_keep(s, self.n, self.m)
                    if self.granularity == "nm" and isinstance(self.layers[k], _masks.TRANSPOSED_CONVS) else
                    _masks.layer_mask(s, target, self.granularity, shape=shapes[k], block=self.block, n=self.n,
                                      m=self.m) for k, s in scores.items()}
        min_keep = self.min_channels if self.granularity == "channel" else 0
        if self.distributed == "sharded":
            merged, merged_shapes, mine = _dist.gather_scores(scores, shapes)
            keep = _masks.global_keep(merged, target, self.granularity, shapes=merged_shapes, block=self.block,
                                      min_keep=min_keep, max_sparsity=self.max_sparsity)
            return {k: keep[mine + k] for k in scores}
        return _masks.global_keep(scores, target, self.granularity, shapes=shapes, block=self.block,
                                  min_keep=min_keep, max_sparsity=self.max_sparsity)

    def step(self) -> float:
        """Compute masks for the current target and apply them; returns that target."""
        target = self.current_target()
        ctxs = self.contexts()
        scores = self._scores(ctxs)
        if self._grouped:
            if not self._selectable_groups():
                warnings.warn("no channel group can be pruned: every group is pinned (model outputs, LayerNorm "
                              "streams ...), ignored, or has no producer this criterion scores; nothing is masked "
                              "(graph.describe() says why per group)", UserWarning, stacklevel=2)
            keep = self._group_keep(scores, target)
            if self.distributed == "replicated":   # on the weights' device, as the backend may need
                dev = next(iter(self.layers.values())).weight.device
                sent = _dist.broadcast_masks({str(k): v.to(dev) for k, v in keep.items()})
                keep = {int(k): v.cpu() for k, v in sent.items()}
            self._masks = self._apply_group_keep(keep)
            self._keep, self._target = keep, target
            self._steps += 1
            return target
        if self.granularity != "channel":
            for s in scores.values():
                self._check_element_scores(s)
        masks = self._select(scores, target)
        if self.distributed == "replicated":
            masks = _dist.broadcast_masks(masks)
        emptied = [k for k, m in masks.items() if m.numel() and not bool(m.any())]
        if emptied and self.scope == "global" and target < 1.0:
            # one threshold over layers of very different score scales can take every unit of a layer: it then
            # outputs only its bias (a classifier whose weights are small, for instance)
            warnings.warn(f"global {self.granularity} pruning at {target:.0%} removed every weight of "
                          f"{emptied[:5]}{' ...' if len(emptied) > 5 else ''}: their scores all lie below the global "
                          "threshold; ignore= them, use scope='layer', or a criterion whose scores compare across "
                          "layers (l1_mean)", UserWarning, stacklevel=2)
        for name, mask in masks.items():
            self._apply_tensor(name, "weight", mask)
            if self.granularity == "channel" and self.layers[name].bias is not None:
                self._apply_tensor(name, "bias", _masks.as_2d(mask).any(dim=1))
        if self.reconstruct:
            for name, mask in masks.items():
                consumer = ctxs[name].consumer
                if consumer is not None:
                    param = _calibration.weight_param(consumer)
                    before = param.detach().clone()
                    refit_consumer(_masks.as_2d(mask).any(dim=1), ctxs[name])
                    self._refit_undo[consumer] = self._refit_undo.get(consumer, 0) + (before - param.detach())
        if self.granularity == "channel":
            self._mask_coupled_members()   # ``masks`` stays the selection; the model also masks coupled members
        self._masks = masks
        self._target = target
        self._steps += 1
        return target

    # ---------------------------------------------------------------------------------------- results
    @property
    def masks(self) -> dict[str, Tensor]:
        """Layer name -> bool keep-mask of its weight's shape (True = kept), from the last ``step()``. For
        channels: the output rows each layer keeps (the model also masks what they couple: consumers' input
        columns, norms, attention in-projections)."""
        return dict(self._masks)

    def sparsity_report(self) -> list[dict[str, Any]]:
        """Per layer (execution order): name, type, shape, granularity, target, actual sparsity (fraction of
        weights masked), units and units removed (elements, blocks, n:m groups' zeros, or channels)."""
        rows = []
        for name, mod in self.layers.items():
            mask = self._masks.get(name)
            shape = tuple(mod.weight.shape)
            numel = mod.weight.numel()
            masked = 0 if mask is None else int((~mask).sum())
            if self.granularity == "channel":
                units = shape[0]
                removed = 0 if mask is None else int((~_masks.as_2d(mask).any(dim=1)).sum())
            elif self.granularity == "block":
                units = numel // (self.block[0] * self.block[1])
                removed = masked // (self.block[0] * self.block[1])
            else:
                units, removed = numel, masked
            cls = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
            rows.append({"name": name, "type": cls.__name__, "shape": shape,
                         "granularity": self.granularity, "target": self._target if mask is not None else 0.0,
                         "sparsity": masked / numel if numel else 0.0, "units": units, "removed": removed})
        return rows

    def remove(self) -> None:
        """Un-prune: drop this pruner's masks from every pruned layer (and the coupled norms / consumers a
        channel step masked) and restore the original weights: masked entries get back the values they had
        when they were masked (not what an optimizer's momentum or weight decay made of the stored originals
        since; see ``masks.WeightMask``), kept entries keep their trained values; the masked channels of a
        BatchNorm get back their running statistics, and a reconstruction step's refit of the next layer
        (lasso, thinet) is undone (what training changed since stays). Masks another ``Pruner``
        (or the user) put on the same tensors stay. The pruner starts over: ``masks`` is empty and a schedule
        restarts at step 0."""
        for name, t in self._applied:   # (a tensor baked or unmasked by someone else is left as it is)
            _masks.release_owned_mask(self.model.get_submodule(name), t, self._owner)
        with torch.no_grad():
            # a masked channel's running statistics decayed towards 0 in training (its input was 0): restored,
            # it would be divided by ~sqrt(eps)
            for name, (mean, var, kept) in self._norm_stats.items():
                mod = self.model.get_submodule(name)
                mod.running_mean[~kept] = mean[~kept]
                mod.running_var[~kept] = var[~kept]
            # the refits changed the consumers' kept columns to make up for the removed channels (and zeroed
            # those): undone, keeping whatever training changed since
            for consumer, delta in self._refit_undo.items():
                _calibration.weight_param(consumer).add_(delta)
        self._masks, self._keep, self._coupled, self._target, self._steps = {}, {}, set(), 0.0, 0
        self._applied, self._norm_stats, self._refit_undo = set(), {}, {}

    def bake(self) -> None:
        """Make the masks permanent: pruned layers get plain Parameters holding the zeros (training moves them
        after this, an optimizer's momentum at once: bake when fine-tuning is done)."""
        for mod in self._touched_modules():
            _masks.bake_masks(mod)
        self._norm_stats, self._refit_undo = {}, {}   # (nothing left for remove() to restore)

    # ------------------------------------------------------------------------------ structured removal
    def _apply_tensor(self, name: str, tensor: str, mask: Tensor) -> None:
        """Mask ``name.tensor`` with this pruner's selection ``mask``, ANDed with the masks others put there
        (another Pruner on the same model, e.g. per-layer widths; the user): a second Pruner must not unmask
        the consumer columns of a first one's removed channels, and either may be removed first. Entries this
        pruner masked before are decided by ``mask`` alone, so a lower target can bring them back."""
        module = self.model.get_submodule(name)
        if tensor == "weight" and isinstance(getattr(module, "running_var", None), Tensor):
            self._remember_norm_stats(name, module, mask)
        _masks.set_owned_mask(module, tensor, self._owner, mask)
        self._applied.add((name, tensor))

    def _remember_norm_stats(self, name: str, norm: nn.Module, keep: Tensor) -> None:
        """Keep the running statistics of the channels ``keep`` masks now and did not before, for remove()."""
        mean, var = norm.running_mean.detach(), norm.running_var.detach()
        keep = keep.to(device=mean.device, dtype=torch.bool).reshape(mean.shape)
        saved = self._norm_stats.setdefault(name, [mean.clone(), var.clone(), torch.ones_like(keep)])
        newly = saved[2] & ~keep
        saved[0][newly], saved[1][newly] = mean[newly], var[newly]
        saved[2] = keep.clone()

    def _touched_modules(self) -> list[nn.Module]:
        extra = [self.model.get_submodule(n) for n in self._coupled]
        return list(self.layers.values()) + [m for m in extra if m not in self.layers.values()]

    def _dependency_graph(self):
        from .graph import DependencyGraph

        if getattr(self, "_graph", None) is None:
            self._graph = DependencyGraph.build(self.model, self.example_inputs)
        return self._graph

    def _mask_coupled_members(self) -> None:
        """Per-layer path: make the masked model the one ``compact()`` builds: a channel unit goes when every
        producer of its dependency group (residual adds, concat, heads ...) removed it; then every member of a
        removed unit is masked — producer rows and bias, BN/GN scale and shift, consumer columns. Coupled units
        that not all producers removed are kept (and restored in the producers that had removed them)."""
        from .compact import keep_from_masks, member_tensor_masks

        graph = self._dependency_graph()
        keep = keep_from_masks(self.model, graph, allow_empty=True)
        coupled = set()
        for name, tensors in member_tensor_masks(graph, keep, allow_empty=True).items():
            for t, mask in tensors.items():
                self._apply_tensor(name, t, mask)
            coupled.add(name)
        self._coupled = coupled

    # ---------------------------------------------------------------------------- group selection
    @property
    def _grouped(self) -> bool:
        """Whether channels are selected per dependency group (see the class docstring) or per layer."""
        return (self.granularity == "channel" and not self.reconstruct and "consumer" not in self.criterion.needs
                and self.distributed != "sharded")

    def _scores_weight_views(self) -> bool:
        # an attention in-projection is scored as a stand-alone Linear: only criteria reading weights alone
        return not self.criterion.data_dependent and set(self.criterion.needs) <= {"seed"}

    def _scores_head_taps(self) -> bool:
        # data-dependent criteria score heads from their per-head outputs / gates (``head_taps``)
        return (self._grouped and self.criterion.data_dependent
                and set(self.criterion.needs) <= {"seed", "activations", "rank", "grads", "hessian"})

    def _tapped_heads(self) -> list[str]:
        """Attention modules whose heads the criterion scores from calibration data (see ``head_taps``)."""
        if not self._scores_head_taps():
            return []
        return sorted({a for ms in self._selectable_groups().values() for m in ms
                       if (a := self._attention_of(m.module)) is not None})

    def _tapped_outputs(self) -> list[str]:
        """Transposed convs whose output channels the criterion scores from calibration data (``head_taps``)."""
        if not self._scores_head_taps():
            return []
        return sorted({m.module for ms in self._selectable_groups().values() for m in ms
                       if _gated(self.model.get_submodule(m.module))})

    def _attention_of(self, member: str) -> str | None:
        """The attention module whose heads a producer member holds: the module itself (``"mha"``: its packed
        in-projection) or the parent of a ``LinearMultiheadAttention``'s q / k / v Linear; None otherwise."""
        if attention_kind(self.model.get_submodule(member)) == "mha":
            return member
        parent, _, leaf = member.rpartition(".")
        if leaf in QKV_PROJ and attention_kind(self.model.get_submodule(parent)) == "mha_linear":
            return parent
        return None

    def _selectable_groups(self) -> dict[int, list]:
        """Group id -> its scored producer members, for the groups this pruner selects (in execution order of
        their first producer, which breaks ties under a global threshold)."""
        if self._groups is not None:
            return self._groups
        graph = self._dependency_graph()
        # an attention module's in-projection produces its heads when its out_proj is a pruned layer (ignoring
        # the module or its out_proj ignores the heads) and the criterion can score it from the weights alone
        # or from the heads' outputs; a LinearMultiheadAttention's q / k / v Linears are layers of their own
        outs = {m.module for g in graph.prunable for m in g.members if m.axis == "out"}
        attn = {name for name in outs if self._attention_of(name) == name}
        linear_qkv = {name: a for name in outs if (a := self._attention_of(name)) not in (None, name)}
        producers = set(self.layers)
        if self._scores_weight_views() or self._scores_head_taps():
            producers |= {a for a in attn if f"{a}.out_proj" in self.layers}
        # an embedding's features, a transposed conv's outputs, recurrent hidden units: scored as rows by criteria
        # reading weights alone; a transposed conv's outputs and a recurrent module's units also by data-dependent
        # ones, through gates (head_taps)
        def viewed(mod: nn.Module) -> bool:
            if self._scores_weight_views():
                return isinstance(mod, _WEIGHT_VIEWS)
            return self._scores_head_taps() and _gated(mod)

        producers |= {m.module for g in graph.prunable for m in g.members if m.axis == "out"
                      and viewed(self.model.get_submodule(m.module))} - self.ignored
        ignored = (set(self.ignored) | {a for a in attn if f"{a}.out_proj" in self.ignored}
                   | {q for q, a in linear_qkv.items() if f"{a}.out_proj" in self.ignored})
        groups = {}
        for g in graph.prunable:
            outs = [m for m in g.members if m.axis == "out"]
            scored = [m for m in outs if m.module in producers]
            if scored and not any(m.module in ignored for m in outs):    # an ignored producer keeps it whole
                groups[g.id] = scored
        order = {name: i for i, name in enumerate(self.layers)}

        def first_run(gid: int) -> int:
            return min(order.get(m.module, order.get(f"{m.module}.out_proj", len(order))) for m in groups[gid])

        self._groups = {gid: groups[gid] for gid in sorted(groups, key=first_run)}
        return self._groups

    def _view_scores(self, names: set[str]) -> dict[str, Tensor]:
        """Per unit row of modules the criterion scores through a stand-in Linear: an attention module's packed
        q|k|v rows (each in-projection weight scored as a Linear), an ``nn.Embedding``'s features (its
        weight's columns, scored as the rows of ``weight.T``, like a Linear's output neurons), an
        transposed conv's output channels (dim 1 of its weight ``[C_in, C_out, *kernel]``), a recurrent
        layer's hidden units (``recurrent.hidden_unit_rows``: a unit's gate rows of every layer and direction)."""
        out = {}
        for name in sorted(names):
            mod = self.model.get_submodule(name)
            if isinstance(mod, RECURRENT):
                out[name] = self._recurrent_view_scores(name, mod)
                continue
            by_column = isinstance(mod, (nn.Embedding, *_masks.TRANSPOSED_CONVS))
            tensors = ["weight"] if by_column else [t for t, _, _ in in_proj_parts(mod) if t.endswith("weight")]
            rows_first = (lambda t: t.transpose(0, 1).reshape(t.shape[1], -1)) if by_column else (lambda t: t)
            parts = []
            for t in tensors:
                w, keep = rows_first(getattr(mod, t).detach()), _masks._mask_param(mod, t)
                mask = None if keep is None else rows_first(keep.mask)
                pieces = 3 if t == "in_proj_weight" else 1       # packed q | k | v: each scored as a Linear
                for i, w_i in enumerate(w.chunk(pieces)):
                    view = nn.Linear(w_i.shape[1], w_i.shape[0], bias=False, device="meta")
                    view.weight = nn.Parameter(w_i, requires_grad=False)
                    if mask is not None:  # the view's own mask: what e.g. l1_mean counts as the row's weights
                        _masks.apply_mask(view, mask.chunk(pieces)[i])
                    ctx = _calibration.LayerContext(name=f"{name}.{t}", granularity="channel", seed=self.seed)
                    parts.append(_masks.unit_scores(self.criterion.score(view, ctx), "channel"))
            out[name] = torch.cat(parts)
        return out

    def _recurrent_view_scores(self, name: str, mod: nn.Module) -> Tensor:
        def weights(t: str) -> Tensor:
            return getattr(mod, t).detach()

        def keeps(t: str) -> Tensor:
            p = _masks._mask_param(mod, t)
            w = getattr(mod, t)
            return torch.ones(w.shape, dtype=torch.bool, device=w.device) if p is None else p.mask

        w = hidden_unit_rows(mod, weights)
        view = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        view.weight = nn.Parameter(w, requires_grad=False)
        if any(_masks._mask_param(mod, t) is not None for t in unit_index(mod)):
            _masks.apply_mask(view, hidden_unit_rows(mod, keeps))
        ctx = _calibration.LayerContext(name=f"{name}.hidden", granularity="channel", seed=self.seed)
        return _masks.unit_scores(self.criterion.score(view, ctx), "channel")

    def _group_unit_scores(self, scores: Mapping[str, Tensor]) -> dict[int, Tensor]:
        """Group id -> one score per unit, aggregated over its producers (see the class docstring)."""
        groups = self._selectable_groups()
        members = {m for ms in groups.values() for m in ms}
        rows = {k: _masks.unit_scores(v, "channel") for k, v in scores.items() if k in self.layers}
        attn = {m.module for m in members if m.module not in self.layers}     # attention modules, embeddings
        rows.update(self._view_scores({a for a in attn if a not in scores}))
        for a in attn & set(scores):     # one score per head -> every packed q|k|v row of the head
            mod = self.model.get_submodule(a)
            per_unit = _masks.unit_scores(scores[a], "channel")
            rows[a] = per_unit if _gated(mod) else \
                per_unit.repeat_interleave(mod.head_dim).repeat(3)
        for m in members:                # a LinearMultiheadAttention's heads: those scores on its q / k / v rows
            a = self._attention_of(m.module)
            if a is not None and a != m.module and a in scores:
                mod = self.model.get_submodule(a)
                rows[m.module] = _masks.unit_scores(scores[a], "channel").repeat_interleave(mod.head_dim)

        def member_scores(_mod: nn.Module, m: Any) -> Tensor | None:
            return rows[m.module][m.offset:m.offset + m.span] if m in members else None

        every = self._dependency_graph().group_scores(member_scores, reduce="mean", normalize=True)
        out = {}
        for gid in groups:
            s = every[gid]
            prev = self._keep.get(gid)
            s = s.detach().cpu()   # one score per unit: small, and the graph's index math runs on the CPU
            if prev is not None:   # units removed before score lowest: they stay removed
                s = s.masked_fill(~prev, float("-inf"))
            out[gid] = s
        return out

    def _group_keep(self, scores: Mapping[str, Tensor], target: float) -> dict[int, Tensor]:
        """Group id -> bool unit keep-mask at ``target`` for every selectable group."""
        units = self._group_unit_scores(scores)
        if self.scope == "layer":
            keep = {gid: _masks.lowest_removed(s, _masks.num_to_remove(target, s.numel())) for gid, s in units.items()}
        else:
            keep = _masks.global_keep({str(gid): s for gid, s in units.items()}, target, "channel",
                                      shapes={str(gid): (s.numel(), 1) for gid, s in units.items()},
                                      min_keep=self.min_channels, max_sparsity=self.max_sparsity)
            keep = {int(k): v[:, 0] for k, v in keep.items()}
        # selection groups (channels picked out of a shared stream) choose among what their stream keeps
        graph = self._dependency_graph()
        fitted = graph.keep_selections(graph.fit_selections(keep, units), units, self.min_channels)
        out = {}
        for gid, mask in keep.items():
            out[gid] = torch.zeros_like(mask)
            out[gid][fitted[gid]] = True
        return out

    def _row_masks(self, keep: Mapping[int, Tensor]) -> dict[str, Tensor]:
        """Layer name -> weight-shaped keep-mask of the output rows the group selection ``keep`` keeps."""
        from .compact import module_keeps

        kept = module_keeps(self._dependency_graph(), _unit_indices(keep))
        out = {}
        for name, mod in self.layers.items():
            shape = tuple(mod.weight.shape)
            rows = torch.zeros(shape[0], dtype=torch.bool)
            rows[kept.get(name, {}).get("out", torch.arange(shape[0]))] = True
            out[name] = rows.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).contiguous().to(mod.weight.device)
        return out

    def _apply_group_keep(self, keep: Mapping[int, Tensor]) -> dict[str, Tensor]:
        """Mask every member of every removed unit (and nothing else); returns the layers' row keep-masks."""
        from .compact import member_tensor_masks

        plan = member_tensor_masks(self._dependency_graph(), _unit_indices(keep), allow_empty=True)
        for name in (set(self.layers) | self._coupled) - set(plan):    # whatever is not removed now is kept
            mod = self.model.get_submodule(name)
            tensors = ("weight", "bias") if name in self.layers else _masks.tensor_masks(mod).get("", {})
            plan[name] = {t: torch.ones(getattr(mod, t).shape, dtype=torch.bool) for t in tensors
                          if getattr(mod, t, None) is not None}
        for name, tensors in plan.items():
            for t, mask in tensors.items():
                self._apply_tensor(name, t, mask)
        self._coupled = set(plan) - set(self.layers)
        return self._row_masks(keep)

    def compact(self, round_to: int | None = None) -> nn.Module:
        """A physically smaller plain model (same module classes) whose outputs equal this masked model's.

        Needs granularity="channel". ``round_to`` (e.g. 8 or 16) keeps channel counts multiples of it, adding
        back the highest-scoring (L1) pruned channels with their weights from before pruning (so outputs then
        differ from this masked model's; its masks stay as they are). The model is
        traced with torch.fx, or torch.export where fx fails (sparsekit.prune.graph); coupled channels
        (residual adds, concat, BN, depthwise groups, attention heads) are removed together. An
        ``nn.MultiheadAttention`` that loses heads becomes a ``compact.PrunedMultiheadAttention`` (same forward
        and parameter names, fewer heads).
        """
        if self.granularity != "channel":
            raise ValueError(f"compact() removes whole channels: it needs granularity='channel', this pruner has "
                             f"granularity={self.granularity!r} (use sparsekit.sparsify for element/block/n:m zeros)")
        _check_round_to(round_to)
        from .compact import compact_from_masks

        small, _ = compact_from_masks(self.model, self.example_inputs, round_to=round_to,
                                      graph=self._dependency_graph())
        return small

    def __repr__(self) -> str:
        return (f"Pruner(criterion={self.criterion.name!r}, granularity={self.granularity!r}, "
                f"scope={self.scope!r}, sparsity={self.sparsity}, layers={len(self.layers)}, "
                f"ignored={sorted(self.ignored)})")
