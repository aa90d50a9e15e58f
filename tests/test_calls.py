"""Real calls between endpoints through a real mosquitto, with file-backed ALSA at both ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_support import collector
from alsa_support import (
    active,
    assert_heard_each_other,
    hz_tolerance,
    peak_hz,
    read_raw,
    tone,
    tone_then_speech,
)
from call_support import (
    alsa_env,
    categories,
    echo_peer,
    endpoint_config,
    one_summary_per_call,
    running,
    summaries,
    until,
)
from schema_support import assert_valid

from edgeagent.control.catalog import CommandError

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_two_agents_call_each_other_with_audio_both_ways(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    # Each sends a tone (2 s), then speech-like sound (2.5 s): A speaks first, then B. The
    # pauses keep either's speech clear of the other's tone and speech even when B's
    # capture starts late (at the answer, after relay allocation): see SPEECH_MATCH.
    mic_a, speech_a = tone_then_speech(440, seed=1, pause_s=1.0)
    mic_b, speech_b = tone_then_speech(1000, seed=2, pause_s=4.0)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=mic_a)
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=mic_b)
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        call = await a.calls_mgr.dial("dev-b")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        await until(lambda: b.calls_mgr.active and b.calls_mgr.active.state == "active")

        def heard(agent) -> bool:  # type: ignore[no-untyped-def]
            s = agent.calls_mgr.active.session
            return s.sink is not None and s.sink.frames_received >= 440  # both turns: 8.8 s

        await until(lambda: heard(a) and heard(b))
        await until(lambda: c.on(f"/calls/{call.call_id}/quality"), timeout=10)
        assert a.health.current().state in ("good", "degraded")
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))

    for m in c.messages:
        assert_valid(m.topic, m.payload)
    for device in ("dev-a", "dev-b"):
        assert list(one_summary_per_call(c.messages, device)) == [call.call_id]
    assert sa[0]["result"] == "completed", (sa, sb)
    assert sa[0]["end_reason"] == "local_hangup"
    assert sb[0]["result"] == "completed" and sb[0]["end_reason"] == "remote_hangup"
    assert sa[0]["direction"] == "outgoing" and sb[0]["direction"] == "incoming"
    assert sa[0]["call_id"] == sb[0]["call_id"] == call.call_id
    assert sa[0]["trace_id"] == sb[0]["trace_id"] is not None  # carried in the offer
    assert sa[0]["setup_ms"] is not None and sa[0]["ice"]["local_type"] == "host"
    # Two agents with libopus: each would send the other FEC, none was needed (no loss).
    for summary in (sa[0], sb[0]):
        opus = summary["opus"]
        assert opus["fec_to_far_end"] and opus["fec_from_far_end"]
        assert not opus["fec_sent"] and opus["max_loss_hint_pct"] == 0
        assert opus["decoder"] == "libopus_plc"
    # Lifecycle events in order, on each side.
    ev_a = categories(c.messages, "dev-a")
    ev_b = categories(c.messages, "dev-b")
    order_a = ["call.outgoing", "call.established", "call.media_started", "call.closed"]
    order_b = [
        "call.incoming",
        "call.answered",
        "call.established",
        "call.media_started",
        "call.closed",
    ]
    assert [e for e in ev_a if e in order_a] == order_a
    assert [e for e in ev_b if e in order_b] == order_b
    # Audio, numerically: each side hears the other's tone, then the other's speech
    # (their turns do not overlap), and not its own.
    assert_heard_each_other(tmp_path, (("dev-a", 440, speech_a), ("dev-b", 1000, speech_b)))


async def test_echo_peer_returns_the_callers_audio(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(700, 20))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with echo_peer(cfg_e) as echo, running(cfg_a) as a:
        await a.calls_mgr.dial("echo")
        await until(
            lambda: (
                a.calls_mgr.active
                and a.calls_mgr.active.session
                and a.calls_mgr.active.session.sink
                and a.calls_mgr.active.session.sink.frames_received >= 200
            )
        )
        assert echo.answered == 1
        await a.calls_mgr.hangup()
    played = active(read_raw(tmp_path / "spk_dev-a.raw"))
    assert played.size >= 48000, played.size
    assert abs(peak_hz(played) - 700) <= hz_tolerance(700)


async def test_stopping_in_a_call_tells_the_far_end_before_going_offline(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 20))
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=tone(1000, 20))
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_b) as b:
        async with running(cfg_a) as a:
            await a.calls_mgr.dial("dev-b")
            await until(lambda: b.calls_mgr.active and b.calls_mgr.active.state == "active")
        # dev-a stopped (SIGTERM's path) mid-call: dev-b heard a hangup, not a dead transport.
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
    assert sa[0]["end_reason"] == "agent_stopping" and sa[0]["result"] == "completed"
    assert sb[0]["end_reason"] == "remote_hangup" and sb[0]["result"] == "completed"
    offline = [m.json() for m in c.messages if m.topic == "edge/v1/dev-a/status"][-1]
    assert offline["state"] == "offline"
    # The stop flushed the spool first: dev-a's summary reached the broker before offline.
    order = [
        m.topic
        for m in c.messages
        if m.topic == "edge/v1/dev-a/status" or m.topic.startswith("edge/v1/dev-a/calls/")
    ]
    assert order.index(f"edge/v1/dev-a/calls/{sa[0]['call_id']}/summary") < len(order) - 1
    assert order[-1] == "edge/v1/dev-a/status"


async def test_a_stopped_echo_peer_hangs_up_and_goes_offline_with_its_reason(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(700, 20))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a:
        async with echo_peer(cfg_e):
            await a.calls_mgr.dial("echo")
            await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        # The context stops it with request_stop("test over"), as SIGTERM does.
        status = await c.wait_for(
            lambda ms: [
                m.json()
                for m in ms
                if m.topic == "edge/v1/echo/status" and m.json()["state"] == "offline"
            ]
        )
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        async with collector(broker.port, "edge/v1/echo/status") as late:  # the retained one
            kept = await late.wait_for(lambda ms: [m.json() for m in ms])
    assert status[-1]["reason"] == "test over"
    assert (kept[0]["state"], kept[0]["reason"]) == ("offline", "test over")
    assert sa[0]["result"] == "completed"  # the call ended; it did not fail


async def test_remote_dial_and_hangup_codes(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """The agent's dial/hangup as the command server calls them: 400 for a bad target, and an
    idempotent hangup (404 is only for unknown commands)."""
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg = endpoint_config(tmp_path, broker.port, "dev-a", alsa)
    async with collector(broker.port, "edge/v1/nobody-home/signal") as c, running(cfg) as a:
        assert await a.hangup(None) == {"ended": False, "call_id": None, "result": None}
        with pytest.raises(CommandError) as info:
            await a.hangup("call-x")
        assert info.value.code == 400
        assert info.value.message == "call 'call-x' is not active; no call is active"
        for peer in (None, "Not_A_Valid_Id"):  # no default peer configured; a bad id
            with pytest.raises(CommandError) as info:
                await a.dial(peer)
            assert info.value.code == 400 and "no valid peer" in info.value.message

        dialed = await a.dial("nobody-home")  # an offer nobody answers: the call rings
        await c.wait_for(lambda ms: [m for m in ms if m.json()["type"] == "offer"])
        with pytest.raises(CommandError) as info:
            await a.dial("nobody-home")
        assert info.value.code == 409
        with pytest.raises(CommandError) as info:
            await a.hangup("call-x")
        assert info.value.code == 400 and dialed["call_id"] in info.value.message
        assert a.calls_mgr.active is not None  # the wrong id ended nothing
        ended = await a.hangup(dialed["call_id"])
        assert ended["ended"] is True and ended["call_id"] == dialed["call_id"]
        assert a.calls_mgr.active is None
        await c.wait_for(lambda ms: [m for m in ms if m.json()["type"] == "hangup"])
        assert await a.hangup(None) == {"ended": False, "call_id": None, "result": None}
        # A retried hangup of the call that ended: nothing to end, and how it ended.
        assert await a.hangup(dialed["call_id"]) == {
            "ended": False,
            "call_id": dialed["call_id"],
            "result": "missed",
            "end_reason": "remote_command",
        }
        with pytest.raises(CommandError) as info:  # never a call of this device: still 400
            await a.hangup("call-x")
        assert info.value.code == 400
