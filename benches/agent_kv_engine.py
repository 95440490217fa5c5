#!/usr/bin/env python3
"""Agent-aware KV on the embedded engine itself (a real model on a GPU, random weights): tool-wait
retention and eviction by next use, each on and off, with the KV cache under pressure.

    python benches/agent_kv_engine.py --arch qwen2.5-0.5b --agents 300 \
        --out benches/results/agent-kv-engine-h200.json

`benches/agent_kv.py` measures the same policies on the simulator (the same Rust scheduler and
block manager, with a step-time model); this runs them over the engine's model runner and Triton
kernels. The agents are those of the definitive workload: a 2,048-token system prompt shared by all,
a short task of their own, 1 + i % 5 tool rounds (2 to 6 model calls), 0.8 s tools, at most 32
calls in flight. A random-weight model calls no tools, so each agent is driven over the engine's
OpenAI-compatible API at the token level: each call is a `/v1/completions` request whose prompt is
the agent's conversation as token ids, answered with `return_token_ids` (vLLM's field), with a
scripted output length (30 to 90 tokens, `ignore_eos`); the next call appends the answer's ids and
a 30-token tool result to the prompt. Every call carries the hint the client sends under
`engine_hints=True`: the agent's id, the P75 of the tool waits seen so far and, once seen, the P75
of the gap from an answer to that agent's next call (`next_call_s`). As the client cannot know which
answer is an agent's last, the last call is hinted too: a completion shows no tool calls, so the
engine takes the hint at its word. Once an agent's last answer is in, the client says the agent is
done (`POST /v1/batchagent/done`, as a client driving completions must; over the chat API the server
infers it from a reply without tool calls): its pin is released and its blocks' predicted next use
withdrawn.

Configurations over one model worker, each on a fresh engine (scheduler and block manager) with the
same agents: retention off (`kv_pin_ttl=0`) or on (30 s) x eviction `lru` or `next_use`; the two
`next_use` ones again without the done notice (`_untold`: what the engine did before it existed);
and one with a KV cache that holds every agent at once (nothing evicted), which gives the prefill
no policy can avoid. A few agents (`--warmup-agents`) run first on a throwaway engine, unmeasured,
so that no measured run pays the kernels' first compilations. Reported from the engine's /metrics:
makespan, prompt tokens, prefill tokens computed by the engine's steps, recomputed (beyond the
no-eviction run), preemptions, evictions, pins, KV blocks held against the blocks in the holders'
block tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import shlex
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import ARCHS, import_engine, model_dir

PREFIX_TOKENS = 2048
TASK_TOKENS = 24
TOOL_RESULT_TOKENS = 30
TOOL_SECONDS = 0.8
MAX_INFLIGHT = 32
# (retention, eviction, whether the client says when an agent is done)
CONFIGS = [
    ("off", "lru", True), ("off", "next_use", True), ("on", "lru", True), ("on", "next_use", True),
    ("off", "next_use", False), ("on", "next_use", False),
]  # fmt: skip
# A two-layer model of the Qwen2 architecture: checks the script on a CPU in seconds.
TINY = {
    **ARCHS["qwen2.5-0.5b"], "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip


def write_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer over the whole vocabulary (`t0` .. `tN`): the server detokenizes
    every answer, and nothing can be downloaded; the agents speak token ids only."""
    import tokenizers
    import transformers

    words = {f"t{i}": i for i in range(vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", pad_token="t0")
    fast.save_pretrained(path)


def percentile75(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.75 * len(s)))]


class Agents:
    """The agents' scripts (seeded) and the hint statistics the client would keep."""

    def __init__(self, n: int, vocab: int, seed: int) -> None:
        rng = random.Random(seed)
        self.system = [rng.randrange(10, vocab) for _ in range(PREFIX_TOKENS)]
        self.tasks = [[rng.randrange(10, vocab) for _ in range(TASK_TOKENS)] for _ in range(n)]
        self.rounds = [1 + i % 5 for i in range(n)]
        self.out_lens = [[rng.randint(30, 90) for _ in range(r + 1)] for r in self.rounds]
        self.results = [
            [[rng.randrange(10, vocab) for _ in range(TOOL_RESULT_TOKENS)] for _ in range(r)]
            for r in self.rounds
        ]
        self.tool_waits: list[float] = []
        self.gaps: list[float] = []

    def hint(self, i: int) -> dict[str, Any]:
        hint: dict[str, Any] = {"agent": f"a-{i:04d}", "tool_wait_s": TOOL_SECONDS}
        if self.tool_waits:
            hint["tool_wait_s"] = percentile75(self.tool_waits)
        if self.gaps:
            hint["next_call_s"] = percentile75(self.gaps)
        return hint


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        result: dict[str, Any] = json.load(r)
        return result


async def drive(base: str, model: str, agents: Agents, n: int, tell_done: bool) -> tuple[float, int]:
    """Every agent's calls, at most MAX_INFLIGHT at once, and with `tell_done` the notice that it is
    done after its last. The HTTP calls run on threads (the standard library's client: the GPU
    machine and this one share no async HTTP package)."""
    url = base + "/v1/completions"
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(MAX_INFLIGHT)
    slots = asyncio.Semaphore(MAX_INFLIGHT)
    calls = 0

    async def agent(i: int) -> None:
        nonlocal calls
        prompt = agents.system + agents.tasks[i]
        answered_at = None
        for turn in range(agents.rounds[i] + 1):
            async with slots:
                if answered_at is not None:
                    agents.gaps.append(time.perf_counter() - answered_at)
                body = {
                    "model": model, "prompt": prompt, "max_tokens": agents.out_lens[i][turn],
                    "ignore_eos": True, "temperature": 0, "return_token_ids": True,
                    "batchagent": agents.hint(i),
                }  # fmt: skip
                answer = await loop.run_in_executor(pool, post, url, body)
                answered_at = time.perf_counter()
                calls += 1
            ids = answer["choices"][0]["token_ids"]
            if turn == agents.rounds[i]:
                if tell_done:
                    done = {"agent": agents.hint(i)["agent"]}
                    await loop.run_in_executor(pool, post, base + "/v1/batchagent/done", done)
                return
            started = time.perf_counter()
            await asyncio.sleep(TOOL_SECONDS)
            agents.tool_waits.append(time.perf_counter() - started)
            prompt = prompt + ids + agents.results[i][turn]

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(agent(i) for i in range(n)))
        return time.perf_counter() - t0, calls
    finally:
        pool.shutdown()


def scrape(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    for line in text.splitlines():
        m = re.match(r"^([a-z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(m: dict[str, float], name: str) -> float:
    """A counter under its own name or vLLM's `_total` form, summed over labels."""
    keys = [k for k in m if k.split("{")[0] in (name, name + "_total")]
    return sum(m[k] for k in keys)


def run_config(
    serve: Any,
    worker: Any,
    model: str,
    agents: Agents,
    n: int,
    retention: str,
    eviction: str,
    kv_pages: int,
    tell_done: bool = True,
) -> dict[str, Any]:
    server = serve(
        worker, model=model, max_model_len=worker.runner.max_model_len, eos_token_ids=[2], port=0,
        max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=True,
        kv_pin_ttl=30.0 if retention == "on" else 0.0, kv_eviction=eviction,
    )  # fmt: skip
    try:
        agents.tool_waits.clear()
        agents.gaps.clear()
        wall, calls = asyncio.run(drive(server.url, model, agents, n, tell_done))
        m = scrape(server.url)
    finally:
        server.stop()
    prompt = metric(m, "vllm:prompt_tokens")
    hits = metric(m, "vllm:prefix_cache_hits")
    queries = metric(m, "vllm:prefix_cache_queries")
    # What the steps computed, recomputation after a preemption included (a preempted request is
    # looked up again, so prompt tokens less hits would undercount it).
    computed = metric(m, "batchagent:engine_step_prefill_tokens")
    pins = {
        e: sum(v for k, v in m.items() if k.startswith("batchagent:kv_pins_total") and f'event="{e}"' in k)
        for e in ("made", "returned", "dropped", "expired")
    }
    return {
        "retention": retention,
        "eviction": eviction,
        "done_told": tell_done,
        "kv_cache_pages": kv_pages,
        "calls": calls,
        "makespan_s": wall,
        "prompt_tokens": prompt,
        "prefix_cache_hit_tokens": hits,
        "prefill_tokens_computed": computed,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "generation_tokens": metric(m, "vllm:generation_tokens"),
        "engine_steps": metric(m, "batchagent:engine_steps"),
        "engine_busy_s": metric(m, "batchagent:engine_busy_seconds"),
        "engine_scheduler_s": metric(m, "batchagent:engine_scheduler_seconds"),
        "preemptions": metric(m, "vllm:num_preemptions"),
        "evictions": metric(m, "batchagent:kv_evictions"),
        "kv_pins": pins,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=[*sorted(ARCHS), "tiny"], default="qwen2.5-0.5b")
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--kv-tokens", type=int, default=32768, help="the KV cache under pressure (tokens)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--warmup-agents", type=int, default=16, help="agents run first, unmeasured, to compile the kernels"
    )
    ap.add_argument(
        "--configs",
        default="",
        help="comma-separated RETENTION/EVICTION[/untold] to run, repeats allowed (default: all six)",
    )
    ap.add_argument(
        "--kv-page-size", type=int, default=16,
        help="tokens per KV page (blocks stay 16): smaller pages keep each agent's last partial block"
        " for its next turn",
    )  # fmt: skip
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    engine = import_engine()
    import torch

    import batchagent_rs._core as core

    n = args.agents
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch == "tiny":
            path = Path(tmp) / "tiny"
            path.mkdir()
            (path / "config.json").write_text(json.dumps(TINY))
        else:
            path = model_dir(args.arch, Path(tmp))
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        write_tokenizer(path, vocab)
        agents = Agents(n, vocab, args.seed)
        turns = sum(r + 1 for r in agents.rounds)
        final_tokens = sum(
            PREFIX_TOKENS + TASK_TOKENS + sum(agents.out_lens[i]) + TOOL_RESULT_TOKENS * agents.rounds[i]
            for i in range(n)
        )
        # One worker (weights, KV pages, CUDA graphs) for every configuration: each engine's block
        # manager starts empty, and a page only hits once this engine computed it.
        big = final_tokens + 16 * n + 8192
        dtype = "bf16" if args.device.startswith("cuda") else "fp32"
        t0 = time.perf_counter()
        worker = engine.EngineWorker(
            path, device=args.device, dtype=dtype, random_weights=True, kv_cache_tokens=big,
            page_size=args.kv_page_size,
            cuda_graphs=256 if args.device.startswith("cuda") else 0,
        )  # fmt: skip
        setup = time.perf_counter() - t0
        page = worker.page_size
        # The engine's block manager takes its capacity from the worker's `num_pages` and hands out
        # pages 0 .. num_pages - 1 of the runner's cache: fewer of them puts the cache under pressure.
        full_pages = worker.num_pages

        def serve_with(pages: int) -> Any:
            def serve(w: Any, **kw: Any) -> Any:
                w.num_pages = pages
                return core.serve_engine(w, **kw)

            return serve

        if args.warmup_agents:
            # The kernels' first compilations, outside every clock: a few agents on a throwaway engine.
            run_config(
                serve_with(full_pages), worker, "agents", Agents(args.warmup_agents, vocab, args.seed + 1),
                args.warmup_agents, "off", "lru", full_pages,
            )  # fmt: skip
        runs: dict[str, Any] = {}
        runs["no_eviction"] = run_config(
            serve_with(full_pages), worker, "agents", agents, n, "off", "lru", full_pages
        )
        pressure = args.kv_tokens // page
        configs = CONFIGS
        if args.configs:
            configs = []
            for c in args.configs.split(","):
                retention, eviction, *untold = c.split("/")
                configs.append((retention, eviction, untold != ["untold"]))
        for retention, eviction, tell_done in configs:
            key = f"retention_{retention}_{eviction}" + ("" if tell_done else "_untold")
            repeat = 1
            while (key if repeat == 1 else f"{key}_run{repeat}") in runs:
                repeat += 1
            key = key if repeat == 1 else f"{key}_run{repeat}"
            runs[key] = run_config(
                serve_with(pressure), worker, "agents", agents, n, retention, eviction, pressure, tell_done
            )
            print(key, {k: runs[key][k] for k in ("makespan_s", "prefill_tokens_computed", "engine_busy_s",
                                                  "engine_scheduler_s", "engine_steps")},
                  flush=True)  # fmt: skip
            # What is done so far, should the run be cut short.
            Path(args.out + ".partial").write_text(json.dumps(runs, indent=1))
        worker.num_pages = full_pages

    floor = runs["no_eviction"]["prefill_tokens_computed"]
    base = runs.get("retention_off_lru") or runs["no_eviction"]
    for key, r in runs.items():
        r["prefill_tokens_recomputed"] = r["prefill_tokens_computed"] - floor
        if key != "no_eviction":
            r["vs_baseline"] = {
                "makespan": r["makespan_s"] / base["makespan_s"],
                "prefill_tokens_computed": r["prefill_tokens_computed"] / base["prefill_tokens_computed"],
                "prefill_tokens_recomputed": (
                    r["prefill_tokens_recomputed"] / base["prefill_tokens_recomputed"]
                    if base["prefill_tokens_recomputed"] > 0 else None
                ),
            }  # fmt: skip
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "scope": "the embedded engine (Rust scheduler and block manager, PyTorch runner with the Triton "
        "kernels of batchagent_rs.kernels) over its OpenAI-compatible API, agents driven at the token "
        "level",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "arch": args.arch,
        "dtype": dtype,
        "agents": n,
        "model_calls": turns,
        "workload": f"{PREFIX_TOKENS}-token shared system prompt, {TASK_TOKENS}-token task, 1 + i % 5 tool "
        f"rounds, {TOOL_SECONDS} s tools, 30-90 output tokens, {TOOL_RESULT_TOKENS}-token tool results, "
        f"max {MAX_INFLIGHT} calls in flight",
        "kv_page_size": page,
        "kv_cache_tokens_under_pressure": (args.kv_tokens // page) * page,
        "kv_tokens_all_agents_final": final_tokens,
        "setup_seconds": setup,
        "warmup_agents": args.warmup_agents,
        "baseline": "retention_off_lru (what an engine without the hints does)",
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: {kk: v[kk] for kk in ("makespan_s", "prefill_tokens_recomputed")}
                      for k, v in runs.items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
