"""Calls that go wrong: each gives its events, summary and LEDs, and the agent stays up."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from agent_support import collector
from alsa_support import tone
from call_support import (
    alsa_env,
    call_events,
    echo_peer,
    endpoint_config,
    events,
    one_summary_per_call,
    running,
    summaries,
    until,
)
from led_support import assert_led_states, traced
from schema_support import assert_valid

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_not_allowed_caller_is_rejected_forbidden(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 5))
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, call='allow = ["operator-1"]')
    seams_a, leds_a = traced()
    seams_b, leds_b = traced()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_a, **seams_a) as a,
        running(cfg_b, **seams_b),
    ):
        call = await a.calls_mgr.dial("dev-b")
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))
        assert a.calls_mgr.active is None
        assert await leds_a.decoded() == "idle"
        assert await leds_b.decoded() == "idle"
        leds_a.stop()
        leds_b.stop()
    assert sa[0]["result"] == "rejected" and sa[0]["end_reason"] == "rejected_forbidden"
    assert sb[0]["result"] == "rejected" and sb[0]["end_reason"] == "forbidden"
    refused = [e for e in events(c.messages, "dev-b") if e["category"] == "call.incoming"]
    assert refused[0]["level"] == "warning" and "not allowed" in refused[0]["message"]
    for m in c.messages:
        assert_valid(m.topic, m.payload)
    # The refused offer never rang (docs/leds.md: ringing is a call waiting for an
    # answer): the callee's LEDs kept the idle heartbeat; the caller dialled, then idle.
    assert_led_states(leds_b, ["offline", "idle"])
    assert_led_states(leds_a, ["offline", "idle", "connecting", "idle"])
    assert list(one_summary_per_call(c.messages, "dev-a")) == [call.call_id]
    assert list(one_summary_per_call(c.messages, "dev-b")) == [call.call_id]


async def test_an_echo_peer_with_an_allowlist_refuses_other_callers_forbidden(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 5))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa, call='allow = ["operator-1"]')
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e) as echo,
        running(cfg_a) as a,
    ):
        await a.calls_mgr.dial("echo")
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
    assert (sa[0]["result"], sa[0]["end_reason"]) == ("rejected", "rejected_forbidden")
    assert echo.refused == 1 and echo.answered == 0


async def test_busy_and_answer_timeout_and_leds(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 10))
    cfg_c = endpoint_config(tmp_path, broker.port, "dev-c", alsa, mic=tone(600, 10))
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, answer="ring", call="ring_timeout_s = 1.0"
    )
    seams_a, leds_a = traced()
    seams_b, leds_b = traced()
    seams_c, leds_c = traced()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_a, **seams_a) as a,
        running(cfg_b, **seams_b) as b,
        running(cfg_c, **seams_c) as c_agent,
    ):
        ringing = await a.calls_mgr.dial("dev-b")
        await until(lambda: b.calls_mgr.active and b.calls_mgr.active.state == "ringing")
        # A second caller while B rings: busy.
        busy = await c_agent.calls_mgr.dial("dev-b")
        sc = await c.wait_for(lambda ms: summaries(ms, "dev-c"))
        assert sc[0]["end_reason"] == "rejected_busy"
        # Nobody answers: B's ring times out, A is told it was not answered.
        sb = await c.wait_for(
            lambda ms: [s for s in summaries(ms, "dev-b") if s["peer"] == "dev-a"]
        )
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        await until(lambda: b.health.current().state == "idle")
        await until(lambda: a.health.current().state == "idle")
        for trace in (leds_a, leds_b, leds_c):
            assert await trace.decoded() == "idle"
            trace.stop()
    assert sb[0]["result"] == "missed" and sb[0]["end_reason"] == "ring_timeout"
    assert sa[0]["result"] == "rejected" and sa[0]["end_reason"] == "rejected_unavailable"
    # The callee rang (fast green blink) and went back to the idle heartbeat; the busy
    # caller's offer did not touch its LEDs. Both callers showed connecting until refused.
    assert_led_states(leds_b, ["offline", "idle", "ringing", "idle"])
    assert_led_states(leds_a, ["offline", "idle", "connecting", "idle"])
    assert_led_states(leds_c, ["offline", "idle", "connecting", "idle"])
    # One summary per call on each side: B has the missed call and the busy one.
    by_b = one_summary_per_call(c.messages, "dev-b")
    assert set(by_b) == {ringing.call_id, busy.call_id}
    assert (by_b[busy.call_id]["result"], by_b[busy.call_id]["end_reason"]) == ("rejected", "busy")
    assert list(one_summary_per_call(c.messages, "dev-a")) == [ringing.call_id]
    assert list(one_summary_per_call(c.messages, "dev-c")) == [busy.call_id]
    # B's events for the ringing call: incoming, ringing, then closed as missed once the
    # 1 s ring timeout ran out; the busy caller's offer is one refused `call.incoming`.
    rang = call_events(c.messages, "dev-b", ringing.call_id)
    assert [e["category"] for e in rang] == ["call.incoming", "call.ringing", "call.closed"]
    assert rang[2]["data"]["result"] == "missed"
    assert rang[2]["data"]["end_reason"] == "ring_timeout"
    assert 1.0 <= rang[2]["ts"] - rang[1]["ts"] < 3.0
    refused = call_events(c.messages, "dev-b", busy.call_id)
    assert [(e["category"], e["data"]["reason"]) for e in refused] == [("call.incoming", "busy")]


async def test_peer_vanishing_mid_call_hangs_up_on_media_timeout(
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
    seams, leds = traced()
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a, **seams) as a:
        async with echo_peer(cfg_e, clean_stop=False):
            await a.calls_mgr.dial("echo")
            await until(
                lambda: (
                    a.calls_mgr.active
                    and a.calls_mgr.active.session
                    and a.calls_mgr.active.session.sink
                    and a.calls_mgr.active.session.sink.frames_received >= 50
                )
            )
            assert await leds.decoded() == "good"  # solid green, past connecting's 1 s blink
        # The echo peer is gone without a hangup (its task was cancelled).
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"), timeout=20)
        assert a.calls_mgr.active is None
        await until(lambda: a.health.current().state == "idle")
        assert await leds.decoded() == "idle"
        leds.stop()
    assert sa[0]["result"] == "failed"
    assert sa[0]["end_reason"] in ("media_timeout", "transport_closed")
    cats = [e["category"] for e in events(c.messages, "dev-a")]
    assert "call.established" in cats and "call.closed" in cats
    assert_led_states(leds, ["offline", "idle", "connecting", "good", "degraded", "idle"])


async def test_missing_audio_device_faults_and_recovers(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 5))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    # The card is "unplugged": its PCM is not defined.
    text = cfg_a.read_text().replace('capture_device = "mic_dev-a"', 'capture_device = "mic_gone"')
    cfg_a.write_text(text)
    seams, leds = traced()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e),
        running(cfg_a, **seams) as a,
    ):
        await until(lambda: a.health.current().state == "fault")
        assert await leds.decoded() == "fault"
        await a.calls_mgr.dial("echo")  # fails on the device, recorded below
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
        assert sa[0]["result"] == "failed" and sa[0]["end_reason"] == "audio_device"
        # The card comes back: the agent notices by itself and leaves the fault.
        alsa.add_mic("mic_gone", tmp_path / "mic_dev-a.raw")
        # alsa-lib rereads its config when the file's mtime (in seconds) changes.
        later = time.time() + 2
        os.utime(alsa.conf, (later, later))
        await until(lambda: a.health.current().state == "idle", timeout=10)
        health = await c.wait_for(
            lambda ms: (
                [m.json()["state"] for m in ms if m.topic.endswith("dev-a/health")]
                if any(m.topic.endswith("dev-a/health") and m.json()["state"] == "idle" for m in ms)
                else None
            )
        )
        assert await leds.decoded() == "idle"
        leds.stop()
    assert "fault" in health and health[-1] == "idle"
    # Fault (fast red blink) from the start, through the failed call, until the card is
    # back. The broker link and the first device probe race at start: idle may come first.
    start = ["offline", "idle"] if len(leds.segments()) == 4 else ["offline"]
    assert_led_states(leds, [*start, "fault", "idle"])
    cats = [(e["category"], e["level"]) for e in events(c.messages, "dev-a")]
    assert ("audio.device", "error") in cats
    assert any(cat == "audio.device" and lvl == "info" for cat, lvl in cats)


class FifoSpeaker:
    """A playback "card" that can be unplugged mid-call: its file PCM writes to a FIFO.

    A `cat` process drains the FIFO into a file, as a card consumes samples. It
    holds the FIFO open read-write, so the PCM's opens never wait for a reader, and
    it is a separate process: this one never holds a FIFO end, so a write that
    blocks on a full pipe (pyalsaaudio keeps the GIL) cannot starve the drain.
    `unplug()` kills it: with no reader left, the PCM's next writes fail with EPIPE,
    which alsa-lib's file plugin reports as an I/O error, as for a vanished USB card.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.sink = path.with_suffix(".received")
        self._cat = subprocess.Popen(
            ["sh", "-c", 'exec cat 0<>"$1" >"$2"', "sh", str(path), str(self.sink)]
        )

    @property
    def received(self) -> int:
        return self.sink.stat().st_size if self.sink.exists() else 0

    def unplug(self) -> None:
        self._cat.kill()
        self._cat.wait(5)


async def test_speaker_vanishing_mid_call_ends_the_call_faults_and_recovers(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 30))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    speaker = FifoSpeaker(tmp_path / "spk_fifo")
    request.addfinalizer(speaker.unplug)
    alsa.add_speaker("spk_dev-a", speaker.path)

    def touch_conf() -> None:  # alsa-lib rereads its config when the mtime (s) changes
        later = time.time() + 2 + touch_conf.bumps  # type: ignore[attr-defined]
        touch_conf.bumps += 2  # type: ignore[attr-defined]
        os.utime(alsa.conf, (later, later))

    touch_conf.bumps = 0  # type: ignore[attr-defined]
    seams, leds = traced()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e),
        running(cfg_a, **seams) as a,
    ):
        await a.calls_mgr.dial("echo")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        await until(lambda: speaker.received > 48000 * 2)  # a second of audio reached the card
        assert await leds.decoded() == "good"
        # Unplugged: while it is gone, its PCM cannot be opened either.
        alsa.add_speaker("spk_dev-a", tmp_path / "no-such-card" / "spk.raw")
        touch_conf()
        speaker.unplug()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"), timeout=15)
        assert sa[0]["result"] == "failed" and sa[0]["end_reason"] == "audio_device"
        await until(lambda: a.health.current().state == "fault")
        assert a.calls_mgr.active is None
        assert await leds.decoded() == "fault"
        # Plugged back in: the agent notices by itself, leaves the fault, and calls again.
        alsa.add_speaker("spk_dev-a", tmp_path / "spk_back.raw")
        touch_conf()
        await until(lambda: a.health.current().state == "idle", timeout=15)
        await a.calls_mgr.dial("echo")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: s if len(s := summaries(ms, "dev-a")) == 2 else None)
        await until(lambda: a.health.current().state == "idle")
        assert await leds.decoded() == "idle"
        leds.stop()
    assert sa[1]["result"] == "completed"
    assert len(one_summary_per_call(c.messages, "dev-a")) == 2  # two calls, one summary each
    assert (tmp_path / "spk_back.raw").stat().st_size > 0  # the new card plays
    cats = [(e["category"], e["level"]) for e in events(c.messages, "dev-a")]
    assert ("audio.device", "error") in cats
    assert any(cat == "audio.device" and lvl == "info" for cat, lvl in cats)
    good_call = ["connecting", "good"]
    assert_led_states(leds, ["offline", "idle", *good_call, "fault", "idle", *good_call, "idle"])
