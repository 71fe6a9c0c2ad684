"""`sparsekit sparsify`: load a saved model, sparsify it on this machine, save the result."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
from torch import nn


def _build_model(spec: str, kwargs_json: str | None) -> nn.Module:
    kwargs = json.loads(kwargs_json) if kwargs_json else {}
    if not isinstance(kwargs, dict):
        raise SystemExit(f"sparsekit sparsify: --model-kwargs must be a JSON object, got {kwargs_json!r}")
    if ":" in spec:   # "package.module:Class"
        mod_name, _, cls_name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"sparsekit sparsify: --model {spec!r} could not be imported ({exc})") from None
        return cls(**kwargs)
    from . import models

    try:
        return models.build(spec, **kwargs)
    except ValueError as exc:
        raise SystemExit(f"sparsekit sparsify: --model {spec!r}: {exc}") from None


def _load_weights(model: nn.Module, path: Path) -> nn.Module:
    from .serialize import SPEC_FILE, load

    if path.is_dir() and (path / SPEC_FILE).is_file():
        return load(path, model)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise SystemExit(f"sparsekit sparsify: WEIGHTS must be a sparsekit.save directory, a .safetensors or a "
                         f".pt/.pth state_dict, got {str(path)!r}")
    model.load_state_dict(state)
    return model


def _example_input(model: nn.Module, batch: int, shape: str | None) -> torch.Tensor:
    if shape:
        try:
            dims = [int(s) for s in shape.split(",")]
        except ValueError:
            raise SystemExit(f"sparsekit sparsify: --input-shape must be comma-separated ints, got {shape!r}") from None
        return torch.randn(*dims)
    if hasattr(model, "example_input"):
        return model.example_input(batch)
    raise SystemExit("sparsekit sparsify: the model has no example_input(); pass --input-shape B,C,H,W")


def add_sparsify_parser(sub) -> None:
    p = sub.add_parser("sparsify", help="measure formats per layer for a saved model and save the fast model")
    p.add_argument("weights", type=Path, help="sparsekit.save directory, .safetensors or .pt state_dict")
    p.add_argument("--model", required=True, help="a sparsekit.models name (see sparsekit.models.available()) "
                                                  "or package.module:Class")
    p.add_argument("--model-kwargs", default=None, help="JSON object of constructor arguments")
    p.add_argument("--batch", type=int, default=8, help="batch of the example input (default 8)")
    p.add_argument("--input-shape", default=None, help="example input shape, e.g. 8,3,224,224")
    p.add_argument("--formats", default=None, help="comma-separated subset of dense,bsr,csr,nm,channel")
    p.add_argument("--min-speedup", type=float, default=1.1)
    p.add_argument("--exact", action="store_true", help="only formats storing exactly the nonzeros")
    p.add_argument("--out", type=Path, required=True, help="directory for the sparsified model (sparsekit.save)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .serialize import save
    from .sparsify import sparsify

    model = _load_weights(_build_model(args.model, args.model_kwargs), args.weights).eval()
    x = _example_input(model, args.batch, args.input_shape)
    formats = args.formats.split(",") if args.formats else None
    fast, report = sparsify(model, x, formats=formats, min_speedup=args.min_speedup, exact=args.exact)
    save(fast, args.out)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report)
    print(f"saved to {args.out}")
    return 0
