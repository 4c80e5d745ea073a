"""One use's connection to Redis (the shared rate limits, the response cache), and what an outage does to it.

A few pooled connections, waited for: a burst queues for them rather than opening one each (hundreds of
connects at once are what would make Redis slow). No retries inside redis-py: a failed call is Redis being
down, and the caller decides at once what that means. An outage is logged once (a WARNING naming the Redis
without its password and what the gateway does meanwhile), and once more when Redis answers again (INFO);
every failed call is counted; while down, Redis is tried again at most once a `retry_s`, so an outage costs
one timeout per interval, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, final

from proxy.store.base import redact_url

T = TypeVar("T")
POOL_SIZE: Final = 16  # connections per worker


class RedisDown(Exception):
    """Redis did not answer (or answered an error); what to do is the caller's."""


@final
class RedisLink:
    __slots__ = (
        "_down_since",
        "_errors",
        "_log",
        "client",
        "meanwhile",
        "retry_at",
        "retry_s",
        "setting",
        "timeout",
        "url",
    )

    def __init__(
        self,
        url: str,
        timeout_s: float,
        setting: str,
        meanwhile: str,
        retry_s: float,
        log: logging.Logger,
        errors: Any = None,
    ):
        import redis.asyncio as redis  # only when a Redis is configured

        self.url = url
        self.timeout = timeout_s
        self.setting = setting  # its config key, for the logs: `rate_limits.url`
        self.meanwhile = meanwhile  # what the gateway does while Redis is down, for the WARNING
        self.retry_s = retry_s
        self._log = log
        self._errors = errors  # a counter with one label, valued per call (`call`'s `what`)
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self.client = redis.Redis(connection_pool=pool, retry=None)
        self._down_since = 0.0  # monotonic time of the outage's first failure; 0: up
        self.retry_at = 0.0  # while down, no call before this

    @property
    def down(self) -> bool:
        """Down, and not to be tried again yet."""
        return bool(self._down_since) and time.monotonic() < self.retry_at

    async def call(self, send: Callable[[Any], Awaitable[T]], what: str) -> T:
        """`send(client)`'s answer; RedisDown when Redis is down (not tried) or fails now (`what`: the label it
        is counted under)."""
        started = time.monotonic()
        if self._down_since and started < self.retry_at:
            raise RedisDown
        try:
            async with asyncio.timeout(self.timeout * 3):  # the pool's wait and the socket's, and a margin
                answer = await send(self.client)
        except Exception as e:  # refused, timed out, a script error, not Redis: each is Redis not serving us
            self._failed(e, what)
            raise RedisDown from e
        if self._down_since and started > self._down_since:  # not a call that was on its way before
            self._log.info(
                "Redis at %s answers again after %.1f s", redact_url(self.url), time.monotonic() - self._down_since
            )
            self._down_since = 0.0
        return answer

    def _failed(self, error: Exception, what: str) -> None:
        if self._errors is not None:
            self._errors.labels(what).inc()
        now = time.monotonic()
        self.retry_at = now + self.retry_s
        if not self._down_since:
            self._down_since = now
            self._log.warning(
                "Redis at %s (%s) failed: %s; until it answers, %s",
                redact_url(self.url),
                self.setting,
                f"{type(error).__name__}: {error}" if str(error) else type(error).__name__,
                self.meanwhile,
            )

    async def close(self) -> None:
        await self.client.aclose()
