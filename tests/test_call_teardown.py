"""A call whose teardown fails still ends: record, summary, and the agent free for the next."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
from agent_support import collector
from aiortc import RTCDtlsParameters
from alsa_support import tone
from call_support import alsa_env, echo_peer, endpoint_config, events, running, summaries, until

from edgeagent.call.session import CallSession

pytestmark = [pytest.mark.broker]


async def test_a_session_that_fails_to_close_does_not_leave_the_agent_busy(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(700, 30))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    real_close = CallSession.close
    failing = {"left": 1}

    async def close(self: CallSession) -> None:
        await real_close(self)
        if failing["left"]:
            failing["left"] -= 1
            raise ValueError("playout push failed")  # what a media task's error looks like

    monkeypatch.setattr(CallSession, "close", close)
    async with collector(broker.port, "edge/v1/#") as c, echo_peer(cfg_e), running(cfg_a) as a:
        for _ in range(2):  # the second dial would raise "busy" if the first stuck
            await a.calls_mgr.dial("echo")
            await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
            await a.calls_mgr.hangup()
            assert a.calls_mgr.active is None
        s = await c.wait_for(lambda ms: len(summaries(ms, "dev-a")) == 2 and summaries(ms, "dev-a"))
    assert [x["result"] for x in s] == ["completed", "completed"]
    assert failing["left"] == 0


async def test_an_error_in_one_of_aiortcs_own_tasks_ends_the_call_not_the_agent(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(700, 30))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with collector(broker.port, "edge/v1/#") as c, echo_peer(cfg_e), running(cfg_a) as a:
        await a.calls_mgr.dial("echo")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        session = a.calls_mgr.active.session
        assert session is not None
        dtls = session.pc.getTransceivers()[0].sender.transport
        # What a remote SDP without fingerprints did: aiortc's DTLS start fails in a task
        # nobody awaits, and the loop's handler sees it when the task is collected.
        task = asyncio.ensure_future(dtls.start(RTCDtlsParameters(fingerprints=[])))
        await asyncio.wait([task])
        del task
        gc.collect()
        s = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        assert not a.crashed
        await a.calls_mgr.dial("echo")  # and the agent calls again
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        await a.calls_mgr.hangup()
    assert (s[0]["result"], s[0]["end_reason"]) == ("failed", "error")
    closed = [e for e in events(c.messages, "dev-a") if e["category"] == "call.closed"]
    assert "RTCDtlsTransport.start" in closed[0]["data"]["detail"]


async def test_device_alerts_that_fire_during_a_call_are_in_its_summary(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """A bad call on a throttled device says so in its own record, not only in a device
    alert the operator has to line up with the call's times."""
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(700, 30))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with collector(broker.port, "edge/v1/#") as c, echo_peer(cfg_e), running(cfg_a) as a:
        call = await a.calls_mgr.dial("echo")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        # What the alert engine reports for a device rule (edgeagent.agent._on_alert).
        a.calls_mgr.note_alert("thermal_throttled", "firing", "warning", 1.0, None)
        a.calls_mgr.note_alert("no_audio", "firing", "warning", 1.0, "another-call")
        await a.calls_mgr.hangup()
        s = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
    assert s[0]["call_id"] == call.call_id
    assert "thermal_throttled" in s[0]["device_alerts"]
    assert "no_audio" not in s[0]["device_alerts"]  # another call's alert is not this one's


async def test_the_crash_snapshot_carries_memory_figures_for_an_oom_diagnosis(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa)
    async with running(cfg_a) as a:
        snap = a.crash_snapshot()
    assert snap["max_rss_mb"] > 20  # this process's peak, in MiB
    assert "mem_available_mb" in snap  # the last heartbeat's (None before the first)
