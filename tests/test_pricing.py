"""Prices and cost lines: hand-computed nano-dollars, the catalogue's validation, and costs in responses."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from proxy.config import ConfigError, PriceSheet, load_config
from proxy.meta import Usage
from proxy.pricing import Pricing, Tariff
from tests.conftest import DEFAULT_CONFIG, auth

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def tariff(**prices: str) -> Tariff:
    return Tariff.of(PriceSheet(**{k: Decimal(v) for k, v in prices.items()}), "USD", "2025-10-01")


def amounts(lines: list[dict]) -> dict[str, tuple[int, int]]:
    return {line["meter"]: (line["quantity"], line["amount_nanos"]) for line in lines}


@pytest.mark.parametrize(
    ("prices", "usage", "total", "lines"),
    [
        # gpt-4o-mini: 1,000 in ($0.15/M) of which 200 cached ($0.075/M), 500 out ($0.60/M)
        (
            {"input_per_mtok": "0.15", "cached_input_per_mtok": "0.075", "output_per_mtok": "0.60"},
            Usage(input_tokens=1000, cached_input_tokens=200, output_tokens=500),
            435_000,
            {"input_tokens": (800, 120_000), "cached_input_tokens": (200, 15_000), "output_tokens": (500, 300_000)},
        ),
        # gpt-5: 12,345 in, 6,789 out at $1.25 / $10 per M
        (
            {"input_per_mtok": "1.25", "cached_input_per_mtok": "0.125", "output_per_mtok": "10"},
            Usage(input_tokens=12_345, output_tokens=6_789),
            15_431_250 + 67_890_000,
            {"input_tokens": (12_345, 15_431_250), "output_tokens": (6_789, 67_890_000)},
        ),
        # half a nano rounds up, once per line: 1 token at $0.0005/M = 0.5 nano -> 1
        ({"input_per_mtok": "0.0005"}, Usage(input_tokens=1), 1, {"input_tokens": (1, 1)}),
        # 0.4 nano rounds down to 0 (the line is kept: it was metered)
        ({"input_per_mtok": "0.0004"}, Usage(input_tokens=1), 0, {"input_tokens": (1, 0)}),
        # reasoning priced apart: output 100 of which 40 reasoning
        (
            {"output_per_mtok": "8", "reasoning_per_mtok": "4"},
            Usage(output_tokens=100, reasoning_tokens=40),
            480_000 + 160_000,
            {"output_tokens": (60, 480_000), "reasoning_tokens": (40, 160_000)},
        ),
        # reasoning without its own price is output (OpenAI's rule)
        (
            {"output_per_mtok": "8"},
            Usage(output_tokens=100, reasoning_tokens=40),
            800_000,
            {"output_tokens": (100, 800_000)},
        ),
        # cache writes (Anthropic-style), unset price = input price; plus a per-request fee
        (
            {"input_per_mtok": "3", "cache_write_per_mtok": "3.75", "per_request": "0.001"},
            Usage(input_tokens=1_000, cache_write_tokens=400),
            1_800_000 + 1_500_000 + 1_000_000,
            {"input_tokens": (600, 1_800_000), "cache_write_tokens": (400, 1_500_000), "requests": (1, 1_000_000)},
        ),
        # media by the unit: 3 images at $0.04
        ({"per_image": "0.04"}, Usage(images=3), 120_000_000, {"images": (3, 120_000_000)}),
        # 1,234 characters at $15 per million characters
        ({"per_mchar": "15"}, Usage(characters=1_234), 18_510_000, {"characters": (1_234, 18_510_000)}),
        # 8.47 s at $0.006 a minute: 8,470 ms x 6,000,000 / 60,000 (shown in seconds)
        ({"per_audio_minute": "0.006"}, Usage(audio_seconds=8.47), 847_000, {"audio_seconds": (8.47, 847_000)}),
        # a millisecond's price rounds half up, once: 1 ms at $0.00003 a minute = 0.5 nano -> 1
        ({"per_audio_minute": "0.00003"}, Usage(audio_seconds=0.001), 1, {"audio_seconds": (0.001, 1)}),
        # pages and searches, with a per-request fee
        (
            {"per_page": "0.001", "per_search": "0.002", "per_request": "0.0001"},
            Usage(pages=3, searches=2),
            3_000_000 + 4_000_000 + 100_000,
            {"pages": (3, 3_000_000), "searches": (2, 4_000_000), "requests": (1, 100_000)},
        ),
        # tokens and units in one sheet (gpt-image-1 style): both billed; an unpriced unit is not listed
        (
            {"input_per_mtok": "5", "output_per_mtok": "40", "per_image": "0"},
            Usage(input_tokens=50, output_tokens=1056, images=1),
            250_000 + 42_240_000,
            {"input_tokens": (50, 250_000), "output_tokens": (1056, 42_240_000)},
        ),
        # units without a price cost nothing
        ({"input_per_mtok": "1"}, Usage(images=4, pages=2), 0, {}),
        # free models and missing usage cost nothing and list nothing
        ({}, Usage(input_tokens=10, output_tokens=10), 0, {}),
        ({"input_per_mtok": "1"}, None, 0, {}),
    ],
)
def test_costs_match_hand_computed_nanos(prices, usage, total, lines):
    cost, got = tariff(**prices).cost(usage)
    assert cost == total
    assert amounts(got) == lines
    assert cost == sum(line["amount_nanos"] for line in got)
    assert all(isinstance(line["amount_nanos"], int) for line in got)


def test_target_prices_replace_the_models(tmp_path: Path):
    config_text = (DEFAULT_CONFIG.read_text() + "\n").replace(
        "  openai/gpt-4o-mini:\n    targets: [{provider: openai, model: gpt-4o-mini}]",
        "  openai/gpt-4o-mini:\n    targets: [{provider: openai, model: gpt-4o-mini}, {provider: groq, model: m}]",
    )
    (tmp_path / "gateway.yaml").write_text(config_text)
    (tmp_path / "pricing.yaml").write_text(
        'effective: "2025-10-01"\nmodels:\n  openai/gpt-4o-mini:\n    input_per_mtok: 0.15\n'
        "    targets:\n      groq: {input_per_mtok: 0.05}\n"
    )
    pricing = Pricing(load_config(tmp_path / "gateway.yaml", env={}).prices)
    assert pricing.tariff("openai/gpt-4o-mini", "openai").input == 150_000_000  # type: ignore[union-attr]
    assert pricing.tariff("openai/gpt-4o-mini", "groq").input == 50_000_000  # type: ignore[union-attr]
    assert pricing.tariff("openai/gpt-4o", "openai") is None
    assert pricing.batch_tariff("openai/gpt-4o-mini", "groq").input == 25_000_000  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("pricing", "path", "line", "fragment"),
    [
        (
            'effective: "2025-10-01"\nmodels:\n  openai/gpt-4o:\n    input_per_mtok: -1\n',
            "$.models['openai/gpt-4o'].input_per_mtok",
            4,
            "expected a price >= 0",
        ),
        (
            'effective: "2025-10-01"\nmodels:\n  openai/gpt-4o:\n    per_image: -0.04\n',
            "$.models['openai/gpt-4o'].per_image",
            4,
            "expected a price >= 0",
        ),
        ('effective: "last tuesday"\n', "$.effective", 1, "YYYY-MM-DD"),
        ('effective: "2025-10-01"\nbatch_discount: 0\n', "$.batch_discount", 2, "0 < x <= 1"),
        ("models: {}\n", "$", 1, "missing required field `effective`"),
        (
            'effective: "2025-10-01"\nmodels:\n  openai/gpt-4o:\n    input_per_token: 1\n',
            "$.models['openai/gpt-4o']",
            4,
            "unknown field `input_per_token`",
        ),
        (
            'effective: "2025-10-01"\nmodels:\n  openai/gpt-4o:\n    targets:\n      groq: {input_per_mtok: 1}\n',
            "$.models['openai/gpt-4o'].targets.groq",
            5,
            "has no target at provider 'groq'",
        ),
    ],
)
def test_pricing_file_errors_are_located(tmp_path: Path, pricing, path, line, fragment):
    (tmp_path / "gateway.yaml").write_text(DEFAULT_CONFIG.read_text())
    (tmp_path / "pricing.yaml").write_text(pricing)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "gateway.yaml", env={})
    err = info.value
    assert err.file.endswith("pricing.yaml") and (err.path, err.line) == (path, line), str(err)
    assert fragment in err.message


def test_a_named_pricing_file_must_exist(tmp_path: Path):
    (tmp_path / "gateway.yaml").write_text("pricing: {file: prices.yaml}\n")
    with pytest.raises(ConfigError, match="cannot read the pricing file"):
        load_config(tmp_path / "gateway.yaml", env={})
    (tmp_path / "other.yaml").write_text("server: {port: 1}\n")  # no pricing.yaml beside it: unpriced, fine
    assert load_config(tmp_path / "other.yaml", env={}).prices is None


def test_every_default_model_is_priced():
    config = load_config(DEFAULT_CONFIG, env={})
    pricing = Pricing(config.prices)
    assert [m for m in config.models if not pricing.priced(m)] == []


async def test_json_response_carries_cost_lines(gateway, key, mock):
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "meta": True}, headers=auth(key))
    data = await r.json()
    # the mock reports 11 prompt and 5 completion tokens: 11 x 150 + 5 x 600 nanos
    assert data["cost_nanos"] == 4_650 and data["currency"] == "USD"
    assert amounts(data["pricing_lines"]) == {"input_tokens": (11, 1_650), "output_tokens": (5, 3_000)}
    assert data["meta"]["cost_nanos"] == 4_650
    assert data["usage"]["prompt_tokens"] == 11


async def test_stream_final_chunk_carries_cost_when_usage_was_asked(gateway, key, mock):
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    body = await (await gateway.post("/v1/chat/completions", json=request, headers=auth(key))).read()
    payloads = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    final = orjson.loads(payloads[-2])
    assert final["usage"]["completion_tokens"] == 5 and final["cost_nanos"] == 4_650
    assert sum(b'"cost_nanos"' in p for p in payloads) == 1
    # without usage asked, no cost either: the client gets the stream it asked for
    body = await (await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))).read()
    assert b"cost_nanos" not in body


async def test_embeddings_are_priced_too(gateway, key, mock):
    data = await (
        await gateway.post(
            "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "x"}, headers=auth(key)
        )
    ).json()
    assert data["cost_nanos"] == 3 * 20  # 3 tokens at $0.02/M


def test_unit_lines_name_their_units():
    _, got = tariff(
        per_image="0.04", per_mchar="15", per_audio_minute="0.006", per_page="0.001", per_search="0.002"
    ).cost(Usage(images=1, characters=1, audio_seconds=1.5, pages=1, searches=1))
    assert [(line["meter"], line["unit"], line["unit_price_nanos"]) for line in got] == [
        ("images", "image", 40_000_000),
        ("characters", "1M characters", 15_000_000_000),
        ("audio_seconds", "minute", 6_000_000),
        ("pages", "page", 1_000_000),
        ("searches", "search", 2_000_000),
    ]
    assert got[2]["quantity"] == 1.5 and got[2]["amount_nanos"] == 150_000


async def test_the_price_sheet_lists_unit_prices_only_where_set(gateway, key):
    data = (await (await gateway.get("/v1/pricing/models", headers=auth(key))).json())["data"]
    sheets = {m["model_id"]: m for m in data["models"]}
    assert sheets["openai/dall-e-3"]["per_image"] == "0.04" and "per_image" not in sheets["openai/gpt-4o-mini"]
    assert sheets["openai/whisper-1"]["per_audio_minute"] == "0.006"
