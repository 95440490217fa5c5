"""The `batchagent` command: `run` (a batch from a file, or a run file), `demo`, `sim serve`."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, NoReturn

import pydantic

from . import __version__, _core
from ._core import BackendTimeout, BackendUnavailable, InputError, JournalError, RunError, SchemaError
from .batch import Batch, RunReport
from .dashboard import Dashboard, DashboardLogHandler
from .pricing import Price, PriceError, at_batch_price, auto_cost, estimate, load_prices
from .progress import BarLogHandler, Progress
from .runfile import SETTINGS, RunFileError, load_run_file
from .tables import require_pyarrow
from .tools import Tool, ToolDefinitionError, tool
from .tracing import otlp_tracer_provider

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
    (
        "--fault-cut-after-call",
        "fault_cut_after_call",
        "rate of tool-call streams cut after the 2nd call starts",
    ),
    ("--fault-grammar", "fault_grammar", "rate of schema-constrained requests that always fail (HTTP 500)"),
    ("--max-model-len", "max_model_len", "context window: longer requests get vLLM's 400 (default: none)"),
    (
        "--kv-pin-ttl",
        "kv_pin_ttl",
        "simulated seconds a tool-wait hint may keep an agent's KV blocks (default 30)",
    ),
    (
        "--kv-page-size",
        "kv_page_size",
        "tokens per KV page, a divisor of the 16-token block (default: one page per block)",
    ),
    (
        "--kv-eviction",
        "kv_eviction",
        "cached KV blocks evicted first: next_use (agents due back furthest away or done; default) or lru",
    ),
]


def _add_sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="h100-qwen2.5-7b", help="engine profile (default h100-qwen2.5-7b)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per real second (0.01 = 100x faster)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model",
        help="pin the served model name (other names get 404); unset, any name is served",
    )
    for flag, _, text in _SIM_FLAGS:
        p.add_argument(flag, help=text)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other simulator setting"
    )


def _sim_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {} if args.model is None else {"model": args.model}
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

    # A server answers many clients: every core, unless told otherwise (read when the runtime starts).
    os.environ.setdefault("BATCHAGENT_WORKER_THREADS", str(os.cpu_count() or 1))
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
    return _serve_until_stopped(server)


def _serve_until_stopped(server: Any) -> int:
    """Keeps a started server up until SIGTERM or Ctrl-C, then stops it."""
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


def _cmd_engine_serve(args: argparse.Namespace) -> int:
    from .engine import serve

    os.environ.setdefault("BATCHAGENT_WORKER_THREADS", str(os.cpu_count() or 1))
    server = serve.start(
        args.model, device=args.device, dtype=args.dtype, host=args.host, port=args.port,
        served_model_name=args.served_model_name, random_weights=args.random_weights,
        kv_cache_tokens=args.kv_cache_tokens, kv_page_size=args.kv_page_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_enable_prefix_caching, seed=args.seed,
        kv_pin_ttl=args.kv_pin_ttl, kv_eviction=args.kv_eviction, tool_call_parser=args.tool_call_parser,
    )  # fmt: skip
    print(f"engine listening on {server.url} (model {args.served_model_name or args.model})", flush=True)
    return _serve_until_stopped(server)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(
        agents=args.agents,
        max_inflight=args.max_inflight,
        time_scale=args.time_scale,
        profile=args.profile,
        baseline=not args.no_baseline,
        repeat=args.repeat,
    )
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return 0


# -- batchagent run -----------------------------------------------------------------------------


class UsageError(Exception):
    """A setting a person can fix: printed as one line, exit code 2."""


_RUN_FLAGS = tuple(SETTINGS)
_PROBE_TIMEOUT = 3.0


def default_cache_path() -> str:
    """Where the CLI keeps its response cache: `$BATCHAGENT_CACHE`, else under `$XDG_CACHE_HOME`
    (`~/.cache`)."""
    explicit = os.environ.get("BATCHAGENT_CACHE")
    if explicit:
        return explicit
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "batchagent", "responses.sqlite")


def _merged_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Run-file settings overridden by the flags given; also the run file's folder."""
    settings: dict[str, Any] = {}
    base: str | None = None
    positional = args.target
    if positional is not None and positional.endswith(".toml"):
        try:
            settings = load_run_file(positional)
        except RunFileError as exc:
            raise UsageError(str(exc)) from exc
        base = os.path.dirname(os.path.abspath(positional))
    elif positional is not None:
        if args.input is not None:
            raise UsageError(f"two inputs given: {positional!r} and --input {args.input!r}")
        settings["input"] = positional
    for key in _RUN_FLAGS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in ("task", "task_file") and ("task" in settings or "task_file" in settings):
            settings.pop("task", None)
            settings.pop("task_file", None)
        if key in ("system", "system_file") and ("system" in settings or "system_file" in settings):
            settings.pop("system", None)
            settings.pop("system_file", None)
        settings[key] = value
    return settings, base


def _read_text(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} {path}: not UTF-8 text: {exc}") from exc


def _import_attr(flag: str, spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{flag} {spec!r}: expected module:name")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"{flag} {spec}: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise UsageError(
            f"{flag} {spec}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(f"{flag} {spec}: module {module_name!r} has no attribute {attr!r}") from None
    return value


def load_schema(spec: str) -> type[pydantic.BaseModel] | dict[str, Any]:
    """`module:Model` (a pydantic model class) or a JSON Schema file."""
    if spec.endswith(".json"):
        text = _read_text("--schema", spec)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--schema {spec}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(schema, dict):
            raise UsageError(f"--schema {spec}: a JSON Schema is an object, got {type(schema).__name__}")
        return schema
    value = _import_attr("--schema", spec)
    if isinstance(value, type) and issubclass(value, pydantic.BaseModel):
        return value
    if isinstance(value, dict):
        return value
    raise UsageError(
        f"--schema {spec}: {type(value).__name__} is not a pydantic model class or a JSON Schema dict"
    )


def load_tools(specs: Sequence[str]) -> list[Tool]:
    """`module:fn,...` (a bare name after the first item reuses the previous module). Functions
    decorated with `@tool` are used as they are; plain functions are wrapped with `tool()`."""
    tools: list[Tool] = []
    module = ""
    for group in specs:
        for item in (part.strip() for part in group.split(",")):
            if not item:
                continue
            if ":" in item:
                module = item.partition(":")[0]
            elif module:
                item = f"{module}:{item}"
            else:
                raise UsageError(f"--tools {item!r}: expected module:function")
            value = _import_attr("--tools", item)
            if isinstance(value, Tool):
                tools.append(value)
            elif callable(value):
                try:
                    tools.append(tool(value))
                except ToolDefinitionError as exc:
                    raise UsageError(f"--tools {item}: {exc}") from exc
            else:
                raise UsageError(f"--tools {item}: {type(value).__name__} is not a function")
    return tools


def check_backends(backends: Sequence[str], model: str | None, headers: dict[str, str] | None = None) -> None:
    """Every backend must answer, and serve the model, before the first request is sent."""
    try:
        _core.check_backends(list(backends), model, None, _PROBE_TIMEOUT, list((headers or {}).items()))
    except (BackendUnavailable, SchemaError) as exc:
        raise UsageError(str(exc)) from exc


def _display_total(stats: dict[str, Any]) -> int | None:
    total = stats.get("input_total")
    return total if isinstance(total, int) and total > 0 else None


class _View:
    """The progress display for one run: a bar, the dashboard, log lines, or nothing."""

    def __init__(self, mode: str, output: str) -> None:
        self.mode = mode
        self.closed = False
        self.jobs_started = 0
        self.progress: Progress | None = None
        self.dashboard: Dashboard | None = None
        handler: logging.Handler
        if mode == "dashboard":
            self.dashboard = Dashboard(None, output=output, title=f"batchagent run -> {output}")
            handler = DashboardLogHandler(self.dashboard)
        elif mode == "quiet":
            handler = logging.StreamHandler(sys.stderr)
        else:
            self.progress = Progress(None, stream=sys.stderr, label="batchagent")
            handler = BarLogHandler(self.progress)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.handler = handler
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.ERROR if mode == "quiet" else logging.WARNING)

    def __enter__(self) -> _View:
        if self.dashboard is not None:
            self.dashboard.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(None)

    def update(self, stats: dict[str, Any]) -> None:
        self.jobs_started = max(self.jobs_started, int(stats["run"]["jobs_started"]))
        # The core counts the input in a first pass; the total arrives with the stats.
        total = _display_total(stats)
        if self.dashboard is not None:
            self.dashboard.total = total
            self.dashboard.update(stats)
        elif self.progress is not None:
            self.progress.total = total
            self.progress.update(stats)

    def close(self, stats: dict[str, Any] | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.dashboard is not None:
            if stats is not None:
                self.dashboard.total = _display_total(stats)
                self.dashboard.update(stats, force=True)
            self.dashboard.close()
        elif self.progress is not None:
            if stats is not None:
                self.progress.total = _display_total(stats)
                self.progress.close(stats)
            else:
                self.progress.clear()
        root = logging.getLogger()
        root.removeHandler(self.handler)
        if self.mode != "quiet":
            # Records after the display is gone go straight to stderr.
            fallback = logging.StreamHandler(sys.stderr)
            fallback.setFormatter(self.handler.formatter)
            root.addHandler(fallback)
            self.handler = fallback
        self.dashboard = None
        self.progress = None


def _remove_new_files(journal: str | None, output: str | None) -> None:
    paths = [] if journal is None else [journal, journal + "-wal", journal + "-shm", journal + "-journal"]
    if output is not None and os.path.isfile(output) and os.path.getsize(output) == 0:
        paths.append(output)
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            continue


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_run(args: argparse.Namespace) -> int:
    settings, base = _merged_settings(args)
    if not settings.get("trace"):
        return _run(settings, base)
    try:
        provider = otlp_tracer_provider()
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    from opentelemetry import trace as otel_trace

    # Global, so every batch of the command (the reduce too) traces into it.
    otel_trace.set_tracer_provider(provider)
    try:
        return _run(settings, base)
    finally:
        # Exports the spans still buffered.
        provider.shutdown()


def _run(settings: dict[str, Any], base: str | None) -> int:
    # Modules named by --schema and --tools are found next to the run file first, then here.
    for folder in (os.getcwd(), base):
        if folder is not None and folder not in sys.path:
            sys.path.insert(0, folder)
    input_path = settings.get("input")
    if not input_path:
        raise UsageError("no input: give a file (batchagent run prompts.txt) or --input FILE")
    if not os.path.isfile(input_path):
        raise UsageError(f"input {input_path}: no such file")
    output = settings.get("output") or os.path.splitext(input_path)[0] + ".results.jsonl"
    backends, model = _backends_and_model(settings)
    if settings.get("reduce_schema") and not settings.get("reduce_task"):
        raise UsageError("--reduce-schema needs --reduce-task: what to do with the results")
    reduce_schema = load_schema(settings["reduce_schema"]) if settings.get("reduce_schema") else None
    prices: dict[str, Price] = {}
    if settings.get("prices"):
        try:
            prices = load_prices(settings["prices"])
        except PriceError as exc:
            raise UsageError(str(exc)) from exc
    journal = settings.get("journal") or output + ".journal.sqlite"
    retry_failed = bool(settings.get("retry_failed"))
    # Retrying the failed jobs of a run is resuming it, with those jobs counted as not finished.
    resume = bool(settings.get("resume")) or retry_failed
    journal_exists = os.path.exists(journal)
    if journal_exists and not resume:
        raise UsageError(
            f"journal {journal} already holds a run: pass --resume to continue it (finished jobs are not "
            "sent again; --retry-failed also runs the failed ones again), or delete it to start over"
        )
    if resume and not journal_exists:
        flag = "--retry-failed" if retry_failed else "--resume"
        raise UsageError(f"{flag}: there is no journal at {journal} to resume")
    cache: str | None = None
    if not settings.get("no_cache"):
        cache = default_cache_path()
        try:
            os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        except OSError as exc:
            print(
                f"batchagent: no response cache ({cache}: {exc.strerror or exc}); running without",
                file=sys.stderr,
            )
            cache = None
    try:
        batch = batch_from_settings(settings, journal=journal, response_cache=cache)
    except (SchemaError, TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    # The batch's backends: local:// engines are running by now, under their loopback URLs.
    check_backends(batch._backends, batch._model, _headers(settings.get("extra_headers")))

    quiet = bool(settings.get("quiet"))
    mode = "quiet" if quiet else "dashboard" if settings.get("dashboard") and sys.stderr.isatty() else "bar"
    if settings.get("dashboard") and mode == "bar":
        print(
            "batchagent: --dashboard needs a terminal on stderr; showing log lines instead", file=sys.stderr
        )
    # A Parquet output is written at the end; until then the results stream to a JSONL beside it.
    streamed = output + ".partial.jsonl" if output.endswith(".parquet") else output
    if streamed != output:
        try:
            require_pyarrow()
        except ImportError as exc:
            raise UsageError(f"-o {output}: {exc}") from exc
    output_existed = os.path.exists(streamed)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    view = _View(mode, output)
    report: RunReport | None = None
    started = time.time()
    try:
        with view:
            report = batch.run_file(
                input_path,
                output,
                input_format="auto",
                skip_bad_lines=bool(settings.get("skip_bad_lines")),
                on_progress=view.update,
                progress_interval=0.2,
                progress=False,
                retry_failed=retry_failed,
            )
            view.close(report.raw)
    except KeyboardInterrupt:
        view.close(None)
        print(
            f"batchagent: interrupted; finished results are kept in {journal}. Run the same command with "
            "--resume to finish the rest.",
            file=sys.stderr,
        )
        return 130
    except (InputError, JournalError, SchemaError, BackendUnavailable, BackendTimeout, RunError) as exc:
        view.close(None)
        if view.jobs_started == 0:
            # Refused before any job ran: leave no empty journal behind that would ask for --resume.
            _remove_new_files(
                journal if not journal_exists else None, streamed if not output_existed else None
            )
        raise UsageError(str(exc)) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)

    reduced_file: str | None = None
    if settings.get("reduce_task"):
        reduced_file = _reduce_output(settings, reduce_schema, output, model, backends, journal)

    cost = estimate(
        model=model,
        backends=backends,
        prompt_tokens=report.prompt_tokens,
        cached_tokens=report.cached_tokens,
        completion_tokens=report.completion_tokens,
        overrides=prices,
    )
    saved = 0.0
    if settings.get("provider_batch"):
        cost = at_batch_price(cost)
    elif report.auto_routes is not None:
        cost, saved = auto_cost(report.auto_routes, model=model, backends=backends, overrides=prices)
    skipped = int(report.raw.get("run", {}).get("jobs_skipped", 0))
    duplicates = int(report.raw.get("run", {}).get("duplicates_skipped", 0))
    if not quiet:
        print(
            f"\nbatchagent run report ({output})\n{report.table()}\n"
            + (
                f"{'finished earlier'.ljust(21)}  {skipped} (in the journal, not sent again)\n"
                if skipped
                else ""
            )
            + (
                f"{'duplicate ids'.ljust(21)}  {duplicates} (skipped; see 'duplicate' in the output)\n"
                if duplicates
                else ""
            )
            + f"{'estimated cost'.ljust(21)}  {cost.describe()}"
            + (
                f"\n{'saved by batch API'.ljust(21)}  ${saved:,.4f}"
                if report.auto_routes is not None and cost.price is not None
                else ""
            )
            + (f"\n{'reduced output'.ljust(21)}  {reduced_file}" if reduced_file else "")
        )
    if settings.get("report"):
        data = {
            **report.to_dict(),
            "estimated_cost": cost.to_dict(),
            "model": model,
            "backends": backends,
            "input": input_path,
            "output": output,
            "journal": journal,
            "resumed": resume,
            "retried_failed": retry_failed,
            "finished_earlier": skipped,
            "duplicates_skipped": duplicates,
            "endpoints": report.raw.get("endpoints"),
            "provider_batch": report.raw.get("provider_batch"),
            "saved_by_batch_api_usd": round(saved, 6) if report.auto_routes is not None else None,
            "started_at": started,
        }
        try:
            with open(settings["report"], "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, default=str)
                fh.write("\n")
        except OSError as exc:
            raise UsageError(f"--report {settings['report']}: cannot write: {exc.strerror or exc}") from exc
    if report.failed > 0 and report.ok == 0:
        kind, message, count = _most_common_error(output)
        print(
            f"batchagent: every job of this run failed ({report.failed}); the most common error "
            f"({count} of them, {kind}): {_one_line(message)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _most_common_error(output: str) -> tuple[str, str, int]:
    """The (kind, message) most failed results in the output file share, and how many."""
    counts: Counter[tuple[str, str]] = Counter()
    if output.endswith(".parquet"):
        return _most_common_parquet_error(output)
    try:
        with open(output, encoding="utf-8") as fh:
            for line in fh:
                try:
                    error = json.loads(line).get("error")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(error, dict):
                    counts[(str(error.get("kind")), str(error.get("message")))] += 1
    except OSError:
        pass
    if not counts:
        return "unknown", "(no error message in the output)", 0
    (kind, message), count = counts.most_common(1)[0]
    return kind, message, count


def _most_common_parquet_error(output: str) -> tuple[str, str, int]:
    import pyarrow.parquet as pq

    counts: Counter[tuple[str, str]] = Counter()
    for batch in pq.ParquetFile(output).iter_batches(columns=["error_kind", "error_message"]):
        for kind, message in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            if kind is not None:
                counts[(str(kind), str(message))] += 1
    if not counts:
        return "unknown", "(no error message in the output)", 0
    (kind, message), count = counts.most_common(1)[0]
    return kind, message, count


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        nargs="?",
        metavar="INPUT|RUN.toml",
        help="the input file, or a run file holding the settings",
    )
    p.add_argument("--input", help="input: JSONL (one object a line), CSV, or text (one prompt a line)")
    p.add_argument(
        "-o",
        "--output",
        help="results, one JSON line per input (default: INPUT.results.jsonl); a name ending in .parquet "
        "writes Parquet (needs pyarrow) once the run is complete",
    )
    task = p.add_mutually_exclusive_group()
    task.add_argument("--task", help="the task template; {field} takes an input's field (default: {prompt})")
    task.add_argument("--task-file", dest="task_file", help="read the task template from a file")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system", help="the system prompt")
    system.add_argument("--system-file", dest="system_file", help="read the system prompt from a file")
    p.add_argument("--schema", help="structured output: module:Model (pydantic) or schema.json")
    p.add_argument(
        "--tools", action="append", help="tools: module:fn,... (@tool functions or plain functions)"
    )
    p.add_argument("--backend", action="append", help="backend URL; repeat it for a fleet")
    p.add_argument("-m", "--model", help="model name")
    p.add_argument(
        "-c", "--max-inflight", dest="max_inflight", type=_positive, help="model calls in flight (default 64)"
    )
    p.add_argument("--max-turns", dest="max_turns", type=_positive, help="model turns per job (default 8)")
    p.add_argument(
        "--rpm",
        type=_positive,
        help="requests per minute per endpoint (default: learned from the API's rate-limit headers)",
    )
    p.add_argument(
        "--tpm",
        type=_positive,
        help="tokens (prompt + max_tokens) per minute per endpoint (default: learned from the headers)",
    )
    p.add_argument(
        "--call-timeout",
        dest="call_timeout",
        type=_seconds,
        help="seconds one model call may take (default 600)",
    )
    p.add_argument(
        "--idle-timeout",
        dest="idle_timeout",
        type=_seconds,
        help="seconds a server may send nothing in the middle of an answer (default 300)",
    )
    p.add_argument(
        "--agent-timeout",
        dest="agent_timeout",
        type=_seconds,
        help="seconds one job may take (default: none)",
    )
    p.add_argument(
        "--max-response-bytes",
        dest="max_response_bytes",
        type=_positive,
        help="most bytes of one answer read from a server (default 67108864, 64 MiB)",
    )
    p.add_argument(
        "--lookahead",
        type=_positive,
        help="inputs read ahead and grouped by shared prefix before dispatch (default 2048)",
    )
    p.add_argument(
        "--kv-capacity-tokens",
        dest="kv_capacity_tokens",
        type=_positive,
        help="the engine's KV cache in tokens, where its /metrics does not say",
    )
    p.add_argument("--journal", help="run journal (default: OUTPUT.journal.sqlite)")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue the run recorded in the journal"
    )
    p.add_argument(
        "--retry-failed",
        dest="retry_failed",
        action="store_true",
        default=None,
        help="resume the run in the journal and run its failed jobs again (ok results are kept)",
    )
    p.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=_positive,
        help="most tokens per model answer (server default)",
    )
    p.add_argument(
        "--accept-truncated",
        dest="accept_truncated",
        action="store_true",
        default=None,
        help="accept a structured answer cut off at max_tokens once its JSON is repaired (marked truncated); "
        "by default it is a failed result of kind truncated",
    )
    p.add_argument(
        "--max-context-tokens",
        dest="max_context_tokens",
        type=_positive,
        help="compact an agent's conversation before a call that would exceed this many tokens "
        "(default: the backend's max_model_len from /v1/models, where it reports one)",
    )
    p.add_argument(
        "--no-compaction",
        dest="no_compaction",
        action="store_true",
        default=None,
        help="never compact; a conversation that outgrows the context fails with kind context_length",
    )
    p.add_argument(
        "--compaction-model",
        dest="compaction_model",
        help="model that summarises the oldest turns when dropping old tool outputs is not enough",
    )
    p.add_argument(
        "--compaction-backend",
        dest="compaction_backend",
        help="backend URL of the compaction model (default: the run's backend)",
    )
    p.add_argument(
        "--reduce-task",
        dest="reduce_task",
        help="after the run, combine the ok results into one with this task; written to "
        "OUTPUT.reduced.json (out.jsonl -> out.reduced.json)",
    )
    p.add_argument(
        "--reduce-schema",
        dest="reduce_schema",
        help="the reduced output's schema: module:Model or schema.json",
    )
    p.add_argument("--reduce-model", dest="reduce_model", help="model of the reduce (default: --model)")
    p.add_argument(
        "--reduce-backend", dest="reduce_backend", help="backend of the reduce (default: --backend)"
    )
    p.add_argument(
        "--reduce-fan-in",
        dest="reduce_fan_in",
        type=_positive,
        help="results combined by one reduce call at most (default 16); more go through a tree of calls",
    )
    p.add_argument(
        "--no-cache", dest="no_cache", action="store_true", default=None, help="bypass the response cache"
    )
    p.add_argument("--dashboard", action="store_true", default=None, help="a live multi-panel view")
    p.add_argument("--quiet", action="store_true", default=None, help="print nothing but errors")
    p.add_argument("--report", help="write the run report as JSON to this file")
    p.add_argument(
        "--skip-bad-lines",
        dest="skip_bad_lines",
        action="store_true",
        default=None,
        help="a malformed input line becomes a failed result instead of stopping the run",
    )
    p.add_argument(
        "--dedupe",
        dest="dedupe",
        action="store_true",
        default=None,
        help="a line whose id an earlier line has gets a 'duplicate' result instead of stopping the run",
    )
    p.add_argument(
        "--prices", help="JSON price table overriding the built-in one (dollars per million tokens)"
    )
    p.add_argument(
        "--engine-hints",
        dest="engine_hints",
        action="store_true",
        default=None,
        help="send vLLM's request priority (agents nearer completion first); the server must run "
        "with --scheduling-policy priority",
    )
    p.add_argument(
        "--redis",
        help='redis://host:6379/0: where tools declared with cache="redis" share their results',
    )
    p.add_argument(
        "--extra-body",
        dest="extra_body",
        type=_json_object,
        help="a JSON object merged into every request body (e.g. "
        "'{\"top_k\": 20}' for vLLM; see the README for each backend)",
    )
    p.add_argument(
        "-H",
        "--header",
        dest="extra_headers",
        action="append",
        type=_header,
        metavar="'NAME: VALUE'",
        help="a header sent with every request; repeat it for more",
    )
    p.add_argument(
        "--provider-batch",
        dest="provider_batch",
        action="store_true",
        default=None,
        help="send single-turn jobs through the provider's batch API (OpenAI Batch, Anthropic Message "
        "Batches): half the price, results within 24 h; --resume re-attaches to the batches in flight",
    )
    p.add_argument(
        "--auto-deadline",
        dest="auto_deadline",
        type=_seconds,
        metavar="SECONDS",
        help="auto mode, for agents too: each model call goes through the provider's batch API when "
        "the deadline (seconds from the first start: --resume keeps it) leaves time for the agent's "
        "remaining turns, online otherwise; the report says what went where and the cost saved",
    )
    p.add_argument(
        "--batch-turnaround",
        dest="batch_turnaround",
        type=_seconds,
        help="auto mode: a batch's turnaround assumed until one has come back (default 24 h, the "
        "providers' completion window)",
    )
    p.add_argument(
        "--batch-retry",
        dest="batch_retry",
        choices=("batch", "online"),
        help="where a call whose batch row failed is retried: in a new batch (default) or online",
    )
    p.add_argument(
        "--batch-poll-interval",
        dest="batch_poll_interval",
        type=_seconds,
        help="first wait before polling a batch, doubled after each poll (default 5 s)",
    )
    p.add_argument(
        "--batch-max-poll-interval",
        dest="batch_max_poll_interval",
        type=_seconds,
        help="longest wait between polls (default 60 s)",
    )
    p.add_argument(
        "--batch-linger",
        dest="batch_linger",
        type=_seconds,
        help="a batch is submitted once no new row came for this long, or when full (default 1 s)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        default=None,
        help="OpenTelemetry spans of every job, model call and tool call, exported over OTLP/HTTP to "
        "OTEL_EXPORTER_OTLP_ENDPOINT (default http://localhost:4318); needs batchagent[otel]",
    )
    p.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=_port,
        help="serve the run's figures for Prometheus on http://HOST:PORT/metrics while it runs",
    )
    p.add_argument(
        "--metrics-host",
        dest="metrics_host",
        help="address the metrics endpoint binds (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.set_defaults(func=_cmd_run)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        # The text is not shown: it may be a credential.
        raise argparse.ArgumentTypeError("expected 'Name: value'")
    return name.strip(), value.strip()


def _headers(value: Any) -> dict[str, str] | None:
    """Headers from a run file (a table) or from the flags (a list of pairs)."""
    if value is None or isinstance(value, dict):
        return value
    return dict(value)


def reduced_path(output: str) -> str:
    """Where `--reduce-task` writes the reduced output: beside the results, `OUTPUT.reduced.json`
    (`out.jsonl` -> `out.reduced.json`)."""
    return os.path.splitext(output)[0] + ".reduced.json"


def _reduce_output(
    settings: dict[str, Any],
    schema: Any,
    output: str,
    model: str,
    backends: list[str],
    journal: str,
) -> str:
    """Reduces the ok results of the output file into one (`--reduce-task`, `--reduce-schema`) and
    writes it as one JSON object (the `Result`'s fields) to `reduced_path(output)`. Finished groups
    are kept in the run's journal, so `--resume` does not send them again."""
    from .workflows import reduce

    # In input order: the file is in completion order, which a resumed run does not repeat, and
    # the groups (and so what the journal holds for them) must be the same each time.
    records = []
    with open(output, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                if record.get("ok"):
                    records.append((record.get("index", 0), record.get("output")))
    items = [item for _, item in sorted(records, key=lambda r: r[0])]
    if not items:
        raise UsageError(f"--reduce-task: no ok result in {output} to reduce")
    reduce_backend = settings.get("reduce_backend")
    try:
        result = reduce(
            items,
            task=settings["reduce_task"],
            output=schema,
            model=settings.get("reduce_model") or model,
            backend=reduce_backend or backends,
            fan_in=int(settings.get("reduce_fan_in") or 16),
            max_tokens=int(settings["max_tokens"]) if settings.get("max_tokens") else None,
            journal=journal,
        )
    except (SchemaError, TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    path = reduced_path(output)
    with open(path, "w", encoding="utf-8") as out:
        json.dump(result.to_dict(), out, ensure_ascii=False)
        out.write("\n")
    if not result.ok:
        assert result.error is not None
        print(f"batchagent: the reduce failed ({result.error.kind}): {result.error.message}", file=sys.stderr)
    return path


def _backends_and_model(settings: dict[str, Any]) -> tuple[list[str], str]:
    backends = list(settings.get("backend") or [])
    if not backends:
        raise UsageError(
            "no backend: pass --backend URL (vllm://host:port, ollama://host, openai://, sim:// ...)"
        )
    all_sim = all(b.strip().lower().startswith("sim://") for b in backends)
    local = next((b for b in backends if b.strip().lower().startswith("local://")), None)
    # local://DIR serves the directory under its name as given, as vLLM does.
    default = (
        "sim-model" if all_sim else local.strip()[len("local://") :].partition("?")[0] if local else None
    )
    model = settings.get("model") or default
    if model is None:
        raise UsageError(
            f"no model: pass --model/-m with the model name {_core.display_url(backends[0])} serves"
        )
    return backends, model


def batch_from_settings(
    settings: dict[str, Any],
    *,
    journal: str | None = None,
    response_cache: str | None = None,
) -> Batch:
    """The `Batch` a run file's settings (merged with the flags) describe: the one path from a run
    file to a batch, for `batchagent run` and `batchagent submit` alike."""
    backends, model = _backends_and_model(settings)
    if "task_file" in settings:
        task = _read_text("--task-file", settings["task_file"])
    else:
        task = settings.get("task") or "{prompt}"
    system = (
        _read_text("--system-file", settings["system_file"])
        if "system_file" in settings
        else settings.get("system")
    )
    return Batch(
        task,
        system=system,
        tools=load_tools(settings.get("tools") or []),
        output=load_schema(settings["schema"]) if settings.get("schema") else None,
        model=model,
        backend=backends,
        max_inflight=int(settings["max_inflight"]) if settings.get("max_inflight") else None,
        max_turns=int(settings.get("max_turns") or 8),
        **_limits(settings),
        lookahead=settings.get("lookahead"),
        kv_capacity_tokens=settings.get("kv_capacity_tokens"),
        max_tokens=int(settings["max_tokens"]) if settings.get("max_tokens") else None,
        accept_truncated=bool(settings.get("accept_truncated")),
        **_compaction(settings),
        journal=journal,
        response_cache=response_cache,
        dedupe=bool(settings.get("dedupe")),
        extra_body=settings.get("extra_body"),
        engine_hints=bool(settings.get("engine_hints")),
        rpm=int(settings["rpm"]) if settings.get("rpm") else None,
        tpm=int(settings["tpm"]) if settings.get("tpm") else None,
        extra_headers=_headers(settings.get("extra_headers")),
        **_provider_batch(settings),
        metrics_port=settings.get("metrics_port"),
        metrics_host=settings.get("metrics_host") or "127.0.0.1",
        redis=settings.get("redis"),
    )


def _compaction(settings: dict[str, Any]) -> dict[str, Any]:
    """The compaction settings that were set, as `Batch` keywords."""
    out: dict[str, Any] = {}
    if settings.get("max_context_tokens") is not None:
        out["max_context_tokens"] = int(settings["max_context_tokens"])
    if settings.get("no_compaction"):
        out["compaction"] = False
    for key in ("compaction_model", "compaction_backend"):
        if settings.get(key):
            out[key] = settings[key]
    return out


def _provider_batch(settings: dict[str, Any]) -> dict[str, Any]:
    """The provider batch settings that were given, as `Batch` keywords."""
    auto = settings.get("auto_deadline") is not None
    if settings.get("provider_batch") and auto:
        raise UsageError(
            "--provider-batch and --auto-deadline: choose one (auto mode uses the batch API too)"
        )
    if settings.get("batch_turnaround") is not None and not auto:
        raise UsageError("--batch-turnaround applies to auto mode only (--auto-deadline)")
    if not settings.get("provider_batch") and not auto:
        return {}
    keys = (
        "batch_retry",
        "batch_poll_interval",
        "batch_max_poll_interval",
        "batch_linger",
        "batch_turnaround",
    )
    given = {key: settings[key] for key in keys if settings.get(key) is not None}
    if auto:
        return {"mode": "auto", "deadline": settings["auto_deadline"], **given}
    return {"mode": "provider_batch", **given}


def _limits(settings: dict[str, Any]) -> dict[str, Any]:
    """The timeouts and the response size limit that were set, as `Batch` keywords."""
    keys = ("call_timeout", "idle_timeout", "agent_timeout", "max_response_bytes")
    return {key: settings[key] for key in keys if settings.get(key) is not None}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchagent", description="Run large batches of LLM agent work.")
    parser.add_argument("--version", action="version", version=f"batchagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a task over every record of a file",
        description="Run a task over every record of an input file; results go to JSONL as they finish.",
        epilog=(
            "Exit status: 0 when every input has a result (failed jobs are results too), 1 when every "
            "job of the run failed (the most common error is printed), 2 for a setting to fix (the "
            "message says which), 130 when interrupted (run again with --resume)."
        ),
    )
    _add_run_options(run)

    demo = sub.add_parser(
        "demo",
        help="run a multi-turn tool batch on the simulator, then the naive way",
        description=(
            "Two-turn research agents (a shared ~2,048-token system prompt, one slow lookup tool) on the "
            "built-in simulator, run by BatchAgent and by the naive openai SDK + asyncio.gather loop, "
            "interleaved after a warm-up of each; the table shows each side's median run."
        ),
    )
    demo.add_argument("--agents", type=_positive, default=300, help="agents per run (default 300)")
    demo.add_argument(
        "-c", "--max-inflight", type=_positive, default=32, help="model calls in flight (default 32)"
    )
    demo.add_argument(
        "--time-scale",
        type=float,
        default=0.25,
        help="real seconds per simulated second (default 0.25: four times faster than the GPU)",
    )
    demo.add_argument(
        "--profile",
        default="h100-qwen2.5-7b",
        help=(
            "simulated engine: h100-qwen2.5-7b (default), h100-qwen2.5-0.5b, h200-qwen2.5-7b, "
            "h200-qwen2.5-0.5b, or a profile JSON file"
        ),
    )
    demo.add_argument(
        "--repeat", type=_positive, default=3, help="runs of each side; the median is shown (default 3)"
    )
    demo.add_argument("--no-baseline", action="store_true", help="skip the naive comparison runs")
    demo.add_argument("--report", help="write both sides' figures as JSON to this file")
    demo.set_defaults(func=_cmd_demo)

    sim_parser = sub.add_parser("sim", help="the engine simulator")
    sim_sub = sim_parser.add_subparsers(dest="sim_command", required=True)
    serve = sim_sub.add_parser("serve", help="serve the OpenAI, Anthropic and Ollama protocols over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _add_sim_options(serve)
    serve.set_defaults(func=_cmd_sim_serve)

    engine_parser = sub.add_parser("engine", help="the embedded engine (PyTorch, needs the engine extra)")
    engine_sub = engine_parser.add_subparsers(dest="engine_command", required=True)
    eserve = engine_sub.add_parser("serve", help="serve a model directory over the OpenAI-compatible API")
    eserve.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    eserve.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda where there is one)")
    eserve.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU"
    )
    eserve.add_argument("--host", default="127.0.0.1")
    eserve.add_argument("--port", type=int, default=8000)
    eserve.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    eserve.add_argument("--random-weights", action="store_true", help="random weights of the config's shapes")
    eserve.add_argument("--kv-cache-tokens", type=_positive, help="KV cache size (default: GPU memory left)")
    eserve.add_argument(
        "--kv-page-size", type=_positive, choices=[1, 2, 4, 8, 16], default=4,
        help="tokens per KV page, a divisor of the 16-token block (default 4): a block that departs"
        " partway from a cached one shares its pages up to there, and an agent's last partial block"
        " stays cached for its next turn; 16: neither",
    )  # fmt: skip
    eserve.add_argument("--max-num-seqs", type=_positive, default=256)
    eserve.add_argument("--max-num-batched-tokens", type=_positive, default=8192)
    eserve.add_argument("--no-enable-prefix-caching", action="store_true")
    eserve.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    eserve.add_argument(
        "--kv-pin-ttl", type=_seconds, default=30.0,
        help="seconds a tool-wait hint may keep an agent's KV blocks at most (default 30)",
    )  # fmt: skip
    eserve.add_argument(
        "--kv-eviction", choices=["next_use", "lru"], default="next_use",
        help="which cached KV blocks go first when memory is short: those of agents due back furthest"
        " away or done, by the client's hints (next_use, the default), or least recently used (lru)",
    )  # fmt: skip
    eserve.add_argument(
        "--tool-call-parser", choices=["hermes", "llama3_json"], default=None,
        help="how chat answers' tool calls are read, as vLLM's option: hermes (<tool_call> blocks, "
        "Qwen2.5) or llama3_json (Llama 3.1 / 3.2); default: the form the model's chat template asks for",
    )  # fmt: skip
    eserve.set_defaults(func=_cmd_engine_serve)
    _add_fleet_commands(sub)
    return parser


# -- the worker fleet: submit / worker / status / collect ------------------------------------------


def _add_fleet_commands(sub: Any) -> None:
    submit = sub.add_parser(
        "submit",
        help="put a run file's inputs on a Redis stream for workers (prints the run id)",
        description=(
            "Store the run file's settings in Redis and stream its inputs there; `batchagent worker` "
            "processes on any machine run them. The run id is the last line printed."
        ),
    )
    submit.add_argument("run_file", help="a run file (the one `batchagent run` takes)")
    submit.add_argument("--redis", required=True, help="redis://host:6379/0")
    submit.add_argument("--input", help="the input file (default: the run file's input)")
    submit.set_defaults(func=_cmd_submit)

    work = sub.add_parser(
        "worker",
        help="run jobs of the fleet's runs (any number of workers, any machine)",
        description=(
            "Read jobs of submitted runs from Redis and run them; a job of a worker that died is taken "
            "over after its lease and resumes from its last finished turn."
        ),
    )
    work.add_argument("--redis", required=True, help="redis://host:6379/0")
    work.add_argument(
        "-c",
        "--max-inflight",
        type=_positive,
        help="this worker's model calls in flight (default: the run's)",
    )
    work.add_argument(
        "--tools-from", action="append", default=[], help="a module to import first (repeatable)"
    )
    work.add_argument("--run", help="work on this run only, and exit once it is complete")
    work.add_argument(
        "--lease-seconds",
        type=_seconds,
        default=30.0,
        help="a job not renewed for this long is taken over by another worker (default 30)",
    )
    work.add_argument("--once", action="store_true", help="exit when no run is left to work on")
    work.add_argument("--name", help="this worker's name in status (default HOST-PID)")
    work.set_defaults(func=_cmd_worker)

    status = sub.add_parser("status", help="a fleet run's progress and its workers")
    status.add_argument("run_id")
    status.add_argument("--redis", required=True, help="redis://host:6379/0")
    status.add_argument(
        "--json", action="store_true", help="print JSON (keys total, done, failed, in_flight, workers, ...)"
    )
    status.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=_seconds,
        metavar="SECONDS",
        help="redraw every SECONDS (default 1) until the run is complete: a live view of the run and "
        "its workers on a terminal, the status lines otherwise",
    )
    status.set_defaults(func=_cmd_status)

    collect = sub.add_parser(
        "collect", help="write a fleet run's results, one line per input, in input order"
    )
    collect.add_argument("run_id")
    collect.add_argument("--redis", required=True, help="redis://host:6379/0")
    collect.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    collect.add_argument("--wait", action="store_true", help="wait for the run to complete")
    collect.set_defaults(func=_cmd_collect)


# Settings a fleet run cannot have: the provider batch API takes a run in one process.
_LOCAL_SETTINGS = ("provider_batch", "auto_deadline")


def _cmd_submit(args: argparse.Namespace) -> int:
    from . import fleet

    try:
        settings = load_run_file(args.run_file)
    except RunFileError as exc:
        raise UsageError(str(exc)) from exc
    base = os.path.dirname(os.path.abspath(args.run_file))
    for folder in (os.getcwd(), base):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    unsupported = [k for k in settings if k.startswith("reduce_") or k in _LOCAL_SETTINGS]
    if unsupported:
        raise UsageError(f"{args.run_file}: {', '.join(unsupported)} cannot run on the fleet")
    input_path = os.path.abspath(args.input) if args.input else settings.get("input")
    if not input_path:
        raise UsageError("no input: set input in the run file or pass --input FILE")
    if not os.path.isfile(input_path):
        raise UsageError(f"input {input_path}: no such file")
    # Tools with cache="redis" share their results through the fleet's Redis.
    settings["redis"] = args.redis
    try:
        batch = batch_from_settings(settings)
        handle = fleet.submit_file(batch, input_path, args.redis)
    except (SchemaError, TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    total = handle.status()["total"]
    print(
        f"batchagent: {total} inputs submitted; "
        f"collect with: batchagent collect {handle.run_id} --redis URL -o FILE",
        file=sys.stderr,
    )
    print(handle.run_id)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from . import fleet

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fleet.worker(
            args.redis,
            run=args.run,
            concurrency=args.max_inflight,
            tools_from=args.tools_from,
            lease_seconds=args.lease_seconds,
            once=args.once,
            name=args.name,
        )
    except fleet.RefusedRun as exc:
        raise UsageError(f"run {args.run}: {exc}") from exc
    except ImportError as exc:
        raise UsageError(f"--tools-from: {exc}") from exc
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .fleet import FleetHandle

    handle = FleetHandle(args.run_id, args.redis)
    status = handle.status()
    if args.watch is not None:
        status = _watch(handle, status, args.watch)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print("\n".join(_status_lines(status)))
    return 0


def _complete(status: dict[str, Any]) -> bool:
    return bool(status["submitted"]) and status["done"] + status["failed"] >= status["total"]


def _watch(handle: Any, status: dict[str, Any], every: float) -> dict[str, Any]:
    """Shows the run until it is complete; returns its last status."""
    from .dashboard import FleetDashboard

    live = sys.stderr.isatty()
    view = FleetDashboard(None, title="fleet run", stream=sys.stderr, refresh=0.0)
    if live:
        view.open()
    try:
        while True:
            if live:
                view.update(status, force=True)
            else:
                print("\n".join(_status_lines(status)), file=sys.stderr, flush=True)
            if _complete(status):
                return status
            # The run's counts live in Redis: read again after the interval.
            time.sleep(every)
            status = handle.status()
    finally:
        view.close()


def _status_lines(status: dict[str, Any]) -> list[str]:
    state = "complete" if _complete(status) else "running"
    so_far = "" if status["submitted"] else " so far"
    lines = [
        f"run {status['run_id']}: {state}; {status['total']} inputs{so_far}, "
        f"{status['done']} done, {status['failed']} failed, {status['in_flight']} in flight, "
        f"{status['queued']} queued; {status['rate']:.1f}/s (last 10 s); "
        f"{status['claims']} taken over ({status['resumed']} resumed from a checkpoint)"
    ]
    for w in status["workers"]:
        if w["refused"]:
            lines.append(f"  {w['name']}: refused the run: {w['refused']}")
            continue
        rate = "" if w["rate"] is None else f", {w['rate']:.1f}/s"
        alive = "alive" if w["alive"] else "gone"
        lines.append(
            f"  {w['name']}: {alive}, seen {w['last_seen_s']:.1f} s ago, {w['results']} results{rate}, "
            f"{w['in_flight']} in flight"
        )
    return lines


def _cmd_collect(args: argparse.Namespace) -> int:
    from .fleet import FleetHandle

    handle = FleetHandle(args.run_id, args.redis)
    try:
        written = handle.collect(args.output, wait=args.wait)
    except RunError as exc:
        print(f"batchagent: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"batchagent: {written} results written to {args.output}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (
        UsageError,
        SchemaError,
        InputError,
        BackendUnavailable,
        BackendTimeout,
        JournalError,
        RunFileError,
        PriceError,
    ) as exc:
        # A mistake a person can fix: one line, no traceback.
        print(f"batchagent: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(what: BaseException | str) -> str:
    return " ".join(str(what).split()) or type(what).__name__


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (with where to look) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


if __name__ == "__main__":
    sys.exit(main())
