"""Dispatch ordered by shared prefix: jobs over the same document reach the engine together, while
`run` still returns results in input order, `stream` in completion order, each input exactly once."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import pytest

from batchagent_rs import Batch, Result, SchemaError
from batchagent_rs import sim as simulator

DOCS = [f"Document {k}. " + f"notes {k} " * 400 for k in range(4)]  # ~4 KB each: two prefix keys
TASK = "{document}\n\nQuestion {n}: what does it say?"


def items(n: int, seed: int = 3) -> list[dict[str, object]]:
    out: list[dict[str, object]] = [
        {"document": DOCS[i % len(DOCS)], "k": i % len(DOCS), "n": i} for i in range(n)
    ]
    random.Random(seed).shuffle(out)
    return out


def batch(**kwargs: object) -> Batch:
    return Batch(TASK, backend="sim://?time_scale=0&seed=2", max_turns=1, **kwargs)  # type: ignore[arg-type]


def completion_order(b: Batch, inputs: list[dict[str, object]]) -> list[Result]:
    async def collect() -> list[Result]:
        return [r async for r in b.stream(inputs)]

    return asyncio.run(collect())


def test_run_returns_every_input_once_in_input_order() -> None:
    inputs = items(120)
    results = batch(max_inflight=8).run(inputs)
    assert [r.index for r in results] == list(range(120))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]


def test_one_at_a_time_the_engine_sees_the_documents_grouped() -> None:
    # One model call at a time: completion order is dispatch order.
    inputs = items(40)
    streamed = completion_order(batch(max_inflight=1, window=1), inputs)
    docs = [inputs[r.index]["k"] for r in streamed]
    assert sorted(r.index for r in streamed) == list(range(40))
    runs = [d for i, d in enumerate(docs) if i == 0 or docs[i - 1] != d]
    assert len(runs) == len(DOCS), f"documents interleaved: {docs}"
    # Groups go in order of their first input.
    first_seen = list(dict.fromkeys(x["k"] for x in inputs))
    assert runs == first_seen


def test_lookahead_zero_keeps_the_input_order() -> None:
    inputs = items(20)
    streamed = completion_order(batch(max_inflight=1, window=1, lookahead=0), inputs)
    assert [r.index for r in streamed] == list(range(20))


def test_a_lazy_input_is_grouped_within_its_lookahead() -> None:
    inputs = items(40)
    streamed = completion_order(batch(max_inflight=1, window=1, lookahead=8), iter(inputs))
    assert sorted(r.index for r in streamed) == list(range(40))
    docs = [inputs[r.index]["k"] for r in streamed]
    switches = sum(docs[i] != docs[i - 1] for i in range(1, len(docs)))
    # In input order the 40 shuffled inputs switch document ~30 times; 8 read ahead cut that.
    fifo = [x["k"] for x in inputs]
    assert switches < sum(fifo[i] != fifo[i - 1] for i in range(1, len(fifo)))


def test_kv_capacity_is_checked_and_the_simulator_exports_it() -> None:
    with pytest.raises(SchemaError, match="kv_capacity_tokens"):
        batch(kv_capacity_tokens=0).run(items(1))
    assert all(r.ok for r in batch(kv_capacity_tokens=50_000, max_inflight=4).run(items(12)))
    with simulator.start(profile="h100-qwen2.5-7b", time_scale=0) as server:
        with urllib.request.urlopen(server.url + "/metrics") as response:
            text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("vllm:cache_config_info{"))
    labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
    blocks, size = int(labels["num_gpu_blocks"].strip('"')), int(labels["block_size"].strip('"'))
    assert size == 16 and blocks * size > 500_000  # an H100's 7B KV cache
    assert "vllm:num_preemptions_total{" in text


def test_the_simulator_exports_its_busy_time_and_step_costs() -> None:
    with simulator.start(profile="h100-qwen2.5-7b", time_scale=0) as server:
        results = Batch(TASK, model="sim-model", backend=f"vllm://{server.url[7:]}", max_turns=1).run(
            items(8)
        )
        assert all(r.ok for r in results)
        with urllib.request.urlopen(server.url + "/metrics") as response:
            text = response.read().decode()
        engine = server.stats()["engine"]
    values = {
        line.split("{")[0] + line.split("part=")[-1].split(",")[0] * ("part=" in line): float(
            line.split()[-1]
        )
        for line in text.splitlines()
        if line.startswith("sim:")
    }
    busy = values["sim:engine_busy_seconds_total"]
    # Busy no longer than the simulated clock, split by the formula's terms without a remainder.
    assert 0 < busy <= engine["sim_time_seconds"] + 1e-9
    parts = [v for k, v in values.items() if k.startswith('sim:engine_step_seconds_total"')]
    assert len(parts) == 5 and abs(sum(parts) - busy) < 1e-6
    assert values["sim:engine_steps_total"] == engine["steps"] > 0
    tokens = sum(r.usage.prompt_tokens - r.usage.cached_tokens for r in results)
    assert values["sim:engine_step_prefill_tokens_total"] >= tokens
    assert values["sim:engine_step_decode_seqs_total"] > 0
