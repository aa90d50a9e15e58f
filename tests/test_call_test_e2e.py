"""call_test: the round-trip measurement (pure), and end to end through a real agent process.

End to end: a real mosquitto, a real echo peer, the agent as a child process on file-backed
ALSA, driven by `edgeagent-ctl cmd` signed with a key from `edgeagent-ctl keygen`, and over
`--local` with the broker stopped (the documented refusal: the echo peer needs MQTT).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import AgentProcess, Collector, collector
from alsa_support import bench_alsa
from call_support import echo_peer, endpoint_config

from edgeagent import ctl
from edgeagent.call.calltest import (
    NO_BROKER,
    CallTestProbe,
    Stream,
    Timeline,
    build_program,
    measure_round_trip,
    quality_score,
)
from edgeagent.call.echo_peer import EchoPeer

RATE = 48000

# --- pure: the measurement ---------------------------------------------------------------------


def _echo_of(program_samples: np.ndarray, delay_s: float, gain: float, seed: int = 1) -> np.ndarray:
    """What an echo path returns: the program delayed, scaled, with a little noise."""
    rng = np.random.default_rng(seed)
    delayed = np.concatenate([np.zeros(round(delay_s * RATE)), program_samples.astype(float)])
    noise = rng.normal(0, 30, delayed.size)
    return np.clip(np.rint(gain * delayed + noise), -32768, 32767).astype(np.int16)


def _trip(program: Any, back: np.ndarray, recv_t0: float = 0.0) -> Any:
    sent = Timeline.contiguous(program.samples, 0.0)
    return measure_round_trip(program, sent, Timeline.contiguous(back, recv_t0))


@pytest.mark.parametrize("delay_s", [0.05, 0.18, 0.9, 1.4])
def test_round_trip_is_found_by_correlation_at_any_plausible_delay(delay_s: float) -> None:
    program = build_program(5)
    back = _echo_of(program.samples, delay_s, 0.5)
    # The rendered stream starts 30 ms after the sent one (the render tap's own start).
    trip = _trip(program, back[1440:], 0.03)
    assert trip.verdict == "ok", trip
    assert trip.bursts_found == trip.bursts_sent == len(program.onsets) >= 4
    assert trip.round_trip_ms == pytest.approx(1000 * delay_s, abs=1.0)
    assert trip.min_ms is not None and trip.max_ms is not None
    assert trip.max_ms - trip.min_ms < 1.0
    assert trip.rx_level_dbfs == pytest.approx(trip.tx_level_dbfs + 20 * np.log10(0.5), abs=0.3)
    assert trip.rx_clipping_pct == 0.0


def test_each_chirp_matches_only_itself_so_long_trips_are_unambiguous() -> None:
    program = build_program(6)
    gap_s = (program.onsets[1] - program.onsets[0]) / RATE
    back = _echo_of(program.samples, gap_s + 0.12, 0.8)  # longer than the gap between chirps
    assert _trip(program, back).round_trip_ms == pytest.approx(1000 * (gap_s + 0.12), abs=1.0)
    a, b = (x.astype(float) for x in program.bursts[:2])
    assert abs(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)) < 0.1


def test_a_playback_thread_that_stalls_and_bursts_does_not_skew_the_trip() -> None:
    program = build_program(4)
    back = _echo_of(program.samples, 0.1, 0.5)
    frames = [back[i : i + 960] for i in range(0, back.size - 959, 960)]
    # Frames on time up to 40; then a 300 ms stall, caught up by the next 19 frames at 4 ms.
    times, t = [], 0.0
    for m in range(len(frames)):
        times.append(t)
        t += 0.32 if m == 40 else (0.004 if 40 < m <= 59 else 0.02)
    rx = Timeline.of(list(zip(times, frames, strict=True)))
    trip = measure_round_trip(program, Timeline.contiguous(program.samples, 0.0), rx)
    first_onset_frame = program.onsets[0] // 960
    assert first_onset_frame < 40
    # Every chirp found, each timed by its own frames: 100 ms, or 96 where the catch-up
    # overshot by 4 ms (19 frames x 16 ms for a 300 ms stall); never the stall itself.
    assert trip.bursts_found == trip.bursts_sent
    assert trip.max_ms == pytest.approx(100.0, abs=0.5)
    assert trip.min_ms == pytest.approx(96.0, abs=0.5)


def test_silence_noise_and_missing_chirps_give_their_verdicts() -> None:
    program = build_program(4)
    silence = np.zeros(program.samples.size + RATE, dtype=np.int16)
    trip = _trip(program, silence)
    assert trip.verdict == "missing" and trip.round_trip_ms is None and trip.bursts_found == 0
    noise = np.random.default_rng(3).normal(0, 3000, silence.size).astype(np.int16)
    assert _trip(program, noise).verdict == "missing"
    # Nothing recorded at all (the call never connected).
    empty = Timeline.of([])
    assert measure_round_trip(program, empty, empty).bursts_sent == 0
    # The second chirp lost on the way: found, but partial.
    back = _echo_of(program.samples, 0.1, 0.5)
    start = program.onsets[1] + round(0.1 * RATE)
    back[start : start + program.bursts[1].size] = 0
    trip = _trip(program, back)
    assert trip.verdict == "partial" and trip.bursts_found == trip.bursts_sent - 1


def test_clipped_return_is_reported() -> None:
    program = build_program(3)
    back = _echo_of(program.samples, 0.1, 8.0)  # +18 dB: the -12 dBFS peak clips
    trip = _trip(program, back)
    assert trip.round_trip_ms == pytest.approx(100.0, abs=1.5)
    assert trip.rx_clipping_pct > 1.0 and trip.rx_peak_dbfs == pytest.approx(0.0, abs=0.1)


def test_timeline_times_samples_by_their_own_frame() -> None:
    frame = np.ones(960, dtype=np.int16)
    tl = Stream()
    for k, t in enumerate([1.0, 1.02, 1.5, 1.504]):  # a stall, then a burst
        tl.add(t, frame * k)
    line = tl.timeline()
    assert line.samples.size == 4 * 960
    assert line.time_of(0) == 1.0 and line.time_of(960 + 480) == pytest.approx(1.03)
    assert line.time_of(3 * 960) == pytest.approx(1.504)
    assert line.index_at(1.4) == 2 * 960 and line.index_at(9.0) == 4 * 960


async def test_probe_sends_the_program_then_silence_and_records_both_ends() -> None:
    program = build_program(1)
    now = [0.0]
    probe = CallTestProbe(program, lambda: now[0], tail_s=0.1)
    seen: list[int] = []
    process = probe.wrap_processor(lambda f: (seen.append(int(f.sum())), f)[1])
    tap = probe.wrap_render_tap(None)
    mic = np.full(960, 7, dtype=np.int16)
    out = []
    while not probe.done.is_set():
        out.append(process(mic))
        tap(np.zeros(960, dtype=np.int16))
        now[0] += 0.02
    sent = np.concatenate(out)
    n = program.samples.size
    assert np.array_equal(sent[:n], program.samples) and not sent[n:].any()
    assert seen and set(seen) == {7 * 960}  # the microphone still went through the processor
    assert len(probe.sent) == len(probe.received) == len(out) - 1


def test_quality_score_falls_with_latency_and_loss() -> None:
    good = quality_score(120.0, 0.0)
    slow = quality_score(900.0, 0.0)
    lossy = quality_score(120.0, 5.0)
    assert good["mos"] > 4.0 > slow["mos"] and good["mos"] > lossy["mos"]
    assert quality_score(None, None)["mos"] is None


def test_quality_score_uses_the_calls_codec_and_concealment() -> None:
    from edgeagent.quality import emodel

    plain = quality_score(120.0, 5.0)  # no codec impairment, silence on loss
    codec = quality_score(120.0, 0.0, ie=emodel.opus_ie(32.0, 10))
    assert codec["mos"] < quality_score(120.0, 0.0)["mos"]
    fec = quality_score(120.0, 5.0, bpl=emodel.BPL_OPUS_PLC_FEC)
    plc = quality_score(120.0, 5.0, bpl=emodel.BPL_OPUS_PLC)
    assert fec["mos"] > plc["mos"] > plain["mos"]  # concealment is worth MOS under loss


# --- end to end --------------------------------------------------------------------------------


async def _ctl(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = await asyncio.to_thread(ctl.main, argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if lines else {})


async def _signed_call_test(
    c: Collector, peer: EchoPeer, agent: AgentProcess, argv: list[str], capsys: Any
) -> None:
    await c.wait_for(lambda ms: [m for m in c.on("/status") if m.json()["state"] == "online"], 20)
    rc, resp = await _ctl(argv, capsys)
    assert rc == 0 and resp["code"] == 200, (resp, agent.output()[-3000:])
    r = resp["result"]
    assert peer.answered == 1 and r["peer"] == "echo-1" and r["result"] == "completed"
    assert 0 < r["round_trip_ms"] < 1000, r
    lat = r["latency"]
    assert lat["min_ms"] <= r["round_trip_ms"] <= lat["max_ms"] < 1000
    assert r["echo_verdict"] == "ok", r
    assert r["echo"]["bursts_found"] == r["echo"]["bursts_sent"] >= 3
    assert r["echo"]["correlation"] >= 0.8
    # The chirps came back at about the level they were sent (Opus both ways).
    levels = r["levels"]
    assert levels["tx_dbfs"] == pytest.approx(-15.0, abs=0.5)
    assert abs(levels["gain_db"]) < 3.0 and levels["rx_clipping_pct"] == 0.0
    assert -35 < levels["mic_dbfs"] < -25 and levels["mic_clipping_pct"] == 0.0
    assert levels["issues"] == []
    assert 3.5 < r["quality_score"] <= 4.5 and r["quality"]["loss_pct"] == 0.0
    # Scored with the model of the call's own quality messages: our codec's Ie and the
    # concealment of a far end that sends FEC (the echo peer does, as an agent would).
    model = r["quality"]["model"]
    assert model["concealment"] == "opus_plc_fec" and model["ie"] == pytest.approx(10.7)
    assert r["opus"]["fec_to_far_end"] and r["opus"]["decoder"] == "libopus_plc"
    leds = r["leds"]
    assert leds["states"][:2] == ["connecting", "good"] and leds["states"][-1] == "idle"
    assert leds["in_call"]["state"] == "good", json.dumps(r)
    assert leds["states"] == ["connecting", "good", "idle"]
    assert leds["in_call"]["pins"] == {"green": 1, "amber": 0, "red": 0}
    # The call really happened: its summary says completed (the test's own hangup).
    summary = await c.wait_for(lambda ms: c.on(f"/calls/{r['call_id']}/summary"), 10)
    assert summary[-1].json()["result"] == "completed"


@pytest.mark.slow
@pytest.mark.broker
async def test_call_test_end_to_end_with_a_real_agent_and_echo_peer(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "op.jwk.json"
    capsys.readouterr()
    assert ctl.main(["keygen", "--kid", "op", "--out", str(key), "--roles", "operate"]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [entry]}))

    alsa = bench_alsa(tmp_path)
    sock = tmp_path / "run" / "ctl.sock"
    security = f"""
[security]
keys_file = "{keys_file}"
local_socket = "{sock}"
"""
    # Someone talking on the microphone: noise bursts at -25 dBFS, 0.4 s on / 0.4 s off over
    # a -65 dBFS room (silence would rightly be flagged no_audio, and the call degraded).
    rng = np.random.default_rng(5)
    on = (np.arange(RATE * 20) // round(0.4 * RATE)) % 2 == 0
    room = rng.normal(0, 1, RATE * 20) * 32768 * np.where(on, 10 ** (-25 / 20), 10 ** (-65 / 20))
    dev_cfg = endpoint_config(
        tmp_path,
        broker.port,
        "dev-1",
        alsa,
        mic=np.rint(room).astype(np.int16),
        call='default_peer = "echo-1"',
        extra=security,
    )
    echo_cfg = endpoint_config(tmp_path, broker.port, "echo-1", alsa)
    agent = AgentProcess(dev_cfg, env={"ALSA_CONFIG_PATH": str(alsa.conf)})
    signed = ["cmd", "dev-1", "call_test", "duration_s=3", "--json", "--port", str(broker.port),
              "--key", str(key)]  # fmt: skip
    local = ["--json", "--local", str(sock)]
    async with echo_peer(echo_cfg) as peer:
        agent.start()
        try:
            async with collector(broker.port, "edge/v1/dev-1/#") as c:
                await _signed_call_test(c, peer, agent, signed, capsys)
            # Local socket, broker stopped: refused at once with the documented code.
            broker.stop()
            for _ in range(200):  # bounded poll: nothing to await across the process boundary
                rc, resp = await _ctl(["cmd", "dev-1", "snapshot", *local], capsys)
                if resp["result"]["broker"] == "down":
                    break
                await asyncio.sleep(0.05)
            assert resp["result"]["broker"] == "down"
            rc, resp = await _ctl(["cmd", "dev-1", "call_test", "duration_s=1", *local], capsys)
            assert resp["code"] == NO_BROKER == 500 and rc == ctl.exit_code(500), resp
            assert "broker" in resp["error"]
            rc, resp = await _ctl(["cmd", "dev-1", "ping", *local], capsys)
            assert rc == 0 and resp["result"]["pong"] is True
        finally:
            agent.stop_quietly()
            broker.start()
