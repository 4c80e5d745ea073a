"""`stats-gateway check-config --online` against mock providers that list, omit and refuse, run as users run it."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from aiohttp import web

from tests.conftest import DEFAULT_CONFIG, ROOT

PAGE = 2  # the mocks' page size, whatever is asked: the check must follow the pages


def build_lists(listed: dict[str, list[str]], seen: list[tuple[str, str, str]]) -> web.Application:
    """OpenAI's, Anthropic's and Gemini's model lists, paged like theirs; `/refuse` answers 401."""

    def key_of(request: web.Request) -> str:
        auth = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return auth or request.headers.get("x-api-key", "") or request.headers.get("x-goog-api-key", "")

    async def openai(request: web.Request) -> web.Response:
        seen.append(("openai", request.path_qs, key_of(request)))
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in listed["openai"]]})

    async def anthropic(request: web.Request) -> web.Response:
        seen.append(("anthropic", request.path_qs, key_of(request)))
        if not request.headers.get("anthropic-version"):
            return web.json_response({"type": "error", "error": {"message": "anthropic-version"}}, status=400)
        models = listed["anthropic"]
        start = models.index(request.query["after_id"]) + 1 if "after_id" in request.query else 0
        page = models[start : start + PAGE]
        more = start + PAGE < len(models)
        return web.json_response(
            {
                "data": [{"id": m, "type": "model"} for m in page],
                "has_more": more,
                "last_id": page[-1] if page else None,
            }
        )

    async def gemini(request: web.Request) -> web.Response:
        seen.append(("gemini", request.path_qs, key_of(request)))
        models = listed["gemini"]
        start = int(request.query.get("pageToken", "0"))
        body: dict = {"models": [{"name": f"models/{m}"} for m in models[start : start + PAGE]]}
        if start + PAGE < len(models):
            body["nextPageToken"] = str(start + PAGE)
        return web.json_response(body)

    async def refuse(request: web.Request) -> web.Response:
        seen.append(("refuse", request.path_qs, key_of(request)))
        message = f"Incorrect API key provided: {key_of(request)}"  # as OpenAI's does (there, masked)
        return web.json_response({"error": {"message": message}}, status=401)

    app = web.Application()
    app.router.add_get("/oai/v1/models", openai)
    app.router.add_get("/claude/v1/models", anthropic)
    app.router.add_get("/google/v1beta/models", gemini)
    app.router.add_get("/refuse/v1/models", refuse)
    return app


def write_config(tmp_path: Path, base: str, *, with_refusing: bool) -> Path:
    refusing = (
        f"  groq: {{kind: openai-compatible, base_url: {base}/refuse/v1, api_key: gsk-bad}}\n" if with_refusing else ""
    )
    text = f"""\
providers:
  openai: {{kind: openai, base_url: {base}/oai/v1, api_key: sk-openai}}
  anthropic: {{kind: anthropic, base_url: {base}/claude, api_key: sk-ant}}
  google: {{kind: gemini, base_url: {base}/google, api_key: AIza-g}}
  keyless: {{kind: openai-compatible, base_url: {base}/oai/v1}}
  suno: {{kind: suno, base_url: {base}/suno, api_key: suno-key}}
{refusing}models:
  openai/gpt-4o-mini: {{targets: [{{provider: openai, model: gpt-4o-mini}}]}}
  openai/sora-2: {{endpoints: [video.generation], targets: [{{provider: openai, model: sora-2}}]}}
  anthropic/claude-sonnet-4.6: {{targets: [{{provider: anthropic, model: claude-sonnet-4-6}}]}}
  google/gemini-2.5-flash: {{targets: [{{provider: google, model: gemini-2.5-flash}}]}}
"""
    (tmp_path / "gateway.yaml").write_text(text)
    shutil.copy(DEFAULT_CONFIG.parent / "pricing.yaml", tmp_path / "pricing.yaml")
    return tmp_path / "gateway.yaml"


async def run_check(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "check-config",
        "--online",
        "--config",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


def line_of(out: str, provider: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"  {provider} ") and "kind=" not in line)


async def test_online_check_reports_keys_missing_models_and_refusals(aiohttp_server, tmp_path: Path) -> None:
    listed = {
        "openai": ["gpt-4o-mini", "gpt-4.1"],  # sora-2 retired
        "anthropic": ["claude-opus-4-7", "claude-haiku-4-5", "claude-sonnet-4-6"],  # on the second page
        "gemini": ["gemini-2.5-pro", "gemini-2.0-flash", "gemini-2.5-flash"],
    }
    seen: list[tuple[str, str, str]] = []
    server = await aiohttp_server(build_lists(listed, seen), host="127.0.0.1")
    code, out = await run_check(write_config(tmp_path, str(server.make_url("")).rstrip("/"), with_refusing=True))
    assert code == 1, out
    assert "key accepted; NOT LISTED: sora-2" in line_of(out, "openai")
    assert "key accepted (3 models listed" in line_of(out, "anthropic")
    assert "key accepted (3 models listed" in line_of(out, "google")
    assert "REFUSED: the key was refused (HTTP 401" in line_of(out, "groq")
    assert "skipped: no api_key set" in line_of(out, "keyless")
    assert "skipped: this kind has no model list" in line_of(out, "suno")
    assert "online: 2 provider(s) with a problem" in out
    assert "gsk-bad" not in out and "sk-ant" not in out  # keys are sent, never shown
    # Each with its own key, pages followed.
    assert {(kind, key) for kind, _, key in seen} == {
        ("openai", "sk-openai"),
        ("anthropic", "sk-ant"),
        ("gemini", "AIza-g"),
        ("refuse", "gsk-bad"),
    }
    assert sum(kind == "anthropic" for kind, _, _ in seen) == 2 and sum(kind == "gemini" for kind, _, _ in seen) == 2


async def test_online_check_passes_when_every_routed_model_is_listed(aiohttp_server, tmp_path: Path) -> None:
    listed = {
        "openai": ["gpt-4o-mini", "sora-2"],
        "anthropic": ["claude-sonnet-4-6"],
        "gemini": ["gemini-2.5-flash"],
    }
    server = await aiohttp_server(build_lists(listed, []), host="127.0.0.1")
    code, out = await run_check(write_config(tmp_path, str(server.make_url("")).rstrip("/"), with_refusing=False))
    assert code == 0 and out.rstrip().endswith("online: OK"), out


async def test_an_unreachable_provider_is_a_problem(tmp_path: Path, unused_tcp_port: int) -> None:
    code, out = await run_check(write_config(tmp_path, f"http://127.0.0.1:{unused_tcp_port}", with_refusing=False))
    assert code == 1 and "UNREACHABLE" in line_of(out, "openai"), out
