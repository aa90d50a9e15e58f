"""Signed signaling end to end: real mosquitto, real agents, offers with and without tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from agent_support import Collector, collector
from alsa_support import active, hz_tolerance, peak_hz, read_raw, tone
from call_support import (
    SHELL_SDP,
    alsa_env,
    echo_peer,
    endpoint_config,
    events,
    running,
    summaries,
    until,
)
from schema_support import assert_valid

from edgeagent import ctl
from edgeagent.call import signaling as sig
from edgeagent.control.keys import call_claims, generate_keypair, sign_command

pytestmark = pytest.mark.broker

SDP = SHELL_SDP  # never applied: refused or policy-rejected


class Keys:
    """The operator's key, a caller device's call key, and a key nobody trusts, as files."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.private: dict[str, str] = {}
        entries = []
        for kid, grant in (
            ("op", {"roles": ["operate"]}),
            ("dev-a-call", {"commands": ["call"]}),
            ("stranger", None),
        ):
            private, public, _ = generate_keypair(kid)
            self.private[kid] = private
            (directory / f"{kid}.jwk.json").write_text(private)
            if grant is not None:
                entries.append({"kid": kid, "public_key": public, **grant})
        self.trusted = directory / "trusted-keys.json"
        self.trusted.write_text(json.dumps({"keys": entries}))

    def path(self, kid: str) -> Path:
        return self.dir / f"{kid}.jwk.json"

    def call_token(self, callee: str, call_id: str, *, kid: str = "op", **over: Any) -> str:
        claims = call_claims(callee, call_id)
        claims.update(over)
        return sign_command(self.private[kid], kid, claims)


def signed_security(keys: Keys, *, call_key: bool = False) -> str:
    text = f'[security]\nsignaling = "signed"\nkeys_file = "{keys.trusted}"\n'
    if call_key:
        text += f'call_key_file = "{keys.path("dev-a-call")}"\n'
    return text


def reply_to(messages: list[Any], caller: str, call_id: str) -> dict[str, Any] | None:
    """The callee's answer or reject of `call_id`, as the caller received it."""
    for m in messages:
        if m.topic == f"edge/v1/{caller}/signal":
            body = m.json()
            if body["call_id"] == call_id and body["type"] in ("answer", "reject"):
                return body  # type: ignore[no-any-return]
    return None


async def offer_and_wait(
    client: aiomqtt.Client, c: Collector, call_id: str, token: str | None, me: str = "dev-a"
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Offer `call_id` from `me` to dev-b; dev-b's reply, its summary and its events of it."""
    out = sig.build(
        "offer",
        prefix="edge/v1",
        me=me,
        to="dev-b",
        call_id=call_id,
        ts=time.time(),
        sdp=SDP,
        traceparent=sig.new_traceparent(),
        token=token,
    )
    start = len(c.messages)  # only what follows this offer (a call_id may come twice)
    await client.publish(out.topic, out.payload, qos=1)
    reply = await c.wait_for(lambda ms: reply_to(ms[start:], me, call_id))
    summary = await c.wait_for(
        lambda ms: [s for s in summaries(ms[start:], "dev-b") if s["call_id"] == call_id]
    )
    said = await c.wait_for(
        lambda ms: [e for e in events(ms[start:], "dev-b") if e.get("call_id") == call_id]
    )
    return reply, summary[0], said


async def test_a_signed_device_refuses_offers_without_a_good_token(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    keys = Keys(tmp_path / "keys")
    alsa = alsa_env(tmp_path, monkeypatch)
    # answer = "reject": an offer that passes the check is declined `unavailable`, not
    # `forbidden`, so each case is told apart without any media.
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, answer="reject", extra=signed_security(keys)
    )
    now = int(time.time())
    cases: list[tuple[str, str | None, str]] = [
        ("c-none", None, "no token (this device takes signed offers only)"),
        ("c-jti", keys.call_token("dev-b", "c-other"), "token jti is not this call_id"),
        ("c-sub", keys.call_token("dev-z", "c-sub"), "token is for 'dev-z', not 'dev-b'"),
        ("c-kid", keys.call_token("dev-b", "c-kid", kid="stranger"), "unknown kid 'stranger'"),
        (
            "c-old",
            keys.call_token("dev-b", "c-old", iat=now - 200, exp=now - 100),
            "token expired",
        ),
    ]
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_b) as b,
        aiomqtt.Client("127.0.0.1", broker.port) as client,
    ):
        assert b.info_payload().security == {"commands": "signed", "signaling": "signed"}
        for call_id, token, why in cases:
            reply, summary, said = await offer_and_wait(client, c, call_id, token)
            assert reply["type"] == "reject" and reply["reason"] == "forbidden", reply
            assert (summary["result"], summary["end_reason"]) == ("rejected", "forbidden")
            assert summary["direction"] == "incoming" and summary["peer"] == "dev-a"
            (event,) = said
            assert event["level"] == "warning" and event["category"] == "call.incoming"
            assert event["data"] == {"peer": "dev-a", "reason": "forbidden"}
            assert event["message"] == (
                f"call {call_id} from dev-a rejected (forbidden): offer token refused: {why}"
            )
        # A good token passes the check (then the answer policy declines the call) ...
        good = keys.call_token("dev-b", "c-good")
        reply, summary, _ = await offer_and_wait(client, c, "c-good", good)
        assert reply["reason"] == "unavailable" and summary["end_reason"] == "policy_reject"
        # ... once: the same token from another endpoint is a replay ...
        reply, summary, said = await offer_and_wait(client, c, "c-good", good, me="dev-c")
        assert reply["reason"] == "forbidden", reply
        assert said[-1]["message"].endswith("offer token refused: request id already seen (replay)")
        # ... and the caller's own offer again (a redelivery) gets its first answer again,
        # without a second record.
        start = len(c.messages)
        await client.publish(
            "edge/v1/dev-b/signal",
            sig.build(
                "offer",
                prefix="edge/v1",
                me="dev-a",
                to="dev-b",
                call_id="c-good",
                ts=time.time(),
                sdp=SDP,
                traceparent=sig.new_traceparent(),
                token=good,
            ).payload,
            qos=1,
        )
        reply = await c.wait_for(lambda ms: reply_to(ms[start:], "dev-a", "c-good"))
        assert reply["reason"] == "unavailable"
        assert b.calls_mgr.active is None
    records = [(s["call_id"], s["peer"]) for s in summaries(c.messages, "dev-b")]
    assert records.count(("c-good", "dev-a")) == 1
    for m in c.messages:
        assert_valid(m.topic, m.payload)


def heard(agent, frames: int = 100) -> bool:  # type: ignore[no-untyped-def]
    call = agent.calls_mgr.active
    session = call.session if call else None
    return bool(session and session.sink and session.sink.frames_received >= frames)


@pytest.mark.slow
async def test_a_device_with_a_call_key_calls_a_signed_device_with_audio(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    keys = Keys(tmp_path / "keys")
    alsa = alsa_env(tmp_path, monkeypatch)
    mic_a, mic_b = tone(440, 20), tone(1000, 20)
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=mic_a, extra=signed_security(keys, call_key=True)
    )
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, mic=mic_b, extra=signed_security(keys)
    )
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        call = await a.calls_mgr.dial("dev-b")
        await until(lambda: heard(a) and heard(b))
        offers = [
            m.json() for m in c.messages if m.topic == "edge/v1/dev-b/signal"
        ]  # what dev-a sent
        assert [o["type"] for o in offers] == ["offer"]
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))
    token = offers[0]["token"]
    assert token.count(".") == 2 and json.loads(_b64(token.split(".")[0])) == {
        "alg": "EdDSA",
        "kid": "dev-a-call",
    }
    assert sa[0]["call_id"] == sb[0]["call_id"] == call.call_id
    assert (sa[0]["result"], sb[0]["result"]) == ("completed", "completed"), (sa, sb)
    for device, freq in (("dev-a", 1000), ("dev-b", 440)):
        played = active(read_raw(tmp_path / f"spk_{device}.raw"))
        assert played.size >= 48000, f"{device} heard only {played.size} samples"
        assert abs(peak_hz(played) - freq) <= hz_tolerance(freq)


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


async def _ctl(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    """edgeagent-ctl in a worker thread (its own loop); its --json answer."""
    capsys.readouterr()
    rc = await asyncio.to_thread(ctl.main, argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if lines else {})


@pytest.mark.slow
async def test_dial_with_an_operator_minted_token_reaches_a_signed_device(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = Keys(tmp_path / "keys")
    alsa = alsa_env(tmp_path, monkeypatch)
    # dev-a has no call key of its own: it takes operator commands signed with "op".
    cfg_a = endpoint_config(
        tmp_path,
        broker.port,
        "dev-a",
        alsa,
        mic=tone(440, 20),
        extra=f'[security]\nkeys_file = "{keys.trusted}"\n',
    )
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, mic=tone(1000, 20), extra=signed_security(keys)
    )

    def dial(*args: str) -> list[str]:
        return ["cmd", "dev-a", "dial", "peer=dev-b", *args, "--json",
                "--port", str(broker.port), "--key", str(keys.path("op"))]  # fmt: skip

    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        # Without a token dev-b refuses the call.
        rc, resp = await _ctl(capsys, dial())
        assert rc == 0 and resp["code"] == 200, resp
        plain = resp["result"]["call_id"]
        summary = await c.wait_for(
            lambda ms: [s for s in summaries(ms, "dev-a") if s["call_id"] == plain]
        )
        assert summary[0]["end_reason"] == "rejected_forbidden"
        # A token for another call or peer is refused by dev-a before any offer.
        other = keys.call_token("dev-b", "op-call-2")
        rc, resp = await _ctl(capsys, dial("call_id=op-call-1", f"token={other}"))
        assert resp["code"] == 400 and "is not the call_id 'op-call-1'" in resp["error"], resp
        rc, resp = await _ctl(capsys, dial(f"token={other}"))
        assert resp["code"] == 400 and "needs the call_id" in resp["error"], resp
        # The operator mints the call's token: dev-a offers with it, dev-b answers.
        token = keys.call_token("dev-b", "op-call-1")
        rc, resp = await _ctl(capsys, dial("call_id=op-call-1", f"token={token}"))
        assert rc == 0 and resp["result"]["call_id"] == "op-call-1", resp
        await until(lambda: heard(a) and heard(b))
        await a.calls_mgr.hangup()
        sb = await c.wait_for(
            lambda ms: [s for s in summaries(ms, "dev-b") if s["call_id"] == "op-call-1"]
        )
    assert sb[0]["result"] == "completed", sb
    sent = [m.json() for m in c.messages if m.topic == "edge/v1/dev-b/signal"]
    assert [(o["call_id"], o.get("token")) for o in sent if o["type"] == "offer"] == [
        (plain, None),
        ("op-call-1", token),
    ]


@pytest.mark.slow
async def test_a_signed_echo_peer_answers_only_signed_offers(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    keys = Keys(tmp_path / "keys")
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=tone(700, 20), extra=signed_security(keys)
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa, extra=signed_security(keys))
    cfg_k = endpoint_config(
        tmp_path,
        broker.port,
        "dev-k",
        alsa,
        mic=tone(700, 20),
        # The echo of its own tone is AEC3's render: cancelling it from the mic as the
        # canceller converges would distort what is echoed back (not this test's point).
        extra=signed_security(keys, call_key=True) + "[audio.aec]\nenabled = false\n",
    )
    async with collector(broker.port, "edge/v1/#") as c, echo_peer(cfg_e) as echo:
        async with running(cfg_a) as a:  # signed itself, but without a call key
            await a.calls_mgr.dial("echo")
            sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        assert sa[0]["end_reason"] == "rejected_forbidden" and echo.refused == 1
        async with running(cfg_k) as k:
            await k.calls_mgr.dial("echo")
            await until(lambda: heard(k, 200))
            await k.calls_mgr.hangup()
        assert echo.answered == 1 and echo.refused == 1
    played = active(read_raw(tmp_path / "spk_dev-k.raw"))
    assert abs(peak_hz(played) - 700) <= hz_tolerance(700)


@pytest.mark.slow
async def test_call_test_with_an_operator_minted_token_reaches_a_signed_echo_peer(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = Keys(tmp_path / "keys")
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(  # no call key: operator commands signed with "op"
        tmp_path, broker.port, "dev-a", alsa, extra=f'[security]\nkeys_file = "{keys.trusted}"\n'
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa, extra=signed_security(keys))

    def call_test(*args: str) -> list[str]:
        return ["cmd", "dev-a", "call_test", "peer=echo", "duration_s=1", *args, "--json",
                "--port", str(broker.port), "--key", str(keys.path("op"))]  # fmt: skip

    async with echo_peer(cfg_e) as echo, running(cfg_a):
        rc, plain = await _ctl(capsys, call_test())
        assert plain["code"] == 200, plain
        assert plain["result"]["end_reason"] == "rejected_forbidden" and echo.refused == 1
        rc, minted = await _ctl(capsys, call_test("--call-token"))
    assert rc == 0 and minted["code"] == 200, minted
    result = minted["result"]
    # The echo peer took the offer and the call connected (the measurement itself is
    # test_call_test_e2e.py's business).
    assert (result["result"], result["end_reason"]) == ("completed", "local_hangup"), result
    assert result["setup_ms"] is not None and echo.answered == 1
