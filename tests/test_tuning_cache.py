"""The sparsify tuning cache file: corrupt files start empty with a warning; concurrent writers lose nothing."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.tuning_cache import TuningCache

ENTRY = {"times_ms": {"dense": 1.0, "csr": 0.5}, "notes": []}


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\xff\xfe\x00garbage", "unreadable"),
        (b'{"a": {"times_ms"', "unreadable"),
        (b"[]", "holds a JSON list"),
        (b'"x"', "holds a JSON str"),
        (b"null", "holds a JSON NoneType"),
        (b'{"k": {"times_ms": {"csr": 1.0}}}', "malformed entries"),  # no dense time
        (b'{"k": {"times_ms": {"dense": "fast"}, "notes": []}}', "malformed entries"),
        (b'{"k": []}', "malformed entries"),
        (b'{"k": {"times_ms": {"dense": 1.0, "csr": 0.0}, "notes": []}}', "malformed entries"),  # 0 ms: no ratio
    ],
)
def test_a_corrupt_cache_file_starts_empty_with_a_warning_naming_it(tmp_path, content, match):
    path = tmp_path / "sparsify.json"
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match=match) as record:
        cache = TuningCache(path)
    assert cache.entries == {} and str(path) in str(record[0].message)
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.8)
    with pytest.warns(RuntimeWarning, match="sparsify tuning cache"):
        _, report = sk.sparsify(nn.Sequential(lin), torch.randn(4, 64), cache=path, reps=2, measure_model=False)
    assert len(report.layers) == 1 and len(TuningCache(path).entries) == 1  # the file is whole again


def test_valid_entries_are_kept_next_to_malformed_ones(tmp_path):
    path = tmp_path / "sparsify.json"
    path.write_text('{"good": {"times_ms": {"dense": 1.0, "csr": 0.5}, "notes": []}, "bad": 3}')
    with pytest.warns(RuntimeWarning, match="1 malformed"):
        cache = TuningCache(path)
    assert cache.entries == {"good": ENTRY}


def test_save_merges_with_what_another_process_saved(tmp_path):
    path = tmp_path / "sparsify.json"
    first, second = TuningCache(path), TuningCache(path)
    first.put("a", ENTRY)
    first.save()
    second.put("b", ENTRY)
    second.save()
    assert set(TuningCache(path).entries) == {"a", "b"}
    assert not [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp file left behind


WRITER = textwrap.dedent("""
    import pathlib, sys, time
    from sparsekit.tuning_cache import TuningCache

    path, me, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
    pathlib.Path(f"{go}.{me}").touch()  # ready: imports done
    while not go.exists():  # start together, so that the saves overlap
        time.sleep(0.001)
    for i in range(n):
        cache = TuningCache(path)
        cache.put(f"{me}-{i}", {"times_ms": {"dense": 1.0}, "notes": ["x" * 200]})
        cache.save()
""")


def test_concurrent_writers_neither_crash_nor_lose_entries(tmp_path):
    path, go, n, writers = tmp_path / "sparsify.json", tmp_path / "go", 100, ("a", "b")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), me, str(n), str(go)], stderr=subprocess.PIPE, text=True
        )
        for me in writers
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"go.{me}").exists() for me in writers) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    entries = TuningCache(path).entries
    assert set(entries) == {f"{me}-{i}" for me in writers for i in range(n)}


def test_save_keeps_only_the_most_recent_code_revisions(tmp_path):
    """An upgrade or rebuild changes code_revision: entries of old revisions are never looked up again, so saving
    keeps those of the KEEP_REVISIONS most recently saved revisions (the current one always; keys without a
    revision too), and the file does not grow with every revision, while installs sharing it keep theirs."""
    from sparsekit import tuning_cache
    from sparsekit.tuning_cache import KEEP_REVISIONS, code_revision

    path = tmp_path / "cache.json"
    cache = TuningCache(path)
    entry = {"times_ms": {"dense": 1.0}, "notes": []}
    old = [TuningCache.key({"code": f"{i:012d}", "layer": 1}) for i in range(KEEP_REVISIONS + 1)]
    for i, key in enumerate(old):
        cache.entries[key] = {**entry, "saved": 1000.0 + i}     # old[0] is the least recently saved
    cache.put("plain", entry)
    current = TuningCache.key({"code": code_revision(), "layer": 1})
    cache.put(current, entry)
    cache.save()
    kept = set(TuningCache(path).entries)
    assert kept == {"plain", current, *old[-(KEEP_REVISIONS - 1):]}
    assert tuning_cache._revision("not json") is None
    # a hit counts as use: the least recently saved revision kept, looked up again, outlives a newer one
    cache = TuningCache(path)
    oldest_kept, next_kept = old[-(KEEP_REVISIONS - 1)], old[-(KEEP_REVISIONS - 2)]
    assert cache.get(oldest_kept) is not None
    newer = TuningCache.key({"code": "f" * 12, "layer": 1})
    cache.entries[newer] = {**entry, "saved": 2000.0}
    cache.entries[old[0]] = {**entry, "saved": float("inf")}   # corrupt (non-finite) times count as never used
    cache.save()
    kept = set(TuningCache(path).entries)
    assert oldest_kept in kept and newer in kept and next_kept not in kept and old[0] not in kept


def test_cpu_device_key_names_the_cache_sizes():
    # a VM may name its CPU just "AMD EPYC": the cache sizes tell two such machines apart in the key
    from pathlib import Path

    from sparsekit.benchmark.machine import _cpu_caches
    from sparsekit.tuning_cache import device_name

    caches = _cpu_caches()
    if Path("/sys/devices/system/cpu/cpu0/cache/index0/size").exists():
        assert caches.startswith("L1") and "L2 " in caches, caches
    assert f"({caches})" in device_name(torch.device("cpu"))
