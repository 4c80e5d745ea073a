"""Credit holds: a request in flight holds its worst-case cost against its team's wallet, so concurrent
requests cannot spend what the wallet does not have (`auth.max_hold_usd`)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import msgspec

from proxy.app import build_app
from proxy.config import load_config
from proxy.gateway import GATEWAY
from proxy.pricing import NANOS_PER_USD
from tests.conftest import DEFAULT_CONFIG, auth, env_for

MODEL = "openai/gpt-4o-mini"


async def _fire(client, key: str, max_tokens: int, count: int) -> list[int]:
    """`count` streamed requests at once; the statuses of their answers' heads (the streams stay open)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": max_tokens}

    async def one():
        return await client.post("/v1/chat/completions", json=body, headers=auth(key))

    return await asyncio.gather(*(one() for _ in range(count)))


def _tokens_for(gw, usd: float) -> int:
    """The max_tokens that makes a request's worst case about `usd` on MODEL."""
    output_price = gw.pricing.worst(MODEL)[1]  # nanos per million tokens
    return int(usd * NANOS_PER_USD * 1_000_000 / output_price)


async def test_fifty_concurrent_requests_spend_only_what_the_wallet_holds(aiohttp_client, mock, store_url, make_key):
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))))
    gw = client.server.app[GATEWAY]
    key = await make_key(credit_usd=1.50)  # $0.50 above the default $1.00 minimum
    mock.control.gate_after = 1  # every stream waits after its first event until the gate opens
    answers = await _fire(client, key, _tokens_for(gw, 0.10), 50)
    statuses = sorted(a.status for a in answers)
    assert statuses.count(200) == 4 and statuses.count(402) == 46, statuses  # 4 of ~$0.10 fit in $0.50, not 5
    refused = next(a for a in answers if a.status == 402)
    message = (await refused.json())["error"]["message"]
    assert "is held by its requests in flight" in message and "lower max_tokens" in message
    assert gw.wallets.holds  # held while the streams run
    mock.control.gate.set()
    for answer in answers:
        if answer.status == 200:
            assert (await answer.read()).endswith(b"data: [DONE]\n\n")
    assert not gw.wallets.holds  # each hold ended with its request; the real cost was debited instead
    again = await _fire(client, key, _tokens_for(gw, 0.10), 1)
    assert again[0].status == 200
    await again[0].read()


async def test_without_holds_every_request_is_admitted(aiohttp_client, mock, store_url, make_key):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config = msgspec.structs.replace(config, auth=msgspec.structs.replace(config.auth, max_hold_usd=Decimal(0)))
    client = await aiohttp_client(build_app(config))
    assert client.server.app[GATEWAY].config.auth.max_hold_nanos == 0
    key = await make_key(credit_usd=1.50)
    mock.control.gate_after = 1
    answers = await _fire(client, key, _tokens_for(client.server.app[GATEWAY], 0.10), 20)
    assert [a.status for a in answers] == [200] * 20  # the README's old bound: in-flight requests are not counted
    mock.control.gate.set()
    for answer in answers:
        await answer.read()


async def test_a_hold_is_capped(aiohttp_client, mock, store_url, make_key):
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))))
    gw = client.server.app[GATEWAY]
    key = await make_key(credit_usd=3.00)  # $2.00 of room
    mock.control.gate_after = 1
    answers = await _fire(client, key, _tokens_for(gw, 50.0), 3)  # each could cost $50: held at the $1.00 cap
    assert sorted(a.status for a in answers) == [200, 200, 402]
    assert gw.wallets.holds == {next(iter(gw.wallets.holds)): 2 * NANOS_PER_USD}
    mock.control.gate.set()
    for answer in answers:
        await answer.read()
