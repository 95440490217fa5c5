"""Plan -> map -> reduce with one journal: a planner model lists N topics, a worker Batch studies
each one, a reducer combines the notes into one summary; each stage on its own backend.

    python examples/plan_map_reduce.py PLAN_BACKEND WORK_BACKEND REDUCE_BACKEND JOURNAL [N]

Kill it at any point and run the same command again: the plan, the finished map jobs and the
finished reduce groups come from JOURNAL, and only the rest is sent. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import time

import pydantic

from batchagent_rs import Batch, Planner, Reducer, plan_map_reduce


class Note(pydantic.BaseModel):
    topic: str
    finding: str


class Summary(pydantic.BaseModel):
    title: str
    points: list[str]


def main(argv: list[str]) -> None:
    plan_at, work, reduce_at, journal = argv[1:5]
    n = int(argv[5]) if len(argv) > 5 else 1000
    started = time.monotonic()
    out = plan_map_reduce(
        "Survey the field.",
        planner=Planner(backend=plan_at, model="planner", min_items=n, max_items=n, max_tokens=40 * n + 100),
        worker=Batch("Study {topic} in {area}.", output=Note, backend=work, model="worker", max_inflight=32),
        reducer=Reducer(
            task="Summarise the notes.",
            output=Summary,
            backend=reduce_at,
            model="reducer",
            fan_in=16,
            max_inflight=4,
            max_tokens=200,
        ),
        journal=journal,
    )
    print(
        json.dumps(
            {
                "inputs": len(out.inputs),
                "ok": sum(r.ok for r in out.results),
                "reduced": out.reduced.ok,
                "reduce_calls": out.reduced.turns,
                "seconds": round(time.monotonic() - started, 3),
                "summary": out.reduced.output.model_dump() if out.reduced.ok else None,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv)
