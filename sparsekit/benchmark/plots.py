"""PNG plots of a result set (matplotlib, Agg backend, imported only here: sparsekit works without it).

    speedup_<op>_<shape>_<dtype>.png   one panel per format: speedup vs sparsity per candidate, the ideal
                                       1/(1-s) line, speedup = 1, each candidate's break-even point (diamond)
                                       and rings around noisy points (IQR > 10% of the median)
    summary_<op>_<dtype>.png           one panel per shape: the best sparsekit backend per format
    roofline_<dtype>.png               achieved vs arithmetic intensity under this run's measured peaks
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .report import break_even, group_key, is_noisy

__all__ = ["plot_results"]

_DENSE_STYLE = {"dense_compile": ("0.45", "--"), "dense_cl": ("0.65", ":"), "dense_onednn": ("0.3", "-.")}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _title(results: dict, what: str) -> str:
    meta = results.get("meta", {})
    hw = meta.get("gpu", {}).get("name") if meta.get("device") == "cuda" else \
        f"{meta.get('cpu_model', '?')} x{meta.get('threads', '?')}"
    tf32 = "TF32 on" if meta.get("tf32", {}).get("cuda.matmul.allow_tf32") else "TF32 off"
    return f"{what}\n{hw}, torch {meta.get('torch', '?')}, {tf32}, {str(meta.get('date', ''))[:10]}"


def _ideal(ax, xs: list[float]) -> None:
    import numpy as np

    lo, hi = min(xs + [0.5]), max(xs + [0.9])
    s = np.linspace(max(0.0, lo - 0.02), min(0.99, hi + 0.01), 100)
    ax.plot(s, 1.0 / (1.0 - s), color="k", ls=":", lw=1, label="ideal 1/(1-s)")
    ax.axhline(1.0, color="k", lw=0.8, alpha=0.6)


def _curve(rows: list[dict]) -> tuple[list[float], list[float]]:
    pts = sorted((r["sparsity"], r["speedup"]) for r in rows if r.get("status") == "ok" and r.get("speedup"))
    return [p[0] for p in pts], [p[1] for p in pts]


def _mark_break_even(ax, xs: list[float], ys: list[float], color) -> None:
    be = break_even(list(zip(xs, ys)))
    if be.kind == "interpolated":
        ax.plot([be.value], [1.0], marker="D", color=color, ms=6, mec="k", zorder=5)
        ax.annotate(f"{be.value:.2f}", (be.value, 1.0), textcoords="offset points", xytext=(3, -12), fontsize=7,
                    color=color)


def _speedup_figure(plt, results: dict, op: str, shape: str, dtype: str, rows: list[dict], path: Path) -> None:
    by_fmt: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_fmt[group_key(r)].append(r)
    fmts = sorted(by_fmt, key=lambda f: (f[:3], int(re.sub(r"\D", "", f.split("x")[0]) or 0)))
    fig, axes = plt.subplots(1, len(fmts), figsize=(3.6 * len(fmts) + 0.6, 3.6), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cand_color: dict[str, str] = {}
    for ax, fmt in zip(axes[0], fmts):
        fr = by_fmt[fmt]
        xs_all = sorted({r["sparsity"] for r in fr})
        _ideal(ax, xs_all)
        for cand in sorted({r["candidate"] for r in fr}):
            xs, ys = _curve([r for r in fr if r["candidate"] == cand])
            if not xs or cand == "dense":
                continue
            if cand in _DENSE_STYLE:
                c, ls = _DENSE_STYLE[cand]
                ax.plot(xs, ys, color=c, ls=ls, lw=1, label=cand)
                continue
            c = cand_color.setdefault(cand, colors[len(cand_color) % len(colors)])
            ax.plot(xs, ys, marker="o", ms=3, color=c, label=cand)
            noisy = [(r["sparsity"], r["speedup"]) for r in fr if r["candidate"] == cand and r.get("speedup")
                     and is_noisy(r)]
            if noisy:
                ax.plot(*zip(*noisy), ls="none", marker="o", ms=8, mfc="none", mec=c, alpha=0.6)
            _mark_break_even(ax, xs, ys, c)
        ax.set_yscale("log")
        ax.set_title(fmt + (" (n:m per point)" if fmt == "nm" else ""), fontsize=9)
        ax.set_xlabel("sparsity")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("speedup vs dense eager")
    r0 = rows[0]
    mnk = f"M={r0['M']} N={r0['N']} K={r0['K']}" if r0.get("N") is not None else f"{r0['M']} tokens"
    fig.suptitle(_title(results, f"{op} {shape} ({mnk}), {dtype}; diamond = break-even, ring = noisy point"),
                 fontsize=9)
    handles, labels = {}, {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(list(handles.values()), list(labels), loc="lower center", ncol=min(6, len(labels)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_figure(plt, results: dict, op: str, dtype: str, rows: list[dict], path: Path) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cols = min(4, len(shapes))
    nrows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 0.4, 3.0 * nrows + 0.9), squeeze=False,
                             sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fmt_color: dict[str, str] = {}
    for i, shape in enumerate(shapes):
        ax = axes[i // cols][i % cols]
        sr = [r for r in rows if r["shape"] == shape and r.get("kind") == "sparsekit"]
        _ideal(ax, sorted({r["sparsity"] for r in sr}) or [0.5])
        best: dict[tuple[str, float], float] = {}
        for r in sr:
            if r.get("status") == "ok" and r.get("speedup"):
                k = (group_key(r), r["sparsity"])
                best[k] = max(best.get(k, 0.0), r["speedup"])
        for fmt in sorted({k[0] for k in best}):
            xs = sorted(s for f, s in best if f == fmt)
            ys = [best[(fmt, s)] for s in xs]
            c = fmt_color.setdefault(fmt, colors[len(fmt_color) % len(colors)])
            ax.plot(xs, ys, marker="o", ms=3, color=c, label=fmt)
            _mark_break_even(ax, xs, ys, c)
        ax.set_yscale("log")
        ax.set_title(shape, fontsize=8)
        ax.grid(True, which="both", alpha=0.25)
        if i % cols == 0:
            ax.set_ylabel("speedup (best sparsekit backend)")
        if i // cols == nrows - 1:
            ax.set_xlabel("sparsity")
    for j in range(len(shapes), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(7, len(handles)), fontsize=7,
               frameon=False)
    fig.suptitle(_title(results, f"{op}, {dtype}: speedup vs sparsity per format"), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _roofline_figure(plt, results: dict, dtype: str, rows: list[dict], path: Path) -> None:
    import numpy as np

    peak = results["peaks"][dtype]
    pf, bw = peak["flops"] / 1e9, peak["bytes_per_s"] / 1e9
    pts = [r for r in rows if r.get("gflops_per_s") and r.get("bytes")]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ai = np.logspace(-1, 3, 200)
    ax.plot(ai, np.minimum(pf, ai * bw), color="k", lw=1.2, label=f"roof: {pf:.0f} GFLOP/s, {bw:.0f} GB/s")
    markers = {"dense": "s", "torch": "^", "sparsekit": "o"}
    for kind, mk in markers.items():
        kr = [r for r in pts if r["kind"] == kind]
        if not kr:
            continue
        x = [r["flops"] / r["bytes"] for r in kr]
        y = [r["gflops_per_s"] for r in kr]
        ax.scatter(x, y, marker=mk, s=14, alpha=0.6, label=f"{kind} ({len(kr)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    right = ax.secondary_yaxis("right", functions=(lambda y: y / pf * 100.0, lambda q: q * pf / 100.0))
    right.set_ylabel("% of measured peak FLOP/s")
    ax.set_xlabel("arithmetic intensity (useful FLOP / compulsory byte)")
    ax.set_ylabel("achieved GFLOP/s (useful: 2MNK(1-s))")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    ax.set_title(_title(results, f"roofline, {dtype} (peaks measured in this run)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results(results: dict, out_dir: str | Path) -> tuple[list[Path], str]:
    """Write every plot of ``results`` into out_dir; returns (paths, message). No matplotlib: ([], why)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in results["rows"] if r.get("op") in ("linear", "conv2d", "model")]
    if not rows:
        return [], "plots skipped: no rows"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"])].append(r)
    for (op, shape, dtype), rs in groups.items():
        p = out / f"speedup_{_safe(op)}_{_safe(shape)}_{dtype}.png"
        _speedup_figure(plt, results, op, shape, dtype, rs, p)
        paths.append(p)
    for op in sorted({r["op"] for r in rows}):
        for dtype in sorted({r["dtype"] for r in rows if r["op"] == op}):
            rs = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            if len({r["shape"] for r in rs}) > 1:
                p = out / f"summary_{_safe(op)}_{dtype}.png"
                _summary_figure(plt, results, op, dtype, rs, p)
                paths.append(p)
    for dtype in sorted(results.get("peaks", {})):
        rs = [r for r in rows if r["dtype"] == dtype and r["op"] != "model"]
        if rs:
            p = out / f"roofline_{dtype}.png"
            _roofline_figure(plt, results, dtype, rs, p)
            paths.append(p)
    return paths, f"{len(paths)} plot(s) in {out}"
