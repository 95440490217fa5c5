"""Estimated cost of a run: per-model prices in US dollars per million tokens.

The built-in table holds list prices of common hosted models (standard tier, no batch discount) and
drifts as providers change them; `load_prices()` reads a JSON file whose entries override or extend
it. Self-hosted engines (vLLM, SGLang, Ollama, ...) have no per-token price: their cost is 0 unless
the user's table names the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PRICES", "Cost", "Price", "PriceError", "estimate", "find_price", "load_prices"]


class PriceError(ValueError):
    """A price file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens. `cached_input` is the price of prompt tokens served from the
    provider's prompt cache."""

    input: float
    cached_input: float
    output: float


PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5": Price(1.25, 0.125, 10.0),
    "gpt-5-mini": Price(0.25, 0.025, 2.0),
    "gpt-5-nano": Price(0.05, 0.005, 0.40),
    "gpt-4.1": Price(2.0, 0.50, 8.0),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4o": Price(2.50, 1.25, 10.0),
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "o1": Price(15.0, 7.50, 60.0),
    "o3": Price(2.0, 0.50, 8.0),
    "o3-pro": Price(20.0, 20.0, 80.0),
    "o3-mini": Price(1.10, 0.55, 4.40),
    "o4-mini": Price(1.10, 0.275, 4.40),
    "gpt-3.5-turbo": Price(0.50, 0.50, 1.50),
    # Anthropic (cached input = cache reads)
    "claude-opus-4-5": Price(5.0, 0.50, 25.0),
    "claude-opus-4-1": Price(15.0, 1.50, 75.0),
    "claude-opus-4": Price(15.0, 1.50, 75.0),
    "claude-sonnet-4-5": Price(3.0, 0.30, 15.0),
    "claude-sonnet-4": Price(3.0, 0.30, 15.0),
    "claude-3-7-sonnet": Price(3.0, 0.30, 15.0),
    "claude-3-5-sonnet": Price(3.0, 0.30, 15.0),
    "claude-haiku-4-5": Price(1.0, 0.10, 5.0),
    "claude-3-5-haiku": Price(0.80, 0.08, 4.0),
    "claude-3-haiku": Price(0.25, 0.03, 1.25),
    "claude-3-opus": Price(15.0, 1.50, 75.0),
    # Amazon Nova on Bedrock (on-demand)
    "amazon.nova-pro": Price(0.80, 0.20, 3.20),
    "amazon.nova-lite": Price(0.06, 0.015, 0.24),
    "amazon.nova-micro": Price(0.035, 0.00875, 0.14),
}

# Backends whose requests are billed per token by a provider; every other scheme is self-hosted.
_HOSTED_SCHEMES = ("openai", "anthropic", "bedrock")


@dataclass(frozen=True)
class Cost:
    """An estimate. `dollars` is 0 when no price applies; `note` says why."""

    dollars: float
    model: str
    price: Price | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "usd": round(self.dollars, 6),
            "model": self.model,
            "price_per_million": None if self.price is None else vars(self.price),
            "note": self.note,
        }

    def describe(self) -> str:
        if self.price is None:
            return f"$0.00 ({self.note})"
        return f"${self.dollars:,.4f} ({self.note})"


def _boundary_match(key: str, model: str) -> bool:
    # Provider ids wrap the name: "openai/gpt-4o-2024-08-06", "us.anthropic.claude-3-5-sonnet-...-v2:0".
    pattern = r"(?:^|[/.:])" + re.escape(key) + r"(?:$|[-:@./])"
    return re.search(pattern, model) is not None


def find_price(model: str, table: Mapping[str, Price]) -> tuple[str, Price] | None:
    """The entry for `model`: an exact name, else the longest table name found in it at a word
    boundary (so "gpt-4o-mini-2024-07-18" is gpt-4o-mini, not gpt-4o)."""
    name = model.strip().lower()
    if name in table:
        return name, table[name]
    for key in sorted(table, key=len, reverse=True):
        if _boundary_match(key, name):
            return key, table[key]
    return None


def _number(path: str, model: str, entry: Mapping[str, Any], key: str) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PriceError(
            f"{path}: {model!r}.{key} must be a number >= 0 (dollars per million tokens), got {value!r}"
        )
    return float(value)


def load_prices(path: str) -> dict[str, Price]:
    """Reads `{"model": {"input": 2.5, "cached_input": 1.25, "output": 10}}` (dollars per million
    tokens; `cached_input` defaults to `input`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise PriceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise PriceError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise PriceError(f"{path}: expected an object of model names, got {type(data).__name__}")
    prices: dict[str, Price] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict):
            raise PriceError(f"{path}: {model!r} must be an object with input, cached_input and output")
        unknown = set(entry) - {"input", "cached_input", "output"}
        if unknown:
            raise PriceError(f"{path}: {model!r}: unknown key(s) {', '.join(sorted(unknown))}")
        for required in ("input", "output"):
            if required not in entry:
                raise PriceError(f"{path}: {model!r} needs {required!r}")
        input_price = _number(path, model, entry, "input")
        cached = _number(path, model, entry, "cached_input") if "cached_input" in entry else input_price
        prices[model.strip().lower()] = Price(input_price, cached, _number(path, model, entry, "output"))
    return prices


def _scheme(url: str) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme.removesuffix("+https")


def estimate(
    *,
    model: str,
    backends: Sequence[str],
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    overrides: Mapping[str, Price] | None = None,
) -> Cost:
    """The cost of the tokens a run used. The user's table wins; then a self-hosted backend costs 0;
    then the built-in table; an unknown hosted model costs 0 with a note saying so."""
    uncached = max(prompt_tokens - cached_tokens, 0)

    def priced(key: str, price: Price, source: str) -> Cost:
        dollars = (
            uncached * price.input + cached_tokens * price.cached_input + completion_tokens * price.output
        ) / 1e6
        return Cost(dollars, model, price, f"{source} price for {key}")

    if overrides:
        found = find_price(model, overrides)
        if found is not None:
            return priced(*found, "your")
    if not any(_scheme(b) in _HOSTED_SCHEMES for b in backends):
        return Cost(0.0, model, None, "self-hosted backend: no per-token price; pass --prices to set one")
    found = find_price(model, PRICES)
    if found is not None:
        return priced(*found, "list")
    return Cost(0.0, model, None, f"no price known for model {model!r}; pass --prices to set one")
