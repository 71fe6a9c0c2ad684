"""Target-architecture pruning by alpha-blending (Gschossmann 2021, seed 002).

Beside each chosen layer ``P`` (with ``C`` output channels and a consumer ``Q`` along a plain chain) a
narrow branch of the target width ``k`` is added:

    A (k x C, on P's output)  ->  copies of P's BatchNorm (k channels) / activation / pooling  ->  E (C x k)

and ``Q`` sees ``alpha * original + (1 - alpha) * narrow``. The branch begins and ends with a linear map
(no activation at either end, fig. 3 of the paper), so once ``alpha`` has been stepped from 1 to 0 while
the user's loop trains *both* branches, ``merge()`` folds ``A`` into ``P`` and ``E`` into ``Q`` with
``einsum`` and drops the originals: the merged model has layers of width ``k`` and gives the ``alpha=0``
model's outputs.

    blend = AlphaBlend(model, x, widths={"conv1": 22, "conv2": 44})   # or widths=0.34 for every layer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)                # includes the branches
    for alpha in blend.alphas(step=0.1):                              # 1.0, 0.9, ..., 0.0
        blend.set_alpha(alpha)
        train(model, opt)
    blend.merge()                                                     # model is now the small one

Initialisation: ``A`` selects the ``k`` filters of largest L1 norm and ``E`` puts them back, so at
``alpha=0`` before any training the model equals L1 channel pruning. The branches live in
``model.alpha_blend`` (so ``model.parameters()`` and ``state_dict`` include them) until ``merge()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..._compat import set_submodule
from .. import chains as _chains
from .. import masks as _masks

__all__ = ["AlphaBlend"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_STATELESS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
              nn.SELU, nn.CELU, nn.Mish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
              nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveMaxPool2d)
_FN_REPLAY = {"relu": torch.relu, "relu_": torch.relu}
_FN_SKIP = {"flatten", "view", "reshape", "contiguous"}
# the module forms of _FN_SKIP: the narrow branch stays [N, k, ...] through them (its channels on dim 1), and the
# consumer hook maps it back to C channels and reshapes it to the consumer's input, flattened or not
_MODULE_SKIP = (nn.Flatten, nn.Unflatten)


def _on_channels(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Apply ``weight`` ``[out, in]`` to dim 1 of ``x`` (a 1x1 convolution for feature maps)."""
    y = torch.movedim(x, 1, -1) @ weight.T
    if bias is not None:
        y = y + bias
    return torch.movedim(y, -1, 1)


class _Branch(nn.Module):
    def __init__(self, channels: int, width: int, keep: Tensor, like: Tensor) -> None:
        super().__init__()
        eye = torch.eye(channels, dtype=like.dtype, device=like.device)     # (the layer's dtype and device)
        self.a_weight = nn.Parameter(eye[keep].clone())           # [k, C]
        self.a_bias = nn.Parameter(torch.zeros(width, dtype=like.dtype, device=like.device))
        self.e_weight = nn.Parameter(eye[:, keep].clone())        # [C, k]
        self.bns = nn.ModuleDict()


class AlphaBlend:
    """Alpha-blended narrow branches beside ``widths`` layers of ``model`` (see the module docstring).

    ``widths``: layer name -> target output channels, or a float in (0, 1): that fraction of the channels
    (rounded, at least 1) for every layer that has a consumer along a plain chain.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, widths: dict[str, int] | float) -> None:
        if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # the branches become a child of model (so that model.parameters() trains them): a Sequential would run it
            raise ValueError(f"model is an nn.{type(model).__name__}, whose forward would run the branches added to "
                             "it: wrap it in a Module whose forward calls it (e.g. a one-attribute nn.Module)")
        modules = dict(model.named_modules())
        prunable = [k for k, v in modules.items() if isinstance(v, _masks.LINEAR_CONV2D)]
        self.model = model
        self._events = _chains.trace_events(model, example_inputs)
        links = _chains.trace_links(model, example_inputs, prunable, events=self._events)
        if isinstance(widths, float):
            if not 0.0 < widths < 1.0:
                raise ValueError(f"widths as a fraction must be in (0, 1), got {widths!r}")
            fraction = widths
            widths = {k: max(1, round(fraction * modules[k].weight.shape[0])) for k, lk in links.items()
                      if lk.consumer is not None and getattr(modules[k], "groups", 1) == 1
                      and getattr(modules[lk.consumer], "groups", 1) == 1}
            # a layer the fraction rounds back to its full width has nothing to narrow: it keeps no branch
            narrower = {k: w for k, w in widths.items() if w < modules[k].weight.shape[0]}
            if widths and not narrower:
                raise ValueError(f"widths={fraction!r} rounds every blendable layer back to its full width: "
                                 "use a smaller fraction or a dict name -> channels")
            widths = narrower
        if not isinstance(widths, dict) or not widths:
            raise TypeError(f"widths must be a non-empty dict name -> channels or a float, got {widths!r}")
        self.alpha = 1.0
        self.widths: dict[str, int] = {}
        self.links: dict[str, _chains.Link] = {}
        self.branches = nn.ModuleDict()
        for name, k in widths.items():
            if name not in links:
                raise ValueError(f"widths names {name!r}, which is not an nn.Linear/nn.Conv2d of model "
                                 f"(have {prunable})")
            mod, link = modules[name], links[name]
            grouped = [n for n in (name, link.consumer) if n is not None and getattr(modules[n], "groups", 1) != 1]
            if grouped:     # the merge's einsums rebuild groups=1 layers
                raise ValueError(f"cannot blend {name!r}: {grouped[0]!r} is a grouped conv "
                                 f"(groups={modules[grouped[0]].groups}); blending needs groups=1")
            if link.consumer is not None and not isinstance(modules[link.consumer], _masks.LINEAR_CONV2D):
                raise ValueError(f"cannot blend {name!r}: its consumer {link.consumer!r} is an "
                                 f"nn.{type(modules[link.consumer]).__name__}; merging rebuilds Linear / Conv2d only")
            if _masks.is_masked(mod) or link.consumer is None:
                raise ValueError(f"cannot blend {name!r}: " + ("it is masked; bake or remove masks first"
                                                               if _masks.is_masked(mod) else link.reason))
            c = mod.weight.shape[0]
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < c:
                raise ValueError(f"widths[{name!r}] must be an int in [1, {c}) (it has {c} channels), got {k!r}")
            l1 = mod.weight.detach().reshape(c, -1).abs().sum(1)
            keep = torch.sort(torch.sort(l1, descending=True, stable=True).indices[:k]).values
            branch = _Branch(c, k, keep.to(mod.weight.device), mod.weight)
            for idx in link.path:
                ev = self._events[idx]
                if ev.kind == "module" and isinstance(ev.module, _BN):
                    bn = ev.module
                    small = type(bn)(k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                     track_running_stats=bn.track_running_stats)
                    ref = next((t for t in (*bn.parameters(), *bn.buffers()) if t.is_floating_point()), None)
                    if ref is not None:
                        small.to(device=ref.device, dtype=ref.dtype)
                    with torch.no_grad():
                        for attr in ("weight", "bias", "running_mean", "running_var"):
                            if getattr(bn, attr, None) is not None:
                                getattr(small, attr).copy_(getattr(bn, attr)[keep.to(ref.device)])
                        if getattr(bn, "num_batches_tracked", None) is not None:   # (momentum=None averages by it)
                            small.num_batches_tracked.copy_(bn.num_batches_tracked)
                    branch.bns[str(idx)] = small
                elif ev.kind == "module" and not isinstance(ev.module, (*_STATELESS, *_MODULE_SKIP)):
                    raise ValueError(f"cannot blend {name!r}: its chain passes {ev.name!r} "
                                     f"({type(ev.module).__name__}), which the narrow branch cannot replay on "
                                     "its channels; it replays BatchNorm, stateless activations, dropout, 2-D "
                                     "pooling and flatten only")
                elif ev.kind == "function" and ev.name not in _FN_REPLAY and ev.name not in _FN_SKIP:
                    raise ValueError(f"cannot blend {name!r}: its chain calls torch function {ev.name!r}")
            self.widths[name], self.links[name] = k, link
            self.branches[name.replace(".", "__")] = branch
        model.add_module("alpha_blend", self.branches)
        self._narrow: dict[str, Tensor] = {}
        self._handles = []
        for name, link in self.links.items():
            self._handles.append(modules[name].register_forward_hook(self._producer_hook(name)))
            self._handles.append(modules[link.consumer].register_forward_pre_hook(self._consumer_hook(name)))

    # ---------------------------------------------------------------------------------------- forward
    def _branch(self, name: str) -> _Branch:
        return self.branches[name.replace(".", "__")]

    def _producer_hook(self, name: str):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if self.alpha >= 1.0:
                return
            br = self._branch(name)
            # (a copy: autograd keeps the branch's input, and an in-place activation next would overwrite `out`)
            y = _on_channels(out.clone(), br.a_weight, br.a_bias)
            for idx in self.links[name].path:
                ev = self._events[idx]
                if ev.kind == "module" and isinstance(ev.module, _MODULE_SKIP):
                    continue
                if ev.kind == "module":
                    y = br.bns[str(idx)](y) if str(idx) in br.bns else ev.module(y)
                elif ev.name in _FN_REPLAY:
                    y = _FN_REPLAY[ev.name](y)
            self._narrow[name] = y
        return hook

    def _consumer_hook(self, name: str):
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            if self.alpha >= 1.0:
                return None
            x = args[0]
            narrow = self._narrow.pop(name)
            wide = _on_channels(narrow, self._branch(name).e_weight).reshape(x.shape)
            return (self.alpha * x + (1.0 - self.alpha) * wide, *args[1:])
        return hook

    def set_alpha(self, alpha: float) -> None:
        """Blend weight of the original branch: 1 = original model, 0 = only the narrow branches."""
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    @staticmethod
    def alphas(step: float = 0.1) -> list[float]:
        """The step schedule of the paper: 1, 1 - step, ..., 0 (``step`` rounded to divide 1 evenly)."""
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0.0 < step <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {step!r}")
        n = max(1, round(1.0 / step))
        return [round(1.0 - i / n, 10) for i in range(n + 1)]

    # ------------------------------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the narrow branches into smaller layers (einsum) and drop the originals; returns the model.

        Needs ``alpha == 0`` (the merged model reproduces the alpha=0 outputs, not a blend)."""
        if self.alpha != 0.0:
            raise ValueError(f"merge() needs alpha == 0 (set_alpha(0.0) and train first), alpha is {self.alpha}")
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, link in self.links.items():
            br = self._branch(name)
            mods = dict(self.model.named_modules())
            p, q = mods[name], mods[link.consumer]
            a = br.a_weight.detach()
            w = torch.einsum("kc,c...->k...", a, p.weight.detach())
            b = br.a_bias.detach() + (a @ p.bias.detach() if p.bias is not None else 0.0)
            set_submodule(self.model, name, _like(p, out_features=w.shape[0], in_features=None, weight=w, bias=b))
            for idx, bn in br.bns.items():
                set_submodule(self.model, self._events[int(idx)].name, bn)
            e = br.e_weight.detach()
            wq = q.weight.detach()
            if isinstance(q, nn.Conv2d):
                wq_new = torch.einsum("ochw,ck->okhw", wq, e)
            else:
                c = e.shape[0]
                wq_new = torch.einsum("ocg,ck->okg", wq.reshape(wq.shape[0], c, -1), e).reshape(wq.shape[0], -1)
            set_submodule(self.model, link.consumer, _like(q, out_features=None, in_features=wq_new.shape[1],
                                                      weight=wq_new, bias=q.bias))
        del self.model.alpha_blend
        return self.model


def _like(mod: nn.Module, out_features: int | None, in_features: int | None, weight: Tensor,
          bias: Tensor | float | None) -> nn.Module:
    if isinstance(mod, nn.Conv2d):
        new: nn.Module = nn.Conv2d(weight.shape[1], weight.shape[0], mod.kernel_size, mod.stride, mod.padding,
                                   mod.dilation, bias=bias is not None, padding_mode=mod.padding_mode)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias if isinstance(bias, Tensor) else torch.full_like(new.bias, float(bias)))
    new.train(mod.training)
    return new


