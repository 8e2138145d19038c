"""The progress bar of an evaluation whose parts run one at a time (``progress=True``)."""

from __future__ import annotations

import threading

__all__ = ["Progress"]


class Progress:
    """Counts the parts evaluated by a sequential (bounded-memory) evaluation and shows a tqdm bar
    when enabled: L forward passes, L backward replays and one prefix pass per part (L: exchange
    calls; unknown until the first call's forward passes are done)."""

    def __init__(self, pieces: int, levels: int | None, enabled: bool, guess: int | None = None):
        """``guess``: the exchange calls expected when ``levels`` is not known yet (the model's
        layers - 1), corrected once the first call has found them."""
        self.pieces, self.bar, self.lock = pieces, None, threading.Lock()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                total = self._total(levels) if levels is not None else \
                    None if guess is None else self.pieces * (2 * guess + 2)
                self.bar = tqdm(total=total, desc="distmlip: parts", unit="part",
                                dynamic_ncols=True, leave=False)

    def _total(self, levels):
        if levels is None:
            return None
        return self.pieces * (2 * levels + 1) if levels else self.pieces

    def expect(self, levels: int) -> None:
        """The first call has found ``levels``: what remains is L backward replays and a prefix
        pass per part (or one final pass without exchanges)."""
        if self.bar is not None:
            self.bar.total = self.bar.n + self.pieces * (levels + 1 if levels else 1)
            self.bar.refresh()

    def tick(self) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the last state, whatever the bar's update interval
            self.bar.close()
