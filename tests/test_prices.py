"""The price table: the date its figures were taken, and the refresh from genai-prices."""

from __future__ import annotations

import sys

import genai_prices
import pytest

from batchagent_rs.pricing import PRICES, PRICES_TAKEN, estimate, price_table


def test_the_built_in_table_says_when_it_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # As without the package: importing it fails.
    monkeypatch.setitem(sys.modules, "genai_prices", None)
    table = price_table()
    assert table.source == "built-in table" and table.taken == PRICES_TAKEN == "2026-11-25"
    assert table.prices == PRICES
    cost = estimate(
        model="gpt-4o", backends=["openai://"], prompt_tokens=1_000_000, cached_tokens=0, completion_tokens=0
    )
    assert cost.dollars == pytest.approx(PRICES["gpt-4o"].input)
    assert cost.note == f"list price for gpt-4o (table of {PRICES_TAKEN})"


def test_prices_are_refreshed_from_genai_prices_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    version = genai_prices.__version__
    table = price_table()
    assert table.source.startswith(f"genai-prices {version}") and table.taken == f"genai-prices {version}"
    # Each known model's figures are the package's, per million tokens.
    calc = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, cache_read_tokens=400, output_tokens=1000), "claude-sonnet-4-5"
    )
    price = table.prices["claude-sonnet-4-5"]
    assert price.input * 0.6 + price.cached_input * 0.4 == pytest.approx(float(calc.input_price) * 1000)
    assert price.output == pytest.approx(float(calc.output_price) * 1000)

    # A changed figure in the package's data shows up in the estimate: the estimate reads the
    # package, not the built-in table.
    real = genai_prices.calc_price

    def doubled(usage: object, model: str, **kwargs: object) -> object:
        result = real(usage, model, **kwargs)  # type: ignore[arg-type]
        result.input_price *= 2
        result.output_price *= 2
        return result

    monkeypatch.setattr(genai_prices, "calc_price", doubled)
    cost = estimate(
        model="gpt-4o-2024-08-06",
        backends=["openai://"],
        prompt_tokens=1_000_000,
        cached_tokens=0,
        completion_tokens=1_000_000,
    )
    assert cost.dollars == pytest.approx(2 * (PRICES["gpt-4o"].input + PRICES["gpt-4o"].output))
    assert cost.note.startswith(f"genai-prices {version} price for gpt-4o")


def test_a_model_genai_prices_does_not_know_keeps_the_built_in_price(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(*args: object, **kwargs: object) -> object:
        raise LookupError("Unable to find provider with model matching")

    monkeypatch.setattr(genai_prices, "calc_price", unknown)
    assert price_table().prices["gpt-4o"] == PRICES["gpt-4o"]
    cost = estimate(
        model="gpt-4o", backends=["openai://"], prompt_tokens=10, cached_tokens=0, completion_tokens=0
    )
    assert "table of" in cost.note
    nothing = estimate(
        model="my-model", backends=["openai://"], prompt_tokens=10, cached_tokens=0, completion_tokens=1
    )
    assert nothing.dollars == 0 and "no price known" in nothing.note
