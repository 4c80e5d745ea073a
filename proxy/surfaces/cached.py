"""The inference path's side of the response cache: a hit answered in the surface's shape, and a miss's
answer turned into an entry (see `proxy.response_cache` for what is cached and under which key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from proxy.errors import GatewayError
from proxy.response_cache import EVENTS, JSON, NEUTRAL, RAW, Entry, Lookup, ResponseCache
from proxy.sse import SSE_HEADERS
from proxy.translators.neutral import ChatResponse
from proxy.translators.openai import inject_members
from proxy.translators.replay import answer_of, replay, stream_answer
from proxy.translators.responses import request_echo

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.meta import RequestMeta


def answer_hit(
    gw: Gateway, entry: Entry, meta: RequestMeta, stream: bool, wants_usage: bool, wants_meta: bool, body: bytes
) -> web.Response | None:
    """The answer to a request found in the cache, as its surface shapes it (a whole stream when it asked
    for one), priced at `cache.hit_price_ratio` of what it cost: the rest is saved. None when the entry
    cannot be read after all (then it is a miss)."""
    surface = meta.surface
    as_sent = entry.form == JSON and (not stream or surface in RAW)  # the provider's JSON serves as it is
    neutral = None if as_sent else _neutral(entry, surface)
    if not as_sent and neutral is None:
        return None
    meta.provider, meta.upstream_model, meta.usage, meta.stream = (
        entry.provider,
        entry.upstream_model,
        entry.usage,
        stream,
    )
    tariff = gw.pricing.tariff(meta.model, entry.provider)
    ratio = gw.cache.config.hit_price_ratio  # `cache` takes effect at a restart
    # Without `meta` (which differs every time), the same entry answers the same bytes: rendered once per
    # shape, and priced again when the tariff is another (a reload's pricing).
    memo_key = (surface, stream, wants_usage) if not wants_meta else None
    memo = entry.__dict__.setdefault("rendered", {}) if memo_key is not None and surface != "openai.responses" else None
    found = memo.get(memo_key) if memo is not None else None
    if found is not None and found[0] is not tariff:
        found = None
    if found is None:
        worth = tariff.cost(entry.usage)[0] if tariff is not None else entry.cost_nanos  # at today's prices
        charged = int(worth * ratio)
        lines = [_hit_line(charged)] if charged else []
        currency = tariff.currency if tariff is not None else "USD"
        pricing_json = orjson.dumps(lines)
    else:
        _, worth, charged, lines, currency, pricing_json, answer = found
    meta.cost_nanos, meta.saved_nanos, meta.cache_status = charged, worth - charged, "hit"
    meta.currency, meta.pricing_lines, meta.pricing_json = currency, lines, pricing_json
    if found is None:
        members = []
        if surface != "anthropic.messages":  # Messages stay Anthropic-shaped: cost is in meta when asked
            members.append(
                b'"cost_nanos":%d,"currency":%s,"pricing_lines":%s' % (charged, orjson.dumps(currency), pricing_json)
            )
        if wants_meta:
            members.append(b'"meta":' + orjson.dumps(meta.as_dict()))
        extra = b",".join(members)
        if neutral is None:
            answer = inject_members(entry.raw, extra)  # exactly what the provider's answer gave its client
        else:
            echo = request_echo(body) if surface == "openai.responses" else None  # what the request set, repeated
            answer = replay(surface, neutral, entry.usage, meta.model, stream, wants_usage, extra, echo)
        if memo is not None:
            memo[memo_key] = (tariff, worth, charged, lines, currency, pricing_json, answer)
    meta.status = 200
    meta.finished = True
    if meta.trace is not None:  # its finish reasons (and content) are read from it when its spans are exported
        meta.trace.answer, meta.trace.streamed = answer, stream and surface not in RAW
    headers = dict(SSE_HEADERS) if stream and surface not in RAW else {"Content-Type": "application/json"}
    headers["x-request-id"] = meta.request_id
    headers["x-cache"] = "HIT"
    return web.Response(body=answer, status=200, headers=headers)


def _hit_line(charged: int) -> dict:
    return {
        "meter": "cache_hit",
        "quantity": 1,
        "unit": "request",
        "unit_price_nanos": charged,
        "amount_nanos": charged,
    }


def entry_of(
    cache: ResponseCache, lookup: Lookup, meta: RequestMeta, answer: ChatResponse | bytes, stream: bool
) -> Entry:
    """The entry a successful answer makes, kept as it is at hand: the neutral answer of a translated exchange,
    the provider's JSON of a native one (`bytes`), or the stream the client got (`bytes`, `stream`). Reading
    it into another form waits for a hit that needs it."""
    usage, cost, provider, model = meta.usage, meta.cost_nanos or 0, meta.provider, meta.upstream_model
    if isinstance(answer, ChatResponse):
        return cache.entry(lookup, usage, cost, provider, model, NEUTRAL, answer=answer)
    return cache.entry(lookup, usage, cost, provider, model, EVENTS if stream else JSON, raw=answer)


def _neutral(entry: Entry, surface: str) -> ChatResponse | None:
    """The entry's answer in neutral form (read once, then kept with it); None when it cannot be read."""
    if entry.answer is not None:
        return entry.answer
    found = entry.__dict__.get("neutral")
    if found is None:
        try:
            read = stream_answer(surface, entry.raw) if entry.form == EVENTS else answer_of(surface, entry.raw)
        except GatewayError:
            read = None
        found = entry.__dict__["neutral"] = read[0] if read is not None else False
    return found or None
