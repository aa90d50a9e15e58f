"""Tracing: call span tree, traceparent, OTLP/JSON to the spool, OTLP/HTTP, sampling."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from schema_support import validator

from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.tracing import (
    PHASES,
    CallTracer,
    MqttSpanExporter,
    build_tracer_provider,
    decode_otlp_json,
    extract_context,
    inject_traceparent,
    otlp_http_exporter,
    ratio_keeps,
    trace_id_hex,
)

BROWSER_TRACE = "0af7651916cd43dd8448eb211c80319c"
BROWSER_SPAN = "b7ad6b7169203331"
BROWSER_TRACEPARENT = f"00-{BROWSER_TRACE}-{BROWSER_SPAN}-01"


def provider_with(
    *exporters: SpanExporter,
    background: Sequence[SpanExporter] = (),
    ratio: float = 1.0,
    device_id: str = "pi-1",
) -> TracerProvider:
    return build_tracer_provider(
        service_version="1.2.3",
        device_id=device_id,
        board_model="Raspberry Pi 4 Model B Rev 1.4",
        os_name="Debian GNU/Linux 12 (bookworm)",
        exporters=list(exporters),
        background_exporters=background,
        sampler_ratio=ratio,
    )


@pytest.fixture
def memory() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter)
    yield exporter, provider
    provider.shutdown()


def run_call(
    tracer: CallTracer,
    *,
    result: str = "completed",
    mos: float = 4.2,
    traceparent: str | None = None,
    alert: bool = False,
) -> None:
    tracer.start_call("c-1", "incoming", "console-7", traceparent)
    for name in PHASES[:-2]:
        with tracer.phase(name):
            pass
    tracer.begin_phase("call.active", {"call.codec": "opus"})
    if alert:
        tracer.event("alert.firing", {"alert.name": "mos_low", "alert.severity": "warning"})
    tracer.end_phase("call.active")
    with tracer.phase("teardown"):
        pass
    tracer.end_call(result, {"call.codec": "opus", "call.mos_avg": mos, "call.mos_min": mos - 0.3})


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


# -- span tree -----------------------------------------------------------------------


def test_call_span_tree_links_attributes_and_resource(
    memory: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = memory
    tracer = CallTracer(provider.get_tracer("edgeagent.call"))
    run_call(tracer, alert=True)
    spans = exporter.get_finished_spans()
    # Phases end in order, the root last (the whole trace is exported at the root's end).
    assert [s.name for s in spans] == [*PHASES, "call"]
    named = by_name(spans)
    root = named["call"]
    assert root.parent is None
    assert root.kind is SpanKind.SERVER
    root_ctx = root.get_span_context()
    assert root_ctx is not None
    for phase in PHASES:
        span = named[phase]
        assert span.parent is not None and span.parent.span_id == root_ctx.span_id, phase
        assert span.get_span_context().trace_id == root_ctx.trace_id  # type: ignore[union-attr]
    assert dict(root.attributes or {}) == {
        "call.id": "c-1",
        "call.direction": "incoming",
        "call.peer": "console-7",
        "call.result": "completed",
        "call.codec": "opus",
        "call.mos_avg": 4.2,
        "call.mos_min": pytest.approx(3.9),
    }
    assert root.status.status_code is StatusCode.UNSET
    active = named["call.active"]
    assert [(e.name, dict(e.attributes or {})) for e in active.events] == [
        ("alert.firing", {"alert.name": "mos_low", "alert.severity": "warning"})
    ]
    res = dict(root.resource.attributes)
    assert res["service.name"] == "edgeagent"
    assert res["service.version"] == "1.2.3"
    assert res["device.id"] == "pi-1"
    assert res["device.model.name"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert res["os.description"] == "Debian GNU/Linux 12 (bookworm)"
    assert tracer.trace_id == format(root_ctx.trace_id, "032x")  # still known for the summary
    # Injected, never global.
    assert trace.get_tracer_provider() is not provider


def test_failed_call_and_failing_phase_are_errors(
    memory: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = memory
    tracer = CallTracer(provider.get_tracer("t"))
    tracer.start_call("c-2", "outgoing", "pi-9")
    with pytest.raises(TimeoutError), tracer.phase("signaling.answer_wait"):
        raise TimeoutError("no answer in 30 s")
    tracer.begin_phase("ice.gathering")  # left open: end_call ends it
    tracer.end_call("failed", end_reason="answer_timeout")
    tracer.end_call("failed")  # idempotent
    tracer.event("late", {})  # ignored after the end
    named = by_name(exporter.get_finished_spans())
    assert set(named) == {"signaling.answer_wait", "ice.gathering", "call"}
    wait = named["signaling.answer_wait"]
    assert wait.status.status_code is StatusCode.ERROR
    assert wait.status.description == "TimeoutError: no answer in 30 s"
    assert [e.name for e in wait.events] == ["exception"]
    root = named["call"]
    assert root.kind is SpanKind.CLIENT
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "answer_timeout"
    assert (root.attributes or {})["call.end_reason"] == "answer_timeout"
    with pytest.raises(RuntimeError):
        tracer.begin_phase("dtls")


def test_events_go_to_the_newest_open_phase_else_the_root(
    memory: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = memory
    tracer = CallTracer(provider.get_tracer("t"))
    tracer.event("before.start", {})  # no call yet: nothing to attach to
    tracer.start_call("c-3", "incoming", "x")
    tracer.event("ringing", {})
    tracer.begin_phase("ice.connect")
    tracer.begin_phase("dtls")
    tracer.event("dtls.role", {"role": "client"})
    tracer.end_phase("dtls")
    tracer.event("ice.pair", {"local": "relay"})
    tracer.end_call("completed")
    named = by_name(exporter.get_finished_spans())
    assert [e.name for e in named["call"].events] == ["ringing"]
    assert [e.name for e in named["dtls"].events] == ["dtls.role"]
    assert [e.name for e in named["ice.connect"].events] == ["ice.pair"]


# -- propagation ---------------------------------------------------------------------


def test_incoming_traceparent_continues_the_trace(
    memory: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = memory
    tracer = CallTracer(provider.get_tracer("t"))
    root = tracer.start_call("c-4", "incoming", "browser-1", BROWSER_TRACEPARENT)
    assert trace_id_hex(root) == BROWSER_TRACE
    assert tracer.trace_id == BROWSER_TRACE
    tracer.end_call("completed", {"call.mos_avg": 4.3})
    spans = exporter.get_finished_spans()
    assert len(spans) == 1
    parent = spans[0].parent
    assert parent is not None and parent.is_remote
    assert format(parent.span_id, "016x") == BROWSER_SPAN


def test_both_sides_share_the_trace_through_signaling() -> None:
    caller_mem, callee_mem = InMemorySpanExporter(), InMemorySpanExporter()
    caller_p = provider_with(caller_mem, device_id="pi-1")
    callee_p = provider_with(callee_mem, device_id="pi-2")
    caller, callee = CallTracer(caller_p.get_tracer("t")), CallTracer(callee_p.get_tracer("t"))
    assert caller.traceparent() is None
    caller.start_call("c-5", "outgoing", "pi-2")
    offer_traceparent = caller.traceparent()
    assert offer_traceparent is not None
    callee.start_call("c-5", "incoming", "pi-1", offer_traceparent)
    callee.end_call("completed", {"call.mos_avg": 4.0})
    caller.end_call("completed", {"call.mos_avg": 4.0})
    (a,), (b,) = caller_mem.get_finished_spans(), callee_mem.get_finished_spans()
    assert a.context is not None and b.parent is not None
    assert b.context is not None and b.context.trace_id == a.context.trace_id
    assert b.parent.span_id == a.context.span_id
    assert caller.trace_id == callee.trace_id
    caller_p.shutdown()
    callee_p.shutdown()


def test_traceparent_helpers() -> None:
    ctx = extract_context(BROWSER_TRACEPARENT)
    assert ctx is not None
    span = trace.get_current_span(ctx)
    assert inject_traceparent(span) == BROWSER_TRACEPARENT
    assert trace_id_hex(span) == BROWSER_TRACE
    for bad in (None, "", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        assert extract_context(bad) is None


def test_invalid_incoming_traceparent_starts_a_new_trace(
    memory: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    _, provider = memory
    tracer = CallTracer(provider.get_tracer("t"))
    root = tracer.start_call("c-6", "incoming", "x", "00-nothex-01")
    assert root.get_span_context().is_valid
    assert tracer.trace_id not in (None, BROWSER_TRACE)
    tracer.end_call("completed")


def test_untraced_calls_work_with_the_noop_tracer() -> None:
    tracer = CallTracer(trace.NoOpTracer())
    run_call(tracer)
    assert tracer.trace_id is None
    assert tracer.traceparent() is None


# -- MQTT export (OTLP/JSON to the spool) --------------------------------------------


def collecting(payloads: list[bytes], **kw: int) -> MqttSpanExporter:
    """An exporter whose `put` builds each message with the next seq, like the spool."""

    def put(build: Callable[[int], bytes]) -> int:
        seq = len(payloads) + 1
        payloads.append(build(seq))
        return seq

    return MqttSpanExporter(put, device="pi-1", wall=lambda: 1700000000.25, **kw)


def test_mqtt_export_is_valid_otlp_json() -> None:
    payloads: list[bytes] = []
    provider = provider_with(collecting(payloads))
    tracer = CallTracer(provider.get_tracer("edgeagent.call", "1.2.3"))
    run_call(tracer, traceparent=BROWSER_TRACEPARENT)
    assert len(payloads) == 1  # one message per kept trace
    raw = json.loads(payloads[0])
    # The protocol envelope sits next to resourceSpans, and matches the `traces` schema.
    assert {k: raw[k] for k in ("v", "device", "ts", "seq")} == {
        "v": 1,
        "device": "pi-1",
        "ts": 1700000000.25,
        "seq": 1,
    }
    # (schema_support maps no topic to `traces` yet: validate by schema name)
    validator("traces").validate(raw)
    spans_json = raw["resourceSpans"][0]["scopeSpans"][0]["spans"]
    root_json = next(s for s in spans_json if s["name"] == "call")
    # OTLP/JSON, not protobuf JSON: hex ids and integer enums.
    assert root_json["traceId"] == BROWSER_TRACE
    assert root_json["parentSpanId"] == BROWSER_SPAN
    assert root_json["kind"] == 2  # SPAN_KIND_SERVER
    request = decode_otlp_json(payloads[0])
    assert isinstance(request, ExportTraceServiceRequest)
    (rs,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
    assert resource["service.name"] == "edgeagent"
    assert resource["device.id"] == "pi-1"
    (ss,) = rs.scope_spans
    assert ss.scope.name == "edgeagent.call"
    assert [s.name for s in ss.spans] == [*PHASES, "call"]
    root = ss.spans[-1]
    assert root.trace_id.hex() == BROWSER_TRACE
    assert all(s.parent_span_id == root.span_id for s in ss.spans[:-1])
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["call.result"].string_value == "completed"
    assert attrs["call.mos_avg"].double_value == 4.2
    provider.shutdown()


def test_mqtt_export_splits_large_batches() -> None:
    payloads: list[bytes] = []
    provider = provider_with(collecting(payloads, max_spans_per_message=3))
    run_call(CallTracer(provider.get_tracer("t")))
    counts = [len(decode_otlp_json(p).resource_spans[0].scope_spans[0].spans) for p in payloads]
    assert counts == [3, 3, 3]
    assert [json.loads(p)["seq"] for p in payloads] == [1, 2, 3]
    provider.shutdown()


def test_mqtt_export_goes_through_the_durable_spool(tmp_path: Path) -> None:
    topic = "edge/v1/pi-1/traces"
    spool = Spool(tmp_path / "spool.db")
    provider = provider_with(
        MqttSpanExporter(lambda build: spool.put(topic, build), device="pi-1", wall=lambda: 5.0),
        ratio=0.0,
    )
    run_call(CallTracer(provider.get_tracer("t")), result="failed")
    provider.shutdown()
    spool.close()
    reopened = Spool(tmp_path / "spool.db")  # as after a restart with the broker down
    (entry,) = reopened.pending()
    assert entry.topic == topic
    assert json.loads(entry.payload)["seq"] == entry.seq  # the spool's own seq, in the message
    names = [s.name for s in decode_otlp_json(entry.payload).resource_spans[0].scope_spans[0].spans]
    assert names == [*PHASES, "call"]
    reopened.close()


def test_a_failing_exporter_does_not_break_the_call_or_the_others() -> None:
    class Broken(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            raise OSError("disk full")

    good = InMemorySpanExporter()
    provider = provider_with(Broken(), good)
    run_call(CallTracer(provider.get_tracer("t")))
    assert len(good.get_finished_spans()) == len(PHASES) + 1
    provider.shutdown()


# -- OTLP/HTTP -----------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]]
    got_one: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.got_one.set()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_http_export_reaches_a_local_receiver() -> None:
    received: list[tuple[str, str, bytes]] = []
    got_one = threading.Event()
    handler = type("Handler", (_Receiver,), {"received": received, "got_one": got_one})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"  # base URL: /v1/traces added
        provider = provider_with(background=[otlp_http_exporter(url, {"x-tenant": "t1"})])
        tracer = CallTracer(provider.get_tracer("t"))
        run_call(tracer)
        assert provider.force_flush(10_000)
        assert got_one.wait(10)
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    spans = []
    for path, ctype, body in received:
        assert path == "/v1/traces"
        assert ctype == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    assert sorted(s.name for s in spans) == sorted([*PHASES, "call"])
    assert {s.trace_id.hex() for s in spans} == {tracer.trace_id}


# -- sampling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "kept"),
    [
        ({}, False),
        ({"result": "failed"}, True),
        ({"result": "missed"}, True),
        ({"mos": 3.2}, True),
        ({"alert": True}, True),
    ],
)
def test_ratio_zero_keeps_only_failed_or_poor_calls(kwargs: dict[str, object], kept: bool) -> None:
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter, ratio=0.0)
    run_call(CallTracer(provider.get_tracer("t")), **kwargs)  # type: ignore[arg-type]
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ([*PHASES, "call"] if kept else [])  # every span of a kept call
    provider.shutdown()


def test_an_error_in_one_phase_keeps_a_completed_call() -> None:
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter, ratio=0.0)
    tracer = CallTracer(provider.get_tracer("t"))
    tracer.start_call("c-7", "incoming", "x")
    tracer.begin_phase("ice.connect")
    tracer.end_phase("ice.connect", error="first pair failed")
    tracer.end_call("completed", {"call.mos_avg": 4.4})
    assert [s.name for s in exporter.get_finished_spans()] == ["ice.connect", "call"]
    provider.shutdown()


def test_ratio_decision_is_deterministic_by_trace_id() -> None:
    low, high = 0x1234 << 64 | 0x10, 0x1234 << 64 | 0xF000_0000_0000_0000
    assert ratio_keeps(low, 0.5) and not ratio_keeps(high, 0.5)
    assert not ratio_keeps(low, 0.0) and ratio_keeps(high, 1.0)
    # Through the processor: ratio 1 keeps good calls, and the choice follows the trace id.
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter, ratio=0.5)
    kept = 0
    for _ in range(200):
        exporter.clear()
        tracer = CallTracer(provider.get_tracer("t"))
        run_call(tracer)
        spans = exporter.get_finished_spans()
        assert tracer.trace_id is not None
        assert bool(spans) == ratio_keeps(int(tracer.trace_id, 16), 0.5)
        kept += bool(spans)
    assert 60 < kept < 140
    provider.shutdown()


def test_spans_ending_after_the_root_follow_its_decision() -> None:
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter, ratio=0.0)
    t = provider.get_tracer("t")
    for result, expect in (("failed", ["call", "late"]), ("completed", [])):
        exporter.clear()
        root = t.start_span("call")
        late = t.start_span("late", context=trace.set_span_in_context(root))
        root.set_attribute("call.result", result)
        root.end()
        late.end()
        assert [s.name for s in exporter.get_finished_spans()] == expect
    provider.shutdown()


def test_open_traces_are_exported_at_shutdown_and_buffers_are_bounded() -> None:
    from edgeagent.telemetry.tracing import TailSampler

    exporter = InMemorySpanExporter()
    sampler = TailSampler([exporter], sampler_ratio=0.0, max_spans_per_trace=3)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(sampler)
    t = provider.get_tracer("t")
    root = t.start_span("call")
    ctx = trace.set_span_in_context(root)
    for i in range(4):
        t.start_span(f"child{i}", context=ctx).end()
    # The buffer bound flushed the first three early, as kept: nothing is lost.
    assert [s.name for s in exporter.get_finished_spans()] == ["child0", "child1", "child2"]
    provider.shutdown()  # the root never ended (a crash mid-call): its buffer is kept
    assert [s.name for s in exporter.get_finished_spans()][-1] == "child3"
