"""The tuning cache of sparsify decisions: which format won for a layer, keyed by what decides it.

Key = device (type and name), dtype, layer kind and geometry, the layer's real input shape, and the weight's
pattern statistics (rounded), so that a second sparsify of the same model — or of another model with the same
layer — is near-instant. Stored as JSON (human-readable, no pickling).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEFAULT_PATH = Path(os.environ.get("SPARSEKIT_CACHE_DIR", Path.home() / ".cache" / "sparsekit")) / "sparsify.json"


def device_name(device: torch.device) -> str:
    """The device as tuning decisions depend on it; on CPU the model, the thread count and the instruction set the
    CPU kernels run with (``SPARSEKIT_CPU_ISA``, AMX), so a decision measured under other kernels is not reused."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from .info import _cpu_kernel_isa, _cpu_model

    return f"cpu:{_cpu_model()}:{torch.get_num_threads()}t:{_cpu_kernel_isa() or 'no-ext'}"


class TuningCache:
    """A dict of decisions, optionally backed by a JSON file (``path=None`` keeps it in memory only)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a corrupt cache is only a lost speed-up: start over

    @staticmethod
    def key(parts: dict) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, decision: dict) -> None:
        self.entries[key] = decision

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        tmp.replace(self.path)


def resolve_cache(cache: object) -> TuningCache:
    """cache=None -> the default file; False -> in memory only; a path -> that file; a TuningCache -> itself."""
    if isinstance(cache, TuningCache):
        return cache
    if cache is None:
        return TuningCache(DEFAULT_PATH)
    if cache is False:
        return TuningCache(None)
    if isinstance(cache, (str, os.PathLike)):
        return TuningCache(cache)
    raise TypeError(f"cache must be None (default file), False (memory only), a path or a TuningCache, "
                    f"got {type(cache).__name__}")
