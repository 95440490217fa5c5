"""`batchagent run --dashboard`: a live multi-panel view of a run, redrawn in place on the
terminal's alternate screen. Panels: progress, engine (the scheduler's and the engine's figures
from the run's stats), timings (TTFT, model call and job latency percentiles), recent results
(read from the tail of the output file). The terminal is given back as it was on exit, on error
and on Ctrl-C."""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, TextIO

from .progress import counters, fmt_duration, tool_not_run

__all__ = ["Dashboard", "DashboardLogHandler", "FleetDashboard"]

_ENTER = "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J"
_LEAVE = "\x1b[?25h\x1b[?1049l"
# Results are read from the end of the output file only: a million-line file costs the same as ten.
_TAIL_BYTES = 64 * 1024

_GREEN = "\x1b[32m"
_RED = "\x1b[31m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


def _visible_len(text: str) -> int:
    length = 0
    i = 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            i = end + 1 if end != -1 else len(text)
            continue
        length += 1
        i += 1
    return length


def _fit(text: str, width: int) -> str:
    """Cut or pad `text` (which may hold colour codes) to exactly `width` visible characters."""
    out: list[str] = []
    seen = 0
    i = 0
    coloured = False
    while i < len(text) and seen < width:
        if text[i] == "\x1b":
            end = text.find("m", i)
            end = end if end != -1 else len(text) - 1
            out.append(text[i : end + 1])
            coloured = True
            i = end + 1
            continue
        out.append(text[i])
        seen += 1
        i += 1
    if coloured:
        out.append(_RESET)
    return "".join(out) + " " * (width - seen)


class _Boxes:
    def __init__(self, unicode: bool) -> None:
        if unicode:
            self.tl, self.tr, self.bl, self.br, self.h, self.v = "┌", "┐", "└", "┘", "─", "│"
        else:
            self.tl, self.tr, self.bl, self.br, self.h, self.v = "+", "+", "+", "+", "-", "|"

    def box(self, title: str, rows: list[str], width: int, height: int | None = None) -> list[str]:
        inner = max(width - 4, 1)
        head = f"{self.h} {title} " if title else ""
        top = self.tl + head + self.h * max(width - 2 - len(head), 0) + self.tr
        body = list(rows)
        if height is not None:
            body = body[:height] + [""] * max(height - len(body), 0)
        lines = [top]
        lines.extend(f"{self.v} {_fit(row, inner)} {self.v}" for row in body)
        lines.append(self.bl + self.h * max(width - 2, 0) + self.br)
        return lines


def _hconcat(left: list[str], right: list[str]) -> list[str]:
    return [a + b for a, b in zip(left, right, strict=True)]


def _ms(value: Any) -> str:
    if value is None:
        return "-"
    seconds = float(value)
    if seconds >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds * 1000:.0f} ms"


def _count(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0%}"


class Dashboard:
    """Draws the panels from a stream of stats dicts. Use as a context manager (or `close()` it):
    the terminal's own screen and cursor come back however the run ends."""

    def __init__(
        self,
        total: int | None,
        *,
        output: str | None = None,
        title: str = "BatchAgent",
        stream: TextIO | None = None,
        refresh: float = 0.25,
        recent: int = 50,
    ) -> None:
        self.total = total
        self.output = output
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.refresh = refresh
        self.started = time.perf_counter()
        self.last_draw = 0.0
        encoding = (getattr(self.stream, "encoding", None) or "").lower()
        self.boxes = _Boxes("utf" in encoding)
        self.recent: collections.deque[str] = collections.deque(maxlen=recent)
        self.offset = 0
        self.tokens = (self.started, 0)
        self.tokens_per_s = 0.0
        self.active = False
        self.lock = threading.Lock()
        self.notes: collections.deque[str] = collections.deque(maxlen=3)

    def __enter__(self) -> Dashboard:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        with self.lock:
            if self.active:
                return
            self.stream.write(_ENTER)
            self.stream.flush()
            self.active = True
            atexit.register(self.close)

    def close(self) -> None:
        """Leave the alternate screen and show the cursor again; safe to call twice."""
        with self.lock:
            if not self.active:
                return
            self.active = False
            self.stream.write(_LEAVE)
            self.stream.flush()
        atexit.unregister(self.close)

    def note(self, text: str) -> None:
        """A line shown under the panels (log records land here while the dashboard owns the screen)."""
        with self.lock:
            self.notes.append(text.replace("\n", " "))

    def update(self, stats: dict[str, Any], *, force: bool = False) -> None:
        with self.lock:
            if not self.active:
                return
            now = time.perf_counter()
            if not force and now - self.last_draw < self.refresh:
                return
            self.last_draw = now
            columns, rows = shutil.get_terminal_size((100, 30))
            lines = self.render(stats, columns, rows)
            # Home, then overwrite each line and erase what is left of it; erase below the frame.
            frame = (
                "\x1b[H" + "".join(line + "\x1b[K\r\n" for line in lines[:-1]) + lines[-1] + "\x1b[K\x1b[J"
            )
            self.stream.write(frame)
            self.stream.flush()

    # -- panels ---------------------------------------------------------------------------------

    def render(self, stats: dict[str, Any], columns: int, rows: int) -> list[str]:
        """The frame as lines of at most `columns` visible characters."""
        width = max(columns, 40)
        c = counters(stats)
        now = time.perf_counter()
        elapsed = now - self.started
        t0, k0 = self.tokens
        if now - t0 >= 1.0:
            self.tokens_per_s = (c["tokens"] - k0) / (now - t0)
            self.tokens = (now, c["tokens"])
        elif t0 == self.started and elapsed > 0:
            self.tokens_per_s = c["tokens"] / elapsed
        lines = self.boxes.box(self.title, self._progress_rows(c, elapsed), width)
        half = width // 2
        engine = self._engine_rows(stats)
        timing = self._timing_rows(stats)
        height = max(len(engine), len(timing))
        lines += _hconcat(
            self.boxes.box("engine", engine, half, height),
            self.boxes.box("timings", timing, width - half, height),
        )
        self._read_results()
        room = max(rows - len(lines) - 3 - len(self.notes), 1)
        recent = list(self.recent)[-room:] or [_DIM + "no results yet" + _RESET]
        lines += self.boxes.box("recent results", recent, width)
        lines += [_DIM + _fit(note, width) + _RESET for note in self.notes]
        lines.append(_DIM + _fit("Ctrl-C stops the run; it can be resumed from its journal", width) + _RESET)
        return [_fit(line, width) if _visible_len(line) > width else line for line in lines]

    def _progress_rows(self, c: dict[str, Any], elapsed: float) -> list[str]:
        new = c["ok"] + c["failed"]
        rate = new / elapsed if elapsed > 0 else 0.0
        if self.total:
            done = min(c["done"], self.total)
            frac = done / self.total
            bar_width = 40
            filled = int(frac * bar_width)
            remaining = self.total - done
            eta = 0.0 if remaining <= 0 else remaining / rate if rate > 0 else float("inf")
            first = (
                f"[{_GREEN}{'#' * filled}{_RESET}{'-' * (bar_width - filled)}] {done}/{self.total} {frac:.0%}"
                f"   elapsed {fmt_duration(elapsed)}   ETA {fmt_duration(eta)}"
            )
        else:
            first = f"{c['done']} done   elapsed {fmt_duration(elapsed)}"
        slots = f"/{c['max_inflight']}" if c["max_inflight"] else ""
        counts = (
            f"{_GREEN}ok {c['ok']}{_RESET}   {_RED}failed {c['failed']}{_RESET}"
            f"   model calls in flight {c['in_flight']}{slots}   agents in tools {c['in_tools']}"
        )
        if c["skipped"]:
            counts += f"   resumed past {c['skipped']} finished earlier"
        response = (
            f"{c['response_hits'] / c['response_lookups']:.0%} of {c['response_lookups']}"
            if c["response_lookups"]
            else "-"
        )
        speed = (
            f"{rate:.1f} jobs/s   {self.tokens_per_s:,.0f} tok/s   prefix cache {c['prefix_hit']:.0%}"
            f"   response cache {response}"
        )
        return [first, counts, speed]

    def _engine_rows(self, stats: dict[str, Any]) -> list[str]:
        run = stats["run"]
        tools = stats.get("tools", {})
        rows = [
            f"backend       {stats.get('backend', '-')}",
            f"model calls   {run['model_calls']} ({run.get('model_calls_in_flight', 0)} in flight"
            f" of {stats.get('max_inflight', '-')} slots)",
            f"retries       {run['retries']} ({run['throttled']} throttled)",
            f"validation    {run.get('validation_retries', 0)} retries,"
            f" {run.get('repaired_outputs', 0)} repaired",
            f"tools         {tools.get('requests', 0)} requested: {tools.get('executions', 0)} run,"
            f" {tools.get('coalesced', 0)} shared, {tools.get('cache_hits', 0)} cached"
            + (f", {not_run} not run" if (not_run := tool_not_run(tools)) else ""),
        ]
        if run.get("length_finishes"):
            rows.append(f"max_tokens    {run['length_finishes']} answers cut off")
        errors = dict(run.get("errors_by_kind", []))
        if errors:
            rows.append("errors        " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
        endpoints = stats.get("endpoints")
        for endpoint in endpoints if isinstance(endpoints, list) else []:
            if not isinstance(endpoint, dict):
                continue
            state = "up" if endpoint.get("up", True) else _RED + "DOWN" + _RESET
            name = str(endpoint.get("name", "?")).removeprefix("sim ").removeprefix("http://")
            rows.append(
                f"  {name[:22]:<22} {state} {endpoint.get('outstanding', 0)}/{endpoint.get('limit', '-')}"
                f"  {endpoint.get('served', 0)} served  {endpoint.get('failovers', 0)} failovers"
            )
        # The engines' own figures, scraped from their /metrics: one reading per endpoint, or none yet.
        engine = stats.get("engine")
        readings = engine if isinstance(engine, list) else [engine] if isinstance(engine, dict) else []
        for i, reading in enumerate(readings):
            if not isinstance(reading, dict):
                continue
            label = "engine" if len(readings) == 1 else f"engine {i + 1}"
            rows.append(
                f"{label:<13} queue {_count(reading.get('waiting'))}"
                f"  running {_count(reading.get('running'))}"
                f"  KV {_pct(reading.get('kv_usage'))}  prefix hits {_pct(reading.get('prefix_hit_rate'))}"
            )
        return rows

    def _timing_rows(self, stats: dict[str, Any]) -> list[str]:
        run = stats["run"]
        rows = [f"{'':<12}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}"]
        for label, key in (("TTFT", "ttft"), ("model call", "model_latency"), ("job", "job_latency")):
            s = run.get(key) or {}
            rows.append(f"{label:<12}" + "".join(f"{_ms(s.get(q)):>9}" for q in ("p50", "p90", "p99", "max")))
        return rows

    def _read_results(self) -> None:
        if self.output is None:
            return
        try:
            size = os.path.getsize(self.output)
        except OSError:
            return
        if size < self.offset:
            # Rewritten from the journal at a resume.
            self.offset = 0
        start = max(self.offset, size - _TAIL_BYTES)
        if start >= size:
            return
        try:
            with open(self.output, "rb") as fh:
                fh.seek(start)
                chunk = fh.read(size - start)
        except OSError:
            return
        end = chunk.rfind(b"\n")
        if end == -1:
            return
        skipped_ahead = start > self.offset
        self.offset = start + end + 1
        lines = chunk[:end].split(b"\n")
        if skipped_ahead:
            # The chunk starts somewhere inside a line.
            lines = lines[1:]
        for raw in lines[-(self.recent.maxlen or 8) :]:
            self.recent.append(self._describe(raw))

    @staticmethod
    def _describe(raw: bytes) -> str:
        try:
            item = json.loads(raw)
        except ValueError:
            return _DIM + "(unreadable line)" + _RESET
        if not isinstance(item, dict):
            return _DIM + "(unreadable line)" + _RESET
        ident = str(item.get("id", item.get("index", "?")))[:16]
        total = item.get("total")
        timing = f"{float(total):6.2f}s" if isinstance(total, int | float) else "     - "
        if item.get("ok"):
            output = item.get("output")
            if output is None:
                output = item.get("text")
            text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
            text = " ".join(str(text).split())
            return f"{_GREEN}ok{_RESET}   {ident:<16} {item.get('turns', '-')} turns {timing}  {text}"
        error = item.get("error") or {}
        kind = error.get("kind", "error") if isinstance(error, dict) else "error"
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        return f"{_RED}fail{_RESET} {ident:<16} {kind}: {' '.join(str(message).split())}"


class DashboardLogHandler(logging.Handler):
    """While the dashboard owns the screen, log records become notes under its panels (a plain
    write would scroll the frame)."""

    def __init__(self, dashboard: Dashboard, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.dashboard = dashboard

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.dashboard.note(self.format(record))
        except Exception:
            self.handleError(record)


class FleetDashboard(Dashboard):
    """`batchagent status RUN_ID --watch`: a fleet run's progress and its workers (heartbeat,
    results, jobs held, rate), redrawn from each `status()` dict."""

    def render(self, stats: dict[str, Any], columns: int, rows: int) -> list[str]:
        width = max(columns, 40)
        s = stats
        total, finished = int(s["total"]), int(s["done"]) + int(s["failed"])
        frac = finished / total if total else 0.0
        bar_width = 40
        filled = int(frac * bar_width)
        so_far = "" if s["submitted"] else " (still being submitted)"
        bar = f"[{_GREEN}{'#' * filled}{_RESET}{'-' * (bar_width - filled)}]"
        progress = [
            f"{bar} {finished}/{total}{so_far} {frac:.0%}",
            f"{_GREEN}done {s['done']}{_RESET}   {_RED}failed {s['failed']}{_RESET}"
            f"   in flight {s['in_flight']}   queued {s['queued']}"
            f"   taken over {s['claims']} ({s['resumed']} from a checkpoint)",
            f"{s['rate']:.1f} results/s (last 10 s)"
            + ("" if s.get("rate_overall") is None else f"   {s['rate_overall']:.1f} results/s overall"),
        ]
        lines = self.boxes.box(f"{self.title} {s['run_id']}", progress, width)
        workers = [f"{'worker':<24} {'state':<8} {'seen':>8} {'results':>9} {'held':>6} {'rate/s':>8}  host"]
        for w in s["workers"]:
            if w["refused"]:
                workers.append(f"{w['name']:<24} {_RED}refused{_RESET}  {w['refused']}")
                continue
            state = f"{_GREEN}alive{_RESET}   " if w["alive"] else f"{_DIM}gone{_RESET}    "
            rate = "-" if w["rate"] is None else f"{w['rate']:.1f}"
            host = f"{w['host'] or '-'}:{w['pid'] or '-'}"
            workers.append(
                f"{w['name']:<24} {state} {w['last_seen_s']:>6.1f} s {w['results']:>9} {w['in_flight']:>6}"
                f" {rate:>8}  {host}"
            )
        if len(workers) == 1:
            workers.append(_DIM + "no worker has taken the run yet" + _RESET)
        room = max(rows - len(lines) - 3, 2)
        if len(workers) > room:
            hidden = len(workers) - room + 1
            workers = [*workers[: room - 1], _DIM + f"... and {hidden} more" + _RESET]
        lines += self.boxes.box("workers", workers, width)
        lines.append(_DIM + _fit("Ctrl-C leaves this view; the run goes on", width) + _RESET)
        return [_fit(line, width) if _visible_len(line) > width else line for line in lines]
