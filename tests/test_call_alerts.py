"""Alerts from real calls: a dead microphone, and the call failure rate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from agent_support import collector
from alsa_support import tone
from call_support import (
    alerts,
    alsa_env,
    echo_peer,
    endpoint_config,
    running,
    until,
)
from schema_support import assert_valid

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_dead_microphone_fires_no_audio_within_5_s(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=np.zeros(48000 * 20, np.int16)
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with collector(broker.port, "edge/v1/#") as c, echo_peer(cfg_e), running(cfg_a) as a:
        call = await a.calls_mgr.dial("echo")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        fired = await c.wait_for(
            lambda ms: [x for x in alerts(ms, "dev-a", "no_audio") if x["state"] == "firing"],
            timeout=8,
        )
        started = call.started_wall
        assert fired[0]["call_id"] == call.call_id
        assert fired[0]["severity"] in ("warning", "critical")
        assert fired[0]["ts"] - started <= 5.0  # from dialling: 4 s of silence, set-up, one window
        await a.calls_mgr.hangup()
        resolved = await c.wait_for(
            lambda ms: [x for x in alerts(ms, "dev-a", "no_audio") if x["state"] == "resolved"]
        )
        assert resolved
        feedback = await c.wait_for(
            lambda ms: [
                m.json()
                for m in ms
                if m.topic == "edge/v1/dev-a/events" and m.json()["category"] == "feedback"
            ]
        )
        assert feedback[0]["data"]["call"]["call_id"] == call.call_id
    for m in c.messages:
        assert_valid(m.topic, m.payload)


async def test_failure_rate_alert_fires_and_resolves(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path,
        broker.port,
        "dev-a",
        alsa,
        mic=tone(440, 60),
        # Long enough that the echo peer always answers in time on a loaded 2-core machine
        # (0.3 s was not); the window holds the three unanswered calls with room to spare.
        call="answer_timeout_s = 1.0",
        extra="[alerts]\nfailure_window_s = 6\nfailure_min_calls = 3",
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a:
        for _ in range(3):  # nobody answers "nobody"
            await a.calls_mgr.dial("nobody")
            await until(lambda: a.calls_mgr.active is None)
        fired = await c.wait_for(
            lambda ms: [
                x for x in alerts(ms, "dev-a", "call_failure_rate") if x["state"] == "firing"
            ]
        )
        assert fired[0]["value"] == 1.0 and fired[0]["severity"] == "critical"

        def resolved_alerts(ms: list) -> list[dict]:  # type: ignore[type-arg]
            return [x for x in alerts(ms, "dev-a", "call_failure_rate") if x["state"] == "resolved"]

        async with echo_peer(cfg_e):
            # Successful calls while the failures age out of the window.
            async with asyncio.timeout(40):
                while not resolved_alerts(c.messages):
                    await a.calls_mgr.dial("echo")
                    await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
                    await a.calls_mgr.hangup()
        resolved = await c.wait_for(resolved_alerts, timeout=5)
        assert resolved[0]["value"] < 0.10
