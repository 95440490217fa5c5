"""The engine simulator: OpenAI (vLLM), Anthropic and Ollama protocols over a model of a
continuous-batching GPU engine, on a loopback port.

    with sim.start(profile="h100-qwen2.5-0.5b", time_scale=0.01, seed=7, fault_429=0.05) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sim")

Any option of a ``sim://`` URL query is a keyword argument (``tool_rounds``, ``distinct_args``,
``output_tokens="uniform:20:80"``, ``fault_500``, ``prefix_caching=False``, ...).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from ._core import SimServer, start_sim

__all__ = ["Simulator", "start"]


class Simulator:
    """A running simulator. ``stop()`` ends it; as a context manager it stops on exit."""

    def __init__(self, server: SimServer) -> None:
        self._server = server

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT`` (OpenAI clients take ``url + "/v1"``)."""
        return self._server.url

    def stats(self) -> dict[str, Any]:
        """What ``GET /sim/stats`` returns: requests by route and status, tokens, cache hits,
        faults injected by kind, recent TTFTs and their percentiles. After ``stop()``, the final
        stats (nothing is served after them)."""
        return self._server.stats()

    def stop(self) -> None:
        """Stop serving and end the engine loop. Calling it again does nothing."""
        self._server.stop()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Simulator(url={self.url!r})"


def start(
    profile: str = "h100-qwen2.5-7b",
    time_scale: float = 1.0,
    seed: int = 0,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: str | int | float | bool,
) -> Simulator:
    """Start a simulator and return once it listens. ``port=0`` takes a free port.

    ``profile`` is a built-in profile name or a path to a profile JSON file; ``time_scale`` is real
    seconds per simulated second (0.01 runs 100x faster, 0 never waits). Unknown options raise
    ``SchemaError`` naming the option.
    """
    settings: dict[str, str | int | float | bool] = {
        "profile": profile,
        "time_scale": time_scale,
        "seed": seed,
        "host": host,
        "port": port,
    }
    settings.update(options)
    return Simulator(start_sim(settings))
