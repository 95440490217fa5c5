"""`@tool`: turns a Python function into a tool the model can call.

The JSON Schema of the arguments comes from the signature (through pydantic), the description from
the docstring. Arguments from the model are validated before the function runs; a validation error
or an exception raised by the function becomes an error message the model sees.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import pydantic

__all__ = ["Tool", "http_get", "list_dir", "read_file", "tool", "web_search"]

F = TypeVar("F", bound=Callable[..., Any])


class ToolDefinitionError(ValueError):
    """A function cannot be a tool: a parameter without annotation, `*args`, an unsupported type."""


@dataclass(frozen=True)
class Tool:
    """A callable offered to the model. Calling it calls the function directly."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]
    #: Validates the model's arguments; `None` for a tool whose schema is used as it is (an MCP
    #: server's), whose arguments are passed on as the JSON object the model wrote.
    arguments_model: type[pydantic.BaseModel] | None
    #: `True`: results kept in this process; `"redis"`: also in Redis, shared by every worker.
    cache: bool | Literal["redis"] = False
    cache_ttl: float | None = None
    cache_max_entries: int = 10_000
    max_concurrency: int | None = None
    rate_limit: float | None = None
    timeout: float | None = None
    batch_handler: Callable[[list[dict[str, Any]]], Any] | None = None
    batch_window: float = 0.01
    batch_max: int = 64
    inline: bool | None = None
    side_effects: bool = False
    on_error: Literal["report", "raise"] = "report"
    is_async: bool = field(default=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def options(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cache": bool(self.cache),
            "cache_shared": self.cache == "redis",
            "cache_ttl": self.cache_ttl,
            "cache_max_entries": self.cache_max_entries,
            "max_concurrency": self.max_concurrency,
            "rate_limit": self.rate_limit,
            "timeout": self.timeout,
            "batch_window": self.batch_window if self.batch_handler is not None else None,
            "batch_max": self.batch_max,
            "side_effects": self.side_effects,
            "on_error": self.on_error,
        }

    def parse_arguments(self, arguments_json: str) -> dict[str, Any]:
        """Validate the model's arguments; raises `pydantic.ValidationError`."""
        if self.arguments_model is None:
            return _json_object(self.name, arguments_json)
        model = self.arguments_model.model_validate_json(arguments_json)
        # A model's `__dict__` holds exactly its fields (extras and private attributes live apart).
        return dict(model.__dict__)


class _JsonObject(pydantic.RootModel[dict[str, Any]]):
    pass


def _json_object(name: str, arguments_json: str) -> dict[str, Any]:
    # Through pydantic so a bad argument string fails as every other tool's does.
    return _JsonObject.model_validate_json(arguments_json or "{}").root


def flatten_tools(tools: Iterable[Tool | Iterable[Tool]]) -> list[Tool]:
    """`tools=` as given: tools, and tool sources (a list of tools, an MCP server's) in place."""
    if isinstance(tools, (str, bytes, Tool)):
        raise TypeError(f"tools: expected a list of tools, got {tools!r}")
    flat: list[Tool] = []
    for item in tools:
        if isinstance(item, Tool):
            flat.append(item)
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes, dict)):
            for inner in item:
                if not isinstance(inner, Tool):
                    raise TypeError(f"tools: {inner!r} is not a tool; decorate it with @batchagent_rs.tool")
                flat.append(inner)
        else:
            raise TypeError(f"tools: {item!r} is not a tool; decorate it with @batchagent_rs.tool")
    return flat


def encode_result(value: Any) -> str:
    """A tool's return value as the text the model sees."""
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str, ensure_ascii=False)


def _arguments_model(fn: Callable[..., Any], name: str) -> type[pydantic.BaseModel]:
    try:
        signature = inspect.signature(fn)
        hints = inspect.get_annotations(fn, eval_str=True)
    except (TypeError, ValueError, NameError) as exc:
        raise ToolDefinitionError(f"tool '{name}': cannot read the signature: {exc}") from exc
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"tool '{name}': parameter '{param.name}': *args and **kwargs cannot be described to a model"
            )
        if param.name not in hints:
            raise ToolDefinitionError(f"tool '{name}': parameter '{param.name}' needs a type annotation")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], default)
    try:
        return pydantic.create_model(f"{name}_arguments", **fields)
    except (pydantic.PydanticSchemaGenerationError, TypeError) as exc:
        raise ToolDefinitionError(f"tool '{name}': {exc}") from exc


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n", 1)[0].strip()


def _make_tool(fn: Callable[..., Any], **options: Any) -> Tool:
    name = options.pop("name", None) or fn.__name__
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ToolDefinitionError(f"tool name '{name}' must be letters, digits, '_' or '-'")
    description = options.pop("description", None) or _description(fn)
    model = _arguments_model(fn, name)
    try:
        parameters = model.model_json_schema()
    except pydantic.PydanticInvalidForJsonSchema as exc:
        raise ToolDefinitionError(f"tool '{name}': {exc}") from exc
    parameters.pop("title", None)
    if options.get("inline") is not None and inspect.iscoroutinefunction(fn):
        raise ToolDefinitionError(f"tool '{name}': inline= is for sync functions; async ones run on the loop")
    if options.get("on_error", "report") not in ("report", "raise"):
        raise ToolDefinitionError(
            f"tool '{name}': on_error must be 'report' or 'raise', not {options['on_error']!r}"
        )
    cache = options.get("cache", False)
    if not (isinstance(cache, bool) or cache == "redis"):
        raise ToolDefinitionError(f"tool '{name}': cache must be True, False or \"redis\", not {cache!r}")
    if cache == "redis" and options.get("batch_handler") is not None:
        raise ToolDefinitionError(
            f"tool '{name}': cache=\"redis\" shares single calls; a batch_handler's calls are not shared"
        )
    if options.get("side_effects") and options.get("cache"):
        raise ToolDefinitionError(f"tool '{name}': a tool with side effects cannot be cached")
    return Tool(
        fn=fn,
        name=name,
        description=description,
        parameters=parameters,
        arguments_model=model,
        is_async=inspect.iscoroutinefunction(fn),
        **options,
    )


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    cache: bool | Literal["redis"] = False,
    cache_ttl: float | None = None,
    cache_max_entries: int = 10_000,
    max_concurrency: int | None = None,
    rate_limit: float | None = None,
    timeout: float | None = None,
    batch_handler: Callable[[list[dict[str, Any]]], Sequence[Any] | Awaitable[Sequence[Any]]] | None = None,
    batch_window: float = 0.01,
    batch_max: int = 64,
    inline: bool | None = None,
    side_effects: bool = False,
    on_error: Literal["report", "raise"] = "report",
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None, /, **options: Any
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Declare a tool. Sync functions run in a thread pool, async ones on the caller's event loop.

    - `cache=True`: identical calls (same arguments) are served from a cache (`cache_ttl` seconds,
      `cache_max_entries` LRU bound). Without it identical calls still share one execution while
      in flight.
    - `cache="redis"`: the cache is shared through Redis by every process that runs the tool: the
      workers of a fleet run (the fleet's Redis), or any `Batch(redis=URL)`. The key is the tool's
      name and its canonical arguments; `cache_ttl` is the entry's time to live in Redis too.
      Identical calls made at once on different workers run once: the first marks the call as
      running (a lease renewed while it runs), the others wait for its result; a failed call is
      not stored, and a waiter then runs it itself.
    - `max_concurrency`, `rate_limit` (calls per second), `timeout` (seconds) bound executions.
    - `batch_handler`: calls arriving within `batch_window` seconds go to one call of this function
      with the list of argument dicts; it returns one result per argument set, in order.
    - `inline` (sync tools): `None` (default) runs a tool on the event loop's thread once its calls
      have averaged under 50 microseconds in the pool, and sends it back to the pool if one call
      takes over 2 ms; `True` always runs it inline, `False` always in the pool.
    - `side_effects=True`: the tool changes something outside the run (sends a message, writes a
      row). It starts only once the model's turn is complete (never from a stream that may still
      fail and be retried), and identical calls are not merged: each call the model makes runs
      once. Other tools may start from the stream; when that model call fails and is retried, the
      retried turn reuses the execution already started for the same call (same tool, same
      arguments) instead of running it again.
    - `on_error`: when the function raises (or times out, or rejects its arguments), `"report"`
      (default) sends the error text (``Error: tool `fetch` failed: ValueError: ...``) back to the
      model as the call's result and the job goes on; `"raise"` fails the job with error kind
      `tool` and a message naming the tool and the exception. Either way the error is counted in
      `RunReport.tool_errors`.
    """
    if fn is not None:
        return _make_tool(fn)

    def wrap(inner: Callable[..., Any]) -> Tool:
        return _make_tool(inner, **options)

    return wrap


# The built-in tools are tool factories: `batchagent_rs.tools.read_file(root=...)`.
from .builtin_tools import http_get, list_dir, read_file, web_search  # noqa: E402
