"""Workflows over many results. `reduce` combines results (or pydantic objects, or strings) into
one validated output; when they do not fit one context, groups of `fan_in` are reduced in parallel
(one `Batch` run per level) and their outputs reduced again until one remains, every prompt counted
against the model's context with the backend's tokenizer. `plan_map_reduce` asks a planner model
for the map inputs, runs them through a worker `Batch` and reduces the results, with one SQLite
journal for the whole workflow: killed at any stage and run again, it sends nothing it already has
an answer for."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import string
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic

from . import _core
from .batch import Batch, ErrorInfo, Result, Usage, _blocking

__all__ = [
    "Planner",
    "Reducer",
    "WorkflowResult",
    "aplan_map_reduce",
    "areduce",
    "plan_map_reduce",
    "reduce",
]

Output = type[pydantic.BaseModel] | dict[str, Any] | None

_FIRST_LEVEL = "Combine the {n} items below into one answer."
_LATER_LEVEL = (
    "Each of the {n} items below already combines a part of the original items; combine them into one answer."
)
# Tries at cutting an item that does not fit on its own (each try cuts it in proportion).
_CUT_TRIES = 6


def _item_text(item: Any) -> str | None:
    """The text an item is shown to the reducer as; `None` for a failed `Result` (nothing to combine)."""
    if isinstance(item, Result):
        if not item.ok:
            return None
        item = item.output
    if isinstance(item, pydantic.BaseModel):
        return item.model_dump_json()
    if isinstance(item, str):
        return item
    return json.dumps(item, ensure_ascii=False, default=str)


def _prompt(task: str, texts: Sequence[str], level: int) -> str:
    header = (_FIRST_LEVEL if level == 0 else _LATER_LEVEL).format(n=len(texts))
    body = "\n\n".join(f"## Item {i + 1}\n{text}" for i, text in enumerate(texts))
    return f"{task}\n\n{header}\n\n{body}"


def _sum_usage(results: Iterable[Result]) -> Usage:
    total = Usage()
    for r in results:
        total = Usage(
            prompt_tokens=total.prompt_tokens + r.usage.prompt_tokens,
            cached_tokens=total.cached_tokens + r.usage.cached_tokens,
            completion_tokens=total.completion_tokens + r.usage.completion_tokens,
            cache_creation_tokens=total.cache_creation_tokens + r.usage.cache_creation_tokens,
            estimated=total.estimated or r.usage.estimated,
        )
    return total


class _Store:
    """The workflow's own rows in its SQLite journal: the plan and every reduce group's result,
    each committed as soon as it is known. The map stage's jobs are in the same file, in the
    run journal's tables."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS workflow(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, key: str) -> Any:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT value FROM workflow WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO workflow(key, value) VALUES(?, ?)", (key, json.dumps(value)))


def _result_from_dict(data: dict[str, Any], model: type[pydantic.BaseModel] | None) -> Result:
    output = data["output"]
    if model is not None and data["ok"] and output is not None:
        output = model.model_validate(output)
    error = data.get("error")
    return Result(
        id=data["id"],
        index=data["index"],
        ok=data["ok"],
        output=output,
        error=None if error is None else ErrorInfo(**error),
        usage=Usage(**data["usage"]),
        turns=data["turns"],
        tool_calls=data["tool_calls"],
        attempts=data["attempts"],
        ttft=data.get("ttft"),
        total=data["total"],
        text=data.get("text"),
        repaired=data.get("repaired", False),
        finish_reason=data.get("finish_reason"),
        truncated=data.get("truncated", False),
    )


class _Reduction:
    """One reduce: its `Batch` (task `{prompt}`), the token counter of its backend and its budget."""

    def __init__(
        self,
        *,
        task: str,
        output: Output,
        model: str | None,
        backend: str | Sequence[str] | None,
        fan_in: int,
        system: str | None,
        max_tokens: int | None,
        max_context_tokens: int | None,
        api_key: str | None,
        max_inflight: int,
    ) -> None:
        if not isinstance(task, str) or not task.strip():
            raise TypeError("reduce: task= must be a non-empty string saying how to combine the items")
        if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 2:
            raise _core.SchemaError(
                f"invalid setting 'fan_in': expected an integer of at least 2, got {fan_in!r}"
            )
        if max_context_tokens is not None and max_context_tokens < 1:
            raise _core.SchemaError(
                f"invalid setting 'max_context_tokens': must be at least 1, got {max_context_tokens}"
            )
        self.task = task
        self.fan_in = fan_in
        self.batch = Batch(
            "{prompt}",
            system=system,
            output=output,
            model=model,
            backend=backend,
            max_tokens=max_tokens,
            max_inflight=max_inflight,
            max_turns=1,
            api_key=api_key,
            stream=False,
        )
        self.model_type = self.batch._model_type
        first = self.batch._backends[0]
        self.counter = _core.TokenCounter(first, self.batch._model, api_key)
        self.system = _core.system_prompt(json.dumps(self.batch._spec))
        limits = [n for n in (max_context_tokens, self.counter.window) if n is not None]
        self.limit: int | None = min(limits) if limits else None
        self.budget: int | None = None
        if self.limit is not None:
            room = max_tokens if max_tokens is not None else self.limit // 8
            self.budget = max(1, self.limit - room)
        #: The largest prompt sent, in tokens (counted), for the caller to check against `limit`.
        self.largest_prompt = 0

    def count(self, prompts: Sequence[str]) -> list[int]:
        return list(self.counter.count([(self.system, p) for p in prompts]))

    def cut(self, text: str, allowance: int, level: int) -> str:
        """`text` cut (head kept, with a marker) until a prompt of it alone fits `allowance`."""
        for _ in range(_CUT_TRIES):
            [tokens] = self.count([_prompt(self.task, [text], level)])
            if tokens <= allowance:
                return text
            keep = int(len(text) * allowance / tokens * 0.9)
            text = text[:keep] + f"\n[... {len(text) - keep} characters cut to fit the context]"
        return text

    def groups(self, texts: list[str], level: int) -> list[list[str]]:
        """Consecutive groups of at most `fan_in` items whose prompts fit the budget, each counted."""
        if self.budget is None:
            return [texts[i : i + self.fan_in] for i in range(0, len(texts), self.fan_in)]
        [frame] = self.count([_prompt(self.task, [], level)])
        alone = self.budget
        if len(texts) > 1:
            # Two items must fit together, or the tree would never get smaller.
            alone = frame + (self.budget - frame) // 2
        sizes = self.count([_prompt(self.task, [t], level) for t in texts])
        texts = [self.cut(t, alone, level) if s > alone else t for t, s in zip(texts, sizes, strict=True)]
        sizes = [s - frame for s in self.count([_prompt(self.task, [t], level) for t in texts])]
        groups: list[list[str]] = []
        current: list[str] = []
        used = frame
        for text, size in zip(texts, sizes, strict=True):
            if current and (len(current) >= self.fan_in or used + size > self.budget):
                groups.append(current)
                current, used = [], frame
            current.append(text)
            used += size
        if current:
            groups.append(current)
        return self.verified(groups, level)

    def verified(self, groups: list[list[str]], level: int) -> list[list[str]]:
        """Every group's whole prompt counted; a group over the budget is split in two."""
        assert self.budget is not None
        out: list[list[str]] = []
        pending = groups
        while pending:
            counts = self.count([_prompt(self.task, g, level) for g in pending])
            again: list[list[str]] = []
            for group, tokens in zip(pending, counts, strict=True):
                if tokens <= self.budget or len(group) == 1:
                    out.append(group)
                    self.largest_prompt = max(self.largest_prompt, tokens)
                else:
                    half = len(group) // 2
                    again += [group[:half], group[half:]]
            pending = again
        order = {id(g[0]): i for i, g in enumerate(groups)}
        out.sort(key=lambda g: order.get(id(g[0]), len(order)))
        return out

    async def run(self, items: Iterable[Any], store: _Store | None, stage: str) -> Result:
        started = time.monotonic()
        texts = [t for t in (_item_text(i) for i in items) if t is not None]
        if not texts:
            raise ValueError("reduce: no items to combine (every Result given had failed, or none was given)")
        calls: list[Result] = []
        level = 0
        while True:
            groups = self.groups(texts, level)
            prompts = [_prompt(self.task, g, level) for g in groups]
            results = await self.level(prompts, level, store, stage)
            calls += results
            failed = next((r for r in results if not r.ok), None)
            if failed is not None or len(results) == 1:
                root = failed or results[0]
                break
            texts = [t for t in (_item_text(r) for r in results) if t is not None]
            level += 1
        error = root.error
        if failed is not None and error is not None:
            message = f"reduce level {level}, group {failed.index}: {error.message}"
            error = dataclasses.replace(error, message=message)
        return Result(
            id="reduce",
            index=0,
            ok=root.ok,
            output=root.output if root.ok else None,
            error=error,
            usage=_sum_usage(calls),
            turns=sum(r.turns for r in calls),
            tool_calls=0,
            attempts=sum(r.attempts for r in calls),
            ttft=None,
            total=time.monotonic() - started,
            text=root.text,
            repaired=root.repaired,
            finish_reason=root.finish_reason,
            truncated=root.truncated,
        )

    async def level(self, prompts: list[str], level: int, store: _Store | None, stage: str) -> list[Result]:
        """One level's groups, reduced in parallel by one Batch run; with a store, groups it holds
        are not sent again and each finished one is stored as it finishes."""
        keys = [
            f"{stage}/L{level}/G{i}/" + hashlib.sha256(p.encode()).hexdigest()[:16]
            for i, p in enumerate(prompts)
        ]
        held: dict[int, Result] = {}
        if store is not None:
            for i, key in enumerate(keys):
                data = store.get(key)
                if data is not None:
                    held[i] = _result_from_dict(data, self.model_type)
        todo = [{"id": f"L{level}-G{i}", "prompt": p} for i, p in enumerate(prompts) if i not in held]
        if todo:
            positions = [int(row["id"].split("-G")[1]) for row in todo]

            def keep(result: Result) -> None:
                position = positions[result.index]
                fixed = dataclasses.replace(result, index=position)
                held[position] = fixed
                if store is not None and fixed.ok:
                    store.put(keys[position], fixed.to_dict())

            self.batch._on_result = keep
            try:
                await self.batch.arun(todo)
            finally:
                self.batch._on_result = None
        return [held[i] for i in range(len(prompts))]


async def areduce(
    items: Iterable[Any],
    *,
    task: str,
    output: Output = None,
    model: str | None = None,
    backend: str | Sequence[str] | None = None,
    fan_in: int = 16,
    system: str | None = None,
    max_tokens: int | None = None,
    max_context_tokens: int | None = None,
    api_key: str | None = None,
    max_inflight: int = 64,
    journal: str | os.PathLike[str] | None = None,
) -> Result:
    """`reduce`, awaited."""
    reduction = _Reduction(
        task=task,
        output=output,
        model=model,
        backend=backend,
        fan_in=fan_in,
        system=system,
        max_tokens=max_tokens,
        max_context_tokens=max_context_tokens,
        api_key=api_key,
        max_inflight=max_inflight,
    )
    store = None if journal is None else _Store(journal)
    return await reduction.run(items, store, "reduce")


def reduce(
    items: Iterable[Any],
    *,
    task: str,
    output: Output = None,
    model: str | None = None,
    backend: str | Sequence[str] | None = None,
    fan_in: int = 16,
    system: str | None = None,
    max_tokens: int | None = None,
    max_context_tokens: int | None = None,
    api_key: str | None = None,
    max_inflight: int = 64,
    journal: str | os.PathLike[str] | None = None,
) -> Result:
    """Combines `items` (`Result`s, whose failed ones are left out; pydantic objects; strings;
    JSON values) into one output validated against `output=`, as one `Result` whose `usage` sums
    every call made. When the items do not fit one prompt, groups of at most `fan_in` are reduced in
    parallel, then their outputs, until one remains; every prompt is counted with the backend's
    tokenizer (`/tokenize` on vLLM and the simulator) and kept within the context
    (`max_context_tokens=`, or the window `/v1/models` reports, less `max_tokens` for the answer).
    With `journal=` (an SQLite file) each finished group is kept, and a run again sends only the
    groups it does not hold."""
    return _blocking(
        lambda: areduce(
            items,
            task=task,
            output=output,
            model=model,
            backend=backend,
            fan_in=fan_in,
            system=system,
            max_tokens=max_tokens,
            max_context_tokens=max_context_tokens,
            api_key=api_key,
            max_inflight=max_inflight,
            journal=journal,
        )
    )


@dataclass(frozen=True)
class Planner:
    """The planner stage: one call that turns the goal into the map stage's inputs. `task` is a
    template with `{goal}`; the answer is a JSON object `{"inputs": [...]}` whose items carry one
    string field per variable of the worker's task, between `min_items` and `max_items` of them."""

    backend: str | Sequence[str]
    model: str | None = None
    task: str = "Plan the work for this goal: {goal}\nList the inputs of the work, one item each."
    system: str | None = None
    min_items: int = 1
    max_items: int | None = None
    max_tokens: int | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class Reducer:
    """The reduce stage: as `reduce(task=, output=, model=, backend=, fan_in=, ...)`."""

    task: str
    backend: str | Sequence[str]
    output: Output = None
    model: str | None = None
    fan_in: int = 16
    system: str | None = None
    max_tokens: int | None = None
    max_context_tokens: int | None = None
    api_key: str | None = None
    max_inflight: int = 64


@dataclass(frozen=True)
class WorkflowResult:
    """What `plan_map_reduce` produced: the planner's call, the map inputs it planned, the map
    stage's results (in input order) and the reduced output."""

    plan: Result
    inputs: list[dict[str, Any]]
    results: list[Result]
    reduced: Result


def _variables(template: str) -> list[str]:
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name and name not in names:
            names.append(name)
    return names


def _plan_schema(variables: Sequence[str], planner: Planner) -> dict[str, Any]:
    items: dict[str, Any] = {
        "type": "object",
        "properties": {v: {"type": "string"} for v in variables},
        "required": list(variables),
    }
    inputs: dict[str, Any] = {"type": "array", "items": items, "minItems": planner.min_items}
    if planner.max_items is not None:
        inputs["maxItems"] = planner.max_items
    return {"type": "object", "properties": {"inputs": inputs}, "required": ["inputs"]}


def _check_plan(inputs: Any, variables: Sequence[str]) -> list[dict[str, Any]]:
    if not isinstance(inputs, list):
        raise _core.InputError(f"the planner's inputs are not a list: {type(inputs).__name__}")
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise _core.InputError(f"plan item {index} is not an object: {item!r}")
        for name in variables:
            if name not in item:
                have = ", ".join(sorted(item)) or "no fields"
                raise _core.InputError(
                    f"plan item {index} has no '{name}', which the worker's task uses as {{{name}}} "
                    f"(the item has: {have})"
                )
    return inputs


async def aplan_map_reduce(
    goal: str,
    *,
    planner: Planner,
    worker: Batch,
    reducer: Reducer,
    journal: str | os.PathLike[str] | None = None,
) -> WorkflowResult:
    """`plan_map_reduce`, awaited."""
    variables = _variables(str(worker._spec["task"]))
    store = None if journal is None else _Store(journal)
    plan_batch = Batch(
        planner.task,
        system=planner.system,
        output=_plan_schema(variables, planner),
        model=planner.model,
        backend=planner.backend,
        max_tokens=planner.max_tokens,
        max_turns=1,
        api_key=planner.api_key,
        stream=False,
    )
    reduction = _Reduction(
        task=reducer.task,
        output=reducer.output,
        model=reducer.model,
        backend=reducer.backend,
        fan_in=reducer.fan_in,
        system=reducer.system,
        max_tokens=reducer.max_tokens,
        max_context_tokens=reducer.max_context_tokens,
        api_key=reducer.api_key,
        max_inflight=reducer.max_inflight,
    )
    # Stage 1: the plan, kept once made.
    held = None if store is None else store.get("plan")
    if held is not None:
        plan = _result_from_dict(held, None)
    else:
        [plan] = await plan_batch.arun([{"id": "plan", "goal": goal}])
        if not plan.ok:
            assert plan.error is not None
            raise _core.RunError(f"the planner failed ({plan.error.kind}): {plan.error.message}")
        if store is not None:
            store.put("plan", plan.to_dict())
    inputs = _check_plan(plan.output["inputs"], variables)
    # Stage 2: the map, in the journal's run tables: finished jobs come from it.
    mapper = worker
    if journal is not None:
        mapper = _with_journal(worker, os.fspath(journal))
    results = await mapper.arun(inputs)
    # Stage 3: the reduce, each finished group kept.
    reduced = await reduction.run(results, store, "reduce")
    return WorkflowResult(plan=plan, inputs=inputs, results=results, reduced=reduced)


def _with_journal(batch: Batch, journal: str) -> Batch:
    copy = object.__new__(Batch)
    copy.__dict__.update(batch.__dict__)
    copy._options = {**batch._options, "journal": journal}
    copy._running = {}
    copy._finished = None
    return copy


def plan_map_reduce(
    goal: str,
    *,
    planner: Planner,
    worker: Batch,
    reducer: Reducer,
    journal: str | os.PathLike[str] | None = None,
) -> WorkflowResult:
    """Plan -> map -> reduce. A planner call (`Planner`) turns `goal` into the map inputs, checked
    against the worker's task variables (an item without one raises `InputError` naming the item
    and the variable); the worker `Batch` runs them; `reduce` (`Reducer`) combines the results. Each
    stage has its own model and backend. With `journal=` (one SQLite file for the workflow), a
    workflow killed at any stage and started again with the same arguments does not plan again once
    planned, sends none of the map jobs that finished, and none of the reduce groups that did."""
    return _blocking(
        lambda: aplan_map_reduce(goal, planner=planner, worker=worker, reducer=reducer, journal=journal)
    )
