"""A finished request's generation record: the journal line the serving thread writes, and the store's row.

The serving thread does the least it can (it is the gateway's bottleneck): `line` is the request's raw
figures (clock readings, token counts, the pricing lines already made for the answer) as one JSON array,
one `orjson.dumps`. Whoever writes to the store turns lines into rows (`rows`): the usage and timings JSON,
the success flag, text PostgreSQL can hold. With `accounting.writer: process` that is the writer process.

A line starts with SNAPSHOT (1). A line that starts with a request id is a row already (in
`GENERATION_COLUMNS` order: a journal left by an older gateway, or written by a test) and is taken as it is.
Each gateway version that added to the record appended members at the end of both kinds of line: a line an
older gateway left (of the versions in `SNAPSHOT_LINES`, or a row as long as one in `ROW_LENGTHS`) replays
with the members it lacks at their defaults (its guardrails did nothing, the response cache was not involved).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import orjson

from proxy.meta import MEDIA_UNITS, RequestMeta, Usage, timing_figures
from proxy.store.base import Generation

SNAPSHOT = 1

# A snapshot line as the first gateways wrote it (V1), member by member.
_V1_MEMBERS = (
    int,  # SNAPSHOT
    str,  # request id
    int,  # created at, unix milliseconds
    str,  # team id
    str,  # key id
    str,  # surface
    str,  # model
    str,  # provider
    str,  # upstream model
    str,  # the provider's response id
    bool,  # streamed
    int,  # status
    str,  # error code
    str,  # error message
    list[float] | None,  # `Usage`'s fields, in order
    str,  # usage source
    int,  # cost, nanos
    str,  # currency
    list,  # pricing lines
    float,  # t_start
    float,  # t_upstream_start
    float,  # t_first_token
    float,  # t_upstream_end
    float,  # t_end
    list[tuple[str, int, float, float]],  # attempts: provider, status, start, end
)
# The members later gateways appended, each with what a line written before it stands for.
_LATER_MEMBERS = (
    (list[dict] | None, None),  # V2: what the request's guardrails did (None: nothing)
    (str, ""),  # V3: what the response cache did: '' (not involved), hit, miss or bypass
    (int, 0),  # V3: on a hit, the nanos the answer would have cost
)
_MEMBERS = (*_V1_MEMBERS, *(kind for kind, _ in _LATER_MEMBERS))
_MISSING = tuple(default for _, default in _LATER_MEMBERS)
# Each version's snapshot line, checked member by member when a journal is replayed; newest first (V3 ends
# with the cache's members, V2 with guardrails, V1 with attempts).
SNAPSHOT_LINES = tuple(tuple[_MEMBERS[:n]] for n in (len(_MEMBERS), len(_V1_MEMBERS) + 1, len(_V1_MEMBERS)))
SnapshotLine, SnapshotLineV2, SnapshotLineV1 = SNAPSHOT_LINES
# A row line: the JSON members (usage, pricing lines, timings) as strings of JSON. Each version's rows end at a
# column (newest first: V3, V2, V1); the columns an older row lacks take `Generation`'s defaults.
_FIELDS = msgspec.structs.fields(Generation)
_ROW_TYPES = tuple(str if f.type is msgspec.Raw else f.type for f in _FIELDS)
_ROW_DEFAULTS = tuple(f.default for f in _FIELDS)
ROW_LENGTHS = tuple(Generation.__struct_fields__.index(end) + 1 for end in ("saved_nanos", "guardrails", "timings"))
# A line is tried as each shape in turn, newest first.
_SNAPSHOTS = tuple(msgspec.json.Decoder(shape) for shape in SNAPSHOT_LINES)
_ROWS = tuple(msgspec.json.Decoder(tuple[_ROW_TYPES[:length]]) for length in ROW_LENGTHS)  # type: ignore[misc]


def line(meta: RequestMeta, created_ms: int) -> bytes:
    """The journal line of a finished request (a JSON array and a newline)."""
    snapshot = _snapshot(meta, created_ms)
    try:
        return orjson.dumps(snapshot, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:  # a string that is not valid Unicode (a lone surrogate): repaired
        return orjson.dumps(tuple(_repaired(v) for v in snapshot), option=orjson.OPT_APPEND_NEWLINE)


def _snapshot(meta: RequestMeta, created_ms: int) -> tuple:
    """A finished request's figures, as its journal line holds them (`_MEMBERS`)."""
    usage = meta.usage
    return (
        SNAPSHOT,
        meta.request_id,
        created_ms,
        meta.team_id,
        meta.key_id,
        meta.surface,
        meta.model,
        meta.provider,
        meta.upstream_model,
        meta.native_id,
        meta.stream,
        meta.status,
        meta.error_code,
        meta.error_message,
        None if usage is None else msgspec.structs.astuple(usage),
        meta.usage_source,
        meta.cost_nanos or 0,
        meta.currency,
        orjson.Fragment(meta.pricing_json),
        meta.t_start,
        meta.t_upstream_start,
        meta.t_first_token,
        meta.t_upstream_end,
        meta.t_end,
        meta.attempts,
        meta.guardrails,
        meta.cache_status,
        meta.saved_nanos,
    )


def _repaired(value: object) -> object:
    return value.encode("utf-8", "replace").decode() if isinstance(value, str) else value


def check(data: bytes) -> None:
    """Raise `msgspec.DecodeError` unless `data` is one record (a snapshot or a row, without its newline), of
    this gateway or of an older one (the error is the oldest shape's)."""
    *newer, oldest = _SNAPSHOTS if data.startswith(b"[1,") else _ROWS
    for decoder in newer:
        try:
            decoder.decode(data)
            return
        except msgspec.DecodeError:
            pass
    oldest.decode(data)


def rows(lines: Sequence[bytes]) -> list[tuple]:
    """The store rows of journal lines, in `GENERATION_COLUMNS` order."""
    return [_row(item) for item in orjson.loads(b"[" + b",".join(lines) + b"]")]


def generation(data: bytes) -> Generation:
    """One journal line as a Generation."""
    return Generation.from_row(_row(orjson.loads(data)))


def _row(item: list) -> tuple:
    if item[0] != SNAPSHOT:
        return (*item, *_ROW_DEFAULTS[len(item) :])  # an older gateway's row: the columns it lacks at their defaults
    if len(item) < len(_MEMBERS):  # an older gateway's snapshot: the members it lacks at their defaults
        item = [*item, *_MISSING[len(item) - len(_V1_MEMBERS) :]]
    (
        *_,
        native_id,
        stream,
        status,
        error_code,
        error_message,
        usage,
        usage_source,
        cost,
        currency,
        pricing,
        t_start,
        t_upstream_start,
        t_first_token,
        t_upstream_end,
        t_end,
        attempts,
        guardrails,
        cache_status,
        saved_nanos,
    ) = item
    used = None if usage is None else Usage(*usage)
    output_tokens = used.output_tokens if used else 0
    timings = timing_figures(t_start, t_upstream_start, t_first_token, t_upstream_end, t_end, output_tokens, attempts)
    return (
        *item[1:9],  # request id, created at, team, key, surface, model, provider, upstream model: as they are
        native_id.replace("\0", ""),  # from the provider; PostgreSQL text cannot hold NUL
        stream,
        status,
        200 <= status < 300 and not error_code,
        error_code,
        error_message.replace("\0", ""),
        _usage_json(used),
        usage_source if used else "none",
        cost or 0,
        currency,
        orjson.dumps(pricing).decode(),
        orjson.dumps(timings).decode(),
        orjson.dumps(guardrails).decode() if guardrails else "",
        cache_status,
        saved_nanos,
    )


_USAGE = (
    '{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"cached_tokens":%d,"cache_write_tokens":%d,'
    '"reasoning_tokens":%d}'
)


def row(meta: RequestMeta, created_ms: int) -> tuple:
    """The generation record of a finished request, as a row in the store's column order: what its journal line
    becomes (`rows`), without the JSON between."""
    return _row(_snapshot(meta, created_ms))


def _usage_json(usage: Usage | None) -> str:
    if usage is None:
        return "{}"
    out = _USAGE % (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
    )
    if usage.units():  # media units, each only when metered: token-only records stay as they were
        metered = {name: value for name in MEDIA_UNITS if (value := getattr(usage, name))}
        out = out[:-1] + "," + orjson.dumps(metered).decode()[1:]
    return out
