"""Client CPU cost per agent-turn: BatchAgent vs the hand-written `openai` SDK loop.

Workload: N agents x 2 turns (one call of a trivial Python tool, then a JSON answer validated by
pydantic), against the simulator at zero model latency, running in its own process so that only
the client's CPU is counted. Each client runs in a fresh child process that reports its own
user+sys CPU time (getrusage, all of its threads) for the run. Streamed and non-streamed model
calls are both measured unless `--stream` or `--no-stream` picks one. Writes JSON; prints a table.

    python benches/overhead.py --agents 2000 10000 --out bench-results/overhead.json

CPU time is less noisy than wall time on a shared machine but not immune to it (caches, frequency,
other builds): `--repeat K` runs each client K times and reports the median, and the JSON records the
load average around every run.

`--previous PYTHON` adds a third client: the same BatchAgent workload run by another interpreter (a
virtual environment holding an earlier build, e.g. `git worktree add ../base REV` and `maturin
develop --profile ci` in a venv there), interleaved run by run with the current build so both see the
same load; each row then carries `vs_previous`, the current build's cost over the earlier one's.

    python benches/overhead.py --previous ../base/.venv/bin/python --clients batchagent previous
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydantic

SYSTEM = "You answer questions about keys. Look the key up with the tool, then answer in JSON."
TASK = "What is stored under key {key}?"


class Answer(pydantic.BaseModel):
    key: str
    value: str
    found: bool


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _inputs(n: int) -> list[dict[str, Any]]:
    return [{"key": f"k{i}"} for i in range(n)]


def child_batchagent(url: str, n: int, inflight: int, stream: bool) -> dict[str, Any]:
    from batchagent_rs import Batch, tool

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return key.upper()

    batch = Batch(
        TASK,
        system=SYSTEM,
        tools=[lookup],
        output=Answer,
        model="sim-model",
        backend="vllm://" + url.removeprefix("http://"),
        max_inflight=inflight,
        max_turns=4,
        stream=stream,
        warm_prefix=False,
    )
    items = _inputs(n)
    cpu0, t0 = _cpu(), time.perf_counter()
    results = batch.run(items, progress=False)
    cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    ok = sum(r.ok for r in results)
    turns = sum(r.turns for r in results)
    return {"ok": ok, "agent_turns": turns, "cpu_s": cpu, "wall_s": wall}


def child_baseline(url: str, n: int, inflight: int, stream: bool) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=3)
    schema = json.dumps(Answer.model_json_schema(), separators=(",", ":"))
    system = f"{SYSTEM}\n\nReply with only JSON matching this JSON Schema:\n```json\n{schema}\n```"
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a key up.",
                "parameters": {
                    "type": "object",
                    "properties": {"key": {"type": "string"}},
                    "required": ["key"],
                },
            },
        }
    ]

    def lookup(key: str) -> str:
        return key.upper()

    async def agent(item: dict[str, Any], sem: asyncio.Semaphore) -> tuple[bool, int]:
        messages: list[Any] = [
            {"role": "system", "content": system},
            {"role": "user", "content": TASK.format(**item)},
        ]
        for turn in range(1, 5):
            async with sem:
                if stream:
                    text, calls = "", dict[int, dict[str, str]]()
                    chunks = await client.chat.completions.create(
                        model="sim-model",
                        messages=messages,
                        tools=tools,
                        stream=True,
                    )
                    async for chunk in chunks:
                        if not chunk.choices:
                            continue
                        d = chunk.choices[0].delta
                        text += d.content or ""
                        for tc in d.tool_calls or []:
                            e = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                            e["id"] = tc.id or e["id"]
                            if tc.function:
                                e["name"] = tc.function.name or e["name"]
                                e["arguments"] += tc.function.arguments or ""
                    tool_calls = [calls[i] for i in sorted(calls)]
                else:
                    resp = await client.chat.completions.create(
                        model="sim-model", messages=messages, tools=tools
                    )
                    msg = resp.choices[0].message
                    text = msg.content or ""
                    tool_calls = [
                        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                        for c in msg.tool_calls or []
                        if c.type == "function"
                    ]
            if not tool_calls:
                Answer.model_validate_json(text[text.find("{") : text.rfind("}") + 1])
                return True, turn
            messages.append(
                {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                        }
                        for c in tool_calls
                    ],
                }
            )
            for c in tool_calls:
                messages.append(
                    {"role": "tool", "tool_call_id": c["id"], "content": lookup(**json.loads(c["arguments"]))}
                )
        return False, 4

    async def main() -> list[tuple[bool, int]]:
        sem = asyncio.Semaphore(inflight)
        try:
            return await asyncio.gather(*(agent(item, sem) for item in _inputs(n)))
        finally:
            await client.close()

    cpu0, t0 = _cpu(), time.perf_counter()
    outcomes = asyncio.run(main())
    cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    return {
        "ok": sum(o for o, _ in outcomes),
        "agent_turns": sum(t for _, t in outcomes),
        "cpu_s": cpu,
        "wall_s": wall,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_sim() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchagent_rs.cli",
            "sim",
            "serve",
            "--port",
            str(port),
            "--time-scale",
            "0",
            "--tool-rounds",
            "1",
            "--distinct-args",
            "1000000000",
            "--output-tokens",
            "fixed:16",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "simulator listening on ..."
    return proc, f"http://127.0.0.1:{port}"


def _run_child(
    kind: str, url: str, n: int, inflight: int, stream: bool, previous: str | None
) -> dict[str, Any]:
    # The earlier build runs this same script's BatchAgent child under its own interpreter.
    python = previous if kind == "previous" and previous else sys.executable
    out = subprocess.run(
        [
            python,
            __file__,
            "--child",
            "batchagent" if kind == "previous" else kind,
            "--url",
            url,
            "--agents",
            str(n),
            "--max-inflight",
            str(inflight),
        ]
        + (["--stream"] if stream else ["--no-stream"]),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(
            f"{kind} client (N={n}, stream={stream}) failed with exit status {out.returncode}:\n{out.stderr}"
        )
    m: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    m["cpu_us_per_agent_turn"] = m["cpu_s"] / max(m["agent_turns"], 1) * 1e6
    return m


def _measure(
    kinds: list[str], n: int, inflight: int, stream: bool, repeat: int, previous: str | None
) -> dict[str, dict[str, Any]]:
    """Runs each client `repeat` times, each run against a fresh simulator, the clients taking turns
    within each round so that they see the same load; keeps each client's median run."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(repeat):
        for kind in kinds:
            proc, url = _start_sim()
            load_before = os.getloadavg()[0]
            try:
                m = _run_child(kind, url, n, inflight, stream, previous)
            finally:
                proc.terminate()
                proc.wait()
            m["load_before"], m["load_after"] = load_before, os.getloadavg()[0]
            if m["ok"] != n:
                print(
                    f"warning: {kind} N={n} stream={stream}: only {m['ok']} of {n} agents ended ok",
                    file=sys.stderr,
                )
            runs[kind].append(m)
    medians = {}
    for kind, measured in runs.items():
        measured.sort(key=lambda m: m["cpu_us_per_agent_turn"])
        best = dict(measured[len(measured) // 2])
        best["runs_us_per_agent_turn"] = [round(m["cpu_us_per_agent_turn"], 2) for m in measured]
        medians[kind] = best
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--max-inflight", type=int, default=256)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream", dest="modes", action="store_const", const=[True], help="streamed model calls only"
    )
    mode.add_argument(
        "--no-stream", dest="modes", action="store_const", const=[False], help="non-streamed calls only"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per client and N; the median is reported")
    p.add_argument(
        "--clients",
        nargs="+",
        choices=["batchagent", "baseline", "previous"],
        default=None,
        help="default: batchagent and baseline, plus previous with --previous",
    )
    p.add_argument(
        "--previous",
        metavar="PYTHON",
        help="an interpreter with an earlier BatchAgent build installed: measured beside this one",
    )
    p.add_argument("--out", default="bench-results/overhead.json")
    p.add_argument("--child", choices=["batchagent", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    modes: list[bool] = args.modes if args.modes is not None else [False, True]
    clients: list[str] = args.clients or ["batchagent", "baseline"] + (["previous"] if args.previous else [])
    if "previous" in clients and not args.previous:
        p.error("the previous client needs --previous PYTHON")
    if args.child:
        fn = child_batchagent if args.child == "batchagent" else child_baseline
        print(json.dumps(fn(args.url, args.agents[0], args.max_inflight, modes[0])))
        return

    rows = []
    for stream in modes:
        for n in args.agents:
            row: dict[str, Any] = {"agents": n, "stream": stream}
            row.update(_measure(clients, n, args.max_inflight, stream, max(args.repeat, 1), args.previous))
            line = f"{'stream' if stream else 'plain':>6}  N={n:>6}"
            for kind in clients:
                line += (
                    f"  {kind} {row[kind]['cpu_us_per_agent_turn']:8.1f} us/agent-turn ({row[kind]['ok']} ok)"
                )
            if "batchagent" in row and "baseline" in row:
                row["ratio"] = (
                    row["baseline"]["cpu_us_per_agent_turn"] / row["batchagent"]["cpu_us_per_agent_turn"]
                )
                line += f"  ratio {row['ratio']:.1f}x"
            if "batchagent" in row and "previous" in row:
                row["vs_previous"] = (
                    row["batchagent"]["cpu_us_per_agent_turn"] / row["previous"]["cpu_us_per_agent_turn"]
                )
                line += f"  current/previous {row['vs_previous']:.2f}"
            rows.append(row)
            print(line, flush=True)
    result = {
        "benchmark": "overhead",
        "unit": "client CPU microseconds (user+sys) per agent-turn",
        "max_inflight": args.max_inflight,
        "repeat": args.repeat,
        "previous": args.previous,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
