"""The `batchagent` command."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import __version__

_SIM_FLAGS = [
    ("--tool-rounds", "tool_rounds", "tool-calling turns before the answer (default 1)"),
    ("--distinct-args", "distinct_args", "distinct tool-argument values across agents (default 10)"),
    ("--parallel-tool-calls", "parallel_tool_calls", "tool calls per tool turn (default 1)"),
    ("--output-tokens", "output_tokens", "text answer length: fixed:N, uniform:A:B or normal:MEAN:SD"),
    ("--invalid-json-rate", "invalid_json_rate", "rate of JSON answers that violate the schema"),
    ("--prose-json-rate", "prose_json_rate", "rate of JSON answers wrapped in prose"),
    ("--fenced-json-rate", "fenced_json_rate", "rate of JSON answers in ``` fences"),
    ("--truncated-json-rate", "truncated_json_rate", "rate of JSON answers cut before the closers"),
    ("--fault-429", "fault_429", "rate of 429 answers with Retry-After"),
    ("--retry-after", "retry_after", "Retry-After seconds sent with 429"),
    ("--fault-500", "fault_500", "rate of HTTP 500"),
    ("--fault-503", "fault_503", "rate of HTTP 503"),
    ("--fault-reset", "fault_reset", "rate of connections reset mid-stream"),
    ("--fault-truncate", "fault_truncate", "rate of streams that end without their terminator"),
    ("--fault-malformed", "fault_malformed", "rate of malformed bodies"),
    ("--slow-first-byte", "slow_first_byte", "rate of slow first bytes"),
    ("--slow-first-byte-ms", "slow_first_byte_ms", "delay of a slow first byte in ms"),
]


def _add_sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="h100-qwen2.5-7b", help="engine profile (default h100-qwen2.5-7b)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per real second (0.01 = 100x faster)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="sim-model", help="served model name")
    for flag, _, text in _SIM_FLAGS:
        p.add_argument(flag, help=text)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other simulator setting"
    )


def _sim_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"model": args.model}
    for _, key, _ in _SIM_FLAGS:
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def _cmd_sim_serve(args: argparse.Namespace) -> int:
    from . import sim

    server = sim.start(
        profile=args.profile,
        time_scale=args.time_scale,
        seed=args.seed,
        host=args.host,
        port=args.port,
        **_sim_options(args),
    )
    print(
        f"simulator listening on {server.url} (profile {args.profile}, time scale {args.time_scale})",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(
        agents=args.agents,
        max_inflight=args.max_inflight,
        time_scale=args.time_scale,
        profile=args.profile,
        baseline=not args.no_baseline,
    )
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchagent", description="Run large batches of LLM agent work.")
    parser.add_argument("--version", action="version", version=f"batchagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a multi-turn tool batch on the simulator, then the naive way")
    demo.add_argument("--agents", type=int, default=300)
    demo.add_argument("-c", "--max-inflight", type=int, default=32)
    demo.add_argument("--time-scale", type=float, default=0.25, help="simulated seconds per real second")
    demo.add_argument("--profile", default="h100-qwen2.5-7b")
    demo.add_argument("--no-baseline", action="store_true", help="skip the naive comparison run")
    demo.add_argument("--report", help="write both runs' figures as JSON to this file")
    demo.set_defaults(func=_cmd_demo)

    sim_parser = sub.add_parser("sim", help="the engine simulator")
    sim_sub = sim_parser.add_subparsers(dest="sim_command", required=True)
    serve = sim_sub.add_parser("serve", help="serve the OpenAI, Anthropic and Ollama protocols over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _add_sim_options(serve)
    serve.set_defaults(func=_cmd_sim_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
