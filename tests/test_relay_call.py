"""Relay-only calls through a real coturn on loopback: audio both ways, and a clean failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from agent_support import collector
from alsa_support import (
    BenchAlsa,
    assert_heard_each_other,
    tone,
    tone_then_speech,
)
from call_support import alsa_env, endpoint_config, running, until
from turn_support import TURN_PASSWORD, TURN_USER, Coturn, turn  # noqa: F401 (fixture)

from edgeagent.call.ice import gathering_failure, selected_candidates


def relay_config(
    tmp_path: Path,
    port: int,
    device_id: str,
    alsa: BenchAlsa,
    server: Coturn,
    *,
    mic: np.ndarray,
    password: str = TURN_PASSWORD,
) -> Path:
    """endpoint_config with our coturn as the TURN server and relay-only on."""
    path = endpoint_config(tmp_path, port, device_id, alsa, mic=mic)
    keys = (
        f'turn_urls = ["{server.turn_url("udp")}"]\n'
        f'turn_username = "{TURN_USER}"\n'
        f'turn_password = "{password}"\n'
        "relay_only = true\n"
    )
    text = path.read_text()
    assert "[ice]\n" in text
    path.write_text(text.replace("[ice]\n", "[ice]\n" + keys, 1))
    return path


def summaries(messages: list, device: str) -> list[dict]:  # type: ignore[type-arg]
    return [
        m.json()
        for m in messages
        if m.topic.startswith(f"edge/v1/{device}/calls/") and m.topic.endswith("/summary")
    ]


@pytest.mark.broker
@pytest.mark.turn
@pytest.mark.slow
async def test_relay_only_call_carries_audio_both_ways_through_coturn(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
    turn: Coturn,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    # Each sends a tone (2 s), then speech-like sound (2.5 s): A speaks first, then B. The
    # pauses keep either's speech clear of the other's tone and speech even when B's
    # capture starts late (at the answer, after relay allocation): see SPEECH_MATCH.
    mic_a, speech_a = tone_then_speech(440, seed=1, pause_s=1.0)
    mic_b, speech_b = tone_then_speech(1000, seed=2, pause_s=4.0)
    cfg_a = relay_config(tmp_path, broker.port, "dev-a", alsa, turn, mic=mic_a)
    cfg_b = relay_config(tmp_path, broker.port, "dev-b", alsa, turn, mic=mic_b)
    relay_ports = range(turn.min_port, turn.max_port + 1)
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        call = await a.calls_mgr.dial("dev-b")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        await until(lambda: b.calls_mgr.active and b.calls_mgr.active.state == "active")
        for agent in (a, b):
            session = agent.calls_mgr.active.session
            pair = selected_candidates(session.pc)
            assert pair is not None
            local, remote = pair
            # Both ends offered only relayed candidates, allocated on this coturn.
            assert (local.type, remote.type) == ("relay", "relay")
            assert local.host == "127.0.0.1" and local.port in relay_ports
            assert remote.host == "127.0.0.1" and remote.port in relay_ports

        def heard(agent) -> bool:  # type: ignore[no-untyped-def]
            s = agent.calls_mgr.active.session
            return s.sink is not None and s.sink.frames_received >= 440  # both turns: 8.8 s

        await until(lambda: heard(a) and heard(b))
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))

    assert sa[0]["call_id"] == sb[0]["call_id"] == call.call_id
    assert sa[0]["result"] == sb[0]["result"] == "completed", (sa, sb)
    assert sa[0]["ice"] == sb[0]["ice"] == {"local_type": "relay", "remote_type": "relay"}
    # Each side hears the other's tone, then the other's speech, and not its own.
    assert_heard_each_other(tmp_path, (("dev-a", 440, speech_a), ("dev-b", 1000, speech_b)))


def closed_events(messages: list, device: str) -> list[dict]:  # type: ignore[type-arg]
    return [
        m.json()["data"]
        for m in messages
        if m.topic == f"edge/v1/{device}/events" and m.json()["category"] == "call.closed"
    ]


@pytest.mark.broker
@pytest.mark.turn
@pytest.mark.slow
async def test_relay_only_with_a_wrong_turn_password_fails_cleanly(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
    turn: Coturn,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = relay_config(
        tmp_path, broker.port, "dev-a", alsa, turn, mic=tone(440, 5), password="wrong-pass"
    )
    cfg_b = relay_config(tmp_path, broker.port, "dev-b", alsa, turn, mic=tone(1000, 5))
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        call = await a.calls_mgr.dial("dev-b")
        # Ends at once (the caller has no candidate at all), far inside the 15 s connect
        # timeout that used to end such calls.
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"), timeout=5)
        await until(lambda: a.calls_mgr.active is None and b.calls_mgr.active is None, timeout=5)
        # Both agents stay up and can still reach the broker.
        assert a.link.connected.is_set() and b.link.connected.is_set()
        sb: list[dict] = []  # type: ignore[type-arg]
        if any(h.call_id == call.call_id for h in b.calls_mgr.history):  # offered the call
            sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"), timeout=5)

    assert sa[0]["call_id"] == call.call_id
    assert sa[0]["result"] == "failed", sa
    assert sa[0]["setup_ms"] is None and sa[0]["ice"]["local_type"] is None
    # The caller's own ICE fails (no candidate); the callee, offered no candidate, fails
    # too and hangs up with ice_failed. Whichever the caller notices first is its reason.
    reasons = {"dev-a": sa[0]["end_reason"]}
    if sb:  # the callee was offered the call
        assert sb[0]["call_id"] == call.call_id and sb[0]["result"] == "failed", sb
        reasons["dev-b"] = sb[0]["end_reason"]
    assert "ice_failed" in reasons.values(), reasons
    for device, reason in reasons.items():
        if reason == "remote_hangup":
            # The far end's reason, then what the broker says of it: present, so the
            # fault is the path between them (here: no TURN allocation).
            other = "dev-b" if device == "dev-a" else "dev-a"
            detail = closed_events(c.messages, device)[-1]["detail"]
            assert detail.startswith(f"ice_failed; {other} is online (connected at "), detail
        else:
            assert reason == "ice_failed", reasons
    # The log says why: our coturn refused the caller's TURN allocation.
    assert any(
        f"TURN allocation on udp:127.0.0.1:{turn.port} failed" in r.getMessage()
        for r in caplog.records
        if r.name == "edgeagent.call.ice"
    ), [r.getMessage() for r in caplog.records]


def test_gathering_failure_names_the_cause() -> None:
    turn_at = "udp:127.0.0.1:3478"
    ok = {"turn_server": turn_at, "host_addresses": ["127.0.0.1"]}
    assert gathering_failure(relay_only=True, candidate_types=["relay"], **ok) is None
    assert gathering_failure(relay_only=False, candidate_types=["host", "relay"], **ok) is None
    assert (
        gathering_failure(
            relay_only=False, turn_server=None, candidate_types=["host"], host_addresses=[]
        )
        is None
    )
    relay_fail = gathering_failure(relay_only=True, candidate_types=[], **ok)
    assert relay_fail is not None
    assert f"TURN allocation on {turn_at} failed" in relay_fail and "relay-only" in relay_fail
    mixed = gathering_failure(relay_only=False, candidate_types=["host"], **ok)
    assert mixed is not None and "TURN" in mixed and "relay-only" not in mixed
    none = gathering_failure(
        relay_only=False, turn_server=None, candidate_types=[], host_addresses=["10.9.9.9"]
    )
    assert none is not None and "10.9.9.9" in none
    answered_empty = gathering_failure(
        relay_only=True, candidate_types=[], remote_has_candidates=False, **ok
    )
    assert answered_empty is not None and "remote description has no ICE candidates" in (
        answered_empty
    )
