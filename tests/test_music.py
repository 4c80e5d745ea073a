"""Music jobs: created on a sunoapi.org-style provider, owned by the team, polled, billed once when done; the
provider's refusals (in an HTTP 200) and failures as the client's errors."""

from __future__ import annotations

import msgspec
import pytest
from aiohttp import web

from proxy.app import build_app
from proxy.config import ConfigError, ModelConfig, load_config
from proxy.gateway import GATEWAY
from proxy.translators.suno import CALLBACK_PLACEHOLDER
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for
from tests.mock_music import DURATIONS, UPSTREAM_KEY, MusicControl, build_music_mock
from tests.test_videos import generations

PER_TASK_NANOS = 60_000_000  # suno/V4_5: $0.06 a generation (config/pricing.yaml)
SECONDS = round(sum(DURATIONS), 3)


@pytest.fixture
async def music(aiohttp_server) -> tuple[str, MusicControl]:
    control = MusicControl()
    server = await aiohttp_server(build_music_mock(control), host="127.0.0.1")
    return str(server.make_url("/")).rstrip("/"), control


def music_env(url: str, store_url: str) -> dict[str, str]:
    mock = Mock(url=url + "/v1", control=None)  # type: ignore[arg-type]  # no OpenAI call is made
    return env_for(mock, store_url, SUNO_BASE_URL=url, SUNO_API_KEY=UPSTREAM_KEY)


@pytest.fixture
async def gateway(aiohttp_client, music, store_url):
    url, _ = music
    return await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=music_env(url, store_url))))


async def create_music(gateway, key: str, **fields) -> dict:
    body = {"model": "suno/V4_5", "prompt": "a calm piano piece for a rainy evening", **fields}
    r = await gateway.post("/v1/music/generate", json=body, headers=auth(key))
    assert r.status == 200, await r.text()
    return await r.json()


async def get_music(gateway, key: str, music_id: str) -> dict:
    r = await gateway.get(f"/v1/music/generate/{music_id}", headers=auth(key))
    assert r.status == 200, await r.text()
    return await r.json()


async def test_a_task_is_created_polled_and_billed_once(gateway, key, music, store_url):
    _, control = music
    made = await create_music(gateway, key)
    assert made["id"].startswith("music_") and len(made["id"]) == len("music_") + 24
    assert {k: v for k, v in made.items() if k not in ("id", "created_at")} == {
        "object": "music",
        "status": "queued",
        "provider": "suno",
        "model": "suno/V4_5",
        "nativeResponseId": "task1",
        "output": [],
    }
    assert control.received[-1] == {  # the upstream model, non-custom mode, the placeholder callback
        "model": "V4_5",
        "prompt": "a calm piano piece for a rainy evening",
        "customMode": False,
        "instrumental": False,
        "style": "",
        "title": "",
        "callBackUrl": CALLBACK_PLACEHOLDER,
    }
    got = await get_music(gateway, key, made["id"])
    assert got["status"] == "in_progress" and got["output"] == [] and "usage" not in got
    assert control.polls == ["task1"]
    control.status["task1"] = "FIRST_SUCCESS"
    got = await get_music(gateway, key, made["id"])
    assert (
        got["status"] == "in_progress" and got["output"][0]["stream_audio_url"] == "https://cdn.example/stream/task1-0"
    )
    control.status["task1"] = "SUCCESS"
    for _ in range(3):  # polled again and again: billed once
        got = await get_music(gateway, key, made["id"])
        assert got["status"] == "completed" and got["id"] == made["id"] and got["created_at"] == made["created_at"]
    assert got["usage"] == {"output_audio_count": 2, "output_audio_seconds": SECONDS}
    assert got["output"][1] == {
        "index": 1,
        "id": "task1-1",
        "audio_url": "https://cdn.example/task1-1.mp3",
        "stream_audio_url": "https://cdn.example/stream/task1-1",
        "image_url": "https://cdn.example/task1-1.jpeg",
        "title": "Peaceful Piano",
        "tags": "calm, piano",
        "duration": DURATIONS[1],
    }
    await gateway.server.app[GATEWAY].accountant.flush()
    rows = await generations(store_url, "acme")
    assert [row[3] for row in rows] == [0, PER_TASK_NANOS]  # the create (free), then the finished task
    assert rows[1][:3] == ("music.generate", "suno/V4_5", "task1")
    assert f'"audio_seconds":{SECONDS}' in rows[1][4]


async def test_custom_mode_fields_are_translated_and_the_rest_passed_on(gateway, key, music):
    _, control = music
    made = await create_music(
        gateway,
        key,
        model="suno/V5",
        lyrics="[Verse] rain on the window",
        title="Rain",
        tags="calm, piano",
        instrumental=True,
        duration=120,
        callback_url="https://client.example/hook",
        negativeTags="metal",
    )
    assert made["model"] == "suno/V5"
    assert control.received[-1] == {
        "model": "V5",
        "prompt": "[Verse] rain on the window",
        "customMode": True,
        "instrumental": True,
        "style": "calm, piano",
        "title": "Rain",
        "callBackUrl": "https://client.example/hook",
        "negativeTags": "metal",
    }


async def test_another_team_gets_404(gateway, key, make_key):
    made = await create_music(gateway, key)
    rival = await make_key(team="rival")
    r = await gateway.get(f"/v1/music/generate/{made['id']}", headers=auth(rival))
    assert r.status == 404 and made["id"] in (await r.json())["error"]["message"]
    for unknown in ("music_0123456789abcdef01234567", "video_0123456789abcdef01234567"):
        assert (await gateway.get(f"/v1/music/generate/{unknown}", headers=auth(key))).status == 404
    assert (await get_music(gateway, key, made["id"]))["id"] == made["id"]


async def test_jobs_survive_a_new_app_on_the_same_store(aiohttp_client, music, store_url, make_key):
    url, control = music
    key = await make_key()
    first = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=music_env(url, store_url))))
    made = await create_music(first, key)
    await first.close()
    second = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=music_env(url, store_url))))
    control.status["task1"] = "SUCCESS"
    got = await get_music(second, key, made["id"])
    assert got["id"] == made["id"] and got["status"] == "completed"


async def test_a_failed_task_shows_the_message_and_bills_nothing(gateway, key, music, store_url):
    _, control = music
    made = await create_music(gateway, key)
    control.status["task1"] = "GENERATE_AUDIO_FAILED"
    control.errors["task1"] = "The audio could not be generated."
    for _ in range(2):
        got = await get_music(gateway, key, made["id"])
        assert got["status"] == "failed" and "usage" not in got
        assert got["error"] == {"code": "GENERATE_AUDIO_FAILED", "message": "The audio could not be generated."}
    control.status["task1"] = "SENSITIVE_WORD_ERROR"
    control.errors.pop("task1")
    assert (await get_music(gateway, key, made["id"]))["error"]["message"] == "SENSITIVE_WORD_ERROR"
    await gateway.server.app[GATEWAY].accountant.flush()
    assert [row[3] for row in await generations(store_url, "acme")] == [0]  # only the creation


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (400, 400, "invalid_request_error"),  # invalid parameters
        (413, 400, "invalid_request_error"),  # prompt too long
        (429, 503, "upstream_error"),  # the provider account's credits, not the client's wallet
        (430, 429, "rate_limit_error"),  # call frequency too high
        (401, 502, "upstream_error"),  # the gateway's key at the provider: not the client's fault
    ],
)
async def test_a_refusal_in_an_http_200_is_its_error(gateway, key, music, code, status, kind):
    _, control = music
    control.refuse = (code, "the provider's reason")
    r = await gateway.post("/v1/music/generate", json={"model": "suno/V4_5", "prompt": "x"}, headers=auth(key))
    error = (await r.json())["error"]
    assert (r.status, error["type"]) == (status, kind) and "the provider's reason" in error["message"]


async def test_bad_requests_and_a_failing_provider(gateway, key, music):
    _, control = music
    r = await gateway.post("/v1/music/generate", json={"prompt": "x"}, headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "model"
    r = await gateway.post("/v1/music/generate", json={"model": "suno/nope", "prompt": "x"}, headers=auth(key))
    assert r.status == 404
    r = await gateway.post("/v1/music/generate", json={"model": "openai/gpt-4o-mini", "prompt": "x"}, headers=auth(key))
    assert r.status in (400, 404) and "music" in (await r.text()).lower()
    r = await gateway.post("/v1/music/generate", json={"model": "suno/V4_5", "prompt": 1}, headers=auth(key))
    assert r.status == 400 and "$.prompt" in (await r.json())["error"]["message"]
    r = await gateway.post("/v1/music/generate", json={"model": "suno/V4_5", "lyrics": "la"}, headers=auth(key))
    assert r.status == 400 and "required parameters" in (await r.json())["error"]["message"]  # the mock's refusal
    assert len(control.received) == 1 and control.received[0]["customMode"] is True and not control.polls
    control.fail_create = 1
    r = await gateway.post("/v1/music/generate", json={"model": "suno/V4_5", "prompt": "x"}, headers=auth(key))
    assert r.status == 502 and "HTTP 500" in (await r.json())["error"]["message"]
    assert (await gateway.post("/v1/music/generate", json={"model": "suno/V4_5", "prompt": "x"})).status == 401
    made = await create_music(gateway, key)
    assert (await gateway.get(f"/v1/music/generate/{made['id']}")).status == 401


async def test_a_wrong_upstream_key_is_a_502(aiohttp_client, music, store_url, key):
    url, _ = music
    env = {**music_env(url, store_url), "SUNO_API_KEY": "sk-wrong"}
    gateway = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))
    r = await gateway.post("/v1/music/generate", json={"model": "suno/V4_5", "prompt": "x"}, headers=auth(key))
    assert r.status == 502 and "access permissions" in (await r.json())["error"]["message"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    endpoints: [music.generate]\n    targets: [{provider: suno, model: V5}]",
            "    targets: [{provider: suno, model: V5}]",
            "chat.completions is served by providers of kind openai, openai-compatible, anthropic, gemini only; "
            "provider 'suno' is suno",
        ),
        (
            "targets: [{provider: suno, model: V5}]",
            "targets: [{provider: anthropic, model: V5}]",
            "music.generate is served by providers of kind suno, openai, openai-compatible only; "
            "provider 'anthropic' is anthropic",
        ),
    ],
)
def test_music_and_suno_providers_go_together(tmp_path, old, new, expected):
    text = DEFAULT_CONFIG.read_text()
    assert text.count(old) == 1
    (tmp_path / "gateway.yaml").write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "gateway.yaml", env={})
    assert e.value.path.startswith("$.models['suno/V5'].endpoints[") and e.value.message == expected


async def test_an_openai_kind_upstream_speaking_this_api_is_passed_through(
    aiohttp_client, aiohttp_server, key, store_url
):
    """Music at an OpenAI-kind provider that serves this same API (another gateway): bodies pass through with
    the model renamed, ids are the gateway's own, and the usage it reports is billed once."""
    seen: list[dict] = []
    state = {"status": "queued"}

    async def create(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer sk-upstream-secret"
        seen.append(await request.json())
        return web.json_response({"id": "music_up1", "object": "music", "status": "queued", "model": "x"})

    async def get(request: web.Request) -> web.Response:
        assert request.match_info["id"] == "music_up1"
        body = {"id": "music_up1", "object": "music", "status": state["status"], "output": []}
        if state["status"] == "completed":
            body["usage"] = {"output_audio_count": 2, "output_audio_seconds": 90.5}
        return web.json_response(body)

    upstream = web.Application()
    upstream.router.add_post("/v1/music/generate", create)
    upstream.router.add_get("/v1/music/generate/{id}", get)
    server = await aiohttp_server(upstream, host="127.0.0.1")
    config = load_config(DEFAULT_CONFIG, env=env_for(Mock(str(server.make_url("/v1")), None), store_url))  # type: ignore[arg-type]
    config.models["relay/music"] = msgspec.convert(
        {"endpoints": ["music.generate"], "targets": [{"provider": "openai", "model": "suno/V5"}]}, ModelConfig
    )
    gateway = await aiohttp_client(build_app(config))
    made = await create_music(gateway, key, model="relay/music")
    assert made["id"].startswith("music_") and made["id"] != "music_up1" and made["model"] == "relay/music"
    assert seen[-1]["model"] == "suno/V5" and seen[-1]["prompt"] == "a calm piano piece for a rainy evening"
    assert (await get_music(gateway, key, made["id"]))["status"] == "queued"
    state["status"] = "completed"
    for _ in range(2):
        done = await get_music(gateway, key, made["id"])
        assert done["status"] == "completed" and done["id"] == made["id"]
    await gateway.server.app[GATEWAY].accountant.flush()
    billed = [row for row in await generations(store_url, "acme") if '"audio_seconds"' in row[4]]
    assert len(billed) == 1 and '"audio_seconds":90.5' in billed[0][4]
