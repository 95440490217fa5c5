"""The progress line in a Jupyter notebook: the terminal bar's text (`progress.Progress.line`) in
one output that is updated in place, instead of carriage returns a notebook does not honour."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

from .progress import Progress

__all__ = ["NotebookProgress"]


class NotebookProgress:
    """Same interface as `Progress` (`update`, `close`, `clear`), drawn through IPython's display."""

    def __init__(self, total: int | None, label: str, handle: Any) -> None:
        # A Progress on a buffer that is never read: only its line() is used.
        self.bar = Progress(total, stream=io.StringIO(), label=label)
        self.handle = handle
        self.interval = 0.2
        self.last_draw = 0.0
        self.lock = threading.Lock()

    @classmethod
    def open(cls, total: int | None, label: str) -> NotebookProgress | None:
        """A display in the current cell, or None when IPython cannot display (not a notebook)."""
        try:
            from IPython.display import display
        except ImportError:
            return None
        handle = display({"text/plain": f"{label} starting"}, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        if handle is None:
            return None
        return cls(total, label, handle)

    @property
    def total(self) -> int | None:
        return self.bar.total

    @total.setter
    def total(self, value: int | None) -> None:
        self.bar.total = value

    def update(self, stats: dict[str, Any], *, force: bool = False) -> None:
        with self.lock:
            now = time.perf_counter()
            if not force and now - self.last_draw < self.interval:
                return
            self.last_draw = now
            self.handle.update({"text/plain": self.bar.line(stats)}, raw=True)

    def close(self, stats: dict[str, Any]) -> None:
        self.update(stats, force=True)

    def clear(self) -> None:
        with self.lock:
            self.handle.update({"text/plain": ""}, raw=True)
