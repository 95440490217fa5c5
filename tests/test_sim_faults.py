"""Injected faults: each appears near its configured rate, is counted in /sim/stats, and the same seed
replays the same sequence of outcomes."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from batchagent_rs import sim

RATES: dict[str, Any] = {
    "fault_429": 0.10,
    "fault_500": 0.05,
    "fault_503": 0.05,
    "fault_reset": 0.10,
    "fault_truncate": 0.10,
    "fault_malformed": 0.10,
}
N = 400


def body(i: int, stream: bool) -> dict[str, object]:
    return {
        "model": "sim-model",
        "stream": stream,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "sim": {"output_tokens": "fixed:12"},
    }


def outcome(conn: http.client.HTTPConnection, payload: dict[str, object]) -> str:
    """What a client sees: ok, 429, 500, 503, reset, truncate or malformed."""
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(payload),
            headers={"content-type": "application/json"},
        )
        resp = conn.getresponse()
        raw = resp.read()
    except (http.client.IncompleteRead, ConnectionError, http.client.RemoteDisconnected):
        conn.close()
        return "reset"
    if resp.status != 200:
        if resp.status == 429:
            assert resp.getheader("retry-after") == "2"
        assert "error" in json.loads(raw)
        return str(resp.status)
    text = raw.decode("utf-8", "replace")
    if payload["stream"]:
        data = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
        if any(d != "[DONE]" and not _is_json(d) for d in data):
            return "malformed"
        return "ok" if data and data[-1] == "[DONE]" else "truncate"
    if _is_json(text):
        return "ok"
    return "malformed" if "<html>" in text else "truncate"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def connect(server: sim.Simulator) -> http.client.HTTPConnection:
    url = urlsplit(server.url)
    return http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)


def run(seed: int, bodies: list[dict[str, object]]) -> tuple[list[str], dict[str, int]]:
    with sim.start(profile="h100-qwen2.5-0.5b", time_scale=0, seed=seed, retry_after=2, **RATES) as server:
        conn = connect(server)
        try:
            outcomes = [outcome(conn, b) for b in bodies]
        finally:
            conn.close()
        return outcomes, server.stats()["faults"]


def test_faults_appear_at_their_rates_and_are_counted() -> None:
    bodies = [body(i, stream=i % 2 == 0) for i in range(N)]
    outcomes, injected = run(11, bodies)
    seen = Counter(outcomes)
    for key, rate in RATES.items():
        kind = key.removeprefix("fault_")
        assert injected[kind] == seen[kind], (kind, injected, seen)
        assert abs(seen[kind] / N - rate) < 0.05, (kind, seen[kind])
    assert abs(seen["ok"] / N - (1 - sum(RATES.values()))) < 0.07
    # Both framings get every kind of damage.
    for kind in ("reset", "truncate", "malformed"):
        assert {b["stream"] for b, o in zip(bodies, outcomes, strict=True) if o == kind} == {True, False}


def test_same_seed_same_outcomes_and_retries_draw_afresh() -> None:
    bodies = [body(i, stream=True) for i in range(150)]
    first, _ = run(5, bodies)
    again, _ = run(5, bodies)
    other, _ = run(6, bodies)
    assert first == again
    assert first != other
    # One body sent over and over: a retry gets a fresh draw, so outcomes vary, yet replay exactly.
    retries = [body(0, stream=False)] * 60
    a, _ = run(5, retries)
    b, _ = run(5, retries)
    assert a == b
    assert len(set(a)) > 2


def test_slow_first_byte_is_counted() -> None:
    with sim.start(
        profile="h100-qwen2.5-0.5b", time_scale=0, seed=1, slow_first_byte=0.3, slow_first_byte_ms=1
    ) as server:
        conn = connect(server)
        try:
            outcomes = [outcome(conn, body(i, stream=True)) for i in range(200)]
        finally:
            conn.close()
        slow = server.stats()["faults"]["slow_first_byte"]
    assert set(outcomes) == {"ok"}
    assert 40 <= slow <= 80
