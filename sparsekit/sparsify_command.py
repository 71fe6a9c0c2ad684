"""`sparsekit sparsify`: load a saved model, sparsify it on this machine, save the result."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree


# ------------------------------------------------------------------ argument types (argparse -> parser.error)
def formats_arg(text: str) -> tuple[str, ...]:
    """--formats: a comma-separated subset of sparsekit.nn.FORMAT_NAMES."""
    from .nn import FORMAT_NAMES

    names = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in names if f not in FORMAT_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(FORMAT_NAMES)}, "
                                         f"got {text!r}")
    return names


def min_speedup_arg(text: str) -> float:
    """--min-speedup: a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1.1, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number such as 1.1, got {text!r}")
    return value


def json_object_arg(text: str) -> dict:
    """--model-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dim\": 64}}', got {text!r} "
                                         f"({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dim\": 64}}', got {text!r}")
    return value


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _build_model(spec: str, kwargs: dict | None) -> nn.Module:
    kwargs = kwargs or {}
    # (a constructor refusing the kwargs raises TypeError / ValueError: name both options, not a traceback)
    given = f"--model {spec!r}" + (f" with --model-kwargs {json.dumps(kwargs)}" if kwargs else "")
    if ":" in spec:   # "package.module:Class"
        mod_name, _, cls_name = spec.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:  # (the console script lacks it; python -m has it)
            sys.path.insert(0, os.getcwd())
        try:   # (an empty module name, ":Foo", is a ValueError)
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise SystemExit(f"sparsekit sparsify: --model {spec!r} could not be imported ({exc}); expected "
                             "package.module:Class") from None
        try:
            model = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"sparsekit sparsify: {given} could not be built ({exc})") from None
    else:
        from . import models

        try:
            model = models.build(spec, **kwargs)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"sparsekit sparsify: {given}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SystemExit(f"sparsekit sparsify: --model {spec!r} must build an nn.Module, got {type(model).__name__}")
    return model


def _match_dtypes(model: nn.Module, state: Mapping) -> None:
    """Give ``model`` the checkpoint's floating dtypes before loading it (load_state_dict would cast an fp16 / bf16
    checkpoint to the fresh model's fp32 and the model would be measured and saved in fp32), as sk.load does."""
    floating = {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if len(floating) == 1:   # the usual case (model.half()): non-persistent buffers follow too
        model.to(next(iter(floating)))
    own = model.state_dict(keep_vars=True)
    for k, v in state.items():   # a mixed checkpoint (fp32 norms beside bf16 weights): each tensor its own dtype
        t = own.get(k)
        if isinstance(v, torch.Tensor) and isinstance(t, torch.Tensor) and v.is_floating_point() \
                and t.is_floating_point() and t.dtype != v.dtype:
            t.data = t.data.to(v.dtype)


def _load_weights(model: nn.Module, path: Path) -> nn.Module:
    from .serialize import SPEC_FILE, load

    if not path.exists():
        raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} does not exist; expected a sparsekit.save "
                         "directory, a .safetensors or a .pt/.pth state_dict")
    if path.is_dir() and (path / SPEC_FILE).is_file():
        from safetensors import SafetensorError

        try:
            return load(path, model)
        except (SafetensorError, json.JSONDecodeError, AttributeError, KeyError) as exc:
            raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} is not a readable sparsekit.save directory "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} does not load into --model "
                             f"({_first_line(exc)})") from None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} could not be read as safetensors "
                             f"({_first_line(exc)})") from None
    elif path.suffix in (".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # (a whole pickled module: its classes are not among the weights-only unpickler's allowed globals)
            why = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)", str(exc))
            reason = why.group(1) if why else _first_line(exc)
            advice = ("save model.state_dict() rather than the whole module (or use a .safetensors file)"
                      if "Unsupported global" in str(exc) else "the file may be damaged or not a torch.save file")
            raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} is not a weights-only state_dict "
                             f"({reason}); {advice}") from None
        except (RuntimeError, OSError, EOFError) as exc:
            raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} could not be read by torch.load "
                             f"({_first_line(exc)})") from None
    else:
        raise SystemExit(f"sparsekit sparsify: WEIGHTS must be a sparsekit.save directory, a .safetensors or a "
                         f".pt/.pth state_dict, got {str(path)!r}")
    if not isinstance(state, Mapping):
        raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} must hold a state_dict (a dict of tensors), "
                         f"got {type(state).__name__}")
    _match_dtypes(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:   # missing / unexpected keys, other shapes: the wrong --model or --model-kwargs
        # (its first line only says "Error(s) in loading state_dict": the keys follow)
        said = " ".join(str(exc).split())
        said = said if len(said) <= 400 else said[:400] + " ..."
        raise SystemExit(f"sparsekit sparsify: WEIGHTS {str(path)!r} does not fit --model ({said}); check --model "
                         "and --model-kwargs") from None
    return model


def _example_input(model: nn.Module, batch: int | None, shape: str | None) -> torch.Tensor:
    """``--input-shape`` (batch included) as random values, else the model's ``example_input(batch)``; floating
    inputs in the model's dtype and on its device."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if shape:
        if batch is not None:
            raise SystemExit("sparsekit sparsify: --batch and --input-shape both given; the shape's first entry is "
                             "the batch")
        try:
            dims = [int(s) for s in shape.split(",")]
        except ValueError:
            dims = []
        if not dims or any(d <= 0 for d in dims):
            raise SystemExit(f"sparsekit sparsify: --input-shape must be comma-separated positive ints such as "
                             f"8,3,224,224, got {shape!r}")
        x = torch.randn(*dims)
    elif hasattr(model, "example_input"):
        x = model.example_input(8 if batch is None else batch)
    else:
        raise SystemExit("sparsekit sparsify: the model has no example_input(); pass --input-shape B,C,H,W")
    if ref is None:
        return x
    # (example_input may give a tuple or dict of tensors: each floating one follows the model)
    return pytree.tree_map(lambda t: t.to(ref.device, ref.dtype) if isinstance(t, torch.Tensor)
                           and t.is_floating_point() else t, x)


def add_sparsify_parser(sub) -> None:
    from .benchmark.command import _positive_int

    p = sub.add_parser("sparsify", help="measure formats per layer for a saved model (a sparsekit.save directory "
                                        "is measured again on this machine) and save the fast model")
    p.add_argument("weights", type=Path, help="sparsekit.save directory, .safetensors or .pt state_dict")
    p.add_argument("--model", required=True, help="a sparsekit.models name (see sparsekit.models.available()) "
                                                  "or package.module:Class")
    p.add_argument("--model-kwargs", type=json_object_arg, default=None,
                   help="JSON object of constructor arguments")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="batch of the model's example_input() (default 8)")
    p.add_argument("--input-shape", default=None,
                   help="example input shape, batch first, e.g. 8,3,224,224 (random values in the model's dtype)")
    p.add_argument("--formats", type=formats_arg, default=None,
                   help="comma-separated subset of dense,bsr,csr,nm,channel (default: all)")
    p.add_argument("--min-speedup", type=min_speedup_arg, default=1.1,
                   help="a sparse format must beat dense by this factor to be kept (default 1.1)")
    p.add_argument("--exact", action="store_true", help="only formats storing exactly the nonzeros")
    p.add_argument("--out", type=Path, required=True, help="directory for the sparsified model (sparsekit.save)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .serialize import save
    from .sparsify import sparsify

    _check_out(args.out)         # (before minutes of measuring)
    model = _load_weights(_build_model(args.model, args.model_kwargs), args.weights).eval()
    x = _example_input(model, args.batch, args.input_shape)
    try:
        fast, report = sparsify(model, x, formats=args.formats, min_speedup=args.min_speedup, exact=args.exact)
    except ValueError as exc:
        if "example_inputs" not in str(exc):
            raise
        given = "--input-shape" if args.input_shape else "--batch / the model's example_input()"
        raise SystemExit(f"sparsekit sparsify: the model did not run on the example input of shape "
                         f"{tuple(x.shape)} ({given}): {_first_line(exc)}") from None
    save(fast, args.out)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report)
    print(f"saved to {args.out}", file=sys.stderr if args.json else sys.stdout)   # (stdout stays JSON)
    return 0


def _check_out(out: Path, command: str = "sparsekit sparsify") -> None:
    """--out must be a directory this process can write (created if needed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise SystemExit(f"{command}: --out {str(out)!r} is not a writable directory "
                         f"({type(exc).__name__}: {exc.strerror or exc})") from None
