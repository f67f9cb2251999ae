"""What a call cost: the shipped price table (prices.json), a resource's own prices over it,
and the cost of what one call used, in billionths of the currency (exact integers).

The answering model's name (`gpt-4o-mini-2024-07-18`, a model router's pick) is priced as its
base model: lower case, without a dated version and without a deployment-type suffix. A model
the table does not know, or a figure missing for something the call used, makes the call
**unpriced** (never free), unless its resource names that figure. Costs are computed with
`Decimal` and stored on the usage record with the price's source, so a later price change
never rewrites what was spent.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import orjson

from shared.directory.models import parse_prices

TABLE_FILE = Path(__file__).with_name("prices.json")
NANO = Decimal(1_000_000_000)  # costs are kept in billionths of the currency
_MILLION = Decimal(1_000_000)
_SIXTY = Decimal(60)
# A dated version (-2024-07-18, -0125) and the suffixes deployment names carry for where
# they run; neither changes the model's list price here.
_DATED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")
_SUFFIXES = ("-globalstandard", "-global", "-datazone", "-data-zone", "-dzs", "-eu", "-us")
# Classes whose calls are not priced per call (a search service is billed for its capacity).
UNMETERED_CLASSES = frozenset({"azure-ai-search"})


@dataclass(frozen=True)
class Price:
    """The figures for one model: per 1M tokens (input, cached_input, output, audio_input),
    per image, per audio minute, per 1M characters; `source` says where they come from."""

    figures: dict[str, Decimal]
    source: str


@dataclass(frozen=True)
class Cost:
    """A call's cost: `nano` billionths of the currency, or unpriced (`priced` false)."""

    nano: int
    priced: bool
    source: str


FREE = Cost(0, True, "")
# The model each resource last answered with, by resource id: a deployment's own name need not
# be a model's, so its worst case is priced as what it answered before.
ANSWERED: dict[str, str] = {}


@functools.cache
def table() -> dict[str, Any]:
    """The shipped price table, read once."""
    return orjson.loads(TABLE_FILE.read_bytes())


def base_model(name: str) -> str:
    """The priced model a name stands for: gpt-4o-mini-2024-07-18 -> gpt-4o-mini."""
    name = name.strip().lower()
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    name = _DATED.sub("", name)
    return table().get("aliases", {}).get(name, name)


@functools.lru_cache(maxsize=1024)
def price_of(model: str, overrides: str = "") -> Price | None:
    """The price of a model (by any of its names), with a resource's own figures over it."""
    base = base_model(model) if model else ""
    entry = table()["models"].get(base)
    figures: dict[str, Decimal] = {}
    source = ""
    if entry is not None:
        figures = {k: Decimal(v) for k, v in entry.items() if k not in ("date", "source")}
        source = f"{base}@{entry['date']}"
    if overrides:
        figures.update(parse_prices(overrides))
        source = f"resource+{source}" if source else "resource"
    return Price(figures, source) if figures else None


def cost_of(
    price: Price | None,
    model_class: str,
    *,
    prompt: int = 0,
    cached: int = 0,
    audio: int = 0,
    completion: int = 0,
    audio_output: int = 0,
    units: int = 0,
) -> Cost:
    """The cost of what a call used (tokens of each kind, and `units` of its own unit)."""
    if model_class in UNMETERED_CLASSES:
        return FREE
    cached = min(cached, prompt)
    audio = min(audio, prompt - cached)
    audio_output = min(audio_output, completion)
    # (how many, of which figure, divided by)
    used: list[tuple[int, str, Decimal]] = [
        (prompt - cached - audio, "input", _MILLION),
        (completion - audio_output, "output", _MILLION),
        (audio, "audio_input", _MILLION),
        (audio_output, "audio_output", _MILLION),
    ]
    if cached:
        figure = "cached_input" if price and "cached_input" in price.figures else "input"
        used.append((cached, figure, _MILLION))
    if units and model_class == "openai-images":
        used.append((units, "image", Decimal(1)))
    elif units and model_class == "openai-audio":
        # Speech counts characters, transcriptions seconds: the model's price says which.
        if price is not None and "characters" in price.figures:
            used.append((units, "characters", _MILLION))
        else:
            used.append((units, "audio_minute", _SIXTY))
    if not any(count for count, _, _ in used):
        return FREE if price is None else Cost(0, True, price.source)
    if price is None:
        return Cost(0, False, "")
    total = Decimal(0)
    for count, figure, per in used:
        if not count:
            continue
        value = price.figures.get(figure)
        if value is None:
            return Cost(0, False, price.source)
        total += count * value / per
    return Cost(int((total * NANO).quantize(Decimal(1), ROUND_HALF_UP)), True, price.source)


def as_amount(nano: int) -> str:
    """Billionths of the currency as a decimal amount: 1234500 -> '0.0012345'."""
    amount = (Decimal(nano) / NANO).normalize()
    return f"{amount:f}"
