"""The inline encode path: same packets and audio levels as aiortc's, without the executor."""

from __future__ import annotations

import asyncio
import fractions
import gc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender
from aiortc.rtp import compute_audio_level_dbov

from edgeagent.call.opus import (
    SENDER_ENCODER_ATTR,
    InlineEncode,
    MonoOpusEncoder,
    OpusSettings,
    audio_level_dbov,
    install_inline_encode,
)

RATE = 48000


def _frame(samples: np.ndarray, layout: str = "mono", pts: int = 0) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.astype(np.int16).reshape(1, -1), "s16", layout)
    frame.sample_rate, frame.pts = RATE, pts
    frame.time_base = fractions.Fraction(1, RATE)
    return frame


def _speechlike(n_frames: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * 960) / RATE
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t)
    sig = (np.sin(2 * np.pi * 440 * t) + 0.3 * rng.standard_normal(t.size)) * env * 9000
    return [sig[k * 960 : (k + 1) * 960].astype(np.int16) for k in range(n_frames)]


def test_audio_level_is_aiortcs_value_for_every_kind_of_frame() -> None:
    rng = np.random.default_rng(7)
    blocks = [
        np.zeros(960),
        np.full(960, 32767),
        np.full(960, -32768),  # beyond MAX_SAMPLE_VALUE: clamps to 0 dBov in both
        np.r_[np.zeros(959), 1],  # one LSB: the -127 floor
        np.r_[np.zeros(959), 300],
    ]
    blocks += [rng.standard_normal(960) * (10 ** (db / 20) * 32767) for db in range(-110, 1, 7)]
    blocks += [np.clip(rng.standard_normal(960) * 40000, -32768, 32767) for _ in range(5)]
    levels = set()
    for block in blocks:
        frame = _frame(block)
        ours, theirs = audio_level_dbov(frame), compute_audio_level_dbov(frame)
        assert ours == theirs, (ours, theirs)
        levels.add(ours)
    assert {0, -127} <= levels and len(levels) > 12  # the cases span the whole range
    stereo = _frame(rng.integers(-20000, 20000, 1920), layout="stereo")
    assert audio_level_dbov(stereo) == compute_audio_level_dbov(stereo)


class _Frames(MediaStreamTrack):
    kind = "audio"

    def __init__(self, blocks: list[np.ndarray]) -> None:
        super().__init__()
        self._frames = [_frame(b, pts=k * 960) for k, b in enumerate(blocks)]

    async def recv(self) -> av.AudioFrame:
        return self._frames.pop(0)


async def _encoded(sender: RTCRtpSender, n: int) -> list[Any]:
    return [await sender._next_encoded_frame(None) for _ in range(n)]  # type: ignore[arg-type]


class CountingExecutor(ThreadPoolExecutor):
    """A real executor that records what is submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted: list[str] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted.append(getattr(fn, "__qualname__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


async def test_inline_encode_gives_aiortcs_frames_without_touching_the_executor() -> None:
    blocks = _speechlike(40)
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    pcs = [RTCPeerConnection(), RTCPeerConnection()]
    try:
        senders = [pc.addTrack(_Frames(blocks)) for pc in pcs]
        for sender in senders:
            setattr(sender, SENDER_ENCODER_ATTR, MonoOpusEncoder(OpusSettings()))
        inline = install_inline_encode(senders[0])
        assert install_inline_encode(senders[0]) is inline  # idempotent
        assert isinstance(senders[0]._next_encoded_frame, InlineEncode)
        assert not isinstance(senders[1]._next_encoded_frame, InlineEncode)  # per instance

        ours = await _encoded(senders[0], len(blocks))
        assert executor.submitted == []
        theirs = await _encoded(senders[1], len(blocks))  # aiortc's own method
        assert executor.submitted.count("MonoOpusEncoder.encode") == len(blocks)
    finally:
        for pc in pcs:
            await pc.close()
        executor.shutdown()

    assert inline.frames == len(blocks)
    assert [f is None for f in ours] == [f is None for f in theirs]
    pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a is not None]
    assert len(pairs) >= len(blocks) - 1
    for a, b in pairs:
        assert (a.payloads, a.timestamp, a.audio_level) == (b.payloads, b.timestamp, b.audio_level)
    assert len({a.audio_level for a, _ in pairs}) > 3  # the level follows the envelope


async def test_a_disabled_sender_consumes_frames_without_encoding() -> None:
    pc = RTCPeerConnection()
    try:
        track = _Frames(_speechlike(6))
        sender = pc.addTrack(track)
        setattr(sender, SENDER_ENCODER_ATTR, MonoOpusEncoder(OpusSettings()))
        inline = install_inline_encode(sender)
        sender._enabled = False
        assert await _encoded(sender, 3) == [None, None, None]
        assert inline.frames == 0 and len(track._frames) == 3
        sender._enabled = True
        out = await _encoded(sender, 3)
        assert inline.frames == 3 and any(f is not None for f in out)
    finally:
        await pc.close()


async def test_inline_encode_does_not_keep_its_sender_alive() -> None:
    pc = RTCPeerConnection()
    sender = pc.addTrack(_Frames(_speechlike(1)))
    inline = install_inline_encode(sender)
    await pc.close()
    del sender, pc
    gc.collect()
    assert await inline(None) is None  # the sender is gone: nothing to encode


async def test_a_call_between_two_peers_carries_audio_through_the_inline_path() -> None:
    from edgeagent.call.ice import ice_configuration, restrict_host_addresses
    from edgeagent.call.opus import install_opus_encoder, opus_encoders

    caller, callee = RTCPeerConnection(ice_configuration()), RTCPeerConnection(ice_configuration())
    t = np.arange(3 * RATE) / RATE
    tone = (np.sin(2 * np.pi * 1000 * t) * 8000).astype(np.int16)

    class Paced(_Frames):
        async def recv(self) -> av.AudioFrame:
            await asyncio.sleep(0.005)
            return await super().recv()

    received: asyncio.Queue[av.AudioFrame] = asyncio.Queue()
    pumps: list[asyncio.Task[None]] = []

    @callee.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        async def pump() -> None:
            while True:
                await received.put(await track.recv())  # type: ignore[arg-type]

        pumps.append(asyncio.ensure_future(pump()))

    try:
        caller.addTrack(Paced([tone[k : k + 960] for k in range(0, tone.size, 960)]))
        assert restrict_host_addresses(caller, ["127.0.0.1"]) == 1
        await caller.setLocalDescription(await caller.createOffer())
        await callee.setRemoteDescription(caller.localDescription)
        # Only now has the callee a transport to restrict (loopback only: never eth0).
        assert restrict_host_addresses(callee, ["127.0.0.1"]) == 1
        callee.addTrack(Paced(_speechlike(150)))
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)
        assert install_opus_encoder(caller, OpusSettings()) == 1
        out = []
        while len(out) < 60:
            frame = await asyncio.wait_for(received.get(), 10)
            out.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0])
        audio = np.concatenate(out[20:]).astype(np.float64)
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
        peak_hz = np.argmax(spectrum) * RATE / audio.size
        assert abs(peak_hz - 1000) < 5, peak_hz
        sender = caller.getSenders()[0]
        assert isinstance(sender._next_encoded_frame, InlineEncode)
        assert sender._next_encoded_frame.frames >= 60
        assert len(opus_encoders(caller)) == 1
    finally:
        for task in pumps:
            task.cancel()
        await caller.close()
        await callee.close()
