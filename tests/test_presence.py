"""Presence against a real mosquitto: birth, Will on SIGKILL, clean offline, info."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from agent_support import AgentProcess, agent_config, collector

from edgeagent.telemetry.presence import PresenceTracker

pytestmark = pytest.mark.broker


def statuses(msgs: list) -> list[dict]:  # type: ignore[type-arg]
    return [m.json() for m in msgs if m.topic.endswith("/status")]


async def test_birth_will_and_clean_stop(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    cfg = agent_config(tmp_path, broker.port)
    agent = AgentProcess(cfg)
    try:
        async with collector(broker.port, "edge/v1/dev-1/status", "edge/v1/dev-1/info") as c:
            agent.start()
            first = await c.wait_for(lambda ms: [s for s in statuses(ms) if s["state"] == "online"])
            online = first[0]
            assert online["session"] == 1
            assert online["v"] == 1 and online["device"] == "dev-1" and online["boot_id"]
            info = await c.wait_for(lambda ms: [m.json() for m in ms if m.topic.endswith("/info")])
            assert info[0]["session"] == 1
            assert info[0]["versions"]["aiortc"] == "1.16.0"
            assert info[0]["config_hash"]

            killed_at = time.monotonic()
            agent.kill()
            lost = await c.wait_for(lambda ms: [s for s in statuses(ms) if s["state"] == "lost"])
            assert time.monotonic() - killed_at < 3.0
            assert lost[0]["session"] == 1  # the Will carries the birth's session

            agent.start()
            second = await c.wait_for(
                lambda ms: [s for s in statuses(ms) if s["state"] == "online" and s["session"] == 2]
            )
            assert second

            stop_at = time.monotonic()
            assert agent.terminate() == 0
            assert time.monotonic() - stop_at < 3.0
            off = await c.wait_for(lambda ms: [s for s in statuses(ms) if s["state"] == "offline"])
            assert off[0]["session"] == 2
            assert off[0]["reason"] == "SIGTERM"
            await asyncio.sleep(0)

        # What a late consumer sees: the retained state is the clean offline,
        # never the older Will.
        async with collector(broker.port, "edge/v1/dev-1/status") as late:
            retained = await late.wait_for(lambda ms: statuses(ms))
            assert retained[0]["state"] == "offline"
            assert late.messages[0].retain
        sequence = [(s["state"], s["session"]) for s in statuses(c.messages)]
        assert sequence == [("online", 1), ("lost", 1), ("online", 2), ("offline", 2)]
    finally:
        agent.stop_quietly()


def test_consumer_rule_ignores_a_late_will() -> None:
    tracker = PresenceTracker()
    assert tracker.update({"device": "d", "state": "online", "session": 7, "ts": 1.0})
    # The Will of session 6 arrives late, after the birth of session 7.
    assert not tracker.update({"device": "d", "state": "lost", "session": 6, "ts": 2.0})
    presence = tracker.get("d")
    assert presence is not None and presence.state == "online" and presence.session == 7
    # The Will of the current session is taken.
    assert tracker.update({"device": "d", "state": "lost", "session": 7, "ts": 3.0})
    assert tracker.get("d").state == "lost"  # type: ignore[union-attr]
    # Garbage is ignored without raising.
    assert not tracker.update({"device": "d", "state": "online"})
