"""A mock of OpenAI's Files and Batch APIs that checks what it receives: files uploaded as multipart
(kept), batches that run their input file's lines when a test says so (`finish`), with usage per result."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.mock_videos import UPSTREAM_KEY

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}  # every result's


@dataclass
class FileRecord:
    id: str
    purpose: str
    filename: str
    content: bytes


@dataclass
class BatchControl:
    files: dict[str, FileRecord] = field(default_factory=dict)
    batches: dict[str, dict] = field(default_factory=dict)
    uploads: list[dict] = field(default_factory=list)  # every upload's form fields (the file as its bytes)
    deleted: list[str] = field(default_factory=list)
    listed: int = 0  # GET /files calls
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add_file(self, purpose: str, filename: str, content: bytes) -> FileRecord:
        record = FileRecord(f"file-up{next(self._ids)}", purpose, filename, content)
        self.files[record.id] = record
        return record

    def finish(self, batch_id: str, status: str = "completed", done: int | None = None) -> None:
        """End a batch: the first `done` lines (all by default) succeed, with USAGE each, into an output file."""
        batch = self.batches[batch_id]
        lines = [orjson.loads(line) for line in self.files[batch["input_file_id"]].content.splitlines() if line]
        done = len(lines) if done is None else done
        results = [
            {
                "id": f"batch_req_{i}",
                "custom_id": line["custom_id"],
                "response": {
                    "status_code": 200,
                    "request_id": f"req_{i}",
                    "body": {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": line["body"]["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                          "finish_reason": "stop"}], "usage": USAGE},
                },
                "error": None,
            }
            for i, line in enumerate(lines[:done])
        ]  # fmt: skip
        if results and status != "failed":
            output = b"".join(orjson.dumps(r) + b"\n" for r in results)
            batch["output_file_id"] = self.add_file("batch_output", "batch_output.jsonl", output).id
        batch["status"] = status
        batch["request_counts"] = {"total": len(lines), "completed": done, "failed": 0}


def build_batch_mock(control: BatchControl) -> web.Application:
    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            raise web.HTTPUnauthorized(text='{"error": {"message": "bad key"}}', content_type="application/json")

    def not_found(what: str) -> web.Response:
        return web.json_response({"error": {"message": f"No such {what}", "type": "invalid_request_error"}}, status=404)

    def file_object(record: FileRecord) -> dict:
        return {"id": record.id, "object": "file", "bytes": len(record.content), "created_at": 1_760_000_000,
                "filename": record.filename, "purpose": record.purpose, "status": "processed"}  # fmt: skip

    async def upload(request: web.Request) -> web.Response:
        authorized(request)
        form: dict = {}
        async for part in await request.multipart():
            form[part.name] = await part.read() if part.filename else await part.text()  # type: ignore[union-attr]
            if part.filename:  # type: ignore[union-attr]
                form["filename"] = part.filename  # type: ignore[union-attr]
        control.uploads.append(form)
        if "file" not in form or "purpose" not in form:
            return web.json_response({"error": {"message": "file and purpose are required"}}, status=400)
        return web.json_response(file_object(control.add_file(form["purpose"], form["filename"], form["file"])))

    async def retrieve_file(request: web.Request) -> web.Response:
        authorized(request)
        record = control.files.get(request.match_info["id"])
        return web.json_response(file_object(record)) if record else not_found("file")

    async def content(request: web.Request) -> web.Response:
        authorized(request)
        record = control.files.get(request.match_info["id"])
        if record is None:
            return not_found("file")
        return web.Response(body=record.content, content_type="application/jsonl")

    async def delete_file(request: web.Request) -> web.Response:
        authorized(request)
        if control.files.pop(request.match_info["id"], None) is None:
            return not_found("file")
        control.deleted.append(request.match_info["id"])
        return web.json_response({"id": request.match_info["id"], "object": "file", "deleted": True})

    async def list_files(request: web.Request) -> web.Response:
        authorized(request)
        control.listed += 1
        data = [file_object(r) for r in control.files.values()]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def create_batch(request: web.Request) -> web.Response:
        authorized(request)
        ask = await request.json()
        record = control.files.get(ask.get("input_file_id", ""))
        if record is None:
            return not_found("file")
        batch_id = f"batch_up{len(control.batches) + 1}"
        control.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": ask["endpoint"], "errors": None,
            "input_file_id": record.id, "completion_window": ask.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": 1_760_000_000,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": ask.get("metadata"),
        }  # fmt: skip
        return web.json_response(control.batches[batch_id])

    async def retrieve_batch(request: web.Request) -> web.Response:
        authorized(request)
        batch = control.batches.get(request.match_info["id"])
        return web.json_response(batch) if batch else not_found("batch")

    async def cancel_batch(request: web.Request) -> web.Response:
        authorized(request)
        batch = control.batches.get(request.match_info["id"])
        if batch is None:
            return not_found("batch")
        batch["status"] = "cancelling"
        return web.json_response(batch)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{id}", retrieve_file)
    app.router.add_get("/v1/files/{id}/content", content)
    app.router.add_delete("/v1/files/{id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches/{id}", retrieve_batch)
    app.router.add_post("/v1/batches/{id}/cancel", cancel_batch)
    return app
