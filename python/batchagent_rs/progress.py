"""What a person sees while a run goes: a one-line progress bar on a terminal (redrawn in place,
on stderr, so stdout and logs stay clean), a log line every few seconds off a terminal."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["BarLogHandler", "Progress", "counters", "fmt_duration", "tool_not_run"]


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def tool_not_run(tools: dict[str, Any]) -> int:
    """Tool calls requested that neither ran, nor joined an identical call in flight, nor came from
    the cache: refused up front (unknown tool, arguments that are not JSON) or still queued when
    the run stopped. With it, requested = executed + coalesced + from cache + not run."""
    shared = sum(int(tools.get(k, 0)) for k in ("executions", "coalesced", "cache_hits"))
    return max(int(tools.get("requests", 0)) - shared, 0)


def counters(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures every view shows, from a run's stats dict (`Run.stats_json()`)."""
    run = stats["run"]
    ok = int(run["jobs_ok"])
    failed = int(run["jobs_failed"])
    skipped = int(run.get("jobs_skipped", 0))
    prompt = int(run["prompt_tokens"])
    cache = stats.get("response_cache")
    lookups = 0
    hits = 0
    if isinstance(cache, dict):
        hits = int(cache.get("hits", 0))
        lookups = hits + int(cache.get("misses", 0))
    return {
        "ok": ok,
        "failed": failed,
        "skipped": skipped,
        "done": ok + failed + skipped,
        # Model calls sent and not answered yet: each holds an inference slot, so this never
        # exceeds max_inflight. Agents waiting on tools hold none and are counted apart.
        "in_flight": int(run.get("model_calls_in_flight", 0)),
        "in_tools": int(run.get("agents_in_tools", 0)),
        "max_inflight": stats.get("max_inflight"),
        "length_finishes": int(run.get("length_finishes", 0)),
        "tokens": prompt + int(run["completion_tokens"]),
        "prefix_hit": int(run["cached_tokens"]) / prompt if prompt else 0.0,
        "response_hits": hits,
        "response_lookups": lookups,
        "tool_errors": sum(int(n) for n in (stats.get("tool_errors") or {}).values()),
    }


class Progress:
    """Renders run counters. Call `update(stats)` as often as you like; it throttles itself.

    Thread-safe: the log handler may draw from another thread than the one feeding stats.
    """

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
        self.text = ""
        self.lock = threading.RLock()

    def line(self, stats: dict[str, Any]) -> str:
        c = counters(stats)
        # Jobs finished by an earlier run (skipped at a resume) say nothing about this run's rate.
        new = c["ok"] + c["failed"]
        now = time.perf_counter()
        elapsed = now - self.started
        rate = new / elapsed if elapsed > 0 else 0.0
        t0, k0 = self.last_tokens
        if now - t0 >= 1.0:
            self.tokens_per_s = (c["tokens"] - k0) / (now - t0)
            self.last_tokens = (now, c["tokens"])
        elif t0 == self.started and elapsed > 0:
            # Less than a second in: the average so far.
            self.tokens_per_s = c["tokens"] / elapsed
        parts = [self.label] if self.label else []
        if self.total:
            done = min(c["done"], self.total)
            frac = done / self.total
            width = 24
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            remaining = self.total - done
            eta = 0.0 if remaining <= 0 else remaining / rate if rate > 0 else float("inf")
            # The ETA goes right after the bar: on a narrow terminal the line is cut from the right.
            parts.append(f"[{bar}] {done}/{self.total} {frac:4.0%} ETA {fmt_duration(eta)}")
        else:
            parts.append(f"{c['done']} done, elapsed {fmt_duration(elapsed)}")
        # Model calls in flight (at most max_inflight); agents waiting on tools hold no slot.
        counts = f"ok {c['ok']} failed {c['failed']} in flight {c['in_flight']}"
        if c["in_tools"]:
            counts += f" in tools {c['in_tools']}"
        if c["length_finishes"]:
            counts += f" cut off {c['length_finishes']}"
        if c["skipped"]:
            counts += f" resumed past {c['skipped']}"
        if c["tool_errors"]:
            counts += f" tool errors {c['tool_errors']}"
        parts.append(counts)
        batches = stats.get("provider_batch")
        if isinstance(batches, dict):
            # Provider batch mode: rows wait hours in batches, so batches are what moves.
            parts.append(
                f"batches submitted {batches.get('batches_submitted', 0)}"
                f" in progress {batches.get('batches_in_progress', 0)}"
                f" rows done {batches.get('rows_done', 0)}/{batches.get('rows_submitted', 0)}"
            )
        cache = f"prefix cache {c['prefix_hit']:.0%}"
        if c["response_lookups"]:
            cache += f" response cache {c['response_hits'] / c['response_lookups']:.0%}"
        parts.append(f"{rate:.1f}/s {self.tokens_per_s:,.0f} tok/s {cache}")
        return "  ".join(parts)

    def update(self, stats: dict[str, Any], *, force: bool = False) -> None:
        with self.lock:
            now = time.perf_counter()
            interval = 0.1 if self.tty else self.log_every
            if not force and now - self.last_draw < interval:
                return
            self.last_draw = now
            self.text = self.line(stats)
            if self.tty:
                self._draw()
            else:
                self.stream.write(self.text + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        columns = shutil.get_terminal_size((120, 20)).columns
        self.stream.write("\r\x1b[2K" + self.text[: columns - 1])
        self.drawn = True

    def clear(self) -> None:
        """Erase the bar so a log line or the report can be printed on a clean line."""
        with self.lock:
            if self.tty and self.drawn:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()

    def redraw(self) -> None:
        """Put the bar back after `clear()`."""
        with self.lock:
            if self.tty and self.text:
                self._draw()
                self.stream.flush()

    def close(self, stats: dict[str, Any]) -> None:
        with self.lock:
            self.update(stats, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
            self.drawn = False
            self.text = ""


class BarLogHandler(logging.Handler):
    """Prints log records on the progress bar's stream without tearing it: clear the bar, write the
    record on its own line, draw the bar again below it."""

    def __init__(self, progress: Progress, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            with self.progress.lock:
                self.progress.clear()
                self.progress.stream.write(text + "\n")
                self.progress.redraw()
                self.progress.stream.flush()
        except Exception:
            self.handleError(record)
