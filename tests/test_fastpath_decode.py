"""The inline decode path: aiortc's frames, in order, without the decoder thread's hops."""

from __future__ import annotations

import asyncio
import fractions
import queue
import threading
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpCodecParameters
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import RemoteStreamTrack, decoder_worker
from track_support import PacedSignal

from edgeagent.call.ice import ice_configuration, restrict_host_addresses
from edgeagent.call.opus import MonoOpusEncoder, OpusSettings
from edgeagent.call.tracks import (
    RECEIVER_DECODER_QUEUE_ATTR,
    RECEIVER_JITTER_ATTR,
    InlineDecodeQueue,
    inline_decode,
    install_receive_path,
)

RATE = 48000
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def _tone(seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


def _encoded(signal: np.ndarray) -> list[JitterFrame]:
    enc = MonoOpusEncoder(OpusSettings())
    out = []
    for k in range(0, signal.size - 959, 960):
        frame = av.AudioFrame.from_ndarray(signal[None, k : k + 960], "s16", "mono")
        frame.sample_rate, frame.pts = RATE, k
        frame.time_base = fractions.Fraction(1, RATE)
        payloads, ts = enc.encode(frame)
        out += [JitterFrame(data=p, timestamp=ts) for p in payloads]
    return out


def _pcm(frames: list[Any]) -> np.ndarray:
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


async def test_inline_decode_gives_the_frames_aiortcs_decoder_thread_gives() -> None:
    encoded = _encoded(_tone(0.6))
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("audio").receiver
        receiver._track = RemoteStreamTrack(kind="audio")  # what setRemoteDescription does
        inline = inline_decode(receiver)
        assert isinstance(inline, InlineDecodeQueue)
        assert inline_decode(receiver) is inline  # idempotent
        for ef in encoded:
            inline.put((OPUS, ef))
        out = receiver._track._queue
        ours = [out.get_nowait() for _ in range(out.qsize())]
    finally:
        await pc.close()

    # aiortc's own thread over the same frames.
    loop = asyncio.get_running_loop()
    inq: queue.Queue[Any] = queue.Queue()
    outq: asyncio.Queue[Any] = asyncio.Queue()
    thread = threading.Thread(target=decoder_worker, args=(loop, inq, outq, threading.Event()))
    thread.start()
    for ef in encoded:
        inq.put((OPUS, ef))
    inq.put(None)
    theirs = []
    while (frame := await asyncio.wait_for(outq.get(), 10)) is not None:
        theirs.append(frame)
    await asyncio.to_thread(thread.join)

    assert inline.decoded == len(encoded) == len(ours) == len(theirs)
    assert [f.pts for f in ours] == [f.pts for f in theirs]
    assert np.array_equal(_pcm(ours), _pcm(theirs))


async def test_a_bad_frame_is_counted_and_decoding_goes_on() -> None:
    encoded = _encoded(_tone(0.2))
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("audio").receiver
        inline = inline_decode(receiver)
        assert inline is not None
        inline.put((OPUS, encoded[0]))
        inline.put((OPUS, JitterFrame(data=b"\xff\xff\xff\xff", timestamp=960)))
        inline.put((OPUS, encoded[1]))
        assert (inline.decoded, inline.errors) == (2, 1)
        assert receiver._RTCRtpReceiver__decoder_error.is_set()  # type: ignore[attr-defined]
    finally:
        await pc.close()


async def test_the_receive_path_can_keep_aiortcs_jitter_buffer_for_measurements() -> None:
    """`aiortc_jitter_buffer=True` (AgentSeams, bench/latency.py) decodes inline behind
    aiortc's own buffer; the default replaces it with the ArrivalOrderBuffer."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        assert install_receive_path(pc, aiortc_jitter_buffer=True) == []
        receiver = pc.getReceivers()[0]
        assert type(getattr(receiver, RECEIVER_JITTER_ATTR)) is JitterBuffer
        assert isinstance(getattr(receiver, RECEIVER_DECODER_QUEUE_ATTR), InlineDecodeQueue)
        (ours,) = install_receive_path(pc)
        assert getattr(receiver, RECEIVER_JITTER_ATTR) is ours
    finally:
        await pc.close()


async def test_a_call_decodes_inline_and_the_track_still_ends_when_the_call_does() -> None:
    caller, callee = RTCPeerConnection(ice_configuration()), RTCPeerConnection(ice_configuration())
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    callee.on("track", lambda track: got.done() or got.set_result(track))
    try:
        caller.addTrack(PacedSignal(_tone(3.0)))
        assert restrict_host_addresses(caller, ["127.0.0.1"]) == 1
        await caller.setLocalDescription(await caller.createOffer())
        await callee.setRemoteDescription(caller.localDescription)
        # Only now has the callee a transport to restrict (loopback only: never eth0).
        assert restrict_host_addresses(callee, ["127.0.0.1"]) == 1
        assert len(install_receive_path(callee)) == 1
        queue_ = getattr(callee.getReceivers()[0], RECEIVER_DECODER_QUEUE_ATTR)
        assert isinstance(queue_, InlineDecodeQueue)
        callee.addTrack(PacedSignal(_tone(3.0, 440)))
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)
        track = await asyncio.wait_for(got, 10)
        frames = [await asyncio.wait_for(track.recv(), 10) for _ in range(60)]
        audio = _pcm(frames[20:]).reshape(-1, len(frames[0].layout.channels))[:, 0]
        spectrum = np.abs(np.fft.rfft(audio.astype(np.float64) * np.hanning(audio.size)))
        assert abs(np.argmax(spectrum) * RATE / audio.size - 1000) < 5
        assert queue_.decoded >= 60
        decoder = callee.getReceivers()[0]._RTCRtpReceiver__decoder_thread  # type: ignore[attr-defined]
        assert decoder is not None and decoder.is_alive()  # waiting, not decoding
        await callee.close()
        assert not decoder.is_alive()
        # What was decoded before the stop is still delivered, then the track ends.
        for _ in range(1000):
            try:
                await asyncio.wait_for(track.recv(), 5)
            except MediaStreamError:
                break
        else:
            raise AssertionError("the remote track did not end")
    finally:
        await caller.close()
        await callee.close()
