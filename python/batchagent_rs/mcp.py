"""MCP servers as tool sources: `tools=[mcp_tools("python -m my_server"),
mcp_tools("http://127.0.0.1:9000/mcp")]`.

Talks to the server through the official `mcp` SDK, 2.x (`pip install "batchagent[mcp]"`), over stdio (a
command line, started as a child process) or Streamable HTTP (a URL). The server's tools are
listed once, when `mcp_tools` is called; their input schemas are offered to the model as the
server wrote them. Each becomes a `Tool`, so its calls go through the ToolPool like any other
tool's: identical calls in flight share one execution, and `cache=`, `max_concurrency=`,
`rate_limit=` and `timeout=` apply.

The SDK's session is bound to the event loop it was opened on; it lives on a loop of its own in a
background thread, so tools work from any run (`Batch.run`, `Population.step`, several loops).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import shlex
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .tools import Tool, ToolDefinitionError

__all__ = ["McpError", "McpTools", "mcp_tools"]

# Seconds to connect, initialise and list the tools.
_CONNECT_TIMEOUT = 30.0

_OPEN: weakref.WeakSet[McpTools] = weakref.WeakSet()


class McpError(RuntimeError):
    """An MCP server could not be started, reached or listed, or a call to it failed."""


class McpTools(Sequence[Tool]):
    """The tools of one MCP server (a sequence of `Tool`), and the connection they share. Closed
    by `close()`, by leaving a `with` block, or at interpreter exit."""

    def __init__(self, target: str, tools: list[Tool], connection: _Connection) -> None:
        self.target = target
        self._tools = tools
        self._connection = connection
        _OPEN.add(self)

    def __getitem__(self, index: Any) -> Any:
        return self._tools[index]

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools)

    def __repr__(self) -> str:
        return f"McpTools({self.target!r}, tools={[t.name for t in self._tools]})"

    def close(self) -> None:
        """Ends the session (and stops a stdio server)."""
        self._connection.close()
        _OPEN.discard(self)

    def __enter__(self) -> McpTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mcp_tools(
    server: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    include: Sequence[str] | None = None,
    prefix: str = "",
    cache: bool = False,
    cache_ttl: float | None = None,
    max_concurrency: int | None = None,
    rate_limit: float | None = None,
    timeout: float | None = 60.0,
    side_effects: bool = False,
    on_error: str = "report",
    per_tool: Mapping[str, Mapping[str, Any]] | None = None,
) -> McpTools:
    """Connects to an MCP server and returns its tools.

    - `server`: an `http://` / `https://` URL (Streamable HTTP), or a command line to start a stdio
      server (`"python -m my_server"`, or a list of arguments). `env` adds environment variables
      for a stdio server; `headers` are sent with every HTTP request (an `Authorization` header).
    - `include`: only these tools (by the server's names); `prefix` is put before each name the
      model sees (two servers with a tool of the same name).
    - `cache`, `cache_ttl`, `max_concurrency`, `rate_limit`, `timeout`, `side_effects`, `on_error`:
      as for `@tool`, for every tool of the server; `per_tool={"name": {...}}` overrides them for
      one tool. A call the server answers with `isError` becomes a tool error the model sees.
    """
    try:
        import mcp  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            'mcp_tools needs the MCP SDK: pip install "batchagent[mcp]" (or pip install mcp)'
        ) from exc
    if isinstance(server, str) and server.startswith(("http://", "https://")):
        target = server
        transport: tuple[str, Any] = ("http", (server, dict(headers or {})))
    else:
        argv = shlex.split(server) if isinstance(server, str) else list(server)
        if not argv:
            raise ValueError("mcp_tools: an empty command line")
        if headers:
            raise ValueError("mcp_tools: headers= is for HTTP servers; a stdio server takes env=")
        target = " ".join(argv)
        transport = ("stdio", (argv, dict(env) if env is not None else None))
    connection = _Connection(target, transport)
    try:
        listed = connection.list_tools()
        wanted = set(include) if include is not None else None
        if wanted is not None:
            unknown = sorted(wanted - {t["name"] for t in listed})
            if unknown:
                raise McpError(f"MCP server {target}: no tools named {unknown}")
        common = {
            "cache": cache,
            "cache_ttl": cache_ttl,
            "max_concurrency": max_concurrency,
            "rate_limit": rate_limit,
            "timeout": timeout,
            "side_effects": side_effects,
            "on_error": on_error,
        }
        overrides = dict(per_tool or {})
        unknown = sorted(set(overrides) - {t["name"] for t in listed})
        if unknown:
            raise McpError(f"MCP server {target}: per_tool names tools it does not have: {unknown}")
        tools = [
            _tool(connection, spec, prefix, {**common, **overrides.get(spec["name"], {})})
            for spec in listed
            if wanted is None or spec["name"] in wanted
        ]
    except BaseException:
        connection.close()
        raise
    return McpTools(target, tools, connection)


def _tool(connection: _Connection, spec: dict[str, Any], prefix: str, options: dict[str, Any]) -> Tool:
    remote = spec["name"]
    name = prefix + remote
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ToolDefinitionError(
            f"MCP tool {remote!r}: the name must be letters, digits, '_' or '-' (give prefix= or include=)"
        )
    if options.get("side_effects") and options.get("cache"):
        raise ToolDefinitionError(f"MCP tool {remote!r}: a tool with side effects cannot be cached")

    async def call(**arguments: Any) -> str:
        future = connection.submit(connection.call_tool(remote, arguments))
        return await asyncio.wrap_future(future)

    call.__name__ = name
    schema = spec["input_schema"] or {"type": "object", "properties": {}}
    return Tool(
        fn=call,
        name=name,
        description=spec["description"],
        parameters=schema,
        arguments_model=None,
        is_async=True,
        **options,
    )


class _Connection:
    """One MCP session on an event loop in a thread of its own."""

    def __init__(self, target: str, transport: tuple[str, Any]) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="batchagent-mcp", daemon=True)
        self.thread.start()
        self.session: Any = None
        self.stack: contextlib.AsyncExitStack | None = None
        self.closed = False
        try:
            self.submit(self._open(transport)).result(_CONNECT_TIMEOUT)
        except concurrent.futures.TimeoutError:
            self.close()
            raise McpError(f"MCP server {target}: no answer within {_CONNECT_TIMEOUT:.0f} s") from None
        except McpError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise McpError(f"MCP server {target}: cannot connect: {_describe(exc)}") from exc

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        if self.closed:
            coro.close()
            raise McpError(f"MCP server {self.target}: the connection is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _open(self, transport: tuple[str, Any]) -> None:
        from mcp import ClientSession

        kind, settings = transport
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        self.stack = stack
        if kind == "stdio":
            from mcp.client.stdio import StdioServerParameters, stdio_client

            argv, env = settings
            params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
            streams = await stack.enter_async_context(stdio_client(params, errlog=sys.stderr))
        else:
            from mcp.client.streamable_http import streamable_http_client

            url, headers = settings
            if headers:
                import httpx2  # the SDK's HTTP client

                # Timeouts as the SDK sets up its own client: a short connect, a long read (a slow
                # tool). A client handed in is the caller's to close: it closes with the session.
                client = await stack.enter_async_context(
                    httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(_CONNECT_TIMEOUT, read=300.0))
                )
                transport_cm = streamable_http_client(url, http_client=client)
            else:
                transport_cm = streamable_http_client(url)
            streams = await stack.enter_async_context(transport_cm)
        self.session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
        await self.session.initialize()

    def list_tools(self) -> list[dict[str, Any]]:
        try:
            return self.submit(self._list_tools()).result(_CONNECT_TIMEOUT)  # type: ignore[no-any-return]
        except concurrent.futures.TimeoutError:
            raise McpError(
                f"MCP server {self.target}: listing its tools took over {_CONNECT_TIMEOUT:.0f} s"
            ) from None
        except McpError:
            raise
        except Exception as exc:
            raise McpError(f"MCP server {self.target}: cannot list its tools: {_describe(exc)}") from exc

    async def _list_tools(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = []
        cursor = None
        while True:
            if cursor is None:
                page = await self.session.list_tools()
            else:
                from mcp_types import PaginatedRequestParams

                page = await self.session.list_tools(params=PaginatedRequestParams(cursor=cursor))
            for t in page.tools:
                tools.append(
                    {
                        "name": t.name,
                        "description": t.description or "",
                        "input_schema": t.input_schema,
                    }
                )
            cursor = page.next_cursor
            if not cursor:
                return tools

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> str:
        result = await self.session.call_tool(name, arguments)
        text = _result_text(result)
        if getattr(result, "is_error", False):
            raise McpError(f"the MCP server answered with an error: {text}")
        return text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stack is not None and self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.stack.aclose(), self.loop)
            with contextlib.suppress(BaseException):
                future.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


def _result_text(result: Any) -> str:
    """What a tool call returned, as the text the model sees: its text content, else its
    structured content as JSON; other content (images, resources) as a JSON description."""
    parts: list[str] = []
    for item in getattr(result, "content", None) or []:
        if getattr(item, "type", None) == "text":
            parts.append(item.text)
        else:
            parts.append(json.dumps(item.model_dump(mode="json", exclude_none=True), ensure_ascii=False))
    if parts:
        return "\n".join(parts)
    structured = getattr(result, "structured_content", None)
    if structured is not None:
        return json.dumps(structured, ensure_ascii=False)
    return ""


def _describe(exc: BaseException) -> str:
    # anyio task groups wrap the failure that matters in an exception group.
    inner = getattr(exc, "exceptions", None)
    if inner:
        return "; ".join(_describe(e) for e in inner)
    return f"{type(exc).__name__}: {exc}"


@atexit.register
def _close_all() -> None:
    for source in list(_OPEN):
        with contextlib.suppress(Exception):
            source.close()
