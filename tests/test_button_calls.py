"""The call button in a running agent: MockFactory pin presses dial, hang up and snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from alsa_support import BenchAlsa, tone
from call_support import alsa_env, echo_peer, endpoint_config, events, running, summaries, until
from gpiozero.pins.mock import MockFactory, MockPin
from schema_support import assert_valid

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BUTTON = 26


def button_config(tmp_path: Path, port: int, alsa: BenchAlsa, press_action: str) -> Path:
    return endpoint_config(
        tmp_path,
        port,
        "dev-a",
        alsa,
        mic=tone(440, 30),
        call='default_peer = "echo"',
        extra=f"""
[button]
enabled = true
pin = {BUTTON}
long_press_s = 0.3
press_action = "{press_action}"
""",
    )


def button(factory: MockFactory) -> MockPin:
    p: MockPin = factory.pin(BUTTON)
    return p


async def click(factory: MockFactory) -> None:
    """A short press, and every callback it queued on the loop run (FIFO)."""
    button(factory).drive_low()
    button(factory).drive_high()
    await drain_loop()


async def drain_loop() -> None:
    """Run what gpiozero's threads queued so far, and the first step of tasks it spawned."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon_threadsafe(done.set_result, None)
    await done


def frames(agent: Any) -> int:
    call = agent.calls_mgr.active
    sink = call.session.sink if call and call.session else None
    return sink.frames_received if sink else 0


async def still_in_call(agent: Any, call: Any) -> None:
    """Half a second more of inbound audio, then the same call is still up.

    A hangup queued by the press would have ended the call within that time (a
    loopback hangup takes milliseconds), so this is the press's "nothing".
    """
    n = frames(agent)
    await until(lambda: frames(agent) >= n + 25 or agent.calls_mgr.active is not call)
    assert agent.calls_mgr.active is call and call.state == "active"


async def test_press_dials_the_default_peer_long_press_snapshots_press_hangs_up(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = button_config(tmp_path, broker.port, alsa, "dial_or_hangup")
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    factory = MockFactory()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e) as echo,
        running(cfg_a, pin_factory=factory) as a,
    ):
        assert a.button is not None and a.button.enabled
        assert a.calls_mgr.active is None
        await click(factory)
        call = a.calls_mgr.active
        assert call is not None and call.peer == "echo" and call.direction == "outgoing"
        await until(lambda: call.state == "active" and frames(a) >= 25)
        assert echo.answered == 1

        # Held past long_press_s: a feedback snapshot of this call, as soon as the hold
        # time passes (before the release), and the call goes on after the release.
        button(factory).drive_low()
        feedback = await c.wait_for(
            lambda ms: [e for e in events(ms, "dev-a") if e["category"] == "feedback"]
        )
        button(factory).drive_high()
        await drain_loop()
        await still_in_call(a, call)

        await click(factory)
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        assert a.calls_mgr.active is None

    assert len(feedback) == 1
    snap = feedback[0]
    assert snap["level"] == "info" and snap["call_id"] == call.call_id
    assert snap["data"]["call"]["call_id"] == call.call_id
    assert snap["data"]["call"]["state"] == "active" and snap["data"]["call"]["peer"] == "echo"
    assert {"health", "broker", "audio", "system", "logs"} <= set(snap["data"])
    assert sa[0]["call_id"] == call.call_id and sa[0]["direction"] == "outgoing"
    assert sa[0]["result"] == "completed" and sa[0]["end_reason"] == "button"
    closed = [e for e in events(c.messages, "dev-a") if e["category"] == "call.closed"]
    assert [e["data"]["end_reason"] for e in closed] == ["button"]
    for m in c.messages:
        assert_valid(m.topic, m.payload)


async def test_press_action_dial_never_hangs_up(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = button_config(tmp_path, broker.port, alsa, "dial")
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    factory = MockFactory()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e),
        running(cfg_a, pin_factory=factory) as a,
    ):
        await click(factory)
        call = a.calls_mgr.active
        assert call is not None and call.peer == "echo"
        await until(lambda: call.state == "active" and frames(a) >= 25)
        await click(factory)  # in a call: ignored
        await still_in_call(a, call)
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
    assert len(sa) == 1 and sa[0]["end_reason"] == "local_hangup"


async def test_press_action_none_ignores_presses(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = button_config(tmp_path, broker.port, alsa, "none")
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    factory = MockFactory()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e),
        running(cfg_a, pin_factory=factory) as a,
    ):
        await click(factory)
        # A dial would have made the call active in its task's first step, run by now.
        assert a.calls_mgr.active is None and not a.calls_mgr.history
        # In a call too: the call placed otherwise keeps going.
        call = await a.calls_mgr.dial()
        await until(lambda: call.state == "active" and frames(a) >= 25)
        await click(factory)
        await still_in_call(a, call)
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
    assert len(sa) == 1 and sa[0]["end_reason"] == "local_hangup"
    outgoing = [e for e in events(c.messages, "dev-a") if e["category"] == "call.outgoing"]
    assert len(outgoing) == 1
