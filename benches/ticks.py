"""Tick latency of a population of persistent agents, side by side with what people write by hand.

    python benches/ticks.py --out benches/results/ticks.json

The simulator with the h100-qwen2.5-7b profile at real time (time scale 1); 1, 4, 16, 64 and 256
agents; 20 ticks; a ~2048-token system prompt every agent shares, a ~200-token observation per
agent and tick, 30-token decisions. Every agent keeps its whole conversation across ticks on every
side. Sides:

population      `Population.step`: a tick's calls go out together through the Rust core, as
                concurrent chat calls (`prompt_list=False`)
prompt_list     `Population.step(prompt_list=True, chat_template="chatml")`: a tick's calls as
                one `/v1/completions` request with a list of prompts (usage per agent estimated
                from the request's total, so its engine floor is too)
gather          `asyncio.gather` over the official `openai` SDK, one chat call per agent
naive           one chat call per agent, awaited one after another (openai SDK)

Each side and size gets a fresh simulator (same seed), so none inherits another's prefix cache.
Figures per side and size: per-tick p50 / p95 / max and the ratio of p50 to the same side's
one-agent tick. For the population side, the engine floor of every tick: the simulated time the
profile's step model needs for that tick's requests (their token counts as the engine reported
them) sent all at once, with the prefix cache as the run found it and with every history cached
(`engine_floor`); `floor_summary` sets each size's p50 against it; and the CPU time the process
(the client, its core and the simulator, which runs in it) spent per tick (`cpu_seconds`). The
naive side runs fewer ticks at 64 and 256 agents (`--naive-ticks`): one of its ticks there take a
minute or more, and so does the gather side at 64 and 256 (`--gather-ticks`); the JSON says how
many ticks each figure is over.

`--tool-rounds N` gives every agent a tool (`quote`, answered at once) that the simulated model
calls in its first N turns (the first tick's): the population and prompt_list sides only, and no
engine floor (the floor's model is one request per agent and tick). The prompt_list side then
sends one request per round of a tick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import document, sim_cache

from batchagent_rs import Population, sim, tool


@tool
def quote(symbol: str) -> str:
    """Look up a price."""
    return f"{symbol}: 42"


PROFILE = "h100-qwen2.5-7b"
MODEL = "sim-model"


def system_prompt(tokens: int) -> str:
    return "You are one trader of a simulated market. Read the tick's news and decide.\n\n" + document(
        0, tokens
    )


def observation(agent: int, tick: int, tokens: int) -> str:
    # Distinct per agent and tick from the first word on: no free prefix hits beyond the history.
    words = "price volume spread order book bid ask momentum rumour filing".split()
    text = [f"Tick {tick}, trader {agent}."]
    i = 0
    while sum(len(w) + 1 for w in text) < tokens * 4:
        text.append(words[(i * 7 + agent * 3 + tick) % len(words)] + f"{(i * 31 + agent * 17 + tick) % 997}")
        i += 1
    return " ".join(text)


def load_profile(name: str) -> dict[str, Any]:
    path = Path(__file__).resolve().parent / "calibration" / f"{name}.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def engine_floor(profile: dict[str, Any], requests: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Simulated seconds the engine needs for one tick's requests (prompt tokens, tokens served
    from the prefix cache, output tokens), all arriving at once: the least any client can get.

    The schedule is the simulator's (vLLM v1's): each step serves the running sequences first (one
    token each when decoding, a chunk of the prompt when prefilling) within `max_num_batched_tokens`,
    then admits waiting requests first come, first served up to `max_num_seqs`; the step that ends a
    prefill gives the first output token. Each step costs what the profile's step model says."""
    step = profile["step"]
    budget_tokens, max_seqs = profile["max_num_batched_tokens"], profile["max_num_seqs"]
    waiting = [{"prompt": p, "computed": c, "generated": 0, "max_new": n} for p, c, n in requests if n > 0]
    waiting.reverse()
    running: list[dict[str, int]] = []
    seconds, steps, decode_steps, prefill_tokens = 0.0, 0, 0, 0
    while running or waiting:
        budget = budget_tokens
        load = {"prefill": 0, "attn": 0, "decode": 0, "kv": 0}
        scheduled: list[tuple[dict[str, int], int]] = []

        for s in running:
            n = min(s["prompt"] + s["generated"] - s["computed"], budget)
            if n <= 0:
                break
            _account(load, s, n)
            scheduled.append((s, n))
            budget -= n
        while budget > 0 and waiting and len(running) < max_seqs:
            s = waiting.pop()
            n = min(s["prompt"] - s["computed"], budget)
            _account(load, s, n)
            scheduled.append((s, n))
            budget -= n
            running.append(s)
        seconds += (
            step["base_us"]
            + step["prefill_token_us"] * load["prefill"]
            + step["prefill_attn_ns"] * load["attn"] / 1000
            + step["decode_seq_us"] * load["decode"]
            + step["kv_read_ns"] * load["kv"] / 1000
        ) / 1e6
        steps += 1
        decode_steps += load["prefill"] == 0
        prefill_tokens += load["prefill"]
        for s, n in scheduled:
            s["computed"] += n
            if s["computed"] >= s["prompt"] + s["generated"]:
                s["generated"] += 1
        running = [s for s in running if s["generated"] < s["max_new"]]
    return {
        "seconds": seconds,
        "steps": steps,
        "decode_only_steps": decode_steps,
        "prefill_tokens": prefill_tokens,
    }


def _account(load: dict[str, int], s: dict[str, int], n: int) -> None:
    """What scheduling `n` tokens of sequence `s` adds to a step's load (a decode or a chunk)."""
    if n == 1 and s["generated"] > 0 and s["computed"] + 1 == s["prompt"] + s["generated"]:
        load["decode"] += 1
        load["kv"] += s["computed"]
    else:
        load["prefill"] += n
        load["attn"] += n * (s["computed"] + n)


def floors(profile: dict[str, Any], ticks: list[list[tuple[int, int, int]]]) -> dict[str, Any]:
    """Per tick, the engine floor with the prefix cache as the run found it (`measured_cache`) and
    with every agent's history and the shared system prompt cached (`full_cache`: a cached token is
    any whole block of the agent's previous prompt and answer, as vLLM caches them), and the KV
    cache the population's conversations fill against the profile's capacity."""
    block = profile["block_size"]
    measured, full, footprint = [], [], []
    previous: list[tuple[int, int, int]] | None = None
    # The shared system prompt's cached blocks: what the first tick's best-served agent hit.
    system = max(c for _, c, _ in ticks[0])
    for tick in ticks:
        measured.append(engine_floor(profile, tick)["seconds"])
        ideal = []
        for i, (prompt, cached, new) in enumerate(tick):
            if previous is None:
                hit = system
            else:
                p, _, n = previous[i]
                # The answer's last token is never computed; only whole blocks are cached.
                hit = (p + n - 1) // block * block
            hit = min(hit, (prompt - 1) // block * block)
            ideal.append((prompt, max(hit, cached), new))
        full.append(engine_floor(profile, ideal)["seconds"])
        footprint.append(sum(p + n for p, _, n in tick) - (len(tick) - 1) * system)
        previous = tick
    return {
        "measured_cache_seconds": measured,
        "full_cache_seconds": full,
        "full_cache_p50": quantile(full, 0.5),
        "measured_cache_p50": quantile(measured, 0.5),
        "kv_tokens_held_last_tick": footprint[-1],
        "kv_capacity_tokens": profile["kv_capacity_tokens"],
    }


def summarise_floors(population: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per size: the floors' p50 and their ratio to the one-agent floor (the least ratio a client
    can reach on this profile), and the measured p50 over the floor of its own ticks."""
    one = population.get("1", {}).get("floor")
    summary = {}
    for size, outcome in population.items():
        floor = outcome["floor"]
        summary[size] = {
            "full_cache_p50": floor["full_cache_p50"],
            "measured_cache_p50": floor["measured_cache_p50"],
            "p50_over_measured_cache_floor": outcome["p50"] / floor["measured_cache_p50"],
        }
        if one is not None:
            summary[size]["full_cache_ratio_to_one_agent"] = floor["full_cache_p50"] / one["full_cache_p50"]
            summary[size]["measured_cache_ratio_to_one_agent"] = (
                floor["measured_cache_p50"] / one["measured_cache_p50"]
            )
    return summary


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def summary(ticks: list[float]) -> dict[str, Any]:
    return {
        "ticks": len(ticks),
        "p50": quantile(ticks, 0.5),
        "p95": quantile(ticks, 0.95),
        "max": max(ticks),
        "seconds": ticks,
    }


def run_population(
    url: str,
    agents: int,
    ticks: int,
    system: str,
    obs_tokens: int,
    prompt_list: bool = False,
    tool_rounds: int = 0,
) -> dict[str, Any]:
    ids = [f"t{i}" for i in range(agents)]
    seconds: list[float] = []
    # CPU time of the whole process (every thread: the client, its core and the simulator, which
    # runs in this process) per tick.
    cpu_seconds: list[float] = []
    requests: list[list[tuple[int, int, int]]] = []
    with Population(
        ids,
        system=system,
        model=MODEL,
        backend="vllm://" + url.removeprefix("http://"),
        prompt_list=prompt_list,
        chat_template="chatml" if prompt_list else None,
        tools=[quote] if tool_rounds else (),
    ) as pop:
        for tick in range(ticks):
            observations = {a: observation(i, tick, obs_tokens) for i, a in enumerate(ids)}
            started, cpu = time.perf_counter(), time.process_time()
            results = pop.step(observations)
            seconds.append(time.perf_counter() - started)
            cpu_seconds.append(time.process_time() - cpu)
            failed = [r.error for r in results.values() if not r.ok]
            if failed:
                raise RuntimeError(f"population tick {tick}: {failed[:3]}")
            requests.append(
                [
                    (r.usage.prompt_tokens, r.usage.cached_tokens, r.usage.completion_tokens)
                    for r in (results[a] for a in ids)
                ]
            )
        report = pop.report()
    return summary(seconds) | {
        "cpu_seconds": cpu_seconds,
        "cpu_p50": quantile(cpu_seconds, 0.5),
        "floor": None if tool_rounds else floors(load_profile(PROFILE), requests),
        "tool_calls": report.tool_calls,
        "prompt_tokens": report.prompt_tokens,
        "cached_tokens": report.cached_tokens,
        "completion_tokens": report.completion_tokens,
    }


async def run_sdk(
    url: str, agents: int, ticks: int, system: str, obs_tokens: int, gather: bool
) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    histories: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] for _ in range(agents)]
    usage = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}

    async def decide(i: int, tick: int) -> None:
        messages = histories[i] + [{"role": "user", "content": observation(i, tick, obs_tokens)}]
        response = await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        answer = response.choices[0].message.content or ""
        histories[i] = [*messages, {"role": "assistant", "content": answer}]
        if response.usage is not None:
            usage["prompt_tokens"] += response.usage.prompt_tokens
            usage["completion_tokens"] += response.usage.completion_tokens
            details = response.usage.prompt_tokens_details
            usage["cached_tokens"] += (details.cached_tokens or 0) if details is not None else 0

    seconds: list[float] = []
    try:
        for tick in range(ticks):
            started = time.perf_counter()
            if gather:
                await asyncio.gather(*(decide(i, tick) for i in range(agents)))
            else:
                for i in range(agents):
                    await decide(i, tick)
            seconds.append(time.perf_counter() - started)
    finally:
        await client.close()
    return summary(seconds) | usage


def side(name: str, agents: int, ticks: int, args: argparse.Namespace, system: str) -> dict[str, Any]:
    with sim.start(
        profile=PROFILE,
        time_scale=args.time_scale,
        seed=args.seed,
        output_tokens="fixed:30",
        tool_rounds=args.tool_rounds,
    ) as server:
        if name in ("population", "prompt_list"):
            outcome = run_population(
                server.url,
                agents,
                ticks,
                system,
                args.observation_tokens,
                prompt_list=name == "prompt_list",
                tool_rounds=args.tool_rounds,
            )
        else:
            outcome = asyncio.run(
                run_sdk(server.url, agents, ticks, system, args.observation_tokens, gather=name == "gather")
            )
        outcome["sim"] = sim_cache(server.stats())
    return outcome


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="1,4,16,64,256")
    p.add_argument("--ticks", type=int, default=20)
    p.add_argument(
        "--naive-ticks",
        default="16:5,64:2,256:1",
        help="ticks of the naive side at these sizes (AGENTS:TICKS,...); --ticks elsewhere",
    )
    p.add_argument(
        "--gather-ticks",
        default="64:5,256:2",
        help="ticks of the gather side at these sizes (AGENTS:TICKS,...); --ticks elsewhere",
    )
    p.add_argument("--sides", default="population,prompt_list,gather,naive")
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--observation-tokens", type=int, default=200)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tool-rounds", type=int, default=0, help="tool turns of each agent (see above)")
    p.add_argument("--out", default="benches/results/ticks.json")
    p.add_argument(
        "--note", default="", help="free text stored in the JSON (e.g. how loaded the machine was)"
    )
    args = p.parse_args()
    if args.tool_rounds and not set(args.sides.split(",")) <= {"population", "prompt_list"}:
        p.error("--tool-rounds: the population and prompt_list sides only (--sides population,prompt_list)")
    sizes = [int(x) for x in args.agents.split(",")]
    fewer = {
        name: {int(k): int(v) for k, v in (x.split(":") for x in spec.split(",") if x)}
        for name, spec in (("naive", args.naive_ticks), ("gather", args.gather_ticks))
    }
    system = system_prompt(args.system_tokens)
    results: dict[str, dict[str, Any]] = {}
    for name in args.sides.split(","):
        results[name] = {}
        for agents in sizes:
            ticks = fewer.get(name, {}).get(agents, args.ticks)
            outcome = side(name, agents, ticks, args, system)
            results[name][str(agents)] = outcome
            one = results[name].get("1")
            ratio = outcome["p50"] / one["p50"] if one else None
            outcome["ratio_to_one_agent"] = ratio
            print(
                f"{name:>10} {agents:>4} agents  {ticks:>2} ticks  p50 {outcome['p50'] * 1000:8.0f} ms  "
                f"p95 {outcome['p95'] * 1000:8.0f} ms  x{ratio or 0:.2f} of one agent",
                flush=True,
            )
            # Written as it goes: a long run stopped half-way keeps what it measured.
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"partial": True, "sides": results}, indent=2))
    side_by_side = {
        str(agents): {
            name: results[name][str(agents)]["p50"] / results["population"][str(agents)]["p50"]
            for name in results
            if str(agents) in results[name]
        }
        for agents in sizes
        if "population" in results and str(agents) in results["population"]
    }
    targets = {}
    floor_summary = {} if args.tool_rounds else summarise_floors(results.get("population", {}))
    if "population" in results:
        pop = results["population"]
        if "64" in pop:
            targets["64_within_3x_one_agent"] = pop["64"]["ratio_to_one_agent"] <= 3
        if "256" in pop:
            targets["256_within_6x_one_agent"] = pop["256"]["ratio_to_one_agent"] <= 6
    document_out = {
        "bench": "ticks",
        "command": " ".join(["python", *sys.argv]),
        "profile": PROFILE,
        "time_scale": args.time_scale,
        "system_tokens": args.system_tokens,
        "observation_tokens": args.observation_tokens,
        "decision_tokens": 30,
        "tool_rounds": args.tool_rounds,
        "ticks": args.ticks,
        "baseline_ticks": fewer,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": args.note},
        "sides": results,
        "p50_relative_to_population": side_by_side,
        "floor_summary": floor_summary,
        "targets": targets,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document_out, indent=2))
    print(
        json.dumps(
            {"p50_relative_to_population": side_by_side, "floor_summary": floor_summary, "targets": targets},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
