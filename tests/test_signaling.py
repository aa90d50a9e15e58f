"""Decoding inbound signaling messages (protocol section 4): what is refused, and why."""

from __future__ import annotations

import json

import pytest

from edgeagent.call import signaling as sig
from edgeagent.control.catalog import CommandError, decode_args, get_spec

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SDP = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


def message(**over: object) -> bytes:
    msg: dict[str, object] = {
        "v": 1,
        "type": "offer",
        "call_id": "c0ffee",
        "from": "peer-1",
        "to": "dev-1",
        "ts": 1.0,
        "sdp": SDP,
        "traceparent": TP,
    }
    msg.update(over)
    return json.dumps(msg).encode()


def test_a_well_formed_offer_decodes() -> None:
    msg = sig.decode_signal(message(), me="dev-1")
    assert (msg.type, msg.call_id, msg.from_) == ("offer", "c0ffee", "peer-1")


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("from", "peer-1\n", "bad sender id"),  # `$` alone would let a final newline through
        ("call_id", "c0ffee\n", "bad call_id"),
        ("traceparent", TP + "\n", "malformed traceparent"),
        ("from", "Peer-1", "bad sender id"),
        ("call_id", "a/b", "bad call_id"),
        ("to", "dev-2", "addressed to"),
        ("sdp", "v=0\r\n", "without an audio SDP"),
    ],
)
def test_bad_ids_and_fields_are_refused_with_the_reason(field: str, value: str, why: str) -> None:
    with pytest.raises(sig.SignalError, match=why):
        sig.decode_signal(message(**{field: value}), me="dev-1")


def test_a_refused_message_keeps_only_ids_that_are_safe_to_address() -> None:
    with pytest.raises(sig.SignalError) as err:
        sig.decode_signal(message(v=2), me="dev-1")
    assert (err.value.call_id, err.value.sender) == ("c0ffee", "peer-1")
    with pytest.raises(sig.SignalError) as err:
        sig.decode_signal(message(ts="x", **{"from": "p\n"}), me="dev-1")
    assert err.value.sender is None  # never a reject to ".../p\n/signal"


def test_dial_refuses_a_peer_id_with_a_trailing_newline() -> None:
    spec = get_spec("dial")
    assert decode_args(spec, {"peer": "peer-1"}) is not None
    with pytest.raises(CommandError) as err:
        decode_args(spec, {"peer": "peer-1\n"})
    assert err.value.code == 400


def test_json_nested_too_deeply_is_refused_with_the_ids_it_can_read() -> None:
    deep = message()[:-1] + b', "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    with pytest.raises(sig.SignalError, match="nested too deeply") as err:
        sig.decode_signal(deep, me="dev-1")
    assert err.value.sender in ("peer-1", None)  # never an unhandled RecursionError


def test_far_end_reasons_are_bounded_before_they_reach_summaries() -> None:
    reject = sig.decode_signal(message(type="reject", sdp=None, reason="x" * 60_000), me="dev-1")
    assert reject.reason == "unknown"  # not one of busy|forbidden|unavailable|error
    assert (
        sig.decode_signal(message(type="reject", sdp=None, reason="busy"), me="dev-1").reason
        == "busy"
    )
    hangup = sig.decode_signal(message(type="hangup", sdp=None, reason="y" * 60_000), me="dev-1")
    assert hangup.reason is not None and len(hangup.reason) <= sig.MAX_REASON_CHARS + 3


FINGERPRINT = ":".join(["AB"] * 32)
GOOD_SDP = f"""v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
a=group:BUNDLE 0
m=audio 9 UDP/TLS/RTP/SAVPF 111 0
c=IN IP4 0.0.0.0
a=mid:0
a=rtpmap:111 opus/48000/2
a=rtpmap:0 PCMU/8000
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwx
a=fingerprint:sha-256 {FINGERPRINT}
a=setup:actpass
"""


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda s: s.replace("a=fingerprint", "a=x-fingerprint"), "no DTLS fingerprint"),
        (lambda s: s.replace("a=setup:actpass", "a=setup:holdconn"), "setup role holdconn"),
        (lambda s: s.replace("a=setup:actpass\n", ""), "setup role missing"),
        (lambda s: s.replace("a=ice-pwd", "a=x-pwd"), "no ICE credentials"),
        (lambda s: s.replace("111 0", "0").replace("a=rtpmap:111", "a=x"), "offers pcmu"),
        (lambda s: s + s[s.index("m=audio") :], "2 audio sections"),
        (lambda s: s.replace("m=audio", "m=video"), "no audio section"),
    ],
)
def test_an_sdp_aiortc_would_fail_on_is_named_before_it_gets_there(edit, why) -> None:  # type: ignore[no-untyped-def]
    assert sig.sdp_problem(GOOD_SDP) is None
    problem = sig.sdp_problem(edit(GOOD_SDP))
    assert problem is not None and why in problem


def test_session_level_attributes_count_for_the_audio_section() -> None:
    fingerprint = next(x for x in GOOD_SDP.splitlines() if x.startswith("a=fingerprint"))
    moved = GOOD_SDP.replace(fingerprint + "\n", "").replace("t=0 0", "t=0 0\n" + fingerprint)
    assert fingerprint in moved.split("m=audio")[0]
    assert sig.sdp_problem(moved) is None
