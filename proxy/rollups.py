"""Usage rollups: what a dashboard shows (requests, errors, spend, tokens, cache hits and savings, latency and TTFT
percentiles) summed per minute and per hour, so that an overview of 30 days reads thousands of rows, not a million
generation records.

Two tables (migration 8), kept by the accounting writer in the transaction that stores the records; a record counts
once, when its row is actually inserted (a replayed request id is skipped by both):

- `usage_rollups`, one row per (step_ms, team_id, bucket_ms, key_id, model_id, provider): requests, errors (status
  400 or more, or not a success), cache hits, input and output tokens, cost and saved nanos, the sums of latencies
  and of TTFTs (milliseconds) and the count of TTFTs.
- `team_rollups`, one row per (step_ms, team_id, bucket_ms): the same sums, a histogram of latencies and one of
  TTFTs.

The steps are a minute (rows older than MINUTES_KEPT_MS are not written and are pruned by the writer, at most every
PRUNE_EVERY_MS) and an hour (kept). An overview reads its series and totals from `team_rollups` and only its top
spenders from `usage_rollups`: at 1M records over 30 days (20 keys, 8 models) the latter has ~105,000 hour rows for
30 days, the former ~3,000. Histograms are kept per team only: per (key, model, provider) they would be merged
105,000 times for such a range, and cost the writer a histogram merge per group instead of per team.

A histogram counts values in fixed log-spaced buckets: 0 holds values under 1 ms, i (1 to 118) values in
[BOUNDS[i-1], BOUNDS[i]) = [1.12^(i-1), 1.12^i) ms, 119 values from 1.12^118 ms (10.7 minutes) up. It is stored
sparse, as a JSON object {"<bucket>": count} (PostgreSQL: `json`, read back as written). Two are added inside the
upsert, so concurrent writers add atomically: by `hist_add` (SQLite: a function registered on the writing
connection) or `rollup_hist_add` (PostgreSQL: migration 8). A quantile is interpolated inside the bucket that holds
the exact one: it is off by less than one bucket (under 12%), except in bucket 119, which answers its lower bound.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import partial
from operator import add, itemgetter

import msgspec
import orjson

from proxy.store.base import Generation, Overview, Spend, UsageFigures, UsagePoint

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
STEPS = (MINUTE_MS, HOUR_MS)
MINUTES_KEPT_MS = 48 * HOUR_MS
PRUNE_EVERY_MS = 5 * MINUTE_MS
MINUTE_RANGE_MS = 24 * HOUR_MS  # the longest range an overview reads from minute rollups

# Part of what the stored histograms mean (and of migration 8's `rollup_bucket`): never changed.
GROWTH = 1.12
BOUNDS = tuple(GROWTH**i for i in range(119))
BUCKETS = len(BOUNDS) + 1
TOP = 10  # models, providers and keys in an overview's top lists
# The sums of both tables (after their keys), as `aggregate` gives them; each added on conflict.
SUMS = (
    "requests",
    "errors",
    "cache_hits",
    "input_tokens",
    "output_tokens",
    "cost_nanos",
    "saved_nanos",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_count",
    "rate_limited",  # refused by a rate limit (migration 10)
    "guarded",  # a guardrail policy matched (blocked, redacted, logged or clamped)
    "blocked",  # refused by a guardrail policy
)
# The error codes of a request refused by a rate limit (`proxy.errors.Code`), and of one a guardrail refused.
RATE_LIMITED = ("rate_limited", "too_many_streams")
BLOCKED = "guardrail_blocked"
KEY = ("step_ms", "team_id", "bucket_ms", "key_id", "model_id", "provider")
_ZEROS = (0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0)  # a group's SUMS before its first record

_bucket = partial(bisect.bisect_right, BOUNDS)
_FIELDS = Generation.__struct_fields__
# What `aggregate` reads of a row, besides its usage and timings (JSON text, decoded with the batch's).
_PICK = itemgetter(
    *map(
        _FIELDS.index,
        (
            "created_at",
            "team_id",
            "key_id",
            "model_id",
            "provider",
            "status_code",
            "success",
            "cost_nanos",
            "cache_status",
            "saved_nanos",
            "error_code",
            "guardrails",
        ),
    )
)
_USAGE_OF, _TIMINGS_OF = itemgetter(_FIELDS.index("usage")), itemgetter(_FIELDS.index("timings"))


def bucket(ms: object) -> int | None:
    """The histogram bucket of a duration in milliseconds (None for anything but a number), as PostgreSQL's
    `rollup_bucket` (migration 8: `width_bucket(ms, BOUNDS)`)."""
    if isinstance(ms, bool) or not isinstance(ms, int | float) or math.isnan(ms):
        return None
    return _bucket(ms)


def hist_add(a: str | bytes, b: str | bytes) -> str:
    """The sum of two stored histograms (SQLite's `rollup_hist_add`)."""
    total = orjson.loads(a)
    for index, count in orjson.loads(b).items():
        total[index] = total.get(index, 0) + count
    return orjson.dumps(total).decode()


def hist_text(counts: Counter[int]) -> str:
    return orjson.dumps(counts, option=orjson.OPT_NON_STR_KEYS).decode()


def add_hist(into: dict[str, int], stored: str | bytes) -> None:
    """Add a stored histogram into counts by bucket (its keys, as stored)."""
    known = into.get
    for index, count in orjson.loads(stored).items():
        into[index] = known(index, 0) + count


def dense(counts: dict[str, int]) -> list[int]:
    """Counts by bucket as a list (BUCKETS long)."""
    out = [0] * BUCKETS
    for index, count in counts.items():
        out[int(index)] += count
    return out


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of the values a histogram counted, in milliseconds; None if it is empty: the value
    of rank ceil(q * n), placed inside its bucket as if the bucket's values were evenly spread."""
    total = sum(counts)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    below = 0
    for index, count in enumerate(counts):
        if below + count >= rank:
            if index == BUCKETS - 1:
                return BOUNDS[-1]
            low = BOUNDS[index - 1] if index else 0.0
            return low + (BOUNDS[index] - low) * (rank - below - 0.5) / count
        below += count
    raise AssertionError("unreachable: rank <= total")


def minutes_from(now_ms: int) -> int:
    """The oldest minute bucket kept at `now_ms`: older minute rollups are neither written nor kept. Moves in steps
    of PRUNE_EVERY_MS, so the writer prunes at most that often."""
    oldest = now_ms - MINUTES_KEPT_MS
    return oldest - oldest % PRUNE_EVERY_MS


# --- writing: the upserts of a batch of new rows (SQLite; PostgreSQL aggregates in SQL) ---------------------------


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Timings(msgspec.Struct):
    latency_ms: float | None = None
    ttft_ms: float | None = None


_USAGES = msgspec.json.Decoder(list[_Usage])
_TIMINGSES = msgspec.json.Decoder(list[_Timings])


def _views(texts: Sequence[str], many: msgspec.json.Decoder, kind: type) -> list:
    """The JSON members of rows decoded as views, in one call; one by one when one of them is odd (a row an older
    gateway, or a test, wrote)."""
    try:
        return many.decode("[" + ",".join(texts) + "]")
    except (msgspec.DecodeError, TypeError):
        return [_lenient(text, kind) for text in texts]


def _lenient(text: str, kind: type) -> msgspec.Struct:
    """One JSON member as a view, field by field: a field that is not a number counts as absent (as migration 8's
    backfill, and PostgreSQL's `record`, read it)."""
    try:
        doc = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return kind()
    found = {}
    for field in msgspec.structs.fields(kind) if isinstance(doc, dict) else ():
        with contextlib.suppress(msgspec.ValidationError):
            found[field.name] = msgspec.convert(doc.get(field.name, field.default), field.type)
    return kind(**found)


def aggregate(rows: Sequence[tuple], minutes_from_ms: int) -> tuple[list[tuple], list[tuple]]:
    """The rollup upserts of new generation rows (`GENERATION_COLUMNS` order): one per `usage_rollups` key, as
    (step_ms, team_id, bucket_ms, key_id, model_id, provider, requests, errors, cache_hits, input_tokens,
    output_tokens, cost_nanos, saved_nanos, latency_ms_sum, ttft_ms_sum, ttft_count, rate_limited, guarded, blocked),
    and one per `team_rollups` key, as (step_ms, team_id, bucket_ms, requests .. blocked, latency_hist,
    ttft_hist). Minute buckets before `minutes_from_ms` are left out (pruned already, or about to be).

    The writer runs this for every record, so a record costs one pass of the least work: its usage and timings
    decoded with the batch's (two calls), its figures added to its (minute, team, key, model, provider) group's,
    its latency and TTFT listed with its (minute, team)'s; the rest is done once per group or per list."""
    usage = _views(list(map(_USAGE_OF, rows)), _USAGES, _Usage)
    timings = _views(list(map(_TIMINGS_OF, rows)), _TIMINGSES, _Timings)
    groups: dict[tuple, list] = {}
    timed: dict[tuple, tuple[list[float], list[float]]] = {}  # per (minute, team): latencies and TTFTs
    find = groups.get
    for picked, used, times in zip(map(_PICK, rows), usage, timings, strict=True):
        created, team, key_id, model, provider, status, success, cost, cache, saved, code, guarded = picked
        minute = created - created % MINUTE_MS
        key = (minute, team, key_id, model, provider)
        group = find(key)
        if group is None:  # its sums (SUMS' order), then its (minute, team)'s latencies and TTFTs
            group = groups[key] = [*_ZEROS, timed.setdefault((minute, team), ([], []))]
        group[0] += 1
        if status >= 400 or not success:
            group[1] += 1
        if cache == "hit":
            group[2] += 1
        group[3] += used.prompt_tokens
        group[4] += used.completion_tokens
        group[5] += cost
        group[6] += saved
        if (latency := times.latency_ms) is not None:
            group[7] += latency
            group[13][0].append(latency)
        if (ttft := times.ttft_ms) is not None:
            group[8] += ttft
            group[9] += 1
            group[13][1].append(ttft)
        if code:
            if code in RATE_LIMITED:
                group[10] += 1
            elif code == BLOCKED:
                group[12] += 1
        if guarded:
            group[11] += 1
    sums: list[tuple] = []
    hours: dict[tuple, list] = {}
    teams: dict[tuple, list] = {}  # per (minute, team)
    for (minute, team, key_id, model, provider), group in groups.items():
        figures = group[:13]
        if minute >= minutes_from_ms:
            sums.append((MINUTE_MS, team, minute, key_id, model, provider, *figures))
        hour = (HOUR_MS, team, minute - minute % HOUR_MS, key_id, model, provider)
        summed = hours.get(hour)
        hours[hour] = figures if summed is None else list(map(add, summed, figures))
        summed = teams.get((minute, team))
        teams[minute, team] = figures if summed is None else list(map(add, summed, figures))
    sums += [(*hour, *figures) for hour, figures in hours.items()]
    team_rows: dict[tuple, tuple[list, Counter[int], Counter[int]]] = {}
    for (minute, team), (latencies, ttfts) in timed.items():
        made = teams[minute, team], Counter(map(_bucket, latencies)), Counter(map(_bucket, ttfts))
        if minute >= minutes_from_ms:
            team_rows[MINUTE_MS, team, minute] = made
        key = (HOUR_MS, team, minute - minute % HOUR_MS)
        summed = team_rows.get(key)
        team_rows[key] = (
            made if summed is None else (list(map(add, summed[0], made[0])), summed[1] + made[1], summed[2] + made[2])
        )
    return sums, [(*key, *figures, hist_text(lat), hist_text(ttft)) for key, (figures, lat, ttft) in team_rows.items()]


# --- reading: an overview from the rows a backend's queries return ------------------------------------------------


def rollup_step(since_ms: int, until_ms: int, now_ms: int) -> int:
    """The rollups an overview of [since_ms, until_ms) reads: minutes for a range of a day or less whose minutes
    are still kept, else hours."""
    if until_ms - since_ms <= MINUTE_RANGE_MS and since_ms >= minutes_from(now_ms) + PRUNE_EVERY_MS:
        return MINUTE_MS
    return HOUR_MS


def check_range(since_ms: int, until_ms: int, step_ms: int, rollup: int) -> None:
    if until_ms <= since_ms:
        raise ValueError(f"until_ms ({until_ms}) must be after since_ms ({since_ms})")
    if step_ms <= 0 or step_ms % rollup:
        raise ValueError(f"step_ms ({step_ms}) must be a positive multiple of the rollup step ({rollup} ms)")


def check_hour(since_ms: int) -> None:
    """A sum of hour rollups from `since_ms` on is exact only from the start of an hour (ValueError otherwise)."""
    if since_ms % HOUR_MS:
        raise ValueError(f"since_ms ({since_ms}) must be the start of a UTC hour")


def first_bucket(since_ms: int, rollup: int) -> int:
    """The first rollup bucket of a range: the one holding since_ms (a range is widened to whole rollup buckets)."""
    return since_ms - since_ms % rollup


_READ = 10  # the sums an overview reads of `team_rollups`, as `UsageFigures` has them


def overview(
    *,
    since_ms: int,
    until_ms: int,
    step_ms: int,
    rollup: int,
    teams: Iterable[Sequence],
    spend: Iterable[Sequence],
) -> Overview:
    """An Overview from a backend's two reads of a range: `teams` rows (start, requests, errors, cost_nanos,
    input_tokens, output_tokens, cache_hits, saved_nanos, rate_limited, guarded, blocked, latency_hist, ttft_hist), one
    per team and rollup bucket, `start` the series bucket (a multiple of step_ms) that holds it; `spend` rows
    (key_id, model_id, provider, requests, cost_nanos) summed over the range."""
    points: dict[int, tuple[list[int], dict[str, int], dict[str, int]]] = {}
    for start, *sums, latencies, ttfts in teams:
        point = points.get(start)
        if point is None:
            point = points[start] = ([0] * _READ, {}, {})
        point[0][:] = map(add, point[0], sums)
        add_hist(point[1], latencies)
        add_hist(point[2], ttfts)
    figures = {start: (sums, dense(latencies), dense(ttfts)) for start, (sums, latencies, ttfts) in points.items()}
    empty = ([0] * _READ, [0] * BUCKETS, [0] * BUCKETS)
    first = first_bucket(since_ms, rollup)
    series = [
        UsagePoint(*_figures_of(*figures.get(start, empty)), start_ms=start)
        for start in range(first - first % step_ms, until_ms, step_ms)
    ]
    totals = ([0] * _READ, [0] * BUCKETS, [0] * BUCKETS)
    for point in figures.values():
        for total, part in zip(totals, point, strict=True):
            total[:] = map(add, total, part)
    models: dict[str, list[int]] = {}
    providers: dict[str, list[int]] = {}
    keys: dict[str, list[int]] = {}
    for key_id, model_id, provider, requests, cost in spend:
        for into, name in ((models, model_id), (providers, provider), (keys, key_id)):
            spent = into.setdefault(name, [0, 0])
            spent[0] += requests
            spent[1] += cost
    return Overview(
        since_ms=since_ms,
        until_ms=until_ms,
        step_ms=step_ms,
        rollup_step_ms=rollup,
        series=series,
        totals=UsageFigures(*_figures_of(*totals)),
        top_models=_top(models),
        top_providers=_top(providers),
        top_keys=_top(keys),
    )


def _figures_of(sums: Sequence[int], latencies: Sequence[int], ttfts: Sequence[int]) -> tuple:
    """`UsageFigures`' members, in order, from summed columns and dense histograms."""
    return (
        *sums,
        quantile(latencies, 0.5),
        quantile(latencies, 0.95),
        quantile(ttfts, 0.5),
        quantile(ttfts, 0.95),
    )


def _top(spenders: dict[str, list[int]]) -> list[Spend]:
    ranked = sorted(spenders.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
    return [Spend(name, requests, cost) for name, (requests, cost) in ranked[:TOP]]
