"""The native core of BatchAgent (Rust). Private: import from `batchagent_rs`."""

from typing import Any, ClassVar, final

__version__: str

class SchemaError(ValueError):
    """An output schema, tool signature or setting is invalid."""

class InputError(ValueError):
    """An input cannot be used: a missing template variable, a malformed line."""

class BackendUnavailable(ConnectionError):
    """The backend cannot be reached or refused the configuration."""

class BackendTimeout(TimeoutError):
    """The backend did not answer in time."""

class JournalError(OSError):
    """The journal, cache or output file cannot be used."""

class RunError(RuntimeError):
    """The run cannot continue."""

def check_schema(schema_json: str) -> None:
    """Compile a JSON Schema as a run would; raises `SchemaError` naming the bad part."""

def check_backends(
    backends: list[str],
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 3.0,
    extra_headers: list[tuple[str, str]] = ...,
) -> None:
    """Every backend answers within `timeout` seconds and, when `model` is given, serves it; raises
    `BackendUnavailable` naming the backend that did not answer, or listing the models served.
    `extra_headers` go with the probes as with the model calls; a bad one raises `SchemaError`."""

def check_headers(headers: list[tuple[str, str]]) -> None:
    """Check `extra_headers`: valid names, not the framing headers (Content-Length, Host, ...), no
    CR, LF or other control character in a value; raises `SchemaError` naming the header, never its
    value."""

def display_url(url: str) -> str:
    """The URL as it may be printed: no query and no user info (either can hold a key)."""

def check_spec(spec_json: str) -> None:
    """Validate a batch spec as a run would; raises `SchemaError` naming the setting."""

def save_population(path: str, settings_json: str, tick: int, agents: list[tuple[str, str]]) -> None:
    """Writes a population (settings, steps taken, agent states) to `path` in the journal's format."""

def load_population(path: str) -> tuple[str, int, list[tuple[str, str]]]:
    """Reads a population written by `save_population`."""

@final
class Run:
    """One batch run. Created from the spec and options as JSON; starts at once and waits for inputs."""

    def __new__(cls, spec_json: str, options_json: str) -> Run: ...
    def check_inputs(
        self, items: list[tuple[str, int, str, str | None]]
    ) -> list[
        tuple[
            str,
            int,
            bool,
            str | None,
            str | None,
            tuple[str, str, bool, int] | None,
            tuple[int, int, int, int, bool],
            tuple[int, int, int],
            tuple[bool, bool, str | None, bool],
            float | None,
            float,
        ]
    ]:
        """Check `(id, index, input json, extra body json)`: the task renders, the id is printable and
        not seen before, the extra body (the input's own `extra_body` fields) is a JSON object.

        Raises `InputError` on the first bad one. With the run option `dedupe`, a repeated id is
        skipped instead: its result (kind `duplicate`, as `take_events()` gives results) is written
        to the output file if the run has one, and returned."""
    def refuse_input(
        self, id: str, index: int, message: str
    ) -> tuple[
        str,
        int,
        bool,
        str | None,
        str | None,
        tuple[str, str, bool, int] | None,
        tuple[int, int, int, int, bool],
        tuple[int, int, int],
        tuple[bool, bool, str | None, bool],
        float | None,
        float,
    ]:
        """A lazily read input that `check_inputs` refused with `message`: its result (kind
        `bad_input`), counted, written to the output file if the run has one."""
    def feed(self, items: list[tuple[str, int, str, str | None]]) -> None:
        """Hand `(id, index, input json, extra body json)` to the run; no more than the credit
        granted so far."""
    def feed_agents(
        self,
        items: list[tuple[str, str, int, str | None, str | None]],
        max_context_tokens: int | None = None,
    ) -> list[tuple[str, str]]:
        """Starts one step of persistent agents `(agent id, job id, index, text, fields JSON)`, each
        from its conversation so far plus its observation (`text` as is, or `fields` rendered by the
        task template). Steps over `max_context_tokens` (estimated) are returned as `(job id,
        message)` and do not start."""
    def expire(self, job_ids: list[str]) -> None:
        """These steps' answers, when they come, do not enter their agents' histories."""
    def agent_states(self, agents: list[str]) -> list[tuple[str, str]]:
        """`(agent id, state JSON)` of each agent that has a history."""
    def restore_agents(self, items: list[tuple[str, str]]) -> None:
        """Sets agents' states as `agent_states` returns them."""
    def close_input(self) -> None:
        """No more inputs."""
    @property
    def window(self) -> int:
        """Live agents at once."""
    @property
    def initial_credit(self) -> int:
        """The window plus the lookahead: the first feed may hand over this many inputs."""
    def wake_fd(self) -> int:
        """A file descriptor that becomes readable when `take_events()` has something."""
    def take_traces(self) -> list[str]:
        """The span records of the jobs that finished since the last take (a traced run: option
        `trace`), one JSON object each: `id`, `index`, `ok`, `error` (the kind), `message`, `turns`,
        `tool_calls`, `usage`, `start_ns`, `end_ns` (Unix nanoseconds), `calls` (model calls: `turn`,
        `model`, `start_ns`, `end_ns`, `attempts`, `stream`, `compaction`, `ttft`, `usage`,
        `finish_reason`, `error`) and `tools` (`turn`, `name`, `call_id`, `start_ns`, `end_ns`,
        `error`)."""
    def take_events(
        self,
    ) -> tuple[
        list[tuple[int, str, str]],
        list[tuple[int, str, list[str]]],
        list[tuple[int, str, str]],
        list[
            tuple[
                str,
                int,
                bool,
                str | None,
                str | None,
                tuple[str, str, bool, int] | None,
                tuple[int, int, int, int, bool],
                tuple[int, int, int],
                tuple[bool, bool, str | None, bool],
                float | None,
                float,
            ]
        ],
        int,
        bool,
    ]:
        """`(tool_calls, batch_calls, validations, results, credit, done)`; each result is
        `(id, index, ok, output_json, text, (kind, message, retryable, attempts) | None,
        (prompt, cached, completion, cache_creation tokens), (turns, tool_calls, attempts),
        (repaired, truncated, finish_reason, text_is_output), ttft, total)`; `attempts` is 1 + the
        retries of the job's model calls (0 when none was made). Without a schema the output is the
        answer text: it comes once, as `text`, with `text_is_output` set and no `output_json`.
        Results of jobs an earlier run finished (a journal) come too, once each."""
    def complete_tools(self, items: list[tuple[int, bool, str]]) -> None:
        """Answers `(call id, ok, text)` for tool calls."""
    def complete_batches(self, items: list[tuple[int, bool, list[tuple[bool, str]], str]]) -> None:
        """Answers `(batch id, ok, [(ok, text)], error)` for batch tool calls."""
    def complete_validations(self, items: list[tuple[int, bool, str]]) -> None:
        """Answers `(validation id, ok, error message)`."""
    def stats_json(self) -> str:
        """Counters so far, as JSON: `run` (jobs, model calls, tokens, latencies), `tools` (totals
        and `per_tool`), `tool_errors` (tool name -> executions that ended in an error, for the
        tools with any), `backend`, `endpoints`, `engine`, `response_cache`."""
    def cancel(self) -> None:
        """Stop every agent now."""
    @property
    def metrics_url(self) -> str | None:
        """`http://host:port/metrics` while the run serves its figures (option `metrics`)."""
    def stop_metrics(self) -> None:
        """Stops serving `/metrics`; returns once the port is free."""
    @property
    def sim_url(self) -> str | None:
        """Base URL of the embedded simulator when the backend is `sim://`."""
    def error(self) -> str | None:
        """Why the run's output is incomplete (a journal or output write failed), if it is."""

@final
class SimServer:
    """A running engine simulator (OpenAI, Anthropic and Ollama protocols) on a loopback port."""

    @property
    def url(self) -> str:
        """Base URL, `http://127.0.0.1:PORT`."""
    def stats(self) -> dict[str, Any]:
        """What `GET /sim/stats` returns; after `stop()`, the final stats."""
    def stop(self) -> None:
        """Stop serving and end the engine loop; a second call does nothing."""

def start_sim(options: dict[str, str | int | float | bool]) -> SimServer:
    """Start a simulator with the options of a `sim://` URL query; returns once it listens."""

@final
class Engine:
    """The embedded engine over a model worker (`batchagent_rs.engine.EngineWorker`): the Rust
    continuous-batching scheduler and paged block manager on a thread of their own, calling the
    worker once per step with the whole batch's layout. KV pages: the worker's `num_pages` of
    `page_size` tokens; prefix caching hits whole blocks of the worker's `block_size` tokens."""

    def __new__(
        cls,
        worker: Any,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
    ) -> Engine: ...
    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        *,
        stop_token_ids: list[int] = ...,
        min_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """Generates for every prompt (token ids) at once, through the engine's continuous batching;
        returns each prompt's output token ids, in order."""
    def metrics(self) -> dict[str, int | float]:
        """The counters (vLLM's metric names without the prefix) as of the last step."""
    def shutdown(self) -> None:
        """Stops the loop after the step in progress."""

@final
class EngineServer:
    """The embedded engine serving the OpenAI-compatible API (`batchagent engine serve`)."""

    @property
    def url(self) -> str:
        """Base URL, `http://HOST:PORT`."""
    def stop(self) -> None:
        """Stops serving and the engine loop; a second call does nothing."""

def serve_engine(
    worker: Any,
    *,
    model: str,
    max_model_len: int,
    eos_token_ids: list[int],
    host: str = ...,
    port: int = 8000,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    enable_prefix_caching: bool = True,
    kv_pin_ttl: float = 30.0,
    kv_eviction: str = "next_use",
    tool_call_parser: str | None = None,
    chat_template: str | None = None,
) -> EngineServer:
    """Serves `worker`'s model (an `EngineWorker`) as `model`; returns once it listens.
    `kv_pin_ttl`: the longest a tool-wait hint keeps an agent's KV blocks, in seconds.
    `kv_eviction`: `next_use` (cached blocks of agents due back furthest away, or done, go first)
    or `lru`. `tool_call_parser`: `hermes` or `llama3_json` (vLLM's names); without it, the form
    `chat_template` (the model's Jinja source) asks for, Hermes when neither is given."""

@final
class TokenCounter:
    """Counts chat prompts' tokens as a backend will (its `/tokenize` where it has one; an
    embedded simulator's own tokenizer), and reads its context window from `/v1/models`."""

    def __new__(cls, backend: str, model: str, api_key: str | None = None) -> TokenCounter: ...
    @property
    def window(self) -> int | None:
        """The context window the backend reports (`max_model_len`), if it does."""
    @property
    def exact(self) -> bool:
        """Whether counts come from the backend's tokenizer (an estimate otherwise)."""
    def count(self, prompts: list[tuple[str | None, str]]) -> list[int]:
        """Prompt tokens of chat requests of (system message or None, user message)."""

def system_prompt(spec_json: str) -> str | None:
    """The system message a run of this spec sends with the schema in the prompt."""

@final
class FleetClient:
    """A connection to the Redis of a worker fleet; commands are retried while Redis is
    unreachable, for up to `outage_seconds`."""

    GROUP: ClassVar[str]
    """The consumer group of every run's job stream."""

    def __new__(cls, url: str, outage_seconds: float = 30.0) -> FleetClient: ...
    @staticmethod
    def jobs_stream(run_id: str) -> str:
        """The key of the run's job stream."""
    def create_run(self, spec_json: str) -> tuple[str, str]:
        """Create a run for the spec (stored once per fingerprint): `(run id, fingerprint)`."""
    def add_jobs(self, run_id: str, items: list[tuple[str, int, str, str | None]]) -> None:
        """Add inputs `(id, index, input JSON, extra_body JSON)` to the run's stream, in order."""
    def add_file(self, run_id: str, spec_json: str, path: str, format: str = "auto") -> int:
        """Add every record of an input file, checked whole first; returns the number of inputs."""
    def close_run(self, run_id: str, total: int) -> None:
        """Mark the run's input complete with `total` inputs."""
    def load_spec(self, run_id: str) -> tuple[str, str]:
        """`(fingerprint, spec JSON)` of a run."""
    def open_runs(self) -> list[str]:
        """Runs that are not complete, oldest first."""
    def refuse(self, run_id: str, worker: str, message: str) -> None:
        """Record that `worker` does not take the run, and why."""
    def status_json(self, run_id: str) -> str:
        """The run's status as JSON."""
    def results_since(
        self, run_id: str, cursor: str, count: int = 1000, block_ms: int = 0
    ) -> tuple[str, list[str]]:
        """Results written after `cursor` ("0" from the start): `(next cursor, JSON lines)`."""
    def collect(self, run_id: str, path: str) -> int | None:
        """Write one line per input, in input order; `None` while the run is not complete."""
