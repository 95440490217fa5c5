"""The baseline every benchmark compares against: what people write by hand. `asyncio.gather` over
all inputs, the official `openai` SDK, a semaphore, a Python tool, pydantic for the answer.

The loop itself lives in `batchagent_rs.baseline` so that `batchagent demo` can run it from an
installed package; this script runs it standalone against any OpenAI-compatible server:

    python benches/baselines/openai_gather.py --base-url http://127.0.0.1:8000/v1 --agents 100
"""

from __future__ import annotations

import argparse
import asyncio
import json

from batchagent_rs.baseline import run_naive
from batchagent_rs.demo import TASK, Finding, inputs, make_tools, system_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default="sim-model")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--max-inflight", type=int, default=32)
    p.add_argument("--tool-seconds", type=float, default=0.8)
    p.add_argument(
        "--per-call-semaphore", action="store_true", help="hold the semaphore only around model calls"
    )
    args = p.parse_args()
    outcome = asyncio.run(
        run_naive(
            base_url=args.base_url,
            model=args.model,
            system=system_prompt(),
            task=TASK,
            inputs=inputs(args.agents),
            tools=make_tools(args.tool_seconds),
            output=Finding,
            max_inflight=args.max_inflight,
            max_turns=4,
            hold_slot_during_tools=not args.per_call_semaphore,
        )
    )
    print(json.dumps(vars(outcome) | {"ttfts": len(outcome.ttfts)}))


if __name__ == "__main__":
    main()
