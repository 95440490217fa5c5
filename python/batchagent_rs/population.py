"""`Population`: persistent agents stepped in ticks (games, social and market simulations).

Every agent keeps its own conversation across ticks. A tick hands each agent its observation; the
model calls of all agents go out together (the engine batches them), grouped so the shared system
prompt is computed once, and the tick returns when every agent has decided or the deadline passed.
Scheduling, HTTP, tool calls and the conversations themselves live in the Rust core; this module
checks observations, answers the core's tool and validation requests, and keeps the tick figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic

from . import _core, tracing
from .batch import Batch, ErrorInfo, Result, Usage, _Driver
from .tools import Tool, flatten_tools

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["Population", "PopulationReport"]

Observation = "str | Mapping[str, Any]"

# Steps held in the core at once, as a multiple of the population: one tick's steps plus those of
# earlier ticks still finishing after their deadline.
_WINDOW_TICKS = 4


@dataclass(frozen=True)
class PopulationReport:
    """Figures of the ticks run since the population was created or loaded."""

    agents: int
    ticks: int
    #: Seconds from a tick's start to its return: `p50`, `p95`, `max`, `mean`.
    tick_latency: dict[str, float | None]
    #: Each tick's seconds, in order.
    tick_seconds: list[float]
    #: Agent steps run (one per agent observed per tick).
    steps: int
    #: Steps that got no answer before the deadline (a `Result` of error kind `deadline`).
    deadline_misses: int
    #: Answers that came after their tick's deadline: discarded, their tokens counted below.
    late_answers: int
    model_calls: int
    tool_calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    #: Share of prompt tokens the engine served from its prefix cache.
    cache_hit_rate: float
    errors_by_kind: dict[str, int]
    #: Conversations compacted before a model call to stay under the context limit.
    compactions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def table(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        lat = self.tick_latency
        rows = [
            ("agents", str(self.agents)),
            ("ticks", str(self.ticks)),
            ("tick p50 / p95 / max", f"{ms(lat['p50'])} / {ms(lat['p95'])} / {ms(lat['max'])}"),
            ("model calls", str(self.model_calls)),
            (
                "tokens",
                f"{self.prompt_tokens} prompt ({self.cached_tokens} cached), "
                f"{self.completion_tokens} completion",
            ),
            ("prefix cache hit rate", f"{self.cache_hit_rate:.1%}"),
            ("deadline misses", f"{self.deadline_misses} ({self.late_answers} late answers discarded)"),
        ]
        if self.errors_by_kind:
            rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items()))))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@dataclass
class _Tick:
    number: int
    started: float
    #: Job id -> agent id, for the steps not answered yet.
    waiting: dict[str, str]
    results: dict[str, Result] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: The tick's span, in a traced run.
    span: Span | None = None


class Population:
    """Agents `ids`, each with its own conversation, stepped one tick at a time.

    - `system`: the system prompt every agent shares (sent byte-identical, so the engine computes
      its prefix once; one warm-up request per population makes the first tick a cache hit).
    - `output`: a pydantic model (or JSON Schema) each decision must satisfy.
    - `task`: a template (`{name}` fields) that renders dict observations; string observations are
      sent as they are.
    - `deadline`: seconds; agents not answered by then get a `Result` of error kind `deadline` and
      the tick returns. Their late answers are discarded (their tokens still count in `report()`)
      and their conversations stay as they were before the tick.
    - `max_context_tokens`: each agent's conversation is compacted before a model call that would
      exceed it (or the backend's `max_model_len`), as in `Batch` (`compaction_*` settings; a
      `compaction_model` summarises the oldest turns), and the compacted conversation is the one
      the agent keeps. With `compaction=False`, a step whose conversation would exceed it
      (estimated from its size, the answer's `max_tokens` included) is not sent: its `Result` has
      error kind `context_length` and the agent's history is unchanged.
    - `engine_hints` / `agent_hints`: as in `Batch`: vLLM's `priority` (turns left) and Dynamo's
      `nvext.agent_hints` on each model call, so within a tick an agent on its answering call
      (after its tools) is served before agents still on their first call.
    - `trace`: OpenTelemetry spans as in `Batch(trace=)`: a `population.tick` span per tick (a
      child of the span current when `step` was called) and under it an `invoke_agent` span per
      agent decision, with its model and tool calls below that.
    - `prompt_list`: a tick's model calls as one `/v1/completions` request with a list of prompts
      (each conversation rendered through the model's chat template), which vLLM, SGLang,
      llama.cpp's server and the simulator take. `"auto"` (the default) uses it where the backend
      is one such endpoint, the chat template is known (`chat_template=`, or from the model name:
      Qwen models `"chatml"`, Llama 3.1+ models `"llama3.1"`, Llama 3 models `"llama3"`) and no
      engine hints are asked for; `True` insists (refused at the first tick where it cannot be),
      `False` sends chat calls. Tools go into the prompts as the template writes them and the tool
      calls are read out of each answer's text, so a tool-using tick is one request per round
      (the first calls, then the calls after the tools); with `"llama3"` (Llama 3.0, which has no
      tool format) calls with tools stay chat calls. A prompt cannot force a call, so constrained
      output and a `tool_choice` other than auto are not used on this path. The usage of a
      prompt-list answer is the server's per prompt where it gives one; otherwise shared out of
      the request's total (vLLM) or estimated from the first prompt's (llama.cpp), and the
      `Result`'s `usage.estimated` says so.
    - `chat_template`: `"chatml"` (Qwen2.5's template, tools included), `"llama3"` (Llama 3's
      headers; for a model named Llama 3.1 or later, 3.1's format), `"llama3.1"` (Meta's Llama 3.1
      template: the system header `Cutting Knowledge Date: December 2023` / `Today Date: 26 Jul
      2024`, tools in the first user turn, `{"name", "parameters"}` calls, `ipython` results;
      Llama 3.2 models get today's date, as their template writes it), or a Jinja template: its
      source, or the path of a `tokenizer_config.json` (its `chat_template`, `bos_token`,
      `eos_token`) or of a `.jinja` file, rendered as Hugging Face's `apply_chat_template` renders
      it. A template that does not compile or render fails at the first tick, before any request.
    - Other settings as in `Batch`; `max_inflight` defaults to the number of agents, so a tick's
      calls all go out together.
    """

    def __init__(
        self,
        ids: Sequence[str],
        *,
        system: str | None = None,
        output: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        tools: Sequence[Tool | Sequence[Tool]] = (),
        model: str | None = None,
        backend: str | Sequence[str] | None = None,
        max_context_tokens: int | None = None,
        deadline: float | None = None,
        task: str | None = None,
        max_turns: int = 8,
        max_tokens: int | None = None,
        temperature: float | None = None,
        max_inflight: int | None = None,
        max_attempts: int = 6,
        validation_retries: int = 2,
        call_timeout: float = 600.0,
        stream: bool | None = None,
        warm_prefix: bool = True,
        engine_hints: bool = False,
        agent_hints: bool = False,
        schema_mode: str = "auto",
        api_key: str | None = None,
        seed: int = 0,
        tool_threads: int = 64,
        compaction: bool = True,
        compaction_keep_turns: int = 4,
        compaction_tool_output_chars: int = 4000,
        compaction_model: str | None = None,
        compaction_backend: str | None = None,
        compaction_summary_tokens: int = 512,
        trace: bool | TracerProvider | None = None,
        prompt_list: bool | str = "auto",
        chat_template: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise TypeError(f"ids: expected a list of agent ids, got {type(ids).__name__}")
        ids = list(ids)
        for i, agent in enumerate(ids):
            if not isinstance(agent, str) or not agent:
                raise _core.InputError(f"ids[{i}]: an agent id is a non-empty string, got {agent!r}")
        seen: dict[str, int] = {}
        for i, agent in enumerate(ids):
            if agent in seen:
                raise _core.InputError(
                    f"ids[{i}]: {agent!r} is also ids[{seen[agent]}]; agent ids must be unique"
                )
            seen[agent] = i
        if not ids:
            raise _core.InputError("ids: a population needs at least one agent")
        if deadline is not None and (
            isinstance(deadline, bool)
            or not isinstance(deadline, (int, float))
            or not math.isfinite(deadline)
            or deadline <= 0
        ):
            raise _core.SchemaError(
                f"invalid setting 'deadline': expected a positive number of seconds, got {deadline!r}"
            )
        if max_context_tokens is not None and (
            isinstance(max_context_tokens, bool)
            or not isinstance(max_context_tokens, int)
            or max_context_tokens < 1
        ):
            raise _core.SchemaError(
                "invalid setting 'max_context_tokens': expected a positive integer, "
                f"got {max_context_tokens!r}"
            )
        if prompt_list not in (True, False, "auto"):
            raise _core.SchemaError(
                f"invalid setting 'prompt_list': expected True, False or \"auto\", got {prompt_list!r}"
            )
        if isinstance(chat_template, os.PathLike):
            chat_template = os.fspath(chat_template)
        if chat_template is not None and not isinstance(chat_template, str):
            raise _core.SchemaError(
                "invalid setting 'chat_template': expected a template name, Jinja source or a file path, "
                f"got {chat_template!r}"
            )
        n = len(ids)
        tools = flatten_tools(tools)
        self._batch = Batch(
            task if task is not None else "{observation}",
            system=system,
            tools=tools,
            output=output,
            model=model,
            backend=backend,
            max_inflight=max_inflight if max_inflight is not None else n,
            max_turns=max_turns,
            window=_WINDOW_TICKS * n,
            max_attempts=max_attempts,
            validation_retries=validation_retries,
            call_timeout=call_timeout,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=stream,
            warm_prefix=warm_prefix,
            engine_hints=engine_hints,
            agent_hints=agent_hints,
            schema_mode=schema_mode,
            api_key=api_key,
            seed=seed,
            tool_threads=tool_threads,
            lookahead=_WINDOW_TICKS * n,
            max_context_tokens=max_context_tokens,
            compaction=compaction,
            compaction_keep_turns=compaction_keep_turns,
            compaction_tool_output_chars=compaction_tool_output_chars,
            compaction_model=compaction_model,
            compaction_backend=compaction_backend,
            compaction_summary_tokens=compaction_summary_tokens,
            trace=trace,
        )
        self._ids = ids
        self._index = seen
        self._task = task
        self._deadline = None if deadline is None else float(deadline)
        # Without compaction, a step over the limit is refused before it is sent; with it, the
        # agent loop compacts the conversation before each call.
        self._refuse_over = None if compaction else max_context_tokens
        # Engine hints go on each chat request; a prompt list has one request for all agents.
        mode = "off" if prompt_list is False else "on" if prompt_list is True else "auto"
        if mode == "auto" and (engine_hints or agent_hints):
            mode = "off"
        self._prompt_list_options: dict[str, Any] = {"prompt_list": mode, "chat_template": chat_template}
        # What `save` writes: the constructor's settings, except tools, output type and secrets.
        self._settings: dict[str, Any] = {
            "ids": ids,
            "system": system,
            "task": task,
            "model": self._batch._model,
            "backend": [_core.display_url(b) for b in self._batch._backends],
            "output_schema": self._batch._spec["output_schema"],
            "tools": [t.name for t in tools],
            "max_context_tokens": max_context_tokens,
            "deadline": self._deadline,
            "max_turns": max_turns,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "max_inflight": max_inflight,
            "max_attempts": max_attempts,
            "validation_retries": validation_retries,
            "call_timeout": call_timeout,
            "stream": stream,
            "warm_prefix": warm_prefix,
            "engine_hints": engine_hints,
            "agent_hints": agent_hints,
            "schema_mode": schema_mode,
            "seed": seed,
            "compaction": compaction,
            "compaction_keep_turns": compaction_keep_turns,
            "compaction_tool_output_chars": compaction_tool_output_chars,
            "compaction_model": compaction_model,
            "compaction_summary_tokens": compaction_summary_tokens,
            "prompt_list": prompt_list,
            "chat_template": chat_template,
        }
        self._tick = 0
        self._driver: _PopulationDriver | None = None
        # Agent states read by `load`, handed to the core when it starts.
        self._restored: list[tuple[str, str]] = []
        self._stepping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._tick_seconds: list[float] = []
        self._steps = 0
        self._misses = 0
        self._errors: dict[str, int] = {}

    # -- public API -----------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def ticks(self) -> int:
        """Ticks taken so far (a loaded population continues its count)."""
        return self._tick

    def step(self, observations: Mapping[str, str | Mapping[str, Any]]) -> dict[str, Result]:
        """One tick: each observed agent's decision, by agent id (in the order of `ids`). Agents
        without an observation sit this tick out. Inside a running event loop (a notebook) the
        tick runs on the population's own loop in a worker thread while this call waits."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            results: dict[str, Result] = self._on_own_loop(observations)
            return results
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["value"] = self._on_own_loop(observations)
            except BaseException as exc:
                outcome["error"] = exc

        # The caller's context (its current span) goes with the tick into the worker thread.
        context = contextvars.copy_context()
        worker = threading.Thread(target=context.run, args=(work,), name="batchagent-tick", daemon=True)
        worker.start()
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    async def astep(self, observations: Mapping[str, str | Mapping[str, Any]]) -> dict[str, Result]:
        """One tick (see `step`). Use either `step` or `astep` with one population: tools called by
        steps that outlive their deadline finish on the loop that started them."""
        if self._stepping:
            raise RuntimeError("a tick is already in progress; await it before starting the next")
        items = self._observations(observations)
        if not items:
            return {}
        self._stepping = True
        try:
            driver = await self._started()
            return await driver.tick(self, items)
        finally:
            self._stepping = False

    def drain(self) -> None:
        """Waits for the steps still running after their tick's deadline. Their answers are
        discarded; once they are in, `report()` counts their tokens."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._on_own_loop(self.adrain())
            return
        raise RuntimeError("drain() inside a running event loop: await adrain() instead")

    async def adrain(self) -> None:
        """Async form of `drain`."""
        if self._driver is not None:
            await self._driver.drain()

    def report(self) -> PopulationReport:
        """Per-tick latency (p50 / p95 / max), tokens, prefix-cache hits and deadline misses of
        the ticks run since the population was created or loaded."""
        stats = self._driver.stats() if self._driver is not None else None
        run = stats["run"] if stats is not None else {}
        ticks = sorted(self._tick_seconds)
        prompt = run.get("prompt_tokens", 0)
        return PopulationReport(
            agents=len(self._ids),
            ticks=len(ticks),
            tick_latency={
                "p50": _quantile(ticks, 0.5),
                "p95": _quantile(ticks, 0.95),
                "max": ticks[-1] if ticks else None,
                "mean": sum(ticks) / len(ticks) if ticks else None,
            },
            tick_seconds=list(self._tick_seconds),
            steps=self._steps,
            deadline_misses=self._misses,
            late_answers=self._driver.late_answers if self._driver is not None else 0,
            model_calls=run.get("model_calls", 0),
            tool_calls=run.get("tool_calls", 0),
            prompt_tokens=prompt,
            cached_tokens=run.get("cached_tokens", 0),
            completion_tokens=run.get("completion_tokens", 0),
            cache_hit_rate=run.get("cached_tokens", 0) / prompt if prompt else 0.0,
            errors_by_kind=dict(self._errors),
            compactions=run.get("compactions", 0),
        )

    def history(self, agent: str) -> list[dict[str, Any]]:
        """The conversation of `agent` so far (without the system prompt), as messages
        `{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}`."""
        if agent not in self._index:
            raise KeyError(f"no agent {agent!r} in this population")
        for name, state in self._states():
            if name == agent:
                messages: list[dict[str, Any]] = json.loads(state)["messages"]
                return messages
        return []

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the population (settings, tick count, every agent's conversation) to `path`, an
        SQLite file in the run journal's format, replacing it whole. Steps still running after
        their deadline are not saved (their answers are discarded anyway). Tools, the output
        model and the API key are not saved: give them to `load` again."""
        if self._stepping:
            raise RuntimeError("save(): a tick is in progress; save between ticks")
        _core.save_population(os.fspath(path), json.dumps(self._settings), self._tick, self._states())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        tools: Sequence[Tool | Sequence[Tool]] = (),
        output: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        backend: str | Sequence[str] | None = None,
        api_key: str | None = None,
        **overrides: Any,
    ) -> Population:
        """A population saved by `save`, ready to step on from its last tick. The saved tools must
        be given again (by the same names); `output` defaults to the saved JSON Schema (decisions
        then come back as dicts); `backend` to the saved URL without its query (give it again to
        keep URL options); any other constructor setting may be overridden."""
        settings_json, tick, agents = _core.load_population(os.fspath(path))
        settings: dict[str, Any] = json.loads(settings_json)
        given = flatten_tools(tools)
        saved_tools = list(settings.pop("tools", []))
        missing = sorted(set(saved_tools) - {t.name for t in given})
        if missing:
            raise _core.SchemaError(
                f"load({os.fspath(path)!r}): the population used tools {missing} not given again; "
                "pass tools=[...]"
            )
        schema = settings.pop("output_schema", None)
        saved_backend = settings.pop("backend")
        settings.update(overrides)
        population = cls(
            settings.pop("ids"),
            tools=given,
            output=output if output is not None else schema,
            backend=backend if backend is not None else saved_backend,
            api_key=api_key,
            **settings,
        )
        population._tick = tick
        population._restored = agents
        return population

    def close(self) -> None:
        """Stops the steps still running and releases the backend (and `sim://` simulator)."""
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.close()
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_running():
            loop.close()

    def __enter__(self) -> Population:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _on_own_loop(self, work: Any) -> Any:
        """Runs a tick (`work`: observations, or a coroutine) on the population's own event loop,
        kept across ticks so work started by a tick (tools of steps past their deadline) finishes
        on the loop it started on."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            loop = self._loop
            task = loop.create_task(work if asyncio.iscoroutine(work) else self.astep(work))
            try:
                return loop.run_until_complete(task)
            except KeyboardInterrupt:
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
                raise

    def _observations(self, observations: Mapping[str, Any]) -> list[tuple[str, int, str | None, str | None]]:
        if not isinstance(observations, Mapping):
            raise TypeError(
                f"observations: expected a dict of agent id -> observation, got {type(observations).__name__}"
            )
        items: list[tuple[str, int, str | None, str | None]] = []
        for agent, observation in observations.items():
            index = self._index.get(agent)
            if index is None:
                raise _core.InputError(f"observations: {agent!r} is not an agent of this population")
            if isinstance(observation, str):
                items.append((agent, index, observation, None))
            elif isinstance(observation, Mapping):
                if self._task is None:
                    raise _core.InputError(
                        f"observations[{agent!r}]: a dict observation needs a template; "
                        "give Population(task='... {field} ...')"
                    )
                try:
                    fields = json.dumps(dict(observation), default=str, ensure_ascii=False)
                except (TypeError, ValueError) as exc:
                    raise _core.InputError(
                        f"observations[{agent!r}]: cannot be encoded as JSON: {exc}"
                    ) from exc
                items.append((agent, index, None, fields))
            else:
                raise _core.InputError(
                    f"observations[{agent!r}]: expected a string or a dict, got {type(observation).__name__}"
                )
        items.sort(key=lambda item: item[1])
        return items

    async def _started(self) -> _PopulationDriver:
        if self._driver is None:
            driver = _PopulationDriver(self._batch, self._prompt_list_options)
            await driver.start()
            if self._restored:
                driver.run.restore_agents(self._restored)
                self._restored = []
            self._driver = driver
        return self._driver

    def _states(self) -> list[tuple[str, str]]:
        if self._driver is None:
            return list(self._restored)
        return self._driver.run.agent_states(self._ids)

    def _record(self, seconds: float, results: dict[str, Result]) -> None:
        self._tick_seconds.append(seconds)
        self._steps += len(results)
        for result in results.values():
            if result.error is not None:
                self._errors[result.error.kind] = self._errors.get(result.error.kind, 0) + 1
                if result.error.kind == "deadline":
                    self._misses += 1


class _PopulationDriver(_Driver):
    """Answers the core's requests for a population's run, which stays open across ticks."""

    def __init__(self, batch: Batch, extra_options: dict[str, Any]) -> None:
        super().__init__(batch, None, batch._run_options(False) | extra_options, None, 0.0)
        self.current: _Tick | None = None
        #: Job id -> (agent, tick) of every step in the core, late ones included.
        self.steps: dict[str, tuple[str, int]] = {}
        #: Where the decision spans of a traced run go: each tick's span context, kept while the
        #: tick has steps in the core (late ones too), with the number of those steps.
        self.tick_spans: dict[int, tuple[Context, int]] = {}
        self.late_answers = 0
        #: Set when a step finishes, while a tick waits for room in the window.
        self.room: asyncio.Event | None = None
        #: When each agent's last step finished, as a count of finished steps: the next tick sends
        #: the most recently finished agents first (see `tick`).
        self.last_finished: dict[str, int] = {}
        self.finished_count = 0

    async def start(self) -> None:
        batch = self.batch
        if not batch._checked:
            await asyncio.get_running_loop().run_in_executor(None, batch.check)
        provider = tracing.resolve_tracer_provider(batch._trace)
        options = self.options | {"trace": True} if provider is not None else self.options
        self.run = _core.Run(json.dumps(batch._spec), json.dumps(options))
        if provider is not None:
            from opentelemetry import context as otel_context

            self.spans = tracing.SpanWriter(
                provider, otel_context.get_current(), batch._backends, batch._spec, self.run.sim_url
            )
        self.started = time.perf_counter()
        self.failure: BaseException | None = None

    async def tick(
        self, population: Population, items: list[tuple[str, int, str | None, str | None]]
    ) -> dict[str, Result]:
        run = self.run
        loop = asyncio.get_running_loop()
        fd = run.wake_fd()
        loop.add_reader(fd, self._on_wake)
        tick: _Tick | None = None
        try:
            # Steps of earlier ticks still finishing hold places in the window.
            while len(self.steps) + len(items) > run.window:
                self.room = asyncio.Event()
                await self.room.wait()
                self._raise_failure()
            self.room = None
            number = population._tick + 1
            started = time.perf_counter()
            started_ns = time.time_ns()
            job_ids = {agent: f"{agent}#{number}" for agent, *_ in items}
            # Most recently finished first. An engine frees a finished request's KV blocks to the
            # back of its LRU list, so when the population's conversations outgrow its KV cache,
            # sending agents in the same order every tick makes each arrival evict the blocks of the
            # agent due next (every history missed, recomputed whole); most recent first, the
            # evictions fall on the agents sent last and the rest hit.
            last = self.last_finished
            sent = sorted(items, key=lambda item: -last.get(item[0], 0))
            refused = dict(
                run.feed_agents(
                    [(agent, job_ids[agent], index, text, fields) for agent, index, text, fields in sent],
                    population._refuse_over,
                )
            )
            # Counted once its steps are started: refused observations leave no tick behind.
            population._tick = number
            tick = _Tick(number, started, {job_ids[a]: a for a, *_ in items if job_ids[a] not in refused})
            for job_id, agent in tick.waiting.items():
                self.steps[job_id] = (agent, number)
            for agent, index, *_ in items:
                if job_ids[agent] in refused:
                    tick.results[agent] = _failed(
                        agent, index, "context_length", refused[job_ids[agent]], 0, 0.0
                    )
            self.current = tick
            if self.spans is not None:
                tick.span = self.spans.start_tick(number, len(items), started_ns)
                if tick.waiting:
                    self.tick_spans[number] = (self.spans.context_of(tick.span), len(tick.waiting))
            if tick.waiting:
                timeout = population._deadline
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(tick.done.wait(), timeout)
            self._raise_failure()
            elapsed = time.perf_counter() - started
            if tick.waiting:
                run.expire(list(tick.waiting))
                for agent in tick.waiting.values():
                    message = (
                        f"agent {agent!r}: no decision within the deadline of {population._deadline} s "
                        f"(tick {number}); a later answer is discarded"
                    )
                    tick.results[agent] = _failed(
                        agent, population._index[agent], "deadline", message, 1, elapsed
                    )
                tick.waiting = {}
            results = {agent: tick.results[agent] for agent, *_ in items}
            population._record(elapsed, results)
            if self.spans is not None and tick.span is not None:
                errors = sum(1 for r in results.values() if r.error is not None)
                misses = sum(
                    1 for r in results.values() if r.error is not None and r.error.kind == "deadline"
                )
                self.spans.end_tick(tick.span, started_ns + round(elapsed * 1e9), misses, errors)
                tick.span = None
            return results
        finally:
            if tick is not None and tick.waiting:
                # Cancelled (Ctrl-C, a task cancelled): the steps go on, their answers unwanted.
                run.expire(list(tick.waiting))
            if tick is not None and tick.span is not None:
                tick.span.end()
            self.current = None
            loop.remove_reader(fd)

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self.run.wake_fd()
        loop.add_reader(fd, self._on_wake)
        try:
            while self.steps:
                self.room = asyncio.Event()
                await self.room.wait()
                self._raise_failure()
        finally:
            self.room = None
            loop.remove_reader(fd)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.run.stats_json())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.run.cancel()
        for task in list(self.background):
            task.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _on_wake(self) -> None:
        try:
            tool_calls, batch_calls, validations, finished, _credit, _done = self.run.take_events()
            self._serve_calls(tool_calls, batch_calls, validations)
            if self.spans is not None:
                self._write_decision_spans()
            for item in finished:
                self._finished(item)
        except BaseException as exc:  # surfaced by the tick, never lost in a loop callback
            self.failure = exc
            if self.current is not None:
                self.current.done.set()
            if self.room is not None:
                self.room.set()

    def _write_decision_spans(self) -> None:
        assert self.spans is not None
        try:
            self.spans.write(self.run.take_traces(), self._placed)
        except Exception:
            _log.exception("making the population's trace spans failed; it goes on without them")
            self.spans = None

    def _placed(self, job: dict[str, Any]) -> tuple[Context, dict[str, Any]]:
        """A decision span's parent (its tick's span) and its agent attributes."""
        assert self.spans is not None
        agent, number = self.steps.get(job["id"], (None, None))
        if agent is None or number is None:
            return self.spans.parent, {}
        tick = self.current
        late = tick is None or tick.number != number or job["id"] not in tick.waiting
        extra: dict[str, Any] = {"gen_ai.agent.id": agent, "batchagent.tick": number}
        if late:
            extra["batchagent.late_answer"] = True
        parent, left = self.tick_spans.get(number, (self.spans.parent, 1))
        if left <= 1:
            self.tick_spans.pop(number, None)
        else:
            self.tick_spans[number] = (parent, left - 1)
        return parent, extra

    def _finished(self, item: Any) -> None:
        job_id = item[0]
        step = self.steps.pop(job_id, None)
        result = self._result(item)
        if self.room is not None:
            self.room.set()
        if step is None:
            return
        agent, number = step
        self.finished_count += 1
        self.last_finished[agent] = self.finished_count
        tick = self.current
        if tick is None or tick.number != number or job_id not in tick.waiting:
            self.late_answers += 1
            return
        del tick.waiting[job_id]
        # The core knows the step by its job id; the caller knows the agent.
        tick.results[agent] = _as_agent(result, agent)
        if not tick.waiting:
            tick.done.set()


_log = logging.getLogger("batchagent")


def _as_agent(result: Result, agent: str) -> Result:
    fields = dict(vars(result))
    fields["id"] = agent
    return Result(**fields)


def _failed(agent: str, index: int, kind: str, message: str, attempts: int, total: float) -> Result:
    return Result(
        id=agent,
        index=index,
        ok=False,
        output=None,
        error=ErrorInfo(kind=kind, message=message, retryable=False, attempts=attempts),
        usage=Usage(),
        turns=0,
        tool_calls=0,
        attempts=attempts,
        ttft=None,
        total=total,
    )


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]
