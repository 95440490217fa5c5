"""A fleet of simulators behind one Batch: failover when an endpoint dies, probing it back in,
prefix affinity against round-robin, and routing by served model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from batchagent_rs import Batch, tool
from batchagent_rs import sim as simulator
from batchagent_rs.demo import system_prompt

CHAT = "/v1/chat/completions"
# Endpoints behind a key answer every route, probes included, with 401 to a request without it.
KEY = "sk-fleet-probe-4c1e"


def keyed(key: str | None) -> dict[str, str]:
    return {"api_key": key} if key else {}


def chat_requests(server: simulator.Simulator) -> int:
    """Chat completion requests the simulator answered (health probes and model lists excluded)."""
    route: dict[str, Any] = server.stats()["routes"].get(CHAT, {})
    return int(route.get("total", 0))


def engine_hit_rate(servers: list[simulator.Simulator]) -> float:
    hits = sum(s.stats()["cache"]["prefix_hits_tokens"] for s in servers)
    queries = sum(s.stats()["cache"]["prefix_queries_tokens"] for s in servers)
    return hits / queries


def url(server: simulator.Simulator) -> str:
    return "vllm://" + server.url.removeprefix("http://")


def endpoint(batch: Batch, server: simulator.Simulator) -> dict[str, Any]:
    endpoints: list[dict[str, Any]] = batch.report().raw["endpoints"]
    return next(e for e in endpoints if e["name"].split()[-1].startswith(server.url + "/"))


def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def inputs(n: int) -> list[dict[str, Any]]:
    return [{"n": i} for i in range(n)]


def test_killed_endpoint_calls_move_to_the_survivors() -> None:
    servers = [simulator.start(profile="h100-qwen2.5-0.5b", time_scale=0.3, seed=i) for i in range(3)]
    victim, survivors = servers[0], servers[1:]
    done = threading.Event()
    at_kill: dict[str, int] = {}
    finished = {"n": 0}

    def on_result(_: Any) -> None:
        finished["n"] += 1
        if finished["n"] == 15:
            done.set()

    def kill() -> None:
        done.wait(60)
        at_kill["survivors"] = sum(chat_requests(s) for s in survivors)
        victim.stop()
        # Read after the stop: the victim's final count, with nothing served after it.
        at_kill["victim"] = chat_requests(victim)

    batch = Batch(
        "Question {n}: answer briefly.",
        system=system_prompt(512),
        model="sim-model",
        backend=[url(s) for s in servers],
        routing="least_outstanding",
        max_inflight=12,
        max_turns=1,
        on_result=on_result,
    )
    killer = threading.Thread(target=kill)
    killer.start()
    try:
        results = batch.run(inputs(120))
        killer.join(60)
        assert sorted(r.index for r in results) == list(range(120))
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert at_kill["victim"] > 0, "the victim served nothing before it was killed"
        assert sum(chat_requests(s) for s in survivors) > at_kill["survivors"]
        stats = endpoint(batch, victim)
        assert stats["failovers"] >= 1
        assert not stats["up"]
        # Nothing was answered by the victim after its death, yet every job's call was answered.
        assert stats["served"] <= at_kill["victim"]
        endpoints = batch.report().raw["endpoints"]
        assert sum(e["served"] for e in endpoints) >= 120
    finally:
        for s in survivors:
            s.stop()


@pytest.mark.parametrize("key", [None, KEY])
def test_an_endpoint_that_comes_back_is_probed_back_in(key: str | None) -> None:
    first = simulator.start(profile="h100-qwen2.5-0.5b", time_scale=0.3, seed=1, **keyed(key))
    other = simulator.start(profile="h100-qwen2.5-0.5b", time_scale=0.3, seed=2, **keyed(key))
    port = int(first.url.rsplit(":", 1)[1])
    down = threading.Event()
    back = threading.Event()
    revived: dict[str, simulator.Simulator] = {}
    finished = {"n": 0}
    log: list[str] = []

    @tool(cache=False)
    def lookup(topic: str) -> str:
        """Look a topic up."""
        # Agents that reach their tool once the fleet has taken the endpoint out wait until it is
        # back: the run cannot end before the prober had its chance, and their second turns are
        # routed while both endpoints are live again.
        if down.is_set():
            back.wait(30)
        return f"notes on {topic}"

    def on_result(_: Any) -> None:
        finished["n"] += 1

    batch = Batch(
        "Question {n}: look it up, then answer.",
        system=system_prompt(512),
        tools=[lookup],
        model="sim-model",
        backend=[url(first), url(other)],
        api_key=key,
        routing="least_outstanding",
        max_inflight=16,
        # Few live agents at a time: agents are still being admitted (and calling the model) when
        # the endpoint dies, so the fleet notices.
        window=8,
        max_turns=3,
        on_result=on_result,
    )

    def cycle() -> None:
        if not wait_until(lambda: finished["n"] >= 10):
            return
        first.stop()
        if not wait_until(lambda: not endpoint(batch, first)["up"]):
            log.append("the fleet never marked the stopped endpoint down")
            back.set()
            return
        down.set()
        revived["server"] = simulator.start(
            profile="h100-qwen2.5-0.5b", time_scale=0.3, seed=1, port=port, **keyed(key)
        )
        if not wait_until(lambda: endpoint(batch, first)["up"]):
            log.append("the prober never brought the endpoint back")
        back.set()

    worker = threading.Thread(target=cycle)
    worker.start()
    try:
        results = batch.run(inputs(60))
        worker.join(60)
        assert not log, log
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert "server" in revived
        assert chat_requests(revived["server"]) > 0, "no call went to the endpoint after it came back"
        assert endpoint(batch, first)["up"]
    finally:
        other.stop()
        if "server" in revived:
            revived["server"].stop()


def run_fleet(routing: str, n: int) -> tuple[float, list[int]]:
    servers = [simulator.start(profile="h100-qwen2.5-7b", time_scale=0.05, seed=i) for i in range(3)]
    try:
        # max_inflight below the fleet's affinity slack: affinity never has to spill to a cold endpoint.
        batch = Batch(
            "Question {n}: answer briefly.",
            system=system_prompt(2048),
            model="sim-model",
            backend=[url(s) for s in servers],
            routing=routing,
            max_inflight=6,
            max_turns=1,
        )
        results = batch.run(inputs(n))
        assert all(r.ok for r in results)
        return engine_hit_rate(servers), [chat_requests(s) for s in servers]
    finally:
        for s in servers:
            s.stop()


def test_prefix_affinity_hits_the_cache_more_than_round_robin() -> None:
    affinity_rate, affinity_counts = run_fleet("prefix_affinity", 60)
    rr_rate, rr_counts = run_fleet("round_robin", 60)
    # Round-robin sends the shared system prompt to every endpoint, so two of them compute it cold;
    # affinity keeps it where the warm-up put it.
    assert min(rr_counts) > 0
    assert affinity_rate > rr_rate
    assert max(affinity_counts) == sum(affinity_counts)


def test_session_header_lines_do_not_break_affinity() -> None:
    servers = [simulator.start(profile="h100-qwen2.5-7b", time_scale=0.05, seed=i) for i in range(3)]
    try:
        system = "x-anthropic-billing-header: cc_version=1.0.60; session=4f1c\n" + system_prompt(2048)
        batch = Batch(
            "Question {n}: answer briefly.",
            system=system,
            model="sim-model",
            backend=[url(s) for s in servers],
            max_inflight=6,
            max_turns=1,
        )
        results = batch.run(inputs(40))
        assert all(r.ok for r in results)
        counts = [chat_requests(s) for s in servers]
        assert max(counts) == sum(counts), counts
        assert batch.report().cache_hit_rate > 0.9
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("key", [None, KEY])
def test_calls_are_routed_by_served_model(key: str | None) -> None:
    alpha = [simulator.start(time_scale=0, seed=i, model="alpha", **keyed(key)) for i in range(2)]
    beta = [simulator.start(time_scale=0, seed=i, model="beta", **keyed(key)) for i in range(2)]
    fleet = [url(s) for s in (alpha[0], beta[0], alpha[1], beta[1])]
    try:
        for model, count in (("alpha", 30), ("beta", 20)):
            batch = Batch(
                "Question {n}.", model=model, backend=fleet, api_key=key, max_inflight=8, max_turns=1
            )
            results = batch.run(inputs(count))
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert sum(chat_requests(s) for s in alpha) == 30
        assert sum(chat_requests(s) for s in beta) == 20
        assert all(chat_requests(s) > 0 for s in alpha + beta)
    finally:
        for s in alpha + beta:
            s.stop()


def test_engine_metrics_are_read_from_an_endpoint_behind_a_key() -> None:
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:

        @tool(cache=False)
        def lookup(topic: str) -> str:
            """Look a topic up."""
            # Hold the run open until the metrics watcher has been answered once.
            wait_until(lambda: "/metrics" in server.stats()["routes"])
            return f"notes on {topic}"

        batch = Batch(
            "Question {n}: look it up.",
            tools=[lookup],
            model="sim-model",
            backend=url(server),
            api_key=KEY,
            max_turns=3,
        )
        results = batch.run(inputs(2))
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        scrapes = server.stats()["routes"]["/metrics"]["by_status"]
        assert set(scrapes) == {"200"}, scrapes
        assert batch.report().raw["engine"][0] is not None
