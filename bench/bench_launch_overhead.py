"""Where a sparse call's time goes on a GPU: the kernels alone against the whole call, shape by shape.

    python bench/bench_launch_overhead.py --out gpu_out/results                  # CUDA only
    python bench/bench_launch_overhead.py --backends triton,cuda --sparsity 0.9 --blocks 32,64

For each shape, block size and sparsity (32x32 blocks by default, fp16) it times, in one run, the dense F.linear
(cuBLAS) and the sparse op ``sk.ops.bsr_linear(x, w, backend=b)`` for each backend (and, for triton, its launcher
``kernels/k_bsr_mm.bsr_mm`` called directly), three ways:

    kernel  GPU time of the kernels a call launches (torch.profiler), median over the calls
    call    CUDA events around back-to-back calls, per call: what the layer costs in an eager model
    host    wall time per call on the CPU side (Python, argument checks, launches)

A call whose host time exceeds its kernel time is host-bound: the GPU waits for Python, and the speedup the
kernel has over cuBLAS does not reach the model (the first H100 session found every layer under ~0.2 ms so:
bench/results/gpu_session_20261123/README.md). Writes <out>/launch_overhead_<machine>_<date>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsekit as sk
from sparsekit.benchmark.machine import script_results

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# (name, M, N, K): the BERT-base MLP at a 4096-token batch, LLaMA-7B's attention projection at decode M = 16, and
# the square 4096 GEMM
SHAPES = [("bert-base.mlp_down", 4096, 768, 3072), ("bert-base.mlp_up", 4096, 3072, 768),
          ("llama-7b.attn_proj (decode)", 16, 4096, 4096), ("square.4096", 4096, 4096, 4096)]


def block_sparse(n: int, k: int, block: int, sparsity: float, dtype: torch.dtype, seed: int) -> sk.formats.BSR:
    """A BSR weight with ``sparsity`` of its blocks zero (chosen uniformly at random)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(n // block, k // block, generator=g, device="cuda") >= sparsity
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    dense = torch.randn(n, k, generator=g, device="cuda") * mask
    return sk.formats.BSR.from_dense(dense.to(dtype), (block, block))


def kernel_us(fn: Callable[[], object], calls: int) -> float:
    """Median GPU time per call of the kernels ``fn`` launches (every CUDA kernel of one call summed)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / calls


def call_and_host_us(fn: Callable[[], object], calls: int, reps: int) -> tuple[float, float]:
    """(CUDA-event time per call, host wall time per call) over ``calls`` back-to-back calls, medians of ``reps``."""
    events, hosts = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        hosts.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
        events.append(start.elapsed_time(end) / calls * 1e3)
    return statistics.median(events), statistics.median(hosts)


def run(sparsities: list[float], backends: list[str], dtype: torch.dtype, block: int = 32, calls: int = 100,
        reps: int = 5, shapes: list[tuple[str, int, int, int]] | None = None, rows: list | None = None) -> list[dict]:
    """The rows, appended to ``rows`` as they are measured (a caller stopped midway keeps what was done); a
    candidate that raises gets a row with its error instead of times."""
    from sparsekit.kernels import k_bsr_mm

    rows = [] if rows is None else rows
    for name, m, n, k in shapes or SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w_dense = torch.randn(n, k, device="cuda", dtype=dtype)
        for sparsity in sparsities:
            w = block_sparse(n, k, block, sparsity, dtype, seed=m + n + k)
            candidates: dict[str, Callable[[], object]] = {"dense (cuBLAS)": lambda x=x, wd=w_dense: F.linear(x, wd)}
            for b in backends:
                candidates[f"sk.ops {b}"] = lambda x=x, w=w, b=b: sk.ops.bsr_linear(x, w, None, backend=b)
                if b == "triton":
                    candidates["triton launcher"] = lambda x=x, w=w, n=n: k_bsr_mm.bsr_mm(
                        x, w.crow_indices, w.col_indices, w.values, None, n)
            for label, fn in candidates.items():
                row = {"shape": name, "M": m, "N": n, "K": k, "block": block, "sparsity": sparsity, "candidate": label}
                try:
                    for _ in range(10):   # compile / first-use checks / autotuning out of the way
                        fn()
                    call, host = call_and_host_us(fn, calls, reps)
                    kern = kernel_us(fn, min(calls, 20))
                except (RuntimeError, ValueError, TypeError) as exc:   # e.g. a backend refusing the shape
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
                    print(f"{name:28s} {block:3d} {sparsity:4.2f} {label:16s} not measured: {rows[-1]['error']}",
                          flush=True)
                    continue
                rows.append({**row, "kernel_us": kern, "call_us": call, "host_us": host, "host_bound": host > kern})
                print(f"{name:28s} {block:3d} {sparsity:4.2f} {label:16s} kernel {kern:8.1f} us  call {call:8.1f} us  "
                      f"host {host:8.1f} us{'  host-bound' if host > kern else ''}", flush=True)
    return rows


def markdown(rows: list[dict], where: str, stamp: str, dtype: str) -> str:
    lines = [f"# Kernel time against call time, {dtype}", "", f"{where}; {stamp} UTC", "",
             "| shape (M x N x K) | block | sparsity | candidate | kernel us | call us | host us | host-bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['shape']} ({r['M']} x {r['N']} x {r['K']}) | {r.get('block', 32)}x{r.get('block', 32)} | "
                f"{r['sparsity']:.0%} | {r['candidate']} |")
        if "error" in r:
            lines.append(f"{head} not measured: {r['error'][:120]} | | | |")
            continue
        lines.append(f"{head} {r['kernel_us']:.1f} | {r['call_us']:.1f} | {r['host_us']:.1f} | "
                     f"{'yes' if r['host_bound'] else 'no'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", default="0.5,0.9", help="comma-separated block sparsities (default 0.5,0.9)")
    p.add_argument("--backends", default="triton", help="comma-separated sk.ops backends (default triton)")
    p.add_argument("--blocks", default="32", help="comma-separated square block sides (default 32)")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--calls", type=int, default=100, help="back-to-back calls per timing (default 100)")
    p.add_argument("--reps", type=int, default=5, help="timings per candidate, median taken (default 5)")
    p.add_argument("--out", default=str(RESULTS), help="results directory (default bench/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_launch_overhead.py: needs a CUDA GPU (it times GPU kernels against their host time)",
              file=sys.stderr)
        return 2
    try:
        sparsities = [float(s) for s in a.sparsity.split(",")]
    except ValueError:
        p.error(f"--sparsity must be comma-separated numbers, got {a.sparsity!r}")
    if not all(0.0 <= s < 1.0 for s in sparsities):
        p.error(f"--sparsity values must be in [0, 1), got {a.sparsity!r}")
    backends = [b for b in a.backends.split(",") if b]
    try:
        blocks = [int(b) for b in a.blocks.split(",")]
    except ValueError:
        p.error(f"--blocks must be comma-separated ints, got {a.blocks!r}")
    if not all(b in (16, 32, 64, 128) for b in blocks):
        p.error(f"--blocks must be among 16, 32, 64, 128 (they divide every shape), got {a.blocks!r}")
    rows: list[dict] = []
    try:
        for block in blocks:
            run(sparsities, backends, DTYPES[a.dtype], block=block, calls=a.calls, reps=a.reps, rows=rows)
    finally:   # stopped at a time limit (SIGINT): what was measured is still written
        base, info, stamp, where = script_results(a.out, "launch_overhead", "cuda")
        base.with_suffix(".json").write_text(json.dumps({"machine": info, "dtype": a.dtype, "rows": rows}, indent=1))
        base.with_suffix(".md").write_text(markdown(rows, where, stamp, a.dtype))
        print(f"results: {base}.json / .md ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
