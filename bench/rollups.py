"""The usage rollups (`proxy.rollups`): what they cost the accounting writer, and how fast an overview reads them.

`python -m bench.rollups` builds a store with ROWS generation records over the last 30 days (4 teams, 20 keys, 8
models on 5 providers; 4% errors, 6% cache hits, 60% streamed; lognormal latencies, TTFTs and tokens), written
through the writer's own path (`sqlite_usage.record`, or `PostgresStore.record` with `--postgres`) in batches, so
the rollups are kept as in production (PostgreSQL is then vacuumed and analyzed, as autovacuum would have done);
then times `Store.overview` over the last hour, day, week and 30 days, for every team and for one, and prints a
table.

`python -m bench.rollups --writer` measures what the rollups add to the writer: `sqlite_usage.record` on 300-line
batches of journal lines (`proxy.records.line`), with the rollups on and off (`roll_up` replaced by a no-op), in
alternating rounds, in CPU microseconds per record, for two mixes of records: few groups a batch (1 team, 4 keys,
2 models) and many (3 teams, 21 keys, 8 models).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from proxy import records, rollups
from proxy.meta import RequestMeta, Usage
from proxy.store import Store, open_store, sqlite_usage
from proxy.store.postgres import PostgresStore

DAY_MS = 24 * rollups.HOUR_MS
MODELS = (
    ("openai/gpt-4o-mini", "openai", 150),
    ("openai/gpt-4o", "openai", 2500),
    ("openai/gpt-4o", "azure", 2500),
    ("anthropic/claude-sonnet-4", "anthropic", 3000),
    ("anthropic/claude-haiku-4", "anthropic", 800),
    ("anthropic/claude-sonnet-4", "bedrock", 3000),
    ("google/gemini-2.5-flash", "google", 300),
    ("mistral/mistral-large", "mistral", 2000),
)  # (model, provider, nanos per input token; output costs 4 times as much)
RANGES = (  # (name, length, series step)
    ("1 h", rollups.HOUR_MS, 60_000),
    ("24 h", DAY_MS, 900_000),
    ("7 d", 7 * DAY_MS, rollups.HOUR_MS),
    ("30 d", 30 * DAY_MS, 6 * rollups.HOUR_MS),
)


def request(rng: random.Random, request_id: str, team_id: str, key_id: str, model: int) -> RequestMeta:
    """A finished request, as the accountant hands it over: figures drawn from realistic distributions."""
    name, provider, price = MODELS[model]
    meta = RequestMeta(request_id, "chat.completions", 1000.0)
    meta.team_id, meta.key_id, meta.model, meta.provider = team_id, key_id, name, provider
    meta.upstream_model, meta.native_id = name.rpartition("/")[2], "chatcmpl-" + request_id[-8:]
    meta.stream = rng.random() < 0.6
    roll = rng.random()
    meta.status = 200 if roll > 0.04 else 429 if roll > 0.02 else 502 if roll > 0.01 else 500
    if meta.status != 200:
        meta.error_code, meta.error_message = "upstream_error", "the provider failed"
    prompt, output = int(rng.lognormvariate(6.2, 1.0)), int(rng.lognormvariate(5.0, 1.0))
    meta.usage = Usage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output)
    meta.cost_nanos, meta.pricing_json = price * (prompt + 4 * output), b'[{"meter":"input_tokens","amount_nanos":1}]'
    if meta.status == 200 and rng.random() < 0.06:
        meta.cache_status, meta.saved_nanos, meta.cost_nanos = "hit", meta.cost_nanos, 0
    latency = rng.lognormvariate(-0.3, 0.9) if meta.status == 200 else rng.lognormvariate(-2.0, 1.0)
    meta.t_upstream_start, meta.t_upstream_end, meta.t_end = 1000.002, 1000.0 + latency - 0.001, 1000.0 + latency
    if meta.stream and meta.status == 200:
        meta.t_first_token = 1000.002 + min(rng.lognormvariate(-1.3, 0.7), latency * 0.9)
    meta.attempts = [(provider, meta.status, 1000.002, meta.t_upstream_end)]
    return meta


# --- the writer's cost ----------------------------------------------------------------------------------------


def _writer_lines(rng: random.Random, teams: Sequence[str], keys: int, models: int, start: int) -> list[bytes]:
    now_ms = int(time.time() * 1000)
    lines = []
    for i in range(300):
        team = rng.randrange(len(teams))
        meta = request(
            rng, f"req_{start + i:024x}", teams[team], f"key_{team}_{rng.randrange(keys)}", rng.randrange(models)
        )
        lines.append(records.line(meta, now_ms))
    return lines


async def _teams(url: str, count: int) -> list[str]:
    store = await open_store(url)
    try:
        return [(await store.ensure_team(f"team-{i}")).id for i in range(count)]
    finally:
        await store.close()


def writer(rounds: int) -> None:
    print(f"sqlite_usage.record, 300-line batches, CPU µs per record (best of {rounds} rounds of 10 batches each way)")
    print(f"{'records':<32}{'no rollups':>11}{'rollups':>9}{'added':>7}{'aggregate':>11}{'upserts/batch':>15}")
    for teams, keys, models in ((1, 4, 2), (3, 7, 8)):
        with tempfile.TemporaryDirectory(prefix="bench-rollups-") as folder:
            _writer_row(rounds, f"sqlite:///{folder}/gateway.db", teams, keys, models)


def _writer_row(rounds: int, url: str, teams: int, keys: int, models: int) -> None:
    """One row of the table: one mix of records, in a new store at `url`."""
    team_ids = asyncio.run(_teams(url, teams))
    db = sqlite_usage.connect(sqlite_usage.sqlite_path(url))
    rng = random.Random(1)
    serial = iter(range(0, 10**9, 300))
    warm, *batches = [
        [_writer_lines(rng, team_ids, keys, models, next(serial)) for _ in range(10)] for _ in range(2 * rounds + 1)
    ]
    for lines in warm:
        sqlite_usage.record(db, lines, int(time.time()))
    best = {True: float("inf"), False: float("inf")}
    rolled = sqlite_usage.roll_up
    for i, round_ in enumerate(batches):
        on = i % 2 == 1
        sqlite_usage.roll_up = rolled if on else lambda *args: None  # type: ignore[assignment]
        try:
            start = time.process_time()
            for lines in round_:
                sqlite_usage.record(db, lines, int(time.time()))
            best[on] = min(best[on], (time.process_time() - start) / (len(round_) * 300) * 1e6)
        finally:
            sqlite_usage.roll_up = rolled
    db.close()
    rows = [records.rows(lines) for lines in warm]
    minutes_from = rollups.minutes_from(int(time.time() * 1000))
    aggregate = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        made = [rollups.aggregate(batch, minutes_from) for batch in rows]
        aggregate = min(aggregate, (time.process_time() - start) / (len(rows) * 300) * 1e6)
    upserts = sum(len(sums) + len(hists) for sums, hists in made) / len(made)
    label = f"{teams} team(s), {teams * keys} keys, {models} models"
    print(
        f"{label:<32}{best[False]:>11.2f}{best[True]:>9.2f}{best[True] - best[False]:>7.2f}{aggregate:>11.2f}"
        f"{upserts:>15.0f}"
    )


# --- the overview's speed ------------------------------------------------------------------------------------


async def build(store: Store, rows: int, batch: int) -> list[str]:
    """ROWS records over the last 30 days, recorded in batches of `batch` journal lines, oldest first."""
    team_ids = [(await store.ensure_team(f"team-{i}")).id for i in range(4)]
    keys = [(team_ids[i % 4], f"key_{i:02d}") for i in range(20)]  # 5 keys a team
    key_weights = [1.0 / (1 + i) for i in range(20)]
    model_weights = [8, 5, 2, 6, 4, 1, 3, 1]
    rng = random.Random(42)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - 30 * DAY_MS
    spacing = 30 * DAY_MS / rows
    began, lines = time.perf_counter(), []
    for i in range(rows):
        team_id, key_id = rng.choices(keys, key_weights)[0]
        model = rng.choices(range(len(MODELS)), model_weights)[0]
        created = int(start_ms + i * spacing + rng.random() * spacing)
        lines.append(orjson.dumps(records.row(request(rng, f"req_{i:012d}", team_id, key_id, model), created)))
        if len(lines) == batch or i == rows - 1:
            await store.record(lines)
            lines = []
            if (i + 1) % (rows // 10) == 0:
                print(f"  {i + 1:>9,} records, {time.perf_counter() - began:5.0f} s", flush=True)
    return team_ids


async def time_overviews(store: Store, team_id: str, repeat: int) -> list[tuple[str, str, float, float, int, int]]:
    results = []
    for name, length, step in RANGES:
        for scope in (None, team_id):
            until = int(time.time() * 1000)
            times = []
            for _ in range(repeat):
                began = time.perf_counter()
                view = await store.overview(scope, until - length, until, step)
                times.append((time.perf_counter() - began) * 1000)
            who = "every team" if scope is None else "one team"
            results.append((name, who, times[0], statistics.median(times), view.totals.requests, len(view.series)))
    return results


async def overviews(rows: int, batch: int, repeat: int, postgres: bool, keep: str | None) -> None:
    server, scratch = None, None
    if postgres:
        from bench.pg_server import PgServer, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
        server = PgServer(bin_dir)
        server.start()
        url = server.create_database()
    else:
        if keep is None:
            scratch = tempfile.TemporaryDirectory(prefix="bench-rollups-")
        url = f"sqlite:///{keep or scratch.name}/gateway.db"  # type: ignore[union-attr]
    try:
        store = await open_store(url)
        try:
            began = time.perf_counter()
            print(f"building {rows:,} records over 30 days in {store.backend} ({url if not postgres else 'bench'})")
            team_ids = await build(store, rows, batch)
            if isinstance(store, PostgresStore):  # as autovacuum leaves a database that grew over 30 days
                async with store.pool.acquire() as conn:
                    await conn.execute("VACUUM ANALYZE")
            print(f"  built in {time.perf_counter() - began:.0f} s{_sizes(store, url)}")
            results = await time_overviews(store, team_ids[0], repeat)
        finally:
            await store.close()
    finally:
        if server is not None:
            server.destroy()
        if scratch is not None:
            scratch.cleanup()
    print(f"\nStore.overview on {rows:,} records ({store.backend}), ms: the first call and the median of {repeat}")
    print(f"{'range':<6}{'teams':<12}{'first':>8}{'median':>8}{'requests':>10}{'points':>8}")
    for name, who, first, median, requests, points in results:
        print(f"{name:<6}{who:<12}{first:>8.1f}{median:>8.1f}{requests:>10,}{points:>8}")


def _sizes(store: Store, url: str) -> str:
    if store.backend != "sqlite":
        return ""
    import sqlite3

    path = sqlite_usage.sqlite_path(url)
    db = sqlite3.connect(path)
    try:
        counts = {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("generations", "usage_rollups", "team_rollups")
        }
        minutes = db.execute("SELECT COUNT(*) FROM usage_rollups WHERE step_ms = 60000").fetchone()[0]
    finally:
        db.close()
    size = os.path.getsize(path) + (os.path.getsize(path + "-wal") if Path(path + "-wal").exists() else 0)
    return (
        f"; {size / 1e6:.0f} MB; {counts['usage_rollups']:,} usage rollup rows ({minutes:,} of minutes), "
        f"{counts['team_rollups']:,} team rollup rows"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rollups", description=__doc__.splitlines()[0])
    parser.add_argument("--writer", action="store_true", help="measure the writer's cost per record instead")
    parser.add_argument("--rounds", type=int, default=15, help="writer: rounds with and without rollups each")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2000, help="journal lines per Store.record call")
    parser.add_argument("--repeat", type=int, default=7, help="calls of each overview")
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL (bench/pg_server.py)")
    parser.add_argument("--keep", metavar="FOLDER", help="SQLite: build the store in FOLDER (kept)")
    args = parser.parse_args(argv)
    if args.writer:
        writer(args.rounds)
    else:
        asyncio.run(overviews(args.rows, args.batch, args.repeat, args.postgres, args.keep))


if __name__ == "__main__":
    main()
