"""Call tracing end to end: real agents, a real mosquitto, OTLP/JSON on MQTT and OTLP/HTTP."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from agent_support import Received, collector
from aiortc import RTCPeerConnection
from alsa_support import tone
from call_support import alsa_env, endpoint_config, running, until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from schema_support import assert_valid, validator
from tcp_relay import TcpRelay

from edgeagent.call.ice import restrict_host_addresses
from edgeagent.telemetry.payloads import Signal, encode
from edgeagent.telemetry.tracing import decode_otlp_json

pytestmark = [pytest.mark.broker, pytest.mark.slow]

OUTGOING = [
    "signaling.offer",
    "ice.gathering",
    "signaling.answer_wait",
    "ice.connect",
    "dtls",
    "media.first_packet",
    "call.active",
    "teardown",
]
"""An outgoing call's phases in the order they begin."""
INCOMING = [
    "signaling.answer",
    "ice.gathering",
    "ice.connect",
    "dtls",
    "media.first_packet",
    "call.active",
    "teardown",
]
BROWSER_TRACE = "0af7651916cd43dd8448eb211c80319c"
BROWSER_SPAN = "b7ad6b7169203331"


# -- helpers -------------------------------------------------------------------------


@dataclass
class Exported:
    """One span as it arrived, with the resource and the message it came in."""

    span: Span
    resource: dict[str, str]
    seq: int | None = None


def resource_of(rs: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in rs.resource.attributes}


def spans_of(request: ExportTraceServiceRequest, seq: int | None = None) -> list[Exported]:
    return [
        Exported(span, resource_of(rs), seq)
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


def mqtt_spans(messages: list[Received], device: str) -> list[Exported]:
    """Spans from `traces` messages: schema-valid envelope, valid OTLP/JSON, with seq."""
    out: list[Exported] = []
    for m in messages:
        if m.topic != f"edge/v1/{device}/traces":
            continue
        raw = m.json()
        validator("traces").validate(raw)
        assert isinstance(raw["seq"], int) and raw["device"] == device
        out += spans_of(decode_otlp_json(m.payload), raw["seq"])
    return out


def tree(spans: list[Exported]) -> tuple[Span, dict[str, Span]]:
    """The root and its children by name; every span of the call once, all in one trace."""
    (root,) = [e.span for e in spans if e.span.name == "call"]
    children = [e.span for e in spans if e.span.name != "call"]
    named = {s.name: s for s in children}
    assert len(named) == len(children), [s.name for s in children]  # no phase twice
    for s in children:
        assert s.parent_span_id == root.span_id, s.name
        assert s.trace_id == root.trace_id, s.name
    return root, named


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


def begins_in_order(named: dict[str, Span], order: list[str]) -> None:
    starts = [named[n].start_time_unix_nano for n in order]
    assert starts == sorted(starts), list(zip(order, starts, strict=True))
    for span in named.values():
        assert span.end_time_unix_nano >= span.start_time_unix_nano


def with_root(device: str) -> Any:
    def predicate(ms: list[Received]) -> list[Exported] | None:
        spans = mqtt_spans(ms, device)
        return spans if any(e.span.name == "call" for e in spans) else None

    return predicate


class _Handler(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A tiny OTLP/HTTP collector on 127.0.0.1: (base URL, requests received)."""
    requests: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


# -- a real call ---------------------------------------------------------------------


async def test_a_call_between_two_agents_is_one_trace_on_mqtt_and_otlp(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    with otlp_receiver() as (url, otlp):
        extra = f'[tracing]\notlp_endpoint = "{url}"\notlp_timeout_s = 2.0\n'
        cfg_a = endpoint_config(
            tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 20), extra=extra
        )
        cfg_b = endpoint_config(
            tmp_path, broker.port, "dev-b", alsa, mic=tone(1000, 20), extra=extra
        )
        async with (
            collector(broker.port, "edge/v1/#") as c,
            running(cfg_a) as a,
            running(cfg_b) as b,
        ):
            call = await a.calls_mgr.dial("dev-b")
            trace_id = call.trace_id
            assert trace_id is not None and call.spans.trace_id == trace_id

            def heard(agent: Any) -> bool:
                active = agent.calls_mgr.active
                session = active.session if active else None
                sink = session.sink if session else None
                return sink is not None and sink.frames_received >= 25

            await until(lambda: heard(a) and heard(b))
            # A quality alert during the call becomes a span event on call.active.
            a.calls_mgr.note_alert("mos_low", "firing", "warning", 2.9, call.call_id)
            # A crash report written now names the active call's trace.
            report = a.crash_guard.record_exception(RuntimeError("probe"), fatal=False)
            await a.calls_mgr.hangup()
            spans_a = await c.wait_for(with_root("dev-a"))
            spans_b = await c.wait_for(with_root("dev-b"))
            await c.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/summary")]) >= 2)
        # Both agents stopped: their OTLP/HTTP batches were flushed on the way out.

    # The span trees, on both sides.
    root_a, named_a = tree(spans_a)
    root_b, named_b = tree(spans_b)
    assert sorted(named_a) == sorted(OUTGOING)
    assert sorted(named_b) == sorted(INCOMING)
    begins_in_order(named_a, OUTGOING)
    begins_in_order(named_b, INCOMING)
    # One trace through the signaling: the callee's root continues the caller's root.
    assert root_a.trace_id.hex() == root_b.trace_id.hex() == trace_id
    assert root_a.parent_span_id == b""
    assert root_b.parent_span_id == root_a.span_id
    assert root_a.kind == Span.SPAN_KIND_CLIENT and root_b.kind == Span.SPAN_KIND_SERVER
    ra, rb = attrs(root_a), attrs(root_b)
    assert (ra["call.id"], ra["call.direction"], ra["call.peer"]) == (
        call.call_id,
        "outgoing",
        "dev-b",
    )
    assert (rb["call.id"], rb["call.direction"], rb["call.peer"]) == (
        call.call_id,
        "incoming",
        "dev-a",
    )
    assert ra["call.result"] == rb["call.result"] == "completed"
    assert (ra["call.end_reason"], rb["call.end_reason"]) == ("local_hangup", "remote_hangup")
    assert ra["call.codec"] == "opus" and ra["call.ice.local_type"] == "host"
    assert ra["call.setup_ms"] > 0
    assert root_a.status.code == Status.STATUS_CODE_UNSET
    assert attrs(named_a["ice.gathering"])["ice.candidates"] >= 1
    assert attrs(named_a["signaling.answer_wait"])["signal.reply"] == "answer"
    alert_events = [(e.name, attrs(e)) for e in named_a["call.active"].events]
    assert ("alert.firing", {"alert.name": "mos_low", "alert.severity": "warning"}) in [
        (n, {k: v for k, v in at.items() if k != "alert.value"}) for n, at in alert_events
    ]
    # Resource attributes name the device.
    res_a = spans_a[0].resource
    assert res_a["service.name"] == "edgeagent" and res_a["service.version"]
    assert res_a["device.id"] == "dev-a" and res_a["device.model.name"]
    assert res_a["os.description"]
    # Every spooled message carries its own seq (traces share the counter with events).
    seqs = [m.json()["seq"] for m in c.messages if m.topic == "edge/v1/dev-a/traces"]
    assert len(seqs) == len(set(seqs)) >= 1

    # The offer carried the root's traceparent, in the payload and as an MQTT 5 property.
    (offer,) = [
        m for m in c.messages if m.topic == "edge/v1/dev-b/signal" and m.json()["type"] == "offer"
    ]
    carried = offer.json()["traceparent"]
    version, tid, parent, flags = carried.split("-")
    assert (version, tid, parent) == ("00", trace_id, root_a.span_id.hex())
    assert int(flags, 16) & 1  # sampled (the SDK also sets W3C level 2's random bit)
    assert ("traceparent", carried) in offer.properties.UserProperty

    # Summaries, call events and the crash report carry the trace id.
    for m in c.messages:
        if not m.topic.endswith("/traces"):
            assert_valid(m.topic, m.payload)
    summaries = [m.json() for m in c.messages if m.topic.endswith(f"/calls/{call.call_id}/summary")]
    assert len(summaries) == 2 and {s["trace_id"] for s in summaries} == {trace_id}
    for device in ("dev-a", "dev-b"):
        events = [
            m.json()
            for m in c.messages
            if m.topic == f"edge/v1/{device}/events" and m.json().get("call_id") == call.call_id
        ]
        assert {"call.established", "call.closed"} <= {e["category"] for e in events}
        assert {e.get("trace_id") for e in events} == {trace_id}, device
    assert report is not None
    crash = json.loads(report.read_text())
    assert (crash["trace_id"], crash["call_id"]) == (trace_id, call.call_id)

    # OTLP/HTTP: the same spans, as protobuf ExportTraceServiceRequests.
    assert otlp, "the OTLP/HTTP receiver got nothing"
    by_device: dict[str, set[tuple[str, str]]] = {"dev-a": set(), "dev-b": set()}
    for path, ctype, body in otlp:
        assert (path, ctype) == ("/v1/traces", "application/x-protobuf")
        for e in spans_of(ExportTraceServiceRequest.FromString(body)):
            by_device[e.resource["device.id"]].add((e.span.trace_id.hex(), e.span.name))
    assert by_device["dev-a"] == {(trace_id, n) for n in ["call", *OUTGOING]}
    assert by_device["dev-b"] == {(trace_id, n) for n in ["call", *INCOMING]}


# -- a trace started elsewhere -------------------------------------------------------


async def test_an_operator_tools_traceparent_property_is_continued(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa)
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    offer_sdp = await pc.createOffer()
    assert restrict_host_addresses(pc, ["127.0.0.1"]) == 1  # loopback only, never eth0
    await pc.setLocalDescription(offer_sdp)
    # No traceparent field, as from a tool that sets only the MQTT 5 user property.
    offer = Signal(
        v=1,
        type="offer",
        call_id="op-call-1",
        to="dev-b",
        ts=1.0,
        from_="console-7",
        sdp=pc.localDescription.sdp,
    )
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("traceparent", f"00-{BROWSER_TRACE}-{BROWSER_SPAN}-01")]
    try:
        async with (
            collector(broker.port, "edge/v1/#") as c,
            running(cfg_b) as b,
            aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as op,
        ):
            await op.publish("edge/v1/dev-b/signal", encode(offer), qos=1, properties=props)
            await c.wait_for(lambda ms: [m for m in ms if m.topic == "edge/v1/console-7/signal"])
            assert b.calls_mgr.active is not None
            assert b.calls_mgr.active.trace_id == BROWSER_TRACE
            hangup = Signal(
                v=1, type="hangup", call_id="op-call-1", to="dev-b", ts=2.0, from_="console-7"
            )
            await op.publish("edge/v1/dev-b/signal", encode(hangup), qos=1)
            spans = await c.wait_for(with_root("dev-b"))
    finally:
        await pc.close()
    root, named = tree(spans)
    assert root.trace_id.hex() == BROWSER_TRACE
    assert root.parent_span_id.hex() == BROWSER_SPAN
    assert "signaling.answer" in named and "teardown" in named
    answer = next(m for m in c.messages if m.topic == "edge/v1/console-7/signal")
    assert answer.json()["type"] == "answer"
    (summary,) = [m.json() for m in c.messages if m.topic.endswith("/op-call-1/summary")]
    assert summary["trace_id"] == BROWSER_TRACE


# -- offline -------------------------------------------------------------------------


async def test_spans_recorded_while_the_broker_is_down_are_delivered_after(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    relay = TcpRelay(broker.port)
    await relay.start()
    # Sampling keeps no good call: only because this one fails is it exported.
    cfg = endpoint_config(
        tmp_path,
        relay.port,
        "dev-a",
        alsa,
        call="answer_timeout_s = 1.0",
        extra="[tracing]\nsample_ratio = 0.0\n",
    )
    try:
        async with running(cfg) as a:
            relay.set_open(False)
            broker.stop()
            await a.link.disconnected.wait()
            call = await a.calls_mgr.dial("dev-b")  # the offer cannot go out
            await until(lambda: a.calls_mgr.history and a.calls_mgr.history[-1] is call)
            await until(lambda: not call.spans.active)
            spooled = [e for e in a.spool.pending(1000) if e.topic == "edge/v1/dev-a/traces"]
            assert spooled, "no spans in the spool"
            broker.start()
            async with collector(broker.port, "edge/v1/dev-a/#") as c:
                relay.set_open(True)
                spans = await c.wait_for(with_root("dev-a"), timeout=20)
                await c.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/summary")])
    finally:
        await relay.stop()
    assert {e.seq for e in spans} == {e.seq for e in spooled}  # the spool's seq, delivered
    root, named = tree(spans)
    assert root.trace_id.hex() == call.trace_id
    assert root.status.code == Status.STATUS_CODE_ERROR
    ra = attrs(root)
    # The offer never left: the call says so, instead of waiting out answer_timeout.
    assert (ra["call.result"], ra["call.end_reason"]) == ("failed", "signaling_unavailable")
    assert {"signaling.offer", "ice.gathering", "teardown"} <= set(named)
    assert "signaling.answer_wait" not in named
    (summary,) = [m.json() for m in c.messages if m.topic.endswith("/summary")]
    assert summary["trace_id"] == call.trace_id and summary["result"] == "failed"
