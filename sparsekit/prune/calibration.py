"""Calibration statistics for data-dependent criteria, collected over ``calib`` with hooks.

A criterion declares what it ``needs``; ``collect`` runs the model over ``calib`` once and accumulates only
that, per pruned layer, as sums (so statistics from several ranks add up exactly):

==============  =============================================================================================
need            statistics (``LayerContext.stats`` keys)
==============  =============================================================================================
``seed``        none: the criterion gets ``LayerContext`` (name, seed) only, e.g. ``random``
``bn``          none: ``LayerContext.bn`` is the BatchNorm right after the layer (from the traced chain)
``activations`` of the layer's feature map (its output after BN/activation, see ``chains``; a Linear's
                channels are its last dim), per channel:
                ``act_count`` (values per channel), ``act_zeros`` (values <= 0), ``act_sum``, ``act_sumsq``,
                ``gap`` (``[samples, C]`` spatial means, for entropy)
``rank``        ``rank_sum`` (sum over samples of each channel's feature-map matrix rank), ``rank_count``
``grads``       ``taylor_elem`` (sum over batches of ``(g * w)**2``), ``taylor_chan`` (sum over batches of
                ``(sum of g * w over the channel)**2``), ``batches``
``hessian``     element granularity: ``fisher`` (sum over samples of ``g_i**2``, ``g_i`` the gradient of sample
                ``i``'s own loss: the empirical diagonal Fisher, whatever the batching of ``calib``),
                ``samples``; channel granularity: ``hutchinson`` (sum of ``v * Hv`` over one Rademacher
                ``v`` per batch, an unbiased estimate of the Hessian diagonal), ``batches``
``consumer``    ``gram`` = ``X^T X`` over sampled rows of the consumer layer's (unfolded) input, ``rows``;
                ``LayerContext.consumer`` is that layer, ``group`` its input columns per channel
==============  =============================================================================================

``calib`` is an iterable of batches: a Tensor (or dict of keyword args) per batch, a one-element list or tuple
``[input]`` (what ``DataLoader(TensorDataset(x))`` yields), or ``(input, target)`` pairs, where ``input`` may
itself be a tuple of positional args (``((x, mask), target)``; a bare 2-tuple is always read as a pair, its
second element the target, which criteria without gradients ignore); gradient-based needs (``grads``,
``hessian``) require the pairs and use ``loss_fn(model(input), target)`` (default cross-entropy). The model
runs in eval mode (BN running statistics, no dropout); training flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..ops.conv import conv_windows
from .chains import Event, Link, Recorder, run_model
from .head_taps import HeadTaps, attention_path
from .masks import CONVS
from .module_copy import stored_original

__all__ = ["NEEDS", "LayerContext", "split_batch", "collect", "weight_param", "layer_seed"]

NEEDS = ("seed", "bn", "activations", "rank", "grads", "hessian", "consumer")
DATA_NEEDS = ("activations", "rank", "grads", "hessian", "consumer")


@dataclass
class LayerContext:
    """What a criterion with ``needs`` sees besides the module: see the module docstring."""

    name: str
    granularity: str = "element"
    seed: int = 0
    link: Link | None = None
    bn: nn.Module | None = None
    consumer: nn.Module | None = None
    group: int = 1
    stats: dict[str, Tensor] = field(default_factory=dict)

    def stat(self, key: str) -> Tensor:
        """The statistic ``key``; a KeyError says which were collected."""
        if key not in self.stats:
            raise KeyError(f"statistic {key!r} was not collected for layer {self.name!r} (have "
                           f"{sorted(self.stats)}); declare it in the criterion's needs")
        return self.stats[key]


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed derived from ``seed`` and the layer's name (stable across runs and processes)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def weight_param(module: nn.Module) -> Tensor:
    """The leaf Parameter behind ``module.weight`` (the unmasked original when masked)."""
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        return stored_original(params.weight)
    return module.weight


_DONE = object()     # the end of a calib iterator


def default_loss(output: Any, target: Any) -> Tensor:
    """Cross-entropy of ``output`` against ``target``; without a target, the loss the model returned (a Hugging
    Face output computes ``.loss`` when its inputs hold ``labels``)."""
    if target is None:
        loss = getattr(output, "loss", None)
        if not isinstance(loss, Tensor):
            raise ValueError("this criterion needs gradients, and the calib batch has no target while the model "
                             "returned no .loss: pass (input, target) pairs, inputs with labels (Hugging Face), or "
                             "a loss_fn")
        return loss
    return F.cross_entropy(output, target)


def _may_hold_labels(inputs: Any) -> bool:
    """Keyword inputs naming labels: a Hugging Face model then returns its own ``.loss``."""
    return isinstance(inputs, Mapping) and any("label" in str(k) for k in inputs)


def split_batch(item: Any, index: int = 0) -> tuple[Any, Any]:
    """``(inputs, target)`` of one ``calib`` item (``target`` None for a plain batch)."""
    if isinstance(item, (Tensor, Mapping)):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 1:     # DataLoader(TensorDataset(x)) yields [x]
        return item[0], None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"calib[{index}] must be a Tensor, a dict of keyword args, [input] or an (input, target) pair "
                    f"(several positional args go in a tuple: ((a, b), target) or ((a, b), None)), got "
                    f"{type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))


def _add(acc: dict[str, Any], key: str, value: Tensor) -> None:
    value = value.detach().to(torch.float64)
    acc[key] = acc[key] + value if key in acc else value.clone()


def _channels_last_rows(t: Tensor) -> Tensor:
    """``[C, everything else]`` view of a feature map ``[N, C, ...]``."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _acc_activations(acc: dict[str, Any], fmap: Tensor) -> None:
    v = _channels_last_rows(fmap.float())
    _add(acc, "act_count", torch.tensor(float(v.shape[1])))
    _add(acc, "act_zeros", (v <= 0).sum(1))
    _add(acc, "act_sum", v.sum(1))
    _add(acc, "act_sumsq", (v * v).sum(1))
    gap = fmap.float().flatten(2).mean(2) if fmap.dim() > 2 else fmap.float()
    acc.setdefault("_gap", []).append(gap.detach().to(torch.float64))


def _acc_rank(acc: dict[str, Any], fmap: Tensor) -> None:
    f = fmap.float()
    if f.dim() >= 4:     # [N, C, H, W]; a 3-D map [D, H, W] as the matrix [D*H, W]
        ranks = torch.linalg.matrix_rank(f.flatten(2, -2)).to(torch.float64)          # [N, C]
    else:                                                             # a neuron's "map" is one number
        ranks = (f.abs() > 1e-6).to(torch.float64).reshape(f.shape[0], f.shape[1], -1).amax(-1)
    _add(acc, "rank_sum", ranks.sum(0))
    _add(acc, "rank_count", torch.tensor(float(f.shape[0])))


def consumer_rows(consumer: nn.Module, x: Tensor, pick: Callable[[int], Tensor | None] | None = None) -> Tensor:
    """The consumer's input as rows of its 2-D weight's columns: unfolded patches for a conv. The padding is
    applied first exactly as the conv applies it (its mode, and "same" even when uneven), then unfolded.
    ``pick(n_rows)`` may return the indices of the rows to keep (None: all): only those are copied out."""
    if isinstance(consumer, CONVS):
        if consumer.groups != 1:
            raise ValueError(f"consumer_rows: a grouped conv (groups={consumer.groups}) has no single patch matrix; "
                             "expected groups=1")
        pad = consumer._reversed_padding_repeated_twice      # what the conv's forward pads with (any padding)
        mode = "constant" if consumer.padding_mode == "zeros" else consumer.padding_mode
        if any(pad):
            x = F.pad(x, pad, mode=mode)
        taps = conv_windows(x, consumer.kernel_size, consumer.dilation, consumer.stride)   # [N, C, *out, *kernel]
        sd = len(consumer.kernel_size)
        # rows: one per (sample, output position); columns in the weight's order: channel, then taps
        order = (0, *range(2, 2 + sd), 1, *range(2 + sd, 2 + 2 * sd))
        taps = taps.permute(order)                     # still a view: [N, *out, C, *kernel]
        positions = taps.shape[:1 + sd]
        idx = pick(math.prod(positions)) if pick is not None else None
        if idx is not None:
            taps = taps[torch.unravel_index(idx, positions)]
        return taps.reshape(-1, taps.shape[-1 - sd] * math.prod(consumer.kernel_size))
    rows = x.reshape(-1, x.shape[-1])
    idx = pick(rows.shape[0]) if pick is not None else None
    return rows if idx is None else rows[idx]


def _acc_gram(acc: dict[str, Any], consumer: nn.Module, x: Tensor, gen: torch.Generator,
              max_rows: int) -> None:
    def sample(n: int) -> Tensor | None:     # chosen before the patch matrix exists (3-D convs make it large)
        return torch.randperm(n, generator=gen)[:max_rows] if n > max_rows else None

    rows = consumer_rows(consumer, x.detach().float(), sample).to(torch.float64)
    _add(acc, "gram", rows.T @ rows)
    _add(acc, "rows", torch.tensor(float(rows.shape[0])))


def _acc_grads(acc: dict[str, dict[str, Any]], layers: Mapping[str, nn.Module], loss: Tensor,
               needs: set[str], granularity: str, gen: torch.Generator,
               gates: Mapping[str, Tensor] | None = None) -> None:
    gates = gates or {}
    names = list(layers) + list(gates)
    params = [weight_param(layers[k]) for k in layers] + list(gates.values())
    if not params:          # (a "sharded" rank holding no layer: nothing to differentiate)
        return
    weights = [layers[k].weight.detach() for k in layers] + [g.detach() for g in gates.values()]
    hutch = "hessian" in needs and granularity == "channel"
    grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=hutch)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    if "grads" in needs:
        for k, g, w in zip(names, grads, weights):
            # (in fp16 the squares underflow to 0 before _add widens them: the scores become ties)
            wide = torch.promote_types(w.dtype, torch.float32)
            prod = g.detach().to(wide) * w.to(wide)
            _add(acc[k], "taylor_elem", prod * prod)
            _add(acc[k], "taylor_chan", prod.reshape(prod.shape[0], -1).sum(1).square())
    if hutch:
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]
        gv = sum((g * v).sum() for g, v in zip(grads, vs) if g.requires_grad)
        if isinstance(gv, Tensor) and gv.requires_grad:
            hv = torch.autograd.grad(gv, params, allow_unused=True)
        else:
            hv = [None] * len(params)
        for k, v, h in zip(names, vs, hv):
            _add(acc[k], "hutchinson", torch.zeros_like(v) if h is None else v * h)


_FISHER_CHUNK = 1 << 26     # per-sample gradient entries held at once (256 MB in fp32)


def _batch_size(inputs: Any) -> int:
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError("per-sample gradients need batched tensors in the calib inputs (dim 0 = samples)")
    return leaves[0].shape[0]


def _rows(tree: Any, start: int, stop: int) -> Any:
    """The samples ``start:stop`` of every tensor in ``tree`` (dim 0); other leaves pass through."""
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 else t, tree)


def _vmap_sq_grads(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, target: Any,
                   loss_fn: Callable[[Any, Any], Tensor]) -> dict[str, Tensor]:
    """Sum over the samples of the squared per-sample gradients (``torch.func``: ``vmap`` of ``grad`` of each
    sample's loss), computed a chunk of samples at a time."""
    from torch.func import functional_call, grad, vmap

    def loss_one(p: dict[str, Tensor], x: Any, t: Any) -> Tensor:
        x1, t1 = pytree.tree_map(lambda v: v.unsqueeze(0), (x, t))
        if isinstance(x1, Mapping):
            out = functional_call(model, p, (), dict(x1))
        else:
            out = functional_call(model, p, (x1,) if isinstance(x1, Tensor) else tuple(x1))
        return loss_fn(out, t1)

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    n = _batch_size(inputs)
    chunk = max(1, min(n, _FISHER_CHUNK // max(1, sum(p.numel() for p in params.values()))))
    sums = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for start in range(0, n, chunk):
        g = per_sample(dict(params), _rows(inputs, start, start + chunk), _rows(target, start, start + chunk))
        for k in sums:
            sums[k] += g[k].detach().to(torch.float64).square().sum(0)
    return sums


def _loop_sq_grads(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, target: Any,
                   loss_fn: Callable[[Any, Any], Tensor], taps: HeadTaps) -> dict[str, Tensor]:
    """``_vmap_sq_grads`` by micro-batches of one sample (where ``vmap`` cannot run, and for head gates)."""
    sums: dict[str, Tensor] = {}
    for i in range(_batch_size(inputs)):
        gates = taps.new_gates()
        tensors = dict(params) | gates
        loss = loss_fn(run_model(model, _rows(inputs, i, i + 1)), _rows(target, i, i + 1))
        grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
        for k, p, g in zip(tensors, tensors.values(), grads):
            sq = torch.zeros_like(p, dtype=torch.float64) if g is None else g.detach().to(torch.float64).square()
            sums[k] = sums[k] + sq if k in sums else sq
    return sums


def _acc_fisher(acc: dict[str, dict[str, Any]], model: nn.Module, layers: Mapping[str, nn.Module],
                inputs: Any, target: Any, loss_fn: Callable[[Any, Any], Tensor], taps: HeadTaps) -> None:
    """Add ``fisher`` (sum over the batch's samples of each one's squared gradient) and ``samples``.

    The empirical Fisher is a mean of per-sample outer products; the square of a batch-mean gradient is not
    (it shrinks with the batch size and depends on how ``calib`` is batched)."""
    pname = {id(p): n for n, p in model.named_parameters()}
    params = {k: weight_param(mod) for k, mod in layers.items()}
    if not params and not taps.names:       # (a "sharded" rank holding no layer)
        return
    sums: dict[str, Tensor] | None = None
    if not taps.names and all(id(p) in pname for p in params.values()):
        try:
            by_name = _vmap_sq_grads(model, {pname[id(p)]: p for p in params.values()}, inputs, target, loss_fn)
            sums = {k: by_name[pname[id(p)]] for k, p in params.items()}
        except Exception:    # an op or input vmap does not support: one sample at a time gives the same sums
            sums = None
    if sums is None:
        sums = _loop_sq_grads(model, params, inputs, target, loss_fn, taps)
    for k, v in sums.items():
        _add(acc[k], "fisher", v)
        _add(acc[k], "samples", torch.tensor(float(_batch_size(inputs))))


def _twice_differentiable(needs: set[str], granularity: str) -> Any:
    """Hutchinson's Hessian-vector products differentiate the gradients again: attention then runs the math
    scaled_dot_product_attention (the fused CPU / flash kernels have no double backward)."""
    if "hessian" in needs and granularity == "channel":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def collect(model: nn.Module, layers: Mapping[str, nn.Module], links: Mapping[str, Link],
            calib: Iterable[Any], needs: Iterable[str], *, granularity: str = "element",
            loss_fn: Callable[[Any, Any], Tensor] | None = None, seed: int = 0, max_rows: int = 1024,
            events: list[Event] | None = None, heads: Iterable[str] = (),
            outputs: Iterable[str] = ()) -> dict[str, dict[str, Tensor]]:
    """Run ``model`` over ``calib`` and return layer name -> accumulated statistics (see module doc).

    ``links`` come from ``chains.trace_links`` on the same model; ``events`` (the traced event list)
    lets every batch be checked to take the same path as the trace. ``heads``: attention modules whose
    heads get statistics too, under their own name, as if each head were a channel of a layer whose weight
    is the heads' gates (``head_taps``): ``activations`` / ``rank`` of the head's output ``[tgt, head_dim]``
    per sample, ``grads`` / ``hessian`` of its gate (``taylor_chan`` is ``(sum of out_h * d loss / d out_h)**2``).
    ``outputs``: transposed convs whose output channels get statistics the same way (their output channels as
    the feature map, a gate per channel).
    """
    needs = set(needs) & set(DATA_NEEDS)
    heads, outputs = list(heads), list(outputs)
    acc: dict[str, dict[str, Any]] = {k: {} for k in list(layers) + heads + outputs}
    feature_at: dict[int, list[str]] = {}
    consumer_at: dict[int, list[str]] = {}
    for name in layers:
        link = links.get(name)
        if needs & {"activations", "rank"}:
            if link is None or link.feature < 0:
                raise ValueError(f"layer {name!r} has no feature map to collect: "
                                 f"{link.reason if link else 'not traced'}")
            feature_at.setdefault(link.feature, []).append(name)
        if "consumer" in needs:
            if link is None or link.consumer_event is None:
                raise ValueError(f"layer {name!r} has no consumer layer: {link.reason if link else 'not traced'}")
            consumer_at.setdefault(link.consumer_event, []).append(name)
    expected = {ev.index: ev.name for ev in events} if events is not None else {}
    gen = torch.Generator().manual_seed(int(seed))
    modules = dict(model.named_modules())

    def on_event(ev: Event) -> None:
        if expected and expected.get(ev.index) != ev.name and (ev.index in feature_at or ev.index in consumer_at):
            raise ValueError(f"a calib batch took another path through the model than example_inputs: step "
                             f"{ev.index} is {ev.name!r}, expected {expected.get(ev.index)!r}")
        for name in feature_at.get(ev.index, ()):
            fmap = ev.output.detach()
            if isinstance(layers[name], nn.Linear) and fmap.dim() > 2:    # [batch, tokens..., C] -> [batch, C, ...]
                fmap = fmap.movedim(-1, 1)
            if "activations" in needs:
                _acc_activations(acc[name], fmap)
            if "rank" in needs:
                _acc_rank(acc[name], fmap)
        for name in consumer_at.get(ev.index, ()):
            _acc_gram(acc[name], modules[links[name].consumer], ev.inputs[0], gen, max_rows)

    def on_heads(name: str, out: Tensor) -> None:
        if "activations" in needs:
            _acc_activations(acc[name], out.detach())
        if "rank" in needs:
            _acc_rank(acc[name], out.detach())

    grad_needed = bool(needs & {"grads", "hessian"})
    fisher = "hessian" in needs and granularity != "channel"
    batch_grads = "grads" in needs or ("hessian" in needs and not fisher)
    fisher_items: list[tuple[Any, Any]] = []
    own_loss = loss_fn is not None
    loss_fn = default_loss if loss_fn is None else loss_fn
    modes = {mod: mod.training for mod in model.modules()}
    # a frozen layer is still scored from its gradient: it needs one while calibrating (restored after)
    frozen = [p for p in dict.fromkeys(weight_param(m) for m in layers.values()) if not p.requires_grad] \
        if grad_needed else []
    batches = 0
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        with Recorder(model, on_event) as rec, HeadTaps(model, heads, on_heads, gates=grad_needed,
                                                        outputs=outputs) as taps:
            with rec.quiet():
                batches_of = iter(calib)      # (a DataLoader seeds its sampler here)
            for i in itertools.count():
                # fetching a batch (a DataLoader's getitem / stack) and making fresh gates are no steps of the
                # forward pass
                with rec.quiet():
                    item = next(batches_of, _DONE)
                    if item is _DONE:
                        break
                    inputs, target = split_batch(item, i)
                    gates = taps.new_gates() if batch_grads else {}
                rec.reset()
                if grad_needed and target is None and not own_loss and not _may_hold_labels(inputs):
                    raise ValueError(f"calib[{i}] is a plain batch, but this criterion needs gradients: pass "
                                     "(input, target) pairs (loss_fn(model(input), target) is used), inputs with "
                                     "labels to a model that returns its .loss (Hugging Face), or a loss_fn that "
                                     "takes (output, None)")
                if fisher:
                    fisher_items.append((inputs, target))
                if batch_grads:
                    with torch.enable_grad(), _twice_differentiable(needs, granularity):
                        loss = loss_fn(run_model(model, inputs), target)
                        if not isinstance(loss, Tensor) or loss.dim() != 0:
                            raise ValueError(f"loss_fn must return a scalar tensor, got "
                                             f"{getattr(loss, 'shape', type(loss).__name__)}")
                        _acc_grads(acc, layers, loss, needs, granularity, gen, gates)
                else:
                    with torch.no_grad():
                        run_model(model, inputs)
                if grad_needed:
                    for k in acc:
                        _add(acc[k], "batches", torch.tensor(1.0))
                batches += 1
        if fisher:    # per-sample passes, outside the Recorder (they are not events of the calib batches)
            with attention_path(model), HeadTaps(model, heads, gates=True, outputs=outputs) as taps, \
                    torch.enable_grad():
                for inputs, target in fisher_items:
                    _acc_fisher(acc, model, layers, inputs, target, loss_fn, taps)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
        for p in frozen:
            p.requires_grad_(False)
    if batches == 0:
        raise ValueError("calib is empty: pass at least one batch")
    for stats in acc.values():
        if "_gap" in stats:
            stats["gap"] = torch.cat(stats.pop("_gap"))
    return acc
