"""Compile the Triton kernels for sm80 (A100) and sm90 (H100) without a GPU.

``check_all()`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for every case
below (every kernel in kernels/k_*.py: BSR forward and split-K, BSR dx and SDDMM, N:M, channel gather/scatter),
through the whole NVIDIA pipeline ttir -> ttgir -> llir -> ptx -> cubin (cubin via the ptxas that
ships inside the triton wheel; no CUDA toolkit or driver needed). Each case uses the launch config the
launcher would pick on that arch (kernels/_configs.py), so a table entry that needs more shared memory
than the GPU has is reported too, and so is one whose cubin spills more than SPILL_LIMIT bytes of registers
per thread to local memory (read off ptxas -v: the report of the ptxas run Triton makes anyway, or after a
cache hit a ptxas -v run on the cached PTX). Returns a list of failure messages (empty = all good) and prints
one line per compile.

Run: python -m sparsekit.kernels._compile_check [--fresh] [--full]   (exit status 1 on any failure)

TRITON_INTERPRET=1 replaces every @triton.jit function by an interpreter object that cannot be compiled,
so when it is set the check re-runs itself in a subprocess without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from ._configs import interpreting  # torch only, no triton

__all__ = ["check_all", "CASES", "TARGETS"]

# (compute capability, max dynamic shared memory per block in bytes)
TARGETS = ((80, 163 * 1024), (90, 227 * 1024))

# (dtype, (bn, bk), M the config is chosen for, has_bias, fp32 dot precision)
CASES = (
    ("float16", (32, 32), 4096, True, None),
    ("float16", (128, 128), 4096, False, None),
    ("float16", (16, 64), 8, True, None),
    ("bfloat16", (64, 32), 4096, True, None),
    ("bfloat16", (32, 128), 16, False, None),
    ("float32", (32, 32), 4096, True, "tf32"),
    ("float32", (64, 16), 64, False, "ieee"),
)

# split-K forward: (dtype, (bn, bk), M, fp32 dot precision)
SPLITK_CASES = (("float16", (32, 32), 8, None), ("bfloat16", (64, 64), 1, None), ("float32", (16, 128), 32, "tf32"))
# dx = dy @ W: (dtype, (bn, bk), M, precision)
BSR_T_CASES = (("float16", (32, 64), 4096, None), ("bfloat16", (128, 32), 16, None),
               ("float32", (64, 64), 4096, "tf32"))
# SDDMM: (dtype, (bn, bk), M, split, precision)
SDDMM_CASES = (("float16", (32, 32), 4096, 1, None), ("bfloat16", (64, 64), 4096, 4, None),
               ("float16", (128, 128), 4096, 1, None), ("float32", (16, 64), 4096, 1, "tf32"))
# N:M: (dtype, (n, m), M, has_bias, precision)
NM_CASES = (("float16", (2, 4), 4096, True, None), ("bfloat16", (2, 4), 16, False, None),
            ("float16", (4, 8), 64, False, None), ("float32", (1, 4), 4096, True, "tf32"))
# channel gather GEMM: (dtype, M, has_bias, has_out_idx, precision)
CHANNEL_CASES = (("float16", 4096, True, False, None), ("bfloat16", 32, False, True, None),
                 ("float32", 4096, True, True, "tf32"))

# the compile fails a case whose cubin spills more than this many bytes per thread (ptxas -v "bytes spill
# stores"): the launch tables in kernels/_configs.py are sized so that none of their rows spills (a few bytes
# at most). Rows of a measured table (tuned_sm*.json, $SPARSEKIT_TRITON_CONFIGS) are reported, not failed: they
# were timed as they are.
SPILL_LIMIT = 64
# kernel name (the first word of a case's description) -> the _configs family whose table chose its config
_FAMILY = {"_bsr_mm_kernel": "bsr_mm", "_bsr_mm_splitk_kernel": "bsr_mm", "_bsr_mm_t_kernel": "bsr_mm",
           "_bsr_sddmm_kernel": "bsr_sddmm", "_nm_mm_kernel": "nm_mm", "_channel_mm_kernel": "channel_mm"}

_TL_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_RESULT_TAG = "SPARSEKIT_COMPILE_CHECK_RESULT "


def _in_subprocess(verbose: bool, fresh: bool, full: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from sparsekit.kernels._compile_check import check_all; "
            f"r = check_all(verbose={verbose!r}, fresh={fresh!r}, full={full!r}); "
            f"print({_RESULT_TAG!r} + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            result = json.loads(line[len(_RESULT_TAG):])
        elif verbose:
            print(line)
    if result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return [f"compile check subprocess (run without TRITON_INTERPRET) failed with exit status "
                f"{proc.returncode}:\n" + "\n".join(tail)]
    return result


def _src(fn, signature: dict, constexprs: dict, aligned: list[str]):
    """The ASTSource of one launch: a pointer typed "constexpr" in ``signature`` is a None argument (what the
    JIT does with bias=None), and the ``aligned`` arguments carry the 16-divisibility the JIT infers for real
    launches (16-byte aligned tensors, sizes that are multiples of 16)."""
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    for name, ty in signature.items():
        if ty == "constexpr" and name.endswith("_ptr"):
            constexprs.setdefault(name, None)
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _job(fn, signature: dict, constexprs: dict, aligned: list[str], cfg, desc: str) -> tuple:
    """(src, options, desc) of one compile, with the launch config's num_warps / num_stages."""
    return _src(fn, signature, constexprs, aligned), {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, desc


def _bsr_mm_sources(dtype: str, block: tuple[int, int], m: int, has_bias: bool, precision: str | None,
                    cc: int, smem: int):
    import torch

    from . import k_bsr_mm
    from ._configs import bsr_mm_config

    bn, bk = block
    t = _TL_TYPE[dtype]
    cfg = bsr_mm_config(m, bn, bk, getattr(torch, dtype), arch=(cc // 10, smem))
    signature = {
        "x_ptr": f"*{t}", "crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": f"*{t}",
        "bias_ptr": f"*{t}" if has_bias else "constexpr", "y_ptr": f"*{t}",
        "M": "i32", "N": "i32", "K": "i32",
        "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BN": "constexpr", "BK": "constexpr",
        "GROUP_M": "constexpr", "INPUT_PRECISION": "constexpr", "WHILE_LOOP": "constexpr",
    }
    constexprs = {
        "HAS_BIAS": has_bias, "BLOCK_M": cfg.block_m, "BN": bn, "BK": bk, "GROUP_M": cfg.group_m,
        "INPUT_PRECISION": precision or "ieee", "WHILE_LOOP": False,
    }
    # N and K are multiples of 16 (block sides)
    aligned = ["x_ptr", "crow_ptr", "col_ptr", "val_ptr", "y_ptr", "N", "K"] + (["bias_ptr"] if has_bias else [])
    return _job(k_bsr_mm._bsr_mm_kernel, signature, constexprs, aligned, cfg,
                f"_bsr_mm_kernel sm{cc} {dtype:<8} block={bn}x{bk} M~{m} bias={int(has_bias)}"
                f"{' ' + precision if precision else ''} BLOCK_M={cfg.block_m} warps={cfg.num_warps} "
                f"stages={cfg.num_stages}")


def _extra_sources(cc: int, smem: int) -> list[tuple]:
    """(src, options, desc) for the kernels beyond the forward BSR kernel: split-K, dx, SDDMM, N:M, channel."""
    import torch

    from . import k_bsr_mm, k_bsr_mm_t, k_bsr_sddmm, k_channel, k_nm_mm
    from ._configs import bsr_mm_config, bsr_sddmm_config, channel_mm_config, nm_mm_config

    arch = (cc // 10, smem)
    out = []
    for dtype, (bn, bk), m, prec in SPLITK_CASES:
        t = _TL_TYPE[dtype]
        cfg = bsr_mm_config(m, bn, bk, getattr(torch, dtype), arch=arch)
        sig = {"x_ptr": f"*{t}", "crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": f"*{t}", "acc_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32", "BLOCK_M": "constexpr", "BN": "constexpr", "BK": "constexpr",
               "SPLIT_K": "constexpr", "INPUT_PRECISION": "constexpr", "WHILE_LOOP": "constexpr"}
        ce = {"BLOCK_M": cfg.block_m, "BN": bn, "BK": bk, "SPLIT_K": 4, "INPUT_PRECISION": prec or "ieee",
              "WHILE_LOOP": False}
        out.append(_job(k_bsr_mm._bsr_mm_splitk_kernel, sig, ce,
                        ["x_ptr", "crow_ptr", "col_ptr", "val_ptr", "acc_ptr", "N", "K"], cfg,
                        f"_bsr_mm_splitk_kernel sm{cc} {dtype:<8} block={bn}x{bk} M~{m} split=4 "
                        f"BLOCK_M={cfg.block_m}"))
    for dtype, (bn, bk), m, prec in BSR_T_CASES:
        t = _TL_TYPE[dtype]
        cfg = bsr_mm_config(m, bk, bn, getattr(torch, dtype), arch=arch)
        sig = {"dy_ptr": f"*{t}", "t_crow_ptr": "*i32", "t_row_ptr": "*i32", "t_perm_ptr": "*i32",
               "val_ptr": f"*{t}", "dx_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32",
               "BLOCK_M": "constexpr", "BN": "constexpr", "BK": "constexpr", "GROUP_M": "constexpr",
               "INPUT_PRECISION": "constexpr", "WHILE_LOOP": "constexpr"}
        ce = {"BLOCK_M": cfg.block_m, "BN": bn, "BK": bk, "GROUP_M": cfg.group_m, "INPUT_PRECISION": prec or "ieee",
              "WHILE_LOOP": False}
        out.append(_job(k_bsr_mm_t._bsr_mm_t_kernel, sig, ce,
                        ["dy_ptr", "t_crow_ptr", "t_row_ptr", "t_perm_ptr", "val_ptr", "dx_ptr", "N", "K"], cfg,
                        f"_bsr_mm_t_kernel sm{cc} {dtype:<8} block={bn}x{bk} M~{m} BLOCK_M={cfg.block_m} "
                        f"warps={cfg.num_warps} stages={cfg.num_stages}"))
    for dtype, (bn, bk), m, split, prec in SDDMM_CASES:
        t = _TL_TYPE[dtype]
        cfg = bsr_sddmm_config(m, 10**6, bn, bk, getattr(torch, dtype), arch=arch)
        sig = {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "row_ptr": "*i32", "col_ptr": "*i32",
               "out_ptr": "*fp32" if split > 1 else f"*{t}", "M": "i32", "N": "i32", "K": "i32",
               "BLOCK_M": "constexpr", "BN": "constexpr", "BK": "constexpr", "SPLIT": "constexpr",
               "INPUT_PRECISION": "constexpr", "WHILE_LOOP": "constexpr"}
        ce = {"BLOCK_M": cfg.block_m, "BN": bn, "BK": bk, "SPLIT": split, "INPUT_PRECISION": prec or "ieee",
              "WHILE_LOOP": False}
        out.append(_job(k_bsr_sddmm._bsr_sddmm_kernel, sig, ce,
                        ["dy_ptr", "x_ptr", "row_ptr", "col_ptr", "out_ptr", "N", "K"], cfg,
                        f"_bsr_sddmm_kernel sm{cc} {dtype:<8} block={bn}x{bk} split={split} BLOCK_M={cfg.block_m} "
                        f"warps={cfg.num_warps} stages={cfg.num_stages}"))
    for dtype, (n, mm), m, has_bias, prec in NM_CASES:
        t = _TL_TYPE[dtype]
        cfg = nm_mm_config(m, getattr(torch, dtype), arch=arch)
        sig = {"x_ptr": f"*{t}", "val_ptr": f"*{t}", "idx_ptr": "*u8",
               "bias_ptr": f"*{t}" if has_bias else "constexpr", "y_ptr": f"*{t}",
               "M": "i32", "N": "i32", "K": "i32", "KC": "i32", "HAS_BIAS": "constexpr", "NN": "constexpr",
               "MM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
               "GROUP_M": "constexpr", "INPUT_PRECISION": "constexpr", "WHILE_LOOP": "constexpr"}
        ce = {"HAS_BIAS": has_bias, "NN": n, "MM": mm, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
              "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "INPUT_PRECISION": prec or "ieee", "WHILE_LOOP": False}
        out.append(_job(k_nm_mm._nm_mm_kernel, sig, ce, ["x_ptr", "val_ptr", "idx_ptr", "y_ptr"], cfg,
                        f"_nm_mm_kernel sm{cc} {dtype:<8} {n}:{mm} M~{m} bias={int(has_bias)} tile={cfg.block_m}x"
                        f"{cfg.block_n}x{cfg.block_k} warps={cfg.num_warps} stages={cfg.num_stages}"))
    for dtype, m, has_bias, has_out, prec in CHANNEL_CASES:
        t = _TL_TYPE[dtype]
        cfg = channel_mm_config(m, getattr(torch, dtype), arch=arch)
        sig = {"x_ptr": f"*{t}", "in_idx_ptr": "*i64", "w_ptr": f"*{t}",
               "bias_ptr": f"*{t}" if has_bias else "constexpr", "out_idx_ptr": "*i64" if has_out else "constexpr",
               "y_ptr": f"*{t}", "M": "i32", "NC": "i32", "KC": "i32",
               "sxb": "i32", "sxm": "i32", "sxk": "i32", "syb": "i32", "sym": "i32", "syn": "i32",
               "HAS_BIAS": "constexpr", "HAS_OUT_IDX": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr", "GROUP_M": "constexpr", "INPUT_PRECISION": "constexpr",
               "WHILE_LOOP": "constexpr"}
        ce = {"HAS_BIAS": has_bias, "HAS_OUT_IDX": has_out, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
              "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "INPUT_PRECISION": prec or "ieee", "WHILE_LOOP": False}
        out.append(_job(k_channel._channel_mm_kernel, sig, ce, ["x_ptr", "in_idx_ptr", "w_ptr", "y_ptr"], cfg,
                        f"_channel_mm_kernel sm{cc} {dtype:<8} M~{m} bias={int(has_bias)} out_idx={int(has_out)} "
                        f"tile={cfg.block_m}x{cfg.block_n}x{cfg.block_k}"))
    for dtype in ("float16", "bfloat16", "float32"):
        t = _TL_TYPE[dtype]
        sig = {"y_ptr": f"*{t}", "idx_ptr": "*i64", "bias_ptr": f"*{t}", "out_ptr": f"*{t}", "C": "i32",
               "INNER": "i32", "syo": "i32", "syc": "i32", "syi": "i32", "soo": "i32", "soc": "i32", "soi": "i32",
               "HAS_BIAS": "constexpr", "BLOCK_C": "constexpr", "BLOCK_I": "constexpr"}
        ce = {"HAS_BIAS": True, "BLOCK_C": 32, "BLOCK_I": 128}
        src = _src(k_channel._channel_scatter_kernel, sig, ce, ["y_ptr", "idx_ptr", "bias_ptr", "out_ptr"])
        out.append((src, {"num_warps": 4}, f"_channel_scatter_kernel sm{cc} {dtype:<8} bias=1 tile=32x128"))
    return out


@contextlib.contextmanager
def _knob(group, name: str, value):
    """Set the Triton knob ``group.name`` for the block, then restore it exactly: its override or its absence,
    and the environment variable that setting an environment-backed knob writes (its value or its absence)."""
    key = getattr(type(group).__dict__.get(name), "key", None)
    had, old = name in group.__dict__, group.__dict__.get(name)
    old_env = os.environ.get(key) if key else None
    setattr(group, name, value)
    try:
        yield
    finally:
        if had:
            group.__dict__[name] = old
        else:
            group.__dict__.pop(name, None)
        if key and old_env is None:
            os.environ.pop(key, None)
        elif key:
            os.environ[key] = old_env


def _compile(src, target, options, ptx_only: bool, log: list[str] | None = None):
    """triton.compile of one case, with no stages hook.

    The normal path compiles down to cubin through Triton's cache as configured. ``log`` (a list) receives the
    ``ptxas -v`` report of that compile (Triton runs ptxas with -v and prints the report when its
    dump_ptxas_log knob is set; captured here): registers and spills. It is empty on a cache hit (no ptxas ran).

    ptx_only=True stops at PTX (the fallback when the bundled ptxas cannot run): the cubin stage is replaced by
    one that produces an empty binary (``asm["cubin"] == b""``; removing the stage makes Triton 3.6 raise
    KeyError 'cubin' after writing the cache entry), in a throwaway cache directory: the stages hook is not
    part of Triton's cache key, so an entry written to the real cache would be found by every later compile
    with the same key (this check's and JIT launches sharing the directory), which would then get no cubin.
    """
    import triton
    from triton import knobs

    if not ptx_only:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_knob(knobs.runtime, "add_stages_inspection_hook", None))
            out = None
            if log is not None and "dump_ptxas_log" in type(knobs.nvidia).__dict__:
                stack.enter_context(_knob(knobs.nvidia, "dump_ptxas_log", True))
                out = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            kernel = triton.compile(src, target=target, options=options)
        if log is not None:
            log.append(out.getvalue() if out is not None else "")
        return kernel

    def hook(backend, stages, options, language, capability):
        stages["cubin"] = lambda module, metadata: b""

    with tempfile.TemporaryDirectory(prefix="sparsekit-ptx-only-") as tmp, \
            _knob(knobs.runtime, "add_stages_inspection_hook", hook), _knob(knobs.cache, "dir", tmp):
        return triton.compile(src, target=target, options=options)


def _parse_ptxas(report: str) -> tuple[int, int] | None:
    """(registers, bytes of spill stores) per thread from a ``ptxas -v`` report, None if it has neither."""
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", report)]
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", report)]
    if not regs or not spills:
        return None
    return max(regs), sum(spills)


def _ptxas_usage(kernel, cc: int, log: str) -> tuple[int, int] | None:
    """(registers, bytes of spill stores) of a compiled case: from the report of the ptxas run that built its cubin
    (``log``, see _compile) or, after a cache hit (no ptxas ran), from running the bundled ptxas -v on its PTX
    again with Triton's flags. None when neither works (no cubin, ptxas missing)."""
    found = _parse_ptxas(log)
    if found is not None or not kernel.asm.get("cubin") or not kernel.asm.get("ptx"):
        return found
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        with tempfile.TemporaryDirectory(prefix="sparsekit-ptxas-") as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(cc)}", ptx,
                   "-o", os.path.join(tmp, "kernel.cubin")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
    except Exception:  # noqa: BLE001 - the spill figure is optional
        return None
    return _parse_ptxas(proc.stderr + proc.stdout) if proc.returncode == 0 else None


def _full_cases(cc: int, smem: int) -> list[tuple]:
    """Every distinct launch config of the table on this arch, for 2-byte and 4-byte dtypes."""
    import torch

    from ._configs import M_BUCKETS, bsr_mm_config

    seen, cases = set(), []
    for dtype, precision in (("float16", None), ("float32", "tf32")):
        for bn in (16, 32, 64, 128):
            for bk in (16, 32, 64, 128):
                for m in M_BUCKETS:
                    cfg = bsr_mm_config(m, bn, bk, getattr(torch, dtype), arch=(cc // 10, smem))
                    if (dtype, bn, bk, cfg) not in seen:
                        seen.add((dtype, bn, bk, cfg))
                        cases.append((dtype, (bn, bk), m, True, precision))
    return cases


def check_all(verbose: bool = True, fresh: bool = False, full: bool = False) -> list[str]:
    """Compile every case for sm80 and sm90; return failure messages (empty list = all compiled).

    fresh=True ignores Triton's on-disk cache (TRITON_ALWAYS_COMPILE), so the times are real compiles.
    full=True compiles every distinct config of the table in kernels/_configs.py (all 16 block shapes,
    every M bucket, fp16 and fp32: a few hundred compiles, a minute or two) instead of CASES.
    If the bundled ptxas cannot run, falls back to stopping at PTX and says so in a failure message.
    A case whose cubin spills more than SPILL_LIMIT bytes per thread (ptxas -v) fails, unless its config came
    from a measured table.
    """
    if interpreting():
        if verbose:
            print("compile check: TRITON_INTERPRET is set (kernels would be interpreter objects); "
                  "re-running in a subprocess without it")
        return _in_subprocess(verbose, fresh, full)
    try:
        import triton
        from triton import knobs  # Triton >= 3.4 (pyproject allows 3.0; torch 2.4-2.7 ship 3.0-3.3)
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import JITFunction

        from . import k_bsr_mm
    except ImportError as exc:
        return [f"cannot import triton / the kernels (the compile check needs Triton >= 3.4, found "
                f"{getattr(sys.modules.get('triton'), '__version__', 'none')}): {exc}"]
    if not isinstance(k_bsr_mm._bsr_mm_kernel, JITFunction):
        return ["k_bsr_mm was imported while TRITON_INTERPRET=1 was set, so its kernels are interpreter "
                "objects; run the compile check in a fresh process without TRITON_INTERPRET"]

    from ._configs import _DTYPE_BYTES, _tuned_for

    failures: list[str] = []
    old_always = knobs.compilation.always_compile
    knobs.compilation.always_compile = bool(fresh)
    t_all = time.perf_counter()
    ptx_only = False
    try:
        for cc, smem in TARGETS:
            target = GPUTarget("cuda", cc, 32)
            jobs = [_bsr_mm_sources(*case, cc, smem) for case in (_full_cases(cc, smem) if full else CASES)]
            jobs += _extra_sources(cc, smem)
            for src, options, desc in jobs:
                t0 = time.perf_counter()
                log: list[str] = []
                try:
                    kernel = _compile(src, target, options, ptx_only, log)
                except Exception as exc:  # noqa: BLE001 - every compiler error becomes a message
                    msg = str(exc).strip().splitlines()
                    if not ptx_only and "ptxas" in str(exc):
                        ptx_only = True
                        failures.append(f"{desc}: cubin generation failed (ptxas): {' '.join(msg[:3])}; "
                                        "checking the remaining cases up to PTX only")
                        try:
                            kernel = _compile(src, target, options, True)
                        except Exception as exc2:  # noqa: BLE001
                            failures.append(f"{desc}: {type(exc2).__name__}: {str(exc2).strip()[:800]}")
                            continue
                    else:
                        failures.append(f"{desc}: {type(exc).__name__}: {' '.join(msg)[:800]}")
                        if verbose:
                            print(f"FAIL {desc}: {type(exc).__name__} ({time.perf_counter() - t0:.1f}s)")
                        continue
                dt = time.perf_counter() - t0
                cubin, ptx = kernel.asm.get("cubin"), kernel.asm.get("ptx")
                stage = "cubin" if cubin else "ptx" if ptx else "?"
                shared = int(kernel.metadata.shared)
                if stage == "?":
                    failures.append(f"{desc}: compiled but produced neither PTX nor cubin")
                elif cubin and cubin[:4] != b"\x7fELF":
                    failures.append(f"{desc}: the cubin is not an ELF file")
                if shared > smem:
                    failures.append(f"{desc}: needs {shared} B of shared memory, sm{cc} allows {smem} B "
                                    "(fix the table in kernels/_configs.py)")
                usage = _ptxas_usage(kernel, cc, "".join(log)) if stage == "cubin" else None
                regs = f", {usage[0]} registers, spills {usage[1]} B" if usage else ""
                if usage and usage[1] > SPILL_LIMIT:
                    words = desc.split()   # "<kernel> sm<cc> <dtype> ..."
                    family = _FAMILY.get(words[0])
                    # exempt only where the launchers use the measured row: its arch and element size
                    elem = _DTYPE_BYTES.get(words[2]) if len(words) > 2 else None
                    if elem is not None and family in _tuned_for(cc // 10, elem):
                        regs += " (a measured table's row: not failed)"
                    else:
                        failures.append(f"{desc}: spills {usage[1]} B per thread to local memory ({usage[0]} "
                                        f"registers; more than {SPILL_LIMIT} B): give its row in kernels/_configs.py "
                                        "a smaller tile or more warps")
                if verbose:
                    size = len(kernel.asm.get(stage, b""))
                    print(f"ok   {desc}: {stage} {size} B, shared {shared} B{regs} ({dt:.1f}s)")
    finally:
        knobs.compilation.always_compile = old_always
    if verbose:
        print(f"compile check: {len(failures)} failure(s), {time.perf_counter() - t_all:.1f}s total "
              f"(triton {triton.__version__})")
    return failures


if __name__ == "__main__":
    sys.exit(1 if check_all(fresh="--fresh" in sys.argv, full="--full" in sys.argv) else 0)
