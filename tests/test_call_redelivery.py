"""An offer delivered twice (QoS 1 redelivery, or a replay) makes one call record, not two."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from call_support import alsa_env, endpoint_config, running, summaries

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
