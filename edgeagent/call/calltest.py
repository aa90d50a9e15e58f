"""The call test: a known signal sent to the echo peer and found again in what comes back.

`CallTestProbe` sits on a call's audio path: during the test it sends `Program` (silence
with short chirps, each sweeping differently) instead of the microphone, and records, with
`clock.monotonic()` timestamps, every frame it sent and every frame the playback device was
given. `measure_round_trip` (pure numpy) looks for each chirp with its own matched filter
among what was rendered in the following `MAX_ROUND_TRIP_S`; a chirp's round trip is the time
its first sample was handed to the playback device minus the time it was handed to the
encoder: network both ways, the echo peer's decode and re-encode, Opus twice and our playout
buffer, but not the sound card's own buffers. Distinct sweeps make the match unambiguous
even when the round trip is longer than the gap between chirps; frame-local timestamps keep
it right when a device thread stalls and catches up. A chirp counts as back when its
normalised correlation is at least 0.5; the verdict is ok when all came back with a median
correlation of at least 0.8.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from edgeagent.clock import Clock
from edgeagent.control.catalog import CommandError, Status
from edgeagent.events import EventBus, HealthChanged
from edgeagent.quality import emodel
from edgeagent.quality.stats import NetworkStats, normalise, window

if TYPE_CHECKING:
    from edgeagent.call.manager import CallManager
    from edgeagent.call.session import CallSession

__all__ = [
    "NO_BROKER",
    "CallTestProbe",
    "Program",
    "RoundTrip",
    "Stream",
    "Timeline",
    "build_program",
    "chirp",
    "measure_round_trip",
    "quality_score",
    "run_call_test",
]

logger = logging.getLogger(__name__)

RATE: Final = 48000
FRAME: Final = 960
FULL_SCALE: Final = 32768.0
BURST_S: Final = 0.25
LEAD_S: Final = 0.3
TAIL_S: Final = 1.5
"""Silence sent after the program, so the last chirp has time to come back."""
GAPS_S: Final = (0.55, 0.8, 0.65, 0.95, 0.7, 0.6, 0.85)
"""Silence after each chirp."""
MAX_ROUND_TRIP_S: Final = 2.0
FOUND_CORRELATION: Final = 0.5
CLEAN_CORRELATION: Final = 0.8
CLIP_LEVEL: Final = 32767
MAX_WAIT_S: Final = 60.0
"""Dial to end of program, at most (the command's own timeout is 75 s)."""
NO_BROKER: Final = Status.INTERNAL
"""The answer when the broker is down: the echo peer is reached by MQTT signaling only, so
the test cannot even start (also over the local socket). The protocol has no 503; 500 with
an error naming the broker is the documented answer."""

Samples = npt.NDArray[np.int16]
F64 = npt.NDArray[np.float64]


def chirp(
    seconds: float = BURST_S,
    f0_hz: float = 300.0,
    f1_hz: float = 3400.0,
    level_dbfs: float = -12.0,
    rate: int = RATE,
) -> Samples:
    """A linear chirp with 10 ms raised-cosine edges; `level_dbfs` is its peak."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    phase = 2 * np.pi * (f0_hz * t + (f1_hz - f0_hz) * t * t / (2 * seconds))
    x = np.sin(phase)
    edge = min(n // 2, round(0.01 * rate))
    if edge:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
        x[:edge] *= ramp
        x[n - edge :] *= ramp[::-1]
    amp = FULL_SCALE * 10 ** (level_dbfs / 20)
    return np.rint(amp * x).clip(-32768, 32767).astype(np.int16)


SWEEPS_HZ: Final = ((300, 3400), (3400, 300), (500, 2800), (2800, 500), (400, 3000), (3000, 400),
                    (600, 3200))  # fmt: skip
"""Each chirp sweeps differently, so a chirp is only ever matched with itself."""


@dataclass(frozen=True)
class Program:
    """What a call test sends: `samples` (silence with `bursts[k]` at `onsets[k]`)."""

    samples: Samples
    bursts: tuple[Samples, ...]
    onsets: tuple[int, ...]
    rate: int = RATE

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "linear chirps, a different 300-3400 Hz sweep each",
            "burst_ms": round(1000 * self.bursts[0].size / self.rate) if self.bursts else 0,
            "bursts": len(self.onsets),
            "level_dbfs": round(level_dbfs(self.bursts[0]), 1) if self.bursts else None,
            "duration_s": round(self.samples.size / self.rate, 2),
        }


def build_program(duration_s: float, *, rate: int = RATE) -> Program:
    """`duration_s` of test signal: a short lead of silence, then chirps at irregular gaps."""
    blen = round(BURST_S * rate)
    total = max(round(duration_s * rate), round(LEAD_S * rate) + blen)
    out = np.zeros(total, dtype=np.int16)
    onsets: list[int] = []
    bursts: list[Samples] = []
    at = round(LEAD_S * rate)
    while at + blen <= total:
        f0, f1 = SWEEPS_HZ[len(bursts) % len(SWEEPS_HZ)]
        burst = chirp(BURST_S, f0, f1, rate=rate)
        out[at : at + blen] = burst
        onsets.append(at)
        bursts.append(burst)
        at += blen + round(GAPS_S[(len(onsets) - 1) % len(GAPS_S)] * rate)
    return Program(out, tuple(bursts), tuple(onsets), rate)


def level_dbfs(x: npt.NDArray[Any]) -> float:
    """RMS level in dBFS (-120 for silence or nothing)."""
    if x.size == 0:
        return -120.0
    rms = math.sqrt(float(np.mean(np.square(x.astype(np.float64)))))
    return max(-120.0, 20 * math.log10(max(rms, 1e-12) / FULL_SCALE))


@dataclass(frozen=True)
class Timeline:
    """Samples back to back, with the start index and hand-on time of every frame."""

    samples: Samples
    starts: npt.NDArray[np.int64]
    times: F64
    rate: int = RATE

    @classmethod
    def of(cls, frames: list[tuple[float, Samples]], rate: int = RATE) -> Timeline:
        if not frames:
            return cls(np.zeros(0, np.int16), np.zeros(0, np.int64), np.zeros(0), rate)
        sizes = np.array([f.size for _, f in frames], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        times = np.array([t for t, _ in frames], dtype=np.float64)
        samples = np.concatenate([f for _, f in frames]).astype(np.int16)
        return cls(samples, starts, times, rate)

    @classmethod
    def contiguous(cls, samples: Samples, t0: float, rate: int = RATE) -> Timeline:
        """A perfectly clocked stream starting at t0 (tests, offline analysis)."""
        starts = np.arange(0, samples.size, FRAME, dtype=np.int64)
        return cls(samples, starts, t0 + starts / rate, rate)

    def time_of(self, index: int) -> float:
        """When sample `index` was handed on: its frame's time plus its place in the frame.

        Frame-local on purpose: a device thread that stalls and then catches up in a burst
        moves the frames after it in time, and only its own frame says when a sample went.
        """
        m = int(np.searchsorted(self.starts, index, side="right")) - 1
        return float(self.times[m]) + (index - int(self.starts[m])) / self.rate

    def index_at(self, t: float) -> int:
        """The first sample handed on at or after time t (clamped to the stream)."""
        m = int(np.searchsorted(self.times, t, side="left"))
        return int(self.starts[m]) if m < self.starts.size else int(self.samples.size)


class Stream:
    """Frames with the time each was handed on; `add` is safe from any thread."""

    def __init__(self, rate: int = RATE) -> None:
        self.rate = rate
        self._frames: list[tuple[float, Samples]] = []
        self._lock = threading.Lock()

    def add(self, t: float, samples: Samples) -> None:
        with self._lock:
            self._frames.append((t, samples.copy()))

    def __len__(self) -> int:
        return len(self._frames)

    def timeline(self) -> Timeline:
        with self._lock:
            frames = list(self._frames)
        return Timeline.of(frames, self.rate)


@dataclass(frozen=True)
class RoundTrip:
    """What the correlation found; times in ms, levels in dBFS."""

    round_trip_ms: float | None
    min_ms: float | None
    max_ms: float | None
    bursts_sent: int
    bursts_found: int
    correlation: float
    tx_level_dbfs: float
    rx_level_dbfs: float | None
    rx_peak_dbfs: float | None
    rx_clipping_pct: float
    verdict: str  # ok | partial | distorted | missing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matched(segment: F64, template: F64) -> tuple[int, float]:
    """Best match of `template` in `segment`: (start index, normalised correlation)."""
    n = template.size
    size = 1 << math.ceil(math.log2(segment.size + n))
    corr = np.fft.irfft(np.fft.rfft(segment, size) * np.conj(np.fft.rfft(template, size)), size)
    corr = corr[: segment.size - n + 1]
    energy = np.concatenate([[0.0], np.cumsum(segment * segment)])
    window = np.sqrt(np.maximum(energy[n:] - energy[:-n], 0.0)) * float(np.linalg.norm(template))
    rho = np.where(
        window > 1e-6 * max(1.0, float(window.max(initial=0.0))),
        corr / np.maximum(window, 1e-9),
        0.0,
    )
    k = int(np.argmax(rho))
    return k, float(rho[k])


def measure_round_trip(
    program: Program,
    sent: Timeline,
    received: Timeline,
    *,
    max_round_trip_s: float = MAX_ROUND_TRIP_S,
) -> RoundTrip:
    """Find each chirp of `program` in `received`, and time its trip from `sent`.

    Each chirp is searched for with its own sweep (matched filter) among what was rendered
    from its sending until `max_round_trip_s` later; its round trip is the time its first
    sample was handed to the playback device minus the time it was handed to the encoder.
    """
    tx_level = level_dbfs(program.bursts[0]) if program.bursts else -120.0
    sent_k = [
        k for k, o in enumerate(program.onsets) if o + program.bursts[k].size <= sent.samples.size
    ]
    missing = RoundTrip(None, None, None, len(sent_k), 0, 0.0, round(tx_level, 1), None, None,
                        0.0, "missing")  # fmt: skip
    if not sent_k or received.samples.size == 0:
        return missing
    y = received.samples.astype(np.float64)
    trips: list[float] = []
    rhos: list[float] = []
    found_rx: list[F64] = []
    searched: list[F64] = []
    for k in sent_k:
        onset, burst = program.onsets[k], program.bursts[k].astype(np.float64)
        t_sent = sent.time_of(onset)
        lo = received.index_at(t_sent)
        hi = min(y.size, received.index_at(t_sent + max_round_trip_s) + burst.size)
        if hi - lo < burst.size:
            continue
        segment = y[lo:hi]
        searched.append(segment)
        at, rho = _matched(segment, burst)
        if rho >= FOUND_CORRELATION:
            trips.append(1000 * (received.time_of(lo + at) - t_sent))
            rhos.append(rho)
            found_rx.append(segment[at : at + burst.size])
    if not trips:
        return missing
    rx = np.concatenate(found_rx)
    heard = np.concatenate(searched)
    clipped = float(np.mean(np.abs(heard) >= CLIP_LEVEL)) * 100
    peak = float(np.max(np.abs(rx)))
    rho_med = float(np.median(rhos))
    if len(trips) < len(sent_k):
        verdict = "partial"
    elif rho_med < CLEAN_CORRELATION:
        verdict = "distorted"
    else:
        verdict = "ok"
    return RoundTrip(
        round_trip_ms=round(float(np.median(trips)), 1),
        min_ms=round(min(trips), 1),
        max_ms=round(max(trips), 1),
        bursts_sent=len(sent_k),
        bursts_found=len(trips),
        correlation=round(rho_med, 3),
        tx_level_dbfs=round(tx_level, 1),
        rx_level_dbfs=round(level_dbfs(rx), 1),
        rx_peak_dbfs=round(20 * math.log10(max(peak, 1.0) / FULL_SCALE), 1),
        rx_clipping_pct=round(clipped, 3),
        verdict=verdict,
    )


def quality_score(
    round_trip_ms: float | None,
    loss_pct: float | None,
    *,
    ie: float = 0.0,
    bpl: float = emodel.BPL_SILENCE_ON_LOSS,
) -> dict[str, Any]:
    """E-model R and MOS from the measured round trip (one way: half, plus device buffers).

    `ie` and `bpl` are the call's codec and concealment (`model_of`), so the score is
    on the scale of the call's own quality messages; the defaults assume neither.
    """
    if round_trip_ms is None:
        return {"mos": None, "r_factor": None, "one_way_delay_ms": None, "loss_pct": loss_pct}
    one_way = round_trip_ms / 2 + emodel.DEFAULT_DEVICE_MS
    r = emodel.r_factor(one_way, loss_pct or 0.0, ie=ie, bpl=bpl)
    return {
        "mos": round(emodel.mos_from_r(r), 2),
        "r_factor": round(r, 1),
        "one_way_delay_ms": round(one_way, 1),
        "loss_pct": None if loss_pct is None else round(loss_pct, 2),
    }


Processor = Callable[[Samples], Samples]
RenderTap = Callable[[Samples], None]


class CallTestProbe:
    """Sends `program` (then `tail_s` of silence) in place of the microphone; records both ends.

    `wrap_processor` goes around the microphone track's processor: the microphone frame
    still goes through it (AEC, level and echo checks keep watching the real device), and
    the program frame is what gets sent. `wrap_render_tap` goes around the sink's render
    tap (called on the playback thread). `done` is set once program and tail are sent.
    """

    def __init__(
        self, program: Program, monotonic: Callable[[], float], *, tail_s: float = TAIL_S
    ) -> None:
        self.program = program
        self._monotonic = monotonic
        self._end = program.samples.size + round(tail_s * program.rate)
        self._pos = 0
        self.sent = Stream(program.rate)
        self.received = Stream(program.rate)
        self.done = asyncio.Event()
        self.started_at: float | None = None

    def _next(self, size: int) -> Samples:
        out = np.zeros(size, dtype=np.int16)
        part = self.program.samples[self._pos : self._pos + size]
        out[: part.size] = part
        self._pos += size
        return out

    def wrap_processor(self, inner: Processor | None) -> Processor:
        def process(frame: Samples) -> Samples:
            if inner is not None:
                inner(frame)  # keep the device checks and AEC state running on the real input
            if self._pos >= self._end:
                self.done.set()
                return np.zeros(frame.size, dtype=np.int16)
            now = self._monotonic()
            if self.started_at is None:
                self.started_at = now
            out = self._next(frame.size)
            self.sent.add(now, out)
            return out

        return process

    def wrap_render_tap(self, inner: RenderTap | None) -> RenderTap:
        def tap(frame: Samples) -> None:
            if inner is not None:
                inner(frame)
            if self.started_at is not None and not self.done.is_set():
                self.received.add(self._monotonic(), frame)

        return tap

    def measure(self) -> RoundTrip:
        """The round trip from what was recorded (CPU-heavy: run it off the loop)."""
        return measure_round_trip(self.program, self.sent.timeline(), self.received.timeline())


LedReader = Callable[[], dict[str, Any] | None]


async def run_call_test(
    calls: CallManager,
    peer: str | None,
    duration_s: int,
    *,
    clock: Clock,
    bus: EventBus,
    broker_up: Callable[[], bool],
    leds: LedReader,
    max_wait_s: float = MAX_WAIT_S,
    call_id: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Call `peer` (None: the default peer), send the test program, measure, hang up.

    `call_id`/`token`: an operator-minted offer token for a signed echo peer (as `dial`).

    CommandError: NO_BROKER when the broker is down, 400 with no peer, 409 when busy.
    A call that does not connect is a result (`result` failed, `echo_verdict` missing).
    """
    if not broker_up():
        raise CommandError(
            NO_BROKER, "call_test needs the broker: the echo peer is reached by MQTT signaling"
        )
    program = build_program(duration_s)
    probe = CallTestProbe(program, clock.monotonic)
    states: list[str] = []
    unsubscribe = bus.subscribe(HealthChanged, lambda e: states.append(e.state))
    try:
        try:
            call = await calls.dial(peer, call_id=call_id, token=token)
        except ValueError as exc:
            raise CommandError(Status.BAD_REQUEST, str(exc)) from None
        except RuntimeError as exc:
            raise CommandError(Status.BUSY, str(exc)) from None
        logger.info("call test %s: calling %s for %d s", call.call_id, call.peer, duration_s)
        session = call.session
        if session is not None:
            session.track.processor = probe.wrap_processor(session.track.processor)
        tapped = False
        stats0: NetworkStats | None = None
        deadline = clock.monotonic() + max_wait_s
        while call.state != "ended" and not probe.done.is_set() and clock.monotonic() < deadline:
            if session is not None and not tapped and session.sink is not None:
                session.sink.render_tap = probe.wrap_render_tap(session.sink.render_tap)
                tapped = True
            if session is not None and stats0 is None and call.state == "active":
                stats0 = normalise(await session.pc.getStats(), at_s=clock.monotonic())
            await clock.sleep(0.02)
        device: dict[str, Any] = {}
        in_call = None
        if call.state != "ended" and session is not None:
            device = await _device_view(session, stats0, clock)
            in_call = leds()
        if calls.active is call:
            await calls.hangup("local_hangup")
        elif call.task is not None and not call.task.done():
            # It ended by itself: let its ending (hangup message, health) finish first.
            await asyncio.wait({call.task}, timeout=5)
        after = leds()
    finally:
        unsubscribe()
    trip = await asyncio.to_thread(probe.measure)
    logger.info(
        "call test %s: round trip %s ms, %d/%d chirps back, verdict %s",
        call.call_id,
        trip.round_trip_ms,
        trip.bursts_found,
        trip.bursts_sent,
        trip.verdict,
    )
    model = device.get("model", {})
    score = quality_score(
        trip.round_trip_ms,
        device.get("loss_pct"),
        ie=model.get("ie", 0.0),
        bpl=model.get("bpl", emodel.BPL_SILENCE_ON_LOSS),
    )
    return {
        "call_id": call.call_id,
        "peer": call.peer,
        "trace_id": call.trace_id,
        "result": call.result,
        "end_reason": call.end_reason,
        "setup_ms": call.setup_ms,
        "round_trip_ms": trip.round_trip_ms,
        "echo_verdict": trip.verdict,
        "quality_score": score["mos"],
        "latency": {
            "round_trip_ms": trip.round_trip_ms,
            "min_ms": trip.min_ms,
            "max_ms": trip.max_ms,
            "method": "cross-correlation of the sent chirps with the rendered return",
        },
        "levels": {
            "tx_dbfs": trip.tx_level_dbfs,
            "rx_dbfs": trip.rx_level_dbfs,
            "rx_peak_dbfs": trip.rx_peak_dbfs,
            "gain_db": None
            if trip.rx_level_dbfs is None
            else round(trip.rx_level_dbfs - trip.tx_level_dbfs, 1),
            "rx_clipping_pct": trip.rx_clipping_pct,
            **device.get("levels", {}),
        },
        "echo": {
            "bursts_sent": trip.bursts_sent,
            "bursts_found": trip.bursts_found,
            "correlation": trip.correlation,
            **device.get("echo", {}),
        },
        "quality": {**score, **device.get("network", {}), **({"model": model} if model else {})},
        **({"opus": device["opus"]} if "opus" in device else {}),
        "leds": {"states": states, "in_call": in_call, "after": after},
        "signal": program.describe(),
    }


def model_of(session: CallSession) -> dict[str, Any]:
    """The E-model inputs the session's own quality messages use: Ie of our Opus
    settings and Bpl of our concealment (PLC, with the far end's FEC when it sends it)."""
    handling = emodel.own_loss_handling(session.decodes_with_plc(), fec=session.fec_from_far_end)
    return {
        "ie": emodel.opus_ie(session.opus.bitrate_bps / 1000.0, session.opus.complexity),
        "bpl": emodel.BPL[handling],
        "concealment": str(handling),
    }


async def _device_view(
    session: CallSession, stats0: NetworkStats | None, clock: Clock
) -> dict[str, Any]:
    """What the call's own checks saw: microphone, speaker, local echo, network window."""
    mic = session.raw_checks.snapshot()
    sent = session.tx_checks.snapshot()
    spk = session.rx_checks.snapshot()
    est = session.echo.estimate
    net: dict[str, Any] = {}
    loss = None
    if stats0 is not None:
        win = window(stats0, normalise(await session.pc.getStats(), at_s=clock.monotonic()))
        loss = win.loss_pct
        net = {
            "rtcp_rtt_ms": None if win.rtt_ms is None else round(win.rtt_ms, 1),
            "jitter_ms": None if win.jitter_ms is None else round(win.jitter_ms, 1),
        }
    return {
        "levels": {
            "mic_dbfs": round(mic.level_dbfs, 1),
            "mic_peak": mic.peak,
            "mic_clipping_pct": round(mic.clipping_pct, 3),
            "mic_after_aec_dbfs": round(sent.level_dbfs, 1),
            "speaker_dbfs": round(spk.level_dbfs, 1),
            "speaker_clipping_pct": round(spk.clipping_pct, 3),
            "issues": sorted({*mic.issues, *sent.issues, *(f"rx_{i}" for i in spk.issues)}),
        },
        "echo": {
            "local_echo": session.echo.echo_active,
            "local_echo_likelihood": round(est.likelihood, 2),
            "local_echo_delay_ms": None if est.delay_ms is None else round(est.delay_ms, 1),
            "erle_db": None
            if session.aec is None or session.aec.erle_db is None
            else round(session.aec.erle_db, 1),
        },
        "loss_pct": loss,
        "network": net,
        "model": model_of(session),
        "opus": session.opus_summary(),
    }
