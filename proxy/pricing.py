"""Prices and cost lines, in integer nano-dollars.

A price sheet gives USD per million units (tokens, characters), per request and per unit of media (image,
page, search, minute of audio). `Tariff` holds the same prices as integer nano-dollars, so a line costs
`round_half_up(quantity * price / per)` nanos, where `per` is 1e6 for per-million prices, 60,000 for per
minute (audio is counted in milliseconds) and 1 otherwise: the only rounding, once per line. A request's
cost is the sum of its lines. No float is ever summed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final

from proxy.config import NANOS_PER_USD, PriceSheet, PricingFile
from proxy.meta import Usage

PER_MILLION: Final = 1_000_000
# What a line's quantity is divided by, per unit its price is given in (1 for the rest: request, image, …).
_PER: Final = {"1M tokens": PER_MILLION, "1M characters": PER_MILLION, "minute": 60_000, "second": 1000}  # in ms


def _nanos(usd: Decimal) -> int:
    return int((usd * NANOS_PER_USD).to_integral_value())


@dataclass(frozen=True, slots=True)
class Tariff:
    """One model at one provider: nano-dollars per million units, and per request."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    reasoning: int | None
    per_request: int
    currency: str
    effective: str
    per_image: int = 0
    per_mchar: int = 0  # per million characters
    per_audio_minute: int = 0
    per_page: int = 0
    per_search: int = 0
    per_video_second: int = 0
    units: bool = False  # any of the per-unit prices above is set

    def scaled(self, factor: Decimal) -> Tariff:
        """Every price times `factor` (rounded half up to whole nanos)."""

        def times(nanos: int) -> int:
            return int((nanos * factor).to_integral_value(ROUND_HALF_UP))

        prices = {
            name: times(getattr(self, name))
            for name in self.__dataclass_fields__
            if name not in ("currency", "effective", "units", "reasoning")
        }
        reasoning = None if self.reasoning is None else times(self.reasoning)
        return replace(self, **prices, reasoning=reasoning)

    @classmethod
    def of(cls, sheet: PriceSheet, currency: str, effective: str) -> Tariff:
        def per(value: Decimal | None, fallback: Decimal) -> int:
            return _nanos(fallback if value is None else value)

        units = {
            "per_image": _nanos(sheet.per_image),
            "per_mchar": _nanos(sheet.per_mchar),
            "per_audio_minute": _nanos(sheet.per_audio_minute),
            "per_page": _nanos(sheet.per_page),
            "per_search": _nanos(sheet.per_search),
            "per_video_second": _nanos(sheet.per_video_second),
        }
        return cls(
            input=_nanos(sheet.input_per_mtok),
            output=_nanos(sheet.output_per_mtok),
            cached_input=per(sheet.cached_input_per_mtok, sheet.input_per_mtok),
            cache_write=per(sheet.cache_write_per_mtok, sheet.input_per_mtok),
            reasoning=None if sheet.reasoning_per_mtok is None else _nanos(sheet.reasoning_per_mtok),
            per_request=_nanos(sheet.per_request),
            currency=currency,
            effective=effective,
            **units,
            units=any(units.values()),
        )

    def cost(self, usage: Usage | None) -> tuple[int, list[dict[str, Any]]]:
        """(total nanos, pricing lines) for one request's usage."""
        lines: list[dict[str, Any]] = []
        if usage is not None:
            cached = min(usage.cached_input_tokens, usage.input_tokens)
            writes = min(usage.cache_write_tokens, usage.input_tokens - cached)
            _line(lines, "input_tokens", usage.input_tokens - cached - writes, self.input)
            _line(lines, "cached_input_tokens", cached, self.cached_input)
            _line(lines, "cache_write_tokens", writes, self.cache_write)
            if self.reasoning is None:
                _line(lines, "output_tokens", usage.output_tokens, self.output)
            else:
                reasoning = min(usage.reasoning_tokens, usage.output_tokens)
                _line(lines, "output_tokens", usage.output_tokens - reasoning, self.output)
                _line(lines, "reasoning_tokens", reasoning, self.reasoning)
            if self.units:
                _line(lines, "images", usage.images, self.per_image, "image")
                _line(lines, "characters", usage.characters, self.per_mchar, "1M characters")
                ms = round(usage.audio_seconds * 1000)
                _line(lines, "audio_seconds", ms / 1000, self.per_audio_minute, "minute", ms)
                _line(lines, "pages", usage.pages, self.per_page, "page")
                _line(lines, "searches", usage.searches, self.per_search, "search")
                video_ms = round(usage.video_seconds * 1000)
                _line(lines, "video_seconds", video_ms / 1000, self.per_video_second, "second", video_ms)
        _line(lines, "requests", 1, self.per_request, "request")
        total = 0
        for entry in lines:
            total += entry["amount_nanos"]
        return total, lines


def _line(
    lines: list[dict[str, Any]],
    meter: str,
    quantity: int | float,
    price: int,
    unit: str = "1M tokens",
    counted: int = 0,
) -> None:
    """Append one pricing line (none for a zero quantity or price); `counted` is the quantity in the unit the
    amount is computed from, when it is not `quantity` itself (audio: milliseconds, shown as seconds)."""
    if quantity <= 0 or price <= 0:
        return
    per = _PER.get(unit, 1)
    amount = ((counted or quantity) * price + per // 2) // per  # counted: an int whenever quantity is not
    lines.append(
        {"meter": meter, "quantity": quantity, "unit": unit, "unit_price_nanos": price, "amount_nanos": amount}
    )


class Pricing:
    """Tariffs by (model id, provider), compiled once at start-up."""

    def __init__(self, file: PricingFile | None):
        self.currency = file.currency if file else "USD"
        self.batch_discount = file.batch_discount if file else Decimal("0.5")
        self._tariffs: dict[tuple[str, str], Tariff] = {}
        self._defaults: dict[str, Tariff] = {}
        self._worst: dict[str, tuple[int, int, int]] = {}
        if file is None:
            return
        for model_id, prices in file.models.items():
            self._defaults[model_id] = Tariff.of(prices, file.currency, file.effective)
            for provider, sheet in prices.targets.items():
                self._tariffs[(model_id, provider)] = Tariff.of(sheet, file.currency, file.effective)
            tariffs = [self._defaults[model_id], *(self._tariffs[(model_id, p)] for p in prices.targets)]
            self._worst[model_id] = (
                max(t.input for t in tariffs),
                max(max(t.output, t.reasoning or 0) for t in tariffs),
                max(t.per_request for t in tariffs),
            )

    def tariff(self, model_id: str, provider: str) -> Tariff | None:
        """The prices for `model_id` served by `provider`; None when the model is not priced."""
        return self._tariffs.get((model_id, provider)) or self._defaults.get(model_id)

    def batch_tariff(self, model_id: str, provider: str) -> Tariff | None:
        """The prices of a batch job's requests: the model's, times `batch_discount`."""
        tariff = self.tariff(model_id, provider)
        return None if tariff is None else tariff.scaled(self.batch_discount)

    def worst(self, model_id: str) -> tuple[int, int, int] | None:
        """The highest (input, output, per request) prices of `model_id` at any of its providers; None when
        the model is not priced. For a request's worst-case cost before a provider is chosen."""
        return self._worst.get(model_id)

    def priced(self, model_id: str) -> bool:
        return model_id in self._defaults
