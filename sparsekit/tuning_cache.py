"""The tuning cache of sparsify decisions: which format won for a layer, keyed by what decides it.

Key = device (type and name), the kernel switches set (``kernel_switches``), dtype, layer kind and geometry, the
layer's real input shape, the weight's pattern statistics (rounded) and the revision of sparsekit's code
(``code_revision``), so that a second sparsify of the same model — or of another model with the same layer — is
near-instant, while an upgrade or rebuild that changes the kernels measures again. Stored as JSON (human-readable,
no pickling).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

try:  # advisory lock between processes sharing the file (POSIX); elsewhere the unique temp file still keeps
    import fcntl  # every write whole, and the merge before replacing keeps most concurrent entries
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_FILE = "sparsify.json"


def default_path() -> Path:
    """``$SPARSEKIT_CACHE_DIR/sparsify.json`` (read per call), else ``~/.cache/sparsekit/sparsify.json``."""
    return Path(os.environ.get("SPARSEKIT_CACHE_DIR") or Path.home() / ".cache" / "sparsekit").expanduser() / CACHE_FILE


def device_name(device: torch.device) -> str:
    """The device as tuning decisions depend on it; on CPU the model and its cache sizes (a VM may name its CPU
    just 'AMD EPYC'), the thread count and the instruction set the CPU kernels run with (``SPARSEKIT_CPU_ISA``,
    AMX), so a decision measured on another machine or under other kernels is not reused."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from .benchmark.machine import _cpu_caches, _cpu_model
    from .info import _cpu_kernel_isa

    return f"cpu:{_cpu_model()} ({_cpu_caches()}):{torch.get_num_threads()}t:{_cpu_kernel_isa() or 'no-ext'}"


# Switches that change which kernels serve the same layer (read per call by the kernels or the dispatcher): a
# decision measured under other settings is measured again, not reused.
KERNEL_SWITCHES = ("SPARSEKIT_BSR_TC", "SPARSEKIT_NM_SP", "SPARSEKIT_CSR_SKINNY", "SPARSEKIT_CHANNEL_CONV_TC",
                   "SPARSEKIT_TRITON_CONFIGS", "SPARSEKIT_TRITON_AUTOTUNE")


def kernel_switches(device: torch.device) -> dict[str, object]:
    """The KERNEL_SWITCHES set in the environment and whether the dispatcher measures backends on ``device``'s
    type (``SPARSEKIT_MEASURE_BACKENDS`` / ``set_measure``), for the tuning key."""
    from .ops._dispatch import measure_enabled

    switches = {**{k: os.environ[k] for k in KERNEL_SWITCHES if k in os.environ},
                "measure": measure_enabled(device.type)}
    if device.type == "cuda":   # fp32 products (cuBLAS, cuDNN, the Triton kernels' input precision) follow these
        switches.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                        fp32_precision=torch.get_float32_matmul_precision())
    return switches


@functools.cache
def code_revision() -> str:
    """A digest of the code that decides a layer's times: sparsekit's Python sources (dispatch, Triton kernels),
    the built extension's bytes and the installed torch / Triton versions. A decision measured under other code
    is measured again, not reused: a cached "dense" for a layer a newer kernel runs faster would hide the gain
    (``TuningCache.save`` keeps the entries of the few most recent revisions, so the file does not grow with
    every upgrade)."""
    digest = hashlib.sha1()
    package = Path(__file__).resolve().parent
    roots = [package]
    spec = importlib.util.find_spec("sparsekit.kernels")   # kernels/ outside the package in a development checkout
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p).resolve() for p in spec.submodule_search_locations]
    for root in dict.fromkeys(roots):
        for f in sorted(root.rglob("*.py")):
            digest.update(f.relative_to(root).as_posix().encode())
            digest.update(f.read_bytes())
    digest.update(f"torch={torch.__version__}".encode())     # the dense baseline and the Triton kernels are theirs
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        digest.update(f"triton={importlib.metadata.version('triton')}".encode())
    for f in sorted(package.glob("_C*")):   # its bytes, not its mtime: a reinstall of the same build keeps the cache
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


KEEP_REVISIONS = 4   # code revisions whose entries a saved cache keeps (other installs may share the file)


def _revision(key: str) -> str | None:
    """The code revision a sparsify key was measured under (None for keys without one)."""
    try:
        parts = json.loads(key)
    except ValueError:
        return None
    return parts.get("code") if isinstance(parts, dict) else None


def _recent_revisions(entries: dict[str, dict]) -> dict[str, dict]:
    """``entries`` less those of all but the KEEP_REVISIONS most recently used code revisions (the current one
    always kept): entries of an older install are never looked up again, but a file several installs share
    should not lose the others' entries on every save either."""
    newest: dict[str, float] = {}
    for key, entry in entries.items():
        rev = _revision(key)
        if rev is not None:
            saved = entry.get("saved")
            saved = float(saved) if isinstance(saved, (int, float)) and not isinstance(saved, bool) else 0.0
            saved = saved if math.isfinite(saved) else 0.0
            newest[rev] = max(newest.get(rev, 0.0), saved)
    newest[code_revision()] = float("inf")
    keep = {None, *sorted(newest, key=newest.get, reverse=True)[:KEEP_REVISIONS]}   # None: keys without one
    return {k: v for k, v in entries.items() if _revision(k) in keep}


def _valid_entry(entry: object) -> bool:
    """An entry sparsify can use: {"times_ms": {label: finite ms > 0, ..., "dense": ...}, "notes": [str, ...]}."""
    if not isinstance(entry, dict):
        return False
    times, notes = entry.get("times_ms"), entry.get("notes", [])
    return (isinstance(times, dict) and "dense" in times
            and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0 for k, v in times.items())
            and isinstance(notes, list) and all(isinstance(n, str) for n in notes))


def _read_entries(path: Path, warn: bool = True) -> dict[str, dict]:
    """The valid entries of the cache file at ``path``; a missing file is empty, a corrupt one (undecodable, not
    JSON, not an object of entries) or corrupt entries are dropped, with a warning naming the file (if ``warn``):
    a lost cache only costs the measuring again."""
    problem = None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        data, problem = {}, f"is unreadable ({type(exc).__name__}: {exc}); starting with an empty cache"
    if not isinstance(data, dict):
        problem = f"holds a JSON {type(data).__name__}, expected an object of entries; starting with an empty cache"
        data = {}
    entries = {k: v for k, v in data.items() if _valid_entry(v)}
    if len(entries) < len(data):
        problem = (f"has {len(data) - len(entries)} malformed entries (expected {{'times_ms': {{..., 'dense': ms}}, "
                   "'notes': [...]}); dropped them")
    if warn and problem:
        warnings.warn(f"sparsify tuning cache {str(path)!r} {problem}", RuntimeWarning, stacklevel=3)
    return entries


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` + ".lock" (where fcntl exists) for a read-merge-replace."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TuningCache:
    """A dict of decisions, optionally backed by a JSON file (``path=None`` keeps it in memory only).

    Several processes may share the file: ``save`` merges this cache's entries into what the file holds now,
    under a lock, and replaces it atomically (a reader sees the old or the new file, never half of one)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        if self.path is not None:
            self.entries = _read_entries(self.path)

    @staticmethod
    def key(parts: dict) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> dict | None:
        hit = self.entries.get(key)
        if hit is not None:   # last used now: a revision still in use is not dropped as old (_recent_revisions)
            hit["saved"] = time.time()
        return hit

    def put(self, key: str, decision: dict) -> None:
        self.entries[key] = {**decision, "saved": time.time()}   # when: old revisions are dropped by age

    def save(self) -> None:
        """Write the entries to the file (merged with what other processes saved); a file that cannot be written
        costs only the measuring next time: a RuntimeWarning says so, the entries stay in memory."""
        if self.path is None:
            return
        try:
            self._save()
        except OSError as exc:
            warnings.warn(f"sparsify tuning cache {str(self.path)!r} could not be written ({type(exc).__name__}: "
                          f"{exc}); the decisions were kept in memory only", RuntimeWarning, stacklevel=2)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            # entries other processes saved since this cache was read are kept (ours win on the same key), those
            # of old code revisions are not
            merged = {**_read_entries(self.path, warn=False), **self.entries}  # (warned when read)
            self.entries = _recent_revisions(merged)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                os.chmod(tmp, 0o644)     # (mkstemp's 0600 would keep other installs sharing the file out)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.entries, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def resolve_cache(cache: object) -> TuningCache:
    """cache=None -> the default file (``default_path``); False -> in memory only; a path -> that file (``~``
    expanded; an existing directory -> its ``sparsify.json``); a TuningCache -> itself."""
    if isinstance(cache, TuningCache):
        return cache
    if cache is None:
        return TuningCache(default_path())
    if cache is False:
        return TuningCache(None)
    if isinstance(cache, (str, os.PathLike)):
        path = Path(cache).expanduser()
        if str(cache) == "":
            raise ValueError("cache: an empty path; expected a file or directory path, None or False")
        return TuningCache(path / CACHE_FILE if path.is_dir() else path)
    raise TypeError(f"cache must be None (default file), False (memory only), a path or a TuningCache, "
                    f"got {type(cache).__name__}")
