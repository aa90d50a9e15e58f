"""Payload types, their committed JSON Schemas, and the wire shape of protocol section 2."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from schema_support import assert_valid

from edgeagent.telemetry import payloads as p


def test_committed_schemas_match_the_types(tmp_path: Path) -> None:
    p.write_schemas(tmp_path)
    for name in p.SCHEMA_TYPES:
        committed = json.loads((p.SCHEMA_DIR / f"{name}.json").read_text())
        fresh = json.loads((tmp_path / f"{name}.json").read_text())
        assert committed == fresh, (
            f"schema {name} is stale: run python -m edgeagent.telemetry.payloads"
        )


def test_event_omits_unset_optionals_and_keeps_v() -> None:
    e = p.Event(v=1, device="d", ts=1.5, seq=3, level="info", category="a.b", message="m")
    doc = json.loads(p.encode(e))
    assert doc == {
        "v": 1,
        "device": "d",
        "ts": 1.5,
        "seq": 3,
        "level": "info",
        "category": "a.b",
        "message": "m",
    }
    assert_valid("edge/v1/d/events", doc)


SIG = {"v": 1, "call_id": "c1", "from": "a", "to": "b", "ts": 1.0}
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_each_signal_type_with_its_fields_is_valid() -> None:
    for doc in (
        {**SIG, "type": "offer", "sdp": "v=0", "traceparent": TP, "token": "a.b.c"},
        {**SIG, "type": "answer", "sdp": "v=0"},
        {**SIG, "type": "reject", "reason": "busy"},
        {**SIG, "type": "hangup", "reason": "local_hangup"},
    ):
        assert_valid("edge/v1/b/signal", doc)


def test_signal_uses_the_from_key() -> None:
    s = p.Signal(v=1, type="hangup", call_id="c1", from_="a", to="b", ts=1.0, reason="normal")
    doc = json.loads(p.encode(s))
    assert doc["from"] == "a"
    assert "from_" not in doc
    assert_valid("edge/v1/b/signal", doc)


@pytest.mark.parametrize(
    ("topic", "doc"),
    [
        ("edge/v1/d/events", {"v": 1, "device": "d", "ts": 1.0, "seq": 1, "level": "loud"}),
        ("edge/v1/d/status", {"v": 1, "device": "d", "ts": 1.0, "state": "maybe", "session": 1}),
        ("edge/v1/d/health", {"v": 1, "device": "d", "ts": 1.0, "state": "ok", "reasons": []}),
        ("edge/v1/d/health", {"v": 2, "device": "d", "ts": 1.0, "state": "idle", "reasons": []}),
        ("edge/v1/d/health", {"v": 1, "device": "D_1", "ts": 1.0, "state": "idle", "reasons": []}),
        ("edge/v1/b/signal", {**SIG, "type": "offer", "traceparent": TP}),  # no sdp
        ("edge/v1/b/signal", {**SIG, "type": "offer", "sdp": "v=0"}),  # no traceparent
        ("edge/v1/b/signal", {**SIG, "type": "answer"}),
        ("edge/v1/b/signal", {**SIG, "type": "reject", "reason": "nope"}),
        ("edge/v1/b/signal", {**SIG, "type": "reject"}),
        ("edge/v1/b/signal", {**SIG, "type": "hangup"}),
        ("edge/v1/b/signal", {**SIG, "type": "hangup", "reason": "x", "from": "A b"}),
    ],
)
def test_schemas_reject_contract_violations(topic: str, doc: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(AssertionError):
        assert_valid(topic, doc)


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    for name in p.SCHEMA_TYPES:
        schema = json.loads((p.SCHEMA_DIR / f"{name}.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
