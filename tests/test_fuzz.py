"""Fuzz every route of the default config (issue 5, item 5): random bodies, headers, keys, ids and queries.

The gateway runs as users run it (`python -m proxy serve` on a free port, a fresh SQLite store, keys made
with `stats-gateway keys create`), every provider pointed at the mock upstreams on 127.0.0.1 (served from a
background thread), and hypothesis drives a plain `http.client` against it. For every answer:

- never a 500, and never a traceback or Python exception text in the body;
- every non-2xx answer is JSON in the envelope of its route's family (OpenAI on the inference APIs and the
  catch-all, Anthropic on `/v1/messages`, `{"ok": false, "error", "message"}` on the platform and catalogue
  APIs), with a human message;
- the gateway keeps serving: a normal request after the fuzzing still works, and its log holds no traceback.

Examples are derandomized (the same inputs on every run) and bounded to keep the module well under a minute.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import yarl
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from proxy.app import build_app
from proxy.config import load_config
from proxy.errors import ANTHROPIC, OPENAI, PLATFORM
from proxy.routing import SURFACES
from tests.conftest import DEFAULT_CONFIG, ROOT, Mock, env_for
from tests.mock_anthropic import AnthropicControl, build_anthropic_mock
from tests.mock_gemini import GeminiControl, build_gemini_mock
from tests.mock_music import UPSTREAM_KEY as SUNO_KEY
from tests.mock_music import MusicControl, build_music_mock
from tests.mock_upstream import MockControl, build_mock
from tests.test_cli import cli

# Hypothesis keeps a cache (unicode tables) on disk: not in the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "stats-gateway-hypothesis")

# FUZZ_EXAMPLES=5000 for a longer hunt; CI runs the default, with the same examples every time.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------------------
# the routes, from the app's own router (default config)

_CONFIG = load_config(DEFAULT_CONFIG, env=env_for(Mock("http://127.0.0.1:9/v1", MockControl()), "sqlite:///:memory:"))
MODEL_IDS = sorted(_CONFIG.models)
LINE_LIMIT = _CONFIG.server.max_header_bytes  # aiohttp refuses a longer request line or header value
DEFAULT_MODEL = "openai/gpt-4o-mini"
HTML = "html"  # the dashboard's routes: pages and redirects, not an API's envelope


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the router's template, e.g. /v1/keys/{id}
    dialect: str  # the envelope its errors come in
    surface: str = ""


def _routes() -> list[Route]:
    surfaces = {(r.method, r.path): r.surface for r in _CONFIG.routes}
    found = []
    for resource_route in build_app(_CONFIG).router.routes():
        path = resource_route.resource.canonical if resource_route.resource else ""
        if resource_route.method == "*" or "{tail" in path:
            continue  # the catch-all: fuzzed through unknown paths and methods
        surface = surfaces.get((resource_route.method, path), "")
        if path.startswith("/dashboard"):
            dialect = HTML
        elif surface.startswith(("platform.", "catalogue.")):
            dialect = PLATFORM
        elif surface:
            dialect = SURFACES[surface].dialect
        else:
            dialect = ""  # /healthz, /readyz, /metrics: no error envelope, always 200
        found.append(Route(resource_route.method, path, dialect, surface))
    return found


ROUTES = _routes()
API_ROUTES = [r for r in ROUTES if r.dialect and r.dialect != HTML]
INFERENCE_ROUTES = [r for r in API_ROUTES if r.surface and SURFACES[r.surface].endpoint]
ID_ROUTES = [r for r in ROUTES if "{" in r.path]
assert {r.surface for r in API_ROUTES} == {r.surface for r in _CONFIG.routes}, "a configured route was not found"
assert ID_ROUTES, "no route with a path parameter in the default config"

# ---------------------------------------------------------------------------------------------------------
# the gateway as users run it, and the mock upstreams behind it


def _resilient(error: Callable[[str], dict]) -> Callable:
    """A mock that trips over a fuzzed body answers 400 in its provider's shape (a real provider would not
    answer 500 to a malformed request, and an upstream 500 passes through the gateway as it came)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:  # any failure of the mock itself
            return web.json_response(error("the mock provider cannot read this request"), status=400)

    return middleware


def _openai_error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None, "param": None}}


def _anthropic_error(message: str) -> dict:
    return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def _gemini_error(message: str) -> dict:
    return {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}


def _suno_error(message: str) -> dict:
    return {"code": 400, "msg": message, "data": None}


class Upstreams:
    """The mock providers, served on 127.0.0.1 by an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-mocks", daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def serve(self, app: web.Application, error: Callable[[str], dict]) -> str:
        app.middlewares.append(_resilient(error))
        return asyncio.run_coroutine_threadsafe(self._start(app), self.loop).result(10)

    async def _start(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Gateway:
    host: str
    port: int
    proc: subprocess.Popen
    log: Path
    keys: dict[str, str]  # kind → full key
    victim: str = ""  # a key id of the team that PATCH/DELETE may change (never the keys the fuzz uses)
    generation: str = ""  # a request id with a generation record
    seen: dict[int, int] = field(default_factory=dict)  # status → count, for the report

    def call(
        self, method: str, target: str, body: bytes | None = None, headers: list[tuple[str, bytes]] = ()
    ) -> Answer:
        """One request on a fresh connection, with exactly these headers (no defaults but Host)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            self.seen[resp.status] = self.seen.get(resp.status, 0) + 1
            return Answer(resp.status, resp.headers, data)
        finally:
            conn.close()


def _wait_listening(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"listening on http://(\S+)", log.read_text())
        if match:
            return match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the gateway did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fuzz")
    mocks = Upstreams()
    try:
        openai_url = mocks.serve(build_mock(MockControl()), _openai_error) + "/v1"
        claude_url = mocks.serve(build_anthropic_mock(AnthropicControl()), _anthropic_error)
        gemini_url = mocks.serve(build_gemini_mock(GeminiControl()), _gemini_error)
        suno_url = mocks.serve(build_music_mock(MusicControl()), _suno_error)
        compatible = {f"{p}_BASE_URL": openai_url for p in ("GROQ", "DEEPSEEK", "MISTRAL", "XAI", "OLLAMA", "COHERE")}
        env = env_for(
            Mock(openai_url, MockControl()),
            f"sqlite:///{tmp}/gateway.db",
            ANTHROPIC_BASE_URL=claude_url,
            ANTHROPIC_API_KEY="sk-ant-upstream",
            GEMINI_BASE_URL=gemini_url,
            GEMINI_API_KEY="gem-upstream",
            SUNO_BASE_URL=suno_url,
            SUNO_API_KEY=SUNO_KEY,
            GATEWAY_LOG_LEVEL="INFO",
            **compatible,
        )
        # Every base URL the config can use is local: nothing the fuzz sends can reach the internet.
        config = load_config(DEFAULT_CONFIG, env=env)
        assert all(p.base_url.startswith("http://127.0.0.1:") for p in config.providers.values())

        def create(*args: str) -> str:
            out = cli(env, "keys", "create", "--config", str(DEFAULT_CONFIG), *args).stdout
            return out.strip().splitlines()[-1]

        keys = {
            "inference": create("--team", "acme", "--credit", "1000"),
            "management": create("--team", "acme", "--management"),
            "broke": create("--team", "broke"),  # a team with an empty wallet: 402
            "revoked": create("--team", "acme"),
        }
        victim = create("--team", "acme", "--name", "victim").split("_")[3]
        cli(env, "keys", "revoke", "--config", str(DEFAULT_CONFIG), keys["revoked"].split("_")[3])

        log = tmp / "gateway.log"
        serve = [sys.executable, "-m", "proxy", "serve", "--config", str(DEFAULT_CONFIG)]
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [*serve, "--host", "127.0.0.1", "--port", "0"],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=sink,
            )
        try:
            host, _, port = _wait_listening(proc, log).partition(":")
            gw = Gateway(host, int(port), proc, log, keys, victim)
            for _ in range(200):
                try:
                    if gw.call("GET", "/readyz").status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            first = gw.call("POST", "/v1/chat/completions", _chat(), _auth(keys["inference"]))
            assert first.status == 200, first.body
            gw.generation = first.headers["x-request-id"]
            yield gw
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        mocks.close()


def _chat(**extra: Any) -> bytes:
    return orjson.dumps({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], **extra})


def _auth(key: str) -> list[tuple[str, bytes]]:
    return [("Authorization", f"Bearer {key}".encode()), ("Content-Type", b"application/json")]


# ---------------------------------------------------------------------------------------------------------
# what every answer must be

# Python's own words: a handler that let an exception through, or rendered str(exception) of a bug.
EXCEPTION_TEXT = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|\b(Key|Type|Attribute|Index|Value|Name|"
    r"Unicode(En|De)code|Recursion|Overflow|Assertion|Runtime|ZeroDivision|NotImplemented|Lookup)Error\b|"
    r"NoneType|object has no attribute|is not subscriptable|not JSON serializable|<class '|codec can't"
)


def _human(message: Any) -> bool:
    return isinstance(message, str) and len(message.split()) >= 2


def check(answer: Answer, dialect: str, what: str, *, head: bool = False) -> None:
    """The invariants of every answer; `dialect` is the envelope its route's errors use."""
    where = f"{what} → {answer.status} {answer.body[:600]!r}"
    assert answer.status != 500, where
    text = answer.body.decode("utf-8", "replace")
    assert not EXCEPTION_TEXT.search(text), where
    if dialect == HTML:  # a page, a redirect (to sign in), or a refusal; its headers say it is not framed
        assert answer.status in (200, 303, 400, 401, 404, 405, 413, 429), where
        if answer.status in (200, 303, 401, 429):
            assert answer.headers.get("X-Frame-Options") == "DENY", where
        return
    if answer.status < 300 or head:
        return
    assert answer.headers.get("x-request-id"), where
    assert answer.headers.get("Content-Type", "").startswith("application/json"), where
    try:
        data = answer.json
    except ValueError:
        raise AssertionError(f"not JSON: {where}") from None
    assert isinstance(data, dict), where
    if dialect == PLATFORM:
        assert data.get("ok") is False and isinstance(data.get("error"), str), where
        assert _human(data.get("message")), where
    elif dialect == ANTHROPIC:
        error = data.get("error")
        assert data.get("type") == "error" and isinstance(error, dict), where
        assert isinstance(error.get("type"), str) and _human(error.get("message")), where
    else:
        error = data.get("error")
        assert isinstance(error, dict) and isinstance(error.get("type"), str), where
        assert _human(error.get("message")), where


# ---------------------------------------------------------------------------------------------------------
# strategies

NASTY_NUMBERS = [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**300), 0, -1]
NASTY_FLOATS = [1e308, -1e308, 5e-324, -0.0, 0.1, 1.5]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from(NASTY_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(NASTY_FLOATS),
    st.text(max_size=30),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),  # lone surrogates
    st.text(st.characters(min_codepoint=0x10000), max_size=5),  # astral planes
)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


json_values = st.recursive(scalars, _containers, max_leaves=12)


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A value nested far deeper than any API needs (still encodable by Python's json)."""
    depth = draw(st.sampled_from([64, 200, 900]))
    leaf: Any = draw(scalars)
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"a": leaf}
    return leaf


model_names = st.one_of(
    st.sampled_from(MODEL_IDS),
    st.sampled_from([m.partition("/")[2] for m in MODEL_IDS] + ["claude-haiku-4-5", "gpt-4o-mini", ""]),
    st.text(max_size=20),
)
text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
image_parts = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries(
            {"url": st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://127.0.0.1/x.png", "data:,"])}
        ),
    }
)
content = st.one_of(st.text(max_size=30), st.lists(text_parts | image_parts | json_values, max_size=3), json_values)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(max_size=8),
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=8), "arguments": st.text(max_size=20) | st.just('{"city": "Paris"}')}
            ),
        }
    ),
    max_size=2,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | st.text(max_size=8)},
        optional={"content": content, "tool_calls": tool_calls | json_values, "tool_call_id": st.text(max_size=8)},
    ),
    max_size=4,
)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "web_search", "custom"]),
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=10)}, optional={"parameters": json_values, "description": st.text()}
            ),
        },
    )
    | json_values,
    max_size=3,
)
responses_input = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system"]), "content": content},
            optional={"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"])},
        ),
        max_size=3,
    ),
)


def _either(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a well-typed value; often the wrong type."""
    return st.one_of(valid, valid, json_values)


# Known fields of every API, each well-typed or not: enough of them valid to reach the upstream (the mocks).
FIELDS: dict[str, st.SearchStrategy] = {
    "model": _either(model_names),
    "messages": _either(messages),
    "input": _either(responses_input),
    "stream": _either(st.booleans()),
    "stream_options": _either(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "max_tokens": _either(st.integers(min_value=-5, max_value=10**20)),
    "max_completion_tokens": _either(st.integers(min_value=-5, max_value=10**20)),
    "max_output_tokens": _either(st.integers(min_value=-5, max_value=10**20)),
    "temperature": _either(st.floats(-5, 5)),
    "top_p": _either(st.floats(-1, 2)),
    "stop": _either(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5)),
    "n": _either(st.integers(-1, 5)),
    "seed": _either(st.sampled_from(NASTY_NUMBERS)),
    "tools": _either(tools),
    "tool_choice": _either(st.sampled_from(["auto", "none", "required", "any"]) | json_values),
    "parallel_tool_calls": _either(st.booleans()),
    "response_format": _either(st.sampled_from([{"type": "json_object"}, {"type": "text"}]) | json_values),
    "reasoning_effort": _either(st.sampled_from(["low", "medium", "high", "minimal"])),
    "system": _either(st.text(max_size=20) | st.lists(text_parts, max_size=2)),
    "instructions": _either(st.text(max_size=20)),
    "thinking": _either(st.fixed_dictionaries({"type": st.just("enabled"), "budget_tokens": st.integers()})),
    "meta": _either(st.booleans()),
    "usage": json_values,
    "debug": _either(st.fixed_dictionaries({}, optional={"return_upstream_response": st.booleans()})),
    "echo_upstream_request": _either(st.booleans()),
    "provider": json_values,
    "session_id": json_values,
    "user": json_values,
    "metadata": json_values,
    # the platform APIs' fields
    "name": _either(st.text(max_size=20)),
    "management": _either(st.booleans()),
    "status": _either(st.sampled_from(["active", "disabled", "revoked"])),
    "allowed_models": _either(st.lists(model_names, max_size=3)),
    "daily_limit_cost_nanos": _either(st.sampled_from(NASTY_NUMBERS) | st.integers()),
    "monthly_limit_cost_nanos": _either(st.sampled_from(NASTY_NUMBERS) | st.integers()),
    "usage_": st.fixed_dictionaries(
        {},
        optional={
            k: _either(st.sampled_from(NASTY_NUMBERS) | st.integers())
            for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens")
        },
    ),
}
known_fields = st.fixed_dictionaries({}, optional=FIELDS).map(
    lambda d: {("usage" if k == "usage_" else k): v for k, v in d.items()}
)

objects = st.one_of(
    known_fields,
    st.builds(lambda a, b: {**b, **a}, known_fields, st.dictionaries(st.text(max_size=10), json_values, max_size=3)),
)

INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80"]


def _encode(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii escapes lone surrogates as \udXXX; without it they become CESU-8 bytes (invalid UTF-8)
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# A model of each provider kind (and a local one): a request that fits goes through each translator.
TEXT_MODELS = [
    DEFAULT_MODEL,
    "anthropic/claude-haiku-4.5",
    "google/gemini-2.5-flash",
    "groq/llama-3.1-8b-instant",
    "ollama/llama3.2",
    "claude-sonnet-4-5",
]
HI = [{"role": "user", "content": "hi"}]


def fitting(surface: str, model: str = DEFAULT_MODEL) -> dict | None:
    """A body the route takes, or None for a route that reads none."""
    return {
        "openai.chat": {"model": model, "messages": HI},
        "openai.responses": {"model": model, "input": "hi"},
        "anthropic.messages": {"model": model, "max_tokens": 16, "messages": HI},
        "openai.embeddings": {"model": "openai/text-embedding-3-small", "input": "hi"},
        "openai.moderations": {"input": "hi"},
        "platform.pricing_calculate": {"model": model, "usage": {"prompt_tokens": 10}},
        "platform.keys_create": {"name": "fuzz"},
        "platform.keys_update": {"name": "victim"},
    }.get(surface)


@st.composite
def mutated(draw: st.DrawFn, surface: str) -> dict:
    """A body that fits the route, with one to three known fields set to anything (or removed)."""
    value = dict(fitting(surface, draw(st.sampled_from(TEXT_MODELS))) or {})
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True)):
        real = "usage" if name == "usage_" else name
        if real in value and draw(st.integers(0, 4)) == 0:
            del value[real]
        else:
            value[real] = draw(FIELDS[name])
    return value


# Sampled uniformly: a fitting body with a few fields changed is the likeliest way into the deep code.
BODY_KINDS = (
    "mutated",
    "mutated",
    "mutated",
    "object",
    "object",
    "value",
    "nested",
    "truncated",
    "bytes",
    "utf8",
    "raw",
)


@st.composite
def bodies(draw: st.DrawFn, surface: str = "") -> bytes:
    """A request body: JSON (well-formed or not, of the right shape or not), or bytes that are not JSON."""
    kind = draw(st.sampled_from(BODY_KINDS))
    if kind == "mutated":
        return _encode(draw(mutated(surface)), draw(st.booleans()))
    if kind == "object":
        return _encode(draw(objects), draw(st.booleans()))
    if kind == "value":
        return _encode(draw(json_values), draw(st.booleans()))
    if kind == "nested":
        where = draw(st.sampled_from(["", "messages", "input", "tools", "model", "usage", "name"]))
        value = draw(nested())
        return _encode({"model": DEFAULT_MODEL, where: value} if where else value, True)
    if kind == "truncated":
        whole = _encode(draw(objects), draw(st.booleans()))
        return whole[: draw(st.integers(0, max(len(whole) - 1, 0)))]
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "utf8":  # a body that is JSON but for invalid UTF-8 inside its strings
        bad = draw(st.sampled_from(INVALID_UTF8)) + draw(st.binary(max_size=4))
        where = draw(st.sampled_from(["model", "content", "key"]))
        value = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "@@"}], "name": "@@"}
        if where == "model":
            value["model"] = "@@"
        elif where == "key":
            value["@@"] = 1
        return _encode(value, True).replace(b"@@", bad)
    return draw(
        st.sampled_from(
            [
                b"",
                b"null",
                b"[]",
                b"{}",
                b"NaN",
                b'{"model": NaN}',
                b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}",
                b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
                b'{"model": "a", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
                b"\xef\xbb\xbf" + _chat(),
                b"\x00" * 64,
                b"[" * 100_000,
                b'{"a":' * 50_000,
                b" " * 1000 + _chat() + b" " * 1000,
                _chat() + b"garbage",
                b'"' + b"x" * 100_000 + b'"',
            ]
        )
    )


CONTENT_TYPES = [
    None,
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/json; charset=latin-1",
    b"application/json; charset=utf-16",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=xyz",
    b"application/octet-stream",
    b"",
    b";;;",
    b"\xff\xfe",
]
FIELD_BYTES = [0x09, *range(0x20, 0x7F), *range(0x80, 0x100)]  # field-content: VCHAR, SP, HTAB, obs-text
field_values = st.lists(st.sampled_from(FIELD_BYTES), max_size=40).map(lambda b: bytes(b).strip(b" \t"))
content_types = st.sampled_from(CONTENT_TYPES) | field_values

KEY_KINDS = ["inference", "management", "broke", "revoked", "none", "junk", "malformed", "unknown", "basic", "empty"]


BAD_KEYS = {"junk": "not-a-key", "malformed": "aistats_v1_sk_", "unknown": "aistats_v1_sk_000000000000_" + "x" * 43}


def _credentials(served: Gateway, kind: str, where: str) -> list[tuple[str, bytes]]:
    """Headers carrying a key of `kind` (`where`: as `Authorization: Bearer` or as `x-api-key`): a real one
    of the fixture (good, broke or revoked), or one of the ways a key is bad."""
    if kind == "none":
        return []
    if kind == "basic":
        return [("Authorization", b"Basic dXNlcjpwYXNz")]
    value = "" if kind == "empty" else BAD_KEYS.get(kind) or served.keys[kind]
    if where == "x-api-key":
        return [("x-api-key", value.encode())]
    return [("Authorization", f"Bearer {value}".encode())]


key_kinds = st.sampled_from(KEY_KINDS)
key_places = st.sampled_from(["authorization", "x-api-key"])

# Header names HTTP allows (tokens), minus those that frame the message or the connection, and
# Content-Encoding (aiohttp decodes the body itself: see test_a_body_that_does_not_match_its_content_*).
TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = {"content-length", "transfer-encoding", "connection", "host", "expect", "upgrade", "te", "trailer"}
FRAMING |= {"content-encoding"}
header_names = st.one_of(
    st.sampled_from(
        [
            "Authorization",
            "x-api-key",
            "Content-Type",
            "Accept",
            "Accept-Encoding",
            "anthropic-version",
            "anthropic-beta",
            "x-request-id",
            "OpenAI-Organization",
            "User-Agent",
            "Cookie",
            "X-Forwarded-For",
            "Origin",
            "Range",
            "If-None-Match",
            "Idempotency-Key",
        ]
    ),
    st.text(TOKEN, min_size=1, max_size=30),
).filter(lambda name: name.lower() not in FRAMING)
header_values = st.one_of(
    st.binary(max_size=0),
    field_values,
    st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"Bearer", b"Bearer  ", b"\xff\xfe\xfd", b"%00"]),
    st.integers(1000, LINE_LIMIT - 100).map(lambda n: b"A" * n),  # huge, within server.max_header_bytes
)
# Each name once: a repeated Content-Type, User-Agent, … is a malformed message (aiohttp refuses it, in
# plain text, before any handler runs).
random_headers = st.lists(st.tuples(header_names, header_values), max_size=6, unique_by=lambda h: h[0].lower())

# Query strings: the parameters the APIs read, and anything else; values percent-encoded or raw.
QUERY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#")
QUERY_NAMES = ["id", "limit", "offset", "from", "to", "model", "key", "endpoints", "provider", "organisation"]
QUERY_NAMES += ["input_types", "output_types", "params", "status", "availability", "alt", "stream"]
query_names = st.sampled_from(QUERY_NAMES) | st.text(max_size=8)
query_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1", "250", "251", "1e3", "0x10", " 5", "\uff11\uff10", "9" * 30, "9" * 4400]),
    st.sampled_from(["2024-02-30", "0001-01-01", "9999-12-31", "2024-W01-1", "20240101", "generation"]),
    st.sampled_from(MODEL_IDS),
)


@st.composite
def queries(draw: st.DrawFn) -> str:
    parts = []
    for name, value in draw(st.lists(st.tuples(query_names, query_values), max_size=5)):
        if value == "generation":
            value = "{generation}"  # the fixture's real request id, filled in at send time
        parts.append(quote(name, safe="") + "=" + quote(value, safe="{}"))
    if draw(st.booleans()):  # raw junk: bad percent escapes, encoded invalid UTF-8, empty pairs
        parts.append(draw(st.sampled_from(["%", "%zz", "%FF%FE", "id=%ED%A0%80", "&&", "=", "a=b=c", "%00"])))
        parts.append(draw(st.text(QUERY_SAFE, max_size=20)))
    while len("&".join(parts)) > min(5000, LINE_LIMIT - 3000):  # the request line stays within the limit
        parts.pop(0)
    return "&".join(parts)


path_ids = st.one_of(
    st.just("{victim}"),  # a real key of the team (the fuzz may rename, limit, disable or revoke it)
    st.just("{other}"),  # a real key of another team: out of reach (404)
    st.text("0123456789abcdef", min_size=1, max_size=24),
    st.text(min_size=1, max_size=40).map(lambda t: quote(t, safe="")),
    st.sampled_from(["%00", "%FF", "%ED%A0%80", "..", "%2e%2e", "x" * 2000, "%20", "null", "-1", "9" * 40]),
)


def _fill(served: Gateway, path: str, ident: str) -> str:
    ident = ident.replace("{victim}", served.victim).replace("{other}", served.keys["broke"].split("_")[3])
    return path.replace("{id}", ident)


def _fitting(route: Route) -> bytes | None:
    """The body of a route's request in the tests that fuzz everything else."""
    value = fitting(route.surface)
    if value is None:
        return b"" if route.method in ("POST", "PATCH") else None
    return orjson.dumps(value)


# ERROR records the gateway may log while fuzzed: aiohttp's own log lines for a body it could not decode
# (it logs that once more after the answer, when it drains the connection). A request aiohttp cannot parse
# at all is logged at INFO without a traceback (proxy.app.quiet_malformed_requests).
KNOWN_LOG_RECORDS = re.compile(r"RequestPayloadError|ContentEncodingError")
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) ", re.MULTILINE)


def unexpected_log_records(log: str) -> list[str]:
    """The gateway's log records at ERROR or above, or with a traceback, that no known bug explains."""
    starts = sorted({0, *(m.start() for m in LOG_RECORD.finditer(log)), len(log)})
    unexpected = []
    for record in (log[a:b] for a, b in itertools.pairwise(starts)):
        head = LOG_RECORD.match(record)
        serious = (head is not None and head["level"] in ("ERROR", "CRITICAL")) or "Traceback" in record
        if serious and not KNOWN_LOG_RECORDS.search(record):
            unexpected.append(record)
    return unexpected


def send(served: Gateway, route: Route, target: str, body: bytes | None, headers: list, what: str) -> Answer:
    answer = served.call(route.method, target, body, headers)
    check(answer, route.dialect or OPENAI, what, head=route.method == "HEAD")
    return answer


ROUTE = {(r.method, r.path): r for r in ROUTES}
CHAT_ROUTE = ROUTE["POST", "/v1/chat/completions"]
MESSAGES_ROUTE = ROUTE["POST", "/v1/messages"]
KEYS_CREATE = ROUTE["POST", "/v1/keys"]
KEYS_UPDATE = ROUTE["PATCH", "/v1/keys/{id}"]
CALCULATE = ROUTE["POST", "/v1/pricing/calculate"]
ACTIVITY = ROUTE["GET", "/v1/activity"]


def _route_for(method: str, target: str) -> Route:
    """The route aiohttp serves `method target` with (matching as it does, on `path_safe`), or the catch-all."""
    path = yarl.URL(target).path_safe
    for route in ROUTES:
        if route.method == method and re.fullmatch(re.sub(r"\{[^}]+\}", "[^{}/]+", route.path), path):
            return route
    return Route(method, path, OPENAI)


# ---------------------------------------------------------------------------------------------------------
# the fuzz

# Mostly a good key (the management key may use every route), else one of the ways a key is bad.
some_keys = st.sampled_from(["management"] * 6 + ["inference"] * 2 + KEY_KINDS)


# (route, body): the bodies that fit a route are drawn for it.
BODY_ROUTES = [r for r in API_ROUTES if r.method in ("POST", "PATCH")]  # the routes that read a body
cases = (st.sampled_from(BODY_ROUTES) | st.sampled_from(BODY_ROUTES) | st.sampled_from(API_ROUTES)).flatmap(
    lambda route: st.tuples(st.just(route), bodies(route.surface))
)
NASTY_BODIES = [
    (CHAT_ROUTE, b"", None, "inference"),
    (CHAT_ROUTE, b"[" * 100_000, b"application/json", "inference"),
    (MESSAGES_ROUTE, b'{"model": 1e999, "messages": {}}', None, "inference"),
    (
        ROUTE["POST", "/v1/responses"],
        b'{"model": "gpt-4o-mini", "input": [{"role": "user", "content": 7}]}',
        None,
        "inference",
    ),
    (ROUTE["POST", "/v1/embeddings"], b'{"model": "openai/gpt-4o-mini", "input": "\\udc80"}', None, "broke"),
    (KEYS_CREATE, b'{"name": "\xff"}', None, "management"),
    (KEYS_CREATE, b'{"daily_limit_cost_nanos": 18446744073709551615}', None, "management"),
    (KEYS_UPDATE, b'{"monthly_limit_cost_nanos": 9223372036854775808}', None, "management"),
    (CALCULATE, b'{"model": "\xed\xa0\x80", "usage": {}}', b"text/plain", "broke"),
    (
        CALCULATE,
        b'{"model": "openai/gpt-4o-mini", "usage": {"prompt_tokens": 1' + b"0" * 400 + b"}}",
        None,
        "inference",
    ),
]


def _nasty_bodies(test):
    for route, body, content_type, key in NASTY_BODIES:
        test = example(case=(route, body), content_type=content_type, key=key, place="authorization")(test)
    return test


@FUZZ
@given(case=cases, content_type=content_types, key=some_keys, place=key_places)
@_nasty_bodies
def test_random_bodies(served: Gateway, case: tuple[Route, bytes], content_type: bytes | None, key: str, place: str):
    """Random JSON, fitting bodies with wrong types for known fields, deep nesting, huge numbers, lone
    surrogates, invalid UTF-8, truncated JSON and bytes, under any Content-Type, on every route, with good
    keys and bad."""
    route, body = case
    target = _fill(served, route.path, "{victim}")
    headers = _credentials(served, key, place)
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    send(served, route, target, body, headers, f"{route.method} {target} key={key} body={body[:300]!r}")


@FUZZ
@given(route=st.sampled_from(ROUTES), headers=random_headers, key=some_keys, place=key_places)
@example(route=ROUTE["GET", "/v1/key"], headers=[], key="none", place="authorization")
@example(
    route=ROUTE["GET", "/v1/models"],
    headers=[("Authorization", b"Bearer aistats_v1_sk_\xff\xfe_" + b"a" * 40)],
    key="none",
    place="authorization",
)
@example(
    route=CHAT_ROUTE,
    headers=[("x-api-key", b"aistats_v1_sk_000000000000_\xc3\x28" + b"a" * 40)],
    key="none",
    place="authorization",
)
@example(
    route=MESSAGES_ROUTE,
    headers=[("anthropic-version", b"A" * 8000), ("Cookie", b"\xff" * 100)],
    key="inference",
    place="x-api-key",
)
def test_random_headers(served: Gateway, route: Route, headers: list[tuple[str, bytes]], key: str, place: str):
    """Any header names and values HTTP allows (obs-text, empty, huge), next to good keys and bad, on every
    route with a body that fits it."""
    target = _fill(served, route.path, "{victim}")
    sent = [*_credentials(served, key, place), *headers]
    if not any(name.lower() == "content-type" for name, _ in sent):
        sent.append(("Content-Type", b"application/json"))
    send(served, route, target, _fitting(route), sent, f"{route.method} {target} key={key} headers={sent!r:.600}")


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    query=queries(),
    ident=path_ids,
    key=st.sampled_from(["management", "management", "inference"]) | key_kinds,
)
@example(route=ACTIVITY, query="offset=99999999999999999999", ident="{victim}", key="management")
@example(route=ACTIVITY, query="from=0001-01-01&to=9999-12-31&model=%ED%A0%80", ident="{victim}", key="management")
@example(route=ROUTE["GET", "/v1/generations"], query="id=%FF%FE", ident="{victim}", key="inference")
@example(route=ROUTE["GET", "/v1/generations"], query="id={generation}", ident="{victim}", key="inference")
@example(
    route=ROUTE["GET", "/v1/gateway/models"], query="limit=251&availability=%00", ident="{victim}", key="inference"
)
@example(route=KEYS_UPDATE, query="", ident="%ED%A0%80", key="management")
@example(route=ROUTE["DELETE", "/v1/keys/{id}"], query="", ident="{other}", key="management")
def test_queries_and_path_ids(served: Gateway, route: Route, query: str, ident: str, key: str):
    """Query strings (the parameters the APIs read, junk and bad percent escapes) and path ids (real keys of
    the team and of another, random, encoded, huge) on every route."""
    target = _fill(served, route.path, ident) + ("?" + query.replace("{generation}", served.generation))
    routed = _route_for(route.method, target)  # an id with braces is no id: the catch-all answers
    sent = _credentials(served, key, "authorization")
    send(served, routed, target, _fitting(route), sent, f"{route.method} {target}")


# Methods llhttp (aiohttp's parser) knows: any other is refused before routing (test_http_level_refusals_*).
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "PURGE", "SEARCH"]
PATHS = [
    "/",
    "//",
    "/v1",
    "/v1/",
    "/V1/KEY",
    "/v1/key/",
    "/v1//key",
    "/v1/keys/a/b",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/v1/..%2fkey",
    "/v1/%6Bey",
    "/" + "a" * 4000,
    "/v1/chat/completions%00",
]
paths = st.one_of(
    st.sampled_from([r.path.replace("{id}", "abc") for r in ROUTES] + PATHS),
    st.lists(st.text(min_size=1, max_size=12).map(lambda t: quote(t, safe="")), min_size=1, max_size=4).map(
        lambda parts: "/" + "/".join(parts)
    ),
)


@FUZZ
@given(method=st.sampled_from(METHODS), target=paths, key=some_keys)
@example(method="HEAD", target="/v1/models", key="inference")
@example(method="PUT", target="/v1/keys", key="management")
def test_methods_and_paths(served: Gateway, method: str, target: str, key: str):
    """Every method on known paths and unknown ones: 404 and 405 in the envelope, the rest as routed."""
    route = _route_for(method, target)
    body = _fitting(route) if method not in ("GET", "HEAD", "OPTIONS", "TRACE") else None
    send(served, route, target, body, _credentials(served, key, "authorization"), f"{method} {target} key={key}")


# ---------------------------------------------------------------------------------------------------------
# regressions found by the fuzz, and what aiohttp refuses before any handler runs (strict xfail: open)


@pytest.mark.parametrize("route", [KEYS_CREATE, CHAT_ROUTE], ids=["platform", "inference"])
def test_a_body_that_does_not_match_its_content_encoding_is_a_400(served: Gateway, route: Route) -> None:
    headers = [*_auth(served.keys["management"]), ("Content-Encoding", b"gzip")]
    answer = served.call(route.method, route.path, _fitting(route), headers)
    check(answer, route.dialect, "a body that is not gzip")
    assert answer.status == 400


def test_a_gzip_body_is_read(served: Gateway) -> None:
    headers = [*_auth(served.keys["inference"]), ("Content-Encoding", b"gzip")]
    answer = served.call("POST", "/v1/chat/completions", gzip.compress(_chat()), headers)
    assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (CHAT_ROUTE, b'{"model": "\xff", "messages": [{"role": "user", "content": "hi"}]}'),
        (CHAT_ROUTE, b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "\xff": 1}'),
        (
            MESSAGES_ROUTE,
            b'{"model": "openai/gpt-4o-mini", "max_tokens": 9, "messages": [{"role": "user", "content": "\xff"}]}',
        ),
    ],
    ids=["model", "member-name", "messages-to-openai"],
)
def test_invalid_utf8_in_a_body_is_a_400(served: Gateway, route: Route, body: bytes) -> None:
    answer = served.call(route.method, route.path, body, _auth(served.keys["inference"]))
    check(answer, route.dialect, f"invalid UTF-8 in {body!r}")
    assert answer.status == 400


@pytest.mark.xfail(strict=True, reason="reported: aiohttp refuses these in plain text before any handler runs")
@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/v1/key", [("X-Big", b"A" * (LINE_LIMIT + 1))]),  # a field value over server.max_header_bytes
        ("GET", "/v1/key?" + "a" * LINE_LIMIT, []),  # a request line over it
        ("FOO", "/v1/key", []),  # a method token llhttp does not know
        ("POST", "/v1/keys", [("Content-Encoding", b"br")]),  # brotli, not installed
        ("OPTIONS", "*", []),  # the asterisk form: no route, not even the catch-all
        ("POST", "/v1/keys", [("Expect", b"bogus")]),  # an expectation aiohttp does not know: 417
    ],
    ids=["huge-header", "huge-request-line", "unknown-method", "brotli", "asterisk", "expect"],
)
def test_http_level_refusals_are_enveloped(served: Gateway, method: str, target: str, headers: list) -> None:
    answer = served.call(method, target, b"{}", [*_auth(served.keys["management"]), *headers])
    check(answer, _route_for(method, target).dialect or OPENAI, f"{method} {target:.40} {headers!r:.80}")


def test_a_newline_in_the_path_is_a_404_in_the_envelope(served: Gateway) -> None:
    answer = served.call("GET", "/v1/%0A", None, _auth(served.keys["inference"]))
    check(answer, OPENAI, "a newline in the path")
    assert answer.status == 404


def test_still_serves(served: Gateway) -> None:
    """After the fuzz: a normal request works, the process is up, and it logged no unexpected error."""
    answer = served.call("POST", "/v1/chat/completions", _chat(), _auth(served.keys["inference"]))
    assert answer.status == 200 and answer.json["choices"][0]["message"]["content"] == "Hello there!"
    answer = served.call("GET", "/v1/key", None, _auth(served.keys["inference"]))
    assert answer.status == 200 and answer.json["ok"] is True
    assert served.call("GET", "/readyz").status == 200
    assert served.proc.poll() is None
    unexpected = unexpected_log_records(served.log.read_text())
    assert not unexpected, "\n".join(unexpected)[-8000:]
    print(f"\nstatuses: {dict(sorted(served.seen.items()))}")
