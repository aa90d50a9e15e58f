"""Tracing: the injected provider, sampling that keeps bad calls, MQTT/OTLP export, call spans.

Sampling is a tail decision taken by `TailSampler`, a span processor: the SDK
samples every span (ALWAYS_ON), the processor buffers each trace's ended spans
until its local root (the span with no parent, or with a remote parent from an
incoming `traceparent`) ends, then exports the whole trace when it is worth
keeping, else with probability `sampler_ratio`, decided from the trace id
(like TraceIdRatioBased, so every device keeps or drops the same trace alike).
Kept always: any span with status ERROR, a root whose `call.result` is not
`completed`, a root whose `call.mos_avg` is below `poor_mos`, any span with an
`alert.*` event (a quality alert fired during the call). Spans ending after
their root follow the decision taken for it. Buffers are bounded: a trace that
outgrows `max_spans_per_trace`, or the oldest trace when more than
`max_open_traces` are open, is exported early as kept (never dropped).

Export: `exporters` run synchronously in the decision (the MQTT exporter writes
to the local spool, which does not fail offline, so nothing is lost); the
`background_exporters` (OTLP/HTTP, which blocks on the network) each sit behind
the SDK's BatchSpanProcessor on its own thread, which drops on failure: the
spool is the lossless path.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import platform
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes, AttributeValue

from edgeagent.telemetry import payloads as p

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

logger = logging.getLogger(__name__)

SERVICE_NAME = "edgeagent"
POOR_MOS = 3.5
ALERT_EVENT_PREFIX = "alert."
PHASES = (
    "signaling.offer",
    "signaling.answer_wait",
    "ice.gathering",
    "ice.connect",
    "dtls",
    "media.first_packet",
    "call.active",
    "teardown",
)
"""The phases of an outgoing call as the CallManager and CallSession record them."""
INCOMING_PHASES = (
    "ringing",
    "signaling.answer",
    "ice.gathering",
    "ice.connect",
    "dtls",
    "media.first_packet",
    "call.active",
    "teardown",
)
"""The phases of an incoming call (`ringing` only under the ring policy)."""
ENVELOPE_KEYS = ("v", "device", "ts", "seq")
"""Top-level keys the MQTT export adds next to `resourceSpans` (protocol envelope)."""

_PROPAGATOR = TraceContextTextMapPropagator()
_ID_KEYS = ("traceId", "spanId", "parentSpanId")
_RATIO_BITS = 64


# -- provider ----------------------------------------------------------------------


def build_resource(
    *, service_version: str, device_id: str, board_model: str, os_name: str
) -> Resource:
    return Resource.create(
        {
            "service.name": SERVICE_NAME,
            "service.version": service_version,
            "service.instance.id": device_id,
            "device.id": device_id,
            "device.model.name": board_model,
            "host.type": board_model,
            "os.type": "linux",
            "os.description": os_name,
        }
    )


def os_description() -> str:
    """The OS for the resource: os-release's PRETTY_NAME and the kernel, else platform()."""
    try:
        pretty = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        pretty = ""
    return f"{pretty} ({platform.release()})" if pretty else platform.platform()


def build_tracer_provider(
    *,
    service_version: str,
    device_id: str,
    board_model: str,
    os_name: str,
    exporters: Sequence[SpanExporter],
    background_exporters: Sequence[SpanExporter] = (),
    sampler_ratio: float = 1.0,
    poor_mos: float = POOR_MOS,
) -> TracerProvider:
    """A provider for injection (never set as global); call `shutdown()` on it when done."""
    provider = TracerProvider(
        sampler=ALWAYS_ON,
        resource=build_resource(
            service_version=service_version,
            device_id=device_id,
            board_model=board_model,
            os_name=os_name,
        ),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(
        TailSampler(
            exporters,
            background_exporters=background_exporters,
            sampler_ratio=sampler_ratio,
            poor_mos=poor_mos,
        )
    )
    return provider


# -- sampling ----------------------------------------------------------------------


def _is_local_root(span: ReadableSpan) -> bool:
    return span.parent is None or span.parent.is_remote


def _trace_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    return ctx.trace_id if ctx is not None else 0


def ratio_keeps(trace_id: int, ratio: float) -> bool:
    """The deterministic ratio decision of TraceIdRatioBased: low 64 bits below a bound."""
    bound = round(max(0.0, min(1.0, ratio)) * (1 << _RATIO_BITS))
    return (trace_id & ((1 << _RATIO_BITS) - 1)) < bound


def worth_keeping(root: ReadableSpan, spans: Sequence[ReadableSpan], poor_mos: float) -> bool:
    """True for a trace of a failed or poor call, or one with an error or a quality alert."""
    for span in (*spans, root):
        if span.status.status_code is StatusCode.ERROR:
            return True
        if any(e.name.startswith(ALERT_EVENT_PREFIX) for e in span.events):
            return True
    attrs = root.attributes or {}
    result = attrs.get("call.result")
    if result is not None and result != "completed":
        return True
    mos = attrs.get("call.mos_avg")
    return isinstance(mos, int | float) and mos < poor_mos


class TailSampler(SpanProcessor):
    """Buffers each trace until its local root ends, then keeps or drops it whole."""

    def __init__(
        self,
        exporters: Sequence[SpanExporter],
        *,
        background_exporters: Sequence[SpanExporter] = (),
        sampler_ratio: float = 1.0,
        poor_mos: float = POOR_MOS,
        max_open_traces: int = 256,
        max_spans_per_trace: int = 512,
        remembered_decisions: int = 1024,
    ) -> None:
        if not 0.0 <= sampler_ratio <= 1.0:
            raise ValueError("sampler_ratio must be within 0..1")
        self._exporters = list(exporters)
        self._background = [BatchSpanProcessor(e) for e in background_exporters]
        self._ratio = sampler_ratio
        self._poor_mos = poor_mos
        self._max_open = max_open_traces
        self._max_spans = max_spans_per_trace
        self._max_decisions = remembered_decisions
        self._open: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._decided: OrderedDict[int, bool] = OrderedDict()
        self._shutdown = False
        self._lock = threading.Lock()  # spans may end on any thread

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        if _is_local_root(span):
            with self._lock:
                self._decided.pop(_trace_id(span), None)  # a new local root decides afresh

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            if not self._shutdown:
                self._on_end(span)

    def _on_end(self, span: ReadableSpan) -> None:
        tid = _trace_id(span)
        if _is_local_root(span):
            buffered = self._open.pop(tid, [])
            keep = worth_keeping(span, buffered, self._poor_mos) or ratio_keeps(tid, self._ratio)
            self._remember(tid, keep)
            if keep:
                self._export([*buffered, span])
            return
        decided = self._decided.get(tid)
        if decided is not None:
            if decided:
                self._export([span])
            return
        buffered = self._open.setdefault(tid, [])
        buffered.append(span)
        if len(buffered) >= self._max_spans:
            logger.debug("tracing: trace %032x outgrew its buffer; exporting early", tid)
            self._export(self._open.pop(tid))
        elif len(self._open) > self._max_open:
            old_tid, old = self._open.popitem(last=False)
            logger.debug("tracing: too many open traces; exporting %032x early", old_tid)
            self._export(old)

    def _remember(self, tid: int, keep: bool) -> None:
        self._decided[tid] = keep
        self._decided.move_to_end(tid)
        while len(self._decided) > self._max_decisions:
            self._decided.popitem(last=False)

    def _export(self, spans: Sequence[ReadableSpan]) -> None:
        for exporter in self._exporters:
            try:
                result = exporter.export(spans)
            except Exception:  # export is best effort and must not break a call
                logger.warning("tracing: %s failed", type(exporter).__name__, exc_info=True)
                continue
            if result is not SpanExportResult.SUCCESS:
                logger.warning("tracing: %s did not export %d spans", type(exporter), len(spans))
        for processor in self._background:
            for span in spans:
                processor.on_end(span)

    def shutdown(self) -> None:
        """Export still-open traces as kept (a crash mid-call is worth keeping), then stop."""
        with self._lock:
            if self._shutdown:
                return
            while self._open:
                self._export(self._open.popitem(last=False)[1])
            self._shutdown = True
        for exporter in self._exporters:
            exporter.shutdown()
        for processor in self._background:
            processor.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        ok = True
        for processor in self._background:
            ok = processor.force_flush(timeout_millis) and ok
        return ok


# -- exporters ---------------------------------------------------------------------


# OTLP/JSON is written directly from the SDK's spans, as protobuf's MessageToDict writes
# the OTLP exporter's `encode_spans` request (omitted defaults, 64-bit integers as strings,
# integer enums, camelCase) but with hex ids. This keeps protobuf and the OTLP proto
# modules (about 3.5 MiB of RSS) out of the agent unless an OTLP/HTTP endpoint is set;
# tests compare both encoders on the same spans.
_SPAN_FLAGS_HAS_IS_REMOTE = 0x100
_SPAN_FLAGS_IS_REMOTE = 0x200


def _otlp_value(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": _otlp_double(value)}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    if isinstance(value, Sequence):
        values = [_otlp_value(v) for v in value]
        return {"arrayValue": {"values": values} if values else {}}
    if isinstance(value, Mapping):
        kvs = [{"key": str(k), "value": _otlp_value(v)} for k, v in value.items()]
        return {"kvlistValue": {"values": kvs} if kvs else {}}
    raise TypeError(f"invalid attribute type {type(value).__name__}")


def _otlp_double(value: float) -> float | str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _otlp_attributes(attributes: Attributes, out: dict[str, Any]) -> None:
    if not attributes:
        return
    encoded = []
    for key, value in attributes.items():
        try:
            encoded.append({"key": key, "value": _otlp_value(value)})
        except TypeError:
            logger.warning("tracing: cannot encode attribute %s", key, exc_info=True)
    if encoded:
        out["attributes"] = encoded


def _otlp_flags(parent: trace.SpanContext | None) -> int:
    flags = _SPAN_FLAGS_HAS_IS_REMOTE
    if parent is not None and parent.is_remote:
        flags |= _SPAN_FLAGS_IS_REMOTE
    return flags


def _otlp_counts(out: dict[str, Any], key: str, value: int | None) -> None:
    if value:
        out[key] = value


def _otlp_span(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    out: dict[str, Any] = {}
    if ctx is not None:
        out["traceId"] = format(ctx.trace_id, "032x")
        out["spanId"] = format(ctx.span_id, "016x")
        state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()) if ctx.trace_state else ""
        if state:
            out["traceState"] = state
    if span.parent is not None:
        out["parentSpanId"] = format(span.parent.span_id, "016x")
    if span.name:
        out["name"] = span.name
    out["kind"] = span.kind.value + 1  # OTLP SpanKind: the API's value plus one
    if span.start_time:
        out["startTimeUnixNano"] = str(span.start_time)
    if span.end_time:
        out["endTimeUnixNano"] = str(span.end_time)
    _otlp_attributes(span.attributes, out)
    _otlp_counts(out, "droppedAttributesCount", span.dropped_attributes)
    if span.events:
        events = []
        for event in span.events:
            e: dict[str, Any] = {}
            if event.timestamp:
                e["timeUnixNano"] = str(event.timestamp)
            if event.name:
                e["name"] = event.name
            _otlp_attributes(event.attributes, e)
            _otlp_counts(e, "droppedAttributesCount", event.dropped_attributes)
            events.append(e)
        out["events"] = events
    _otlp_counts(out, "droppedEventsCount", span.dropped_events)
    if span.links:
        links = []
        for link in span.links:
            lk: dict[str, Any] = {
                "traceId": format(link.context.trace_id, "032x"),
                "spanId": format(link.context.span_id, "016x"),
            }
            _otlp_attributes(link.attributes, lk)
            _otlp_counts(lk, "droppedAttributesCount", link.dropped_attributes)
            lk["flags"] = _otlp_flags(link.context)
            links.append(lk)
        out["links"] = links
    _otlp_counts(out, "droppedLinksCount", span.dropped_links)
    status: dict[str, Any] = {}
    if span.status.description:
        status["message"] = span.status.description
    if span.status.status_code.value:
        status["code"] = span.status.status_code.value
    out["status"] = status
    out["flags"] = _otlp_flags(span.parent)
    return out


def encode_otlp_dict(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """Spans as an OTLP/JSON document (`{"resourceSpans": [...]}`), not yet serialised."""
    grouped: dict[Resource, dict[Any, list[dict[str, Any]]]] = {}
    for span in spans:
        scopes = grouped.setdefault(span.resource, {})
        scopes.setdefault(span.instrumentation_scope or None, []).append(_otlp_span(span))
    resource_spans = []
    for resource, scopes in grouped.items():
        scope_spans = []
        for scope, encoded in scopes.items():
            scope_out: dict[str, Any] = {}
            if scope is not None:
                if scope.name:
                    scope_out["name"] = scope.name
                if scope.version:
                    scope_out["version"] = scope.version
                _otlp_attributes(scope.attributes, scope_out)
            entry: dict[str, Any] = {"scope": scope_out, "spans": encoded}
            if scope is not None and scope.schema_url:
                entry["schemaUrl"] = scope.schema_url
            scope_spans.append(entry)
        res: dict[str, Any] = {}
        _otlp_attributes(resource.attributes, res)
        rs: dict[str, Any] = {"resource": res, "scopeSpans": scope_spans}
        if resource.schema_url:
            rs["schemaUrl"] = resource.schema_url
        resource_spans.append(rs)
    return {"resourceSpans": resource_spans} if resource_spans else {}


def encode_otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """Spans as OTLP/JSON (`{"resourceSpans": [...]}`): hex ids, integer enums, camelCase."""
    return json.dumps(encode_otlp_dict(spans), separators=(",", ":")).encode()


def decode_otlp_json(payload: bytes | str) -> ExportTraceServiceRequest:
    """Parse OTLP/JSON back into the protobuf request (strict: unknown fields are errors)."""
    data = json.loads(payload)
    for key in ENVELOPE_KEYS:  # the MQTT export's envelope is not part of OTLP
        data.pop(key, None)
    _convert_ids(data, _hex_to_b64)
    # protobuf is imported here only: decoding is for tests and tools, not the agent.
    from google.protobuf import json_format  # type: ignore[import-untyped]
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    json_format.Parse(json.dumps(data), request)
    return request


def _convert_ids(data: dict[str, Any], conv: Callable[[str], str]) -> None:
    # OTLP/JSON writes trace and span ids as hex, not protobuf JSON's base64.
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for key in _ID_KEYS:
                        if isinstance(item.get(key), str) and item[key]:
                            item[key] = conv(item[key])


def _hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


SpoolPut = Callable[[Callable[[int], bytes]], object]
"""Commits a message built for the next spool seq (`Publisher.spool_bytes` bound to a topic)."""


class MqttSpanExporter(SpanExporter):
    """Writes span batches to the spool as `traces` messages: OTLP/JSON plus the envelope.

    Each message is `{"v", "device", "ts", "seq", "resourceSpans"}`; `decode_otlp_json`
    ignores the envelope. `put` must be synchronous and local (the spool), so export
    works offline and nothing is lost while the broker is away.
    """

    def __init__(
        self,
        put: SpoolPut,
        *,
        device: str,
        wall: Callable[[], float],
        max_spans_per_message: int = 100,
    ) -> None:
        self._put = put
        self._device = device
        self._wall = wall
        self._max = max_spans_per_message

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for start in range(0, len(spans), self._max):
            body = encode_otlp_dict(spans[start : start + self._max])
            message = p.Traces(
                v=p.PROTOCOL_VERSION,
                device=self._device,
                ts=round(self._wall(), 3),
                seq=0,
                resource_spans=body.get("resourceSpans", []),
            )
            self._put(functools.partial(_with_seq, message))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _with_seq(message: p.Traces, seq: int) -> bytes:
    return p.encode(msgspec.structs.replace(message, seq=seq))


def otlp_http_exporter(
    endpoint: str, headers: Mapping[str, str] | None = None, *, timeout_s: float = 10.0
) -> SpanExporter:
    """OTLP/HTTP protobuf exporter; a bare base URL gets the standard `/v1/traces` path."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    exporter: SpanExporter = OTLPSpanExporter(
        endpoint=endpoint, headers=dict(headers or {}), timeout=timeout_s
    )
    return exporter


# -- context helpers ---------------------------------------------------------------


def inject_traceparent(span: Span) -> str:
    """The W3C `traceparent` of `span`, for offers and MQTT 5 user properties."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def extract_context(traceparent: str | None) -> Context | None:
    """A context continuing the trace of an incoming `traceparent`; None if absent or invalid."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def trace_id_hex(span: Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


# -- call spans --------------------------------------------------------------------


class CallTracer:
    """The spans of one call: a root per call, its phases as children, events, the end.

    Phases are children of the root by explicit context (not the ambient one),
    so they may begin and end in different tasks.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._root: Span | None = None
        self._phases: dict[str, Span] = {}
        self._ended = False

    @property
    def root(self) -> Span | None:
        return self._root

    @property
    def active(self) -> bool:
        """True between `start_call` and `end_call`: phases may begin."""
        return self._root is not None and not self._ended

    @property
    def trace_id(self) -> str | None:
        """Hex trace id for events, summaries and crash reports; None before start or untraced."""
        if self._root is None or not self._root.get_span_context().is_valid:
            return None
        return trace_id_hex(self._root)

    def traceparent(self) -> str | None:
        """The root's `traceparent` for an outgoing offer."""
        if self._root is None or not self._root.get_span_context().is_valid:
            return None
        return inject_traceparent(self._root)

    def start_call(
        self, call_id: str, direction: str, peer: str, traceparent: str | None = None
    ) -> Span:
        """Open the root span, continuing the trace of an incoming `traceparent` if valid."""
        if self._root is not None:
            raise RuntimeError("call already started")
        parent = extract_context(traceparent)
        if traceparent and parent is None:
            logger.debug("call %s: ignoring invalid traceparent %r", call_id, traceparent)
        self._root = self._tracer.start_span(
            "call",
            context=parent,
            kind=SpanKind.SERVER if direction == "incoming" else SpanKind.CLIENT,
            attributes={"call.id": call_id, "call.direction": direction, "call.peer": peer},
        )
        return self._root

    def begin_phase(self, name: str, attrs: Mapping[str, AttributeValue] | None = None) -> Span:
        """Open a child span of the root; a phase of the same name still open is ended first."""
        root = self._require_root()
        self.end_phase(name)
        span = self._tracer.start_span(
            name, context=trace.set_span_in_context(root), attributes=attrs
        )
        self._phases[name] = span
        return span

    def phase_span(self, name: str) -> Span | None:
        """The open span of phase `name` (to add attributes), or None."""
        return self._phases.get(name)

    def end_phase(self, name: str, *, error: str | None = None) -> None:
        span = self._phases.pop(name, None)
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    @contextmanager
    def phase(self, name: str, attrs: Mapping[str, AttributeValue] | None = None) -> Iterator[Span]:
        """A phase as a block; an exception leaving it marks the span ERROR and propagates."""
        span = self.begin_phase(name, attrs)
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            self.end_phase(name, error=f"{type(exc).__name__}: {exc}")
            raise
        self.end_phase(name)

    def event(self, name: str, attrs: Mapping[str, AttributeValue] | None = None) -> None:
        """Add an event to the newest open phase, else to the root (no-op outside the call)."""
        if self._ended:
            return
        target = next(reversed(self._phases.values()), None) if self._phases else self._root
        if target is not None:
            target.add_event(name, attributes=attrs)

    def end_call(
        self,
        result: str,
        attrs: Mapping[str, AttributeValue] | None = None,
        *,
        end_reason: str | None = None,
    ) -> None:
        """End open phases and the root with `call.result` (ERROR status when failed).

        A failed call's open phases are where it failed: they end with ERROR too.
        """
        if self._root is None or self._ended:
            return
        failed = (end_reason or "call failed") if result == "failed" else None
        for name in list(self._phases):
            self.end_phase(name, error=failed)
        self._ended = True
        root = self._root
        root.set_attribute("call.result", result)
        if end_reason is not None:
            root.set_attribute("call.end_reason", end_reason)
        if attrs:
            root.set_attributes(attrs)
        if result == "failed":
            root.set_status(Status(StatusCode.ERROR, end_reason or "call failed"))
        root.end()

    def _require_root(self) -> Span:
        if self._root is None or self._ended:
            raise RuntimeError("no call in progress")
        return self._root
