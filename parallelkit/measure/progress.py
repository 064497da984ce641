"""Progress of a run's steps on stderr: what a user watches while it trains."""
from __future__ import annotations

import sys


class Progress:
    """A tqdm bar on a terminal; a line every ~10% of the steps in a log file."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.bar = total, label, enabled, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, loss: float, tps: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.update(1)
        elif (step + 1) % max(1, self.total // 10) == 0 or step + 1 == self.total:
            print(f"[{self.label}] step {step + 1}/{self.total} loss {loss:.4f} tokens/s {tps:,.0f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
