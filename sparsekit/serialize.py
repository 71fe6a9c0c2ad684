"""sk.save / sk.load: a sparsified model as safetensors + a JSON spec. No pickled modules.

    path/model.safetensors   every tensor of model.state_dict() (sparse values and indices included)
    path/sparsekit.json      which submodules are SparseLinear / SparseConv* / SparseConvTranspose* and with what
                             format, BSR block
                             shape, n:m, conv geometry, forced backend ("backend", null unless forced) and the
                             backend that ran the layer when sk.sparsify chose it ("chosen_backend", information);
                             which attention modules are LinearMultiheadAttention (converted again on load)

``load(path, Model())`` re-applies the spec to a fresh instance of the original class: each recorded submodule is
rebuilt from the stored tensors, then the whole state_dict is loaded; every tensor keeps the dtype it was saved
in (a model saved in float16 loads as float16 into a float32 instance). The dispatcher re-selects the backend
on the loading machine (``chosen_backend`` is not applied); a forced backend that cannot run there, or that
this sparsekit does not know, is dropped with a warning. Non-persistent buffers (outside the state_dict) are
stored too, under ``NONPERSISTENT`` + their name, for skeletons built on the meta device, which cannot
compute them.
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ._aliases import equal_classes, module_aliases
from ._compat import set_submodule
from .formats import BSR, CSR, NM, ChannelIndex
from .nn import (
    SPARSE_LAYERS,
    SPARSE_MODULES,
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseConvTranspose1d,
    SparseConvTranspose2d,
    SparseConvTranspose3d,
    SparseLinear,
    _is_hf_conv1d,
    _same_trainability,
    sparse_class,
)
from .ops._dispatch import BACKENDS
from .prune.linear_mha import LinearMultiheadAttention, disable_fused_transformer_paths
from .prune.linear_rnn import LinearRecurrent

SPEC_VERSION = 3           # 2: the weights file also holds the non-persistent buffers (NONPERSISTENT keys);
                           # 3: a module's "aliases", a saved Sparse* layer as the root ("") entry
READABLE_SPECS = (1, 2, 3)  # what load reads (a version-1 directory has no non-persistent buffers)
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "sparsekit.json"
NONPERSISTENT = "sparsekit.nonpersistent:"    # key prefix of the non-persistent buffers in the weights file


_CONVERTED = {"LinearMultiheadAttention": LinearMultiheadAttention, "LinearRecurrent": LinearRecurrent}


def _module_spec(mod: SparseLinear | SparseConv2d | LinearMultiheadAttention | LinearRecurrent) -> dict:
    if isinstance(mod, tuple(_CONVERTED.values())):   # rebuilt from the fresh model's stock module (same widths)
        return {"class": type(mod).__name__, **({"sparsify_converted": True} if mod.sparsify_converted else {})}
    # the sparsekit class (a user's subclass loads as it)
    cls = next(c for c in (SparseLinear, SparseConv1d, SparseConv3d, SparseConv2d, SparseConvTranspose1d,
                           SparseConvTranspose3d, SparseConvTranspose2d) if isinstance(mod, c))
    spec = {"class": cls.__name__, "format": mod.format, "weight_shape": list(mod.weight_shape),
            "backend": mod.backend, "chosen_backend": getattr(mod, "chosen_backend", mod.backend),
            "has_bias": mod.bias is not None}
    if mod.format == "bsr":
        spec["block"] = list(mod.sparse_weight().block)
    if mod.format == "nm":
        spec["nm"] = list(mod.nm)
    if mod.format == "csr":
        spec["bitmap"] = "bitmap" in mod._buffers
    if isinstance(mod, SparseConvTranspose2d):
        spec.update(kernel_size=list(mod.kernel_size), stride=list(mod.stride), padding=list(mod.padding),
                    output_padding=list(mod.output_padding), dilation=list(mod.dilation), groups=mod.groups)
    if isinstance(mod, SparseConv2d):
        spec.update(in_channels=mod.in_channels, kernel_size=list(mod.kernel_size), stride=list(mod.stride),
                    padding=list(mod.padding), dilation=list(mod.dilation), groups=mod.groups)
    return spec


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` to the directory ``path`` (created if needed); returns the directory."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    masked = [n for n, m in model.named_modules() if hasattr(m, "parametrizations")]
    if masked:
        raise ValueError(f"model has mask parametrizations on {masked[:3]}{'...' if len(masked) > 3 else ''}; "
                         "bake them first (pruner.bake() or sparsekit.prune.masks.bake_masks(model)) or sparsify")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    aliases = module_aliases(model)
    modules = {}
    for n, m in model.named_modules():
        if isinstance(m, (*SPARSE_MODULES, *_CONVERTED.values())):
            modules[n] = _module_spec(m)
            if len(aliases[id(m)]) > 1:    # one module under several names (a shared layer): rebuilt once
                modules[n]["aliases"] = aliases[id(m)][1:]
    spec = {"sparsekit_spec": SPEC_VERSION, "torch": torch.__version__, "model_class": type(model).__name__,
            "modules": modules}
    from .prune.compact import compacted_widths  # layer widths, so a compacted (smaller) model loads back
    spec["widths"] = compacted_widths(model)
    state = model.state_dict()
    # each module's state-dict version (a module whose _load_from_state_dict converts older layouts reads it;
    # torchvision's MNASNet refuses a state without one)
    spec["state_dict_metadata"] = {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()}
    # safetensors refuses shared or non-contiguous storage: store contiguous copies
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tensors.update({NONPERSISTENT + k: v.detach().contiguous().clone() for k, v in _nonpersistent(model).items()})
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    return out


def _nonpersistent(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``state_dict`` leaves out (``register_buffer(..., persistent=False)``), by full name."""
    return {f"{n}.{b}" if n else b: mod._buffers[b] for n, mod in model.named_modules()
            for b in mod._non_persistent_buffers_set if mod._buffers.get(b) is not None}


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (tied embeddings), one list per shared tensor."""
    ties: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(n)
    return [names for names in ties.values() if len(names) > 1]


def _saved_ties(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """The ties of ``model`` (``_tied_parameters``) as the saved model had them: the names of one tie whose saved
    tensors are equal stay tied, and each other class of equal tensors gets a Parameter of its own (a weight the
    fresh model ties in ``__init__`` but the saved one held apart: untied by its user, or masked differently
    before compaction), so that loading gives each its values. Returns the ties kept (2 names or more)."""
    kept = []
    for names in _tied_parameters(model):
        classes = equal_classes(names, lambda a, b: a in tensors and b in tensors
                                and tensors[a].shape == tensors[b].shape and torch.equal(tensors[a], tensors[b]))
        for i, cls in enumerate(classes):
            if i:       # (the first class keeps the fresh model's Parameter)
                first = model.get_parameter(cls[0])
                fresh = nn.Parameter(torch.empty_like(first), first.requires_grad)   # (values: loaded next)
                for name in cls:
                    owner, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(owner), attr, fresh)
            if len(cls) > 1:
                kept.append(cls)
    return kept


def _with_metadata(tensors: dict[str, torch.Tensor], metadata: dict | None) -> dict[str, torch.Tensor]:
    """The persistent tensors as a state dict carrying the saved per-module versions (``state_dict()._metadata``)."""
    state = collections.OrderedDict((k, v) for k, v in tensors.items() if not k.startswith(NONPERSISTENT))
    if metadata:
        state._metadata = collections.OrderedDict(metadata)   # type: ignore[attr-defined]
    return state


def _assign_meta_skeleton(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    """Load ``tensors`` into a model built on the meta device by assignment: ties are re-made (assignment gives
    every name its own tensor) and non-persistent buffers come from the file; a tensor left on meta is an error."""
    ties = _saved_ties(model, tensors)
    model.load_state_dict(_with_metadata(tensors, metadata), strict=True, assign=True)
    for names in ties:
        shared = model.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    for k, v in tensors.items():
        if k.startswith(NONPERSISTENT):
            owner, _, attr = k[len(NONPERSISTENT):].rpartition(".")
            mod = model.get_submodule(owner)
            if attr in mod._buffers:
                mod._buffers[attr] = v
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the meta-device skeleton keeps {left[:5]}{'...' if len(left) > 5 else ''} on meta after "
                         "loading (tensors the saved file does not hold: saved by an older sparsekit, or made "
                         "outside __init__); build the model on a real device instead")


def _rebuild(name: str, spec: dict, tensors: dict[str, torch.Tensor], weights: Path):
    prefix = f"{name}." if name else ""

    def get(key: str) -> torch.Tensor:
        if prefix + key not in tensors:
            raise ValueError(f"{weights} has no tensor {prefix + key!r}, which the spec's {spec.get('class')} "
                             f"{name!r} needs: a damaged or mismatched save")
        return tensors[prefix + key]

    shape = tuple(spec["weight_shape"])
    fmt = spec["format"]
    if fmt == "dense":
        weight = get("weight2d")
    elif fmt == "bsr":
        weight = BSR(values=get("values"), crow_indices=get("crow_indices"), col_indices=get("col_indices"),
                     shape=shape)
        if "block" in spec and list(weight.block) != list(spec["block"]):
            raise ValueError(f"{name}: the spec records block {spec['block']} but the stored values hold "
                             f"{list(weight.block)} blocks")
    elif fmt == "csr":
        weight = CSR(values=get("values"), crow_indices=get("crow_indices"), col_indices=get("col_indices"),
                     shape=shape, bitmap=get("bitmap") if spec.get("bitmap") else None)
    elif fmt == "nm":
        n, m = spec["nm"]
        weight = NM(values=get("values"), indices=get("indices"), shape=shape, n=n, m=m)
    elif fmt == "channel":
        weight = ChannelIndex(values=get("values"), indices=get("indices"), shape=shape, dim=0)
    else:
        raise ValueError(f"{name}: unknown format {fmt!r} in the spec")
    if not isinstance(weight, torch.Tensor) and not weight.values.is_meta:  # (meta tensors hold no indices to check)
        weight.validate()
    bias = get("bias") if spec["has_bias"] else None
    backend = spec.get("backend")
    if backend is not None and backend not in BACKENDS:
        warnings.warn(f"{name}: backend {backend!r} was forced when saving but this sparsekit does not know it "
                      f"(known: {', '.join(BACKENDS)}); letting the dispatcher choose", RuntimeWarning, stacklevel=3)
        backend = None
    if backend is not None and BACKENDS[backend].environment_reasons():
        warnings.warn(f"{name}: backend {backend!r} was forced when saving but cannot run here "
                      f"({'; '.join(BACKENDS[backend].environment_reasons())}); letting the dispatcher choose",
                      RuntimeWarning, stacklevel=3)
        backend = None
    if spec["class"] == "SparseLinear":
        return SparseLinear(weight, bias, fmt, backend)
    transposed = {c.__name__: c for c in (SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d)}
    if spec["class"] in transposed:      # (a ConvTranspose1d's saved geometry is its 2-D one)
        return transposed[spec["class"]](weight, bias, fmt, tuple(spec["kernel_size"]), tuple(spec["stride"]),
                                         tuple(spec["padding"]), tuple(spec["output_padding"]),
                                         tuple(spec["dilation"]), backend, spec.get("groups", 1))
    convs = {"SparseConv1d": SparseConv1d, "SparseConv2d": SparseConv2d, "SparseConv3d": SparseConv3d}
    if spec["class"] not in convs:
        raise ValueError(f"{name}: the spec names class {spec['class']!r}; this sparsekit knows SparseLinear, "
                         f"{', '.join(transposed)}, "
                         f"{', '.join(convs)}")
    conv = convs[spec["class"]]    # (a Conv1d's saved geometry is its 2-D one)
    return conv(weight, bias, fmt, spec["in_channels"], tuple(spec["kernel_size"]), tuple(spec["stride"]),
                        tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"], backend)


def _check_no_hf_conv1d(model: nn.Module, spec: dict, src: Path) -> None:
    """A GPT-2-style save holds nn.Linear / Sparse* layers where the fresh model has transformers' Conv1D (whose
    weight is the transposed one: a square one would load silently wrong)."""
    found = []
    for name in (*spec["modules"], *(spec.get("widths") or {})):   # (the saved Linears: sparse, then all by width)
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue     # (reported below, by name)
        if _is_hf_conv1d(mod) and name not in found:
            found.append(name)
    if found:
        more = ", ..." if len(found) > 3 else ""
        raise ValueError(f"model has Hugging Face Conv1D layers ({', '.join(found[:3])}{more}) where the save at "
                         f"{src} holds nn.Linear layers: it was converted with "
                         "sparsekit.nn.conv1d_to_linear; convert the skeleton the same way: "
                         "sk.load(path, sparsekit.nn.conv1d_to_linear(Model(config)))")


def load(path: str | os.PathLike, model: nn.Module, map_location: str | torch.device = "cpu") -> nn.Module:
    """Re-apply a saved spec and weights to ``model`` (a fresh instance of the original class); returns it.
    A saved Sparse* layer is rebuilt and returned itself (``model``: an instance of its class or of the dense
    layer it replaced, e.g. ``nn.Linear(768, 3072)``).

    ``model`` may be built on the meta device (``with torch.device("meta"): model = Model()``): the saved
    tensors are then assigned instead of copied, so no dense weight is ever allocated in the loading process
    (``bench/bench_memory.py`` measures the peak RSS this saves). Otherwise ``model`` is moved to
    ``map_location`` first, so that the whole model (unsaved buffers included) ends there. A rebuilt layer trains
    what the skeleton's layer trained (a frozen one stays frozen), in its train / eval mode and with its hooks.
    A damaged or mismatched save is a ValueError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a fresh instance of the saved class), got {type(model).__name__}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"map_location must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
                         f"got {map_location!r}") from exc
    src = Path(path)
    if not (src / SPEC_FILE).is_file() or not (src / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"path must be a directory written by sparsekit.save (with {SPEC_FILE} and "
                                f"{WEIGHTS_FILE}), got {str(src)!r}")
    try:
        spec = json.loads((src / SPEC_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{src / SPEC_FILE} is not valid JSON ({exc}): a damaged save; write it again with "
                         "sparsekit.save") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("modules"), dict):
        raise ValueError(f"{src / SPEC_FILE} must hold a sparsekit.save spec (a JSON object with a 'modules' "
                         f"object), got {type(spec).__name__}")
    if spec.get("sparsekit_spec") not in READABLE_SPECS:
        raise ValueError(f"unsupported spec version {spec.get('sparsekit_spec')!r} (this sparsekit reads "
                         f"{', '.join(map(str, READABLE_SPECS))})")
    root = spec["modules"].get("")     # the saved model is itself a Sparse* layer
    given = type(model).__name__
    if root is not None and isinstance(model, SPARSE_LAYERS) and not isinstance(model, SPARSE_MODULES):
        given = sparse_class(model).__name__   # its dense original names the class too
    if spec.get("model_class") not in (None, given):
        raise TypeError(f"model is a {type(model).__name__} but the saved model was a {spec['model_class']}")
    try:
        tensors = load_file(str(src / WEIGHTS_FILE), device=str(device))
    except SafetensorError as exc:
        raise ValueError(f"{src / WEIGHTS_FILE} cannot be read ({exc}): a damaged or truncated save; write it again "
                         "with sparsekit.save") from exc
    _check_no_hf_conv1d(model, spec, src)
    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))  # (the skeleton, before rebuilding)
    if spec.get("widths"):
        from .prune.compact import apply_widths  # re-create compacted layer widths in the fresh instance
        apply_widths(model, spec["widths"])
    for name, mspec in spec["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the saved spec has a sparse module {name!r} that the given model lacks") from None
        if mspec["class"] in _CONVERTED:
            mod, cls = model.get_submodule(name), _CONVERTED[mspec["class"]]
            if isinstance(mod, cls):    # a skeleton converted by sk.nn.mha_to_linear / rnn_to_linear already
                mod.sparsify_converted = bool(mspec.get("sparsify_converted", False))
                continue
            new = cls.from_module(mod)   # (its children follow)
            new.sparsify_converted = bool(mspec.get("sparsify_converted", False))
        else:
            old = model.get_submodule(name)
            new = _rebuild(name, mspec, tensors, src / WEIGHTS_FILE)
            if isinstance(old, (*SPARSE_LAYERS, *SPARSE_MODULES)):
                # what the skeleton's layer trains (a backbone its __init__ froze stays frozen), its train / eval
                # mode and its hooks
                _same_trainability(new, old)
        if not name:      # a saved Sparse* layer: the rebuilt one is the model (returned instead of ``model``)
            model = new
            continue
        for alias in (name, *mspec.get("aliases", [])):
            set_submodule(model, alias, new)
    disable_fused_transformer_paths(model)
    if on_meta:
        _assign_meta_skeleton(model, tensors, spec.get("state_dict_metadata"))
        return model
    model.to(device)      # move, then copy: tied weights stay tied and non-persistent buffers follow
    saved = _with_metadata(tensors, spec.get("state_dict_metadata"))
    _saved_ties(model, saved)
    # each tensor in its saved dtype (rebuilt sparse layers have it already); non-persistent buffers keep the
    # values __init__ gave them, in the dtype they were saved in
    dtypes = {k: v.dtype for k, v in saved.items()} | {k[len(NONPERSISTENT):]: v.dtype for k, v in tensors.items()
                                                         if k.startswith(NONPERSISTENT)}
    for k, t in (*model.state_dict(keep_vars=True).items(), *_nonpersistent(model).items()):
        if k in dtypes and t.is_floating_point() and dtypes[k] != t.dtype:
            t.data = t.data.to(dtypes[k])
    model.load_state_dict(saved, strict=True)
    return model
