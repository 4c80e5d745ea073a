"""Video jobs: created on the provider, owned by the team, polled, billed once when done, downloaded
(ranges, signed links), deleted; cancel answers the structured 501."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import openai
import pytest
from yarl import URL

from proxy.app import build_app
from proxy.config import load_config
from proxy.gateway import GATEWAY
from proxy.store import open_store
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for
from tests.mock_videos import VideoControl, build_video_mock, pattern

SORA_PER_SECOND_NANOS = 100_000_000  # $0.10 a second (`video_config`)
SIGNING_KEY = "test-signing-key"


@pytest.fixture
async def videos(aiohttp_server) -> tuple[Mock, VideoControl]:
    control = VideoControl()
    server = await aiohttp_server(build_video_mock(control), host="127.0.0.1")
    return Mock(url=str(server.make_url("/v1")), control=None), control  # type: ignore[arg-type]


def video_config(folder: Path) -> Path:
    """The shipped config and prices plus a Videos API model (the default catalogue has none since OpenAI
    shut Sora's API down): `openai/sora-2` at $0.10 a second, on the `openai` provider (the mock)."""
    config = DEFAULT_CONFIG.read_text().replace(
        "\nmodels:\n",
        "\nmodels:\n  openai/sora-2: {endpoints: [video.generation], targets: [{provider: openai, model: sora-2}]}\n",
        1,
    )
    prices = (DEFAULT_CONFIG.parent / "pricing.yaml").read_text()
    prices = prices.replace("\nmodels:\n", "\nmodels:\n  openai/sora-2: {per_video_second: 0.10}\n", 1)
    (folder / "gateway.yaml").write_text(config)
    (folder / "pricing.yaml").write_text(prices)
    return folder / "gateway.yaml"


@pytest.fixture
async def gateway(aiohttp_client, videos, store_url, tmp_path: Path):
    mock, _ = videos
    env = env_for(mock, store_url, GATEWAY_URL_SIGNING_KEY=SIGNING_KEY)
    return await aiohttp_client(build_app(load_config(video_config(tmp_path), env=env)))


async def create(gateway, key: str, **fields) -> dict:
    body = {"model": "openai/sora-2", "prompt": "a cat on a skateboard", "seconds": "8", **fields}
    r = await gateway.post("/v1/videos", json=body, headers=auth(key))
    assert r.status == 200, await r.text()
    return await r.json()


async def generations(store_url: str, team: str) -> list[tuple]:
    store = await open_store(store_url)
    try:
        t = await store.get_team(team)
        async with store.db.execute(  # type: ignore[attr-defined]
            "SELECT endpoint, model_id, native_response_id, cost_nanos, usage FROM generations WHERE team_id = ? "
            "ORDER BY created_at",
            (t.id,),  # type: ignore[union-attr]
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]
    finally:
        await store.close()


async def test_a_video_is_created_polled_billed_once_and_downloaded(gateway, key, videos, store_url):
    _, control = videos
    video = await create(gateway, key)
    assert video["id"].startswith("video_") and video["status"] == "queued" and video["object"] == "video"
    assert control.received[-1]["model"] == "sora-2"  # the upstream name, the rest as sent
    assert control.received[-1]["prompt"] == "a cat on a skateboard"
    upstream_id = "video_up1"
    got = await (await gateway.get(f"/v1/videos/{video['id']}", headers=auth(key))).json()
    assert got["id"] == video["id"] and got["status"] == "queued"
    control.status[upstream_id] = "completed"
    for _ in range(3):  # polled again and again: billed once
        got = await (await gateway.get(f"/v1/videos/{video['id']}", headers=auth(key))).json()
        assert got["status"] == "completed" and got["id"] == video["id"]
    r = await gateway.get(f"/v1/videos/{video['id']}/content", headers=auth(key))
    assert r.status == 200 and r.headers["Content-Type"] == "video/mp4"
    assert await r.read() == pattern(0, control.content_bytes)
    await gateway.server.app[GATEWAY].accountant.flush()
    rows = await generations(store_url, "acme")
    assert [row[3] for row in rows] == [0, 8 * SORA_PER_SECOND_NANOS]  # the create, then the video
    assert rows[1][:3] == ("openai.videos", "openai/sora-2", upstream_id)
    assert '"video_seconds":8' in rows[1][4]


async def test_generations_finds_a_video_by_the_id_the_client_holds(gateway, key, videos):
    """`GET /v1/generations?id=video_…` (the gateway's id) and `?id=` the provider's: the create record while
    the video is not done, the billed one after."""
    _, control = videos
    video = await create(gateway, key)
    accountant = gateway.server.app[GATEWAY].accountant

    async def record(wanted: str) -> dict:
        await accountant.flush()
        r = await gateway.get("/v1/generations", params={"id": wanted}, headers=auth(key))
        assert r.status == 200, await r.text()
        return (await r.json())["data"]

    for wanted in (video["id"], "video_up1"):
        created = await record(wanted)
        assert created["native_response_id"] == "video_up1" and created["cost_nanos"] == 0
    control.status["video_up1"] = "completed"
    assert (await (await gateway.get(f"/v1/videos/{video['id']}", headers=auth(key))).json())["status"] == "completed"
    for wanted in (video["id"], "video_up1"):
        billed = await record(wanted)
        assert billed["native_response_id"] == "video_up1" and billed["cost_nanos"] == 8 * SORA_PER_SECOND_NANOS
    assert billed["request_id"] != created["request_id"]


async def test_ranges_are_passed_through(gateway, key, videos):
    _, control = videos
    control.content_bytes = 1_000_000
    video = await create(gateway, key)
    control.status["video_up1"] = "completed"
    r = await gateway.get(f"/v1/videos/{video['id']}/content", headers={**auth(key), "Range": "bytes=1000-1999"})
    assert r.status == 206 and r.headers["Content-Range"] == "bytes 1000-1999/1000000"
    assert await r.read() == pattern(1000, 1000) and control.ranges == ["bytes=1000-1999"]


async def test_a_download_link_works_without_a_key_until_it_expires(gateway, key, videos):
    _, control = videos
    video = await create(gateway, key)
    control.status["video_up1"] = "completed"
    r = await gateway.post(f"/v1/videos/{video['id']}/download_url?expires_in=60", headers=auth(key))
    link = await r.json()
    assert r.status == 200 and abs(link["expires_at"] - (time.time() + 60)) < 5
    url = URL(link["url"])
    assert url.path == f"/v1/videos/{video['id']}/content"
    r = await gateway.get(url.path_qs)  # no key
    assert r.status == 200 and await r.read() == pattern(0, control.content_bytes)
    tampered = url.update_query(expires=str(int(url.query["expires"]) + 3600))
    assert (await gateway.get(tampered.path_qs)).status == 403
    past = int(time.time()) - 1
    message = f"{url.query['team']}\n{video['id']}\n{past}".encode()
    signature = hmac.new(SIGNING_KEY.encode(), message, hashlib.sha256).hexdigest()
    expired = url.update_query(expires=str(past), signature=signature)
    r = await gateway.get(expired.path_qs)
    assert r.status == 403 and "expired" in (await r.json())["error"]["message"]
    assert (await gateway.get(url.path_qs.replace("signature=", "signature=0"))).status == 403
    behind = {**auth(key), "X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.com"}
    r = await gateway.post(f"/v1/videos/{video['id']}/download_url", headers=behind)
    public = URL((await r.json())["url"])
    assert (public.scheme, public.host, public.port, public.path) == ("https", "gw.example.com", 443, url.path)


async def test_another_team_sees_nothing(gateway, key, make_key, videos):
    video = await create(gateway, key)
    rival = await make_key(team="rival")
    for method, path in (
        ("GET", f"/v1/videos/{video['id']}"),
        ("GET", f"/v1/videos/{video['id']}/content"),
        ("POST", f"/v1/videos/{video['id']}/download_url"),
        ("POST", f"/v1/videos/{video['id']}/cancel"),
        ("DELETE", f"/v1/videos/{video['id']}"),
    ):
        r = await gateway.request(method, path, headers=auth(rival))
        assert r.status == 404, (method, path, await r.text())
    listing = await (await gateway.get("/v1/videos", headers=auth(rival))).json()
    assert listing["data"] == [] and listing["has_more"] is False
    mine = await (await gateway.get("/v1/videos", headers=auth(key))).json()
    assert [v["id"] for v in mine["data"]] == [video["id"]]


async def test_listing_pages_newest_first(gateway, key):
    made = [(await create(gateway, key))["id"] for _ in range(5)]
    seen, after = [], ""
    while True:
        page = await (await gateway.get(f"/v1/videos?limit=2&after={after}", headers=auth(key))).json()
        seen += [v["id"] for v in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(made) and len(seen) == 5
    r = await gateway.get("/v1/videos?limit=0", headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "limit"


async def test_cancel_answers_the_structured_501_and_delete_removes_it(gateway, key, videos):
    _, control = videos
    video = await create(gateway, key)
    r = await gateway.post(f"/v1/videos/{video['id']}/cancel", headers=auth(key))
    body = await r.json()
    assert r.status == 501 and body["status_code"] == 501 and body["error"] == "not_implemented_yet"
    r = await gateway.delete(f"/v1/videos/{video['id']}", headers=auth(key))
    assert r.status == 200 and (await r.json()) == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert control.deleted == ["video_up1"]
    assert (await gateway.get(f"/v1/videos/{video['id']}", headers=auth(key))).status == 404


async def test_jobs_survive_a_restart(aiohttp_client, videos, store_url, make_key, tmp_path: Path):
    mock, control = videos
    key = await make_key()
    env = env_for(mock, store_url, GATEWAY_URL_SIGNING_KEY=SIGNING_KEY)
    first = await aiohttp_client(build_app(load_config(video_config(tmp_path), env=env)))
    video = await create(first, key)
    await first.close()
    second = await aiohttp_client(build_app(load_config(video_config(tmp_path), env=env)))
    control.status["video_up1"] = "in_progress"
    got = await (await second.get(f"/v1/videos/{video['id']}", headers=auth(key))).json()
    assert got["id"] == video["id"] and got["status"] == "in_progress"


async def test_bad_requests_and_a_failing_provider(gateway, key, videos):
    _, control = videos
    r = await gateway.post("/v1/videos", json={"prompt": "x"}, headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "model"
    r = await gateway.post("/v1/videos", json={"model": "openai/nope", "prompt": "x"}, headers=auth(key))
    assert r.status == 404
    r = await gateway.post("/v1/videos", json={"model": "openai/gpt-4o-mini", "prompt": "x"}, headers=auth(key))
    assert r.status in (400, 404) and "video" in (await r.text()).lower()
    r = await gateway.post("/v1/videos", json={"model": "openai/sora-2"}, headers=auth(key))
    assert r.status == 400  # the provider's refusal, passed on
    control.fail_create = 1
    r = await gateway.post("/v1/videos", json={"model": "openai/sora-2", "prompt": "x"}, headers=auth(key))
    assert r.status == 502 and "HTTP 500" in (await r.json())["error"]["message"]
    assert (await gateway.get("/v1/videos")).status == 401


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's note on OpenAI's own Sora
async def test_the_openai_sdk_makes_and_fetches_a_video(gateway, key, videos, tmp_path: Path):
    _, control = videos
    client = openai.AsyncOpenAI(api_key=key, base_url=str(gateway.make_url("/v1")), max_retries=0)
    video = await client.videos.create(model="openai/sora-2", prompt="a lighthouse at dawn", seconds="4")
    assert video.id.startswith("video_") and control.received[-1]["model"] == "sora-2"
    control.status["video_up1"] = "completed"
    done = await client.videos.retrieve(video.id)
    assert done.status == "completed"
    content = await client.videos.download_content(video.id)
    assert content.content == pattern(0, control.content_bytes)
    listed = await client.videos.list()
    assert [v.id for v in listed.data] == [video.id]
    deleted = await client.videos.delete(video.id)
    assert deleted.deleted
