"""Rate limits as GCRA (the generic cell rate algorithm): smooth, with no fixed-window bursts at minute edges.

A limit of `rate` units a minute (requests, or tokens) with a burst of `burst` units keeps, per key, one number:
the theoretical arrival time (TAT), when the key's bucket would be empty again. Taking `cost` units at `now`
moves it to `max(TAT, now) + cost * interval` (interval = 60 / rate s); that is allowed while the new TAT is
at most `now + burst * interval`. So a key may spend its burst at once, then `rate` a minute, evenly: in any
60 s at most `burst + rate`, and no minute edge hands out a fresh minute's worth, as fixed windows do.

Tokens are reserved at admission from an estimate and `settle`d when the real usage is known: the TAT moves
back by what was over-reserved (never below now) or on by what was under-reserved.

`LocalLimits` holds the TATs of one process (a worker); a shared store (Redis) will hold the same number per
key with the same arithmetic. `RateLimiter` applies the configured limits (`rate_limits` in YAML) of each key
and each team to a request: requests and tokens a minute, and requests in flight. Nothing here runs unless a
limit is configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

from proxy.errors import Code, GatewayError

if TYPE_CHECKING:
    from proxy.config import RateLimitsConfig, SubjectLimits
    from proxy.shared_limits import SharedLimits
    from proxy.store.base import KeyRecord

PRUNE_EVERY: Final = 4096  # admissions between sweeps of keys whose buckets are empty again


@final
class Limit:
    """`rate` units a minute, at most `burst` at once (default: the minute's worth)."""

    __slots__ = ("burst", "capacity", "interval", "rate", "rate_text")

    def __init__(self, rate: int, burst: int = 0):
        self.rate = rate
        self.rate_text = str(rate)  # for x-ratelimit-limit-*
        self.burst = burst
        self.interval = 60.0 / rate  # seconds a unit
        self.capacity = burst or rate

    def __repr__(self) -> str:
        return f"Limit(rate={self.rate}, burst={self.burst})"


@dataclass(frozen=True, slots=True)
class Decision:
    """An admission's outcome, with what the `x-ratelimit-*` headers and a 429 say."""

    allowed: bool
    limit: int  # the limit a minute
    remaining: int  # units that could still be taken now
    reset_s: float  # until the bucket is full again (nothing outstanding)
    retry_after_s: float  # until this request would be allowed (0 when it is)


@final
class LocalLimits:
    """The TATs of one process's buckets of one limit, each named by its subject (a key id, a team id)."""

    __slots__ = ("_admissions", "_tat")

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._admissions = 0

    def take(self, key: str, limit: Limit, now: float, cost: int = 1) -> Decision:
        """Take `cost` units of `limit` for `key` at `now` (monotonic seconds), if they fit; else nothing."""
        tat = self.reserve(key, limit, now, cost)
        if tat < 0:  # refused: -tat is the wait
            held = self.tat(key, now)
            return Decision(False, limit.rate, _remaining(held, now, limit), held - now, -tat)
        return Decision(True, limit.rate, _remaining(tat, now, limit), tat - now, 0.0)

    def reserve(self, key: str, limit: Limit, now: float, cost: int) -> float:
        """`take` without the figures: the key's new TAT when the units fit, else minus the wait until they
        would (the admission path's form: no object made)."""
        self._admissions += 1
        if self._admissions % PRUNE_EVERY == 0:
            self._prune(now)
        interval = limit.interval
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        new_tat = tat + cost * interval
        allow_at = new_tat - limit.capacity * interval  # the earliest moment the bucket has room for `cost`
        if allow_at > now + 1e-9:
            return now - allow_at
        self._tat[key] = new_tat
        return new_tat

    def tat(self, key: str, now: float) -> float:
        """The key's TAT as it is (`now` when its bucket is full)."""
        tat = self._tat.get(key, now)
        return tat if tat > now else now

    def settle(self, key: str, limit: Limit, now: float, reserved: int, used: int) -> None:
        """The request took `used` units where `reserved` were taken at admission: give back or take the rest."""
        if used == reserved or key not in self._tat:
            return
        self._tat[key] = max(self._tat[key] + (used - reserved) * limit.interval, now)

    def _prune(self, now: float) -> None:
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}


def _remaining(tat: float, now: float, limit: Limit) -> int:
    """Units that fit now when the bucket's TAT is `tat`."""
    room = int(limit.capacity - (tat - now) / limit.interval + 1e-9)  # whole units (room is never below -1e-9)
    return room if room > 0 else 0


def estimate(body_bytes: int, bound: int | None, default_output: int) -> tuple[int, int]:
    """(prompt tokens, output tokens) of a request before it runs: a token per four bytes of its body, and its
    output bound (`max_tokens` and the like) or `default_output` when it names none."""
    return body_bytes // 4, default_output if bound is None else bound


@final
class Admission:
    """What a request holds from the limiter until it ends, and the `x-ratelimit-*` headers of its answer."""

    __slots__ = ("headers", "member", "shared", "slots", "tokens")

    def __init__(self, headers: dict[str, str], tokens: list, slots: list, shared: Any = None):
        self.headers = headers
        # In this process: (buckets, subject, limit, tokens reserved) of each tokens-a-minute limit, and
        # (counters, subject) of each concurrency limit it holds one request of. In Redis (`shared`: the
        # SharedLimits that settles it): (Redis key, limit, tokens reserved), and the Redis keys of the slots.
        self.tokens = tokens
        self.slots = slots
        self.shared = shared
        self.member = ""  # in Redis: the request's id, its slots' member


@final
class Rule:
    """The limits of one kind of subject (each key, or each team), with their buckets and counters."""

    __slots__ = ("concurrency", "in_flight", "model", "per_key", "rpm", "rpm_buckets", "tpm", "tpm_buckets")

    def __init__(self, kind: str, limits: SubjectLimits, model: str = ""):
        self.per_key = kind == "key"  # else per team
        self.model = model  # "": all models
        self.rpm = Limit(limits.rpm) if limits.rpm else None
        self.tpm = Limit(limits.tpm) if limits.tpm else None
        self.concurrency = limits.concurrency
        self.rpm_buckets = LocalLimits()
        self.tpm_buckets = LocalLimits()
        self.in_flight: dict[str, int] = {}

    def who(self, key: KeyRecord) -> str:
        who = f"key {key.kid}" if self.per_key else f"team {key.team_name}"
        return f"{who} on {self.model}" if self.model else who


_Taken = tuple[LocalLimits, str, Limit, int]  # buckets, subject, limit, units


@final
class RateLimiter:
    """The configured limits of every key and every team, in this process."""

    __slots__ = (
        "_key_rule",
        "_limits",
        "_model_rules",
        "_refusals",
        "_rules",
        "active",
        "default_output",
        "shared",
    )

    def __init__(self, config: RateLimitsConfig, refusals: Any = None):
        self._refusals = refusals  # a labelled counter (`gateway_rate_limited`): subject, limit
        self._key_rule = Rule("key", config.key)  # there even without defaults: a key may have its own limits
        self._rules = [self._key_rule] + ([Rule("team", config.team)] if _any(config.team) else [])
        self._model_rules = {  # model id → the key's and team's limits on it, after those on all models
            model: self._rules
            + [
                Rule(kind, subject, model)
                for kind, subject in (("key", limits.key), ("team", limits.team))
                if _any(subject)
            ]
            for model, limits in config.models.items()
            if _any(limits.key) or _any(limits.team)
        }
        self.active = _any(config.key) or _any(config.team) or bool(self._model_rules)  # else only keys with their own
        self.default_output = config.default_output_tokens
        self._limits: dict[int, Limit] = {}  # a key's own rates, one Limit each
        self.shared: SharedLimits | None = None  # the buckets in Redis (rate_limits.url), set at start-up

    def _own(self, rate: int | None, default: Limit | None) -> Limit | None:
        """A key's own rate (None: the default; 0: no limit) as a Limit."""
        if rate is None:
            return default
        if not rate:
            return None
        limit = self._limits.get(rate)
        if limit is None:
            limit = self._limits[rate] = Limit(rate)
        return limit

    def admit(self, key: KeyRecord, tokens: int, now: float, model: str = "") -> Admission:
        """Take one request (and `tokens`, its estimate: 0 for an upload, whose tokens are counted at the end)
        from each limit of `key` and its team, on all models and on `model`, or none of them: GatewayError 429
        `rate_limited` naming the limit, with the headers to send (`error.headers`)."""
        taken: list[_Taken] = []
        reserved: list[_Taken] = []  # the tokens-a-minute ones, settled at the end
        held: list[tuple[dict[str, int], str]] = []
        requests: tuple[float, Limit] | None = None  # the tightest bucket of each kind: its TAT, its limit
        budget: tuple[float, Limit] | None = None
        requests_room = budget_room = 0.0  # what they have left
        try:
            for rule in self.rules(model):
                subject, rpm, tpm, concurrency = self.terms(rule, key)
                limit = rpm
                if limit is not None:
                    buckets = rule.rpm_buckets
                    tat = buckets.reserve(subject, limit, now, 1)
                    if tat < 0:
                        raise self.refused(rule, key, limit, buckets.tat(subject, now) - now, -tat, "requests")
                    taken.append((buckets, subject, limit, 1))
                    room = limit.capacity - (tat - now) / limit.interval
                    if requests is None or room < requests_room:
                        requests, requests_room = (tat, limit), room
                limit = tpm
                if limit is not None:
                    if tokens > limit.capacity:
                        raise self.too_big(rule, key, limit, tokens)
                    buckets = rule.tpm_buckets
                    tat = buckets.reserve(subject, limit, now, tokens)
                    if tat < 0:
                        raise self.refused(rule, key, limit, buckets.tat(subject, now) - now, -tat, "tokens")
                    taken.append((buckets, subject, limit, tokens))
                    reserved.append(taken[-1])
                    room = limit.capacity - (tat - now) / limit.interval
                    if budget is None or room < budget_room:
                        budget, budget_room = (tat, limit), room
                if concurrency:
                    count = rule.in_flight.get(subject, 0)
                    if count >= concurrency:
                        raise self.busy(rule, key, concurrency)
                    rule.in_flight[subject] = count + 1
                    held.append((rule.in_flight, subject))
        except GatewayError as e:
            for buckets, subject, limit, units in taken:  # none of them, then
                buckets.settle(subject, limit, now, units, 0)
            _free(held)
            e.headers = {**headers(requests, budget, now), **e.headers}
            raise
        return Admission(headers(requests, budget, now), reserved, held)

    def rules(self, model: str) -> list[Rule]:
        """The rules a request for `model` is under: those on all models, then those on it."""
        return self._model_rules.get(model, self._rules)

    def terms(self, rule: Rule, key: KeyRecord) -> tuple[str, Limit | None, Limit | None, int]:
        """What `rule` means for `key`: the subject it counts (the key's id, or its team's), its requests and
        tokens a minute, and its concurrency (0: none). A key's own limits replace those on all models."""
        if not rule.per_key:
            return key.team_id, rule.rpm, rule.tpm, rule.concurrency
        if key.rate_limited and not rule.model:
            concurrency = rule.concurrency if key.concurrency_limit is None else key.concurrency_limit
            return key.kid, self._own(key.rpm_limit, rule.rpm), self._own(key.tpm_limit, rule.tpm), concurrency
        return key.kid, rule.rpm, rule.tpm, rule.concurrency

    def too_big(self, rule: Rule, key: KeyRecord, limit: Limit, tokens: int) -> GatewayError:
        """The 429 of a request whose estimate is over a tokens-a-minute limit's burst: it would never fit."""
        self._count_refusal(rule, "tokens")
        return _refusal(
            f"This request's estimated {tokens} tokens (its prompt, and its max_tokens or {self.default_output} "
            f"when it names none) exceed the {limit.rate} tokens a minute of {rule.who(key)}: lower max_tokens or "
            "shorten the prompt.",
            {"x-should-retry": "false"},  # waiting would not help: the SDKs do not retry
        )

    def busy(self, rule: Rule, key: KeyRecord, concurrency: int) -> GatewayError:
        """The 429 of a concurrency limit with every slot taken."""
        self._count_refusal(rule, "concurrency")
        return _refusal(
            f"Rate limit reached for {rule.who(key)}: at most {concurrency} requests in flight at once. Retry when "
            "one of them ends.",
            {"retry-after": "1", "retry-after-ms": "1000"},
        )

    def refused(self, rule: Rule, key: KeyRecord, limit: Limit, held: float, wait: float, unit: str) -> GatewayError:
        """The 429 of a bucket without room (`held`: its TAT - now; `wait`: until the request would fit), with
        when to retry and the headers of the bucket as it is."""
        self._count_refusal(rule, unit)
        bucket = (held, limit)
        out = headers(bucket, None, 0.0) if unit == "requests" else headers(None, bucket, 0.0)
        out["retry-after"] = str(max(math.ceil(wait), 1))
        out["retry-after-ms"] = str(max(math.ceil(wait * 1000), 1))
        return _refusal(
            f"Rate limit reached for {rule.who(key)}: {limit.rate} {unit} a minute. Retry in {wait:.2f} s.", out
        )

    def _count_refusal(self, rule: Rule, limit: str) -> None:
        if self._refusals is not None:
            self._refusals.labels("key" if rule.per_key else "team", limit).inc()

    def settle(self, admission: Admission, used_tokens: int, now: float) -> None:
        """The request ended having used `used_tokens`: reconcile its token reservations, free its slots."""
        if admission.shared is not None:
            admission.shared.settle(admission, used_tokens)
            return
        for buckets, subject, limit, reserved in admission.tokens:
            buckets.settle(subject, limit, now, reserved, used_tokens)
        _free(admission.slots)


def _any(limits: SubjectLimits) -> bool:
    return bool(limits.rpm or limits.tpm or limits.concurrency)


def _free(held: list[tuple[dict[str, int], str]]) -> None:
    for counters, subject in held:
        left = counters[subject] - 1
        if left:
            counters[subject] = left
        else:
            del counters[subject]


def _refusal(message: str, headers: dict[str, str]) -> GatewayError:
    error = GatewayError(Code.rate_limited, message)
    error.headers = headers
    return error


def headers(requests: tuple[float, Limit] | None, tokens: tuple[float, Limit] | None, now: float) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers, for the tightest bucket (its TAT, its limit) of each kind."""
    out = {}
    if requests is not None:
        tat, limit = requests
        out["x-ratelimit-limit-requests"] = limit.rate_text
        out["x-ratelimit-remaining-requests"] = str(_remaining(tat, now, limit))
        out["x-ratelimit-reset-requests"] = duration(tat - now)
    if tokens is not None:
        tat, limit = tokens
        out["x-ratelimit-limit-tokens"] = limit.rate_text
        out["x-ratelimit-remaining-tokens"] = str(_remaining(tat, now, limit))
        out["x-ratelimit-reset-tokens"] = duration(tat - now)
    return out


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it in `x-ratelimit-reset-*`: `120ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{int(seconds * 1000 + 0.5)}ms" if seconds > 0 else "0ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"
