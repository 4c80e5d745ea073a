"""`proxy.rollups` and the stores' usage rollups: kept by `Store.record` exactly once, equal to a direct aggregation
of `generations`, pruned, backfilled by migration 8, and read by `Store.overview` (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import orjson
import pytest

from proxy import records, rollups
from proxy.journal import encode_row
from proxy.meta import RequestMeta, Usage
from proxy.store import Store, migrations, open_store
from proxy.store.base import GENERATION_COLUMNS, Generation
from proxy.store.postgres import PostgresStore
from tests.test_store import funded_team, generation, record_lines

HOUR_MS = rollups.HOUR_MS
MODELS = (("openai/gpt-4o-mini", "openai"), ("anthropic/claude", "anthropic"), ("openai/gpt-4o", "azure"))


def now_ms() -> int:
    return int(time.time() * 1000)


def line(
    request_id: str,
    team_id: str,
    created_ms: int,
    *,
    key: str = "k1",
    model: int = 0,
    status: int = 200,
    latency_s: float = 0.4,
    ttft_s: float | None = 0.05,
    tokens: tuple[int, int] = (11, 40),
    cost: int = 4650,
    cache_hit: bool = False,
    guarded: bool = False,
) -> bytes:
    """A finished request's journal line, as the accountant writes it (429: refused by a rate limit, 400: by a
    guardrail policy, which `guarded` then says matched)."""
    m = RequestMeta(request_id, "chat.completions", 1000.0)
    m.team_id, m.key_id, (m.model, m.provider) = team_id, key, MODELS[model]
    m.upstream_model, m.status = m.model.rpartition("/")[2], status
    if status >= 400:
        m.error_code = {429: "rate_limited", 400: "guardrail_blocked"}.get(status, "upstream_error")
        m.error_message = "refused"
    if guarded or status == 400:
        m.guardrails = [{"policy": "pii", "stage": "request", "action": "block" if status == 400 else "redact"}]
    m.usage = Usage(input_tokens=tokens[0], output_tokens=tokens[1], total_tokens=sum(tokens))
    m.cost_nanos, m.pricing_json = (0, b"[]") if cache_hit else (cost, b"[]")
    if cache_hit:
        m.cache_status, m.saved_nanos = "hit", cost
    m.stream = ttft_s is not None
    m.t_upstream_start, m.t_first_token = 1000.001, 0.0 if ttft_s is None else 1000.0 + ttft_s
    m.t_upstream_end = m.t_end = 1000.0 + latency_s
    m.attempts = [(m.provider, status, 1000.001, m.t_end)]
    return records.line(m, created_ms)


def random_lines(rng: random.Random, teams: Sequence[str], count: int, start: int, spread_ms: int) -> list[bytes]:
    return [
        line(
            f"req_{start + i:08d}",
            team := rng.choice(teams),
            now_ms() - rng.randrange(spread_ms),
            key=f"{team}-k{rng.randrange(3)}",
            model=rng.randrange(len(MODELS)),
            status=rng.choice((200, 200, 200, 200, 429, 502, 400)),
            latency_s=rng.lognormvariate(-1.0, 1.2),
            ttft_s=rng.choice((None, rng.uniform(0.0001, 0.3))),
            tokens=(rng.randrange(5000), rng.randrange(2000)),
            cost=rng.randrange(1, 10**7),
            cache_hit=rng.random() < 0.1,
            guarded=rng.random() < 0.1,
        )
        for i in range(count)
    ]


async def fetch(store: Store, sql: str) -> list[tuple]:
    if isinstance(store, PostgresStore):
        async with store.pool.acquire() as conn:
            return [tuple(r) for r in await conn.fetch(sql)]
    async with store.db.execute(sql) as cur:  # type: ignore[attr-defined]
        return [tuple(r) for r in await cur.fetchall()]


def number(doc: object, name: str, kinds: type | tuple[type, ...]) -> float | None:
    """A member that is a number (else None: what is not a number counts as absent)."""
    value = doc.get(name) if isinstance(doc, dict) else None
    return value if isinstance(value, kinds) and not isinstance(value, bool) else None


def aggregated(generations: Sequence[tuple], minutes_from: int) -> tuple[dict, dict]:
    """The rollups of generation rows, computed the plain way: {usage key: sums}, {team key: (sums, histograms)}."""
    sums: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0])
    teams: dict[tuple, tuple[list, Counter, Counter]] = defaultdict(
        lambda: ([0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0], Counter(), Counter())
    )
    for values in generations:
        g = Generation.from_row(tuple(values))
        usage, timings = orjson.loads(bytes(g.usage)), orjson.loads(bytes(g.timings))
        latency, ttft = number(timings, "latency_ms", (int, float)), number(timings, "ttft_ms", (int, float))
        figures = (
            1,
            g.status_code >= 400 or not g.success,
            g.cache_status == "hit",
            number(usage, "prompt_tokens", int) or 0,
            number(usage, "completion_tokens", int) or 0,
            g.cost_nanos,
            g.saved_nanos,
            latency or 0.0,
            ttft or 0.0,
            ttft is not None,
        )
        for step in rollups.STEPS:
            start = g.created_at - g.created_at % step
            if step == rollups.MINUTE_MS and start < minutes_from:
                continue
            team = teams[(step, g.team_id, start)]
            for into in (sums[(step, g.team_id, start, g.key_id, g.model_id, g.provider)], team[0]):
                for i, value in enumerate(figures):
                    into[i] += value
            if latency is not None:
                team[1][rollups.bucket(latency)] += 1
            if ttft is not None:
                team[2][rollups.bucket(ttft)] += 1
    return dict(sums), dict(teams)


async def stored_rollups(store: Store) -> tuple[dict, dict]:
    sums = {
        tuple(r[:6]): list(r[6:])
        for r in await fetch(store, f"SELECT {', '.join(rollups.KEY + rollups.SUMS)} FROM usage_rollups")
    }
    columns = f"step_ms, team_id, bucket_ms, {', '.join(rollups.SUMS)}, latency_hist, ttft_hist"
    teams = {
        tuple(r[:3]): (list(r[3:-2]), *(Counter({int(k): v for k, v in orjson.loads(h).items()}) for h in r[-2:]))
        for r in await fetch(store, f"SELECT {columns} FROM team_rollups")
    }
    return sums, teams


def assert_same_sums(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key, figures in expected.items():
        assert found[key][:7] == figures[:7] and found[key][9] == figures[9], key
        assert found[key][7:9] == pytest.approx(figures[7:9], rel=1e-9), key


async def assert_rollups_are_of_generations(store: Store, minutes_from: int) -> None:
    expected_sums, expected_teams = aggregated(
        await fetch(store, f"SELECT {GENERATION_COLUMNS} FROM generations"), minutes_from
    )
    sums, teams = await stored_rollups(store)
    assert_same_sums(sums, expected_sums)
    assert_same_sums({key: team[0] for key, team in teams.items()}, {key: t[0] for key, t in expected_teams.items()})
    assert {key: team[1:] for key, team in teams.items()} == {key: t[1:] for key, t in expected_teams.items()}


# --- the histogram ------------------------------------------------------------------------------------------


def exact(values: Sequence[float], q: float) -> float:
    return sorted(values)[max(1, math.ceil(q * len(values))) - 1]


def test_buckets_cover_ten_minutes_at_12_percent():
    assert rollups.BUCKETS == 120 and rollups.BOUNDS[0] == 1.0 and rollups.BOUNDS[-1] > 600_000
    assert all(b / a == pytest.approx(1.12) for a, b in zip(rollups.BOUNDS, rollups.BOUNDS[1:], strict=False))
    assert [rollups.bucket(v) for v in (0, 0.999, 1.0, 1.119, 1.12, 1e9)] == [0, 0, 1, 1, 2, 119]
    assert [rollups.bucket(v) for v in (None, "12", True, float("nan"))] == [None] * 4


@pytest.mark.parametrize("seed", range(20))
def test_quantiles_are_within_one_bucket_of_the_exact_ones(seed: int):
    rng = random.Random(seed)
    values = [rng.lognormvariate(rng.uniform(0, 8), rng.uniform(0.1, 2)) for _ in range(rng.randrange(1, 3000))]
    counts = [0] * rollups.BUCKETS
    for v in values:
        counts[rollups.bucket(min(v, 600_000))] += 1
    for q in (0.5, 0.95, 0.99, 1.0):
        truth = min(exact(values, q), 600_000)
        assert truth / 1.12 <= rollups.quantile(counts, q) <= truth * 1.12  # type: ignore[operator]
    assert rollups.quantile([0] * rollups.BUCKETS, 0.5) is None


def test_histograms_add_sparsely():
    assert orjson.loads(rollups.hist_add('{"3": 2, "70": 1}', '{"70": 4, "119": 1}')) == {"3": 2, "70": 5, "119": 1}
    assert rollups.hist_add("{}", "{}") == "{}"


# --- kept by record ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["store", "process"])
async def test_rollups_equal_a_direct_aggregation_of_generations(url: str, via: str):
    if via == "process" and url.startswith("postgres"):
        pytest.skip("the writer process runs PostgresStore.record, already covered")
    store = await open_store(url)
    try:
        teams = [(await funded_team(store, name)).id for name in ("acme", "rival", "third")]
        rng = random.Random(7)
        lines = random_lines(rng, teams, 600, 0, 5 * 24 * HOUR_MS)
        for start in range(0, 600, 150):
            await record_lines(store, lines[start : start + 150], via)
        await assert_rollups_are_of_generations(store, rollups.minutes_from(now_ms()))
    finally:
        await store.close()


async def test_a_replayed_batch_is_counted_once(store: Store):
    team = await funded_team(store)
    lines = [line(f"r{i}", team.id, now_ms() - i * 1000, latency_s=0.1 * (i + 1)) for i in range(4)]
    assert await store.record(lines[:3]) == 3
    assert await store.record(lines[:3]) == 0
    assert await store.record(lines) == 1  # a batch that grew: only its new record counts
    assert await store.record([encode_row(generation("r9", team.id))]) == 1  # a row line without timings
    sums, teams = await stored_rollups(store)
    for step in rollups.STEPS:  # (the records may straddle two minutes, or two hours)
        assert sum(figures[0] for key, figures in sums.items() if key[0] == step) == 5
        assert sum(figures[0] for key, (figures, _, _) in teams.items() if key[0] == step) == 5
        assert sum(sum(lat.values()) for key, (_, lat, _) in teams.items() if key[0] == step) == 4
    await assert_rollups_are_of_generations(store, rollups.minutes_from(now_ms()))


async def test_gateways_recording_at_once_add_atomically(url: str):
    """Several stores (gateway instances) record overlapping batches at once: each record counts once."""
    stores = [await open_store(url) for _ in range(3)]
    try:
        teams = [(await funded_team(stores[0], name)).id for name in ("acme", "rival")]
        lines = random_lines(random.Random(3), teams, 400, 0, 2 * HOUR_MS)
        await asyncio.gather(
            *(stores[i % 3].record(lines[start : start + 120]) for i, start in enumerate(range(0, 400, 40)))
        )
        await assert_rollups_are_of_generations(stores[0], rollups.minutes_from(now_ms()))
        sums, _ = await stored_rollups(stores[0])
        assert sum(f[0] for key, f in sums.items() if key[0] == HOUR_MS) == 400
    finally:
        for store in stores:
            await store.close()


async def test_minute_rows_are_pruned_after_48_hours_and_hour_rows_kept(store: Store, monkeypatch: pytest.MonkeyPatch):
    team = await funded_team(store)
    now = now_ms()
    await store.record([line("old", team.id, now - 49 * HOUR_MS), line("recent", team.id, now - 47 * HOUR_MS)])
    sums, teams = await stored_rollups(store)
    minutes = {key[2] for key in sums if key[0] == rollups.MINUTE_MS}
    assert minutes == {(now - 47 * HOUR_MS) // 60_000 * 60_000}  # the old record has no minute row at all
    assert sum(1 for key in sums if key[0] == HOUR_MS) == 2 and len(teams) == 3
    # Two hours later (as the writer sees it), the next batch prunes the recent record's minute rows too.
    later = rollups.minutes_from
    monkeypatch.setattr(rollups, "minutes_from", lambda at_ms: later(at_ms + 2 * HOUR_MS))
    await store.record([line("new", team.id, now)])
    sums, teams = await stored_rollups(store)
    assert {key[2] for key in sums if key[0] == rollups.MINUTE_MS} == {now // 60_000 * 60_000}
    assert {key[2] for key in teams if key[0] == rollups.MINUTE_MS} == {now // 60_000 * 60_000}
    assert sum(f[0] for key, f in sums.items() if key[0] == HOUR_MS) == 3
    assert sum(figures[0] for key, (figures, _, _) in teams.items() if key[0] == HOUR_MS) == 3
    ((pruned,),) = await fetch(store, "SELECT minutes_before_ms FROM rollup_pruning")
    assert 0 <= pruned - later(now + 2 * HOUR_MS) <= rollups.PRUNE_EVERY_MS


# --- read by overview ------------------------------------------------------------------------------------------


async def test_overview_of_a_day_by_hour_from_minute_rows(store: Store):
    teams = [(await funded_team(store, name)).id for name in ("acme", "rival")]
    rng = random.Random(11)
    lines = random_lines(rng, teams, 500, 0, 23 * HOUR_MS)
    await store.record(lines)
    rows = [records.generation(x) for x in lines]
    until = now_ms() + 1
    since = until - 24 * HOUR_MS
    view = await store.overview(teams[0], since, until, HOUR_MS)
    assert view.rollup_step_ms == rollups.MINUTE_MS and view.step_ms == HOUR_MS
    assert [p.start_ms for p in view.series] == list(range(since - since % HOUR_MS, until, HOUR_MS))
    mine = [g for g in rows if g.team_id == teams[0]]
    assert_figures(view.totals, mine)
    for point in view.series:
        assert_figures(point, [g for g in mine if point.start_ms <= g.created_at < point.start_ms + HOUR_MS])
    by_model = Counter()
    for g in mine:
        by_model[g.model_id] += g.cost_nanos
    assert [(s.name, s.cost_nanos) for s in view.top_models] == sorted(by_model.items(), key=lambda x: -x[1])
    assert {s.name for s in view.top_keys} <= {f"{teams[0]}-k{i}" for i in range(3)}
    assert sum(s.requests for s in view.top_providers) == len(mine)


def assert_figures(figures, rows: Sequence[Generation]) -> None:
    """An overview's figures against the records they sum (percentiles within one bucket of the exact ones)."""
    assert figures.requests == len(rows)
    assert figures.errors == sum(1 for g in rows if g.status_code >= 400 or not g.success)
    assert figures.cost_nanos == sum(g.cost_nanos for g in rows)
    assert figures.saved_nanos == sum(g.saved_nanos for g in rows)
    assert figures.cache_hits == sum(1 for g in rows if g.cache_status == "hit")
    assert figures.rate_limited == sum(1 for g in rows if g.error_code == "rate_limited")
    assert figures.blocked == sum(1 for g in rows if g.error_code == "guardrail_blocked")
    assert figures.guarded == sum(1 for g in rows if g.guardrails) >= figures.blocked
    assert figures.input_tokens == sum(orjson.loads(bytes(g.usage))["prompt_tokens"] for g in rows)
    assert figures.output_tokens == sum(orjson.loads(bytes(g.usage))["completion_tokens"] for g in rows)
    latencies = [orjson.loads(bytes(g.timings))["latency_ms"] for g in rows]
    ttfts = [t for g in rows if (t := orjson.loads(bytes(g.timings))["ttft_ms"]) is not None]
    for values, p50, p95 in (
        (latencies, figures.latency_p50_ms, figures.latency_p95_ms),
        (ttfts, figures.ttft_p50_ms, figures.ttft_p95_ms),
    ):
        if not values:
            assert p50 is None and p95 is None
            continue
        for q, found in ((0.5, p50), (0.95, p95)):
            truth = exact(values, q)
            assert (truth / 1.12 if truth >= 1 else 0.0) <= found <= max(truth * 1.12, 1.0)


async def test_a_teams_overview_never_includes_another_team(store: Store):
    acme, rival = (await funded_team(store, "acme")).id, (await funded_team(store, "rival")).id
    now = now_ms()
    await store.record(
        [line("a1", acme, now - 1000, key="ka", latency_s=0.01, cost=5)]
        + [line(f"b{i}", rival, now - 2000, key="kb", model=1, latency_s=9.0, cost=1000) for i in range(5)]
    )
    for since, step in ((now - HOUR_MS, 60_000), (now - 7 * 24 * HOUR_MS, 24 * HOUR_MS)):
        mine = await store.overview(acme, since, now + 1, step)
        assert (mine.totals.requests, mine.totals.cost_nanos) == (1, 5)
        assert mine.totals.latency_p95_ms is not None and mine.totals.latency_p95_ms < 12
        assert [s.name for s in mine.top_keys] == ["ka"] and [s.name for s in mine.top_models] == [MODELS[0][0]]
        every = await store.overview(None, since, now + 1, step)
        assert (every.totals.requests, every.totals.cost_nanos) == (6, 5005)
        assert [s.name for s in every.top_keys] == ["kb", "ka"]
        assert every.totals.latency_p50_ms is not None and every.totals.latency_p50_ms > 8000
    nobody = await store.overview("team_nobody", now - HOUR_MS, now + 1, 60_000)
    assert nobody.totals.requests == 0 and nobody.top_keys == [] and nobody.totals.latency_p50_ms is None


async def test_overview_picks_hours_beyond_a_day_and_checks_its_step(store: Store):
    team = (await funded_team(store)).id
    now = now_ms()
    await store.record([line("old", team, now - 3 * 24 * HOUR_MS), line("new", team, now - 1000)])
    week = await store.overview(team, now - 7 * 24 * HOUR_MS, now + 1, 6 * HOUR_MS)
    assert week.rollup_step_ms == HOUR_MS and week.totals.requests == 2 and len(week.series) in (28, 29)
    assert sum(p.requests for p in week.series) == 2
    day = await store.overview(team, now - 24 * HOUR_MS, now, 60_000)
    assert day.rollup_step_ms == rollups.MINUTE_MS and day.totals.requests == 1
    old_day = await store.overview(team, now - 84 * HOUR_MS, now - 60 * HOUR_MS, HOUR_MS)  # a day, 3 days ago
    assert old_day.rollup_step_ms == HOUR_MS and old_day.totals.requests == 1  # its minute rows are gone
    with pytest.raises(ValueError, match=r"step_ms \(90000\) must be a positive multiple"):
        await store.overview(team, now - HOUR_MS, now, 90_000)
    with pytest.raises(ValueError, match=r"step_ms \(60000\) must be a positive multiple of the rollup step"):
        await store.overview(team, now - 7 * 24 * HOUR_MS, now, 60_000)
    with pytest.raises(ValueError, match="until_ms"):
        await store.overview(team, now, now, 60_000)


# --- migrations 8 and 10 ----------------------------------------------------------------------------------------


async def test_migrations_8_and_10_backfill_the_rollups(url: str, monkeypatch: pytest.MonkeyPatch):
    """Records written by a gateway of schema 7 (rows, odd ones included) are in the rollups once migrated: their
    sums by migration 8, their refusals and guardrail matches by migration 10."""
    with monkeypatch.context() as m:
        m.setattr(migrations, "SQLITE", migrations.SQLITE[:7])
        m.setattr(migrations, "POSTGRES", migrations.POSTGRES[:7])
        store = await open_store(url)
    try:
        assert await store.schema_version() == 7
        teams = [(await funded_team(store, name)).id for name in ("acme", "rival")]
        rows = [records.rows([x])[0] for x in random_lines(random.Random(5), teams, 300, 0, 6 * 24 * HOUR_MS)]
        rows.append(generation("odd_timings", teams[0]))  # timings without latency_ms
        odd = list(generation("odd_usage", teams[1], usage=b'{"prompt_tokens": "many", "completion_tokens": 5}'))
        odd[Generation.__struct_fields__.index("timings")] = '{"latency_ms": "slow", "ttft_ms": 12}'
        rows.append(tuple(odd))
        marks = ", ".join(f"${i + 1}" for i in range(len(rows[0])))
        if isinstance(store, PostgresStore):
            async with store.pool.acquire() as conn:
                await conn.executemany(f"INSERT INTO generations ({GENERATION_COLUMNS}) VALUES ({marks})", rows)
        else:
            await store.db.executemany(  # type: ignore[attr-defined]
                f"INSERT INTO generations ({GENERATION_COLUMNS}) VALUES ({', '.join('?' * len(rows[0]))})", rows
            )
    finally:
        await store.close()
    store = await open_store(url)
    try:
        assert await store.schema_version() == len(migrations.SQLITE)  # 8 and the later ones
        ((minutes_from,),) = await fetch(store, "SELECT minutes_before_ms FROM rollup_pruning")
        assert 0 <= rollups.minutes_from(now_ms()) - minutes_from <= rollups.PRUNE_EVERY_MS
        await assert_rollups_are_of_generations(store, minutes_from)
        sums, team_rows = await stored_rollups(store)
        assert sum(f[0] for key, f in sums.items() if key[0] == HOUR_MS) == 302
        assert sum(sum(lat.values()) for key, (_, lat, _) in team_rows.items() if key[0] == HOUR_MS) == 300
        await store.record([line("after", teams[0], now_ms())])  # and the writer goes on from there
        assert (await store.overview(teams[0], now_ms() - HOUR_MS, now_ms() + 1, 60_000)).totals.requests >= 1
    finally:
        await store.close()


async def test_target_usage_sums_minute_rows_per_model_and_provider(store: Store):
    teams = [(await funded_team(store, name)).id for name in ("acme", "rival")]
    lines = random_lines(random.Random(5), teams, 300, 0, 2 * HOUR_MS)
    await store.record(lines)
    rows = [records.generation(x) for x in lines]
    since = now_ms() - HOUR_MS
    for team in (teams[0], None):
        expected: dict[tuple[str, str], list] = {}
        for g in rows:
            if g.created_at >= since // 60_000 * 60_000 and team in (None, g.team_id):
                figures = expected.setdefault((g.model_id, g.provider), [0, 0, 0.0])
                figures[0] += 1
                figures[1] += g.status_code >= 400 or not g.success
                figures[2] += orjson.loads(bytes(g.timings))["latency_ms"]
        got = {(u.model_id, u.provider): u for u in await store.target_usage(team, since)}
        assert got.keys() == expected.keys() and len(got) == len(MODELS)
        for target, (requests, errors, latency) in expected.items():
            assert (got[target].requests, got[target].errors) == (requests, errors)
            assert got[target].latency_ms_sum == pytest.approx(latency)
