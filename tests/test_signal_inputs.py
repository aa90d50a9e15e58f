"""Hostile or unusable signaling reaching a running agent: it answers clearly and stays up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from aiortc import RTCPeerConnection, RTCSessionDescription
from call_support import alsa_env, endpoint_config, events, running, summaries

from edgeagent.call.ice import ice_configuration, restrict_host_addresses

pytestmark = [pytest.mark.broker]

SDP = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


def offer(call_id: str, sender: str) -> bytes:
    msg = {"v": 1, "type": "offer", "call_id": call_id, "from": sender, "to": "dev-b"}
    msg |= {"ts": 1.0, "sdp": SDP}
    return json.dumps(msg).encode()


def rejects(messages: list[Any], to: str) -> list[dict[str, Any]]:
    return [m.json() for m in messages if m.topic == f"edge/v1/{to}/signal"]


async def test_a_refused_offer_delivered_again_is_refused_again_without_a_second_record(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, call='allow = ["operator-1"]')
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_b):
        for _ in range(2):
            await c.client.publish("edge/v1/dev-b/signal", offer("c-1", "dev-x"), qos=1)
        await c.wait_for(lambda ms: len(rejects(ms, "dev-x")) == 2)
        # A later refusal: its summary comes after any second one for c-1 (seq order).
        await c.client.publish("edge/v1/dev-b/signal", offer("c-2", "dev-x"), qos=1)
        done = await c.wait_for(
            lambda ms: [s for s in summaries(ms, "dev-b") if s["call_id"] == "c-2"]
        )
        assert done
    assert [r["reason"] for r in rejects(c.messages, "dev-x")] == ["forbidden"] * 3
    per_call = [s["call_id"] for s in summaries(c.messages, "dev-b")]
    assert per_call == ["c-1", "c-2"]
    incoming = [
        m.json()["call_id"]
        for m in c.messages
        if m.topic == "edge/v1/dev-b/events" and m.json()["category"] == "call.incoming"
    ]
    assert incoming == ["c-1", "c-2"]


async def _aiortc_sdp(kind: str, remote: str | None = None) -> tuple[RTCPeerConnection, str]:
    """A real aiortc offer (or answer to `remote`) on loopback."""
    pc = RTCPeerConnection(ice_configuration())
    if remote is None:
        pc.addTransceiver("audio")
        restrict_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
    else:
        await pc.setRemoteDescription(RTCSessionDescription(remote, "offer"))
        restrict_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createAnswer())
    return pc, pc.localDescription.sdp


def _without_fingerprint(sdp: str) -> str:
    return "".join(line for line in sdp.splitlines(True) if not line.startswith("a=fingerprint"))


async def test_an_offer_without_a_dtls_fingerprint_is_rejected_with_the_reason(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa)
    pc, sdp = await _aiortc_sdp("offer")
    try:
        async with collector(broker.port, "edge/v1/#") as c, running(cfg_b) as b:
            msg = json.loads(offer("c-3", "dev-x"))
            msg["sdp"] = _without_fingerprint(sdp)
            await c.client.publish("edge/v1/dev-b/signal", json.dumps(msg), qos=1)
            got = await c.wait_for(lambda ms: rejects(ms, "dev-x"))
            s = await c.wait_for(lambda ms: summaries(ms, "dev-b"))
            assert not b.crashed and b.calls_mgr.active is None
    finally:
        await pc.close()
    assert got[0]["reason"] == "error"
    assert (s[0]["result"], s[0]["end_reason"]) == ("rejected", "error")
    why = [e["message"] for e in events(c.messages, "dev-b") if e["category"] == "call.incoming"]
    assert "no DTLS fingerprint" in why[0]


async def test_an_answer_without_a_dtls_fingerprint_ends_the_call_not_the_agent(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa)
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a:
        call = await a.calls_mgr.dial("fake-1")
        sent = await c.wait_for(
            lambda ms: [m.json() for m in ms if m.topic.endswith("fake-1/signal")]
        )
        pc, answer = await _aiortc_sdp("answer", remote=sent[0]["sdp"])
        try:
            reply = {"v": 1, "type": "answer", "call_id": call.call_id, "from": "fake-1"}
            reply |= {"to": "dev-a", "ts": 1.0, "sdp": _without_fingerprint(answer)}
            await c.client.publish("edge/v1/dev-a/signal", json.dumps(reply), qos=1)
            s = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
            assert not a.crashed
        finally:
            await pc.close()
    assert (s[0]["result"], s[0]["end_reason"]) == ("failed", "error")
    closed = [e for e in events(c.messages, "dev-a") if e["category"] == "call.closed"]
    assert "unusable answer: no DTLS fingerprint" in closed[0]["data"]["detail"]
