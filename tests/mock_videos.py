"""A mock of OpenAI's Videos API that checks what it receives: create (JSON or multipart), retrieve,
content (with ranges, generated on the fly, never held), delete. Tests steer a job's status."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import orjson
from aiohttp import web

UPSTREAM_KEY = "sk-upstream-secret"  # what tests.conftest.env_for gives the openai provider


_BLOCK = 256 * 1024
_CYCLE = bytes(range(251)) * (_BLOCK // 251 + 2)


def pattern(offset: int, length: int) -> bytes:
    """The content's bytes at `offset` (at most `_BLOCK` of them): byte i is i mod 251, so any slice can be
    checked."""
    start = offset % 251
    return _CYCLE[start : start + length]


@dataclass
class VideoControl:
    status: dict[str, str] = field(default_factory=dict)  # upstream id -> status answered by retrieve
    content_bytes: int = 4096
    received: list[dict] = field(default_factory=list)  # every create's form or JSON (file parts as sha256)
    deleted: list[str] = field(default_factory=list)
    fail_create: int = 0  # answer this many creates with 500 first
    ranges: list[str] = field(default_factory=list)
    traceparents: list[str] = field(default_factory=list)  # each create's (empty: none sent)


def build_video_mock(control: VideoControl) -> web.Application:
    counter = iter(range(1, 1_000_000))

    def video(vid: str, ask: dict) -> dict:
        return {
            "id": vid,
            "object": "video",
            "model": ask.get("model", ""),
            "status": control.status.get(vid, "queued"),
            "progress": 100 if control.status.get(vid) == "completed" else 0,
            "created_at": 1_760_000_000,
            "seconds": str(ask.get("seconds", "4")),
            "size": ask.get("size", "720x1280"),
        }

    asked: dict[str, dict] = {}

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            raise web.HTTPUnauthorized(text='{"error": {"message": "bad key"}}', content_type="application/json")

    async def create(request: web.Request) -> web.Response:
        authorized(request)
        control.traceparents.append(request.headers.get("traceparent", ""))
        if control.fail_create > 0:
            control.fail_create -= 1
            return web.json_response({"error": {"message": "overloaded"}}, status=500)
        if request.content_type.startswith("multipart/"):
            ask: dict = {}
            reader = await request.multipart()
            async for part in reader:
                if part.filename:  # type: ignore[union-attr]
                    digest = hashlib.sha256()
                    while chunk := await part.read_chunk():  # type: ignore[union-attr]
                        digest.update(chunk)
                    ask[part.name] = {"filename": part.filename, "sha256": digest.hexdigest()}  # type: ignore[union-attr]
                else:
                    ask[part.name] = await part.text()  # type: ignore[union-attr]
        else:
            ask = orjson.loads(await request.read())
        control.received.append(ask)
        if not ask.get("model") or not ask.get("prompt"):
            return web.json_response({"error": {"message": "model and prompt are required"}}, status=400)
        vid = f"video_up{next(counter)}"
        asked[vid] = ask
        return web.json_response(video(vid, ask))

    async def retrieve(request: web.Request) -> web.Response:
        authorized(request)
        vid = request.match_info["id"]
        if vid not in asked:
            return web.json_response({"error": {"message": f"no video {vid}"}}, status=404)
        return web.json_response(video(vid, asked[vid]))

    async def content(request: web.Request) -> web.StreamResponse:
        authorized(request)
        vid = request.match_info["id"]
        if control.status.get(vid) != "completed":
            return web.json_response({"error": {"message": "video is not ready"}}, status=404)
        size = control.content_bytes
        start, end, status = 0, size - 1, 200
        if "Range" in request.headers:
            control.ranges.append(request.headers["Range"])
            first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(int(last) if last else size - 1, size - 1), 206
        out = web.StreamResponse(status=status, headers={"Content-Type": "video/mp4", "Accept-Ranges": "bytes"})
        out.content_length = end - start + 1
        if status == 206:
            out.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        await out.prepare(request)
        position = start
        while position <= end:
            length = min(_BLOCK, end + 1 - position)
            await out.write(pattern(position, length))
            position += length
        await out.write_eof()
        return out

    async def delete(request: web.Request) -> web.Response:
        authorized(request)
        vid = request.match_info["id"]
        if asked.pop(vid, None) is None:
            return web.json_response({"error": {"message": f"no video {vid}"}}, status=404)
        control.deleted.append(vid)
        return web.json_response({"id": vid, "object": "video.deleted", "deleted": True})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/videos", create)
    app.router.add_get("/v1/videos/{id}", retrieve)
    app.router.add_get("/v1/videos/{id}/content", content)
    app.router.add_delete("/v1/videos/{id}", delete)
    return app
