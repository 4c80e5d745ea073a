"""`proxy.records`: the journal line a finished request leaves, and the store row made from it later."""

from __future__ import annotations

from typing import get_args

import msgspec
import orjson
import pytest

from proxy import records
from proxy.journal import encode_row
from proxy.meta import RequestMeta, Usage
from proxy.pricing import NANOS_PER_USD
from proxy.store.base import Generation

CREATED_MS = 1_796_400_000_123
GUARDED = {"policy": "pii", "stage": "request", "action": "redact", "kinds": {"EMAIL": 2}}


def finished(**members) -> RequestMeta:
    m = RequestMeta("req_0123456789abcdef01234567", "chat.completions", 1000.0)
    m.team_id, m.key_id, m.model, m.provider = "team_1", "k1", "openai/gpt-4o-mini", "openai"
    m.upstream_model, m.native_id, m.status = "gpt-4o-mini", "chatcmpl-1", 200
    m.usage = Usage(input_tokens=11, output_tokens=40, total_tokens=51, cached_input_tokens=3)
    m.cost_nanos, m.pricing_json = 4650, b'[{"meter":"input_tokens","amount_nanos":1650}]'
    m.t_upstream_start, m.t_first_token, m.t_upstream_end, m.t_end = 1000.001, 1000.0502, 1000.4203, 1000.4211
    m.attempts = [("openai", 503, 1000.0005, 1000.0009), ("openai", 200, 1000.001, 1000.4203)]
    for name, value in members.items():
        setattr(m, name, value)
    return m


CASES = {
    "streamed, a retry": finished(stream=True),
    "no usage (failed before a provider answered)": finished(
        usage=None, status=502, error_code="upstream_error", error_message="bad gateway", cost_nanos=None
    ),
    "media units": finished(usage=Usage(images=2, audio_seconds=3.5, video_seconds=4.0), usage_source="reported"),
    "estimated": finished(usage_source="estimated", t_first_token=0.0),
    "NUL bytes from a provider": finished(native_id="id\0x", error_message="a\0b"),
    "big cost": finished(cost_nanos=12 * NANOS_PER_USD),
    "guardrails acted": finished(guardrails=[GUARDED]),
    "guardrails ran, nothing found": finished(guardrails=[]),
    "a cache hit": finished(cache_status="hit", saved_nanos=4650, cost_nanos=0),
    "a cache miss": finished(cache_status="miss"),
}


@pytest.mark.parametrize("meta", CASES.values(), ids=CASES.keys())
def test_the_row_made_from_a_line_is_the_row_of_the_request(meta: RequestMeta):
    line = records.line(meta, CREATED_MS)
    assert line.startswith(b"[1,") and line.endswith(b"\n") and line.count(b"\n") == 1
    records.check(line.rstrip(b"\n"))
    (row,) = records.rows([line])
    assert row == records.row(meta, CREATED_MS)
    assert "\0" not in row[8] + row[13]  # PostgreSQL text cannot hold NUL
    assert records.generation(line).row() == row


def test_a_row_line_is_taken_as_it_is():
    row = records.row(finished(), CREATED_MS)
    line = encode_row(row)
    records.check(line.rstrip(b"\n"))
    assert records.rows([line, records.line(finished(request_id="req_other"), CREATED_MS)])[0] == row


def test_text_that_is_not_unicode_is_repaired_in_the_line():
    meta = finished(error_message="bad \udc80 byte", native_id="\ud800")
    (row,) = records.rows([records.line(meta, CREATED_MS)])
    assert row[13] == "bad ? byte" and row[8] == "?"


def test_the_timings_of_the_row_are_the_answers_meta_timings():
    meta = finished()
    (row,) = records.rows([records.line(meta, CREATED_MS)])
    timings = orjson.loads(row[19])
    assert timings == orjson.loads(orjson.dumps(meta.timings(meta.t_end)))
    assert timings["ttft_ms"] == pytest.approx(50.2) and [a["status"] for a in timings["attempts"]] == [503, 200]


def test_the_guardrails_of_the_row_are_json_or_empty():
    (acted, quiet, empty) = records.rows(
        [
            records.line(finished(request_id=f"req_{i}", guardrails=g), CREATED_MS)
            for i, g in enumerate(([GUARDED], None, []))
        ]
    )
    column = Generation.__struct_fields__.index("guardrails")
    assert orjson.loads(acted[column]) == [GUARDED] and quiet[column] == "" and empty[column] == ""
    assert len(acted) == len(Generation.__struct_fields__)


def _cut(line: bytes, length: int) -> bytes:
    """A line as an older gateway wrote it: its first `length` members."""
    return orjson.dumps(orjson.loads(line)[:length])


OLDER = {"V2 (guardrails)": records.SnapshotLineV2, "V1": records.SnapshotLineV1}


@pytest.mark.parametrize("shape", OLDER.values(), ids=OLDER.keys())
def test_an_older_snapshot_line_still_becomes_a_row(shape: type):
    meta = finished(guardrails=[GUARDED] if shape is records.SnapshotLineV2 else None)
    old = _cut(records.line(meta, CREATED_MS), len(get_args(shape)))
    msgspec.json.decode(old, type=shape)
    for newer in records.SNAPSHOT_LINES[: records.SNAPSHOT_LINES.index(shape)]:
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(old, type=newer)
    records.check(old)
    (row,) = records.rows([old])
    assert row == records.row(meta, CREATED_MS) and row[-2:] == ("", 0)  # the cache was not involved
    assert records.generation(old).row() == row


def test_the_snapshot_shapes_grow_at_their_end():
    *newer, oldest = (get_args(shape) for shape in records.SNAPSHOT_LINES)
    assert all(members[: len(oldest)] == oldest for members in newer)
    assert [len(members) for members in (*newer, oldest)] == [28, 26, 25]


@pytest.mark.parametrize("length", records.ROW_LENGTHS[1:], ids=["V2 (guardrails)", "V1"])
def test_an_older_row_line_still_becomes_a_row(length: int):
    row = records.row(finished(guardrails=[GUARDED], cache_status="hit", saved_nanos=7), CREATED_MS)
    old = _cut(encode_row(row), length)
    records.check(old)
    defaults = tuple(f.default for f in msgspec.structs.fields(Generation))[length:]
    assert defaults in (("", "", 0), ("", 0))
    assert records.rows([old]) == [(*row[:length], *defaults)]
    assert records.generation(old).row() == (*row[:length], *defaults)


def test_the_cache_members_of_the_row():
    (hit, plain) = records.rows(
        [
            records.line(
                finished(request_id="req_hit", cache_status="hit", saved_nanos=4650, cost_nanos=0), CREATED_MS
            ),
            records.line(finished(request_id="req_plain"), CREATED_MS),
        ]
    )
    assert hit[-2:] == ("hit", 4650) and hit[16] == 0 and plain[-2:] == ("", 0)
    generation = records.generation(records.line(finished(cache_status="bypass"), CREATED_MS))
    assert (generation.cache_status, generation.saved_nanos) == ("bypass", 0)


@pytest.mark.parametrize(
    "data",
    [
        b'[1,"req",1]',
        b'["req"]',
        b"{}",
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],"pii"]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],null,null]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],null,"hit"]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],null,null,0]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],null,"hit",1.5]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],null,"",0,0]',
        b'["r",1,"t","k","e","m","p","u","n",false,200,true,"","","{}","none",0,"USD","[]","{}","",""]',
    ],
)
def test_check_refuses_what_is_not_a_record(data: bytes):
    with pytest.raises(msgspec.DecodeError):
        records.check(data)
