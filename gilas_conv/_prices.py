"""Prices the operator provides, and the cost of a request under them.

A price file is TOML or JSON (chosen by its suffix, ``.toml`` or ``.json``)::

    currency = "IRR"                  # any name: "IRR", "toman", "USD"

    [models."gpt-4o-mini"]            # per million tokens
    input = 150000
    cached_input = 75000              # optional: defaults to input
    output = 600000

It is given explicitly (``ConversationStore(prices=...)``, ``gilas-conv usage --prices
FILE``), else named by ``$GILAS_CONV_PRICES``; with none, gilas-conv records tokens only
and every cost is ``None``: no figure is ever invented.

A model is priced by its exact name, else by the longest priced name that it extends with
``-`` (``gpt-4o-mini-2024-07-18`` takes ``gpt-4o-mini``'s prices); a model matching none
has no cost. Costs are computed in integer millionths of the currency (``cost_micros``),
so adding them up is exact.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["ENV_PRICES", "ModelPrice", "Prices", "load_prices", "resolve_prices"]

ENV_PRICES = "GILAS_CONV_PRICES"
# Prices are per this many tokens.
PER_TOKENS = 1_000_000
MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices, in ``currency`` per million tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


@dataclass(frozen=True)
class Prices:
    """A price table: ``currency`` and a :class:`ModelPrice` per model name."""

    currency: str
    models: Mapping[str, ModelPrice]

    def price(self, model: str | None) -> ModelPrice | None:
        """The prices of ``model`` (exact name, else the longest ``name-`` prefix), or None."""
        if not model:
            return None
        found = self.models.get(model)
        if found is not None:
            return found
        best = None
        for name in self.models:
            if model.startswith(name + "-") and (best is None or len(name) > len(best)):
                best = name
        return self.models[best] if best is not None else None

    def cost_micros(
        self, model: str | None, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> int | None:
        """The cost of one request in millionths of the currency, or None when ``model``
        has no price. Cached prompt tokens are charged at ``cached_input``, the rest of the
        prompt at ``input``."""
        price = self.price(model)
        if price is None:
            return None
        cached = min(max(cached_tokens, 0), prompt_tokens)
        amount = (
            (prompt_tokens - cached) * price.input
            + cached * price.cached_input
            + completion_tokens * price.output
        )
        # (tokens x price per million) millionths: the micros, rounded half-even.
        return int(amount.to_integral_value())

    def most_expensive(self, model: str | None) -> Decimal | None:
        """The highest price per million tokens of ``model`` (what a reservation of tokens
        not yet known to be input or output is priced at), or None."""
        price = self.price(model)
        return None if price is None else max(price.input, price.cached_input, price.output)


def nonnegative_decimal(value: Any, where: str, *, error: type[Exception] = ConfigurationError) -> Decimal:
    """``value`` (an int, float, str or Decimal, not a bool) as a finite Decimal >= 0, else
    ``error`` naming ``where``: what a price, and a cost limit, must be."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise error(f"{where} must be a number, not {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation as err:
        raise error(f"{where} must be a number, not {value!r}") from err
    if not number.is_finite() or number < 0:
        raise error(f"{where} must be a number >= 0, not {value!r}")
    return number


def parse_prices(data: Any, *, source: str = "the price table") -> Prices:
    """A :class:`Prices` from already-parsed TOML/JSON data; ConfigurationError naming what
    is wrong otherwise."""
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{source}: expected a table with 'currency' and 'models'")
    currency = data.get("currency")
    if not isinstance(currency, str) or not currency.strip() or len(currency) > 32:
        raise ConfigurationError(f'{source}: \'currency\' must name the currency (e.g. "IRR" or "USD")')
    models = data.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ConfigurationError(f"{source}: 'models' must map model names to their prices")
    table: dict[str, ModelPrice] = {}
    for name, entry in models.items():
        where = f"{source}: models.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigurationError(f"{where} must be a table with input and output")
        unknown = set(entry) - {"input", "cached_input", "output"}
        if unknown:
            raise ConfigurationError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        for key in ("input", "output"):
            if key not in entry:
                raise ConfigurationError(f"{where}: '{key}' (per million tokens) is missing")
        given = nonnegative_decimal(entry["input"], f"{where}.input")
        table[str(name)] = ModelPrice(
            input=given,
            cached_input=nonnegative_decimal(entry.get("cached_input", given), f"{where}.cached_input"),
            output=nonnegative_decimal(entry["output"], f"{where}.output"),
        )
    return Prices(currency=currency.strip(), models=table)


def load_prices(path: str | os.PathLike[str]) -> Prices:
    """Read a price file (``.toml`` or ``.json``); ConfigurationError when it is missing or bad."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigurationError(f"cannot read the price file {file}: {err.strerror or err}") from err
    try:
        data = _toml().loads(raw.decode("utf-8")) if file.suffix.lower() == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigurationError(
            f"the price file {file} is not valid {file.suffix[1:] or 'JSON'}: {err}"
        ) from err
    return parse_prices(data, source=str(file))


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli  # a dependency on Python 3.10 only

    return tomli


def resolve_prices(prices: Prices | str | os.PathLike[str] | None) -> Prices | None:
    """The argument (a Prices or a file), else the file named by $GILAS_CONV_PRICES, else None."""
    if isinstance(prices, Prices):
        return prices
    if prices is not None:
        return load_prices(prices)
    from_env = os.environ.get(ENV_PRICES)
    return load_prices(from_env) if from_env else None
