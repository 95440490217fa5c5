"""The hosted protocols reached the ways people already configure them: the Anthropic and OpenAI
protocols over plain http (`anthropic+http://`, `openai+http://`), the SDKs' base-URL variables,
and servers that require a key on every route."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from batchagent_rs import BackendUnavailable, Batch, tool
from batchagent_rs import sim as simulator

KEY = "sk-ant-conventions-7f3a9c"


class Review(pydantic.BaseModel):
    bugs: list[str]
    severity: int


def address(server: simulator.Simulator) -> str:
    return server.url.removeprefix("http://")


def routes(server: simulator.Simulator) -> dict[str, Any]:
    return dict(server.stats()["routes"])


def reader(calls: list[str]) -> Any:
    @tool(cache=False)
    def read_file(path: str) -> str:
        """Read a file."""
        calls.append(path)
        return f"contents of {path}"

    return read_file


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_protocol_runs_end_to_end_with_tools_and_structured_output(stream: bool) -> None:
    calls: list[str] = []
    with simulator.start(time_scale=0, seed=3, tool_rounds=2, model="claude-sim", api_key=KEY) as server:
        batch = Batch(
            "Review {path} for bugs.",
            system="You are a careful reviewer.",
            tools=[reader(calls)],
            output=Review,
            model="claude-sim",
            backend=f"anthropic+http://{address(server)}",
            api_key=KEY,
            stream=stream,
            max_inflight=8,
            max_turns=4,
        )
        results = batch.run([{"path": f"src/f{i}.py"} for i in range(12)])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert all(isinstance(r.output, Review) for r in results)
        assert all(r.turns == 3 and r.tool_calls == 2 for r in results)
        report = batch.report()
        assert report.tool_requests == 24 and len(calls) == report.tool_executions
        # Streamed calls time their first token; a single JSON body has none.
        assert all((r.ttft is not None) == stream for r in results)
        seen = routes(server)
        assert seen["/v1/messages"]["by_status"] == {"200": 36}
        assert "/v1/chat/completions" not in seen
        assert report.raw["backend"].startswith("anthropic http://127.0.0.1:")


def test_sdk_base_url_and_key_variables_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        for backend, route in (("anthropic://", "/v1/messages"), ("openai://", "/v1/chat/completions")):
            results = Batch("Say {n}.", model="sim-model", backend=backend, max_turns=1).run(
                [{"n": i} for i in range(5)]
            )
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            assert routes(server)[route]["by_status"] == {"200": 5}


def test_openai_protocol_over_plain_http_sends_the_key() -> None:
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:
        backend = f"openai+http://{address(server)}/v1"
        results = Batch("Say {n}.", model="sim-model", backend=backend, api_key=KEY, max_turns=1).run(
            [{"n": 1}]
        )
        assert results[0].ok, results[0].error
        # A wrong key is refused by the check before the run, not by every job.
        wrong = Batch("Say {n}.", model="sim-model", backend=backend, api_key="sk-wrong", max_turns=1)
        with pytest.raises(BackendUnavailable, match="refused the API key") as raised:
            wrong.run([{"n": 1}])
        assert "sk-wrong" not in str(raised.value)


# -- TLS through the system's trust settings, and through a proxy ------------------------------


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA (ca.pem) and a certificate for localhost / 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batchagent test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""

    def one_way(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    other = threading.Thread(target=one_way, args=(b, a), daemon=True)
    other.start()
    one_way(a, b)
    other.join()
    a.close()
    b.close()


class Loopback:
    """A loopback TCP server handing each connection to `handle` on its own thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handle = handle
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        # shutdown() wakes the accept() blocked on the other thread; close() alone does not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def tls_front(sim_port: int, cert: Path, key: Path) -> tuple[Loopback, list[int]]:
    """TLS terminated on loopback, the plain bytes passed to the simulator. Counts handshakes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handshakes: list[int] = []

    def handle(conn: socket.socket) -> None:
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        handshakes.append(1)
        pipe(tls, socket.create_connection(("127.0.0.1", sim_port)))

    return Loopback(handle), handshakes


def connect_proxy() -> tuple[Loopback, list[str]]:
    """An HTTP CONNECT proxy on loopback that records every tunnel's target."""
    tunnels: list[str] = []

    def handle(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                conn.close()
                return
            head += data
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            conn.close()
            return
        tunnels.append(target)
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pipe(conn, upstream)

    return Loopback(handle), tunnels


@pytest.fixture
def tls_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path, list[int]]]:
    """A simulator behind TLS, its certificate from a CA only `ca.pem` knows: (host:port, ca, handshakes)."""
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:
        front, handshakes = tls_front(int(server.url.rsplit(":", 1)[1]), cert, key)
        try:
            yield f"localhost:{front.port}", ca, handshakes
        finally:
            front.close()


def run_over_tls(host: str) -> list[Any]:
    return Batch(
        "Say {n}.",
        model="sim-model",
        backend=f"vllm+https://{host}",
        api_key=KEY,
        max_turns=1,
        max_attempts=1,
    ).run([{"n": i} for i in range(4)])


def test_tls_trusts_a_ca_given_by_ssl_cert_file(
    tls_sim: tuple[str, Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, ca, handshakes = tls_sim
    # Without the CA the certificate is refused (the bundled roots do not know it): by the check
    # before the run, so no job is sent.
    with pytest.raises(BackendUnavailable, match="unreachable"):
        run_over_tls(host)
    assert not handshakes
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    results = run_over_tls(host)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert handshakes


def test_tls_trusts_a_ca_in_ssl_cert_dir(
    tls_sim: tuple[str, Path, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, ca, handshakes = tls_sim
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "corporate.pem").write_bytes(ca.read_bytes())
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    results = run_over_tls(host)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert handshakes


def test_https_goes_through_https_proxy(
    tls_sim: tuple[str, Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, ca, handshakes = tls_sim
    proxy, tunnels = connect_proxy()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        results = run_over_tls(host)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        # Every connection to the server was a tunnel through the proxy, to the server's address.
        assert tunnels and set(tunnels) == {host}
        assert len(tunnels) == len(handshakes)
    finally:
        proxy.close()
