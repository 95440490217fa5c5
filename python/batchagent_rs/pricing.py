"""Estimated cost of a run: per-model prices in US dollars per million tokens.

The built-in table holds list prices of common hosted models (standard tier, no batch discount) as
they were on `PRICES_TAKEN`, and drifts as providers change them. With the `genai-prices` package
installed (`pip install 'batchagent[prices]'`), its maintained data is used instead wherever it knows
the model (`price_table()` shows the refreshed table). `load_prices()` reads a JSON file whose
entries override both. Self-hosted engines (vLLM, SGLang, Ollama, ...) have no per-token price: their
cost is 0 unless the user's table names the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "PRICES",
    "PRICES_TAKEN",
    "Cost",
    "Price",
    "PriceError",
    "PriceTable",
    "estimate",
    "find_price",
    "load_prices",
    "price_table",
]


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

#: The day the figures of `PRICES` were taken from the providers' price pages.
PRICES_TAKEN = "2026-11-25"

# Backends whose requests are billed per token by a provider, and the provider's id in genai-prices;
# every other scheme is self-hosted.
_HOSTED_SCHEMES = {"openai": "openai", "anthropic": "anthropic", "bedrock": "aws"}


@dataclass(frozen=True)
class PriceTable:
    """Prices by model name, with where they come from and when they were taken (an ISO date, or
    the version of the package whose bundled data they are)."""

    prices: Mapping[str, Price]
    source: str
    taken: str


def _genai_prices() -> ModuleType | None:
    try:
        import genai_prices
    except ImportError:
        return None
    return genai_prices


def _genai_version(module: ModuleType) -> str:
    return f"genai-prices {getattr(module, '__version__', '')}".strip()


def _genai_lookup(module: ModuleType, model: str, provider: str | None) -> tuple[str, Price, str] | None:
    """(the package's model id, dollars per million tokens, when its data was taken) or None."""
    usage = module.Usage
    try:
        # Priced on a thousand tokens, not a million: tiered prices (long context) would apply to
        # a million-token request.
        fresh = module.calc_price(usage(input_tokens=1000, output_tokens=1000), model, provider_id=provider)
        cached = module.calc_price(
            usage(input_tokens=1000, cache_read_tokens=1000), model, provider_id=provider
        )
    except LookupError:
        return None
    price = Price(
        input=float(fresh.input_price) * 1000,
        cached_input=float(cached.input_price) * 1000,
        output=float(fresh.output_price) * 1000,
    )
    updated = fresh.auto_update_timestamp
    taken = f"{_genai_version(module)}, updated {updated:%Y-%m-%d}" if updated else _genai_version(module)
    return str(fresh.model.id), price, taken


def price_table() -> PriceTable:
    """The built-in table, refreshed from genai-prices when it is installed: each model it knows
    takes its price there; the others keep the built-in figure."""
    module = _genai_prices()
    if module is None:
        return PriceTable(dict(PRICES), "built-in table", PRICES_TAKEN)
    prices = dict(PRICES)
    taken = _genai_version(module)
    for name in PRICES:
        found = _genai_lookup(module, name, None)
        if found is not None:
            _, prices[name], taken = found
    return PriceTable(
        prices, f"{_genai_version(module)} (built-in table of {PRICES_TAKEN} where it has no price)", taken
    )


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


# OpenAI Batch and Anthropic Message Batches bill half the online price, input and output alike.
BATCH_DISCOUNT = 0.5


def at_batch_price(cost: Cost) -> Cost:
    """The cost of the same tokens sent through a provider batch API."""
    if cost.price is None:
        return cost
    return Cost(cost.dollars * BATCH_DISCOUNT, cost.model, cost.price, f"{cost.note}, batch API: 50% off")


def auto_cost(
    routes: Mapping[str, Any],
    *,
    model: str,
    backends: Sequence[str],
    overrides: Mapping[str, Price] | None = None,
) -> tuple[Cost, float]:
    """The cost of an auto-mode run (`RunReport.auto_routes`): its online tokens at the online price
    and its batch tokens at the batch price; and the dollars the batch API saved against sending
    every call online."""

    def at(route: str) -> Cost:
        r = routes[route]
        return estimate(
            model=model,
            backends=backends,
            prompt_tokens=int(r["prompt_tokens"]),
            cached_tokens=int(r["cached_tokens"]),
            completion_tokens=int(r["completion_tokens"]),
            overrides=overrides,
        )

    online, batch = at("online"), at("batch")
    discounted = at_batch_price(batch)
    total = online.dollars + discounted.dollars
    note = f"{online.note}; calls through the batch API at 50% off"
    return Cost(total, model, online.price, note), batch.dollars - discounted.dollars


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
    then genai-prices' data (when installed), then the built-in table; an unknown hosted model costs
    0 with a note saying so. The note names the source and the date of the price."""
    uncached = max(prompt_tokens - cached_tokens, 0)

    def priced(key: str, price: Price, source: str, when: str = "") -> Cost:
        dollars = (
            uncached * price.input + cached_tokens * price.cached_input + completion_tokens * price.output
        ) / 1e6
        return Cost(dollars, model, price, f"{source} price for {key}{when}")

    if overrides:
        found = find_price(model, overrides)
        if found is not None:
            return priced(*found, "your")
    hosted = [_HOSTED_SCHEMES[_scheme(b)] for b in backends if _scheme(b) in _HOSTED_SCHEMES]
    if not hosted:
        return Cost(0.0, model, None, "self-hosted backend: no per-token price; pass --prices to set one")
    module = _genai_prices()
    if module is not None:
        looked_up = _genai_lookup(module, model, hosted[0])
        if looked_up is not None:
            name, price, taken = looked_up
            return priced(name, price, taken)
    found = find_price(model, PRICES)
    if found is not None:
        return priced(*found, "list", f" (table of {PRICES_TAKEN})")
    return Cost(0.0, model, None, f"no price known for model {model!r}; pass --prices to set one")
