"""`proxy.records`: the journal line a finished request leaves, and the store row made from it later."""

from __future__ import annotations

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
    assert orjson.loads(acted[-1]) == [GUARDED] and quiet[-1] == "" and empty[-1] == ""
    assert len(acted) == len(Generation.__struct_fields__)


def _v1(line: bytes) -> bytes:
    """A line as a gateway of before guardrails wrote it: one member shorter."""
    return orjson.dumps(orjson.loads(line)[:-1])


def test_a_v1_snapshot_line_still_becomes_a_row():
    meta = finished()
    old = _v1(records.line(meta, CREATED_MS))
    msgspec.json.decode(old, type=records.SnapshotLineV1)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(old, type=records.SnapshotLine)
    records.check(old)
    (row,) = records.rows([old])
    assert row == records.row(meta, CREATED_MS) and row[-1] == ""
    assert records.generation(old).row() == row


def test_a_v1_row_line_still_becomes_a_row():
    row = records.row(finished(guardrails=[GUARDED]), CREATED_MS)
    old = _v1(encode_row(row))
    records.check(old)
    assert records.rows([old]) == [(*row[:-1], "")]


@pytest.mark.parametrize(
    "data",
    [
        b'[1,"req",1]',
        b'["req"]',
        b"{}",
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],"pii"]',
        b'[1,"r",1,"t","k","s","m","p","u","n",false,200,"","",null,"none",0,"USD",[],0,0,0,0,0,[],null,null]',
    ],
)
def test_check_refuses_what_is_not_a_record(data: bytes):
    with pytest.raises(msgspec.DecodeError):
        records.check(data)
