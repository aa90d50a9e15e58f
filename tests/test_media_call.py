"""Two real aiortc peers on 127.0.0.1 with ALSA file PCMs at both ends (no signaling).

The harness `run_call` is also used by bench/latency.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from alsa_support import active, bench_alsa, level_dbfs, peak_hz, read_raw, tone, write_raw
from lossy_relay import Direction, LossyRelay, candidate_port, rewrite_candidates

from edgeagent.audio.playout import PlayoutBuffer, PlayoutSettings, PlayoutStats
from edgeagent.call.ice import ice_configuration, restrict_host_addresses
from edgeagent.call.opus import OpusSettings, install_opus_encoder, munge_sdp
from edgeagent.call.tracks import MicrophoneTrack, RemoteAudioSink, install_receive_path
from edgeagent.clock import SystemClock
from edgeagent.hw.alsa import AlsaCapture, AlsaPlayback

LOOPBACK = ["127.0.0.1"]


@dataclass
class Side:
    name: str
    mic_file: Path
    spk_file: Path
    capture: AlsaCapture
    track: MicrophoneTrack
    pc: RTCPeerConnection
    playout: PlayoutBuffer
    playback: AlsaPlayback | None = None
    sink: RemoteAudioSink | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    audible_frames: int = 0
    rendered_frames: int = 0


@dataclass
class CallResult:
    a: Side
    b: Side
    sdp_offer: str
    sdp_answer: str
    relay: LossyRelay | None
    a_stats: PlayoutStats
    b_stats: PlayoutStats
    bytes_per_packet: dict[str, float]


async def run_call(
    tmp_path: Path,
    *,
    signal_a: np.ndarray,
    signal_b: np.ndarray,
    audible_frames: int,
    relay: LossyRelay | None = None,
    bypass: bool = True,
    opus: OpusSettings | None = None,
    playout: PlayoutSettings | None = None,
    b_rendered_frames: int | None = None,
    timeout_s: float = 20.0,
) -> CallResult:
    """Call A -> B until both speakers have played `audible_frames` frames above -40 dBFS.

    With `b_rendered_frames`, until B's speaker has rendered that many frames instead.

    ALSA_CONFIG_PATH must already point at tmp_path/asoundrc (bench_alsa).
    """
    opus = opus or OpusSettings()
    alsa = bench_alsa(tmp_path)
    clock = SystemClock()
    loop = asyncio.get_running_loop()
    both_done = asyncio.Event()
    sides: dict[str, Side] = {}
    pad = np.zeros(48000 * 30, dtype=np.int16)  # past the infile: stale data, not silence

    for name, signal in (("a", signal_a), ("b", signal_b)):
        mic_file = write_raw(tmp_path / f"mic_{name}.raw", np.concatenate([signal, pad]))
        alsa.add_mic(f"mic_{name}", mic_file)
        spk_file = tmp_path / f"spk_{name}.raw"
        alsa.add_speaker(f"spk_{name}", spk_file)
        capture = AlsaCapture(f"mic_{name}", clock=clock, paced=True)
        side = Side(
            name=name,
            mic_file=mic_file,
            spk_file=spk_file,
            capture=capture,
            track=MicrophoneTrack(capture),
            pc=RTCPeerConnection(ice_configuration()),
            playout=PlayoutBuffer(playout),
        )
        sides[name] = side

    def on_rendered(side: Side, frame: np.ndarray) -> None:  # playback thread
        side.rendered_frames += 1
        if level_dbfs(frame) > -40:
            side.audible_frames += 1
        if b_rendered_frames is not None:
            finished = sides["b"].rendered_frames >= b_rendered_frames
        else:
            finished = all(s.audible_frames >= audible_frames for s in sides.values())
        if finished:
            loop.call_soon_threadsafe(both_done.set)

    def attach(side: Side) -> None:
        @side.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            side.sink = RemoteAudioSink(
                track, side.playout, clock=clock, render_tap=lambda f: on_rendered(side, f)
            )
            side.playback = AlsaPlayback(
                f"spk_{side.name}", side.sink.pull, clock=clock, paced=True
            )
            side.tasks.append(asyncio.create_task(side.sink.run()))
            side.tasks.append(asyncio.create_task(side.playback.run()))

    a, b = sides["a"], sides["b"]
    for side in (a, b):
        attach(side)
        side.tasks.append(asyncio.create_task(side.capture.run()))
    try:
        # Offerer.
        a.pc.addTrack(a.track)
        offer = await a.pc.createOffer()
        restrict_host_addresses(a.pc, LOOPBACK)
        await a.pc.setLocalDescription(RTCSessionDescription(munge_sdp(offer.sdp, opus), "offer"))
        sdp_offer = a.pc.localDescription.sdp
        if relay is not None:
            relay.a_addr = ("127.0.0.1", candidate_port(sdp_offer))
            sdp_offer = rewrite_candidates(sdp_offer, relay.port("to_a"))
        # Answerer.
        await b.pc.setRemoteDescription(RTCSessionDescription(sdp_offer, "offer"))
        b.pc.addTrack(b.track)
        if bypass:
            install_receive_path(b.pc)
        install_opus_encoder(b.pc, opus)
        answer = await b.pc.createAnswer()
        restrict_host_addresses(b.pc, LOOPBACK)
        await b.pc.setLocalDescription(RTCSessionDescription(munge_sdp(answer.sdp, opus), "answer"))
        sdp_answer = b.pc.localDescription.sdp
        if relay is not None:
            relay.b_addr = ("127.0.0.1", candidate_port(sdp_answer))
            sdp_answer = rewrite_candidates(sdp_answer, relay.port("to_b"))
        await a.pc.setRemoteDescription(RTCSessionDescription(sdp_answer, "answer"))
        if bypass:
            install_receive_path(a.pc)
        install_opus_encoder(a.pc, opus)

        await asyncio.wait_for(both_done.wait(), timeout_s)
        bytes_per_packet = {}
        for side in (a, b):
            report = await side.pc.getStats()
            out = next(s for s in report.values() if s.type == "outbound-rtp")
            bytes_per_packet[side.name] = out.bytesSent / max(1, out.packetsSent)
    finally:
        for side in (a, b):
            await side.pc.close()
        for side in (a, b):
            for task in side.tasks:
                task.cancel()
            for task in side.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return CallResult(
        a,
        b,
        sdp_offer,
        sdp_answer,
        relay,
        a.playout.stats(),
        b.playout.stats(),
        bytes_per_packet,
    )


def check_direction(
    played: np.ndarray, freq: float, level: float, hz_tol: float = 3.0
) -> tuple[float, float]:
    heard = active(played)
    assert heard.size >= 48000, f"only {heard.size} audible samples"
    hz, db = peak_hz(heard), level_dbfs(heard)
    assert abs(hz - freq) <= hz_tol, f"peak {hz:.1f} Hz, expected {freq}"
    assert abs(db - level) <= 2.0, f"level {db:.1f} dBFS, expected {level}"
    return hz, db


@pytest.mark.slow
async def test_two_way_call_carries_each_tone_through_alsa_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench_alsa(tmp_path, monkeypatch)
    result = await run_call(
        tmp_path,
        signal_a=tone(440, 3.0, -12.0),
        signal_b=tone(1000, 3.0, -12.0),
        audible_frames=75,
    )
    # A's tone at B's speaker, B's tone at A's speaker.
    check_direction(read_raw(result.b.spk_file), 440, -12.0)
    check_direction(read_raw(result.a.spk_file), 1000, -12.0)
    for sdp in (result.sdp_offer, result.sdp_answer):
        fmtp = next(line for line in sdp.splitlines() if line.startswith("a=fmtp:96"))
        assert "useinbandfec=1" in fmtp
        assert "stereo=0" in fmtp
        assert "maxaveragebitrate=32000" in fmtp
        assert "127.0.0.1" in sdp
        assert all(
            " 127.0.0.1 " in line for line in sdp.splitlines() if line.startswith("a=candidate")
        )
    for stats in (result.a_stats, result.b_stats):
        assert stats.max_depth_ms <= 200
        assert stats.overruns == 0
    # Our encoder was used: 32 kbit/s is ~80 bytes per 20 ms packet (aiortc's 96k: ~240).
    assert all(40 < n < 130 for n in result.bytes_per_packet.values()), result.bytes_per_packet


async def lossy_call(tmp_path: Path, *, bypass: bool, seed: int) -> CallResult:
    relay = LossyRelay(
        a_to_b=Direction(loss=0.05, delay_ms=30, jitter_ms=10, seed=seed),
        b_to_a=Direction(loss=0.05, delay_ms=30, jitter_ms=10, seed=seed + 1),
    )
    await relay.start()
    try:
        return await run_call(
            tmp_path,
            signal_a=tone(440, 6.0, -12.0),
            signal_b=tone(1000, 6.0, -12.0),
            audible_frames=150,
            relay=relay,
            bypass=bypass,
        )
    finally:
        relay.close()


def delivered_ratio(result: CallResult) -> float:
    """Decoded frames at B over RTP packets A sent into the relay (loss included)."""
    assert result.relay is not None and result.b.sink is not None
    return result.b.sink.frames_received / max(1, result.relay.a_to_b.rtp_seen)


@pytest.mark.slow
async def test_lossy_link_latency_bounded_concealment_counted_and_beats_stock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours_dir, stock_dir = tmp_path / "ours", tmp_path / "stock"
    ours_dir.mkdir()
    stock_dir.mkdir()
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(ours_dir / "asoundrc"))
    ours = await lossy_call(ours_dir, bypass=True, seed=11)
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(stock_dir / "asoundrc"))
    stock = await lossy_call(stock_dir, bypass=False, seed=11)

    assert ours.relay is not None
    loss = ours.relay.a_to_b.rtp_dropped / ours.relay.a_to_b.rtp_seen
    ours_ratio, stock_ratio = delivered_ratio(ours), delivered_ratio(stock)
    print(
        f"\n5 % loss, 30±10 ms: relay dropped {loss:.1%}; delivered frames: "
        f"ours {ours_ratio:.1%}, aiortc stock {stock_ratio:.1%}; "
        f"ours playout {ours.b_stats}"
    )
    assert 0.02 <= loss <= 0.10
    for stats in (ours.a_stats, ours.b_stats):
        assert stats.max_depth_ms <= 200
        assert stats.concealed_frames > 0
    assert ours_ratio >= 1 - loss - 0.04  # frames still in flight at hang-up count as lost
    assert ours_ratio >= stock_ratio + 0.05
    # Under jitter the playout may stretch frames by 2 % (drift correction): 440 -> 431 Hz.
    check_direction(read_raw(ours.b.spk_file), 440, -12.0, hz_tol=10.0)
