"""The store interface: keys (hashed), teams and wallets. Backends implement `Store`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

import msgspec

ACTIVE = "active"
DISABLED = "disabled"
REVOKED = "revoked"
KEY_STATUSES = (ACTIVE, DISABLED, REVOKED)

SCOPE_INFERENCE = "inference"
SCOPE_MANAGEMENT = "management"


class KeyRecord(msgspec.Struct, frozen=True):
    """An API key as stored: never its secret, only the secret's hash."""

    kid: str
    team_id: str
    team_name: str
    secret_hash: bytes
    scopes: tuple[str, ...]
    status: str
    name: str
    created_at: int
    allowed_models: tuple[str, ...] = ()  # empty: every model
    daily_limit_cost_nanos: int | None = None
    monthly_limit_cost_nanos: int | None = None
    # Rate limits of this key (None: the config's `rate_limits.key`; 0: none for this key).
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    concurrency_limit: int | None = None
    guardrails: tuple[str, ...] = ()  # names of `guardrails.policies` applied to its requests (and the config's)
    cache: bool | None = None  # the response cache for its requests: on, off, or (None) the config's for its team

    @property
    def rate_limited(self) -> bool:
        """The key has rate limits of its own."""
        return self.rpm_limit is not None or self.tpm_limit is not None or self.concurrency_limit is not None

    @property
    def limited(self) -> bool:
        return self.daily_limit_cost_nanos is not None or self.monthly_limit_cost_nanos is not None

    @property
    def management(self) -> bool:
        return SCOPE_MANAGEMENT in self.scopes


# The columns `key_from_row` reads, from `api_keys k JOIN teams t`.
KEY_COLUMNS = """
    k.kid, k.team_id, t.name, k.secret_hash, k.scopes, k.status, k.name, k.created_at,
    k.allowed_models, k.daily_limit_cost_nanos, k.monthly_limit_cost_nanos, k.rpm_limit, k.tpm_limit,
    k.concurrency_limit, k.guardrails, k.cache
"""


def key_from_row(row: Sequence) -> KeyRecord:
    """A KeyRecord from a row of `KEY_COLUMNS` (either backend's row type)."""
    kid, team_id, team_name, secret_hash, scopes, status, name, created_at, *limits = row
    models, daily, monthly, rpm, tpm, concurrency, guardrails, cache = limits
    return KeyRecord(
        kid=kid,
        team_id=team_id,
        team_name=team_name,
        secret_hash=bytes(secret_hash),
        scopes=tuple(s for s in scopes.split(",") if s),
        status=status,
        name=name,
        created_at=created_at,
        allowed_models=tuple(m for m in models.split(",") if m),
        daily_limit_cost_nanos=daily,
        monthly_limit_cost_nanos=monthly,
        rpm_limit=rpm,
        tpm_limit=tpm,
        concurrency_limit=concurrency,
        guardrails=tuple(g for g in guardrails.split(",") if g),
        cache=None if cache is None else bool(cache),  # SQLite's 0/1, PostgreSQL's boolean
    )


class Team(msgspec.Struct, frozen=True):
    id: str
    name: str
    balance_nanos: int
    created_at: int


class Generation(msgspec.Struct, frozen=True):
    """One request's record: who, what, outcome, usage, cost and timings (JSON members kept as JSON)."""

    request_id: str
    created_at: int  # unix milliseconds
    team_id: str
    key_id: str
    endpoint: str
    model_id: str
    provider: str
    upstream_model: str
    native_response_id: str
    stream: bool
    status_code: int
    success: bool
    error_code: str
    error_message: str
    usage: msgspec.Raw
    usage_source: str  # reported | estimated | none
    cost_nanos: int
    currency: str
    pricing_lines: msgspec.Raw
    timings: msgspec.Raw
    # What the request's guardrail policies did: a JSON list of {policy, stage, action, kinds}, "" when none.
    # Text, not Raw: "" is not JSON (and the column is TEXT on both backends).
    guardrails: str = ""
    cache_status: str = ""  # what the response cache did: '' (not involved), hit, miss or bypass
    saved_nanos: int = 0  # on a hit, what the answer would have cost (its `cost_nanos` is then 0 or a fraction)

    @classmethod
    def from_row(cls, values: tuple) -> Generation:
        """A row in GENERATION_COLUMNS order (JSON columns as text) as a Generation."""
        fields = dict(zip(cls.__struct_fields__, values, strict=True))
        for name in _JSON_FIELDS:
            fields[name] = msgspec.Raw(fields[name].encode())
        fields["stream"], fields["success"] = bool(fields["stream"]), bool(fields["success"])
        return cls(**fields)

    def row(self) -> tuple:
        return tuple(
            bytes(v).decode() if isinstance(v, msgspec.Raw) else v
            for v in (getattr(self, name) for name in self.__struct_fields__)
        )


_JSON_FIELDS = ("usage", "pricing_lines", "timings")
GENERATION_COLUMNS = ", ".join(Generation.__struct_fields__)
ROW_TEAM = Generation.__struct_fields__.index("team_id")
ROW_KEY = Generation.__struct_fields__.index("key_id")
ROW_COST = Generation.__struct_fields__.index("cost_nanos")


class Job(msgspec.Struct, frozen=True):
    """An asynchronous job (video, music, file, batch) as the gateway knows it: its own id, shown to the
    client, the owning team, and the provider's id for it. `data` is the provider's last answer about it,
    with the gateway's id in place of the provider's."""

    id: str
    kind: str  # video | music | file | batch
    team_id: str
    key_id: str
    model_id: str
    provider: str
    upstream_id: str
    status: str
    created_at: int  # unix seconds
    updated_at: int
    billed: bool  # its cost is recorded (set once, by `mark_job_billed`)
    data: msgspec.Raw

    @classmethod
    def from_row(cls, values: Sequence) -> Job:
        """A row in JOB_COLUMNS order (data as JSON text)."""
        *head, billed, data = values
        return cls(*head, bool(billed), msgspec.Raw(data.encode() if isinstance(data, str) else bytes(data)))

    def row(self) -> tuple:
        return (*(getattr(self, name) for name in self.__struct_fields__[:-1]), bytes(self.data).decode())


JOB_COLUMNS = ", ".join(Job.__struct_fields__)


class TopUp(msgspec.Struct, frozen=True):
    amount_nanos: int
    note: str
    created_at: int  # unix seconds


class Credits(msgspec.Struct, frozen=True):
    balance_nanos: int
    top_ups: list[TopUp]
    spend_24h_nanos: int
    spend_30d_nanos: int


class UsageFigures(msgspec.Struct, frozen=True):
    """What a team (or every team) did over a time bucket or a range, from the usage rollups (`proxy.rollups`).
    Percentiles are None when nothing was timed; they are within one histogram bucket (12%) of the exact ones."""

    requests: int
    errors: int  # status 400 or more, or not a success
    cost_nanos: int
    input_tokens: int
    output_tokens: int
    cache_hits: int
    saved_nanos: int  # what the cache hits would have cost
    rate_limited: int  # refused by a rate limit
    guarded: int  # a guardrail policy matched
    blocked: int  # refused by a guardrail policy
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None


class UsagePoint(UsageFigures, frozen=True):
    start_ms: int  # the bucket's start (unix milliseconds, UTC; a multiple of the overview's step)


class Spend(msgspec.Struct, frozen=True):
    """A model, provider or key among the top spenders of a range."""

    name: str  # the model id, provider name or key id
    requests: int
    cost_nanos: int


class Overview(msgspec.Struct, frozen=True):
    """`Store.overview`: a range's series (every step, empty buckets included), totals and top spenders."""

    since_ms: int
    until_ms: int
    step_ms: int
    rollup_step_ms: int  # the rollups read: 60,000 (minutes) or 3,600,000 (hours)
    series: list[UsagePoint]
    totals: UsageFigures
    top_models: list[Spend]
    top_providers: list[Spend]
    top_keys: list[Spend]


class TargetUsage(msgspec.Struct, frozen=True):
    """`Store.target_usage`: what one model's requests served by one provider did over a recent range."""

    model_id: str
    provider: str
    requests: int
    errors: int  # status 400 or more, or not a success
    latency_ms_sum: float


class DashboardSession(msgspec.Struct, frozen=True):
    """A dashboard sign-in (`proxy.dashboard`): kept by its token's hash, never the token."""

    token_hash: bytes
    role: str  # "team" or "operator"
    team_id: str  # the team's ("" for the operator)
    key_id: str  # the management key it signed in with, or the operator token's id ("env:…": GATEWAY_ADMIN_TOKEN)
    csrf: str  # the token every form of the session carries
    created_at: int  # unix milliseconds
    expires_at: int


class AdminToken(msgspec.Struct, frozen=True):
    id: str
    name: str
    created_at: int  # unix milliseconds


class Store(Protocol):
    """What the gateway needs from its database. Methods raise `StoreError` on failure."""

    url: str
    backend: str  # "sqlite" | "postgres"

    async def open(self) -> None:
        """Connect, and migrate the schema to the newest version."""
        ...

    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def schema_version(self) -> int: ...
    async def get_key(self, kid: str) -> KeyRecord | None: ...
    async def get_balance(self, team_id: str) -> int | None: ...
    async def ensure_team(self, name: str) -> Team: ...
    async def get_team(self, name: str) -> Team | None: ...
    async def create_key(
        self, *, team_id: str, kid: str, secret_hash: bytes, name: str, scopes: tuple[str, ...]
    ) -> KeyRecord: ...
    async def list_keys(self, team_id: str | None = None) -> list[KeyRecord]: ...
    async def set_key_status(self, kid: str, status: str) -> bool: ...
    async def add_credit(self, team_id: str, amount_nanos: int, note: str = "") -> int: ...
    async def record(self, lines: Sequence[bytes]) -> int:
        """Insert the generation records of journal lines (`proxy.records`: a snapshot of the request or a row
        in GENERATION_COLUMNS order) and debit each team by their cost, in one transaction, each record once: a
        request id stored already is skipped. Returns how many records were new."""
        ...

    async def sync(self) -> None:
        """Make every committed write survive a power loss (not only a crash of this process)."""
        ...

    async def get_generation(self, team_id: str, request_id: str) -> Generation | None:
        """The team's record with that request id; else the one whose provider response id it is (a job's
        provider id names its create record and, once billed, its billed one: the billed one wins)."""
        ...

    async def credits(self, team_id: str, top_ups: int = 20) -> Credits: ...
    async def rename_key(self, kid: str, name: str) -> bool: ...
    async def set_key_limits(
        self, kid: str, *, allowed_models: tuple[str, ...], daily_nanos: int | None, monthly_nanos: int | None
    ) -> bool: ...
    async def set_key_rate_limits(
        self, kid: str, *, rpm: int | None, tpm: int | None, concurrency: int | None
    ) -> bool: ...
    async def set_key_guardrails(self, kid: str, *, guardrails: tuple[str, ...]) -> bool:
        """The key's own guardrail policies (names of `guardrails.policies`; empty: none of its own)."""
        ...

    async def set_key_cache(self, kid: str, *, cache: bool | None) -> bool:
        """Whether the response cache serves the key's requests (None: the config's default for its team)."""
        ...

    async def key_spend(self, team_id: str, kid: str, since_ms: int) -> int:
        """What the team's key spent from `since_ms` on (the start of a UTC hour: a day's, a month's), from the
        hour rollups, which count every record in the transaction that stores it."""
        ...

    async def activity(
        self, team_id: str, *, since_ms: int, until_ms: int, model: str, key_id: str, limit: int, offset: int
    ) -> tuple[int, list[tuple]]:
        """(total rows, the page): per UTC day, model, provider and endpoint, newest day first. A row is (day,
        model, provider, endpoint, cost nanos, requests, prompt, completion and reasoning tokens, cache hits,
        saved nanos); a token sum is None when no record of the row reported it."""
        ...

    async def overview(self, team_id: str | None, since_ms: int, until_ms: int, step_ms: int) -> Overview:
        """The team's usage (every team's for None) over [since_ms, until_ms), from the rollups, never from
        `generations`: a series every step_ms (buckets aligned to multiples of it, UTC), the totals, and the top
        models, providers and keys by spend. Minute rollups answer ranges of a day or less (within the 48 hours they
        are kept), hour rollups the others; the range is widened to whole rollup buckets, and step_ms must be a
        multiple of the rollup step (ValueError otherwise)."""
        ...

    async def target_usage(self, team_id: str | None, since_ms: int) -> list[TargetUsage]:
        """Requests, errors and summed latency per (model, provider) from `since_ms` (floored to its minute, at most
        48 hours ago) on, from the minute rollups: the team's, or every team's for None."""
        ...

    async def recent_generations(
        self,
        team_id: str,
        *,
        limit: int,
        before_ms: int | None = None,
        since_ms: int | None = None,
        model: str = "",
        key_id: str = "",
        failed: bool | None = None,
    ) -> list[Generation]:
        """The team's latest records, newest first (older than `before_ms`, and from `since_ms` on, when given): of
        one model, one key, and only failures (True) or successes (False) when asked."""
        ...

    async def list_teams(self) -> list[Team]: ...
    async def create_session(self, session: DashboardSession) -> None:
        """Keep a new dashboard session (and forget those that expired)."""
        ...

    async def get_session(self, token_hash: bytes, now_ms: int) -> DashboardSession | None:
        """The session of that token hash, unless it expired."""
        ...

    async def delete_session(self, token_hash: bytes) -> None: ...
    async def create_admin_token(self, token_id: str, secret_hash: bytes, name: str) -> None: ...
    async def admin_token(self, secret_hash: bytes) -> str | None:
        """The id of the operator token with that hash; None when there is none."""
        ...

    async def admin_token_live(self, token_id: str) -> bool: ...
    async def list_admin_tokens(self) -> list[AdminToken]: ...
    async def revoke_admin_token(self, token_id: str) -> bool:
        """Delete an operator token and end its sessions; False when there was none."""
        ...

    async def create_job(self, job: Job) -> None: ...
    async def get_job(self, team_id: str, job_id: str) -> Job | None:
        """The team's job with that id; None when absent or another team's (never tell them apart)."""
        ...

    async def list_jobs(self, team_id: str, kind: str, *, limit: int, after: str = "") -> list[Job]:
        """The team's jobs of one kind, newest first; `after`: a job id, to continue after it."""
        ...

    async def update_job(self, job_id: str, *, status: str, data: bytes) -> bool: ...
    async def mark_job_billed(self, job_id: str) -> bool:
        """Whether this call marked the job billed (False if it already was: bill it exactly once)."""
        ...

    async def delete_job(self, team_id: str, job_id: str) -> bool: ...


class StoreError(Exception):
    """The store could not do what was asked (unreachable, locked, corrupt)."""


def url_secrets(url: str) -> list[str]:
    """The passwords a store URL holds (in its user info, or as libpq's `?password=`), as written and
    decoded, longest first: what a message must never show."""
    try:
        parts = urlsplit(url)
        found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    except ValueError:
        return []
    found += [unquote(s) for s in found] + [quote(s, safe="") for s in found]
    return sorted(set(found) - {""}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`: for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: show its scheme only
        return url.partition("://")[0] + "://…"
    if password:  # edited in place: urlunsplit would rewrite `sqlite:///path` as `sqlite:/path`
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{userinfo.partition(':')[0]}:***@{hostinfo}", 1)
    head, mark, query = url.partition("?")
    return head + mark + re.sub(r"(?<![^&])password=[^&#]*", "password=***", query)


def spend_query(mark: Callable[[int], str]) -> str:
    """A team's spend from a time on, exactly and cheaply: its records from then up to the next whole rollup
    bucket (at most a bucket of them), then the team's rollups from that bucket on. Arguments: (team id, since,
    the next whole bucket's start, the rollup step: minutes up to 48 hours back, hours past that)."""
    return (
        "SELECT (SELECT COALESCE(SUM(cost_nanos), 0) FROM generations "
        f"WHERE team_id = {mark(1)} AND created_at >= {mark(2)} AND created_at < {mark(3)}) + "
        "(SELECT COALESCE(SUM(cost_nanos), 0) FROM team_rollups "
        f"WHERE step_ms = {mark(4)} AND team_id = {mark(1)} AND bucket_ms >= {mark(3)})"
    )


def spend_args(team_id: str, now_ms: int) -> list[tuple[str, int, int, int]]:
    """`spend_query`'s arguments for a team's last 24 hours (from minute rollups) and 30 days (hour rollups)."""
    windows = ((now_ms - 86_400_000, 60_000), (now_ms - 30 * 86_400_000, 3_600_000))
    return [(team_id, since, -(-since // step) * step, step) for since, step in windows]


def recent_query(
    team_id: str,
    limit: int,
    before_ms: int | None,
    since_ms: int | None,
    model: str,
    key_id: str,
    failed: bool | None,
    mark: Callable[[int], str],
) -> tuple[str, list]:
    """`Store.recent_generations`' SQL and arguments (`mark(i)` writes the i-th parameter: `?` or `$i`); it walks
    the index on (team_id, created_at)."""
    args: list = [team_id]
    conditions = [f"team_id = {mark(1)}"]
    for column, value in (
        ("created_at <", before_ms),
        ("created_at >=", since_ms),
        ("model_id =", model or None),
        ("key_id =", key_id or None),
    ):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} {mark(len(args))}")
    if failed is not None:
        failure = "(status_code >= 400 OR error_code <> '')"
        conditions.append(failure if failed else f"NOT {failure}")
    args.append(limit)
    sql = (
        f"SELECT {GENERATION_COLUMNS} FROM generations WHERE {' AND '.join(conditions)} "
        f"ORDER BY created_at DESC LIMIT {mark(len(args))}"
    )
    return sql, args
