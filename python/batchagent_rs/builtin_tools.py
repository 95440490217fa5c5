"""Built-in tools, exposed as `batchagent_rs.tools.read_file(root=...)` and so on. Each call builds
a `Tool` bound to its settings (a root folder, allowed hosts, an API key read from the environment);
pass the same options as `@tool` (`cache=`, `timeout=`, `max_concurrency=`, ...) to tune how the
ToolPool runs it. There is deliberately no tool that runs code."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from email.message import Message
from pathlib import Path
from typing import Any

__all__ = ["http_get", "list_dir", "read_file", "web_search"]

_DEFAULT_FILE_BYTES = 256 * 1024
_DEFAULT_HTTP_BYTES = 1024 * 1024
_MAX_REDIRECTS = 5
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-ndjson")


class ToolAccessError(PermissionError):
    """A path outside the tool's root, or a host the tool may not reach."""


def _root(root: str | os.PathLike[str], who: str) -> Path:
    try:
        base = Path(root).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{who}: root {os.fspath(root)!r} cannot be used: {exc}") from exc
    if not base.is_dir():
        raise ValueError(f"{who}: root {os.fspath(root)!r} is not a directory")
    return base


def _confined(base: Path, path: str) -> Path:
    """`path` (relative to `base`) with every link resolved, refused unless it stays under `base`."""
    if "\0" in path:
        raise ToolAccessError(f"{path!r}: not a valid path")
    try:
        target = (base / path).resolve(strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ToolAccessError(f"{path}: cannot be resolved: {exc}") from None
    if target != base and not target.is_relative_to(base):
        raise ToolAccessError(f"{path}: outside the folder this tool may read")
    return target


def _check_opened(base: Path, fd: int, path: str) -> None:
    """After opening: what the descriptor refers to is still under `base` (a link swapped in
    between resolving and opening is caught here, where /proc tells)."""
    proc = f"/proc/self/fd/{fd}"
    if not os.path.exists(proc):
        return
    real = Path(os.readlink(proc))
    if real != base and not real.is_relative_to(base):
        raise ToolAccessError(f"{path}: outside the folder this tool may read")


def read_file(
    root: str | os.PathLike[str],
    *,
    max_bytes: int = _DEFAULT_FILE_BYTES,
    name: str = "read_file",
    **options: Any,
) -> Any:
    """A tool that reads a UTF-8 text file under `root`. Paths are resolved (links included) and
    refused when they lead outside `root`; files over `max_bytes` and binary files are refused."""
    from .tools import tool

    base = _root(root, name)
    if max_bytes < 1:
        raise ValueError(f"{name}: max_bytes must be at least 1")

    def read(path: str) -> str:
        """Read a text file. `path` is relative to the folder this tool serves."""
        target = _confined(base, path)
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            _check_opened(base, fd, path)
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{path}: is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise ToolAccessError(f"{path}: not a regular file")
            if info.st_size > max_bytes:
                raise ValueError(f"{path}: {info.st_size} bytes, over this tool's limit of {max_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise ValueError(f"{path}: over this tool's limit of {max_bytes} bytes")
        if b"\0" in data:
            raise ValueError(f"{path}: a binary file, not text")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None

    read.__name__ = name
    return tool(name=name, **options)(read)


def list_dir(
    root: str | os.PathLike[str],
    *,
    max_entries: int = 1000,
    name: str = "list_dir",
    **options: Any,
) -> Any:
    """A tool that lists a folder under `root` (`"."` for the root itself): each entry's name,
    type (`file`, `dir`, `link`, `other`) and size in bytes (files), sorted by name, at most
    `max_entries` of them. Links are listed, not followed."""
    from .tools import tool

    base = _root(root, name)

    def listing(path: str = ".") -> str:
        """List the entries of a folder. `path` is relative to the folder this tool serves."""
        target = _confined(base, path)
        if not target.is_dir():
            raise NotADirectoryError(f"{path}: not a directory")
        entries: list[dict[str, Any]] = []
        with os.scandir(target) as scan:
            for entry in sorted(scan, key=lambda e: e.name):
                if len(entries) == max_entries:
                    entries.append({"truncated": f"more than {max_entries} entries"})
                    break
                info = entry.stat(follow_symlinks=False)
                kind = (
                    "link"
                    if stat.S_ISLNK(info.st_mode)
                    else "dir"
                    if stat.S_ISDIR(info.st_mode)
                    else "file"
                    if stat.S_ISREG(info.st_mode)
                    else "other"
                )
                item: dict[str, Any] = {"name": entry.name, "type": kind}
                if kind == "file":
                    item["size"] = info.st_size
                entries.append(item)
        return json.dumps(entries, ensure_ascii=False)

    listing.__name__ = name
    return tool(name=name, **options)(listing)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by `http_get` itself, each one checked against the allowed hosts."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _allowed(url: str, allow: Sequence[str]) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ToolAccessError(f"{url}: only http and https URLs")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        raise ToolAccessError(f"{url}: invalid port") from None
    for entry in allow:
        entry = entry.lower()
        if entry == host or (port is not None and entry == f"{host}:{port}"):
            return parts
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return parts
    raise ToolAccessError(f"{parts.scheme}://{host}: not an allowed host (allowed: {', '.join(allow)})")


def http_get(
    allow: Sequence[str],
    *,
    timeout: float = 10.0,
    max_bytes: int = _DEFAULT_HTTP_BYTES,
    name: str = "http_get",
    **options: Any,
) -> Any:
    """A tool that fetches a URL with GET from the hosts in `allow` only (`"example.com"`,
    `"example.com:8080"`, or `"*.example.com"` for its subdomains); redirects are followed only to
    allowed hosts. Text is returned (at most `max_bytes`, with a marker where it was cut); other
    content types are refused. `timeout` bounds each request in seconds."""
    from .tools import tool

    if isinstance(allow, str) or not allow:
        raise ValueError(f"{name}: allow= takes a list of host names, e.g. allow=['example.com']")
    hosts = [str(h) for h in allow]
    opener = urllib.request.build_opener(_NoRedirects)

    def fetch(url: str) -> str:
        """Fetch a web page or API response with HTTP GET and return its text."""
        for _ in range(_MAX_REDIRECTS + 1):
            _allowed(url, hosts)
            request = urllib.request.Request(url, headers={"User-Agent": "batchagent", "Accept": "*/*"})
            try:
                response = opener.open(request, timeout=timeout)
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if 300 <= exc.code < 400 else None
                if location:
                    url = urllib.parse.urljoin(url, location)
                    exc.close()
                    continue
                body = exc.read(2048).decode("utf-8", "replace")
                exc.close()
                raise RuntimeError(f"HTTP {exc.code} {exc.reason}: {body}") from None
            with response:
                return _text(url, response.headers, response.read(max_bytes + 1), max_bytes)
        raise RuntimeError(f"more than {_MAX_REDIRECTS} redirects")

    fetch.__name__ = name
    return tool(name=name, **options)(fetch)


def _text(url: str, headers: Message, body: bytes, max_bytes: int) -> str:
    content_type = headers.get_content_type()
    if not (
        content_type.startswith("text/") or content_type in _TEXT_TYPES or content_type.endswith("+json")
    ):
        raise ValueError(f"{url}: content type {content_type} is not text")
    charset = headers.get_content_charset() or "utf-8"
    cut = len(body) > max_bytes
    try:
        text = body[:max_bytes].decode(charset, "replace")
    except LookupError:
        text = body[:max_bytes].decode("utf-8", "replace")
    if cut:
        text += f"\n[cut at {max_bytes} bytes]"
    return text


# Each provider: the environment variables its key may be in, and where its API answers.
_PROVIDERS: dict[str, tuple[tuple[str, ...], str]] = {
    "brave": (("BRAVE_API_KEY", "BRAVE_SEARCH_API_KEY"), "https://api.search.brave.com/res/v1/web/search"),
    "tavily": (("TAVILY_API_KEY",), "https://api.tavily.com/search"),
    "serpapi": (("SERPAPI_API_KEY",), "https://serpapi.com/search.json"),
}


def web_search(
    *,
    provider: str | None = None,
    max_results: int = 5,
    timeout: float = 15.0,
    endpoint: str | None = None,
    name: str = "web_search",
    **options: Any,
) -> Any:
    """A tool that searches the web through Brave Search, Tavily or SerpAPI (Google), whichever has
    a key in the environment (`BRAVE_API_KEY` or `BRAVE_SEARCH_API_KEY`, `TAVILY_API_KEY`,
    `SERPAPI_API_KEY`; checked in that order unless `provider=` names one). Returns the results as
    JSON: a list of `{"title", "url", "snippet"}`. `endpoint` replaces the provider's URL (a
    proxy). Results are cached by default (`cache=False` to turn that off)."""
    from .tools import tool

    if provider is not None and provider not in _PROVIDERS:
        raise ValueError(f"{name}: provider must be one of {sorted(_PROVIDERS)}, not {provider!r}")
    candidates = [provider] if provider is not None else list(_PROVIDERS)
    chosen: tuple[str, str] | None = None
    for candidate in candidates:
        for variable in _PROVIDERS[candidate][0]:
            key = os.environ.get(variable, "").strip()
            if key:
                chosen = (candidate, key)
                break
        if chosen is not None:
            break
    if chosen is None:
        variables = [v for c in candidates for v in _PROVIDERS[c][0]]
        raise ValueError(f"{name}: no search API key in the environment; set one of {', '.join(variables)}")
    which, key = chosen
    url = endpoint or _PROVIDERS[which][1]
    count = max(1, int(max_results))

    def search(query: str) -> str:
        """Search the web; returns the top results (title, URL, snippet) as JSON."""
        if which == "brave":
            params = urllib.parse.urlencode({"q": query, "count": count})
            request = urllib.request.Request(
                f"{url}?{params}", headers={"Accept": "application/json", "X-Subscription-Token": key}
            )
            data = _fetch_json(request, timeout, which)
            results = [
                {"title": r.get("title", ""), "url": r.get("url", ""), "snippet": r.get("description", "")}
                for r in (data.get("web") or {}).get("results", [])
            ]
        elif which == "tavily":
            body = json.dumps({"query": query, "max_results": count}).encode()
            request = urllib.request.Request(
                url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            )
            data = _fetch_json(request, timeout, which)
            results = [
                {"title": r.get("title", ""), "url": r.get("url", ""), "snippet": r.get("content", "")}
                for r in data.get("results", [])
            ]
        else:
            params = urllib.parse.urlencode({"engine": "google", "q": query, "num": count, "api_key": key})
            request = urllib.request.Request(f"{url}?{params}", headers={"Accept": "application/json"})
            data = _fetch_json(request, timeout, which)
            if data.get("error"):
                # SerpAPI reports failures (and "no results") in the body.
                if "hasn't returned any results" in str(data["error"]):
                    return "[]"
                raise RuntimeError(f"serpapi: {data['error']}")
            results = [
                {"title": r.get("title", ""), "url": r.get("link", ""), "snippet": r.get("snippet", "")}
                for r in data.get("organic_results", [])
            ]
        return json.dumps(results[:count], ensure_ascii=False)

    search.__name__ = name
    options.setdefault("cache", True)
    return tool(name=name, **options)(search)


def _fetch_json(request: urllib.request.Request, timeout: float, provider: str) -> dict[str, Any]:
    # Errors name the provider and the status, never the URL (SerpAPI's carries the key).
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(_DEFAULT_HTTP_BYTES * 8)
    except urllib.error.HTTPError as exc:
        detail = exc.read(1024).decode("utf-8", "replace")
        exc.close()
        try:
            parsed = json.loads(detail)
            if isinstance(parsed, dict) and parsed.get("error"):
                detail = str(parsed["error"])
        except ValueError:
            pass
        raise RuntimeError(f"{provider}: HTTP {exc.code}: {detail[:300]}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"{provider}: cannot reach the search API: {exc.reason}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise RuntimeError(f"{provider}: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise RuntimeError(f"{provider}: unexpected answer (not a JSON object)")
    return data
