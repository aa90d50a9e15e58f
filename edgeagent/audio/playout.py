"""The playout buffer: bounded, drift-corrected, concealing; owned by us, not aiortc.

Decoded frames are pushed with their RTP timestamp (in samples); the playback
device pulls one frame per period. The buffer

- prefills to a target depth (40-80 ms) before it starts playing;
- keeps the depth near the target whatever the sender's clock does, by
  time-compressing or stretching a frame by a few samples (`stretch`);
  far off target (a burst after a stall) by cutting or repeating whole pitch
  periods of a frame with a crossfade (`_splice`), which keeps the pitch:
  resampling fast enough to catch up would raise it by 8 %, for seconds;
- conceals a missing frame by repeating the last good one at decreasing
  gain, then silence; after a long underrun it rebuffers to the target;
- never holds more than `max_ms`: a push beyond that drops the oldest samples
  (counted as an overrun), so latency is bounded by construction.

aiortc's own audio jitter buffer stalls ~280 ms after a single loss and drops
good packets after gaps (aiortc#543); `edgeagent.call.tracks` bypasses it and
lets this buffer do timing and concealment. Thread-safe: push from the event
loop, pull from the playback thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edgeagent.audio.frames import FRAME_SAMPLES, SAMPLE_RATE, Samples, stretch, to_int16

# A splice cuts or repeats 2.5-15 ms: every pitch period of a voice (67-400 Hz), or
# several of a higher tone, fits in that range. The crossfade over the 5 ms that match.
SPLICE_MIN_MS = 2.5
SPLICE_MAX_MS = 15.0
SPLICE_OVERLAP_MS = 5.0
SPLICE_MIN_MATCH = 0.5  # normalised correlation; below it a splice would be heard
QUIET_RMS = 30.0  # about -61 dBFS: any splice in audio this quiet is inaudible


@dataclass(frozen=True, slots=True)
class PlayoutSettings:
    """Playout tuning; depths in milliseconds of audio."""

    target_ms: float = 60.0
    max_ms: float = 200.0
    tolerance_ms: float = 15.0  # drift correction starts this far from the target
    fade_frames: int = 3  # concealment frames at decreasing gain, then silence
    stretch_fraction: float = 0.02  # samples added/removed per corrected frame (2 %)
    depth_smoothing: float = 0.02  # EMA factor per pull (about a 1 s time constant)
    resync_ms: float = 2000.0  # a timestamp jump beyond this restarts the stream
    frame_samples: int = FRAME_SAMPLES
    rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if not 20.0 <= self.target_ms <= 120.0:
            raise ValueError(f"target_ms {self.target_ms} outside 20..120")
        if self.max_ms < self.target_ms + 2 * self.frame_samples * 1000 / self.rate:
            raise ValueError("max_ms must exceed target_ms by at least two frames")


@dataclass(frozen=True, slots=True)
class PlayoutStats:
    """Counters since creation; depths in ms."""

    pushed_frames: int
    played_frames: int  # frames pulled while playing (real or concealed)
    silent_frames: int  # frames pulled while (re)buffering
    concealed_frames: int
    underruns: int  # times the buffer ran empty while playing
    overruns: int  # pushes that hit max_ms and dropped the oldest samples
    dropped_samples: int
    late_frames: int  # arrived after their time had been played
    compressed_frames: int  # drift correction: frames shortened
    stretched_frames: int  # drift correction: frames lengthened
    rebuffers: int
    resyncs: int
    depth_ms: float
    max_depth_ms: float  # largest depth seen at any pull or push


class PlayoutBuffer:
    """See the module docstring. `push(samples, ts)`; `pull() -> frame_samples int16`."""

    def __init__(self, settings: PlayoutSettings | None = None) -> None:
        self.settings = s = settings or PlayoutSettings()
        self._fs = s.frame_samples
        self._ms = s.rate / 1000.0
        self._target = round(s.target_ms * self._ms)
        self._max = round(s.max_ms * self._ms)
        self._tol = s.tolerance_ms * self._ms
        self._step = max(1, round(self._fs * s.stretch_fraction))
        self._splice_min = round(SPLICE_MIN_MS * self._ms)
        self._splice_max = round(SPLICE_MAX_MS * self._ms)
        self._overlap = min(round(SPLICE_OVERLAP_MS * self._ms), self._fs // 4)
        self._resync = round(s.resync_ms * self._ms)
        cap = self._max + 2 * self._fs
        self._buf = np.zeros(cap, dtype=np.int16)
        self._have = np.zeros(cap, dtype=bool)
        self._lock = threading.Lock()
        self._base_ts: int | None = None  # sender timestamp of _buf[0]
        self._end = 0  # samples from _buf[0] to the end of the newest written sample
        self._playing = False
        self._avg_depth = float(self._target)
        self._last_good = np.zeros(self._fs, dtype=np.int16)
        self._conceal_run = 0
        self._catch_up = 0  # +1 cutting, -1 repeating pitch periods back to the target
        self._c = {
            k: 0
            for k in (
                "pushed_frames",
                "played_frames",
                "silent_frames",
                "concealed_frames",
                "underruns",
                "overruns",
                "dropped_samples",
                "late_frames",
                "compressed_frames",
                "stretched_frames",
                "rebuffers",
                "resyncs",
            )
        }
        self._max_depth = 0

    @property
    def depth_ms(self) -> float:
        """Audio buffered ahead of the playout point, in ms (the added latency)."""
        return self._end / self._ms

    @property
    def playing(self) -> bool:
        return self._playing

    def stats(self) -> PlayoutStats:
        with self._lock:
            return PlayoutStats(
                **self._c, depth_ms=self.depth_ms, max_depth_ms=self._max_depth / self._ms
            )

    def push(self, samples: Samples, ts: int | None = None) -> None:
        """Add mono int16 samples whose first sample has sender timestamp `ts`.

        `ts=None` appends right after the newest samples (contiguous audio).
        """
        with self._lock:
            self._push(samples, ts)

    def _push(self, samples: Samples, ts: int | None) -> None:
        n = int(samples.size)
        if n == 0:
            return
        if self._base_ts is None:
            self._base_ts = ts if ts is not None else 0
            self._end = 0
        if ts is None:
            ts = self._base_ts + self._end
        off = ts - self._base_ts
        if off > self._resync or off + n < -self._resync:
            self._c["resyncs"] += 1
            self._clear()
            self._base_ts, off = ts, 0
        if off + n <= 0:
            self._c["late_frames"] += 1
            return
        if off < 0:
            samples, off, n = samples[-off:], 0, n + off
        if n > self._max:
            samples, off, n = samples[n - self._max :], off + n - self._max, self._max
        excess = off + n - self._max
        if excess > 0:
            self._c["overruns"] += 1
            self._c["dropped_samples"] += min(excess, self._end)
            self._shift(excess)
            off -= excess
        self._buf[off : off + n] = samples.reshape(-1)
        self._have[off : off + n] = True
        self._end = max(self._end, off + n)
        self._max_depth = max(self._max_depth, self._end)
        self._c["pushed_frames"] += 1

    def pull(self) -> Samples:
        """The next `frame_samples` of audio to play (silence while buffering)."""
        with self._lock:
            return self._pull()

    def _pull(self) -> Samples:
        fs = self._fs
        if not self._playing:
            if self._base_ts is None or self._end < self._target:
                self._c["silent_frames"] += 1
                return np.zeros(fs, dtype=np.int16)
            self._playing = True
            if self._end > self._target:  # start at the target, not at whatever piled up
                self._c["dropped_samples"] += self._end - self._target
                self._shift(self._end - self._target)
            self._avg_depth = float(self._end)
        self._c["played_frames"] += 1
        depth = self._end
        self._max_depth = max(self._max_depth, depth)
        self._avg_depth += self.settings.depth_smoothing * (depth - self._avg_depth)

        if depth <= 0:
            return self._underrun()
        consume = fs
        excess = self._avg_depth - self._target
        surplus = depth - self._target
        if not self._catch_up and abs(excess) > 3 * self._tol:
            self._catch_up = 1 if excess > 0 else -1
        if self._catch_up and surplus * self._catch_up <= self._tol:
            # Back within tolerance: the average restarts from here, or its lag would
            # keep correcting past the target.
            self._catch_up = 0
            self._avg_depth = float(depth)
            excess = 0.0
        elif self._catch_up:
            spliced = self._splice(surplus)
            if spliced is not None:
                out, consume = spliced
                self._c["compressed_frames" if consume > fs else "stretched_frames"] += 1
                self._last_good = out
                self._conceal_run = 0
                self._shift(consume)
                return out
        step = self._step
        if self._have[: fs + step].all() and depth >= fs + step:
            if excess > self._tol:
                consume = fs + step
                self._c["compressed_frames"] += 1
            elif excess < -self._tol:
                consume = fs - step
                self._c["stretched_frames"] += 1
        seg = self._buf[:consume].copy()
        mask = self._have[:consume]
        if mask.all():
            out = stretch(seg, fs)
            self._last_good = out
            self._conceal_run = 0
        else:
            out = np.where(mask, seg, self._concealment())
        self._shift(consume)
        return out

    def _splice(self, surplus: int) -> tuple[Samples, int] | None:
        """The next frame with up to `surplus` samples cut (> 0) or repeated (< 0), and
        the samples it consumes; None when no piece fits or matches well enough.

        WSOLA: the piece is `d` samples where the audio `d` on matches the frame's start
        best, so it is whole pitch periods and the crossfade joins audio in phase.
        """
        fs, w, lo = self._fs, self._overlap, self._splice_min
        if surplus > 0:
            hi = min(surplus, self._splice_max)
            need = fs + hi
        else:
            hi = min(-surplus, self._splice_max, fs - w)
            need = fs
        if hi < lo or self._end < need or not self._have[:need].all():
            return None
        seg = self._buf[:need].astype(np.float64)
        head = seg[:w]
        later = np.lib.stride_tricks.sliding_window_view(seg[: hi + w], w)[lo:]
        energy = np.einsum("ij,ij->i", later, later)
        floor = w * QUIET_RMS**2
        rho = (later @ head) / np.sqrt(np.maximum(energy * float(head @ head), 1e-9))
        if float(head @ head) < floor:
            rho = np.where(energy < floor, 1.0, rho)
        best = float(rho.max())
        if best < SPLICE_MIN_MATCH:
            return None
        d = lo + int(np.flatnonzero(rho >= best - 0.01)[-1])  # the longest of the best
        fade_in = np.arange(w) / w
        if surplus > 0:  # the frame's start fades into the audio d later: d cut
            joined = head * (1 - fade_in) + seg[d : d + w] * fade_in
            return to_int16(np.concatenate([joined, seg[d + w : d + fs]])), fs + d
        # d played, then the audio d on fades back into the frame's start: d repeated
        joined = seg[d : d + w] * (1 - fade_in) + head * fade_in
        return to_int16(np.concatenate([seg[:d], joined, seg[w : fs - d]])), fs - d

    def _underrun(self) -> Samples:
        if self._conceal_run == 0:
            self._c["underruns"] += 1
        out = self._concealment()
        if self._conceal_run > self.settings.fade_frames:
            # Faded out and still nothing: rebuffer to the target from the next push.
            self._playing = False
            self._c["rebuffers"] += 1
            self._clear()
        else:
            self._shift(self._fs)
        return out

    def _concealment(self) -> Samples:
        """The last good frame at a gain ramping down over `fade_frames`, then silence."""
        fade = self.settings.fade_frames
        k = self._conceal_run
        self._conceal_run += 1
        self._c["concealed_frames"] += 1
        if k >= fade:
            return np.zeros(self._fs, dtype=np.int16)
        g0, g1 = 1.0 - k / fade, 1.0 - (k + 1) / fade
        ramp = np.linspace(g0, g1, self._fs, endpoint=False)
        return to_int16(self._last_good.astype(np.float64) * ramp)

    def _shift(self, count: int) -> None:
        """Drop `count` samples from the front (played or overrun)."""
        cap = self._buf.size
        n = min(count, cap)
        self._buf[: cap - n] = self._buf[n:]
        self._buf[cap - n :] = 0
        self._have[: cap - n] = self._have[n:]
        self._have[cap - n :] = False
        self._end = max(0, self._end - count)
        # All of `count`, even past the buffer: a push far ahead (`_push`'s excess) moves
        # the timeline by that much, or its samples land at the wrong offset.
        if self._base_ts is not None:
            self._base_ts += count

    def _clear(self) -> None:
        self._catch_up = 0
        self._buf[:] = 0
        self._have[:] = False
        self._end = 0
        self._base_ts = None
