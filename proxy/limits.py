"""Rate limits as GCRA (the generic cell rate algorithm): smooth, with no fixed-window bursts at minute edges.

A limit of `rate` units a minute (requests, or tokens) with a burst of `burst` units keeps, per key, one number:
the theoretical arrival time (TAT), when the key's bucket would be empty again. Taking `cost` units at `now`
moves it to `max(TAT, now) + cost * interval` (interval = 60 / rate s); that is allowed while the new TAT is
at most `now + burst * interval`. So a key may spend its burst at once, then `rate` a minute, evenly: in any
60 s at most `burst + rate`, and no minute edge hands out a fresh minute's worth, as fixed windows do.

Tokens are reserved at admission from an estimate and `settle`d when the real usage is known: the TAT moves
back by what was over-reserved (never below now) or on by what was under-reserved.

`LocalLimits` holds the TATs of one process (a worker); a shared store (Redis) will hold the same number per
key with the same arithmetic. Nothing here runs unless a limit is configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, final

PRUNE_EVERY: Final = 4096  # admissions between sweeps of keys whose buckets are empty again


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` units a minute, at most `burst` at once (default: the minute's worth)."""

    rate: int
    burst: int = 0

    @property
    def interval(self) -> float:
        return 60.0 / self.rate

    @property
    def capacity(self) -> int:
        return self.burst or self.rate


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
    """The TATs of one process's keys (a key names a limit's subject: `key:<kid>:rpm`, `team:<id>:tpm`, …)."""

    __slots__ = ("_admissions", "_tat")

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._admissions = 0

    def take(self, key: str, limit: Limit, now: float, cost: int = 1) -> Decision:
        """Take `cost` units of `limit` for `key` at `now` (monotonic seconds), if they fit; else nothing."""
        self._admissions += 1
        if self._admissions % PRUNE_EVERY == 0:
            self._prune(now)
        interval = limit.interval
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + cost * interval
        allow_at = new_tat - limit.capacity * interval  # the earliest moment the bucket has room for `cost`
        if allow_at > now + 1e-9:
            return Decision(False, limit.rate, _remaining(tat, now, limit), tat - now, allow_at - now)
        self._tat[key] = new_tat
        return Decision(True, limit.rate, _remaining(new_tat, now, limit), new_tat - now, 0.0)

    def settle(self, key: str, limit: Limit, now: float, reserved: int, used: int) -> None:
        """The request took `used` units where `reserved` were taken at admission: give back or take the rest."""
        if used == reserved or key not in self._tat:
            return
        self._tat[key] = max(self._tat[key] + (used - reserved) * limit.interval, now)

    def _prune(self, now: float) -> None:
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}


def _remaining(tat: float, now: float, limit: Limit) -> int:
    """Units that fit now when the bucket's TAT is `tat`."""
    return max(math.floor(limit.capacity - (tat - now) / limit.interval + 1e-9), 0)
