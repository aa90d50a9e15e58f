"""Every payload the device publishes (protocol sections 1-4), as typed msgspec Structs.

These types are the single source of the JSON Schemas in `edgeagent/schemas/`
(regenerate with `python -m edgeagent.telemetry.payloads`); tests validate every
emitted message against those files. Fields beyond the protocol's are additions,
never renames. Optional fields are omitted when unset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import msgspec

PROTOCOL_VERSION = 1

Level = Literal["debug", "info", "warning", "error", "fatal"]
HealthState = Literal[
    "idle", "ringing", "connecting", "good", "degraded", "bad", "fault", "offline"
]


class _Payload(msgspec.Struct, kw_only=True, omit_defaults=True):
    v: int
    device: str
    ts: float


class Status(_Payload):
    state: Literal["online", "offline", "lost"]
    session: int
    boot_id: str
    version: str
    reason: str | None = None


class Info(_Payload):
    versions: dict[str, str]
    device_model: str
    capabilities: list[str]
    commands: list[dict[str, Any]]
    config_hash: str
    session: int
    boot_id: str
    security: dict[str, str] = msgspec.field(default_factory=dict)
    topic_root: str = ""


class Throttled(msgspec.Struct, kw_only=True):
    now: list[str]
    since_boot: list[str]
    raw: int | None = None


class CallCounters(msgspec.Struct, kw_only=True):
    active: int
    total: int
    failed: int
    failure_rate: float


class SpoolCounters(msgspec.Struct, kw_only=True):
    pending: int
    dropped: int
    unstored: int = 0  # not stored at all (filesystem full even after dropping the oldest)


class Metrics(_Payload):
    uptime_s: float
    cpu_pct: float | None
    load_1m: float | None
    mem_available_mb: float | None
    rss_mb: float | None
    temp_c: float | None
    throttled: Throttled | None
    disk_free_mb: float | None
    net: dict[str, Any]
    calls: CallCounters
    spool: SpoolCounters
    session: int | None = None
    extra: dict[str, Any] | None = None


class Health(_Payload):
    state: HealthState
    reasons: list[str]


class Event(_Payload):
    seq: int
    level: Level
    category: str
    message: str
    data: dict[str, Any] | None = None
    call_id: str | None = None
    trace_id: str | None = None


class Alert(_Payload):
    seq: int
    name: str
    state: Literal["firing", "resolved"]
    severity: Literal["info", "warning", "critical"]
    value: float | None
    threshold: float | None
    message: str
    runbook: str | None = None
    call_id: str | None = None
    since: float | None = None
    trace_id: str | None = None


class AudioQuality(msgspec.Struct, kw_only=True, omit_defaults=True):
    tx_level_dbfs: float | None
    rx_level_dbfs: float | None
    noise_floor_dbfs: float | None
    clipping_pct: float
    echo_likelihood: float | None
    underruns: int
    overruns: int
    echo_delay_ms: float | None = None
    erle_db: float | None = None
    concealed_frames: int | None = None
    plc_frames: int | None = None  # of concealed: synthesised by libopus PLC
    fec_frames: int | None = None  # of concealed: recovered from in-band FEC
    decode_errors: int | None = None  # packets that arrived but could not be decoded
    late_packets: int | None = None  # arrived after a newer one, or twice: dropped
    tx_speech_level_dbfs: float | None = None
    rx_clipping_pct: float | None = None
    issues: list[str] | None = None


class Quality(_Payload):
    call_id: str
    mos: float | None
    r_factor: float | None
    loss_pct: float | None
    jitter_ms: float | None
    rtt_ms: float | None
    codec: str | None
    bitrate_kbps: float | None
    playout_delay_ms: float | None
    audio: AudioQuality
    direction: str | None = None
    remote_loss_pct: float | None = None
    remote_mos: float | None = None
    trace_id: str | None = None


class IcePair(msgspec.Struct, kw_only=True):
    local_type: str | None
    remote_type: str | None


class OpusSummary(msgspec.Struct, kw_only=True):
    """How Opus ran in a call, so an operator can tell whether loss was covered by FEC."""

    encoder: str  # "libopus <version>" through ctypes, or "pyav"
    decoder: str  # "libopus_plc" (PLC and FEC) or "pyav_fade" (the playout buffer's fade)
    bitrate_kbps: float
    complexity: int
    fec_to_far_end: bool  # the far end decodes in-band FEC, so we send it under loss
    fec_sent: bool  # a loss hint above 0 put FEC into our packets during the call
    max_loss_hint_pct: int
    fec_from_far_end: bool  # the far end sends FEC under loss (what the MOS model assumes)


class Summary(_Payload):
    seq: int
    call_id: str
    trace_id: str | None
    direction: Literal["incoming", "outgoing"]
    peer: str
    result: Literal["completed", "failed", "rejected", "missed"]
    end_reason: str
    setup_ms: float | None
    duration_s: float
    codec: str | None
    mos_avg: float | None
    mos_min: float | None
    loss_pct: float | None
    jitter_ms_avg: float | None
    rtt_ms_avg: float | None
    audio_issues: dict[str, Any]
    ice: IcePair
    started_ts: float | None = None
    playout: dict[str, Any] | None = None
    opus: OpusSummary | None = None
    # Device-scope alerts firing while the call ran (thermal_throttled, memory_low, ...):
    # a bad call on a throttled device says so in its own record.
    device_alerts: list[str] | None = None
    # A call the agent did not live to end (end_reason `agent_lost`), summarised at the
    # next start: the crash report that start wrote about the previous run, if any.
    crash_id: str | None = None
    # Seconds of the connected call in stats windows with no inbound packet at all
    # (each counted as 100 % loss in loss_pct and MOS): a media outage, not jitter.
    no_media_s: float | None = None


class Traces(_Payload):
    """Spans on `traces`: an OTLP/JSON ExportTraceServiceRequest plus this envelope.

    `resourceSpans` is OTLP/JSON as the OpenTelemetry protocol defines it (hex ids,
    integer enums); `seq` orders it with the other spooled messages.
    """

    seq: int
    resource_spans: list[dict[str, Any]] = msgspec.field(name="resourceSpans")


class ExceptionInfo(msgspec.Struct, kw_only=True):
    type: str
    message: str
    frames: list[dict[str, Any]]


class Crash(_Payload):
    seq: int
    crash_id: str
    kind: Literal["exception", "fatal_signal", "watchdog", "unclean_shutdown"]
    fingerprint: str
    breadcrumbs: list[dict[str, Any]]
    logs: list[str]
    snapshot: dict[str, Any]
    app_version: str
    python: str
    os: str
    device_model: str
    boot_id: str
    exception: ExceptionInfo | None = None
    signal: str | None = None
    trace_id: str | None = None
    call_id: str | None = None
    crashed_ts: float | None = None


class CommandResponse(_Payload):
    id: str | None
    cmd: str | None
    ok: bool
    code: int
    result: Any = None
    error: str | None = None
    truncated: bool | None = None
    warning: str | None = None  # added: e.g. why the request's Response Topic was not followed


class Signal(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A signaling message (protocol section 4); sent by every endpoint kind."""

    v: int
    type: Literal["offer", "answer", "reject", "hangup"]
    call_id: str
    to: str
    ts: float
    from_: str = msgspec.field(name="from")
    sdp: str | None = None
    traceparent: str | None = None
    token: str | None = None
    reason: str | None = None


SCHEMA_TYPES: dict[str, type[msgspec.Struct]] = {
    "status": Status,
    "info": Info,
    "metrics": Metrics,
    "health": Health,
    "event": Event,
    "alert": Alert,
    "quality": Quality,
    "summary": Summary,
    "crash": Crash,
    "traces": Traces,
    "command_response": CommandResponse,
    "signal": Signal,
}

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

_encoder = msgspec.json.Encoder()


def encode(payload: msgspec.Struct) -> bytes:
    """Wire bytes for a payload."""
    return _encoder.encode(payload)


# JSON Schema (ECMA-262) patterns; `$` there is the end of the text.
_ENDPOINT_ID_SCHEMA = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}

# What protocol section 4 requires of each message type beyond the common fields.
_SIGNAL_RULES: list[dict[str, Any]] = [
    {
        "if": {"properties": {"type": {"const": "offer"}}},
        "then": {"required": ["sdp", "traceparent"]},
    },
    {"if": {"properties": {"type": {"const": "answer"}}}, "then": {"required": ["sdp"]}},
    {
        "if": {"properties": {"type": {"const": "reject"}}},
        "then": {
            "required": ["reason"],
            "properties": {"reason": {"enum": ["busy", "forbidden", "unavailable", "error"]}},
        },
    },
    {"if": {"properties": {"type": {"const": "hangup"}}}, "then": {"required": ["reason"]}},
]


def schema_for(name: str) -> dict[str, Any]:
    """The JSON Schema of one payload type, self-contained.

    msgspec's schema plus what its types cannot say: `v` is the protocol version,
    endpoint ids have the protocol's shape, and each signaling message type carries
    the fields section 4 gives it."""
    schema: dict[str, Any] = msgspec.json.schema(SCHEMA_TYPES[name])
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"edgeagent v{PROTOCOL_VERSION} {name}"
    body = schema["$defs"][SCHEMA_TYPES[name].__name__]
    props = body.get("properties", {})
    if "v" in props:
        props["v"] = {"type": "integer", "const": PROTOCOL_VERSION}
    for key in ("device", "from", "to"):
        if key in props and props[key] == {"type": "string"}:
            props[key] = dict(_ENDPOINT_ID_SCHEMA)
    if name == "signal":
        body["allOf"] = _SIGNAL_RULES
    return schema


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMA_TYPES:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(schema_for(name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    for p in write_schemas(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        sys.stderr.write(f"wrote {p}\n")
