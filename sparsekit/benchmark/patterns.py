"""Sparsity patterns for benchmarks: random weights with exactly the target fraction of zeros, per pattern.

    bsr   whole (bn x bk) blocks are zero; exactly round(s * #blocks) of them (block 1x4 ... 64x64)
    csr   unstructured: exactly round(s * N * K) elements are zero
    nm    n:m along K: n kept of every m; n:m is picked to match the target (2:4 for 0.5, 1:16 for 0.95 ...)

Values are normal / sqrt(K * density) so outputs stay O(1) in every dtype. Nothing here times anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import BSR, CSR, NM

__all__ = ["Pattern", "parse_block", "nm_for_sparsity", "patterns_for", "make_weight", "to_format"]

PATTERN_KINDS = ("bsr", "csr", "nm")
_NM_MS = (4, 8, 16, 32, 64, 128)
_NM_TOL = 0.02


@dataclass(frozen=True)
class Pattern:
    kind: str                                 # "bsr" | "csr" | "nm"
    block: tuple[int, int] | None = None      # bsr only
    n: int | None = None                      # nm only
    m: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "bsr":
            return f"bsr{self.block[0]}x{self.block[1]}"
        if self.kind == "nm":
            return f"nm{self.n}:{self.m}"
        return self.kind

    @property
    def family(self) -> str:
        return self.kind

    @property
    def block_str(self) -> str:
        return f"{self.block[0]}x{self.block[1]}" if self.block else ""

    def reasons(self, n: int, k: int) -> list[str]:
        """Why this pattern cannot describe an [n, k] weight (empty = it can)."""
        if self.kind == "bsr":
            bn, bk = self.block
            bad = [f"N={n} % {bn} != 0"] if n % bn else []
            return bad + ([f"K={k} % {bk} != 0"] if k % bk else [])
        if self.kind == "nm" and k % self.m:
            return [f"K={k} % m={self.m} != 0"]
        return []

    def sparsity(self, target: float) -> float:
        """The sparsity this pattern actually produces for a target (n:m is quantised)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else target


def parse_block(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """'32' -> (32, 32); '1x4' -> (1, 4); 32 -> (32, 32). Raises ValueError naming the value."""
    if isinstance(text, tuple):
        parts = list(text)
    elif isinstance(text, int) and not isinstance(text, bool):
        parts = [text, text]
    elif isinstance(text, str):
        parts = text.lower().split("x") if "x" in text.lower() else [text, text]
    else:
        raise TypeError(f"block must be a str like '32' or '1x4', an int or a pair, got {type(text).__name__}")
    try:
        bn, bk = (int(p) for p in parts)
    except (ValueError, TypeError):
        raise ValueError(f"block must look like '32' or '1x4' (rows x cols, each 1..128), got {text!r}") from None
    if not (1 <= bn <= 128 and 1 <= bk <= 128):
        raise ValueError(f"block sides must be in [1, 128], got {text!r}")
    return bn, bk


def nm_for_sparsity(sparsity: float, k: int) -> tuple[int, int] | None:
    """The n:m (smallest m dividing K) whose sparsity 1 - n/m is within 0.02 of the target; None if none."""
    best: tuple[float, int, int] | None = None
    for m in _NM_MS:
        if k % m:
            continue
        n = max(1, min(m - 1, round((1.0 - sparsity) * m)))
        err = abs((1.0 - n / m) - sparsity)
        if err <= _NM_TOL + 1e-12:
            return n, m
        if best is None or err < best[0]:
            best = (err, n, m)
    return None


def patterns_for(kind: str, sparsity: float, k: int, blocks: tuple[tuple[int, int], ...]) -> list[Pattern]:
    """Patterns of one kind to benchmark at a target sparsity (one per block for bsr)."""
    if kind == "bsr":
        return [Pattern("bsr", block=b) for b in blocks]
    if kind == "csr":
        return [Pattern("csr")]
    if kind == "nm":
        nm = nm_for_sparsity(sparsity, k)
        return [Pattern("nm", n=nm[0], m=nm[1])] if nm else []
    raise ValueError(f"format must be one of {PATTERN_KINDS}, got {kind!r}")


def _exact_keep(numel: int, sparsity: float, gen: torch.Generator) -> Tensor:
    """Bool [numel] with exactly numel - round(sparsity * numel) True entries at random places."""
    zeros = min(numel, round(sparsity * numel))
    keep = torch.ones(numel, dtype=torch.bool)
    keep[torch.randperm(numel, generator=gen)[:zeros]] = False
    return keep


def make_weight(n: int, k: int, pattern: Pattern, sparsity: float, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> Tensor:
    """A dense [n, k] weight with the pattern's zeros at the target sparsity (n:m: its own sparsity)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    reasons = pattern.reasons(n, k)
    if reasons:
        raise ValueError(f"pattern {pattern.name} cannot describe a weight of shape ({n}, {k}): {'; '.join(reasons)}")
    gen = torch.Generator().manual_seed(seed)
    if pattern.kind == "bsr":
        bn, bk = pattern.block
        keep = _exact_keep((n // bn) * (k // bk), sparsity, gen).reshape(n // bn, k // bk)
        mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    elif pattern.kind == "csr":
        mask = _exact_keep(n * k, sparsity, gen).reshape(n, k)
    else:
        groups = torch.rand(n, k // pattern.m, pattern.m, generator=gen)
        top = groups.topk(pattern.n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k)
    density = max(1e-6, 1.0 - pattern.sparsity(sparsity))
    w = torch.randn(n, k, generator=gen) / (k * density) ** 0.5
    w = torch.where(w < 0, -1.0, 1.0) * w.abs().clamp_min(1e-3)   # no kept value is (or rounds to) zero
    return (w * mask).to(dtype=dtype, device=device)


def to_format(weight: Tensor, pattern: Pattern) -> BSR | CSR | NM:
    """The sparsekit format for a pattern's weight."""
    if pattern.kind == "bsr":
        return BSR.from_dense(weight, block=pattern.block)
    if pattern.kind == "csr":
        return CSR.from_dense(weight)
    return NM.from_dense(weight, n=pattern.n, m=pattern.m)
