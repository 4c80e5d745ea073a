"""A mock of sunoapi.org's music API that checks what it receives: create (`POST /api/v1/generate`) and status
(`GET /api/v1/generate/record-info?taskId=`), both answering in its `{"code", "msg", "data"}` envelope, errors
in an HTTP 200 too. Tests steer a task's status and the create's answers."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from aiohttp import web

UPSTREAM_KEY = "sk-upstream-secret"  # what the tests give the suno provider (SUNO_API_KEY)
DURATIONS = (198.44, 228.28)  # the two tracks of a finished task, in seconds


@dataclass
class MusicControl:
    status: dict[str, str] = field(default_factory=dict)  # task id -> its status (PENDING until set)
    errors: dict[str, str] = field(default_factory=dict)  # task id -> errorMessage
    received: list[dict] = field(default_factory=list)  # every create's JSON body
    polls: list[str] = field(default_factory=list)  # the task ids asked about
    fail_create: int = 0  # answer this many creates with HTTP 500 first
    refuse: tuple[int, str] | None = None  # answer creates with this (code, msg) in an HTTP 200


def _envelope(code: int, msg: str, data: object = None) -> web.Response:
    return web.json_response({"code": code, "msg": msg, "data": data})


def build_music_mock(control: MusicControl) -> web.Application:
    counter = iter(range(1, 1_000_000))
    tasks: set[str] = set()

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            body = orjson.dumps({"code": 401, "msg": "You do not have access permissions", "data": None})
            raise web.HTTPUnauthorized(text=body.decode(), content_type="application/json")

    async def create(request: web.Request) -> web.Response:
        authorized(request)
        if control.fail_create > 0:
            control.fail_create -= 1
            return web.Response(status=500, text="upstream overloaded")
        ask = orjson.loads(await request.read())
        control.received.append(ask)
        if control.refuse is not None:
            return _envelope(*control.refuse)
        required = ("prompt", "customMode", "instrumental", "model", "callBackUrl")
        if any(name not in ask for name in required) or (ask["customMode"] and not (ask["style"] and ask["title"])):
            return _envelope(400, "Please enter the required parameters")
        task_id = f"task{next(counter)}"
        tasks.add(task_id)
        return _envelope(200, "success", {"taskId": task_id})

    async def record(request: web.Request) -> web.Response:
        authorized(request)
        task_id = request.query.get("taskId", "")
        control.polls.append(task_id)
        if task_id not in tasks:
            return _envelope(400, f"no task {task_id}")
        status = control.status.get(task_id, "PENDING")
        tracks = None
        if status in ("FIRST_SUCCESS", "SUCCESS"):
            tracks = [
                {
                    "id": f"{task_id}-{i}",
                    "audioUrl": f"https://cdn.example/{task_id}-{i}.mp3" if status == "SUCCESS" else "",
                    "streamAudioUrl": f"https://cdn.example/stream/{task_id}-{i}",
                    "imageUrl": f"https://cdn.example/{task_id}-{i}.jpeg",
                    "prompt": "[Verse] ...",
                    "modelName": "chirp-v4-5",
                    "title": "Peaceful Piano",
                    "tags": "calm, piano",
                    "createTime": "2025-01-01 00:00:00",
                    "duration": seconds if status == "SUCCESS" else None,
                }
                for i, seconds in enumerate(DURATIONS)
            ]
        data = {
            "taskId": task_id,
            "parentMusicId": "",
            "param": "{}",
            "response": {"taskId": task_id, "sunoData": tracks} if tracks else None,
            "status": status,
            "type": "GENERATE",
            "errorCode": None,
            "errorMessage": control.errors.get(task_id),
        }
        return _envelope(200, "success", data)

    app = web.Application()
    app.router.add_post("/api/v1/generate", create)
    app.router.add_get("/api/v1/generate/record-info", record)
    return app
