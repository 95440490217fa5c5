"""Journal bytes per agent-turn with checkpoints stored whole and as block-hash diffs.

2,000 agents of six turns (five tool rounds, then the answer) share a 2,048-token system prompt;
each run journals every turn against the simulator at time scale 0. Both runs are in one process,
one after the other, each with a fresh journal:

- `full`: `BATCHAGENT_JOURNAL_CHECKPOINTS=full`, every checkpoint the whole JSON state (the
  journal's format before block diffs);
- `diff`: the default, a manifest of block hashes plus the blocks the journal did not hold.

Measured per agent-turn: bytes the process wrote (`wchar` of /proc/self/io over the run: the WAL
appends and their checkpoints into the database file; the run writes no output file), the
checkpoint bytes handed to the store (for `diff`, the manifest and the new blocks with their hashes:
what a Redis checkpoint carries to a block store shared by the fleet), and the journal's largest
size on disk (database + WAL, sampled every 20 ms) and its size at the end.

    python benches/journal_diff.py --out benches/results/journal_diff.json
    python benches/journal_diff.py --agents 200 --out /tmp/journal_diff.json

Build the extension in release first (`pip install .` or `maturin develop --release`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from batchagent_rs import Batch, sim, tool

TURNS = 6
PREFIX_TOKENS = 2048
ENV = "BATCHAGENT_JOURNAL_CHECKPOINTS"


def system_prompt(tokens: int) -> str:
    # About four bytes a token: words of the shape "w123 " stand for one token each.
    words = " ".join(f"w{(i * 7919) % 1000:03d}" for i in range(tokens))
    return "You review code for a team. Shared context follows.\n" + words


@tool(cache=False)
def read_file(path: str) -> str:
    """Read a file of the repository under review."""
    return json.dumps({"path": path, "lines": [f"def handler(request): return process(request, '{path}')"]})


def wchar() -> int:
    with open("/proc/self/io", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def journal_size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(str(path) + suffix)
        except FileNotFoundError:
            pass
    return total


def run(mode: str, agents: int, directory: Path, seed: int) -> dict[str, Any]:
    os.environ[ENV] = mode
    journal = directory / f"{mode}.sqlite"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], journal_size(journal))

    with sim.start(time_scale=0, seed=seed, tool_rounds=TURNS - 1, output_tokens="uniform:20:60") as server:
        batch = Batch(
            "Review src/module_{n}.py for bugs. Read the file as often as you need, then answer.",
            system=system_prompt(PREFIX_TOKENS),
            tools=[read_file],
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_turns=TURNS + 1,
            journal=journal,
            seed=seed,
        )
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        written = wchar()
        started = time.perf_counter()
        results = batch.run([{"id": f"a-{i:05d}", "n": i} for i in range(agents)], progress=False)
        wall = time.perf_counter() - started
        written = wchar() - written
        stop.set()
        sampler.join()
    report = batch.report()
    stats = report.raw["journal"]
    turns = stats["turns_written"]
    return {
        "mode": mode,
        "agents": agents,
        "ok": sum(r.ok for r in results),
        "agent_turns": turns,
        "wall_s": wall,
        "bytes_written": written,
        "bytes_written_per_turn": written / turns,
        "checkpoint_bytes_per_turn": stats["checkpoint_bytes"] / turns,
        "encoded_bytes_per_turn": stats["checkpoint_encoded_bytes"] / turns,
        "blocks_written": stats["blocks_written"],
        "blocks_deleted": stats["blocks_deleted"],
        "peak_journal_bytes": max(peak[0], journal_size(journal)),
        "final_journal_bytes": journal_size(journal),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benches/results/journal_diff.json"))
    args = parser.parse_args()
    before = os.environ.get(ENV)
    with tempfile.TemporaryDirectory(prefix="journal-diff-") as tmp:
        runs = {mode: run(mode, args.agents, Path(tmp), args.seed) for mode in ("full", "diff")}
    if before is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = before
    full, diff = runs["full"], runs["diff"]
    out = {
        "workload": f"{args.agents} agents x {TURNS} turns, a shared {PREFIX_TOKENS}-token system prompt, "
        "simulator at time scale 0",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
        "ratios_full_over_diff": {
            key: full[key] / diff[key] if diff[key] else None
            for key in ("bytes_written_per_turn", "encoded_bytes_per_turn", "peak_journal_bytes")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
