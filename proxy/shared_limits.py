"""Rate limits and credit holds shared by every worker and instance, in Redis (`rate_limits.url`).

Each admission is at most one Redis round trip: a Lua script that takes the request from every bucket it is
under (the same GCRA arithmetic as `proxy.limits`, with Redis's clock so that instances agree on the time), a
slot of every concurrency limit and its credit hold, or nothing at all. The admissions that arrive in one turn
of the event loop share one call (measured: ~30 µs of gateway CPU a request at 32 in flight, ~230 µs alone,
most of it redis-py's). The end of a request (settling its tokens, freeing its slots, releasing its hold) is
batched the same way, from a background task: never on the answer's path.

A request's concurrency slot and credit hold are members of a sorted set scored by when they lapse, so what
a killed instance held is freed once its lease runs out (`LEASE_S`), without anyone having to notice.

Redis down or slower than `rate_limits.timeout_ms`: `on_redis_error` says what happens (each worker's own
limits and holds, none, or 503); `proxy.redis_link` logs the outage, counts each failed call in
`gateway_redis_errors_total{use="limits"}` and tries Redis again at most once a `RETRY_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any, Final, final

from proxy.errors import Code, GatewayError
from proxy.limits import Admission, Limit, RateLimiter, headers
from proxy.redis_link import RedisDown, RedisLink

if TYPE_CHECKING:
    from proxy.config import RateLimitsConfig
    from proxy.store.base import KeyRecord

log = logging.getLogger("proxy.limits")

LEASE_S: Final = 1800  # a slot or hold of a request no instance released (it was killed) lapses after this
RETRY_S: Final = 1.0
MAX_BATCH: Final = 256  # admissions in one script call  # while Redis is down, how often a request tries it again

# Admissions, each taken from all its buckets, concurrency sets and its team's holds, or from none; in order,
# so a later one sees what an earlier one took. ARGV[1]: their count; then per admission n (buckets), m (sets),
# member, lease (µs), hold (nano-dollars; 0: none) and room (the balance less the minimum), then per bucket its
# interval (µs a unit), capacity and cost (units), then per set its limit. KEYS per admission: its n buckets,
# its m sets, then (with a hold) the team's holds (member → lapse, µs) and their amounts (member → nanos).
# Answer per admission: {1, TAT - now of each bucket…}; refused by a limit: {0, its index, wait (µs), its
# TAT - now (µs)}; by the wallet: {2, what the team's other requests hold}.
_ADMIT: Final = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local out, k, a = {}, 0, 1
for r = 1, tonumber(ARGV[1]) do
  local n, m, member = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local lease, hold, room = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  a = a + 6
  local tats, answer = {}, nil
  for i = 1, n do
    local b = a + (i - 1) * 3
    local interval, capacity, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local tat = tonumber(redis.call('GET', KEYS[k + i])) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - capacity * interval
    if allow_at > now then answer = {0, i, allow_at - now, tat - now} break end
    tats[i] = new_tat
  end
  if not answer then
    for j = 1, m do
      local key = KEYS[k + n + j]
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      if redis.call('ZCARD', key) >= tonumber(ARGV[a + n * 3 + j]) then answer = {0, n + j, 0, 0} break end
    end
  end
  local until_key, nanos_key = KEYS[k + n + m + 1], KEYS[k + n + m + 2]
  if not answer and hold > 0 then
    local lapsed = redis.call('ZRANGEBYSCORE', until_key, '-inf', now)
    if #lapsed > 0 then
      redis.call('ZREMRANGEBYSCORE', until_key, '-inf', now)
      for _, gone in ipairs(lapsed) do redis.call('HDEL', nanos_key, gone) end
    end
    local held = 0
    for _, amount in ipairs(redis.call('HVALS', nanos_key)) do held = held + tonumber(amount) end
    if room - held - hold < 0 then answer = {2, string.format('%.0f', held)} end
  end
  if not answer then
    answer = {1}
    for i = 1, n do
      redis.call('SET', KEYS[k + i], string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1000)
      answer[i + 1] = tats[i] - now
    end
    for j = 1, m do
      redis.call('ZADD', KEYS[k + n + j], now + lease, member)
      redis.call('PEXPIRE', KEYS[k + n + j], math.ceil(lease / 1000))
    end
    if hold > 0 then
      redis.call('ZADD', until_key, now + lease, member)
      redis.call('HSET', nanos_key, member, hold)
      redis.call('PEXPIRE', until_key, math.ceil(lease / 1000))
      redis.call('PEXPIRE', nanos_key, math.ceil(lease / 1000))
    end
  end
  out[r] = answer
  k = k + n + m + (hold > 0 and 2 or 0)
  a = a + n * 3 + m
end
return out
"""

# The ends of requests, as pairs of ARGV: a key's index in KEYS and what to do to it: `+N`/`-N` moves a token
# bucket's TAT by N µs (never below now); `z<member>` takes a member off a set of slots or holds; `h<member>`
# off a hash of hold amounts.
_END: Final = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
for i = 1, #ARGV, 2 do
  local key, op = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local kind = string.sub(op, 1, 1)
  if kind == 'z' then
    redis.call('ZREM', key, string.sub(op, 2))
  elseif kind == 'h' then
    redis.call('HDEL', key, string.sub(op, 2))
  else
    local tat = tonumber(redis.call('GET', key))
    if tat then
      tat = math.max(tat + tonumber(op), now)
      redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
  end
end
return 0
"""

_US: Final = 1_000_000


DOWN: Final = object()  # `admit`'s answer when Redis is down and the caller is to go on without it


@final
class _Request:
    """One admission for the next batch: its part of the script's KEYS and ARGV, what undoes it, its answer."""

    __slots__ = ("args", "future", "keys", "undo")

    def __init__(self, keys: list[str], args: list[Any], undo: list[tuple[str, str]]):
        self.keys = keys
        self.args = args
        self.undo = undo
        self.future: asyncio.Future[Any] | None = None


@final
class SharedLimits:
    """The rate limits' buckets and slots, and the credit holds, of all instances, in one Redis.

    Calls are batched per turn of the event loop: the admissions that arrive together go to Redis as one
    script call (each still all-or-nothing, in order), and so do the ends of requests. Under load that is
    one round trip for many requests; alone, a request waits for nothing but its own."""

    __slots__ = ("_admit", "_admitting", "_end", "_ending", "_tasks", "limiter", "link", "on_error", "prefix")

    def __init__(self, config: RateLimitsConfig, limiter: RateLimiter, errors: Any = None):
        self.limiter = limiter
        self.on_error = config.on_redis_error
        self.prefix = config.key_prefix
        meanwhile = {
            "local": "each worker applies the rate limits and credit holds on its own",
            "open": "no rate limits apply and credit holds are per worker",
            "closed": "requests under a rate limit or a credit hold are refused (503)",
        }[config.on_redis_error]
        self.link = RedisLink(  # `gateway_redis_errors_total{use="limits"}` counts its failures
            config.url,
            config.timeout_ms / 1000,
            "rate_limits.url",
            f"{meanwhile} (rate_limits.on_redis_error: {config.on_redis_error})",
            RETRY_S,
            log,
            errors,
        )
        self._admit = self.link.client.register_script(_ADMIT)
        self._end = self.link.client.register_script(_END)
        self._admitting: list[_Request] = []  # admissions for the next batch
        self._ending: list[tuple[str, str]] = []  # (Redis key, operation) of requests' ends, for the next batch
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        while self._tasks:  # the ends of the last requests, so that their slots and holds do not wait to lapse
            done, _ = await asyncio.wait(self._tasks, timeout=max(self.link.timeout * 4, 1.0))
            if not done:
                break
        await self.link.close()

    async def admit(
        self,
        key: KeyRecord,
        tokens: int,
        model: str,
        member: str,
        limited: bool,
        hold: int = 0,
        wallet: tuple[int, int] = (0, 0),
    ) -> Any:
        """Take the request (`member`: its id) from every rate limit of `key` on `model` (`limited`), as
        `RateLimiter.admit` does, and hold `hold` nano-dollars of its team's wallet if its balance less its
        minimum (`wallet`) covers it and what the team's requests in flight on every instance hold: all or
        none, in one round trip. The Admission of its limits (None when not `limited`); GatewayError 429 or 402 when
        refused. Redis down: `DOWN` (`local`, `open`: the caller goes on without Redis) or 503 (`closed`)."""
        limiter = self.limiter
        keys: list[str] = []
        balance, minimum = wallet
        args: list[Any] = [0, 0, member, LEASE_S * _US, hold, balance - minimum]
        undo: list[tuple[str, str]] = []  # what gives it all back, should its answer find no one waiting
        rated: list[tuple[Any, Limit, str]] = []  # (rule, limit, unit) of each bucket
        slots: list[tuple[Any, int]] = []  # (rule, limit) of each concurrency set
        slot_keys: list[str] = []
        for rule in limiter.rules(model) if limited else ():
            subject, rpm, tpm, concurrency = limiter.terms(rule, key)
            where = f"{'k' if rule.per_key else 't'}:{subject}{':' + rule.model if rule.model else ''}"
            if rpm is not None:
                keys.append(f"{self.prefix}rl:r:{where}")
                args += (int(rpm.interval * _US), rpm.capacity, 1)
                rated.append((rule, rpm, "requests"))
                undo.append((keys[-1], f"{-int(rpm.interval * _US)}"))
            if tpm is not None:
                if tokens > tpm.capacity:
                    raise limiter.too_big(rule, key, tpm, tokens)
                keys.append(f"{self.prefix}rl:t:{where}")
                args += (int(tpm.interval * _US), tpm.capacity, tokens)
                rated.append((rule, tpm, "tokens"))
                undo.append((keys[-1], f"{-int(tokens * tpm.interval * _US)}"))
            if concurrency:
                slot_keys.append(f"{self.prefix}rl:c:{where}")
                args.append(concurrency)
                slots.append((rule, concurrency))
        if not keys and not slot_keys and not hold:
            return None
        args[0], args[1] = len(keys), len(slot_keys)
        undo += [(slot_key, "z" + member) for slot_key in slot_keys]
        hold_keys = self._hold_keys(key.team_id) if hold else []
        if hold:
            undo += ((hold_keys[0], "z" + member), (hold_keys[1], "h" + member))
        try:
            answer = await self._batched(_Request(keys + slot_keys + hold_keys, args, undo))
        except RedisDown:
            if self.on_error == "closed":
                raise _closed() from None
            return DOWN
        if answer[0] == 2:
            from proxy.credit import held_up

            raise held_up(key.team_name, balance, int(answer[1]), hold, minimum)
        if answer[0] != 1:
            index, wait_us, held_us = int(answer[1]) - 1, int(answer[2]), int(answer[3])
            if index >= len(rated):
                rule, concurrency = slots[index - len(rated)]
                raise limiter.busy(rule, key, concurrency)
            rule, limit, unit = rated[index]
            raise limiter.refused(rule, key, limit, held_us / _US, wait_us / _US, unit)
        if not limited:
            return None
        requests: tuple[float, Limit] | None = None  # the tightest bucket of each kind, as in RateLimiter.admit
        budget: tuple[float, Limit] | None = None
        requests_room = budget_room = 0.0
        reserved: list[tuple[str, Limit, int]] = []
        for (_, limit, unit), bucket_key, tat_us in zip(rated, keys, answer[1:], strict=True):
            tat = int(tat_us) / _US
            left = limit.capacity - tat / limit.interval
            if unit == "requests":
                if requests is None or left < requests_room:
                    requests, requests_room = (tat, limit), left
            else:
                reserved.append((bucket_key, limit, tokens))
                if budget is None or left < budget_room:
                    budget, budget_room = (tat, limit), left
        admission = Admission(headers(requests, budget, 0.0), reserved, slot_keys, self)
        admission.member = member
        return admission

    def settle(self, admission: Admission, used_tokens: int) -> None:
        """Reconcile the request's token reservations and free its slots, with the next batch of ends."""
        ops = [
            (bucket_key, f"{int((used_tokens - reserved) * limit.interval * _US):+d}")
            for bucket_key, limit, reserved in admission.tokens
            if used_tokens != reserved
        ]
        self._ends(ops + [(slot_key, "z" + admission.member) for slot_key in admission.slots])

    def release(self, team_id: str, member: str) -> None:
        """The request's credit hold ends, with the next batch of ends."""
        until_key, nanos_key = self._hold_keys(team_id)
        self._ends([(until_key, "z" + member), (nanos_key, "h" + member)])

    def _hold_keys(self, team_id: str) -> list[str]:
        return [f"{self.prefix}hold:until:{team_id}", f"{self.prefix}hold:nanos:{team_id}"]

    # -- batches

    async def _batched(self, request: _Request) -> Any:
        """This admission's answer, from the batch of this turn of the event loop."""
        if self.link.down:
            raise RedisDown
        loop = asyncio.get_running_loop()
        future = request.future = loop.create_future()
        if not self._admitting:
            loop.call_soon(self._send_admissions)  # after the other requests of this turn have come in
        self._admitting.append(request)
        try:
            return await future
        except asyncio.CancelledError:  # the client left; if Redis admitted it meanwhile, give it all back
            if future.done() and not future.cancelled() and future.exception() is None and future.result()[0] == 1:
                self._ends(request.undo)
            raise

    def _send_admissions(self) -> None:
        batch, self._admitting = self._admitting[:MAX_BATCH], self._admitting[MAX_BATCH:]
        if self._admitting:
            asyncio.get_running_loop().call_soon(self._send_admissions)
        keys: list[str] = []
        args: list[Any] = [len(batch)]
        for request in batch:
            keys += request.keys
            args += request.args
        self._spawn(self._admissions(batch, keys, args))

    async def _admissions(self, batch: list[_Request], keys: list[str], args: list[Any]) -> None:
        try:
            answers = await self._call(self._admit, keys, args)
        except RedisDown as e:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(RedisDown(*e.args))
            return
        for request, answer in zip(batch, answers, strict=True):
            if not request.future.done():
                request.future.set_result(answer)
            elif answer[0] == 1:  # its client left while it waited: what Redis took for it is given back
                self._ends(request.undo)

    def _ends(self, ops: list[tuple[str, str]]) -> None:
        if not ops:
            return
        if not self._ending:
            asyncio.get_running_loop().call_soon(self._send_ends)  # with the other ends of this turn
        self._ending += ops

    def _send_ends(self) -> None:
        ops, self._ending = self._ending, []
        if not ops:
            return
        for start in range(0, len(ops), MAX_BATCH * 4):
            keys: list[str] = []
            index: dict[str, int] = {}
            args: list[Any] = []
            for key, op in ops[start : start + MAX_BATCH * 4]:
                position = index.get(key)
                if position is None:
                    keys.append(key)
                    position = index[key] = len(keys)
                args += (position, op)
            self._spawn(self._quietly(keys, args))

    async def _quietly(self, keys: list[str], args: list[Any]) -> None:
        with contextlib.suppress(RedisDown):  # what it would have freed lapses on its own
            await self._call(self._end, keys, args)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self.link.call(lambda _: script(keys=keys, args=args), "limits")


def _closed() -> GatewayError:
    error = GatewayError(
        Code.unavailable, "Rate limits and credit holds are kept in Redis, which does not answer; retry shortly."
    )
    error.headers = {"retry-after": str(math.ceil(RETRY_S))}
    return error
