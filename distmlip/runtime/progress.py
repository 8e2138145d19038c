"""The progress bar of an evaluation whose parts run one at a time (``progress=True``)."""

from __future__ import annotations

import threading

__all__ = ["Progress"]

#: the bar counts parts (one decimal: a part is done a fraction at a time, pass by pass)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} parts [{elapsed}<{remaining}]"


class Progress:
    """Counts the parts evaluated by a sequential (bounded-memory) evaluation and shows a tqdm bar
    of them when enabled. Every part is run in several passes (L forward passes, L backward
    replays and one prefix pass, L: exchange calls; unknown until the first call's forward passes
    are done): ``tick`` is called after each part's pass, and the bar advances by the fraction of a
    part that pass is, so that it reads ``3.4/8 parts``."""

    def __init__(self, pieces: int, levels: int | None, enabled: bool, guess: int | None = None):
        """``pieces``: the parts; ``guess``: the exchange calls expected when ``levels`` is not
        known yet (the model's layers - 1), corrected once the first call has found them."""
        self.pieces, self.bar, self.lock = pieces, None, threading.Lock()
        self.done = 0  # passes over a part so far
        if levels is not None:
            self.passes = float(pieces * (2 * levels + 1 if levels else 1))
        else:  # the forward passes that find the levels (L + 1), L replays, the prefix
            self.passes = float(pieces * (2 * (guess or 0) + 2))
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=pieces, desc="distmlip: parts", unit="part",
                                bar_format=BAR_FORMAT, dynamic_ncols=True, leave=False)

    @property
    def parts_done(self) -> float:
        """Parts evaluated so far (a fraction while a pass is under way)."""
        return min(self.pieces, self.pieces * self.done / self.passes) if self.passes else self.pieces

    def expect(self, levels: int) -> None:
        """The first call has found ``levels``: what remains is L backward replays and a prefix
        pass per part (or one final pass without exchanges)."""
        with self.lock:
            self.passes = float(self.done + self.pieces * (levels + 1 if levels else 1))
            self._show()

    def tick(self) -> None:
        with self.lock:
            self.done += 1
            self._show()

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(self.parts_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the last state, whatever the bar's update interval
            self.bar.close()
