"""Which CUDA kernels a call launches (tests that a dispatch choice really happened, not only that values agree)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_names(fn: Callable[[], object]) -> set[str] | None:
    """Names of the CUDA kernels ``fn`` launches, or None when the profiler sees no kernels here."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # outside the profile: any first-use probe
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    return names if any("kernel" in name for name in names) else None
