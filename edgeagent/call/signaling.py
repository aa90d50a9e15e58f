"""Signaling messages of protocol section 4: decoding with clear errors, building, policy checks.

Pure: no MQTT, no aiortc. The call manager decodes every inbound message here
and answers what is wrong instead of dropping it silently.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from edgeagent.telemetry.payloads import PROTOCOL_VERSION, Signal, encode

# `\Z`, not `$`: `$` also matches before a trailing newline ("peer-1\n" would pass).
ENDPOINT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
CALL_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}\Z"
CALL_ID = re.compile(CALL_ID_PATTERN)
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
MAX_SIGNAL_BYTES = 64 * 1024
REJECT_REASONS = ("busy", "forbidden", "unavailable", "error")
MAX_REASON_CHARS = 64

_decoder = msgspec.json.Decoder(Signal)


class SignalError(Exception):
    """An inbound signaling message that cannot be used; says what is wrong."""

    def __init__(self, message: str, *, call_id: str | None = None, sender: str | None = None):
        super().__init__(message)
        self.call_id = call_id
        self.sender = sender


def decode_signal(payload: bytes, *, me: str) -> Signal:
    """Decode and check one message addressed to endpoint `me`."""
    if len(payload) > MAX_SIGNAL_BYTES:
        raise SignalError(f"message of {len(payload)} bytes exceeds {MAX_SIGNAL_BYTES}")
    try:
        msg = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise SignalError(f"invalid signaling message: {exc}", **_peek(payload)) from None
    except msgspec.DecodeError as exc:
        raise SignalError(f"not JSON: {exc}") from None
    except RecursionError:
        raise SignalError("JSON nested too deeply", **_peek(payload)) from None
    # Only well-formed ids address a reject: a sender id becomes a topic level (a wildcard
    # or a NUL there fails the publish, or gets the link disconnected by the broker).
    ids = {
        "call_id": msg.call_id if CALL_ID.match(msg.call_id) else None,
        "sender": msg.from_ if ENDPOINT_ID.match(msg.from_) else None,
    }
    if msg.v != PROTOCOL_VERSION:
        raise SignalError(f"unsupported version {str(msg.v)[:32]}", **ids)
    if ids["sender"] is None:
        raise SignalError(f"bad sender id {msg.from_[:64]!r}", **ids)
    if ids["call_id"] is None:
        raise SignalError(f"bad call_id {msg.call_id[:64]!r}", **ids)
    if msg.to != me:
        raise SignalError(f"addressed to {msg.to[:64]!r}, not {me!r}", **ids)
    if msg.type in ("offer", "answer") and (not msg.sdp or "m=audio" not in msg.sdp):
        raise SignalError(f"{msg.type} without an audio SDP", **ids)
    if (
        msg.type == "offer"
        and msg.traceparent is not None
        and not TRACEPARENT.match(msg.traceparent)
    ):
        raise SignalError(f"malformed traceparent {msg.traceparent!r}", **ids)
    reason = msg.reason
    if reason is not None:
        # The far end's words end up in our summaries and events: keep them short, and a
        # reject's reason to the protocol's four.
        if msg.type == "reject" and reason not in REJECT_REASONS:
            msg = msgspec.structs.replace(msg, reason="unknown")
        elif len(reason) > MAX_REASON_CHARS:
            msg = msgspec.structs.replace(msg, reason=reason[:MAX_REASON_CHARS] + "...")
    return msg


def _peek(payload: bytes) -> dict[str, str | None]:
    """Best-effort call_id and sender of an invalid message, so the reject can be addressed."""
    try:
        raw = msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    call_id, sender = raw.get("call_id"), raw.get("from")
    return {
        "call_id": call_id if isinstance(call_id, str) and CALL_ID.match(call_id) else None,
        "sender": sender if isinstance(sender, str) and ENDPOINT_ID.match(sender) else None,
    }


@dataclass(frozen=True, slots=True)
class Outbound:
    topic: str
    payload: bytes


def build(
    kind: str,
    *,
    prefix: str,
    me: str,
    to: str,
    call_id: str,
    ts: float,
    sdp: str | None = None,
    traceparent: str | None = None,
    token: str | None = None,
    reason: str | None = None,
) -> Outbound:
    """A message from `me` to `to`, ready to publish on the peer's signal topic."""
    msg = Signal(
        v=PROTOCOL_VERSION,
        type=kind,  # type: ignore[arg-type]
        call_id=call_id,
        from_=me,
        to=to,
        ts=ts,
        sdp=sdp,
        traceparent=traceparent,
        token=token,
        reason=reason,
    )
    return Outbound(f"{prefix}/{to}/signal", encode(msg))


_SETUP_ROLES = ("actpass", "active", "passive")


def sdp_problem(sdp: str | None) -> str | None:
    """Why a remote SDP cannot make a call with us, in words an operator can act on; None
    if it can. Checked before aiortc sees it: aiortc fails on these with bare internal
    errors (an AssertionError, a KeyError), and on a missing fingerprint only after ICE
    connects, inside a task of its own."""
    if not sdp:
        return "no SDP"
    lines = [line.strip() for line in sdp.splitlines()]
    sections: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    session, media = sections[0], sections[1:]
    audio = [m for m in media if m[0].startswith("m=audio ")]
    if not audio:
        return "no audio section (m=audio)"
    if len(audio) > 1:
        return f"{len(audio)} audio sections; one is supported"
    section = audio[0]

    def attr(name: str) -> list[str]:
        found = [x[len(name) + 3 :] for x in section if x.startswith(f"a={name}:")]
        return found or [x[len(name) + 3 :] for x in session if x.startswith(f"a={name}:")]

    if not attr("fingerprint"):
        return "no DTLS fingerprint (a=fingerprint): the call could not be encrypted"
    setup = attr("setup")
    if not setup or setup[0] not in _SETUP_ROLES:
        return (
            f"DTLS setup role {setup[0] if setup else 'missing'}; need actpass, active or passive"
        )
    if not attr("ice-ufrag") or not attr("ice-pwd"):
        return "no ICE credentials (a=ice-ufrag, a=ice-pwd)"
    fields = section[0].split()
    payload_types = set(fields[3:])
    codecs = {}
    for value in attr("rtpmap"):
        pt, _, name = value.partition(" ")
        if pt in payload_types:
            codecs[pt] = name.split("/")[0].lower()
    if "opus" not in codecs.values():
        offered = ", ".join(sorted(set(codecs.values()))) or "none named"
        return f"no common audio codec: Opus is required, the far end offers {offered}"
    return None


def caller_allowed(caller: str, allow: Iterable[str]) -> bool:
    allowed = list(allow)
    return "*" in allowed or caller in allowed


def new_call_id() -> str:
    return secrets.token_hex(8)


def new_traceparent() -> str:
    """A fresh W3C traceparent (sampled), for untraced calls; traced ones use the root span's."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id_of(traceparent: str | None) -> str | None:
    if traceparent and TRACEPARENT.match(traceparent):
        return traceparent.split("-")[1]
    return None


def traceparent_from_properties(props: Iterable[tuple[str, str]]) -> str | None:
    """A well-formed `traceparent` MQTT 5 user property, else None."""
    for key, value in props:
        if key.lower() == "traceparent" and TRACEPARENT.match(value):
            return value
    return None


def glare_winner(ours: str, theirs: str) -> str:
    """Both sides offered at once: the offer with the lower call_id wins, on both ends."""
    return ours if ours < theirs else theirs
