"""Audio tracks of a call: the microphone track we send, the sink for what we receive.

Receive path: aiortc's audio `JitterBuffer` (16 slots, prefetch 4) stalls
~280 ms after one lost packet and discards good packets after gaps
(aiortc#543); between two agents at 15 % loss it adds about 270 ms of one-way
delay and 18x the underruns (bench/latency.py, docs/benchmarks.md).
`bypass_jitter_buffer` swaps it, per receiver, for
`ArrivalOrderBuffer`, which hands every packet to the decoder as it arrives
(dropping only duplicates and packets older than one already passed on, so
timestamps stay monotonic). `RemoteAudioSink` then puts decoded frames into
our `PlayoutBuffer` by RTP timestamp, which does reordering, timing, drift
correction. Lost packets are concealed at the decoder: with `mono_opus` Opus
goes through libopus directly (`edgeagent/call/libopus.py`, `PlcDecoder`),
which fills gaps of up to 100 ms with PLC and recovers the last lost frame
from the next packet's in-band FEC; PyAV cannot (it takes an empty packet for
end-of-stream). Longer gaps, and calls on a machine without libopus0 (decoded
through PyAV), are covered by the playout buffer's fade.

Decoding runs inline on the event loop (`InlineDecodeQueue`): aiortc hands
every received frame to a decoder thread through a `queue.Queue` and back
with `run_coroutine_threadsafe`, two thread hops (a condition notify, a
task and a self-pipe write) around a ~40 µs Opus decode (docs/profile.md).
A call's sink can also take the decoded frames straight from the decoder
(`connect_sink`): no remote-track queue, no task wake-up per frame; and
Opus can be decoded to mono (`mono_opus`), the samples the sink would have
averaged out of libopus's duplicated stereo (docs/profile.md, "Round 2").
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.utils import uint16_gt

from edgeagent.audio.frames import SAMPLE_RATE, Samples, downmix, resample_linear
from edgeagent.audio.playout import PlayoutBuffer
from edgeagent.call import libopus
from edgeagent.call.libopus import DecodedAudio, OpusDecodeError, PlcDecoder
from edgeagent.call.opus import MonoOpusDecoder
from edgeagent.clock import Clock
from edgeagent.hw.alsa import AudioDeviceError, CapturedFrame

logger = logging.getLogger(__name__)

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
# The name-mangled attribute of aiortc 1.16's RTCRtpReceiver that holds the
# jitter buffer; tests/test_aiortc_pin.py checks it still exists.
RECEIVER_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_DECODER_QUEUE_ATTR = "_RTCRtpReceiver__decoder_queue"
RECEIVER_DECODER_THREAD_ATTR = "_RTCRtpReceiver__decoder_thread"
RECEIVER_DECODE_ERROR_ATTR = "_RTCRtpReceiver__decoder_error"
RECEIVER_STREAMS_ATTR = "_RTCRtpReceiver__remote_streams"

# libwebrtc's receive statistics leave the jitter alone when one transit difference is
# this many samples or more ("crazy jumps in TS for the same stream"; 5 s at 90 kHz,
# 9.4 s at 48 kHz): a sender that restarts its timestamps is not network jitter.
JITTER_JUMP_SAMPLES = 450_000

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
        # An empty mono s16 frame filled from the samples: what `from_ndarray` makes,
        # without its shape and dtype checks (tests/test_fastpath_receive.py).
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples.size)
        pcm = np.ascontiguousarray(samples, dtype=np.int16)
        frame.planes[0].update(pcm)  # type: ignore[arg-type]  # any buffer; stubs say bytes
        frame.sample_rate = SAMPLE_RATE
        frame.pts = (captured.seq - self._first_seq) * samples.size
        frame.time_base = TIME_BASE
        self.last_capture_ts = captured.ts
        self.frames_sent += 1
        return frame


class RemoteAudioSink:
    """Consumes the remote audio track into a playout buffer; the device pulls from it.

    `run()` receives until the track ends. `pull()` is the playback device's
    source (called on the playback thread, or on the loop for a paced twin);
    each frame it returns is also
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

    @property
    def track(self) -> MediaStreamTrack:
        return self._track

    async def run(self) -> None:
        """Until the track ends; frames come through it, or through `push` once connected."""
        try:
            while True:
                frame = await self._track.recv()
                if isinstance(frame, _PushFailed):
                    raise frame.error
                self.accept(frame)
        except MediaStreamError:
            logger.info("remote audio: track ended after %d frames", self.frames_received)

    def accept(self, frame: Any) -> None:
        """One decoded frame into the playout buffer."""
        if isinstance(frame, DecodedAudio):  # libopus: already mono 48 kHz, ours to keep
            self.playout.push(frame.samples, frame.timestamp)
            self.frames_received += 1
            self.last_frame_at = self._clock.monotonic()
            return
        if not isinstance(frame, av.AudioFrame):
            raise TypeError(f"remote audio track gave {type(frame).__name__}")
        samples, ts = frame_to_mono(frame)
        self.playout.push(samples, ts)
        self.frames_received += 1
        self.last_frame_at = self._clock.monotonic()

    def push(self, frame: Any) -> None:
        """`accept` for a decoder that delivers directly (on the loop, inside aiortc's
        receive path): an error ends `run()` with it, as it would on the track path."""
        try:
            self.accept(frame)
        except (TypeError, ValueError) as exc:
            queue = getattr(self._track, "_queue", None)
            if queue is None:
                raise
            queue.put_nowait(_PushFailed(exc))

    def pull(self) -> Samples:
        out = self.playout.pull()
        if self.render_tap is not None:
            self.render_tap(out)
        return out


@dataclass(frozen=True, slots=True)
class _PushFailed:
    """Put on the remote track's queue when a pushed frame failed: `run()` raises it."""

    error: Exception


def frame_to_mono(frame: av.AudioFrame) -> tuple[Samples, int | None]:
    """Decoded s16 frame -> (48 kHz mono int16, timestamp in 48 kHz samples or None)."""
    channels = frame.layout.nb_channels
    fmt = frame.format
    if fmt.name != "s16" or fmt.is_planar:
        raise ValueError(f"expected packed s16, got {fmt.name}")
    # The plane's bytes as int16 (what `to_ndarray` gives, without its vstack and
    # copy); the plane may be padded past the samples, hence the count. A copy
    # only when no downmix makes one: the frame's buffer is not ours to keep.
    raw: Samples = np.frombuffer(
        memoryview(frame.planes[0]), dtype=np.int16, count=frame.samples * channels
    )
    mono = downmix(raw, channels) if channels > 1 else raw.copy()
    rate = int(frame.sample_rate)
    mono = resample_linear(mono, rate, SAMPLE_RATE)
    ts: int | None = None
    pts, time_base = frame.pts, frame.time_base
    if pts is not None and time_base is not None:
        if time_base.numerator == 1 and time_base.denominator == SAMPLE_RATE:
            ts = int(pts)  # aiortc's Opus frames: already in 48 kHz samples, no Fraction maths
        else:
            ts = round(pts * time_base * SAMPLE_RATE)
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


class SteadyStreamStatistics(StreamStatistics):
    """aiortc 1.16's per-SSRC receive statistics, with a jitter that a sender's timestamp
    jump, a 32-bit timestamp wrap or a step of the wall clock cannot blow up.

    aiortc computes RFC 3550's interarrival jitter from `time.time()` and the raw
    difference of two 32-bit timestamps, and takes every difference in: a far end that
    jumps its timestamps by an hour on the same SSRC (a restarted media process), the
    wrap every 24.9 h of a 48 kHz clock, or an NTP step of the device's clock put
    minutes of "jitter" into the RTCP reports and the quality messages, and one window's
    MOS falls to its floor for a call that sounds fine. Here arrival is monotonic, the
    timestamp difference is taken modulo 2**32, and a difference of
    `JITTER_JUMP_SAMPLES` or more is skipped, as libwebrtc does. Sequence and loss
    counting are aiortc's, unchanged.
    """

    _now = staticmethod(time.monotonic)

    def add(self, packet: Any) -> None:
        seq = packet.sequence_number
        in_order = self.max_seq is None or uint16_gt(seq, self.max_seq)
        self.packets_received += 1
        if self.base_seq is None:
            self.base_seq = seq
        if not in_order:
            return
        arrival = int(self._now() * self._clockrate)
        if self.max_seq is not None and seq < self.max_seq:
            self.cycles += 1 << 16
        self.max_seq = seq
        last_ts, last_arrival = self._last_timestamp, self._last_arrival
        if last_ts is not None and last_arrival is not None and packet.timestamp != last_ts:
            ts_diff = (packet.timestamp - last_ts) & 0xFFFFFFFF
            if ts_diff >= 0x80000000:
                ts_diff -= 1 << 32
            diff = abs((arrival - last_arrival) - ts_diff)
            if diff < JITTER_JUMP_SAMPLES:
                self._jitter_q4 += diff - ((self._jitter_q4 + 8) >> 4)
        self._last_arrival = arrival
        self._last_timestamp = packet.timestamp


class _MonotonicTime:
    """Stands in for the `time` module inside aiortc 1.16's RTP sender and receiver.

    Their only uses of it are differences (tests/test_aiortc_pin.py): the round-trip
    time (an RR's arrival less the sending of the SR it answers), the DLSR of our own
    RRs, and the jitter's arrival times. On the wall clock, a step between two readings
    went into those figures whole: a Pi without a clock chip steps its clock when NTP
    first syncs, often minutes after boot and so during a call, and an hour's step made
    aiortc report an RTT of an hour, averaged out only over a minute of RTCP (weight
    0.85 per report): a MOS at its floor and an `rtt_high` alert for a call that was
    fine.
    """

    time = staticmethod(time.monotonic)


def monotonic_rtcp_clocks() -> None:
    """Make aiortc's RTP senders and receivers time RTCP on the monotonic clock
    (process-wide, idempotent)."""
    for module in (aiortc.rtcrtpsender, aiortc.rtcrtpreceiver):
        if getattr(module, "time", None) is not _MonotonicTime:
            module.time = _MonotonicTime  # type: ignore[attr-defined]


class _SteadyStreams(dict[int, StreamStatistics]):
    """A receiver's statistics by SSRC: each new stream's statistics are steady ones."""

    def __setitem__(self, ssrc: int, stats: StreamStatistics) -> None:
        if type(stats) is StreamStatistics:  # made by the receiver for a new SSRC, unused
            stats = SteadyStreamStatistics(stats._clockrate)
        super().__setitem__(ssrc, stats)


def steady_statistics(receiver: RTCRtpReceiver) -> None:
    """Make `receiver` keep `SteadyStreamStatistics` for every new SSRC (idempotent)."""
    current = getattr(receiver, RECEIVER_STREAMS_ATTR, None)
    if not isinstance(current, dict):
        raise RuntimeError("aiortc RTCRtpReceiver has no remote stream statistics: version drift")
    if not isinstance(current, _SteadyStreams):
        setattr(receiver, RECEIVER_STREAMS_ATTR, _SteadyStreams(current))


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


class InlineDecodeQueue:
    """Stands in for an aiortc receiver's decoder queue: decodes on the loop as frames are put.

    aiortc's `decoder_worker` thread still starts (in `RTCRtpReceiver.receive`)
    but only waits in `get()` until the receiver stops; then it posts the
    end-of-track marker after every frame already delivered, as before.
    `put` is called on the event loop (`_handle_rtp_packet`), so decoded
    frames go straight into the remote track's asyncio queue.
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        *,
        mono_opus: bool = False,
        opus_fec: bool = True,
        as_frames: bool = False,
    ) -> None:
        self._receiver = weakref.ref(receiver)
        self.mono_opus = mono_opus
        # PlcDecoder's DecodedAudio as av.AudioFrames on the track, for a consumer that
        # needs frames (the echo peer relays the track to its sender's encoder).
        self.as_frames = as_frames
        self.opus_fec = opus_fec  # PlcDecoder: recover from the far end's in-band FEC
        # Where decoded frames go instead of the remote track's queue (`connect_sink`).
        self.deliver: Callable[[Any], None] | None = None
        self._output: asyncio.Queue[Any] | None = None  # the remote track's, once it exists
        self._decode_error: threading.Event = getattr(receiver, RECEIVER_DECODE_ERROR_ATTR)
        self._stopped = threading.Event()
        self._decoder: Any = None
        self._codec_name: str | None = None
        # One decoder per codec, kept when the far end switches payload type and back:
        # a new one would lose the stream's state and zero the PLC/FEC counters that
        # quality messages report as cumulative.
        self._decoders: dict[str, Any] = {}
        self.decoded = 0  # encoded frames decoded inline
        self.errors = 0

    def put(self, task: tuple[Any, Any] | None) -> None:
        if task is None:
            self._stopped.set()
            return
        if self._stopped.is_set():
            return
        codec, encoded_frame = task
        if codec.name != self._codec_name:
            decoder = self._decoders.get(codec.name)
            if decoder is None:
                decoder = self._decoders[codec.name] = self._new_decoder(codec)
            self._decoder = decoder
            self._codec_name = codec.name
        if not encoded_frame.data:
            # PyAV takes an empty packet for the end of the stream, and its decoder then
            # refuses every later packet (EOFError): the call's audio would be gone.
            self._refused(codec.name, "empty payload")
            return
        try:
            frames = self._decoder.decode(encoded_frame)
        except (av.FFmpegError, OpusDecodeError) as exc:
            # Keep the decoder state, as aiortc does; count and go on.
            self._refused(codec.name, exc)
            return
        self.decoded += 1
        deliver = self.deliver
        if deliver is not None:
            for frame in frames:
                deliver(frame)
            return
        output = self._output
        if output is None:
            receiver = self._receiver()
            track = receiver._track if receiver is not None else None
            if track is None:
                return  # aiortc starts decoding only once the remote track exists
            output = self._output = track._queue
        for frame in frames:
            if self.as_frames and isinstance(frame, DecodedAudio):
                frame = decoded_to_frame(frame)
            output.put_nowait(frame)

    def _refused(self, codec_name: str, why: object) -> None:
        self.errors += 1
        log = logger.warning if self.errors == 1 else logger.debug  # warn once
        log("remote audio: cannot decode a %s frame: %s", codec_name, why)
        self._decode_error.set()

    def get(self) -> None:
        """The decoder thread's only task: wait for the stop, then end the track."""
        self._stopped.wait()

    def _new_decoder(self, codec: Any) -> Any:
        if not (self.mono_opus and codec.name.lower() == "opus"):
            return get_decoder(codec)
        if libopus.load() is not None:
            return PlcDecoder(fec=self.opus_fec)
        _warn_no_libopus()
        return MonoOpusDecoder()

    @property
    def plc(self) -> PlcDecoder | None:
        """The stream's Opus PLC decoder (its counters), or None."""
        for decoder in self._decoders.values():
            if isinstance(decoder, PlcDecoder):
                return decoder
        return None


def decoded_to_frame(audio: DecodedAudio) -> av.AudioFrame:
    """Decoded mono 48 kHz samples as an s16 `av.AudioFrame` with the RTP timestamp as pts."""
    frame = av.AudioFrame(format="s16", layout="mono", samples=audio.samples.size)
    frame.planes[0].update(np.ascontiguousarray(audio.samples, dtype=np.int16))  # type: ignore[arg-type]
    frame.sample_rate = SAMPLE_RATE
    frame.pts = audio.timestamp
    frame.time_base = TIME_BASE
    return frame


@functools.cache
def _warn_no_libopus() -> None:
    logger.warning(
        "remote audio: libopus0 is not installed; lost packets are faded, "
        "not concealed by Opus PLC or recovered from FEC"
    )


def inline_decode(
    receiver: RTCRtpReceiver,
    *,
    mono_opus: bool = False,
    opus_fec: bool = True,
    as_frames: bool = False,
) -> InlineDecodeQueue | None:
    """Make an audio receiver decode on the loop (idempotent); None once its thread runs."""
    current = getattr(receiver, RECEIVER_DECODER_QUEUE_ATTR, None)
    if current is None or not hasattr(receiver, RECEIVER_DECODER_THREAD_ATTR):
        raise RuntimeError("aiortc RTCRtpReceiver has no decoder queue: version drift")
    if isinstance(current, InlineDecodeQueue):
        return current
    if getattr(receiver, RECEIVER_DECODER_THREAD_ATTR) is not None:
        return None  # already receiving through aiortc's thread: leave it
    inline = InlineDecodeQueue(
        receiver, mono_opus=mono_opus, opus_fec=opus_fec, as_frames=as_frames
    )
    setattr(receiver, RECEIVER_DECODER_QUEUE_ATTR, inline)
    return inline


def install_receive_path(
    pc: RTCPeerConnection,
    *,
    mono_opus: bool = False,
    opus_fec: bool = True,
    as_frames: bool = False,
    aiortc_jitter_buffer: bool = False,
) -> list[ArrivalOrderBuffer]:
    """Bypass the jitter buffer of every audio receiver of `pc` and decode inline
    (Opus to mono with `mono_opus`, through libopus with PLC where it is installed:
    for a consumer that downmixes anyway; `opus_fec` False for a far end that sends
    no in-band FEC; `as_frames` to get `av.AudioFrame`s on the track from PlcDecoder).
    `aiortc_jitter_buffer` keeps aiortc's buffer in front of the decoder: only to
    measure what aiortc#543 does to a call (bench/latency.py). The receivers' RTCP and
    stats jitter comes from `SteadyStreamStatistics` either way, and RTCP is timed on
    the monotonic clock (`monotonic_rtcp_clocks`).

    Call after `setRemoteDescription` (the answerer's transceivers are created
    there) and before media flows; calling again is harmless.
    """
    monotonic_rtcp_clocks()
    buffers = []
    for t in pc.getTransceivers():
        if t.kind == "audio":
            steady_statistics(t.receiver)
            if not aiortc_jitter_buffer:
                buffers.append(bypass_jitter_buffer(t.receiver))
            inline_decode(t.receiver, mono_opus=mono_opus, opus_fec=opus_fec, as_frames=as_frames)
    return buffers


def receive_decoders(pc: RTCPeerConnection) -> list[InlineDecodeQueue]:
    """The inline decoders of `pc`'s audio receivers (after `install_receive_path`)."""
    found = []
    for t in pc.getTransceivers():
        inline = getattr(t.receiver, RECEIVER_DECODER_QUEUE_ATTR, None)
        if t.kind == "audio" and isinstance(inline, InlineDecodeQueue):
            found.append(inline)
    return found


def connect_sink(pc: RTCPeerConnection, sink: RemoteAudioSink) -> bool:
    """Deliver the frames decoded for `sink`'s track straight to `sink.push`.

    Skips the remote track's asyncio queue and the sink task's wake-up per
    frame; the track still ends the sink's `run()` when the call ends. False
    when that receiver does not decode inline (yet): frames keep coming
    through the track.
    """
    for t in pc.getTransceivers():
        if t.kind != "audio" or t.receiver.track is not sink.track:
            continue
        inline = getattr(t.receiver, RECEIVER_DECODER_QUEUE_ATTR, None)
        if isinstance(inline, InlineDecodeQueue):
            inline.deliver = sink.push
            return True
    return False
