"""Validate what the device emits against the committed JSON Schemas."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema

from edgeagent.telemetry.payloads import SCHEMA_DIR

# Topic suffix (after <prefix>/<device>/) -> schema name.
TOPIC_SCHEMAS = [
    (re.compile(r"/status$"), "status"),
    (re.compile(r"/info$"), "info"),
    (re.compile(r"/metrics$"), "metrics"),
    (re.compile(r"/health$"), "health"),
    (re.compile(r"/events$"), "event"),
    (re.compile(r"/alerts/[^/]+$"), "alert"),
    (re.compile(r"/calls/[^/]+/quality$"), "quality"),
    (re.compile(r"/calls/[^/]+/summary$"), "summary"),
    (re.compile(r"/crash$"), "crash"),
    (re.compile(r"/traces$"), "traces"),
    (re.compile(r"/cmd-res/[^/]+$"), "command_response"),
    (re.compile(r"/signal$"), "signal"),
]


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def schema_name(topic: str) -> str | None:
    for pattern, name in TOPIC_SCHEMAS:
        if pattern.search(topic):
            return name
    return None


def assert_valid(topic: str, payload: Any) -> None:
    """Raise if `payload` (bytes or decoded) does not match the schema for `topic`."""
    name = schema_name(topic)
    assert name is not None, f"no schema for topic {topic}"
    doc = json.loads(payload) if isinstance(payload, bytes | str) else payload
    errors = sorted(validator(name).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{topic}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
    )
