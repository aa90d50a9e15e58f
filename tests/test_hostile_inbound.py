"""Hostile input on every topic a running agent process subscribes to.

One real agent (`python -m edgeagent run`) on a real mosquitto, fed a table of bad
payloads on its command topics (`<root>/cmd/+`), its signaling inbox (`<root>/signal`)
and the retained status of a peer it has called (`<prefix>/<peer>/status`). Each
command gets the one final answer with the code protocol section 3 gives it; each
unusable signaling message is answered (a reject) where it names a sender and a call,
and reported as an event; statuses it cannot use are logged. Afterwards the process is
alive, still on its first broker connection, answers a signed `ping`, has no traceback
in its log, and stops cleanly.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from agent_support import AgentProcess, Collector, Received, collector
from aiortc import RTCPeerConnection
from call_support import SHELL_SDP, alsa_env, endpoint_config
from joserfc import jws
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.call.ice import ice_configuration, restrict_host_addresses
from edgeagent.control.keys import (
    EDDSA_REGISTRY,
    command_claims,
    generate_keypair,
    load_private_key,
    sign_command,
)

pytestmark = [pytest.mark.broker]

DEVICE = "dev-h"
ROOT = f"edge/v1/{DEVICE}"
PEER = "peer-h"  # calls the device for real, so the device watches its status
EVIL = "evil-1"  # the sender of most hostile signaling
REPLIES = "test/replies"
# Markers of an exception that escaped its handler, in the agent's log.
CRASH_MARKERS = ("Traceback", "Task exception was never retrieved", "Exception in callback")


class Keys:
    """The operator key the device trusts, and one it does not."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.op, public, _ = generate_keypair("op")
        self.stranger, _, _ = generate_keypair("stranger")
        self.trusted = directory / "trusted-keys.json"
        entry = {"kid": "op", "public_key": public, "roles": ["operate"]}
        self.trusted.write_text(json.dumps({"keys": [entry]}))

    def token(self, cmd: str, arguments: dict[str, Any] | None = None, **over: Any) -> str:
        claims = command_claims(DEVICE, cmd, arguments)
        claims.update(over)
        return sign_command(self.op, "op", claims)

    def raw(self, payload: bytes, *, header: dict[str, Any] | None = None) -> str:
        """A JWS signed by the trusted key over `payload` bytes as they are (not JSON, maybe)."""
        protected = header or {"alg": "EdDSA", "kid": "op"}
        key = load_private_key(self.op)
        return str(jws.serialize_compact(protected, payload, key, registry=EDDSA_REGISTRY))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def flip_signature(token: str) -> str:
    """The same token with one bit of its signature flipped (still canonical base64url)."""
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 0x01
    return f"{head}.{body}.{b64(bytes(raw))}"


# --- commands: (case, topic command, payload, expected code, expected id) ----------------

ANY = object()  # the answer's id is not checked
ALG_NONE = b'{"alg":"none","kid":"op"}'
REPLIES_TO_OFFER = ("answer", "reject", "hangup")  # a hangup: aiortc refused the offer
CALL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def command_cases(keys: Keys) -> list[tuple[str, str, bytes, int, Any]]:
    now = int(time.time())

    def claims() -> bytes:
        return json.dumps(command_claims(DEVICE, "ping")).encode()

    def jti_of(token: str) -> str:
        body = token.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(body + "=="))["jti"])

    def signed(cmd: str = "ping", arguments: dict[str, Any] | None = None, **over: Any) -> bytes:
        """A request signed by the trusted key; `over` replaces claims (`args` too)."""
        return keys.token(cmd, arguments, **over).encode()

    deep_claims = (
        b'{"jti":"j-deep","sub":"dev-h","cmd":"ping","iat":1,"exp":2,"args":{"a":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}}"
    )
    expired = keys.token("ping", iat=now - 200, exp=now - 100)
    untrusted = sign_command(keys.stranger, "stranger", command_claims(DEVICE, "ping"))
    long_name = "x" * 5000
    cases: list[tuple[str, str, bytes, int, Any]] = [
        ("non-utf8", "ping", b"\xff\xfe\xfd\x00\x80\xc3\x28", 400, None),
        ("not-json", "ping", b"hello, world", 400, None),
        ("empty", "ping", b"", 400, None),
        ("json-list", "ping", b"[1, 2, 3]", 400, None),
        ("json-number", "ping", b"42", 400, None),
        ("json-null", "ping", b"null", 400, None),
        ("json-nan", "ping", b'{"jti": NaN, "iat": Infinity, "exp": -Infinity}', 401, None),
        ("unsigned-claims", "ping", claims(), 401, ANY),
        ("just-over-16k", "ping", b"a" * (16 * 1024 + 1), 413, None),
        ("far-over-16k", "ping", b"a." * (450 * 1024), 413, None),
        ("deep-lists", "ping", b"[" * 16000, 400, None),
        ("deep-objects", "ping", b'{"a":' * 3200, 401, None),
        ("deep-header", "ping", f"{b64(b'[' * 5000)}.{b64(b'{}')}.AAAA".encode(), 400, None),
        ("deep-claims", "ping", keys.raw(deep_claims).encode(), 400, None),
        ("claims-not-json", "ping", keys.raw(b"\xff not json").encode(), 400, None),
        ("claims-a-list", "ping", keys.raw(b"[1]").encode(), 400, None),
        ("claims-missing", "ping", keys.raw(b'{"jti": "j-miss"}').encode(), 400, "j-miss"),
        ("jti-number", "ping", signed(jti=12345), 400, None),
        ("jti-very-long", "ping", signed(jti="a" * 5000), 400, None),
        ("iat-string", "ping", signed(jti="j-iat-s", iat="now"), 400, "j-iat-s"),
        ("iat-negative", "ping", signed(jti="j-iat-n", iat=-5), 400, "j-iat-n"),
        ("exp-enormous", "ping", signed(jti="j-exp-e", exp=10**30), 400, "j-exp-e"),
        ("exp-float", "ping", signed(jti="j-exp-f", exp=now + 0.5), 400, "j-exp-f"),
        ("exp-before-iat", "ping", signed(jti="j-exp-b", exp=now - 1, iat=now), 400, "j-exp-b"),
        ("args-a-list", "ping", signed(jti="j-args-l", args=[1, 2]), 400, "j-args-l"),
        ("args-unknown", "ping", signed(arguments={"bogus": 1}), 400, ANY),
        ("args-wrong-type", "logs", signed("logs", {"lines": "many"}), 400, ANY),
        ("args-negative", "logs", signed("logs", {"lines": -1}), 400, ANY),
        ("args-enormous", "logs", signed("logs", {"lines": 10**30}), 400, ANY),
        (
            "args-long-string",
            "set_log_level",
            signed("set_log_level", {"level": "D" * 9000}),
            400,
            ANY,
        ),
        ("unknown-command", "frobnicate", signed("frobnicate"), 404, ANY),
        ("unknown-long-name", long_name, signed(long_name), 404, ANY),
        ("cmd-of-other-topic", "ping", signed("info"), 400, ANY),
        ("other-device", "ping", signed(sub="dev-zz"), 403, ANY),
        ("bad-signature", "ping", flip_signature(keys.token("ping")).encode(), 401, ANY),
        ("untrusted-key", "ping", untrusted.encode(), 401, jti_of(untrusted)),
        ("alg-none", "ping", f"{b64(ALG_NONE)}.{b64(claims())}.".encode(), 401, ANY),
        ("expired", "ping", expired.encode(), 410, jti_of(expired)),
        ("not-yet-valid", "ping", signed(iat=now + 3600, exp=now + 3660), 410, ANY),
        ("lives-too-long", "ping", signed(iat=now, exp=now + 10**6), 410, ANY),
    ]
    return cases


def props(correlation: bytes, response_topic: str | None = REPLIES) -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        p.ResponseTopic = response_topic
    p.CorrelationData = correlation
    return p


async def ask(
    client: aiomqtt.Client,
    c: Collector,
    case: str,
    cmd: str,
    payload: bytes,
    *,
    response_topic: str | None = REPLIES,
) -> tuple[dict[str, Any], Received]:
    """Publish one request; its final answer (skipping a 202) and the message it came in."""
    correlation = f"case:{case}".encode()
    await client.publish(
        f"{ROOT}/cmd/{cmd}", payload, qos=1, properties=props(correlation, response_topic)
    )

    def final(ms: list[Received]) -> tuple[dict[str, Any], Received] | None:
        for m in ms:
            answer = "/cmd/" not in m.topic  # not the request itself, echoed to the collector
            if answer and getattr(m.properties, "CorrelationData", None) == correlation:
                body = m.json()
                if body["code"] != 202:
                    return body, m
        return None

    got: tuple[dict[str, Any], Received] = await c.wait_for(final, 15)
    return got


# --- signaling ----------------------------------------------------------------------------


def signal(
    type_: str = "offer", call_id: str = "s-1", sender: str = EVIL, **over: Any
) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": 1, "type": type_, "call_id": call_id, "from": sender}
    msg |= {"to": DEVICE, "ts": time.time()}
    if type_ in ("offer", "answer"):
        msg["sdp"] = SHELL_SDP
    msg.update(over)
    return msg


def enc(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


def with_field(msg: dict[str, Any], name: str, raw: bytes) -> bytes:
    """`msg` as JSON with one more field whose value is `raw` JSON text, as it is."""
    return enc(msg)[:-1] + b', "' + name.encode() + b'": ' + raw + b"}"


MEDIA = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
VIDEO_ONLY = SHELL_SDP.replace(MEDIA, "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n").replace(
    "opus/48000/2", "VP8/90000"
)
assert "m=audio" not in VIDEO_ONLY


def sdp_with(base: str, lines: Callable[[int], str], budget: int = 40 * 1024) -> str:
    """`base` followed by as many generated lines as fit in `budget` bytes."""
    out, n = [base], 0
    size = len(base)
    while size < budget:
        line = lines(n)
        out.append(line)
        size += len(line)
        n += 1
    return "".join(out)


def usable_offers(base: str) -> list[tuple[str, str]]:
    """(call_id, SDP): variations of a real aiortc offer that pass the agent's own SDP check
    and reach aiortc; the audio section is the last one, so lines appended go into it."""
    # What each added section needs to get past aiortc's own first checks.
    transport = "".join(
        line + "\r\n"
        for line in base.split("\r\n")
        if line.startswith(("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:"))
    )
    return [
        ("a-plain", base),
        ("a-candidates", sdp_with(base, lambda n: (
            f"a=candidate:{n} 1 udp {2130706431 - n} 10.9.{n // 250}.{n % 250 + 1} "
            f"{1024 + n} typ host\r\n"))),
        ("a-bad-candidates", sdp_with(base, lambda n: f"a=candidate:{'x' * (n % 40)} 1 udp\r\n",
                                      8 * 1024)),
        ("a-m-lines", sdp_with(base, lambda n: (
            f"m=application {9 + n} UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:x{n}\r\n"
            f"{transport}"))),
        ("a-video-lines", sdp_with(base, lambda n: (
            f"m=video 9 UDP/TLS/RTP/SAVPF {96 + n % 30}\r\na=mid:v{n}\r\n"
            f"a=rtpmap:{96 + n % 30} VP8/90000\r\na=rtcp-mux\r\n{transport}"))),
        ("a-text-line", f"{base}m=text 9 RTP/AVP 98\r\na=mid:t\r\n{transport}"),
        ("a-rtpmap-junk", sdp_with(base, lambda n: f"a=rtpmap:{128 + n} x{'y' * n}/-1/{n}\r\n",
                                   16 * 1024)),
        ("a-huge-numbers", re.sub(r"m=audio \d+ ", "m=audio 99999999999999999999 ", base)
            .replace("opus/48000/2", "opus/99999999999999999999/99999")),
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def real_offer() -> AsyncIterator[str]:
    """The SDP of a real aiortc offer on loopback (the offering end stays up meanwhile)."""
    pc = RTCPeerConnection(ice_configuration())
    try:
        pc.addTransceiver("audio")
        restrict_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
        yield pc.localDescription.sdp
    finally:
        await pc.close()


@contextlib.asynccontextmanager
async def agent_process(
    tmp_path: Path, port: int, monkeypatch: pytest.MonkeyPatch, keys: Keys
) -> AsyncIterator[AgentProcess]:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg = endpoint_config(
        tmp_path,
        port,
        DEVICE,
        alsa,
        answer="auto",
        call="connect_timeout_s = 5.0",
        # Every bad input is to be seen as its own event, not as a count of suppressed ones.
        extra=f'[security]\nkeys_file = "{keys.trusted}"\n[telemetry]\nevents_burst = 100000\n',
    )
    agent = AgentProcess(
        cfg, env={"ALSA_CONFIG_PATH": str(alsa.conf)}, args=("--log-level", "DEBUG")
    )
    agent.start()
    try:
        yield agent
    finally:
        agent.stop_quietly()


async def test_hostile_input_on_every_inbound_topic(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    keys = Keys(tmp_path / "keys")
    async with (
        real_offer() as base_offer,
        collector(broker.port, "edge/v1/#", f"{REPLIES}/#") as c,
        agent_process(tmp_path, broker.port, monkeypatch, keys) as agent,
        aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client,
    ):
        await c.wait_for(
            lambda ms: [m for m in ms if m.topic == f"{ROOT}/status"
                        and m.json()["state"] == "online"], 30)  # fmt: skip
        proc = agent.proc
        assert proc is not None

        # --- 1. commands --------------------------------------------------------------
        wrong: list[str] = []
        for case, cmd, payload, code, rid in command_cases(keys):
            body, _ = await ask(client, c, case, cmd, payload)
            if body["code"] != code or body["ok"] or (rid is not ANY and body["id"] != rid):
                wrong.append(f"{case}: {body}")
            assert proc.poll() is None, f"the agent died on command case {case}"
        # A request the broker does not deliver (over the agent's MQTT 5 maximum packet
        # size) is no request: nothing to answer, nothing to die of.
        await client.publish(f"{ROOT}/cmd/ping", b"a" * (2 * 1024 * 1024), qos=1)
        # Replayed: the first use runs, the second is refused.
        token = keys.token("ping").encode()
        first, _ = await ask(client, c, "replay-1", "ping", token)
        again, _ = await ask(client, c, "replay-2", "ping", token)
        if first["code"] != 200 or again["code"] != 410:
            wrong.append(f"replayed: {first} then {again}")
        # A Response Topic the device must not follow: answered on cmd-res/<id>, saying so.
        tok = keys.token("ping")
        body, where = await ask(client, c, "rt-wildcard", "ping", tok.encode(),
                                response_topic="test/+/#")  # fmt: skip
        jti = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))["jti"]
        if where.topic != f"{ROOT}/cmd-res/{jti}" or "wildcard" not in body.get("warning", ""):
            wrong.append(f"rt-wildcard: {where.topic} {body}")
        # No Response Topic at all (as from MQTT 3.1.1): answered on cmd-res/<id>.
        bad = flip_signature(keys.token("ping", jti="j-no-rt"))
        body, where = await ask(client, c, "no-rt", "ping", bad.encode(), response_topic=None)
        if where.topic != f"{ROOT}/cmd-res/j-no-rt" or body["code"] != 401:
            wrong.append(f"no-rt: {where.topic} {body}")
        assert not wrong, "wrong answers:\n" + "\n".join(wrong)

        # --- 2. signaling -------------------------------------------------------------
        def reject_to(sender: str, call_id: str) -> Callable[[list[Received]], Any]:
            def find(ms: list[Received]) -> Any:
                for m in ms:
                    if m.topic == f"edge/v1/{sender}/signal":
                        body = m.json()
                        if body["call_id"] == call_id and body["type"] == "reject":
                            return body
                return None

            return find

        def event_with(text: str, since: int) -> Callable[[list[Received]], Any]:
            def find(ms: list[Received]) -> Any:
                for m in ms[since:]:
                    if m.topic == f"{ROOT}/events" and text in m.json()["message"]:
                        return m.json()
                return None

            return find

        # (case, payload, expected reject reason or None for none, text of the event)
        deep = b"[" * 30000 + b"]" * 30000
        unsent: list[tuple[str, bytes, str | None, str]] = [
            ("non-utf8", b"\xff\xfe\xfd\x00\x80", None, "not JSON"),
            ("not-json", b"hello, world", None, "not JSON"),
            ("empty", b"", None, "not JSON"),
            ("json-list", b"[1, 2, 3]", None, "invalid signaling message"),
            ("json-number", b"42", None, "invalid signaling message"),
            ("json-null", b"null", None, "invalid signaling message"),
            ("just-over-64k", b" " * (64 * 1024 + 1), None, "exceeds"),
            ("far-over-64k", b" " * (900 * 1024), None, "exceeds"),
            ("deep-100000", b"[" * 100000 + b"]" * 100000, None, "exceeds"),
            ("deep-in-limit", b"[" * 30000, None, "rejected signaling message"),
            (
                "deep-in-a-field",
                with_field(signal(call_id="s-deep"), "x", deep),
                None,
                "nested too deeply",
            ),
            ("nan-ts", enc(signal(call_id="s-nan"))[:-1] + b', "ts": NaN}', None, "not JSON"),
            (
                "missing-fields",
                enc({"v": 1, "type": "offer", "call_id": "s-miss", "from": EVIL}),
                "error",
                "invalid signaling message",
            ),
            ("v-string", enc(signal(call_id="s-vstr", v="1")), "error", "invalid"),
            ("ts-string", enc(signal(call_id="s-tstr", ts="now")), "error", "invalid"),
            ("ts-infinite", with_field(signal(call_id="s-inf"), "ts", b"1e400"), None, "invalid"),
            ("call-id-number", enc(signal(call_id=5)), None, "invalid signaling message"),
            (
                "unknown-type",
                enc(signal("candidate", call_id="s-cand", candidate="x")),
                "error",
                "invalid signaling message",
            ),
            ("v-negative", enc(signal(call_id="s-vneg", v=-1)), "error", "unsupported version"),
            ("v-enormous", enc(signal(call_id="s-vbig", v=10**30)), "error", "unsupported"),
            (
                "to-someone-else",
                enc(signal(call_id="s-to", to="dev-other")),
                "error",
                "addressed to",
            ),
            ("call-id-very-long", enc(signal(call_id="c" * 20000)), None, "bad call_id"),
            ("call-id-slash", enc(signal(call_id="a/b/#")), None, "bad call_id"),
            (
                "sender-wildcard",
                enc(signal(call_id="s-wild", sender="evil/#")),
                None,
                "bad sender id",
            ),
            ("sender-nul", enc(signal(call_id="s-nul", sender="evil\x00x")), None, "bad sender id"),
            (
                "sender-very-long",
                enc(signal(call_id="s-long", sender="e" * 20000)),
                None,
                "bad sender id",
            ),
            (
                "bad-traceparent",
                enc(signal(call_id="s-tp", traceparent="x" * 5000)),
                "error",
                "malformed traceparent",
            ),
            ("sdp-empty", enc(signal(call_id="s-sdp0", sdp="")), "error", "without an audio SDP"),
            ("sdp-null", enc(signal(call_id="s-sdpn", sdp=None)), "error", "without an audio"),
            ("sdp-number", enc(signal(call_id="s-sdp5", sdp=5)), "error", "invalid"),
            (
                "sdp-video-only",
                enc(signal(call_id="s-video", sdp=VIDEO_ONLY)),
                "error",
                "without an audio SDP",
            ),
            (
                "sdp-truncated",
                enc(signal(call_id="s-trunc", sdp=SHELL_SDP[:70])),
                "error",
                "unusable offer",
            ),
            (
                "sdp-binary",
                enc(signal(call_id="s-bin", sdp="\x00\x01\xff\ufffd m=audio \x7f" * 50)),
                "error",
                "unusable offer",
            ),
            (
                "sdp-two-audio",
                enc(signal(call_id="s-two", sdp=SHELL_SDP + SHELL_SDP[30:])),
                "error",
                "audio sections",
            ),
            (
                "sdp-no-fingerprint",
                enc(
                    signal(
                        call_id="s-nofp",
                        sdp="".join(
                            x + "\r\n" for x in SHELL_SDP.split("\r\n") if "fingerprint" not in x
                        ),
                    )
                ),
                "error",
                "fingerprint",
            ),
            (
                "sdp-setup-junk",
                enc(signal(call_id="s-setup", sdp=SHELL_SDP.replace("actpass", "\u2603" * 3000))),
                "error",
                "DTLS setup role",
            ),
        ]
        for case, payload, reason, text in unsent:
            since = len(c.messages)
            await client.publish(f"{ROOT}/signal", payload, qos=1)
            said = await c.wait_for(event_with(text, since), 15)
            assert said["category"] == "call.signaling" or said["category"] == "call.incoming", (
                case,
                said,
            )
            if reason is not None:
                msg = json.loads(payload) if payload.startswith(b"{") else {}
                got = await c.wait_for(reject_to(msg["from"], msg["call_id"]), 15)
                assert got["reason"] == reason, (case, got)
            assert proc.poll() is None, f"the agent died on signaling case {case}"
        # Nothing may have been sent to a sender id that is not one, nor with a call_id
        # that is not one.
        odd = [
            m.topic[:80]
            for m in c.messages
            if m.topic.endswith("/signal") and m.topic.split("/")[2] not in (EVIL, PEER, DEVICE)
        ]
        assert not odd, odd
        odd_ids = [
            m.json()["call_id"][:40]
            for m in c.messages
            if m.topic == f"edge/v1/{EVIL}/signal"
            and (len(m.json()["call_id"]) > 64 or not CALL_ID.fullmatch(m.json()["call_id"]))
        ]
        assert not odd_ids, odd_ids

        # Messages of calls that do not exist: nothing to answer, nothing to die of.
        strays = [
            signal("answer", call_id="s-stray-a"),
            signal("hangup", call_id="s-stray-h", reason="x" * 5000),
            signal("reject", call_id="s-stray-r", reason="busy"),
        ]
        for msg in strays:
            await client.publish(f"{ROOT}/signal", enc(msg), qos=1)

        # Offers the checks pass, with SDP that aiortc has to take apart: each is answered
        # (or refused, saying why), and the caller's hangup ends it.
        summaries: dict[str, dict[str, Any]] = {}
        for call_id, sdp in usable_offers(base_offer):
            msg = signal(call_id=call_id, sender=PEER, sdp=sdp)
            msg["ts"] = -1e300  # the far end's clock: not ours to trust
            await client.publish(f"{ROOT}/signal", enc(msg), qos=1)

            def reply(ms: list[Received], call_id: str = call_id) -> Any:
                for m in ms:
                    if m.topic == f"edge/v1/{PEER}/signal":
                        body = m.json()
                        if body["call_id"] == call_id and body["type"] in REPLIES_TO_OFFER:
                            return body
                return None

            got = await c.wait_for(reply, 20)
            if got["type"] == "answer":
                await client.publish(
                    f"{ROOT}/signal", enc(signal("hangup", call_id, PEER, reason="bye")), qos=1
                )
            summary = await c.wait_for(
                lambda ms, call_id=call_id: [
                    m.json() for m in ms if m.topic == f"{ROOT}/calls/{call_id}/summary"
                ],
                20,
            )
            summaries[call_id] = summary[0]
            assert proc.poll() is None, f"the agent died on offer {call_id}"
        # Each was answered (and ended by the caller's hangup), or refused saying what is
        # wrong with it: no bare failure.
        for call_id, s in summaries.items():
            said = [
                e
                for e in (m.json() for m in c.messages if m.topic == f"{ROOT}/events")
                if e.get("call_id") == call_id and e["category"] in ("call.closed", "call.incoming")
            ]
            last = said[-1]["message"] if said else ""
            assert s["end_reason"] == "remote_hangup" or "unusable offer" in last, (
                call_id,
                s,
                last,
            )
            print(f"offer {call_id}: {s['result']} ({s['end_reason']}): {last[:160]}")

        # Calls this device places (a signed `dial`), answered badly by the far end.
        def sent_to_peer(call_id: str, kind: str) -> Callable[[list[Received]], Any]:
            def find(ms: list[Received]) -> Any:
                for m in ms:
                    if m.topic == f"edge/v1/{PEER}/signal":
                        body = m.json()
                        if body["call_id"] == call_id and body["type"] == kind:
                            return body
                return None

            return find

        no_fingerprint = "".join(
            line for line in base_offer.splitlines(True) if not line.startswith("a=fingerprint")
        )
        for call_id, replies, end in (
            # An answer from someone else is reported and ignored; one without SDP is
            # refused; the far end's reject, with a reason far too long, ends the call.
            ("o-wrong-sender", [signal("answer", "o-wrong-sender", EVIL),
                                signal("answer", "o-wrong-sender", PEER, sdp=""),
                                signal("reject", "o-wrong-sender", PEER, reason="r" * 5000)],
             "rejected_unknown"),
            ("o-no-fingerprint", [signal("answer", "o-no-fingerprint", PEER, sdp=no_fingerprint)],
             "error"),
            # Our own offer back as the answer (setup actpass, the same ICE credentials).
            ("o-echoed-offer", [signal("answer", "o-echoed-offer", PEER, sdp="ECHO")], "error"),
        ):  # fmt: skip
            dialed, _ = await ask(
                client, c, f"dial-{call_id}", "dial",
                keys.token("dial", {"peer": PEER, "call_id": call_id}).encode(),
            )  # fmt: skip
            assert dialed["code"] == 200, dialed
            ours = await c.wait_for(sent_to_peer(call_id, "offer"), 15)
            for reply in replies:
                if reply.get("sdp") == "ECHO":
                    reply["sdp"] = ours["sdp"]
                await client.publish(f"{ROOT}/signal", enc(reply), qos=1)
            summary = await c.wait_for(
                lambda ms, call_id=call_id: [
                    m.json() for m in ms if m.topic == f"{ROOT}/calls/{call_id}/summary"
                ],
                20,
            )
            assert summary[0]["end_reason"] == end, summary[0]
            assert proc.poll() is None, f"the agent died on the answer to {call_id}"
        await c.wait_for(event_with("expected peer-h", 0), 5)
        refused = await c.wait_for(sent_to_peer("o-wrong-sender", "reject"), 5)
        assert refused["reason"] == "error"

        # --- 3. the retained status of a peer it watches -----------------------------
        status_topic = f"edge/v1/{PEER}/status"
        good = {"v": 1, "device": PEER, "ts": time.time(), "state": "online", "session": 3}
        statuses: list[tuple[bytes, bool]] = [
            (b"\xff\xfe\xfd", True),
            (b"hello", False),
            (b"[1, 2]", False),
            (b"42", False),
            (b"null", False),
            (b"[" * 100000 + b"]" * 100000, False),
            (with_field(good, "x", deep), True),
            (with_field(good, "ts", b"NaN"), False),
            (with_field(good, "ts", b"1e400"), False),
            (enc(good | {"ts": -5}), False),
            (enc(good | {"ts": 1e300}), False),
            (enc(good | {"session": 10**30}), False),
            (enc(good | {"session": "x"}), False),
            (enc(good | {"state": "s" * 100000}), False),
            (enc(good | {"state": "offline", "reason": "r" * 100000}), False),
            (enc({"v": 1}), False),
            (b" " * (900 * 1024), True),
            (enc(good), True),
        ]
        for payload, retain in statuses:
            await client.publish(status_topic, payload, qos=1, retain=retain)
        # In order on one connection: once this offer is answered, every status before it
        # was handled.
        await client.publish(f"{ROOT}/signal", enc(signal(call_id="s-probe", v=2)), qos=1)
        await c.wait_for(reject_to(EVIL, "s-probe"), 15)
        await client.publish(status_topic, b"", qos=1, retain=True)

        # --- 4. afterwards --------------------------------------------------------------
        assert proc.poll() is None, "the agent died"
        final, _ = await ask(client, c, "final-ping", "ping", keys.token("ping").encode())
        assert final["code"] == 200 and final["ok"], final
        assert final["result"]["pong"] is True and final["result"]["device"] == DEVICE
        # Every command was audited: one `cmd` event per final answer.
        answers = [
            m.json()
            for m in c.messages
            if getattr(m.properties, "CorrelationData", b"").startswith(b"case:")
            and "/cmd/" not in m.topic
            and m.json()["code"] != 202
        ]

        def audit(ms: list[Received]) -> list[dict[str, Any]]:
            events = (m.json() for m in ms if m.topic == f"{ROOT}/events")
            return [e for e in events if e["category"] == "cmd"]

        await c.wait_for(lambda ms: len(audit(ms)) >= len(answers), 15)
        audited = audit(c.messages)
        assert sorted(e["data"]["code"] for e in audited) == sorted(a["code"] for a in answers)
        births = [
            m for m in c.messages if m.topic == f"{ROOT}/status" and m.json()["state"] == "online"
        ]
        assert len(births) == 1, "the agent lost its broker connection on the way"
        assert agent.terminate(20) == 0

    log = agent.output()
    crashes = [log[max(0, i - 300) : i + 3000] for m in CRASH_MARKERS if (i := log.find(m)) >= 0]
    assert not crashes, "\n...\n".join(crashes)
    assert "connection lost" not in log
    # What could not be answered was said, not dropped: stray signals and bad statuses.
    assert "signaling: answer for unknown call s-stray-a" in log
    assert "signaling: reject for unknown call s-stray-r" in log
    assert f"signaling: hangup of s-stray-h from {EVIL}: not our call" in log
    assert log.count(f"calls: unusable status from {PEER}") >= 10, log[-5000:]
