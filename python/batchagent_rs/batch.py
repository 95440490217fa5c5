"""`Batch`: run one task over many inputs. Scheduling, HTTP and parsing happen in the Rust core;
this module turns Python objects into a spec, answers the core's tool and validation requests in
batches, and hands back `Result` objects."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import itertools
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic

from . import _core, tables, tracing
from .notebook import NotebookProgress
from .progress import Progress, tool_not_run
from .tools import Tool, encode_result, flatten_tools

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .fleet import FleetHandle

__all__ = ["Batch", "BatchAgent", "ErrorInfo", "Result", "RunReport", "Usage"]

log = logging.getLogger("batchagent")

_FEED_CHUNK = 256
# Sync tools whose calls take less than this on average run as one thread-pool job per batch of
# calls; slower ones get a thread each so a slow tool never serialises a batch.
_FAST_TOOL_SECONDS = 0.0005
# Sync tools whose calls have averaged under this (timed in the pool first) run inline on the event
# loop: a round trip through the pool (a queue put, a thread wake-up, a call back into the loop)
# costs several times more than such a call. One inline call slower than the limit sends the tool
# back to the pool for the rest of the run. `@tool(inline=...)` overrides both.
_INLINE_TOOL_SECONDS = 0.00005
_INLINE_LIMIT_SECONDS = 0.002


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cache_creation_tokens: int = 0
    #: Some counts are estimated, not the server's: a tick's prompts sent as one prompt list and
    #: answered with one usage for the whole request (vLLM, SGLang) or for its first prompt only
    #: (llama.cpp); the total is shared out by prompt and answer length.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ErrorInfo:
    kind: str
    message: str
    retryable: bool
    attempts: int


@dataclass(frozen=True)
class Result:
    """The outcome of one input: `ok` with `output`, or not ok with `error`."""

    id: str
    index: int
    ok: bool
    output: Any
    error: ErrorInfo | None
    usage: Usage
    turns: int
    tool_calls: int
    attempts: int
    ttft: float | None
    total: float
    text: str | None = None
    repaired: bool = False
    finish_reason: str | None = None
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as the JSONL output writes it (the same names as the attributes)."""
        output = self.output
        if isinstance(output, pydantic.BaseModel):
            output = output.model_dump(mode="json")
        return {
            "id": self.id,
            "index": self.index,
            "ok": self.ok,
            "output": output,
            "text": self.text,
            "error": None if self.error is None else vars(self.error),
            "usage": vars(self.usage),
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "attempts": self.attempts,
            "repaired": self.repaired,
            "finish_reason": self.finish_reason,
            "truncated": self.truncated,
            "ttft": self.ttft,
            "total": self.total,
        }


@dataclass(frozen=True)
class RunReport:
    """Aggregates of a run."""

    jobs: int
    ok: int
    failed: int
    wall_seconds: float
    agents_per_second: float
    model_calls: int
    retries: int
    throttled: int
    validation_retries: int
    length_finishes: int
    truncated_accepted: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cache_hit_rate: float
    tool_requests: int
    tool_executions: int
    tool_coalesced: int
    tool_cache_hits: int
    tool_not_run: int
    tools_started_early: int
    # Tool executions that ended in an error (raised, timed out, rejected their arguments), by tool.
    tool_errors: dict[str, int]
    errors_by_kind: dict[str, int]
    ttft: dict[str, float | None]
    latency: dict[str, float | None]
    backend: str
    #: Model answers served from the response cache (not counted in `model_calls`).
    response_cache_hits: int = 0
    #: Jobs whose constrained request the server failed deterministically, re-sent with the schema
    #: in the prompt.
    schema_fallbacks: int = 0
    #: Conversations compacted to fit the context before a model call, the summaries written for
    #: that, and the prompt tokens compaction took off (counted before against after).
    compactions: int = 0
    compaction_summaries: int = 0
    compaction_tokens_dropped: int = 0
    #: `mode="auto"`: the calls and tokens each route took, `{"batch": {...}, "online": {...}}`, with
    #: the batch turnaround and the agents' turns the routing assumed at the end; `None` otherwise.
    auto_routes: dict[str, Any] | None = None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "raw"}
        return data

    def to_pandas(self) -> Any:
        """The report as a one-row pandas DataFrame, nested figures flattened (`ttft_p50`,
        `errors_by_kind_timeout`): the reports of several runs concatenate into one table."""
        return tables.report_to_pandas(self)

    def table(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        rows = [
            ("jobs", f"{self.jobs} ({self.ok} ok, {self.failed} failed)"),
            ("wall time", f"{self.wall_seconds:.2f} s"),
            ("agents/s", f"{self.agents_per_second:.1f}"),
            ("model calls", f"{self.model_calls} ({self.retries} retries, {self.throttled} throttled)"),
            (
                "cut off at max_tokens",
                f"{self.length_finishes} model calls"
                + (
                    f" ({self.truncated_accepted} repaired answers accepted)"
                    if self.truncated_accepted
                    else ""
                ),
            ),
            (
                "tokens",
                f"{self.prompt_tokens} prompt ({self.cached_tokens} cached), "
                f"{self.completion_tokens} completion",
            ),
            ("prefix cache hit rate", f"{self.cache_hit_rate:.1%}"),
            ("tool calls", _tool_counts(self)),
            (
                "TTFT p50 / p95 / p99",
                f"{ms(self.ttft.get('p50'))} / {ms(self.ttft.get('p95'))} / {ms(self.ttft.get('p99'))}",
            ),
            ("job latency p50 / p95", f"{ms(self.latency.get('p50'))} / {ms(self.latency.get('p95'))}"),
        ]
        if self.tool_errors:
            rows.append(("tool errors", ", ".join(f"{k}: {v}" for k, v in sorted(self.tool_errors.items()))))
        if self.raw.get("response_cache") is not None:
            rows.insert(4, ("response cache", f"{self.response_cache_hits} answers (no model call)"))
        if self.schema_fallbacks:
            rows.append(("schema in prompt", f"{self.schema_fallbacks} jobs (constrained output failed)"))
        if self.compactions:
            rows.append(
                (
                    "compaction",
                    f"{self.compactions} conversations compacted ({self.compaction_summaries} summaries), "
                    f"{self.compaction_tokens_dropped} prompt tokens dropped",
                )
            )
        if self.auto_routes is not None:
            batch, online = self.auto_routes["batch"], self.auto_routes["online"]
            rows.append(
                (
                    "auto mode",
                    f"{batch['calls']} calls through the batch API "
                    f"({batch['prompt_tokens'] + batch['completion_tokens']} tokens at half price), "
                    f"{online['calls']} online",
                )
            )
        if self.errors_by_kind:
            rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items()))))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    @classmethod
    def from_stats(cls, stats: dict[str, Any], wall: float) -> RunReport:
        run = stats["run"]
        tools = stats["tools"]
        done = run["jobs_ok"] + run["jobs_failed"]
        prompt = run["prompt_tokens"]

        def summary(s: dict[str, Any]) -> dict[str, float | None]:
            return {k: s[k] for k in ("mean", "p50", "p90", "p95", "p99", "max")}

        return cls(
            jobs=done,
            ok=run["jobs_ok"],
            failed=run["jobs_failed"],
            wall_seconds=wall,
            agents_per_second=done / wall if wall > 0 else 0.0,
            model_calls=run["model_calls"],
            retries=run["retries"],
            throttled=run["throttled"],
            validation_retries=run["validation_retries"],
            length_finishes=run["length_finishes"],
            truncated_accepted=run["truncated_accepted"],
            prompt_tokens=prompt,
            cached_tokens=run["cached_tokens"],
            completion_tokens=run["completion_tokens"],
            cache_hit_rate=run["cached_tokens"] / prompt if prompt else 0.0,
            tool_requests=tools["requests"],
            tool_executions=tools["executions"],
            tool_coalesced=tools["coalesced"],
            tool_cache_hits=tools["cache_hits"],
            tool_not_run=tool_not_run(tools),
            tools_started_early=run["tools_started_early"],
            tool_errors=dict(stats.get("tool_errors", {})),
            errors_by_kind=dict(run["errors_by_kind"]),
            ttft=summary(run["ttft"]),
            latency=summary(run["job_latency"]),
            backend=stats["backend"],
            response_cache_hits=(stats.get("response_cache") or {}).get("hits", 0),
            schema_fallbacks=run.get("schema_fallbacks", 0),
            compactions=run.get("compactions", 0),
            compaction_summaries=run.get("compaction_summaries", 0),
            compaction_tokens_dropped=run.get("compaction_tokens_dropped", 0),
            auto_routes=(stats.get("provider_batch") or {}).get("auto"),
            raw=stats,
        )


def _tool_counts(report: RunReport) -> str:
    text = (
        f"{report.tool_requests} requested: {report.tool_executions} executed, "
        f"{report.tool_coalesced} shared an identical call in flight, {report.tool_cache_hits} from cache"
    )
    if report.tool_not_run:
        text += f", {report.tool_not_run} not run (unknown tool, bad arguments or cancelled)"
    return text


OnResult = Callable[[Result], Any]


def _seconds_left(deadline: float | datetime.timedelta | datetime.datetime | None) -> float:
    """Seconds to `deadline`: a number of seconds or a timedelta (from the run's first start),
    or a datetime (naive ones are local time)."""
    if isinstance(deadline, datetime.datetime):
        return max((deadline.astimezone() - datetime.datetime.now().astimezone()).total_seconds(), 0.0)
    if isinstance(deadline, datetime.timedelta):
        deadline = deadline.total_seconds()
    if deadline is None or isinstance(deadline, bool) or not deadline >= 0:
        raise ValueError(f"deadline: expected seconds >= 0, a timedelta or a datetime, got {deadline!r}")
    return float(deadline)


# A finished job as the core hands it over (see `_core.Run.take_events`).
_ResultTuple = tuple[
    str,
    int,
    bool,
    "str | None",
    "str | None",
    "tuple[str, str, bool, int] | None",
    tuple[int, int, int, int, bool],
    tuple[int, int, int],
    "tuple[bool, bool, str | None, bool]",
    "float | None",
    float,
]


class Batch:
    """One task, many inputs. Inputs are dicts whose fields fill the `task` template (`{name}`)."""

    def __init__(
        self,
        task: str,
        *,
        system: str | None = None,
        tools: Sequence[Tool | Sequence[Tool]] = (),
        output: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        model: str | None = None,
        backend: str | Sequence[str] | None = None,
        max_inflight: int | None = None,
        max_turns: int = 8,
        window: int | None = None,
        max_attempts: int = 6,
        validation_retries: int = 2,
        call_timeout: float | None = None,
        agent_timeout: float | None = None,
        idle_timeout: float = 300.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool | None = None,
        warm_prefix: bool | None = None,
        schema_mode: str = "auto",
        on_result: OnResult | None = None,
        api_key: str | None = None,
        seed: int = 0,
        tool_threads: int = 64,
        journal: str | os.PathLike[str] | None = None,
        journal_force: bool = False,
        response_cache: str | os.PathLike[str] | None = None,
        routing: str = "prefix_affinity",
        keep_session_headers: bool = False,
        max_engine_queue: float | None = None,
        agent_hints: bool = False,
        engine_hints: bool = False,
        rpm: int | None = None,
        tpm: int | None = None,
        lookahead: int | None = None,
        kv_capacity_tokens: int | None = None,
        dedupe: bool = False,
        accept_truncated: bool = False,
        extra_body: ExtraBody | None = None,
        extra_headers: Mapping[str, str] | None = None,
        max_context_tokens: int | None = None,
        compaction: bool = True,
        compaction_keep_turns: int = 4,
        compaction_tool_output_chars: int = 4000,
        compaction_model: str | None = None,
        compaction_backend: str | None = None,
        compaction_summary_tokens: int = 512,
        mode: str = "online",
        batch_retry: str = "batch",
        batch_poll_interval: float = 5.0,
        batch_max_poll_interval: float = 60.0,
        batch_linger: float = 1.0,
        batch_max_requests: int | None = None,
        batch_max_bytes: int | None = None,
        trace: bool | TracerProvider | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        deadline: float | datetime.timedelta | datetime.datetime | None = None,
        batch_turnaround: float | None = None,
        online_inflight: int = 64,
        redis: str | None = None,
    ) -> None:
        if mode not in ("online", "provider_batch", "auto"):
            raise ValueError(f"mode: expected 'online', 'provider_batch' or 'auto', got {mode!r}")
        if batch_retry not in ("batch", "online"):
            raise ValueError(f"batch_retry: expected 'batch' or 'online', got {batch_retry!r}")
        if mode == "auto" and deadline is None:
            raise ValueError(
                "mode='auto' needs deadline=: seconds from the first start of the run (or a timedelta, or a "
                "datetime) by which every input must be done; calls go through the batch API when "
                "that leaves time for them, online otherwise"
            )
        if mode != "auto" and (deadline is not None or batch_turnaround is not None):
            raise ValueError("deadline= and batch_turnaround= apply to mode='auto' only")
        if batch_turnaround is not None and not batch_turnaround > 0:
            raise ValueError(
                f"batch_turnaround: expected a positive number of seconds, got {batch_turnaround!r}"
            )
        if online_inflight < 1:
            raise ValueError(f"online_inflight: expected at least 1, got {online_inflight!r}")
        if mode == "auto":
            _seconds_left(deadline)  # a bad deadline is refused here, not when the run starts
        self._deadline = deadline
        provider_batch = mode in ("provider_batch", "auto")
        if mode == "provider_batch" and tools:
            raise _core.SchemaError(
                "mode='provider_batch' runs single-turn jobs: a job with tools needs several model turns"
            )
        if max_inflight is None:
            # A batch call only waits for its row: many rows in flight is what fills a batch.
            max_inflight = 50_000 if provider_batch else 64
        if provider_batch and window is None:
            window = max_inflight
        if call_timeout is None:
            # A batch may take its whole 24-hour completion window, and then be re-submitted.
            call_timeout = 3 * 86_400.0 if provider_batch else 600.0
        if warm_prefix is None:
            # A warm-up request would be a row of its own, hours later: no use to a batch.
            warm_prefix = not provider_batch
        if backend is None:
            raise TypeError(
                'Batch() needs backend=: where the model runs, e.g. backend="vllm://localhost:8000", '
                '"openai://", "ollama://localhost:11434", or "sim://" for the built-in simulator'
            )
        backends = [backend] if isinstance(backend, str) else list(backend)
        if not backends or not all(isinstance(b, str) and b.strip() for b in backends):
            raise TypeError(f"backend=: expected a URL or a list of URLs, got {backend!r}")
        # local://DIR: the embedded engine, started on a loopback port for this batch and spoken to
        # as a vLLM server; it stops when the batch is gone.
        self._engines: list[Any] = []
        if any(b.strip().lower().startswith("local://") for b in backends):
            from .engine.serve import start_local

            backends, model, self._engines = start_local(backends, model)
        if model is None:
            if not all(b.strip().lower().startswith("sim://") for b in backends):
                raise TypeError(
                    f"Batch() needs model=: the name of the model {_core.display_url(backends[0])} serves"
                )
            # The simulator serves any name; this is the one its /v1/models lists.
            model = "sim-model"
        # A tool source (an MCP server's tools) counts as its tools.
        tools = flatten_tools(tools)
        self._tools = {t.name: t for t in tools}
        if len(self._tools) != len(tools):
            raise _core.SchemaError("tools: two tools have the same name")
        self._model_type: type[pydantic.BaseModel] | None = None
        schema: dict[str, Any] | None
        if output is None:
            schema = None
        elif isinstance(output, type) and issubclass(output, pydantic.BaseModel):
            self._model_type = output
            try:
                schema = output.model_json_schema()
            except pydantic.PydanticUserError as exc:
                raise _core.SchemaError(f"output: {exc}") from exc
        elif isinstance(output, dict):
            schema = output
        else:
            raise TypeError("output must be a pydantic model class, a JSON Schema dict, or None")
        if schema is not None:
            _core.check_schema(json.dumps(schema))
        self._extra_body_fn: Callable[[dict[str, Any]], Any] | None = None
        static_extra: dict[str, Any] | None = None
        if callable(extra_body):
            self._extra_body_fn = extra_body
        elif isinstance(extra_body, dict):
            try:
                static_extra = json.loads(json.dumps(extra_body))
            except (TypeError, ValueError) as exc:
                raise _core.SchemaError(f"extra_body: cannot be encoded as JSON: {exc}") from exc
        elif extra_body is not None:
            raise TypeError(
                f"extra_body: expected a dict or a function of the input returning a dict, got {extra_body!r}"
            )
        headers = _check_headers(extra_headers)
        if redis is not None:
            redis = self._fleet_url(redis)
        shared = [t.name for t in tools if t.cache == "redis"]
        if shared and redis is None:
            raise ValueError(
                f"tool '{shared[0]}' has cache=\"redis\": pass redis=URL (redis://host:6379/0), the Redis "
                "its results are shared through"
            )
        self._spec = {
            "model": model,
            "system": system,
            "task": task,
            "tools": [t.definition() for t in tools],
            "output_schema": schema,
            "schema_mode": schema_mode,
            "max_turns": max_turns,
            "max_inflight": max_inflight,
            "window": window,
            "max_attempts": max_attempts,
            "validation_retries": validation_retries,
            "call_timeout": call_timeout,
            "agent_timeout": agent_timeout,
            "idle_timeout": idle_timeout,
            "max_response_bytes": max_response_bytes,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": stream,
            "warm_prefix": warm_prefix,
            "agent_hints": agent_hints,
            "engine_hints": engine_hints,
            "rpm": rpm,
            "tpm": tpm,
            "extra_body": static_extra,
            "compaction": compaction,
            "max_context_tokens": max_context_tokens,
            "compaction_keep_turns": compaction_keep_turns,
            "compaction_tool_output_chars": compaction_tool_output_chars,
            "compaction_model": compaction_model,
            "compaction_summary_tokens": compaction_summary_tokens,
        }
        # Every setting is checked here, naming the one at fault, not when the run starts.
        _core.check_spec(json.dumps(self._spec))
        if isinstance(tool_threads, bool) or not isinstance(tool_threads, int) or tool_threads < 1:
            raise _core.SchemaError(
                f"invalid setting 'tool_threads': expected an integer of at least 1, got {tool_threads!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise _core.SchemaError(
                f"invalid setting 'seed': expected an integer from 0 to {2**64 - 1}, got {seed!r}"
            )
        self._options = {
            "backends": backends,
            "tools": [t.options() for t in tools],
            "python_validation": self._model_type is not None,
            "seed": seed,
            "api_key": api_key,
            "journal": None if journal is None else os.fspath(journal),
            "journal_force": journal_force,
            "response_cache": None if response_cache is None else os.fspath(response_cache),
            "routing": routing,
            "keep_session_headers": keep_session_headers,
            "max_engine_queue": max_engine_queue,
            "lookahead": lookahead,
            "kv_capacity_tokens": kv_capacity_tokens,
            "dedupe": dedupe,
            "accept_truncated": accept_truncated,
            "extra_headers": headers,
            "compaction_backend": compaction_backend,
            "redis": redis,
            "provider_batch": {
                "retry": batch_retry,
                "poll_interval": batch_poll_interval,
                "max_poll_interval": batch_max_poll_interval,
                "linger": batch_linger,
                "max_requests": batch_max_requests or 0,
                "max_bytes": batch_max_bytes or 0,
                # The deadline's seconds are filled in when a run starts (see _run_options).
                "auto": {"deadline": 0.0, "turnaround": batch_turnaround, "online_inflight": online_inflight}
                if mode == "auto"
                else None,
            }
            if provider_batch
            else None,
        }
        if not (trace is None or isinstance(trace, bool) or hasattr(trace, "get_tracer")):
            raise TypeError(
                f"trace=: expected None, True, False or an OpenTelemetry TracerProvider, got {trace!r}"
            )
        self._trace = trace
        if metrics_port is not None and (
            isinstance(metrics_port, bool)
            or not isinstance(metrics_port, int)
            or not 0 <= metrics_port <= 65535
        ):
            raise _core.SchemaError(
                f"invalid setting 'metrics_port': expected a port from 0 to 65535, got {metrics_port!r}"
            )
        if metrics_port is not None:
            host = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
            self._options["metrics"] = f"{host}:{metrics_port}"
        self._on_result = on_result
        self._tool_threads = tool_threads
        # Each run keeps its own state in its `_Driver`; the batch only remembers which runs are
        # going (by start order) and the figures of the latest-started run that has finished.
        self._started = itertools.count()
        self._running: dict[int, _Driver] = {}
        self._finished: tuple[int, dict[str, Any], float] | None = None
        self._checked = False
        self._backends = backends
        self._model = model
        self._api_key = api_key
        self._headers = headers
        self._redis = redis

    # -- public API -----------------------------------------------------------------------------

    def check(self) -> None:
        """Checks the backends before anything is sent: each answers within 3 s (asked with the key
        the run will send) and the model is one they serve. Raises `BackendUnavailable` naming the
        backend that did not answer, or listing the models served. The first run of a batch calls
        it; call it yourself to fail earlier."""
        _core.check_backends(self._backends, self._model, self._api_key, extra_headers=self._headers)
        self._checked = True

    def run(
        self, inputs: Inputs, *, progress: bool | None = None, retry_failed: bool = False
    ) -> list[Result]:
        """Run every input; returns results in input order. Inside a running event loop (a
        notebook) the run goes on a private loop in a worker thread while this call waits.

        `progress`: a live progress line, on stderr in a terminal, updated in place in a notebook;
        by default on when stderr is a terminal or in IPython/Jupyter.

        With `journal=` set, inputs whose result the journal holds are not run again (their result
        comes from the journal); `retry_failed=True` runs the failed ones again."""
        show = _want_progress(progress)
        return _blocking(lambda: self.arun(inputs, progress=show, retry_failed=retry_failed))

    async def arun(
        self, inputs: Inputs, *, progress: bool = False, retry_failed: bool = False
    ) -> list[Result]:
        """Run every input; returns results in input order (see `run` for `retry_failed`)."""
        options = self._run_options(retry_failed)
        view = _progress_view(_count(inputs)) if progress else None
        driver = _Driver(self, _rows(inputs), options, None if view is None else _updater(view), 0.1)
        # Results go straight into one list: no hand-over through the queue and the generator.
        results = driver.collected = []
        try:
            async for _ in driver.batches():
                pass
        finally:
            if view is not None:
                _close_view(view, driver)
        results.sort(key=_by_index)
        return results

    async def stream(self, inputs: Inputs, *, retry_failed: bool = False) -> AsyncIterator[Result]:
        """Yield results in completion order. Cancelling the iteration cancels the run."""
        driver = _Driver(self, _rows(inputs), self._run_options(retry_failed), None, 0.0)
        # Closed here, not whenever the abandoned generator is collected: leaving the loop early
        # cancels the run before the caller's next statement.
        async with contextlib.aclosing(driver.results()) as results:
            async for result in results:
                yield result

    def run_file(
        self,
        input: str | os.PathLike[str],
        output: str | os.PathLike[str],
        *,
        input_format: str = "auto",
        skip_bad_lines: bool = False,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        progress_interval: float = 0.2,
        progress: bool | None = None,
        retry_failed: bool = False,
    ) -> RunReport:
        """Run every record of an input file (JSONL, CSV, Parquet, or text with one prompt per line)
        and write one JSON line per result to `output`, all inside the core: memory stays flat
        however large the file. An `output` ending in `.parquet` is written as Parquet (the columns
        of `results_to_arrow`) once the run is complete; until then its results stream to
        `OUTPUT.partial.jsonl`, which is removed after the conversion. With `journal=` set on the
        batch, a re-run resumes where the last one stopped.
        Works inside a running event loop as `run()` does; `progress` as in `run()`."""
        show = _want_progress(progress)
        return _blocking(
            lambda: self.arun_file(
                input,
                output,
                input_format=input_format,
                skip_bad_lines=skip_bad_lines,
                on_progress=on_progress,
                progress_interval=progress_interval,
                progress=show,
                retry_failed=retry_failed,
            )
        )

    async def arun_file(
        self,
        input: str | os.PathLike[str],
        output: str | os.PathLike[str],
        *,
        input_format: str = "auto",
        skip_bad_lines: bool = False,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        progress_interval: float = 0.2,
        progress: bool = False,
        retry_failed: bool = False,
    ) -> RunReport:
        options = self._run_options(retry_failed)
        output = os.fspath(output)
        # Parquet cannot be appended to: the core streams JSONL beside it (rewritten from the
        # journal on resume), converted once the run is complete and then removed.
        parquet = output.endswith(".parquet")
        if parquet:
            tables.require_pyarrow()  # before any request, not after the run
        options["output"] = output + ".partial.jsonl" if parquet else output
        options["deliver_results"] = False
        rows: Iterable[dict[str, Any]] | None = None
        if input_format == "parquet" or (input_format == "auto" and os.fspath(input).endswith(".parquet")):
            # Parquet is read here (pyarrow), a record batch at a time; the rest stays in the core.
            rows = _parquet_rows(os.fspath(input))
        elif self._extra_body_fn is not None:
            raise ValueError(
                "extra_body as a function of the input needs the inputs read in Python: pass them to "
                "run()/stream() (a generator reading the file keeps memory flat), or give a dict"
            )
        else:
            options["input"] = {
                "path": os.fspath(input),
                "format": input_format,
                "skip_bad_lines": skip_bad_lines,
                "dedupe": self._options["dedupe"],
            }
        view = _progress_view(None) if progress else None
        callback = on_progress
        if view is not None:
            callback = _updater(view) if on_progress is None else _both(_updater(view), on_progress)
            progress_interval = min(progress_interval, 0.1)
        driver = _Driver(self, rows, options, callback, progress_interval)
        try:
            async for _ in driver.batches():
                pass
        finally:
            if view is not None:
                _close_view(view, driver)
        if parquet:
            await asyncio.get_running_loop().run_in_executor(
                None, tables.read_jsonl_to_parquet, options["output"], output
            )
            os.remove(options["output"])
        # This run's own figures, whatever else runs on the batch meanwhile.
        assert driver.final is not None
        return RunReport.from_stats(*driver.final)

    def _run_options(self, retry_failed: bool) -> dict[str, Any]:
        if retry_failed and self._options["journal"] is None:
            raise ValueError("retry_failed=True needs a journal (Batch(journal=...)) holding the earlier run")
        options: dict[str, Any] = {**self._options, "retry_failed": retry_failed}
        batch: dict[str, Any] | None = options.get("provider_batch")
        if batch is not None and batch.get("auto") is not None:
            options["provider_batch"] = {
                **batch,
                "auto": {
                    **batch["auto"],
                    "deadline": _seconds_left(self._deadline),
                    # Seconds (or a timedelta) count from the first start: a run resumed from its
                    # journal keeps the deadline the first run had.
                    "from_first_start": not isinstance(self._deadline, datetime.datetime),
                },
            }
        return options

    def report(self) -> RunReport:
        """Aggregates of the latest run: while runs are going, the live figures of the one started
        last; otherwise the finished run started last (a run abandoned earlier and cleaned up
        late never replaces a newer one's report)."""
        if self._running:
            driver = self._running[max(self._running)]
            return RunReport.from_stats(driver.stats(), driver.elapsed())
        if self._finished is None:
            raise RuntimeError("report(): nothing has run yet")
        _, stats, wall = self._finished
        return RunReport.from_stats(stats, wall)

    def _live_stats(self) -> dict[str, Any] | None:
        """The core's counters of the run started last, while one is going."""
        if not self._running:
            return None
        return self._running[max(self._running)].stats()

    def _run_started(self, driver: _Driver) -> int:
        number = next(self._started)
        self._running[number] = driver
        return number

    def _run_finished(self, number: int, stats: dict[str, Any], wall: float) -> None:
        self._running.pop(number, None)
        if self._finished is None or self._finished[0] < number:
            self._finished = (number, stats, wall)

    @property
    def metrics_url(self) -> str | None:
        """`http://host:port/metrics` of the run started last, while it goes (`metrics_port=`); the
        endpoint closes when the run ends."""
        if not self._running:
            return None
        return self._running[max(self._running)].run.metrics_url

    @property
    def spec(self) -> dict[str, Any]:
        """The settings sent to the core (for inspection and journaling)."""
        return dict(self._spec)

    def submit(self, inputs: Iterable[dict[str, Any]], *, redis: str | None = None) -> FleetHandle:
        """Puts this batch and its inputs on a new run of the Redis worker fleet (`redis=` a URL,
        `redis://host:6379/0`; the batch's own `redis=` when not given) and returns its handle
        (`status()`, `results()`, `collect(path)`) once every input is on the stream;
        `batchagent worker` processes run it. Tools and the output model must be importable by the
        workers (module-level, not in `__main__`)."""
        from .fleet import submit

        url = redis if redis is not None else self._redis
        if url is None:
            raise ValueError("submit: pass redis=URL (redis://host:6379/0), the fleet's Redis")
        return submit(self, inputs, self._fleet_url(url))

    @staticmethod
    def _fleet_url(redis: str) -> str:
        if not isinstance(redis, str) or not redis.startswith(("redis://", "rediss://", "unix://")):
            shown = _core.display_url(redis) if isinstance(redis, str) else repr(redis)
            raise ValueError(f"redis=: expected a redis:// URL, got {shown!r}")
        return redis


class BatchAgent:
    """One-call form of `Batch`: `BatchAgent.run(task=..., inputs=..., output=..., backend=..., model=...)`
    takes the same keyword arguments as `Batch(...)`, plus `inputs`. `output_schema=` is the
    former name of `output=`: still accepted, with a `DeprecationWarning`."""

    @staticmethod
    def run(
        *,
        task: str,
        inputs: Inputs,
        output: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        output_schema: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> list[Result]:
        return Batch(task, output=_output(output, output_schema), **options).run(inputs, progress=progress)

    @staticmethod
    async def arun(
        *,
        task: str,
        inputs: Inputs,
        output: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        output_schema: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        **options: Any,
    ) -> list[Result]:
        return await Batch(task, output=_output(output, output_schema), **options).arun(inputs)


def _output(
    output: type[pydantic.BaseModel] | dict[str, Any] | None,
    output_schema: type[pydantic.BaseModel] | dict[str, Any] | None,
) -> type[pydantic.BaseModel] | dict[str, Any] | None:
    if output_schema is None:
        return output
    warnings.warn("BatchAgent: output_schema= is now output=", DeprecationWarning, stacklevel=3)
    if output is not None:
        raise TypeError("BatchAgent: give output= (or the older output_schema=), not both")
    return output_schema


Inputs = Iterable[dict[str, Any]] | Any
"""Dicts (a list is checked whole before anything is sent; any other iterable is read lazily), or a
table read lazily a chunk at a time: a pandas DataFrame, a pyarrow Table, RecordBatch or
RecordBatchReader, a Hugging Face `datasets.Dataset`, or a numpy record (structured) array. A row is
a dict of its columns; missing values are None."""


def _rows(inputs: Inputs) -> Any:
    return tables.rows(inputs)


def _count(inputs: Inputs) -> int | None:
    if isinstance(inputs, Sized):
        return len(inputs)
    return tables.count(inputs)


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    if _in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None


def _progress_view(total: int | None) -> Progress | NotebookProgress:
    if _in_notebook() and not sys.stderr.isatty():
        view = NotebookProgress.open(total, label="batchagent")
        if view is not None:
            return view
    return Progress(total, stream=sys.stderr, label="batchagent")


def _updater(view: Progress | NotebookProgress) -> Callable[[dict[str, Any]], None]:
    def update(stats: dict[str, Any]) -> None:
        if view.total is None:
            # A file's inputs are counted by the core; the count arrives with the stats.
            total = stats.get("input_total")
            if isinstance(total, int) and total > 0:
                view.total = total
        view.update(stats)

    return update


def _close_view(view: Progress | NotebookProgress, driver: _Driver) -> None:
    if getattr(driver, "run", None) is None:
        view.clear()
        return
    view.close(driver.stats())


def _both(
    first: Callable[[dict[str, Any]], None], second: Callable[[dict[str, Any]], None]
) -> Callable[[dict[str, Any]], None]:
    def call(stats: dict[str, Any]) -> None:
        first(stats)
        second(stats)

    return call


_R = TypeVar("_R")


def _blocking(make: Callable[[], Coroutine[Any, Any, _R]]) -> _R:
    """Runs a coroutine to its end from sync code. Outside an event loop, with `asyncio.run`.
    Inside one (Jupyter, an async framework), on a private loop in a worker thread while this thread
    waits: the caller's loop cannot be re-entered. Ctrl-C while waiting cancels the run cleanly."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # The value goes back through a box, not as the main task's result: at its end
        # `asyncio.run` formats an error message with the repr of its SIGINT handler, which holds
        # the main task, whose repr holds its result: every answer's full text, copied twice.
        box: list[_R] = []

        async def main() -> None:
            box.append(await make())

        asyncio.run(main())
        return box[0]
    loop = asyncio.new_event_loop()
    task = loop.create_task(make())
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = loop.run_until_complete(task)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    worker = threading.Thread(target=work, name="batchagent-run", daemon=True)
    worker.start()
    try:
        worker.join()
    except KeyboardInterrupt:
        loop.call_soon_threadsafe(task.cancel)
        worker.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


# `json.dumps` with options builds a new encoder per call: a third of the cost of a small input.
_INPUT_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


def _check_headers(headers: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """`extra_headers` as the core takes them; a bad one raises `SchemaError` naming the header,
    never showing its value."""
    if headers is None:
        return []
    if not isinstance(headers, Mapping):
        raise TypeError(
            f"extra_headers: expected a dict of header names to values, got {type(headers).__name__}"
        )
    out = []
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"extra_headers: names and values must be strings (header {name!r})")
        out.append((name, value))
    _core.check_headers(out)
    return out


ExtraBody = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any] | None]

# An input as the core takes it: id, index, the input as JSON, its own extra body fields as JSON.
_Fed = tuple[str, int, str, "str | None"]


def _input_json(index: int, item: Any, extra_body: Callable[[dict[str, Any]], Any] | None = None) -> _Fed:
    if not isinstance(item, dict):
        raise _core.InputError(f"input {index}: expected a dict, got {type(item).__name__}")
    try:
        text = _INPUT_ENCODER.encode(item)
    except (TypeError, ValueError) as exc:
        raise _core.InputError(f"input {index}: cannot be encoded as JSON: {exc}") from exc
    job_id = item.get("id")
    extra = None
    if extra_body is not None:
        try:
            fields = extra_body(item)
        except Exception as exc:
            raise _core.InputError(f"input {index}: extra_body raised {type(exc).__name__}: {exc}") from exc
        if fields is not None:
            if not isinstance(fields, dict):
                raise _core.InputError(
                    f"input {index}: extra_body returned {type(fields).__name__}, not a dict"
                )
            try:
                extra = _INPUT_ENCODER.encode(fields)
            except (TypeError, ValueError) as exc:
                raise _core.InputError(f"input {index}: extra_body cannot be encoded as JSON: {exc}") from exc
    return (str(job_id) if job_id is not None else str(index)), index, text, extra


class _Driver:
    """Answers the core's requests for one run and turns its results into `Result` objects."""

    def __init__(
        self,
        batch: Batch,
        inputs: Iterable[dict[str, Any]] | None,
        options: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], None] | None,
        progress_interval: float,
    ) -> None:
        self.batch = batch
        self.inputs = inputs
        self.options = options
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.tools = batch._tools
        self.model_type = batch._model_type
        self.validated: dict[str, pydantic.BaseModel] = {}
        self.tool_time: dict[str, tuple[int, float]] = {}
        self.done_calls: list[tuple[int, bool, str]] = []
        self.demoted: set[str] = set()
        # Sync tools that run on the loop's thread (see `_INLINE_TOOL_SECONDS`), by name.
        self.inline: dict[str, Tool] = {}
        self.flush_scheduled = False
        self.background: set[asyncio.Future[Any]] = set()
        self.executor: ThreadPoolExecutor | None = None
        self.source: Iterator[Any] | None = None
        self.reader: _LazyInputs | None = None
        # When set, results are appended here instead of going through `batches()`.
        self.collected: list[Result] | None = None
        # The run's stats and wall time once it has ended.
        self.final: tuple[dict[str, Any], float] | None = None
        # Makes the spans of finished jobs when the run is traced.
        self.spans: tracing.SpanWriter | None = None

    async def results(self) -> AsyncGenerator[Result, None]:
        batches = self.batches()
        try:
            async for chunk in batches:
                for result in chunk:
                    yield result
        finally:
            # Stopping early cancels the run now, not whenever the inner generator is collected.
            await batches.aclose()

    async def batches(self) -> AsyncGenerator[list[Result], None]:
        """The run's results, as the lists that became ready together."""
        batch = self.batch
        if not batch._checked:
            # Before anything is sent: a dead backend or a model it does not serve raises here.
            await asyncio.get_running_loop().run_in_executor(None, batch.check)
        pending: list[_Fed] | None = None
        extra_body = batch._extra_body_fn
        if isinstance(self.inputs, Sequence):
            # A list can be checked whole before anything is sent.
            pending = [_input_json(i, x, extra_body) for i, x in enumerate(self.inputs)]
        options = self.options
        if pending is not None and options.get("lookahead") is None:
            # A list is in memory already: group all of it by prefix.
            options = options | {"lookahead": len(pending)}
        provider = tracing.resolve_tracer_provider(batch._trace)
        if provider is not None:
            options = options | {"trace": True}
        run = _core.Run(json.dumps(batch._spec), json.dumps(options))
        if provider is not None:
            from opentelemetry import context as otel_context

            self.spans = tracing.SpanWriter(
                provider, otel_context.get_current(), batch._backends, batch._spec, run.sim_url
            )
        skipped: list[Result] = []
        if pending is not None:
            skipped = [self._result(item) for item in run.check_inputs(pending)]
            if skipped:
                gone = {result.index for result in skipped}
                pending = [item for item in pending if item[1] not in gone]
        self.run = run
        loop = asyncio.get_running_loop()
        if pending is not None:
            self.source = iter(pending)
        elif self.inputs is not None:
            # A lazy iterable may block (a slow generator): it is read in a thread of its own, so
            # the first input goes out as soon as it is there, not once a window of them is.
            self.reader = _LazyInputs(enumerate(self.inputs), loop, self._on_read)
        self.queue: asyncio.Queue[list[Result] | None] = asyncio.Queue()
        self.failure: BaseException | None = None
        self.started = started = time.perf_counter()
        fd = run.wake_fd()
        finished = False
        ticker = loop.create_task(self._tick()) if self.on_progress is not None else None
        # Registered where the `finally` below is sure to retire it.
        number = batch._run_started(self)
        try:
            if skipped:
                for result in skipped:
                    self._deliver(result)
                self._emit(skipped)
            self._feed(run.initial_credit)
            loop.add_reader(fd, self._on_wake)
            while True:
                results = await self.queue.get()
                if results is None:
                    break
                yield results
            if self.failure is not None:
                raise self.failure
            finished = True
            error = run.error()
            if error is not None:
                raise _core.JournalError(error)
        finally:
            if ticker is not None:
                ticker.cancel()
            if self.reader is not None:
                self.reader.stop()
            loop.remove_reader(fd)
            if not finished:
                run.cancel()
            run.stop_metrics()
            for task in list(self.background):
                task.cancel()
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
            self.final = (json.loads(run.stats_json()), time.perf_counter() - started)
            batch._run_finished(number, *self.final)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.run.stats_json())  # type: ignore[no-any-return]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    async def _tick(self) -> None:
        assert self.on_progress is not None
        while True:
            await asyncio.sleep(self.progress_interval)
            try:
                self.on_progress(json.loads(self.run.stats_json()))
            except Exception:
                log.exception("on_progress raised; the run goes on")

    def _feed(self, credit: int) -> None:
        """Hand the run up to `credit` more inputs (the dispatch window's free places)."""
        if credit <= 0:
            return
        if self.reader is not None:
            self.reader.grant(credit)
            return
        if self.source is None:
            return
        # A list, checked whole up front; lazy inputs go through `_on_read`.
        chunk = list(itertools.islice(self.source, credit))
        if chunk:
            self.run.feed(chunk)
        if len(chunk) < credit:
            self.source = None
            self.run.close_input()

    def _on_read(self, items: list[tuple[int, Any]], ended: bool, error: BaseException | None) -> None:
        """Inputs the lazy reader took from the iterable (on the loop's thread)."""
        try:
            chunk: list[_Fed] = []
            # Results of the inputs that do not run (the core writes them to the output file).
            bad: list[_ResultTuple] = []
            for index, raw in items:
                try:
                    fed = _input_json(index, raw, self.batch._extra_body_fn)
                    duplicates = self.run.check_inputs([fed])
                    if duplicates:
                        bad.extend(duplicates)
                    else:
                        chunk.append(fed)
                except _core.InputError as exc:
                    raw_id = raw.get("id") if isinstance(raw, dict) else None
                    job_id = str(index if raw_id is None else raw_id)
                    bad.append(self.run.refuse_input(job_id, index, str(exc)))
            if chunk:
                self.run.feed(chunk)
            if error is not None:
                raise error
            if ended:
                self.reader = None
                self.run.close_input()
            if bad:
                refused = [self._result(item) for item in bad]
                for result in refused:
                    self._deliver(result)
                self._emit(refused)
                self._feed(len(bad))
        except BaseException as exc:  # the iterable raised, or the run refused the inputs
            self.failure = exc
            self.run.cancel()
            self.queue.put_nowait(None)

    def _on_wake(self) -> None:
        try:
            tool_calls, batch_calls, validations, finished, credit, done = self.run.take_events()
            self._serve_calls(tool_calls, batch_calls, validations)
            if self.spans is not None:
                self._write_spans()
            if finished:
                results = [self._result(item) for item in finished]
                if self.batch._on_result is not None:
                    for result in results:
                        self._deliver(result)
                self._emit(results)
            if credit:
                self._feed(credit)
            if done:
                self.queue.put_nowait(None)
        except BaseException as exc:  # surfaced by results(), never lost in a loop callback
            self.failure = exc
            self.run.cancel()
            self.queue.put_nowait(None)

    def _write_spans(self) -> None:
        assert self.spans is not None
        try:
            self.spans.write(self.run.take_traces())
        except Exception:
            log.exception("making the run's trace spans failed; the run goes on without them")
            self.spans = None

    def _serve_calls(self, tool_calls: list[Any], batch_calls: list[Any], validations: list[Any]) -> None:
        """Starts the tool calls and batch-tool calls of one wake-up and answers its validations."""
        loop = asyncio.get_running_loop()
        if tool_calls:
            self._dispatch_tools(self.run, loop, tool_calls)
        for call in batch_calls:
            self._track(loop.create_task(self._run_batch(self.run, *call)))
        if validations:
            self.run.complete_validations([self._validate(*v) for v in validations])

    def _emit(self, results: list[Result]) -> None:
        if self.collected is not None:
            self.collected.extend(results)
        else:
            self.queue.put_nowait(results)

    # -- tools ----------------------------------------------------------------------------------

    def _track(self, task: asyncio.Future[Any]) -> None:
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _finish_call(self, call_id: int, ok: bool, text: str) -> None:
        self.done_calls.append((call_id, ok, text))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_calls)

    def _flush_calls(self) -> None:
        self.flush_scheduled = False
        calls, self.done_calls = self.done_calls, []
        if calls:
            self.run.complete_tools(calls)

    def _pool(self) -> ThreadPoolExecutor:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.batch._tool_threads, thread_name_prefix="batchagent-tool")
        return self.executor

    def _dispatch_tools(
        self, run: _core.Run, loop: asyncio.AbstractEventLoop, calls: list[tuple[int, str, str]]
    ) -> None:
        fast: list[tuple[int, Tool, str]] = []
        done: list[tuple[int, bool, str]] = []
        inline = self.inline
        for call_id, name, arguments in calls:
            t = inline.get(name)
            if t is None:
                t = self.tools.get(name)
                if t is None:  # the core only asks for registered tools
                    done.append((call_id, False, f"unknown tool '{name}'"))
                    continue
                if t.is_async:
                    self._track(loop.create_task(self._call_async(t, call_id, arguments)))
                    continue
                if not self._runs_inline(t):
                    if self._is_fast(name):
                        fast.append((call_id, t, arguments))
                    else:
                        fut = loop.run_in_executor(self._pool(), self._call_sync, t, call_id, arguments)
                        fut.add_done_callback(self._sync_done)
                        self._track(fut)
                    continue
                inline[name] = t
            started = _clock()
            ok, text = _call_sync_tool(t, arguments)
            done.append((call_id, ok, text))
            if t.inline is None and _clock() - started > _INLINE_LIMIT_SECONDS:
                del inline[name]
                self.demoted.add(name)
                log.debug("tool %s was slow inline; it runs in the thread pool from now on", name)
        if fast:
            many = loop.run_in_executor(self._pool(), self._call_sync_many, fast)
            many.add_done_callback(self._sync_many_done)
            self._track(many)
        if done:
            run.complete_tools(done)

    def _runs_inline(self, t: Tool) -> bool:
        if t.inline is not None:
            return t.inline
        if t.name in self.demoted:
            return False
        count, total = self.tool_time.get(t.name, (0, 0.0))
        return count >= 8 and total / count < _INLINE_TOOL_SECONDS

    def _is_fast(self, name: str) -> bool:
        count, total = self.tool_time.get(name, (0, 0.0))
        return count >= 8 and total / count < _FAST_TOOL_SECONDS

    def _timed(self, t: Tool, arguments: str) -> tuple[bool, str]:
        started = _clock()
        try:
            return _call_sync_tool(t, arguments)
        finally:
            count, total = self.tool_time.get(t.name, (0, 0.0))
            self.tool_time[t.name] = (count + 1, total + _clock() - started)

    def _call_sync(self, t: Tool, call_id: int, arguments: str) -> tuple[int, bool, str]:
        ok, text = self._timed(t, arguments)
        return call_id, ok, text

    def _call_sync_many(self, calls: list[tuple[int, Tool, str]]) -> list[tuple[int, bool, str]]:
        return [self._call_sync(t, call_id, arguments) for call_id, t, arguments in calls]

    def _sync_done(self, fut: asyncio.Future[tuple[int, bool, str]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._finish_call(*fut.result())

    def _sync_many_done(self, fut: asyncio.Future[list[tuple[int, bool, str]]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            for item in fut.result():
                self._finish_call(*item)

    async def _call_async(self, t: Tool, call_id: int, arguments: str) -> None:
        try:
            kwargs = t.parse_arguments(arguments)
        except pydantic.ValidationError as exc:
            self._finish_call(
                call_id, False, f"invalid arguments for {t.name}: {exc.errors(include_url=False)}"
            )
            return
        try:
            value = await t.fn(**kwargs)
            self._finish_call(call_id, True, encode_result(value))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._finish_call(call_id, False, f"{type(exc).__name__}: {exc}")

    async def _run_batch(self, run: _core.Run, batch_id: int, name: str, arguments: list[str]) -> None:
        t = self.tools[name]
        handler = t.batch_handler
        assert handler is not None
        try:
            parsed = [t.parse_arguments(a) for a in arguments]
            if inspect.iscoroutinefunction(handler):
                values = await handler(parsed)
            else:
                values = await asyncio.get_running_loop().run_in_executor(self._pool(), handler, parsed)
            values = list(values)
            if len(values) != len(arguments):
                raise ValueError(
                    f"batch handler of {name} returned {len(values)} results for {len(arguments)} calls"
                )
            run.complete_batches([(batch_id, True, [(True, encode_result(v)) for v in values], "")])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            run.complete_batches([(batch_id, False, [], f"{type(exc).__name__}: {exc}")])

    # -- validation and results -----------------------------------------------------------------

    def _validate(self, validation_id: int, job_id: str, text: str) -> tuple[int, bool, str]:
        assert self.model_type is not None
        try:
            self.validated[job_id] = self.model_type.model_validate_json(text)
            return validation_id, True, ""
        except pydantic.ValidationError as exc:
            return validation_id, False, _describe_validation(exc)

    def _result(self, item: _ResultTuple) -> Result:
        job_id, index, ok, output_json, text, error, usage, counts, flags, ttft, total = item
        # Without a schema the core hands the answer over once, as `text`, and says it is the output.
        repaired, truncated, finish_reason, text_is_output = flags
        output: Any = None
        if ok:
            if self.model_type is not None:
                output = self.validated.pop(job_id, None)
                if output is None and output_json is not None:  # finished in an earlier run (journal)
                    output = self.model_type.model_validate_json(output_json)
            elif output_json is not None:
                output = json.loads(output_json)
            else:
                output = text
        prompt, cached, completion, creation, estimated = usage
        turns, tool_calls, attempts = counts
        return _make(
            Result,
            {
                "id": job_id,
                "index": index,
                "ok": ok,
                "output": output,
                "error": None if error is None else ErrorInfo(*error),
                "usage": _make(
                    Usage,
                    {
                        "prompt_tokens": prompt,
                        "cached_tokens": cached,
                        "completion_tokens": completion,
                        "cache_creation_tokens": creation,
                        "estimated": estimated,
                    },
                ),
                "turns": turns,
                "tool_calls": tool_calls,
                "attempts": attempts,
                "ttft": ttft,
                "total": total,
                "text": None if text_is_output else text,
                "repaired": repaired,
                "finish_reason": finish_reason,
                "truncated": truncated,
            },
        )

    def _deliver(self, result: Result) -> None:
        callback = self.batch._on_result
        if callback is None:
            return
        try:
            value = callback(result)
        except Exception:
            log.exception("on_result raised for input %s; the run goes on", result.index)
            return
        if inspect.isawaitable(value):
            self._track(asyncio.ensure_future(_logged(value, result.index)))


_clock = time.perf_counter


class _LazyInputs:
    """Reads `(index, input)` pairs from a lazy iterable in a thread of its own, never more than
    the credit granted (the dispatch window keeps memory bounded), and hands them to `deliver` on
    the event loop: one loop wake-up for whatever was read since the last one."""

    def __init__(
        self,
        items: Iterator[tuple[int, Any]],
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[tuple[int, Any]], bool, BaseException | None], None],
    ) -> None:
        self._items = items
        self._loop = loop
        self._deliver = deliver
        self._cond = threading.Condition()
        self._credit = 0
        self._stopped = False
        self._buffer: list[tuple[int, Any]] = []
        self._ended = False
        self._error: BaseException | None = None
        self._scheduled = False
        self._thread = threading.Thread(target=self._read, name="batchagent-inputs", daemon=True)
        self._thread.start()

    def grant(self, credit: int) -> None:
        with self._cond:
            self._credit += credit
            self._cond.notify()

    def stop(self) -> None:
        """No more reading. A `next()` in progress finishes (it cannot be interrupted); its item
        is dropped."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _read(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._credit == 0 and not self._stopped:
                    cond.wait()
                if self._stopped:
                    return
                self._credit -= 1
            error: BaseException | None = None
            ended = False
            try:
                item = next(self._items)
            except StopIteration:
                ended = True
            except BaseException as exc:
                ended, error = True, exc
            with cond:
                if self._stopped:
                    return
                if ended:
                    self._ended, self._error = True, error
                else:
                    self._buffer.append(item)
                schedule = not self._scheduled
                self._scheduled = True
            if schedule:
                try:
                    self._loop.call_soon_threadsafe(self._flush)
                except RuntimeError:  # the loop is closed: the run is over
                    return
            if ended:
                return

    def _flush(self) -> None:
        with self._cond:
            items, self._buffer = self._buffer, []
            ended, error = self._ended, self._error
            self._scheduled = False
            stopped = self._stopped
        if not stopped:
            self._deliver(items, ended, error)


def _call_sync_tool(t: Tool, arguments: str) -> tuple[bool, str]:
    """One call of a sync tool: `(ok, text)`, the result or the error message the model sees."""
    try:
        kwargs = t.parse_arguments(arguments)
    except pydantic.ValidationError as exc:
        return False, f"invalid arguments for {t.name}: {exc.errors(include_url=False)}"
    try:
        return True, encode_result(t.fn(**kwargs))
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _result_from_json(line: str) -> Result:
    """A result as the core writes it to JSONL (the worker fleet's results)."""
    r = json.loads(line)
    error = r.get("error")
    usage = r.get("usage") or {}
    return _make(
        Result,
        {
            "id": r["id"],
            "index": r["index"],
            "ok": r["ok"],
            "output": r.get("output"),
            "error": None if error is None else ErrorInfo(**error),
            "usage": Usage(**usage),
            "turns": r.get("turns", 0),
            "tool_calls": r.get("tool_calls", 0),
            "attempts": r.get("attempts", 0),
            "ttft": r.get("ttft_s"),
            "total": r.get("total_s", 0.0),
            "text": r.get("text"),
            "repaired": r.get("repaired", False),
            "finish_reason": r.get("finish_reason"),
            "truncated": r.get("truncated", False),
        },
    )


def _by_index(result: Result) -> int:
    return result.index


_T = TypeVar("_T")
_new = object.__new__
_set = object.__setattr__


def _make(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of a frozen dataclass from all of its fields, without running `__init__`: a
    third of the cost, which counts at one `Result` per input."""
    instance = _new(cls)
    _set(instance, "__dict__", fields)
    return instance


def _parquet_rows(path: str) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise _core.InputError(f"input {path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        source = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise _core.InputError(f"input {path}: {exc}") from exc
    for batch in source.iter_batches(batch_size=4096):
        yield from batch.to_pylist()


async def _logged(awaitable: Awaitable[Any], index: int) -> None:
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("on_result raised for input %s; the run goes on", index)


def _describe_validation(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        location = "/".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{location}: {err['msg']}")
    return "; ".join(parts)
