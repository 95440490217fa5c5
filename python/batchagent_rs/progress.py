"""What a person sees while a run goes: a one-line progress bar on a terminal (redrawn in place,
on stderr, so stdout and logs stay clean), a log line every few seconds off a terminal."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO


def _fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Renders run counters. Call `update(stats)` as often as you like; it throttles itself."""

    def __init__(
        self, total: int | None, *, stream: TextIO | None = None, label: str = "", log_every: float = 5.0
    ):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.label = label
        self.started = time.perf_counter()
        self.last_draw = 0.0
        self.log_every = log_every
        self.last_tokens = (self.started, 0)
        self.tokens_per_s = 0.0
        self.drawn = False

    def line(self, stats: dict[str, Any]) -> str:
        run = stats["run"]
        done = run["jobs_ok"] + run["jobs_failed"]
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        now = time.perf_counter()
        tokens = run["prompt_tokens"] + run["completion_tokens"]
        t0, k0 = self.last_tokens
        if now - t0 >= 1.0:
            self.tokens_per_s = (tokens - k0) / (now - t0)
            self.last_tokens = (now, tokens)
        prompt = run["prompt_tokens"]
        hit = run["cached_tokens"] / prompt if prompt else 0.0
        inflight = run["jobs_started"] - done
        parts = [self.label] if self.label else []
        if self.total:
            frac = min(done / self.total, 1.0)
            width = 24
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            parts.append(f"[{bar}] {done}/{self.total} {frac:4.0%}")
            tail = f"ETA {_fmt_duration(eta)}"
        else:
            parts.append(f"{done} done")
            tail = f"elapsed {_fmt_duration(elapsed)}"
        parts.append(f"ok {run['jobs_ok']} failed {run['jobs_failed']} in flight {inflight}")
        parts.append(f"{rate:.1f}/s {self.tokens_per_s:,.0f} tok/s cache {hit:.0%}")
        parts.append(tail)
        return "  ".join(parts)

    def update(self, stats: dict[str, Any], *, force: bool = False) -> None:
        now = time.perf_counter()
        interval = 0.1 if self.tty else self.log_every
        if not force and now - self.last_draw < interval:
            return
        self.last_draw = now
        text = self.line(stats)
        if self.tty:
            columns = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[2K" + text[: columns - 1])
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar so a log line or the report can be printed on a clean line."""
        if self.tty and self.drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def close(self, stats: dict[str, Any]) -> None:
        self.update(stats, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
