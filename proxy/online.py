"""`stats-gateway check-config --online`: ask each configured provider for its model list, with its key.

Catalogues rot: a provider retires a model the config still routes to, and users find out first. For each
provider with an `api_key` whose kind has a model list (OpenAI and OpenAI-compatible `GET /models`,
Anthropic `GET /v1/models`, Gemini `GET /v1beta/models`, each page followed), the check reports whether the
key was accepted, how long the list took, and which upstream models the config routes to that the list
lacks. Providers without a key, and kinds without a list (suno), are reported as skipped. Requests go out as
the gateway's do: the provider's headers, proxy and TLS settings. Nothing is changed anywhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from proxy.config import GatewayConfig
from proxy.upstream import Upstream

TIMEOUT_S: Final = 20.0  # per provider, every page included
MAX_PAGES: Final = 50


@dataclass
class Report:
    """One provider's outcome; `problem`: it makes the check fail."""

    provider: str
    kind: str
    status: str  # ok | refused | unreachable | broken | skipped
    detail: str = ""
    latency_ms: float = 0.0
    listed: int = 0
    missing: list[str] = field(default_factory=list)  # routed upstream models the provider does not list

    @property
    def problem(self) -> bool:
        return self.status in ("refused", "unreachable", "broken") or bool(self.missing)


def _pages(kind: str) -> tuple[str, dict[str, str]]:
    """(the list's path, the query asking for the largest pages)."""
    if kind == "anthropic":
        return "/v1/models", {"limit": "1000"}
    if kind == "gemini":
        return "/v1beta/models", {"pageSize": "1000"}
    return "/models", {}


def _read_page(kind: str, answer: Any) -> tuple[list[str], dict[str, str]]:
    """(model ids on one page, the query members asking for the next page; empty when it was the last)."""
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    if kind == "gemini":
        models = answer.get("models") or []
        ids = [str(m.get("name", "")).removeprefix("models/") for m in models if isinstance(m, dict)]
        token = answer.get("nextPageToken")
        return ids, {"pageToken": str(token)} if token else {}
    data = answer.get("data")
    if not isinstance(data, list):
        raise ValueError("the answer has no `data` list")
    ids = [str(m.get("id", "")) for m in data if isinstance(m, dict)]
    if kind == "anthropic" and answer.get("has_more") and answer.get("last_id"):
        return ids, {"after_id": str(answer["last_id"])}
    return ids, {}


async def _list(upstream: Upstream) -> list[str]:
    path, size = _pages(upstream.kind)
    ids: list[str] = []
    query = size
    for _ in range(MAX_PAGES):
        async with upstream.session.get(upstream.url(path), params=query) as resp:
            if resp.status in (401, 403):
                raise PermissionError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            if resp.status >= 400:
                raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            page, following = _read_page(upstream.kind, await resp.json(content_type=None))
        ids += page
        if not following:
            return ids
        query = {**size, **following}
    return ids


def _routed(config: GatewayConfig, provider: str) -> list[str]:
    """The upstream model names the config sends to `provider`, each once, in config order."""
    seen: dict[str, None] = {}
    for model in config.models.values():
        for target in model.targets:
            if target.provider == provider:
                seen.setdefault(target.model.removeprefix("models/"), None)
    return list(seen)


async def check_provider(config: GatewayConfig, name: str) -> Report:
    provider = config.providers[name]
    report = Report(name, provider.kind, "ok")
    if provider.kind == "suno":
        report.status, report.detail = "skipped", "this kind has no model list"
        return report
    if not provider.api_key:
        report.status, report.detail = "skipped", "no api_key set"
        return report
    upstream = Upstream(name, provider)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            listed = await _list(upstream)
    except PermissionError as e:
        report.status, report.detail = "refused", f"the key was refused ({e})"
        return report
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        report.status, report.detail = "unreachable", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return report
    except ValueError as e:  # an error status, or a body that is not a model list
        report.status, report.detail = "broken", str(e)
        return report
    finally:
        report.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        report.detail = report.detail.replace(provider.api_key, "***")  # an error may quote the key
        await upstream.close()
    report.listed = len(listed)
    known = set(listed)
    report.missing = [m for m in _routed(config, name) if m not in known]
    return report


async def check(config: GatewayConfig) -> list[Report]:
    """Every provider, at once."""
    return list(await asyncio.gather(*(check_provider(config, name) for name in config.providers)))


def render(reports: list[Report]) -> str:
    lines = ["online:"]
    for r in reports:
        if r.status == "skipped":
            lines.append(f"  {r.provider:<14} skipped: {r.detail}")
            continue
        if r.status != "ok":
            lines.append(f"  {r.provider:<14} {r.status.upper()}: {r.detail} ({r.latency_ms:g} ms)")
            continue
        verdict = "key accepted" if not r.missing else "key accepted; NOT LISTED: " + ", ".join(r.missing)
        lines.append(f"  {r.provider:<14} {verdict} ({r.listed} models listed, {r.latency_ms:g} ms)")
    problems = sum(r.problem for r in reports)
    lines.append(f"online: {problems} provider(s) with a problem" if problems else "online: OK")
    return "\n".join(lines)
