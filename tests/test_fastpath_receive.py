"""Round 2 of the receive/send fast path: mono Opus decode, frames pushed to the sink,
`frame_to_mono` without `to_ndarray`, and the audio level skipped for our own agents."""

from __future__ import annotations

import asyncio
import fractions
from typing import Any

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpCodecParameters
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import compute_audio_level_dbov
from track_support import PacedSignal

from edgeagent.audio.frames import downmix, resample_linear
from edgeagent.audio.playout import PlayoutBuffer, PlayoutSettings
from edgeagent.call.ice import ice_configuration, restrict_host_addresses
from edgeagent.call.libopus import DecodedAudio
from edgeagent.call.opus import (
    SENDER_ENCODER_ATTR,
    MonoOpusDecoder,
    MonoOpusEncoder,
    OpusSettings,
    install_inline_encode,
    send_audio_level,
)
from edgeagent.call.tracks import (
    InlineDecodeQueue,
    MicrophoneTrack,
    RemoteAudioSink,
    connect_sink,
    frame_to_mono,
    inline_decode,
    install_receive_path,
)
from edgeagent.clock import FakeClock
from edgeagent.hw.alsa import CapturedFrame

RATE = 48000
TB = fractions.Fraction(1, RATE)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def _speech(seconds: float, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t)
    sig = (np.sin(2 * np.pi * 330 * t) + 0.3 * rng.standard_normal(t.size)) * env * 9000
    return sig.astype(np.int16)


def _frame(samples: np.ndarray, layout: str, pts: int, rate: int = RATE) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.astype(np.int16).reshape(1, -1), "s16", layout)
    frame.sample_rate, frame.pts = rate, pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


def _mono_stream(signal: np.ndarray) -> list[JitterFrame]:
    """Our encoder's packets (mono Opus, what every far end is asked for)."""
    enc = MonoOpusEncoder(OpusSettings())
    out = []
    for k in range(0, signal.size - 959, 960):
        payloads, ts = enc.encode(_frame(signal[k : k + 960], "mono", k))
        out += [JitterFrame(data=p, timestamp=ts + 123456) for p in payloads]
    return out


def _stereo_stream(left: np.ndarray, right: np.ndarray) -> list[JitterFrame]:
    """aiortc's own encoder: 96 kbit/s stereo, a far end that ignores stereo=0."""
    enc = OpusEncoder()
    inter = np.stack([left, right], axis=1).reshape(-1)
    out = []
    for k in range(0, left.size - 959, 960):
        payloads, ts = enc.encode(_frame(inter[2 * k : 2 * k + 1920], "stereo", k))
        out += [JitterFrame(data=p, timestamp=ts) for p in payloads]
    return out


def _old_frame_to_mono(frame: av.AudioFrame) -> tuple[np.ndarray, int | None]:
    """`frame_to_mono` as it was before round 2 (through `to_ndarray`)."""
    raw = np.asarray(frame.to_ndarray(), dtype=np.int16)
    mono = downmix(raw.reshape(-1), frame.layout.nb_channels)
    mono = resample_linear(mono, int(frame.sample_rate), RATE)
    ts = None
    if frame.pts is not None and frame.time_base is not None:
        ts = round(frame.pts * frame.time_base * RATE)
    return mono, ts


def test_mono_decode_gives_exactly_the_samples_of_stereo_decode_and_downmix() -> None:
    stream = _mono_stream(_speech(2.0))
    theirs, ours = OpusDecoder(), MonoOpusDecoder()
    n = 0
    for jf in stream:
        (a,) = theirs.decode(jf)
        (b,) = ours.decode(jf)
        assert (a.layout.name, b.layout.name) == ("stereo", "mono")
        ma, ta = frame_to_mono(a)
        mb, tb = frame_to_mono(b)
        assert ta == tb == jf.timestamp
        assert np.array_equal(ma, mb)
        n += int(np.any(mb))
    assert n > 80  # real audio, not silence compared with silence


def test_a_stereo_far_end_is_downmixed_by_libopus_within_one_step() -> None:
    left = _speech(1.0, seed=4)
    right = (_speech(1.0, seed=5) // 2).astype(np.int16)
    stream = _stereo_stream(left, right)
    theirs, ours = OpusDecoder(), MonoOpusDecoder()
    a = np.concatenate([frame_to_mono(f)[0] for jf in stream for f in theirs.decode(jf)])
    b = np.concatenate([frame_to_mono(f)[0] for jf in stream for f in ours.decode(jf)])
    assert a.size == b.size > 0 and np.any(a != 0)
    # libopus averages in float and rounds; our downmix floors: at most one step apart.
    assert int(np.max(np.abs(a.astype(np.int32) - b))) <= 1


@pytest.mark.parametrize(
    ("layout", "channels", "rate"),
    [("mono", 1, RATE), ("stereo", 2, RATE), ("mono", 1, 8000), ("stereo", 2, 16000)],
)
def test_frame_to_mono_is_what_the_to_ndarray_path_gave(
    layout: str, channels: int, rate: int
) -> None:
    rng = np.random.default_rng(channels * rate)
    n = rate // 50
    for k in range(5):
        samples = rng.integers(-32768, 32768, n * channels)
        frame = _frame(samples, layout, k * n, rate)
        got, ts = frame_to_mono(frame)
        want, want_ts = _old_frame_to_mono(frame)
        assert ts == want_ts
        assert got.dtype == np.int16 and np.array_equal(got, want)
        got[:] = 0  # ours to keep and change: not the frame's buffer
        assert np.array_equal(frame.to_ndarray().reshape(-1), samples.astype(np.int16))


def test_frame_to_mono_reads_only_the_samples_of_a_padded_plane() -> None:
    frame = av.AudioFrame(format="s16", layout="mono", samples=960)
    frame.planes[0].update(np.arange(960, dtype=np.int16).tobytes())
    frame.sample_rate = RATE
    assert frame.planes[0].buffer_size >= 1920
    got, ts = frame_to_mono(frame)
    assert ts is None and np.array_equal(got, np.arange(960, dtype=np.int16))


async def test_inline_mono_decode_gives_the_stereo_paths_frames_in_mono() -> None:
    stream = _mono_stream(_speech(0.6))
    got: dict[bool, list[Any]] = {}
    pcs = []
    try:
        for mono in (False, True):
            pc = RTCPeerConnection()
            pcs.append(pc)
            receiver = pc.addTransceiver("audio").receiver
            receiver._track = RemoteStreamTrack(kind="audio")
            inline = inline_decode(receiver, mono_opus=mono)
            assert isinstance(inline, InlineDecodeQueue) and inline.mono_opus is mono
            for jf in stream:
                inline.put((OPUS, jf))
            q = receiver._track._queue
            got[mono] = [q.get_nowait() for _ in range(q.qsize())]
    finally:
        for pc in pcs:
            await pc.close()
    assert len(got[True]) == len(got[False]) == len(stream)
    # Mono decoding goes through the system libopus (PlcDecoder, with PLC): mono
    # samples at the packets' timestamps, what the stereo path gives after its
    # downmix up to the differences between two libopus builds.
    assert {type(f) for f in got[True]} == {DecodedAudio}
    assert {f.kind for f in got[True]} == {"packet"}
    stereo = np.concatenate([frame_to_mono(a)[0] for a in got[False]]).astype(np.float64)
    mono = np.concatenate([b.samples for b in got[True]]).astype(np.float64)
    assert [a.pts for a in got[False]] == [b.timestamp for b in got[True]]
    assert np.corrcoef(stereo, mono)[0, 1] > 0.999


def _tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


async def test_a_connected_sink_gets_every_frame_without_the_track_queue() -> None:
    caller, callee = RTCPeerConnection(ice_configuration()), RTCPeerConnection(ice_configuration())
    clock = FakeClock()
    playout = PlayoutBuffer(PlayoutSettings(target_ms=120, max_ms=400))
    sinks: list[RemoteAudioSink] = []
    # As CallSession does: the sink is made in the track event, before the receive path.
    callee.on(
        "track",
        lambda track: (
            sinks.append(RemoteAudioSink(track, playout, clock=clock))
            or connect_sink(callee, sinks[-1])
        ),
    )
    try:
        caller.addTrack(PacedSignal(_tone(3.0, 1000)))
        assert restrict_host_addresses(caller, ["127.0.0.1"]) == 1
        await caller.setLocalDescription(await caller.createOffer())
        await callee.setRemoteDescription(caller.localDescription)
        assert restrict_host_addresses(callee, ["127.0.0.1"]) == 1
        (sink,) = sinks
        assert not connect_sink(callee, sink)  # not decoding inline yet: frames use the track
        install_receive_path(callee, mono_opus=True)
        assert connect_sink(callee, sink)
        inline = callee.getReceivers()[0]._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
        assert inline.deliver == sink.push
        run = asyncio.ensure_future(sink.run())
        callee.addTrack(PacedSignal(_tone(3.0, 440)))
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)
        async with asyncio.timeout(20):
            while sink.frames_received < 60:
                await asyncio.sleep(0.02)
        assert sink.frames_received == inline.decoded  # every decoded frame, none lost
        assert sink.track._queue.qsize() == 0  # type: ignore[attr-defined]
        assert sink.last_frame_at == clock.monotonic()
        assert not run.done()
        audio = np.concatenate([sink.pull() for _ in range(6)]).astype(np.float64)
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
        assert abs(np.argmax(spectrum) * RATE / audio.size - 1000) < 12
        await callee.close()
        await asyncio.wait_for(run, 10)  # the track still ends the sink's run()
        assert run.exception() is None
    finally:
        await caller.close()
        await callee.close()


async def test_a_pushed_frame_that_fails_ends_run_with_its_error() -> None:
    track = RemoteStreamTrack(kind="audio")
    sink = RemoteAudioSink(track, PlayoutBuffer(PlayoutSettings()), clock=FakeClock())
    run = asyncio.ensure_future(sink.run())
    sink.push(_frame(np.zeros(960, np.int16), "mono", 0))
    assert sink.frames_received == 1
    sink.push(b"not a frame")
    with pytest.raises(TypeError, match="bytes"):
        await asyncio.wait_for(run, 5)
    assert sink.frames_received == 1


async def test_a_track_end_still_ends_a_sink_fed_through_the_track() -> None:
    track = RemoteStreamTrack(kind="audio")
    sink = RemoteAudioSink(track, PlayoutBuffer(PlayoutSettings()), clock=FakeClock())
    run = asyncio.ensure_future(sink.run())
    track._queue.put_nowait(_frame(np.ones(960, np.int16), "mono", 0))
    track._queue.put_nowait(None)
    await asyncio.wait_for(run, 5)
    assert sink.frames_received == 1


class _Frames(MediaStreamTrack):
    kind = "audio"

    def __init__(self, blocks: list[np.ndarray]) -> None:
        super().__init__()
        self._frames = [_frame(b, "mono", k * 960) for k, b in enumerate(blocks)]

    async def recv(self) -> av.AudioFrame:
        return self._frames.pop(0)


async def test_the_audio_level_is_skipped_only_when_turned_off() -> None:
    signal = _speech(0.6)
    blocks = [signal[k : k + 960] for k in range(0, signal.size - 959, 960)]
    pc = RTCPeerConnection()
    try:
        sender = pc.addTrack(_Frames(blocks))
        setattr(sender, SENDER_ENCODER_ATTR, MonoOpusEncoder(OpusSettings()))
        inline = install_inline_encode(sender)
        half = len(blocks) // 2
        on = [await sender._next_encoded_frame(None) for _ in range(half)]  # type: ignore[arg-type]
        assert send_audio_level(pc, False) == 1 and inline.audio_level is False
        off = [await sender._next_encoded_frame(None) for _ in range(len(blocks) - half)]  # type: ignore[arg-type]
    finally:
        await pc.close()
    levels = [f.audio_level for f in on if f is not None]
    frames = [_frame(b, "mono", 0) for b in blocks[: len(on)]]
    want = [compute_audio_level_dbov(f) for f, e in zip(frames, on, strict=True) if e is not None]
    assert levels == want and len(set(levels)) > 2
    assert all(f.audio_level is None for f in off if f is not None)
    assert sum(f is not None for f in off) >= len(off) - 1  # still encoded and sent
    assert inline.frames == len(blocks)


async def test_a_call_with_an_aiortc_far_end_sends_no_audio_level() -> None:
    """End to end: the packets on the wire carry the level only while it is on."""
    caller, callee = RTCPeerConnection(ice_configuration()), RTCPeerConnection(ice_configuration())
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    callee.on("track", lambda track: got.done() or got.set_result(track))
    levels: list[Any] = []
    try:
        sender = caller.addTrack(PacedSignal(_tone(3.0, 1000)))
        setattr(sender, SENDER_ENCODER_ATTR, MonoOpusEncoder(OpusSettings()))
        install_inline_encode(sender)
        assert send_audio_level(caller, False) == 1
        assert restrict_host_addresses(caller, ["127.0.0.1"]) == 1
        await caller.setLocalDescription(await caller.createOffer())
        await callee.setRemoteDescription(caller.localDescription)
        assert restrict_host_addresses(callee, ["127.0.0.1"]) == 1
        receiver = callee.getReceivers()[0]
        handle = receiver._handle_rtp_packet

        async def spy(packet: Any, arrival_time_ms: int) -> None:  # this receiver only
            levels.append(packet.extensions.audio_level)
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = spy  # type: ignore[method-assign]
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)
        track = await asyncio.wait_for(got, 10)
        for _ in range(20):
            await asyncio.wait_for(track.recv(), 10)
    finally:
        await caller.close()
        await callee.close()
    assert len(levels) >= 20 and set(levels) == {None}
    with pytest.raises(MediaStreamError):
        await track.recv()


class _Source:
    """Captured frames for `MicrophoneTrack`, as `AlsaCapture` delivers them."""

    def __init__(self, blocks: list[np.ndarray]) -> None:
        self._q: asyncio.Queue[CapturedFrame] = asyncio.Queue()
        for seq, b in enumerate(blocks):
            self._q.put_nowait(CapturedFrame(seq=seq + 7, ts=float(seq), samples=b))

    async def read(self) -> CapturedFrame:
        return await self._q.get()

    def pending(self) -> int:
        return self._q.qsize()


async def test_microphone_frames_are_what_from_ndarray_made() -> None:
    rng = np.random.default_rng(9)
    blocks = [rng.integers(-32768, 32768, 960).astype(np.int16) for _ in range(4)]
    stereo = rng.integers(-32768, 32768, (960, 2)).astype(np.int16)
    track = MicrophoneTrack(_Source([*blocks, stereo]), max_backlog_frames=10)
    for k, b in enumerate([*blocks, downmix(stereo, 2)]):
        frame = await track.recv()
        want = av.AudioFrame.from_ndarray(b.reshape(1, -1), format="s16", layout="mono")
        assert (frame.format.name, frame.layout.name, frame.samples) == ("s16", "mono", 960)
        assert np.array_equal(frame.to_ndarray(), want.to_ndarray())
        assert (frame.sample_rate, frame.pts, frame.time_base) == (RATE, k * 960, TB)
