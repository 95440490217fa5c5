"""Rate limits: the simulator enforces `rate_limit_rpm` / `rate_limit_tpm` and states them in the
provider's headers; a Batch paces its requests from those headers (or from `rpm=` / `tpm=`) and so
meets the limit without being answered 429.

Counts come from the simulator's own stats; nothing here depends on how long anything took, only on
the limits being far slower to refill (one request every few seconds) than the requests are sent."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from batchagent_rs import Batch
from batchagent_rs import sim as simulator


def post(server: simulator.Simulator, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(payload),
            headers={"content-type": "application/json", "x-api-key": "k", "anthropic-version": "2023-06-01"},
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def chat(i: int) -> dict[str, Any]:
    # 40 characters (10 tokens) + max_tokens 20 = 30 tokens against the limit.
    return {
        "model": "sim-model",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": f"{i:040d}"}],
        "sim": {"output_tokens": "fixed:5"},
    }


def test_openai_routes_state_the_limits_and_refuse_beyond_them() -> None:
    # Refills one request every 20 s: the three requests below see the bucket as it was.
    with simulator.start(time_scale=0, rate_limit_rpm=3, rate_limit_tpm=100_000) as server:
        seen = [post(server, "/v1/chat/completions", chat(i)) for i in range(4)]
        assert [status for status, _, _ in seen] == [200, 200, 200, 429]
        assert [h["x-ratelimit-remaining-requests"] for _, h, _ in seen] == ["2", "1", "0", "0"]
        assert all(h["x-ratelimit-limit-requests"] == "3" for _, h, _ in seen)
        assert all(h["x-ratelimit-limit-tokens"] == "100000" for _, h, _ in seen)
        # 30 tokens each (the bucket refills 1,667 a second, so only the first is exact).
        tokens = [int(h["x-ratelimit-remaining-tokens"]) for _, h, _ in seen[:3]]
        assert tokens[0] == 99_970 and tokens[0] > tokens[1] > tokens[2]
        _, refused, body = seen[3]
        assert int(refused["retry-after"]) >= 1
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "retry-after" not in seen[0][1]
        # `/v1/completions` draws from the same buckets.
        status, _, _ = post(
            server, "/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": 4}
        )
        assert status == 429
        stats = server.stats()
        assert stats["rate_limit"] == {
            "rpm": 3,
            "tpm": 100_000,
            "admitted": 3,
            "refused": 2,
            "admitted_tokens": 90,
        }
        assert stats["requests"]["by_status"] == {"200": 3, "429": 2}


def test_anthropic_route_states_its_own_headers() -> None:
    with simulator.start(time_scale=0, rate_limit_rpm=2, rate_limit_tpm=10_000) as server:
        payload = {"model": "sim-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
        seen = [post(server, "/v1/messages", payload) for _ in range(3)]
        assert [status for status, _, _ in seen] == [200, 200, 429]
        for _, headers, _ in seen:
            assert headers["anthropic-ratelimit-requests-limit"] == "2"
            assert headers["anthropic-ratelimit-tokens-limit"] == "10000"
            # An RFC 3339 time in UTC.
            assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
            assert not any(name.startswith("x-ratelimit") for name in headers)
        assert [h["anthropic-ratelimit-requests-remaining"] for _, h, _ in seen] == ["1", "0", "0"]
        assert seen[2][2]["error"]["type"] == "rate_limit_error"
        assert int(seen[2][1]["retry-after"]) >= 1


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="rate_limit_rpm"):
        simulator.start(rate_limit_rpm=0)
    with pytest.raises(Exception, match="rpm"):
        Batch("Say {n}.", backend="sim://", rpm=0)


def run_at_limit(backend: str, server: simulator.Simulator, n: int, **options: Any) -> dict[str, Any]:
    batch = Batch(
        "Say {n}.",
        model="sim-model",
        backend=backend,
        max_turns=1,
        max_tokens=20,
        max_inflight=64,
        max_attempts=20,
        **options,
    )
    results = batch.run([{"n": i} for i in range(n)])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return dict(server.stats())


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_batch_learns_the_limit_from_the_headers_and_is_never_refused(protocol: str) -> None:
    # 1,200 requests a minute enforced as 20 a second (a bucket of 20); 60 jobs, 64 in flight:
    # without pacing the first wave alone is answered with 44 refusals.
    with simulator.start(
        time_scale=0, rate_limit_rpm=1200, rate_limit_burst=1, output_tokens="fixed:4"
    ) as server:
        address = server.url.removeprefix("http://")
        backend = f"openai+http://{address}/v1" if protocol == "openai" else f"anthropic+http://{address}"
        stats = run_at_limit(backend, server, 60, api_key="k")
        limit = stats["rate_limit"]
        assert limit["admitted"] == 60
        assert limit["refused"] == 0


def test_rpm_and_tpm_set_by_hand_keep_the_first_wave_inside_the_limit() -> None:
    # vLLM's protocol: no first call alone, so the first wave of 64 would go out at once into a
    # bucket of 20 requests / 300 tokens (each job costs 2 + 20 tokens); `rpm=` / `tpm=` pace it.
    with simulator.start(
        time_scale=0,
        rate_limit_rpm=1200,
        rate_limit_tpm=18_000,
        rate_limit_burst=1,
        output_tokens="fixed:4",
    ) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        stats = run_at_limit(backend, server, 60, rpm=1200, tpm=18_000, warm_prefix=False)
        assert stats["rate_limit"]["admitted"] == 60
        assert stats["rate_limit"]["refused"] == 0
