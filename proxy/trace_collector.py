"""The OTLP/HTTP collector as a worker sends its traces to it itself (`telemetry.traces` in `http/json` without
`capture_content`, the default), over the gateway's own lean client (`proxy.client.Pool`: one keep-alive
connection, asyncio, never blocking the serving thread) and its connection policy (`proxy.egress.Egress`: an
`HTTPS_PROXY`/`HTTP_PROXY` the environment names, `NO_PROXY`, TLS verified against the system store).

The other set-ups (`http/protobuf`, which parses the JSON into protobuf messages, and captured content, which
decodes the requests' messages) send through the trace exporter process (`proxy.trace_export`) instead, so that
this slower work stays off the serving thread.
"""

from __future__ import annotations

import logging
import time
from typing import final
from urllib.parse import urlsplit

from proxy import __version__
from proxy.client import ClientError, Pool
from proxy.config import ProviderConfig
from proxy.egress import Egress, SettingError

log = logging.getLogger("proxy.telemetry")


def check_endpoint(endpoint: str) -> None:
    """Raise RuntimeError, saying what is wrong, unless `endpoint` is an http(s) URL with a host (and a port
    that is one)."""
    url = urlsplit(endpoint)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or port == -1:
        raise RuntimeError(
            f"telemetry.traces: the endpoint {_origin(endpoint)!r} is not an http(s) URL with a host and a valid port "
            "(e.g. http://localhost:4318/v1/traces)"
        )


@final
class Collector:
    """POSTs export requests (OTLP/JSON) to the collector at `endpoint` (one `check_endpoint` passed), one at a
    time, over one keep-alive connection. Made inside the worker's event loop."""

    __slots__ = ("_failed_at", "_pool", "_target", "origin")

    def __init__(self, endpoint: str, headers: dict[str, str], timeout_s: float):
        try:
            egress = Egress(endpoint, ProviderConfig(kind="otlp", base_url=endpoint))
        except SettingError as e:
            raise RuntimeError(f"telemetry.traces: {e.message}") from None
        url = urlsplit(endpoint)
        self._target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.origin = _origin(endpoint) + egress.via  # for messages: never credentials
        self._pool = Pool(
            egress.connect,
            {
                "Host": egress.authority,
                "User-Agent": f"stats-gateway/{__version__}",
                **headers,
                "Content-Type": "application/json",
                **egress.extra_headers,
            },
            limit=1,
            connect_s=timeout_s,
            first_byte_s=timeout_s,
            total_s=timeout_s,
            target_prefix=egress.target_prefix,
        )
        self._failed_at = -1e9

    async def send(self, body: bytes) -> bool:
        """Post an export request (`proxy.trace_spans.EXPORT`, its resource's attributes and spans written in);
        False when the collector did not take it (down, slow beyond the timeout, or an answer that is not 2xx)."""
        try:
            answer = await self._pool.request(self._target, body)
            try:
                await answer.read()
            finally:
                answer.release()
        except (ClientError, OSError) as e:  # refused, timed out, not HTTP
            self._failed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return False
        except Exception:  # a fault of ours: the export is lost (counted), never the worker
            log.exception("traces: an export to %s failed", self.origin)
            return False
        if not 200 <= answer.status < 300:
            self._failed(f"it answered HTTP {answer.status}")
            return False
        return True

    def close(self) -> None:
        self._pool.close()

    def _failed(self, why: str) -> None:
        now = time.monotonic()
        if now - self._failed_at > 60:  # once a minute at most: a collector that is down fails every export
            self._failed_at = now
            log.warning("traces: an export to %s failed (%s); its spans are dropped", self.origin, why)


def _origin(endpoint: str) -> str:
    """The endpoint's scheme, host and port: what messages name (its path, query and userinfo may hold keys)."""
    url = urlsplit(endpoint)
    if url.netloc:
        return f"{url.scheme}://{url.netloc.rpartition('@')[2]}"
    return endpoint.partition("?")[0][:80]
