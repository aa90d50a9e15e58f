"""A failed call says what the broker knows of its far end (protocol section 1 presence).

The status rules on their own (the protocol's session rule, the watch limit, bad
payloads), then end to end on a real mosquitto: an unanswered call to a peer that
stopped cleanly, and a call whose far end (a real echo-peer process) is SIGKILLed
mid-call, which the broker reports through its Last Will.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from agent_support import AgentProcess, collector
from alsa_support import tone
from call_support import alsa_env, call_events, echo_peer, endpoint_config, running, until

from edgeagent.call.peers import PeerPresence
from edgeagent.mqtt import Inbound

# --- the status rules ----------------------------------------------------------------------


class _Link:
    """Records watch/unwatch; `granted` is what the broker's SUBACK says."""

    def __init__(self, granted: bool | None = True) -> None:
        self.granted = granted
        self.handlers: dict[str, Any] = {}
        self.unwatched: list[str] = []

    async def watch(self, topic: str, handler: Any) -> bool | None:
        self.handlers[topic] = handler
        return self.granted

    async def unwatch(self, topic: str) -> None:
        self.unwatched.append(topic)
        self.handlers.pop(topic, None)


def _status(state: str, session: int, ts: float = 1000.0, **more: Any) -> bytes:
    return json.dumps({"v": 1, "device": "p", "ts": ts, "state": state, "session": session,
                       "boot_id": "b", "version": "1", **more}).encode()  # fmt: skip


def _deliver(link: _Link, peer: str, payload: bytes, retain: bool = False) -> None:
    link.handlers[f"edge/v1/{peer}/status"](
        Inbound(f"edge/v1/{peer}/status", payload, retain=retain)
    )


async def test_an_older_sessions_will_does_not_hide_a_peer_that_is_back() -> None:
    link = _Link()
    changes: list[tuple[str, str]] = []
    peers = PeerPresence(link, "edge/v1", time_fn=lambda: 1060.0,  # type: ignore[arg-type]
                         on_change=lambda p, s: changes.append((p, s.state)))  # fmt: skip
    peers.watch("peer-1")
    await asyncio.sleep(0)  # the subscription task runs
    _deliver(link, "peer-1", _status("online", 7), retain=True)
    assert peers.describe("peer-1") == "peer-1 is online (connected at 00:16:40 UTC, 60 s ago)"
    _deliver(link, "peer-1", _status("lost", 6, ts=900.0))  # session 6's Will, late
    assert peers.status("peer-1").state == "online"  # type: ignore[union-attr]
    _deliver(link, "peer-1", _status("lost", 7))  # this session's: it is gone
    assert peers.describe("peer-1").startswith("peer-1 lost its broker connection at 00:17:40")
    _deliver(link, "peer-1", _status("offline", 8, reason="shutdown"))
    assert peers.describe("peer-1").endswith("60 s ago: shutdown)")
    _deliver(link, "peer-1", b"{not json")  # kept what it had
    _deliver(link, "peer-1", _status("exploded", 9))
    assert peers.status("peer-1").state == "offline"  # type: ignore[union-attr]
    _deliver(link, "peer-1", b"")  # the retained status was cleared
    assert peers.status("peer-1") is None and "no status from peer-1" in peers.describe("peer-1")
    assert changes == [("peer-1", "online"), ("peer-1", "lost"), ("peer-1", "offline")]


async def test_a_status_with_an_impossible_ts_is_not_taken() -> None:
    """The far end writes ts: one past what gmtime renders (or NaN) must not make
    describing it raise inside a failing call's ending (its summary would be lost)."""
    link = _Link()
    peers = PeerPresence(link, "edge/v1", time_fn=lambda: 1060.0)  # type: ignore[arg-type]
    peers.watch("peer-1")
    await asyncio.sleep(0)
    _deliver(link, "peer-1", _status("online", 1))
    for ts in ("1e20", "NaN", "-5"):
        payload = _status("lost", 2).replace(b'"ts": 1000.0', f'"ts": {ts}'.encode())
        _deliver(link, "peer-1", payload)
    assert peers.status("peer-1").state == "online"  # type: ignore[union-attr]
    assert peers._when(1e20) == "at ts 1e+20"  # and describing one could not raise


async def test_a_retained_will_is_dated_by_its_connect_and_a_refused_watch_is_said() -> None:
    link = _Link()
    peers = PeerPresence(link, "edge/v1", time_fn=lambda: 1000.0 + 7200)  # type: ignore[arg-type]
    peers.watch("peer-1")
    await asyncio.sleep(0)
    _deliver(link, "peer-1", _status("lost", 3), retain=True)
    assert peers.describe("peer-1") == (
        "peer-1 has lost its broker connection (its Last Will is retained; "
        "it had connected at 00:16:40 UTC, 2.0 h ago)"
    )
    refused = PeerPresence(_Link(granted=False), "edge/v1")  # type: ignore[arg-type]
    refused.watch("peer-2")
    await asyncio.sleep(0)
    assert "refused the subscription" in refused.describe("peer-2")


async def test_the_least_recently_called_peer_is_dropped_past_the_limit() -> None:
    link = _Link()
    peers = PeerPresence(link, "edge/v1", max_peers=2)  # type: ignore[arg-type]
    for peer in ("a", "b", "a", "c"):  # "a" called again: "b" is the oldest
        peers.watch(peer)
    await asyncio.sleep(0)
    assert link.unwatched == ["edge/v1/b/status"]
    assert set(link.handlers) == {"edge/v1/a/status", "edge/v1/c/status"}


# --- end to end ----------------------------------------------------------------------------


def _closed(ms: list[Any], call_id: str) -> dict[str, Any] | None:
    found = [e for e in call_events(ms, "dev-a", call_id) if e["category"] == "call.closed"]
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.broker
async def test_an_unanswered_call_to_a_stopped_peer_says_it_is_offline(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 10), call="answer_timeout_s = 2.0"
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with echo_peer(cfg_e):
        pass  # it stops cleanly: a retained `offline` with its reason
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a:
        call = await a.calls_mgr.dial("echo")
        closed = await c.wait_for(lambda ms: _closed(ms, call.call_id), 15)
    during = call_events(c.messages, "dev-a", call.call_id)
    peer_events = [e for e in during if e["category"] == "call.peer"]
    # Said while the call still waits for an answer, not only at its end.
    assert peer_events and peer_events[0]["level"] == "warning"
    assert peer_events[0]["ts"] < closed["ts"]
    assert peer_events[0]["message"].startswith(f"call {call.call_id}: echo is offline")
    assert closed["data"]["end_reason"] == "answer_timeout"
    assert closed["data"]["detail"].startswith("no answer from echo; echo is offline (stopped at ")
    assert closed["data"]["detail"].endswith(": test over)")
    assert closed["data"]["peer_status"]["state"] == "offline"


@pytest.mark.slow
@pytest.mark.broker
async def test_a_far_end_killed_mid_call_is_named_by_its_last_will(
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
        mic=tone(440, 30),
        call="media_stall_warn_s = 1.0\nmedia_stall_hangup_s = 2.5",
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    echo = AgentProcess(cfg_e, command="echo-peer", env={"ALSA_CONFIG_PATH": str(alsa.conf)})
    try:
        async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a:
            echo.start()
            await c.wait_for(
                lambda ms: [m for m in ms if m.topic == "edge/v1/echo/status"
                            and m.json()["state"] == "online"], 20)  # fmt: skip
            call = await a.calls_mgr.dial("echo")
            await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
            echo.kill()  # no hangup, no DISCONNECT: the broker publishes its Will
            closed = await c.wait_for(lambda ms: _closed(ms, call.call_id), 20)
    finally:
        echo.stop_quietly()
    during = call_events(c.messages, "dev-a", call.call_id)
    lost = [e for e in during if e["category"] == "call.peer"]
    assert [e["data"]["state"] for e in lost] == ["lost"]
    assert lost[0]["level"] == "warning" and lost[0]["ts"] < closed["ts"]
    assert closed["data"]["end_reason"] in ("media_timeout", "transport_closed")
    assert "; echo lost its broker connection at " in closed["data"]["detail"]
    assert closed["data"]["peer_status"]["state"] == "lost"
    assert closed["data"]["peer_status"]["seen_ts"] is not None
