"""Built-in tools: files confined to a root (links and `..` included), HTTP to allowed hosts only,
web search through each provider's documented wire format (against loopback fakes)."""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchagent_rs import Tool, tools
from batchagent_rs.builtin_tools import ToolAccessError


def run(t: Tool, **arguments: Any) -> Any:
    return t.fn(**t.parse_arguments(json.dumps(arguments)))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("hello\n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "b.txt").write_text("also outside")
    # Links: one that stays inside, one file and one folder that lead out.
    (root / "inside-link").symlink_to(root / "docs" / "a.txt")
    (root / "escape-file").symlink_to(tmp_path / "secret.txt")
    (root / "escape-dir").symlink_to(tmp_path / "outside")
    return root


def test_read_file_reads_text_under_its_root(tree: Path) -> None:
    read = tools.read_file(root=tree)
    assert read.name == "read_file" and read.parameters["required"] == ["path"]
    assert run(read, path="docs/a.txt") == "hello\n"
    assert run(read, path="./docs/../docs/a.txt") == "hello\n"
    assert run(read, path="inside-link") == "hello\n"


@pytest.mark.parametrize(
    "path",
    [
        "../secret.txt",
        "docs/../../secret.txt",
        "escape-file",
        "escape-dir/b.txt",
        "/etc/hostname",
        "escape-dir",
    ],
)
def test_read_file_refuses_paths_that_lead_out(tree: Path, path: str) -> None:
    with pytest.raises(ToolAccessError, match="outside the folder"):
        run(tools.read_file(root=tree), path=path)


def test_read_file_refuses_binary_non_utf8_large_and_missing_files(tree: Path) -> None:
    read = tools.read_file(root=tree, max_bytes=4)
    with pytest.raises(ValueError, match="over this tool's limit of 4"):
        run(read, path="docs/a.txt")
    read = tools.read_file(root=tree)
    with pytest.raises(ValueError, match="binary"):
        run(read, path="blob.bin")
    with pytest.raises(ValueError, match="not UTF-8"):
        run(read, path="latin1.txt")
    with pytest.raises(FileNotFoundError):
        run(read, path="docs/nope.txt")
    with pytest.raises(IsADirectoryError):
        run(read, path="docs")
    with pytest.raises(ValueError, match="not a directory"):
        tools.read_file(root=tree / "docs" / "a.txt")


def test_a_link_swapped_in_after_the_check_is_caught(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchagent_rs import builtin_tools

    real = builtin_tools._confined

    def racing(base: Path, path: str) -> Path:
        checked = real(base, path)
        # Between the check and the open, the file becomes a link out of the root.
        checked.unlink()
        checked.symlink_to(tree.parent / "secret.txt")
        return checked

    monkeypatch.setattr(builtin_tools, "_confined", racing)
    with pytest.raises(OSError):  # O_NOFOLLOW refuses to open the swapped-in link
        run(tools.read_file(root=tree), path="docs/a.txt")


@given(
    st.lists(
        st.sampled_from(["..", ".", "docs", "a.txt", "escape-dir", "escape-file", "", "b.txt"]), max_size=6
    )
)
def test_whatever_the_path_a_read_stays_under_the_root(segments: list[str]) -> None:
    # A fixed tree (hypothesis runs this many times; the fixture would be shared anyway).
    root = _property_tree()
    read = tools.read_file(root=root)
    try:
        text = run(read, path="/".join(segments))
    except (ToolAccessError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return
    assert text == "hello\n", "only the file under the root can be read"


_TREE: list[Path] = []


def _property_tree() -> Path:
    if not _TREE:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="ba-tools-"))
        root = base / "root"
        (root / "docs").mkdir(parents=True)
        (root / "docs" / "a.txt").write_text("hello\n")
        (base / "outside").mkdir()
        (base / "outside" / "b.txt").write_text("outside")
        (base / "a.txt").write_text("outside")
        (root / "escape-dir").symlink_to(base / "outside")
        (root / "escape-file").symlink_to(base / "a.txt")
        _TREE.append(root)
    return _TREE[0]


def test_list_dir_lists_without_following_links(tree: Path) -> None:
    listing = tools.list_dir(root=tree)
    entries = json.loads(run(listing))
    by_name = {e["name"]: e for e in entries}
    assert by_name["docs"]["type"] == "dir"
    assert by_name["blob.bin"] == {"name": "blob.bin", "type": "file", "size": 3}
    assert by_name["escape-dir"]["type"] == "link" and by_name["escape-file"]["type"] == "link"
    assert [e["name"] for e in json.loads(run(listing, path="docs"))] == ["a.txt"]
    for path in ["..", "escape-dir", "docs/../.."]:
        with pytest.raises(ToolAccessError):
            run(listing, path=path)
    short = json.loads(run(tools.list_dir(root=tree, max_entries=2)))
    assert len(short) == 3 and "truncated" in short[-1]


# -- HTTP --------------------------------------------------------------------------------------


Handler = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, Handler], list[dict[str, Any]]]]:
    routes: dict[str, Handler] = {}
    seen: list[dict[str, Any]] = []

    class Serve(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
            )
            route = routes.get(urllib.parse.urlsplit(self.path).path)
            if route is None:
                self.send_error(404)
                return
            route(self)

        do_GET = _handle
        do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes, seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def reply(status: int, body: bytes, content_type: str = "text/plain", **headers: str) -> Handler:
    def send(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.end_headers()
        h.wfile.write(body)

    return send


def test_http_get_fetches_text_from_allowed_hosts_only(server: Any) -> None:
    base, routes, _ = server
    routes["/page"] = reply(200, b"<p>hi</p>", "text/html; charset=utf-8")
    routes["/big"] = reply(200, b"x" * 100)
    routes["/image"] = reply(200, b"\x89PNG", "image/png")
    routes["/hop"] = reply(302, b"", Location="/page")
    routes["/away"] = reply(302, b"", Location="http://example.com/")
    routes["/missing"] = reply(404, b"not here")
    get = tools.http_get(allow=["127.0.0.1"], max_bytes=50)
    assert run(get, url=f"{base}/page") == "<p>hi</p>"
    assert run(get, url=f"{base}/hop") == "<p>hi</p>"
    assert run(get, url=f"{base}/big") == "x" * 50 + "\n[cut at 50 bytes]"
    with pytest.raises(ValueError, match="image/png is not text"):
        run(get, url=f"{base}/image")
    with pytest.raises(ToolAccessError, match=r"example\.com: not an allowed host"):
        run(get, url=f"{base}/away")
    with pytest.raises(RuntimeError, match="HTTP 404"):
        run(get, url=f"{base}/missing")
    port = base.rsplit(":", 1)[1]
    for url in [
        f"http://localhost:{port}/page",
        f"http://127.0.0.1@example.com:{port}/page",
        "file:///etc/hostname",
        "ftp://127.0.0.1/x",
    ]:
        with pytest.raises(ToolAccessError):
            run(get, url=url)
    with pytest.raises(ValueError, match="allow="):
        tools.http_get(allow="127.0.0.1")  # type: ignore[arg-type]


# -- web search ---------------------------------------------------------------------------------

KEYS = ("BRAVE_API_KEY", "BRAVE_SEARCH_API_KEY", "TAVILY_API_KEY", "SERPAPI_API_KEY")


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_web_search_without_a_key_names_the_variables(no_keys: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match="BRAVE_API_KEY, BRAVE_SEARCH_API_KEY, TAVILY_API_KEY, SERPAPI_API_KEY"
    ):
        tools.web_search()
    with pytest.raises(ValueError, match=r"set one of TAVILY_API_KEY$"):
        tools.web_search(provider="tavily")


def test_brave_wire_format(server: Any, no_keys: pytest.MonkeyPatch) -> None:
    base, routes, seen = server
    no_keys.setenv("BRAVE_API_KEY", "brave-secret")
    answer = {"type": "search", "web": {"type": "search", "results": [
        {"title": "One", "url": "https://one.example", "description": "first", "age": "1d"},
        {"title": "Two", "url": "https://two.example", "description": "second"},
    ]}}  # fmt: skip
    routes["/res/v1/web/search"] = reply(200, json.dumps(answer).encode(), "application/json")
    search = tools.web_search(max_results=2, endpoint=f"{base}/res/v1/web/search")
    assert search.cache is True
    results = json.loads(run(search, query="kv cache"))
    assert results == [
        {"title": "One", "url": "https://one.example", "snippet": "first"},
        {"title": "Two", "url": "https://two.example", "snippet": "second"},
    ]
    request = seen[-1]
    assert request["method"] == "GET"
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(request["path"]).query) == {
        "q": ["kv cache"],
        "count": ["2"],
    }
    assert request["headers"]["X-Subscription-Token"] == "brave-secret"
    assert request["headers"]["Accept"] == "application/json"


def test_tavily_wire_format(server: Any, no_keys: pytest.MonkeyPatch) -> None:
    base, routes, seen = server
    no_keys.setenv("TAVILY_API_KEY", "tvly-secret")
    answer = {"query": "q", "answer": None, "results": [
        {"title": "T", "url": "https://t.example", "content": "snippet", "score": 0.9, "raw_content": None},
    ], "response_time": 0.5}  # fmt: skip
    routes["/search"] = reply(200, json.dumps(answer).encode(), "application/json")
    search = tools.web_search(endpoint=f"{base}/search", max_results=3)
    assert json.loads(run(search, query="batching")) == [
        {"title": "T", "url": "https://t.example", "snippet": "snippet"}
    ]
    request = seen[-1]
    assert request["method"] == "POST"
    assert json.loads(request["body"]) == {"query": "batching", "max_results": 3}
    assert request["headers"]["Authorization"] == "Bearer tvly-secret"
    assert request["headers"]["Content-Type"] == "application/json"


def test_serpapi_wire_format_and_errors_never_show_the_key(server: Any, no_keys: pytest.MonkeyPatch) -> None:
    base, routes, seen = server
    no_keys.setenv("SERPAPI_API_KEY", "serp-secret")
    answer = {"search_metadata": {"status": "Success"}, "organic_results": [
        {"position": 1, "title": "S", "link": "https://s.example", "snippet": "serp snippet"},
    ]}  # fmt: skip
    routes["/search.json"] = reply(200, json.dumps(answer).encode(), "application/json")
    search = tools.web_search(endpoint=f"{base}/search.json")
    assert json.loads(run(search, query="prefix")) == [
        {"title": "S", "url": "https://s.example", "snippet": "serp snippet"}
    ]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(seen[-1]["path"]).query)
    assert query == {"engine": ["google"], "q": ["prefix"], "num": ["5"], "api_key": ["serp-secret"]}
    # SerpAPI reports failures in a JSON body; the key is in the URL, which no error shows.
    routes["/search.json"] = reply(401, b'{"error": "Invalid API key."}', "application/json")
    with pytest.raises(RuntimeError) as failure:
        run(search, query="prefix")
    assert "Invalid API key" in str(failure.value) and "serp-secret" not in str(failure.value)
    routes["/search.json"] = reply(
        200, b'{"error": "Google hasn\'t returned any results for this query."}', "application/json"
    )
    assert run(search, query="nothing") == "[]"
    assert "serp-secret" not in repr(search)


def test_no_code_execution_tool() -> None:
    exported = {name for name in dir(tools) if not name.startswith("_")}
    assert {"read_file", "list_dir", "http_get", "web_search"} <= exported
    assert not exported & {"python", "run_code", "exec", "shell", "bash", "run_python"}


def test_environment_is_read_when_the_tool_is_made(no_keys: pytest.MonkeyPatch) -> None:
    no_keys.setenv("TAVILY_API_KEY", "k")
    search = tools.web_search()
    no_keys.delenv("TAVILY_API_KEY")
    assert search.name == "web_search" and os.environ.get("TAVILY_API_KEY") is None
