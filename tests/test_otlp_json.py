"""The protobuf-free OTLP/JSON encoder writes what protobuf's MessageToDict writes, hex ids."""

from __future__ import annotations

import base64
import subprocess
import sys
from typing import Any

from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from edgeagent.telemetry.tracing import decode_otlp_json, encode_otlp_dict, encode_otlp_json

REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "x1")]),
)


def reference(spans: list[ReadableSpan]) -> dict[str, Any]:
    """What the encoder replaced: the OTLP exporter's request through MessageToDict."""
    data: dict[str, Any] = json_format.MessageToDict(
        encode_spans(spans), use_integers_for_enums=True
    )
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if item.get(key):
                            item[key] = base64.b64decode(item[key]).hex()
    return data


def varied_spans() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "edgeagent", "device.id": "pi-1"}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("edgeagent.call", "1.2.3")
    other = provider.get_tracer("edgeagent.other", schema_url="https://opentelemetry.io/s/1.21")
    remote = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    root = tracer.start_span(
        "call",
        context=remote,
        kind=SpanKind.SERVER,
        attributes={
            "call.id": "c-1",
            "call.mos_avg": 4.25,
            "call.whole": 3.0,
            "call.count": 0,
            "call.big": 2**40,
            "call.ok": False,
            "call.tags": ("a", "b"),
            "call.levels": [1.5, -2.0],
            "call.empty": "",
        },
        links=[Link(REMOTE, {"link.kind": "browser"})],
    )
    child = tracer.start_span("ice.connect", context=trace.set_span_in_context(root))
    child.add_event("alert.firing", {"alert.name": "mos_low", "alert.value": 2.5})
    child.add_event("bare")
    child.set_status(Status(StatusCode.ERROR, "ice failed"))
    child.end()
    ok = other.start_span("probe", kind=SpanKind.CLIENT)
    ok.set_status(Status(StatusCode.OK))
    ok.end()
    root.end()
    provider.shutdown()
    return list(exporter.get_finished_spans())


def test_encoder_matches_protobuf_message_to_dict() -> None:
    spans = varied_spans()
    assert len(spans) == 3
    assert encode_otlp_dict(spans) == reference(spans)


def test_encoder_matches_for_one_span_and_for_none() -> None:
    spans = varied_spans()
    assert encode_otlp_dict(spans[:1]) == reference(spans[:1])
    assert encode_otlp_dict([]) == reference([]) == {}


def test_encoded_json_parses_strictly_back_into_the_same_request() -> None:
    spans = varied_spans()
    request = decode_otlp_json(encode_otlp_json(spans))
    assert request == encode_spans(spans)
    names = [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(names) == ["call", "ice.connect", "probe"]


def test_the_agent_does_not_import_protobuf_or_the_otlp_exporter() -> None:
    code = (
        "import sys, edgeagent.agent\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('google.protobuf', "
        "'opentelemetry.proto', 'opentelemetry.exporter')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == ""
