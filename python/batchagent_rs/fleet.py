"""The worker fleet: a run shared by any number of workers on any number of machines through Redis
Streams. `submit` puts a batch's spec (stored once, by fingerprint) and its inputs on a stream;
each `worker` reads jobs with its consumer group, runs them through the same scheduler as
`Batch.run`, checkpoints every agent turn in Redis and writes each result once, by job id; jobs of
a worker that died are taken over after their lease and resume from their last turn.

    handle = Batch(task, tools=[lookup], backend="vllm://gpu-1:8000", model=...).submit(
        inputs, redis="redis://127.0.0.1:6379/0"
    )
    # on each machine: batchagent worker --redis redis://127.0.0.1:6379/0
    handle.collect("results.jsonl")

Tools and the output model travel by import path (`module:name`): a worker imports them, and
refuses a run whose tools it cannot import or whose tools differ from the submitted ones (the
reason shows in `status`). API keys are never stored in Redis: workers use their own
(`OPENAI_API_KEY`, ...).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pydantic

from . import _core
from .tools import Tool, tool

if TYPE_CHECKING:
    from .batch import Batch, Result

__all__ = ["JOBS_GROUP", "FleetHandle", "RefusedRun", "jobs_stream", "submit", "worker"]

#: The consumer group of every run's job stream (what a KEDA redis-streams trigger names).
JOBS_GROUP: str = _core.FleetClient.GROUP


def jobs_stream(run_id: str) -> str:
    """The key of a run's job stream (a KEDA redis-streams trigger's `stream`)."""
    return _core.FleetClient.jobs_stream(run_id)


# Version of the stored run document; a worker refuses documents of another version.
_DOC_VERSION = 1
# Inputs sent to Redis per round trip.
_CHUNK = 500
# Batch options that name files or secrets of the submitting machine: not part of a fleet run.
_LOCAL_OPTIONS = ("api_key", "journal", "journal_force", "response_cache", "retry_failed", "redis")


class RefusedRun(_core.RunError):
    """A worker cannot take a run: a tool or the output model does not import, or differs."""


def _import_path(obj: Any, what: str) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(f"{what}: workers import it by module path, and {obj!r} has none")
    if module == "__main__":
        raise ValueError(f"{what}: defined in __main__, which a worker cannot import; move it into a module")
    return f"{module}:{qualname}"


def _resolve(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def _document(batch: Batch) -> dict[str, Any]:
    options = batch._options
    if options.get("journal") is not None or options.get("response_cache") is not None:
        raise ValueError(
            "a fleet run keeps its checkpoints and results in Redis: journal= and response_cache= "
            "do not apply to it"
        )
    if options.get("provider_batch") is not None:
        raise ValueError("mode='provider_batch' runs in one process; it cannot be submitted to a fleet")
    tools = {name: _import_path(t.fn, f"tool '{name}'") for name, t in batch._tools.items()}
    output = None if batch._model_type is None else _import_path(batch._model_type, "output model")
    return {
        "version": _DOC_VERSION,
        "spec": batch._spec,
        "options": {k: v for k, v in options.items() if k not in _LOCAL_OPTIONS},
        "tools": tools,
        "output": output,
        "tool_threads": batch._tool_threads,
    }


class FleetHandle:
    """A submitted run: its status, its results as they finish, all of them in input order."""

    def __init__(self, run_id: str, redis: str) -> None:
        self.run_id = run_id
        self.redis = redis
        self._client = _core.FleetClient(redis)

    def status(self) -> dict[str, Any]:
        """`total`, `done` (ok results), `failed`, `in_flight`, `queued`, `claims` (jobs taken
        over after a lease ran out), `resumed` (of those, resumed from a checkpoint), `rate`
        (results/s over the last 10 s), `rate_overall`, and `workers` (name, `last_seen_s`,
        `alive`, `results`, `in_flight`, `rate`, `host`, `pid`, `refused`)."""
        return json.loads(self._client.status_json(self.run_id))  # type: ignore[no-any-return]

    def complete(self) -> bool:
        s = self.status()
        return bool(s["submitted"]) and s["done"] + s["failed"] >= s["total"]

    async def results(self, *, poll: float = 0.5) -> AsyncIterator[Result]:
        """Each input's result as it is written (completion order), until every input has one."""
        from .batch import _result_from_json

        cursor = "0"
        seen = 0
        loop = asyncio.get_running_loop()
        while True:
            cursor, lines = await loop.run_in_executor(
                None, self._client.results_since, self.run_id, cursor, 1000, int(poll * 1000)
            )
            for line in lines:
                seen += 1
                yield _result_from_json(line)
            if not lines:
                status = await loop.run_in_executor(None, self.status)
                if status["submitted"] and seen >= status["total"]:
                    return

    def collect(self, path: str | os.PathLike[str], *, wait: bool = True, poll: float = 0.5) -> int:
        """Writes one JSON line per input, in input order, to `path` (replaced atomically); returns
        the number of lines. With `wait`, waits for the run to complete; otherwise raises
        `RunError` if it is not."""
        while True:
            written = self._client.collect(self.run_id, os.fspath(path))
            if written is not None:
                return int(written)
            if not wait:
                s = self.status()
                raise _core.RunError(
                    f"run {self.run_id} is not complete: {s['done'] + s['failed']} of {s['total']} "
                    "inputs have a result"
                )
            # Waiting for the workers: nothing to synchronise on but the count in Redis.
            time.sleep(poll)

    def __repr__(self) -> str:
        return f"FleetHandle(run_id={self.run_id!r})"


def _client(redis: str) -> _core.FleetClient:
    return _core.FleetClient(redis)


def create(batch: Batch, redis: str) -> tuple[_core.FleetClient, str]:
    """Stores the batch's spec and creates an empty run: `(client, run id)`."""
    doc = json.dumps(_document(batch), sort_keys=True)
    client = _client(redis)
    run_id, _ = client.create_run(doc)
    return client, run_id


def submit(batch: Batch, inputs: Iterable[dict[str, Any]], redis: str) -> FleetHandle:
    """Puts the batch's spec and every input on a new run; returns once all are on the stream."""
    from .batch import _input_json

    client, run_id = create(batch, redis)
    seen: dict[str, int] = {}
    chunk: list[tuple[str, int, str, str | None]] = []
    total = 0
    for index, item in enumerate(inputs):
        fed = _input_json(index, item, batch._extra_body_fn)
        first = seen.setdefault(fed[0], index)
        if first != index:
            raise _core.InputError(
                f"input {index}: id {fed[0]!r} is also the id of input {first}; ids must be unique"
            )
        chunk.append(fed)
        total += 1
        if len(chunk) >= _CHUNK:
            client.add_jobs(run_id, chunk)
            chunk = []
    if chunk:
        client.add_jobs(run_id, chunk)
    client.close_run(run_id, total)
    return FleetHandle(run_id, redis)


def submit_file(batch: Batch, path: str, redis: str, input_format: str = "auto") -> FleetHandle:
    """Like `submit`, with the inputs read from a file by the core (JSONL, CSV or text)."""
    if batch._extra_body_fn is not None:
        raise ValueError("extra_body as a function of the input needs the inputs read in Python")
    client, run_id = create(batch, redis)
    total = client.add_file(run_id, json.dumps(batch._spec), path, input_format)
    client.close_run(run_id, total)
    return FleetHandle(run_id, redis)


def _rebuild(doc: dict[str, Any], concurrency: int | None, redis: str) -> tuple[Batch, int]:
    """The batch a run document describes, with this worker's tools; `RefusedRun` when a tool or
    the output model cannot be imported or is not the one submitted. Also the fleet-wide limit."""
    from .batch import Batch

    if doc.get("version") != _DOC_VERSION:
        raise RefusedRun(f"the run was submitted by another version (document {doc.get('version')!r})")
    tools: list[Tool] = []
    for name, path in doc["tools"].items():
        try:
            value = _resolve(path)
        except Exception as exc:
            raise RefusedRun(f"tool '{name}': cannot import {path}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, Tool):
            value = tool(value)
        tools.append(value)
    output: Any = None
    spec = doc["spec"]
    if doc["output"] is not None:
        try:
            output = _resolve(doc["output"])
        except Exception as exc:
            raise RefusedRun(
                f"output model: cannot import {doc['output']}: {type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(output, type) and issubclass(output, pydantic.BaseModel)):
            raise RefusedRun(f"output model: {doc['output']} is not a pydantic model class")
    else:
        output = spec.get("output_schema")
    options = doc["options"]
    accepted = inspect.signature(Batch.__init__).parameters
    kwargs: dict[str, Any] = {k: v for k, v in spec.items() if k in accepted and k not in ("task", "tools")}
    kwargs.update(
        {
            "backend": options["backends"],
            "seed": options["seed"],
            "routing": options["routing"],
            "keep_session_headers": options["keep_session_headers"],
            "max_engine_queue": options["max_engine_queue"],
            "kv_capacity_tokens": options["kv_capacity_tokens"],
            "accept_truncated": options["accept_truncated"],
            "extra_headers": dict(options["extra_headers"]) or None,
            "compaction_backend": options["compaction_backend"],
            "tool_threads": doc["tool_threads"],
            # Tools with cache="redis" share their results through the fleet's Redis.
            "redis": redis,
        }
    )
    shared = int(spec["max_inflight"])
    if concurrency is not None:
        kwargs["max_inflight"] = concurrency
        kwargs["window"] = None
    try:
        batch = Batch(spec["task"], tools=tools, output=output, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RefusedRun(f"the run's settings do not build here: {exc}") from exc
    mine = {k: v for k, v in batch._spec.items() if k not in ("max_inflight", "window")}
    theirs = {k: v for k, v in spec.items() if k not in ("max_inflight", "window")}
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise RefusedRun(
            "this worker's tools or settings differ from the submitted ones: " + ", ".join(differ)
        )
    return batch, shared


def _default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def _work(batch: Batch, fleet: dict[str, Any]) -> None:
    from .batch import _Driver

    options = batch._run_options(False) | {
        "deliver_results": False,
        "lookahead": 0,
        "fleet": fleet,
    }
    driver = _Driver(batch, None, options, None, 0.0)
    async for _ in driver.batches():
        pass


def worker(
    redis: str,
    *,
    run: str | None = None,
    concurrency: int | None = None,
    tools_from: Sequence[str] = (),
    lease_seconds: float = 30.0,
    once: bool = False,
    name: str | None = None,
    poll: float = 1.0,
    outage_seconds: float = 300.0,
) -> int:
    """Works on the fleet's runs, oldest first, until stopped; returns the number of runs worked
    on. `run`: only that run, returning once every input of it has a result. `once`: return when
    no run is left to work on. `concurrency`: this worker's model calls in flight (the run's
    `max_inflight` stays the limit summed over every worker). `tools_from`: modules imported
    first. A job not renewed for `lease_seconds` (the worker died) is taken over by another."""
    for module in tools_from:
        importlib.import_module(module)
    from .batch import _blocking

    client = _client(redis)
    name = name or _default_name()
    refused: set[str] = set()
    worked = 0
    while True:
        runs = [run] if run is not None else [r for r in client.open_runs() if r not in refused]
        took = False
        for run_id in runs:
            _, text = client.load_spec(run_id)
            try:
                batch, shared = _rebuild(json.loads(text), concurrency, redis)
            except RefusedRun as exc:
                client.refuse(run_id, name, str(exc))
                refused.add(run_id)
                if run is not None:
                    raise
                continue
            fleet = {
                "redis": redis,
                "run_id": run_id,
                "consumer": name,
                "lease_seconds": lease_seconds,
                "outage_seconds": outage_seconds,
                "read_ahead": max(8, (concurrency or shared) // 4),
                "shared_inflight": shared,
            }
            _blocking(functools.partial(_work, batch, fleet))
            worked += 1
            took = True
            break
        if run is not None:
            return worked
        if not took:
            if once:
                return worked
            # Waiting for a run to be submitted.
            time.sleep(poll)
