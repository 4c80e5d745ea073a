"""The credit gate: a team's wallet must hold at least the configured minimum before each request.

Balances are cached per team for the auth TTL (and served stale, like keys, while the store cannot be
read). `adjust` applies a debit or top-up to the cached value at once, fresh or stale, so concurrent
requests see it without waiting for the store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, final

from proxy.cache import Missing, TTLCache
from proxy.config import NANOS_PER_USD
from proxy.errors import Code, GatewayError
from proxy.store.base import KeyRecord, Store, StoreError

if TYPE_CHECKING:
    from proxy.shared_limits import SharedLimits


def parse_usd(text: str) -> int:
    """An amount in USD as people write it (`25`, `0.50`) in nano-dollars; ValueError saying what was expected."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"expected an amount in USD such as 25 or 0.50, got {text!r}") from None
    if not amount.is_finite():
        raise ValueError(f"expected a finite amount, got {text!r}")
    return int(amount * NANOS_PER_USD)


def usd(nanos: int) -> str:
    """Nano-dollars as a dollar amount for people: `$1.00`, `$0.000125`."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{frac:09d}".rstrip("0")
    return f"{sign}${whole}.{digits.ljust(2, '0')}"


@final
class WalletCache:
    __slots__ = ("_cache", "holds", "min_balance_nanos", "pending", "shared", "store")

    def __init__(self, store: Store, ttl: float, min_balance_nanos: int, stale_s: float = 0.0):
        self.store = store
        self.shared: SharedLimits | None = None  # holds in Redis (rate_limits.url), else in this process
        self.min_balance_nanos = min_balance_nanos
        self.pending: dict[str, int] = {}  # team → debits not yet in the store (kept by the accountant)
        self.holds: dict[str, int] = {}  # team → worst-case costs of its requests in flight in this process
        self._cache: TTLCache[str, int] = TTLCache(self._fetch, ttl, stale_s=stale_s, name="team balance")

    async def balance(self, team_id: str) -> int:
        balance = self._cache.get(team_id)
        return await self._cache.load(team_id) if isinstance(balance, Missing) else balance

    async def _fetch(self, team_id: str) -> int:
        try:
            stored = await self.store.get_balance(team_id) or 0
            return stored - self.pending.get(team_id, 0)
        except StoreError as e:
            raise GatewayError(Code.unavailable, "The wallet store is unavailable; retry shortly.") from e

    async def funded(self, team_id: str, team_name: str) -> int:
        """The team's balance; GatewayError(insufficient_credits) when it is under the minimum."""
        balance = await self.balance(team_id)
        if balance < self.min_balance_nanos:
            raise GatewayError(
                Code.insufficient_credits,
                f"Team {team_name!r} has {usd(balance)} of credit; each request needs at least "
                f"{usd(self.min_balance_nanos)}. Add credit with `stats-gateway credits add --team "
                f"{team_name} --usd AMOUNT`.",
            )
        return balance

    async def check(self, team_id: str, team_name: str, hold: int = 0) -> None:
        """GatewayError(insufficient_credits) when the team's balance is under the minimum once the holds of
        its requests in flight in this process, and `hold` (this request's), are taken off; else `hold` is
        held until `release`. (With Redis, SharedLimits.admit holds across instances instead.)"""
        balance = await self.funded(team_id, team_name)
        held = self.holds.get(team_id, 0)
        if balance - held - hold < self.min_balance_nanos:
            raise held_up(team_name, balance, held, hold, self.min_balance_nanos)
        if hold:
            self.holds[team_id] = held + hold

    def release(self, team_id: str, hold: int, member: str = "") -> None:
        """A request's hold ends (its real cost is debited, or it never ran); `member`: it is in Redis."""
        if member and self.shared is not None:
            self.shared.release(team_id, member)
        elif hold:
            _settle(self.holds, team_id, hold)

    def adjust(self, team_id: str, delta_nanos: int) -> None:
        """Apply a debit or top-up to the cached balance at once."""
        self._cache.update(team_id, lambda balance: balance + delta_nanos)

    def debit(self, team_id: str, cost: int) -> None:
        """A finished request's cost: off the cached balance now, and pending until it is written."""
        self.adjust(team_id, -cost)
        self.pending[team_id] = self.pending.get(team_id, 0) + cost

    def written(self, team_id: str, cost: int) -> None:
        _settle(self.pending, team_id, cost)


def held_up(team_name: str, balance: int, held: int, hold: int, minimum: int) -> GatewayError:
    """The 402 of a request whose worst-case cost does not fit beside what the team's requests in flight hold."""
    return GatewayError(
        Code.insufficient_credits,
        f"Team {team_name!r} has {usd(balance)} of credit, of which {usd(held)} is held by its requests in flight; "
        f"this one may cost up to {usd(hold)} and each request must leave at least {usd(minimum)}. Retry when "
        "some finish, lower max_tokens, or add credit.",
    )


def _settle(pending: dict[str, int], key: str, cost: int) -> None:
    """`cost` is now in the store: it stops counting as pending."""
    left = pending.get(key, 0) - cost
    if left:
        pending[key] = left
    else:
        pending.pop(key, None)


def _period_starts(now: datetime) -> tuple[int, int]:
    """Unix ms at the start of the current UTC day and month."""
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    return int(day.timestamp() * 1000), int(day.replace(day=1).timestamp() * 1000)


@final
class KeyBudgets:
    """What each key spent this UTC day and month, for keys that have cost limits; cached like balances.

    A finished request's cost is added at once (`add`); a reload from the store adds what is not yet
    written (`pending`), as the wallet does.
    """

    __slots__ = ("_cache", "_teams", "pending", "store")

    def __init__(self, store: Store, ttl: float, stale_s: float = 0.0):
        self.store = store
        self.pending: dict[str, int] = {}  # kid → cost submitted but not yet in the store
        self._teams: dict[str, str] = {}  # kid → its team, for the store's read (the team's usage rollups)
        self._cache: TTLCache[tuple[str, int], int] = TTLCache(self._fetch, ttl, stale_s=stale_s, name="key spend")

    async def _fetch(self, key: tuple[str, int]) -> int:
        kid, since_ms = key
        try:
            return await self.store.key_spend(self._teams[kid], kid, since_ms) + self.pending.get(kid, 0)
        except StoreError as e:
            raise GatewayError(Code.unavailable, "The key store is unavailable; retry shortly.") from e

    async def spent(self, team_id: str, kid: str, since_ms: int) -> int:
        self._teams[kid] = team_id
        spent = self._cache.get((kid, since_ms))
        return await self._cache.load((kid, since_ms)) if isinstance(spent, Missing) else spent

    async def check(self, key: KeyRecord) -> None:
        """`GatewayError(key_budget_exceeded)` when a limited key has spent its day's or month's budget."""
        if not key.limited:
            return
        day, month = _period_starts(datetime.now(UTC))
        for limit, since, period in (
            (key.daily_limit_cost_nanos, day, "today"),
            (key.monthly_limit_cost_nanos, month, "this month"),
        ):
            if limit is None:
                continue
            spent = await self.spent(key.team_id, key.kid, since)
            if spent >= limit:
                raise GatewayError(
                    Code.key_budget_exceeded,
                    f"This key ({key.kid}) has spent {usd(spent)} {period}, its limit is {usd(limit)}. "
                    f"A management key can raise it (PATCH /v1/keys/{key.kid}).",
                )

    def add(self, kid: str, cost: int) -> None:
        day, month = _period_starts(datetime.now(UTC))
        for since in {day, month}:
            self._cache.update((kid, since), lambda spent: spent + cost)
        self.pending[kid] = self.pending.get(kid, 0) + cost

    def written(self, kid: str, cost: int) -> None:
        _settle(self.pending, kid, cost)
