"""Quality alerts from real calls: injected loss fires and resolves MOS and loss alerts; clipping.

Two in-process agents over a real mosquitto; their media crosses the user-space
lossy relay (the signaling proxy rewrites the SDP candidates), whose loss the
test changes mid-call. Everything is awaited on broker messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import collector
from alsa_support import RATE, read_raw, tone
from call_support import alsa_env, echo_peer, endpoint_config, running, summaries, until
from latency_support import delay_windows, matched
from lossy_relay import Direction, lossy_link
from schema_support import assert_valid

from edgeagent.audio.synth import speech_like

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# Short durations through the config, as an operator would override the built-ins.
FAST_RULES = """
[alerts]
[[alerts.rules]]
name = "mos_low"
for_s = 1.0
clear_for_s = 1.0
[[alerts.rules]]
name = "loss_high"
for_s = 1.0
clear_for_s = 1.0
"""
SEAMS: dict[str, Any] = {"install_crash_hooks": False}


def lossy_path(broker_port: int, b: str, loss: float, *, seed: int) -> Any:
    """dev-a to `b` through the lossy relay, `loss` each way (seeds `seed`, `seed` + 1)."""
    return lossy_link(
        broker_port,
        a="dev-a",
        b=b,
        a_to_b=Direction(loss=loss, seed=seed),
        b_to_a=Direction(loss=loss, seed=seed + 1),
    )


def alerts(messages: list[Any], device: str, name: str, state: str) -> list[dict[str, Any]]:
    return [
        m.json()
        for m in messages
        if m.topic == f"edge/v1/{device}/alerts/{name}" and m.json()["state"] == state
    ]


def quality(messages: list[Any], device: str) -> list[dict[str, Any]]:
    prefix = f"edge/v1/{device}/calls/"
    return [m.json() for m in messages if m.topic.startswith(prefix) and "/quality" in m.topic]


@pytest.mark.timeout(120)  # its own waits add up to 80 s on a loaded machine (5 s idle)
async def test_injected_loss_lowers_mos_fires_mos_and_loss_alerts_and_resolves_them(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 60, -20.0), extra=FAST_RULES
    )
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, mic=tone(1000, 60, -20.0), extra=FAST_RULES
    )
    async with (
        collector(broker.port, "edge/v1/#") as c,
        lossy_path(broker.port, "dev-b", 0.2, seed=3) as (relay, proxy),
        running(cfg_b, **SEAMS),
        running(cfg_a, **SEAMS) as a,
    ):
        call = await a.calls_mgr.dial(proxy.alias_b)
        fired = {
            name: (
                await c.wait_for(
                    lambda ms, n=name: alerts(ms, "dev-a", n, "firing"),  # type: ignore[misc]
                    timeout=20,
                )
            )[0]
            for name in ("loss_high", "mos_low")
        }
        assert relay.b_to_a.rtp_dropped > 0
        lossy = quality(c.messages, "dev-a")
        assert fired["loss_high"]["call_id"] == call.call_id
        assert fired["loss_high"]["value"] > 3.0
        assert fired["mos_low"]["value"] < 3.0
        assert fired["mos_low"]["severity"] == "warning"
        assert any(q["loss_pct"] and q["loss_pct"] > 5 and q["mos"] < 3.0 for q in lossy)
        # dev-a's decoder concealed the lost packets with libopus PLC and, the far end
        # being an agent that decodes FEC too (its SDP says so), recovered the last
        # frame of each gap from the FEC dev-b sends once it sees the loss.
        assert lossy[-1]["audio"]["plc_frames"] > 0
        assert lossy[-1]["audio"]["fec_frames"] > 0
        session = a.calls_mgr.active.session if a.calls_mgr.active else None
        assert session is not None and session.fec_to_far_end  # and dev-a sends FEC to dev-b
        assert session.fec_from_far_end  # its MOS models PLC plus dev-b's FEC
        assert lossy[-1]["audio"]["concealed_frames"] >= lossy[-1]["audio"]["plc_frames"]

        # The loss stops mid-call: both alerts resolve while the call goes on.
        relay.a_to_b.loss = relay.b_to_a.loss = 0.0
        stopped_at = len(c.messages)
        for name in ("loss_high", "mos_low"):
            await c.wait_for(
                lambda ms, n=name: alerts(ms[stopped_at:], "dev-a", n, "resolved"),  # type: ignore[misc]
                timeout=20,
            )
        assert a.calls_mgr.active is not None and a.calls_mgr.active.call_id == call.call_id
        resolved = {n: alerts(c.messages, "dev-a", n, "resolved")[-1] for n in fired}
        assert resolved["loss_high"]["value"] <= 2.0
        assert resolved["mos_low"]["value"] >= 3.2
        clean = quality(c.messages[stopped_at:], "dev-a")
        assert clean[-1]["loss_pct"] == 0.0
        assert clean[-1]["mos"] > min(q["mos"] for q in lossy if q["mos"] is not None) + 1.0
        # Each alert fired once and resolved once, in that order.
        for name in fired:
            states = [
                m.json()["state"] for m in c.messages if m.topic == f"edge/v1/dev-a/alerts/{name}"
            ]
            assert states == ["firing", "resolved"], (name, states)
        await a.calls_mgr.hangup()
        summary = await c.wait_for(
            lambda ms: [
                m.json() for m in ms if m.topic.endswith(f"dev-a/calls/{call.call_id}/summary")
            ]
        )
        # The summary says FEC covered the loss both ways, with which codec build.
        opus = summary[0]["opus"]
        assert opus["encoder"].startswith("libopus ") and opus["decoder"] == "libopus_plc"
        assert opus["fec_to_far_end"] and opus["fec_sent"] and opus["fec_from_far_end"]
        assert opus["max_loss_hint_pct"] >= 10  # 20 % loss reported by dev-b
        assert (opus["bitrate_kbps"], opus["complexity"]) == (32.0, 10)
        # Through 20 % loss and its end, dev-a's playout stayed within its bound.
        playout = summary[0]["playout"]
        assert 0 < playout["max_depth_ms"] <= a.cfg.audio.playout_max_ms, playout
        assert playout["overruns"] == 0, playout
    for m in c.messages:
        if "/alerts/" in m.topic or "/calls/" in m.topic:
            assert_valid(m.topic, m.payload)


def clipped_tone(seconds: float) -> np.ndarray:
    """A 300 Hz sine driven 12 dB past full scale, clipped at the rails."""
    t = np.arange(round(seconds * RATE)) / RATE
    return np.clip(4 * 32767 * np.sin(2 * np.pi * 300 * t), -32768, 32767).astype(np.int16)


async def test_clipping_source_fires_clipping_alert_and_event(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=clipped_tone(30))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e),
        running(cfg_a, **SEAMS) as a,
    ):
        call = await a.calls_mgr.dial("echo")
        await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
        fired = await c.wait_for(lambda ms: alerts(ms, "dev-a", "clipping", "firing"), timeout=10)
        assert fired[0]["call_id"] == call.call_id
        events = await c.wait_for(
            lambda ms: [
                m.json()
                for m in ms
                if m.topic == "edge/v1/dev-a/events" and m.json()["category"] == "audio.clipping"
            ]
        )
        assert events[0]["data"]["active"] is True
        assert events[0]["data"]["stream"] in ("capture", "capture_raw")
        assert events[0]["data"]["value"] > 0.1  # percent of samples at the rail
        q = await c.wait_for(lambda ms: quality(ms, "dev-a"))
        assert q[0]["audio"]["clipping_pct"] > 0.1
        await a.calls_mgr.hangup()
        summary = await c.wait_for(
            lambda ms: [m.json() for m in ms if m.topic.endswith(f"{call.call_id}/summary")]
        )
        assert any(k.endswith("clipping") for k in summary[0]["audio_issues"])
    assert not alerts(c.messages, "dev-a", "no_audio", "firing")


async def test_the_echo_peer_conceals_loss_and_sends_fec_back_like_an_agent(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgeagent.call.opus import opus_encoders
    from edgeagent.call.tracks import receive_decoders

    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 60, -20.0))
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    async with (
        lossy_path(broker.port, "echo", 0.15, seed=5) as (relay, proxy),
        echo_peer(cfg_e) as echo,
        running(cfg_a, **SEAMS) as a,
    ):
        await a.calls_mgr.dial(proxy.alias_b)
        pc = (await until(lambda: list(echo.calls.values()), timeout=10))[0]

        def echo_fec_frames() -> int:
            return sum(d.plc.fec_frames for d in receive_decoders(pc) if d.plc is not None)

        # The echo peer decodes dev-a's FEC (its SDP said it could) ...
        await until(lambda: echo_fec_frames() > 0, timeout=20)
        # ... and, seeing dev-a's loss reports, sends FEC back, which dev-a decodes.
        await until(lambda: any(e.fec and e.loss_hint_percent > 0 for e in opus_encoders(pc)))
        session = a.calls_mgr.active.session if a.calls_mgr.active else None
        assert session is not None and session.fec_to_far_end and session.fec_from_far_end
        await until(lambda: session.decoder_concealment()[1] > 0, timeout=20)
        assert relay.a_to_b.rtp_dropped > 0 and relay.b_to_a.rtp_dropped > 0
        await a.calls_mgr.hangup()


async def test_under_loss_the_delay_from_mic_to_far_speaker_stays_bounded(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """15 % loss each way between two agents: the playout conceals and stays near its
    target, and the one-way delay from dev-a's capture PCM to dev-b's playback PCM
    (cross-correlated per 1 s window, tests/latency_support.py) stays bounded all call
    long. With aiortc's own jitter buffer kept (aiortc#543) the same call runs near
    350 ms with a few dozen underruns (bench/latency.py, docs/benchmarks.md)."""
    alsa = alsa_env(tmp_path, monkeypatch)
    lead = np.zeros(RATE // 2, dtype=np.int16)
    sent = np.concatenate([lead, np.rint(speech_like(8.0, 21, level_dbfs=-20.0)).astype(np.int16)])
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=sent)
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa)
    async with (
        collector(broker.port, "edge/v1/+/calls/#") as c,
        lossy_path(broker.port, "dev-b", 0.15, seed=9) as (relay, proxy),
        running(cfg_b, **SEAMS) as b,
        running(cfg_a, **SEAMS) as a,
    ):
        call = await a.calls_mgr.dial(proxy.alias_b)
        a_session = await until(lambda: a.calls_mgr.active and a.calls_mgr.active.session)
        b_session = await until(lambda: b.calls_mgr.active and b.calls_mgr.active.session)
        # dev-b's speaker has played the whole signal plus half a second.
        frames = sent.size // 960 + 25
        await until(
            lambda: b_session.playback is not None and b_session.playback.frames_written >= frames,
            timeout=30,
        )
        t_in, t_out = a_session.capture.first_period_at, b_session.playback.first_period_at
        assert t_in is not None and t_out is not None
        await a.calls_mgr.hangup()
        by_device = await c.wait_for(
            lambda ms: (
                {d: s for d in ("dev-a", "dev-b") for s in summaries(ms, d)}
                if all(summaries(ms, d) for d in ("dev-a", "dev-b"))
                else None
            ),
            timeout=10,
        )
    loss = relay.a_to_b.rtp_dropped / relay.a_to_b.rtp_seen
    assert 0.08 <= loss <= 0.25, loss
    assert by_device["dev-a"]["call_id"] == call.call_id
    target, bound = a.cfg.audio.playout_target_ms, a.cfg.audio.playout_max_ms
    for device, summary in by_device.items():
        playout = summary["playout"]
        assert playout["plc_frames"] > 0, (device, playout)  # the loss was concealed ...
        assert playout["concealed_frames"] >= playout["plc_frames"] + playout["fec_frames"]
        assert 0 < playout["max_depth_ms"] <= bound, (device, playout)  # ... within the bound
        # A run of 3+ lost packets outlasts the 60 ms depth before the next packet brings
        # its PLC: ~2.4 such runs expected in 10 s at 18 %. aiortc's buffer, kept
        # (AgentSeams.aiortc_jitter_buffer), stalls and bursts: 20-27 underruns and 1-5
        # overruns in this call.
        assert playout["overruns"] == 0, (device, playout)
        assert playout["underruns"] <= 8, (device, playout)
        assert playout["late_frames"] <= 20, (device, playout)  # such a gap's PLC: 1-2 late

    windows = delay_windows(sent, read_raw(alsa.speakers["spk_dev-b"]), t_in=t_in, t_out=t_out)
    found = matched(windows)
    delays = [round(w.delay_ms, 1) for w in found]
    print(
        f"\n15 % loss: relay dropped {loss:.1%}; mic -> far speaker delay per 1 s: {delays} ms;"
        f" playout {[s['playout'] for s in by_device.values()]}"
    )
    # A window the playout time-warped (drift correction, 2 % of some frames) or mostly
    # concealed correlates below 0.5 and is left out; on a busy machine 3 of 8 were.
    assert len(found) >= max(4, len(windows) // 2), windows
    # The target is 80 ms on a clean loop; under 15 % loss the delay may not
    # exceed the playout target plus 40 ms of path anywhere in the call, nor wander.
    assert max(delays) <= target + 40, delays
    assert max(delays) - min(delays) <= 30, delays
