"""Progress for long sweeps: tqdm when it is installed, else a plain counter on stderr. Never a dependency."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "linear") as p: p.update(desc="bert-base.mlp_up bsr32x32 s=0.9")``."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self._bar = None
        self._t0 = time.perf_counter()
        self._last_print = 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, desc: str | None = None) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            if desc:
                self._bar.set_postfix_str(desc, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_print < 2.0 and self.done < self.total:   # at most one line every 2 s
            return
        self._last_print = now
        elapsed = now - self._t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        print(f"[{self.done}/{self.total}] {self.desc} {desc or ''} ({elapsed:.0f}s elapsed, ~{eta:.0f}s left)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
