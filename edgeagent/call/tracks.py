"""Audio tracks of a call: the microphone track we send, the sink for what we receive.

Receive path: aiortc's audio `JitterBuffer` (16 slots, prefetch 4) stalls
~280 ms after one lost packet and discards good packets after gaps
(aiortc#543). `bypass_jitter_buffer` swaps it, per receiver, for
`ArrivalOrderBuffer`, which hands every packet to the decoder as it arrives
(dropping only duplicates and packets older than one already passed on, so
timestamps stay monotonic). `RemoteAudioSink` then puts decoded frames into
our `PlayoutBuffer` by RTP timestamp, which does reordering, timing, drift
correction and concealment. Opus PLC/FEC at the decoder is not reachable:
PyAV treats an empty packet as end-of-stream, so concealment is the playout
buffer's fade.
"""

from __future__ import annotations

import fractions
import logging
from collections.abc import Callable
from typing import Any, Protocol

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError

from edgeagent.audio.frames import SAMPLE_RATE, Samples, downmix, resample_linear
from edgeagent.audio.playout import PlayoutBuffer
from edgeagent.clock import Clock
from edgeagent.hw.alsa import AudioDeviceError, CapturedFrame

logger = logging.getLogger(__name__)

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
# The name-mangled attribute of aiortc 1.16's RTCRtpReceiver that holds the
# jitter buffer; tests/test_aiortc_pin.py checks it still exists.
RECEIVER_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"

Processor = Callable[[Samples], Samples]
RenderTap = Callable[[Samples], None]


class FrameSource(Protocol):
    """Where microphone frames come from (`AlsaCapture`)."""

    async def read(self) -> CapturedFrame: ...

    def pending(self) -> int: ...


class MicrophoneTrack(MediaStreamTrack):
    """Sends captured 48 kHz mono s16 20 ms frames, optionally through `processor` (AEC).

    The track never lets frames pile up: aiortc's sender pulls as fast as
    `recv` returns, so a backlog would be permanent latency. Frames beyond
    `max_backlog_frames` are dropped (counted in `dropped_frames`); pts come
    from the capture sequence, so drops show as gaps the far end conceals.
    The track ends (MediaStreamError) when the capture device fails.
    """

    kind = "audio"

    def __init__(
        self,
        source: FrameSource,
        *,
        processor: Processor | None = None,
        max_backlog_frames: int = 1,
    ) -> None:
        super().__init__()
        self._source = source
        self.processor = processor
        self._max_backlog = max_backlog_frames
        self._first_seq: int | None = None
        self.frames_sent = 0
        self.dropped_frames = 0
        self.last_capture_ts: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            captured = await self._source.read()
            while self._source.pending() > self._max_backlog:
                captured = await self._source.read()
                self.dropped_frames += 1
        except AudioDeviceError as exc:
            logger.warning("microphone track: ending, %s", exc)
            self.stop()
            raise MediaStreamError from exc
        samples = captured.samples
        if samples.ndim > 1:
            samples = downmix(samples, samples.shape[1])
        if self.processor is not None:
            samples = self.processor(samples)
        if self._first_seq is None:
            self._first_seq = captured.seq
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
            format="s16",
            layout="mono",
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = (captured.seq - self._first_seq) * samples.size
        frame.time_base = TIME_BASE
        self.last_capture_ts = captured.ts
        self.frames_sent += 1
        return frame


class RemoteAudioSink:
    """Consumes the remote audio track into a playout buffer; the device pulls from it.

    `run()` receives until the track ends. `pull()` is the playback device's
    source (called on the playback thread); each frame it returns is also
    given to `render_tap` (the AEC's far-end reference), on that thread, at
    the moment it is rendered.
    """

    def __init__(
        self,
        track: MediaStreamTrack,
        playout: PlayoutBuffer,
        *,
        clock: Clock,
        render_tap: RenderTap | None = None,
    ) -> None:
        self._track = track
        self.playout = playout
        self._clock = clock
        self.render_tap = render_tap
        self.frames_received = 0
        self.last_frame_at: float | None = None  # clock.monotonic() of the last decoded frame

    async def run(self) -> None:
        try:
            while True:
                frame = await self._track.recv()
                if not isinstance(frame, av.AudioFrame):
                    raise TypeError(f"remote audio track gave {type(frame).__name__}")
                samples, ts = frame_to_mono(frame)
                self.playout.push(samples, ts)
                self.frames_received += 1
                self.last_frame_at = self._clock.monotonic()
        except MediaStreamError:
            logger.info("remote audio: track ended after %d frames", self.frames_received)

    def pull(self) -> Samples:
        out = self.playout.pull()
        if self.render_tap is not None:
            self.render_tap(out)
        return out


def frame_to_mono(frame: av.AudioFrame) -> tuple[Samples, int | None]:
    """Decoded s16 frame -> (48 kHz mono int16, timestamp in 48 kHz samples or None)."""
    channels = len(frame.layout.channels)
    if frame.format.name != "s16" or frame.format.is_planar:
        raise ValueError(f"expected packed s16, got {frame.format.name}")
    raw = np.asarray(frame.to_ndarray(), dtype=np.int16)
    mono = downmix(raw.reshape(-1), channels)
    rate = int(frame.sample_rate)
    mono = resample_linear(mono, rate, SAMPLE_RATE)
    ts: int | None = None
    if frame.pts is not None and frame.time_base is not None:
        ts = round(frame.pts * frame.time_base * SAMPLE_RATE)
    return mono, ts


class ArrivalOrderBuffer:
    """Stands in for aiortc's audio JitterBuffer: passes each packet on as it arrives.

    Same interface as `aiortc.jitterbuffer.JitterBuffer.add`. Drops duplicates
    and packets older than the newest passed on (counted in `late`); a long
    run of such drops means the sender restarted its sequence, and resyncs.
    """

    capacity = 16
    _RESYNC_AFTER = 50

    def __init__(self) -> None:
        self._last: int | None = None
        self._old_run = 0
        self.passed = 0
        self.late = 0

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        seq = int(packet.sequence_number)
        if self._last is not None:
            ahead = (seq - self._last) & 0xFFFF
            if ahead == 0 or ahead >= 0x8000:
                self._old_run += 1
                if self._old_run < self._RESYNC_AFTER:
                    self.late += 1
                    return False, None
        self._old_run = 0
        self._last = seq
        self.passed += 1
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def bypass_jitter_buffer(receiver: RTCRtpReceiver) -> ArrivalOrderBuffer:
    """Replace an audio receiver's aiortc jitter buffer with `ArrivalOrderBuffer` (idempotent)."""
    current = getattr(receiver, RECEIVER_JITTER_ATTR, None)
    if current is None:
        raise RuntimeError("aiortc RTCRtpReceiver has no jitter buffer attribute: version drift")
    if isinstance(current, ArrivalOrderBuffer):
        return current
    buffer = ArrivalOrderBuffer()
    setattr(receiver, RECEIVER_JITTER_ATTR, buffer)
    return buffer


def install_receive_path(pc: RTCPeerConnection) -> list[ArrivalOrderBuffer]:
    """Bypass the jitter buffer of every audio receiver of `pc`.

    Call after `setRemoteDescription` (the answerer's transceivers are created
    there) and before media flows; calling again is harmless.
    """
    return [bypass_jitter_buffer(t.receiver) for t in pc.getTransceivers() if t.kind == "audio"]
