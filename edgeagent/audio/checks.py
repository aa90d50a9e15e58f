"""Per-frame audio checks (level, silence, dead input, noise floor, clipping, DC) with hysteresis.

Pure numpy over int16 mono frames; the frame count is the clock, so the same
signal always gives the same figures and the same issue changes.

Issue changes are returned, not called back: `FrameAnalyzer.analyze()` returns a
`FrameStats` whose `changes` tuple is empty on almost every frame and holds one
`AudioIssueChanged` per condition that was raised or cleared on that frame.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from edgeagent.events import Event

FULL_SCALE = 32768.0
LEVEL_FLOOR_DBFS = -120.0
"""Level reported for digital silence (keeps figures finite and JSON-safe)."""

_DB_FULL_SCALE = 20.0 * math.log10(FULL_SCALE)
_NO_CHANGES: tuple[AudioIssueChanged, ...] = ()

Int16Frame = npt.NDArray[np.int16]

ISSUE_NAMES = ("no_audio", "dead_input", "clipping", "high_noise", "too_quiet", "too_hot")


@dataclass(frozen=True, slots=True)
class AudioIssueChanged(Event):
    """An audio condition was raised (`active`) or cleared on one stream."""

    name: str
    active: bool
    value: float | None
    stream: str


class FrameStats(NamedTuple):
    """Figures for one frame, plus the issue changes that frame caused (usually none)."""

    level_dbfs: float
    peak: int
    clipped_samples: int
    dc_offset: float
    is_digital_silence: bool
    changes: tuple[AudioIssueChanged, ...] = ()


@dataclass(frozen=True, slots=True)
class AudioSnapshot:
    """Current figures of one stream over the report window, for quality messages."""

    stream: str
    level_dbfs: float
    speech_level_dbfs: float | None
    noise_floor_dbfs: float | None
    clipping_pct: float
    peak: int
    dc_offset: float
    issues: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AudioCheckConfig:
    """Thresholds and durations; levels in dBFS, durations in seconds of audio."""

    sample_rate: int = 48000
    frame_samples: int = 960
    no_audio_after_s: float = 4.0
    no_audio_clear_s: float = 0.5
    dead_level_dbfs: float = -70.0
    dead_after_s: float = 4.0
    dead_clear_s: float = 1.0
    stuck_window_s: int = 10
    stuck_range_db: float = 0.2
    clip_run: int = 3
    clip_pct: float = 0.1
    clip_raise_s: int = 1
    clip_clear_s: int = 5
    noise_window_s: float = 8.0
    noise_percentile: float = 10.0
    high_noise_dbfs: float = -50.0
    high_noise_clear_dbfs: float = -53.0
    noise_raise_s: int = 3
    noise_clear_s: int = 5
    speech_window_s: int = 5
    speech_above_noise_db: float = 10.0
    speech_min_active_s: float = 0.4
    too_quiet_dbfs: float = -40.0
    too_quiet_clear_dbfs: float = -37.0
    too_hot_dbfs: float = -10.0
    too_hot_clear_dbfs: float = -13.0
    speech_raise_s: int = 3
    speech_clear_s: int = 5
    report_window_s: int = 5


class Hysteresis:
    """Debounced flag: on after `raise_after` bad updates in a row, off after `clear_after` good."""

    __slots__ = ("_clear_after", "_raise_after", "_run", "active")

    def __init__(self, raise_after: int, clear_after: int) -> None:
        self._raise_after = max(1, raise_after)
        self._clear_after = max(1, clear_after)
        self._run = 0
        self.active = False

    def update(self, bad: bool) -> bool:
        """Feed one observation; True when `active` changed."""
        if bad is self.active:
            self._run = 0
            return False
        self._run += 1
        if self._run >= (self._clear_after if self.active else self._raise_after):
            self.active = bad
            self._run = 0
            return True
        return False


def level_dbfs(mean_square: float) -> float:
    """dBFS of a mean square in int16 units squared (floored at LEVEL_FLOOR_DBFS)."""
    if mean_square <= 0.0:
        return LEVEL_FLOOR_DBFS
    return max(LEVEL_FLOOR_DBFS, 10.0 * math.log10(mean_square) - _DB_FULL_SCALE)


def clipped_samples(frame: Int16Frame, run: int = 3, rail: int = 32767) -> int:
    """Samples that sit in runs of at least `run` consecutive samples at either rail."""
    at_rail = (frame >= rail) | (frame <= -rail)
    n = at_rail.shape[0]
    if n < run:
        return 0
    starts = at_rail[: n - run + 1].copy()
    for k in range(1, run):
        starts &= at_rail[k : n - run + 1 + k]
    if not starts.any():
        return 0
    marked = np.zeros(n, dtype=bool)
    for k in range(run):
        marked[k : n - run + 1 + k] |= starts
    return int(np.count_nonzero(marked))


class FrameAnalyzer:
    """Checks every frame of one stream (capture before/after AEC, or playout).

    Call `analyze()` once per frame, in order. Per-second figures (noise floor,
    clipping %, speech level) are refreshed every second of audio.
    """

    def __init__(self, stream: str, config: AudioCheckConfig | None = None) -> None:
        cfg = config or AudioCheckConfig()
        self.stream = stream
        self._cfg = cfg
        self._n = cfg.frame_samples
        fps = cfg.sample_rate / cfg.frame_samples
        self._frames_per_s = max(1, round(fps))
        self._buf = np.empty(self._n, dtype=np.float32)

        self._no_audio = Hysteresis(1, round(cfg.no_audio_clear_s * fps))
        self._dead = Hysteresis(1, round(cfg.dead_clear_s * fps))
        self._clipping = Hysteresis(cfg.clip_raise_s, cfg.clip_clear_s)
        self._high_noise = Hysteresis(cfg.noise_raise_s, cfg.noise_clear_s)
        self._too_quiet = Hysteresis(cfg.speech_raise_s, cfg.speech_clear_s)
        self._too_hot = Hysteresis(cfg.speech_raise_s, cfg.speech_clear_s)
        self._no_audio_frames = round(cfg.no_audio_after_s * fps)
        self._dead_frames = round(cfg.dead_after_s * fps)

        self._silent_run = 0
        self._low_run = 0
        self._stuck = False

        self._levels_len = max(1, round(cfg.noise_window_s * fps))
        self._levels = np.full(self._levels_len, np.nan, dtype=np.float64)
        self._level_i = 0
        self._levels_filled = 0
        self._inv_n = 1.0 / self._n
        self._dc_scale = 1.0 / (self._n * FULL_SCALE)
        self._ones = np.ones(self._n, dtype=np.float32)
        self._clip_run = cfg.clip_run
        self._dead_level = cfg.dead_level_dbfs
        # a frame counts as active speech above this level (refreshed with the noise floor)
        self._active_above = cfg.dead_level_dbfs
        self._noise_floor: float | None = None
        self._speech_level: float | None = None

        # current one-second block
        self._frame_in_block = 0
        self._b_power = 0.0
        self._b_clipped = 0
        self._b_active_power = 0.0
        self._b_active = 0
        self._b_min = math.inf
        self._b_max = -math.inf
        self._b_peak = 0
        # completed blocks: (power_sum, frames, clipped, active_power_sum, active_frames, peak)
        self._blocks: deque[tuple[float, int, int, float, int, int]] = deque(
            maxlen=max(cfg.report_window_s, cfg.speech_window_s)
        )
        self._ranges: deque[tuple[float, float]] = deque(maxlen=cfg.stuck_window_s)
        self._last_dc = 0.0

    def analyze(self, frame: Int16Frame) -> FrameStats:
        """Check one frame; returns its figures and any issue changes it caused."""
        # Hot path (every 20 ms on every stream): few numpy calls, locals, no avoidable objects.
        x = self._buf
        np.copyto(x, frame, casting="unsafe")
        ss = float(np.dot(x, x))
        hi = int(frame.max())
        lo = int(frame.min())
        silent = ss == 0.0
        if silent:
            ms = dc = 0.0
            lvl = LEVEL_FLOOR_DBFS
        else:
            ms = ss * self._inv_n
            dc = float(np.dot(x, self._ones)) * self._dc_scale
            lvl = 10.0 * math.log10(ms) - _DB_FULL_SCALE
            if lvl < LEVEL_FLOOR_DBFS:
                lvl = LEVEL_FLOOR_DBFS
        peak = hi if hi > -lo else -lo
        clipped = 0
        if hi >= 32767 or lo <= -32767:
            clipped = clipped_samples(frame, self._clip_run)
        self._last_dc = dc

        # rolling per-frame state
        i = self._level_i
        self._levels[i] = lvl
        i += 1
        self._level_i = 0 if i == self._levels_len else i
        self._b_power += ms
        if clipped:
            self._b_clipped += clipped
        if peak > self._b_peak:
            self._b_peak = peak
        if lvl < self._b_min:
            self._b_min = lvl
        if lvl > self._b_max:
            self._b_max = lvl
        if lvl > self._active_above:
            self._b_active_power += ms
            self._b_active += 1

        changes: tuple[AudioIssueChanged, ...] = _NO_CHANGES
        self._frame_in_block += 1
        if self._frame_in_block >= self._frames_per_s:
            changes = self._end_block(changes)
        if silent:
            self._silent_run += 1
            self._low_run = 0
        else:
            self._silent_run = 0
            self._low_run = self._low_run + 1 if lvl < self._dead_level else 0
        if self._no_audio.update(self._silent_run >= self._no_audio_frames):
            changes = (*changes, self._change("no_audio", self._no_audio.active, lvl))
        if self._dead.update(self._low_run >= self._dead_frames or self._stuck):
            changes = (*changes, self._change("dead_input", self._dead.active, lvl))
        return FrameStats(lvl, peak, clipped, dc, silent, changes)

    def _change(self, name: str, active: bool, value: float | None) -> AudioIssueChanged:
        return AudioIssueChanged(name, active, value, self.stream)

    def _end_block(self, changes: tuple[AudioIssueChanged, ...]) -> tuple[AudioIssueChanged, ...]:
        cfg = self._cfg
        frames = self._frame_in_block
        self._blocks.append(
            (
                self._b_power,
                frames,
                self._b_clipped,
                self._b_active_power,
                self._b_active,
                self._b_peak,
            )
        )
        self._ranges.append((self._b_min, self._b_max))
        block_clip_pct = 100.0 * self._b_clipped / (frames * self._n)
        self._frame_in_block = 0
        self._b_power = 0.0
        self._b_clipped = 0
        self._b_active_power = 0.0
        self._b_active = 0
        self._b_min = math.inf
        self._b_max = -math.inf
        self._b_peak = 0

        # dead/stuck: a near-constant level over the whole window (digital silence is no_audio)
        if len(self._ranges) == self._ranges.maxlen:
            lo = min(r[0] for r in self._ranges)
            hi = max(r[1] for r in self._ranges)
            self._stuck = lo > LEVEL_FLOOR_DBFS and hi - lo < cfg.stuck_range_db
        else:
            self._stuck = False

        # noise floor: a low percentile of frame levels over the window
        self._levels_filled = min(self._levels_len, self._levels_filled + frames)
        n = self._levels_filled
        if n >= self._frames_per_s:
            k = int(cfg.noise_percentile / 100.0 * (n - 1))
            vals = self._levels[:n] if n < self._levels.shape[0] else self._levels
            self._noise_floor = float(np.partition(vals, k)[k])
            self._active_above = max(
                cfg.dead_level_dbfs, self._noise_floor + cfg.speech_above_noise_db
            )

        # active speech level over the speech window
        act_p = 0.0
        act_n = 0
        for b in list(self._blocks)[-cfg.speech_window_s :]:
            act_p += b[3]
            act_n += b[4]
        if act_n >= cfg.speech_min_active_s * self._frames_per_s:
            self._speech_level = level_dbfs(act_p / act_n)
        else:
            self._speech_level = None

        if self._clipping.update(
            block_clip_pct > cfg.clip_pct
            if not self._clipping.active
            else block_clip_pct > cfg.clip_pct / 2
        ):
            changes = (*changes, self._change("clipping", self._clipping.active, block_clip_pct))
        nf = self._noise_floor
        if nf is not None:
            thr = cfg.high_noise_clear_dbfs if self._high_noise.active else cfg.high_noise_dbfs
            if self._high_noise.update(nf > thr):
                changes = (*changes, self._change("high_noise", self._high_noise.active, nf))
        sp = self._speech_level
        if sp is not None:
            q_thr = cfg.too_quiet_clear_dbfs if self._too_quiet.active else cfg.too_quiet_dbfs
            if self._too_quiet.update(sp < q_thr):
                changes = (*changes, self._change("too_quiet", self._too_quiet.active, sp))
            h_thr = cfg.too_hot_clear_dbfs if self._too_hot.active else cfg.too_hot_dbfs
            if self._too_hot.update(sp > h_thr):
                changes = (*changes, self._change("too_hot", self._too_hot.active, sp))
        return changes

    @property
    def noise_floor_dbfs(self) -> float | None:
        """Current noise floor estimate (None until a second of audio was seen)."""
        return self._noise_floor

    @property
    def speech_level_dbfs(self) -> float | None:
        """Active speech level over the speech window (None without enough speech)."""
        return self._speech_level

    def active_issues(self) -> tuple[str, ...]:
        """Names of the conditions currently raised."""
        flags = (
            self._no_audio,
            self._dead,
            self._clipping,
            self._high_noise,
            self._too_quiet,
            self._too_hot,
        )
        return tuple(name for name, h in zip(ISSUE_NAMES, flags, strict=True) if h.active)

    def snapshot(self) -> AudioSnapshot:
        """Figures over the last `report_window_s` seconds (whole seconds plus the current one)."""
        blocks = list(self._blocks)[-self._cfg.report_window_s :]
        power = self._b_power + sum(b[0] for b in blocks)
        frames = self._frame_in_block + sum(b[1] for b in blocks)
        clipped = self._b_clipped + sum(b[2] for b in blocks)
        peak = max([self._b_peak, *(b[5] for b in blocks)])
        if frames == 0:
            return AudioSnapshot(
                self.stream, LEVEL_FLOOR_DBFS, None, None, 0.0, 0, 0.0, self.active_issues()
            )
        return AudioSnapshot(
            stream=self.stream,
            level_dbfs=level_dbfs(power / frames),
            speech_level_dbfs=self._speech_level,
            noise_floor_dbfs=self._noise_floor,
            clipping_pct=100.0 * clipped / (frames * self._n),
            peak=peak,
            dc_offset=self._last_dc,
            issues=self.active_issues(),
        )


def audio_object(
    capture: AudioSnapshot,
    playout: AudioSnapshot,
    *,
    echo_likelihood: float | None = None,
    echo_delay_ms: float | None = None,
    erle_db: float | None = None,
    underruns: int = 0,
    overruns: int = 0,
) -> dict[str, Any]:
    """The `audio` object of a quality message (protocol section 2), rounded for the wire."""
    out: dict[str, Any] = {
        "tx_level_dbfs": round(capture.level_dbfs, 1),
        "rx_level_dbfs": round(playout.level_dbfs, 1),
        "noise_floor_dbfs": (
            None if capture.noise_floor_dbfs is None else round(capture.noise_floor_dbfs, 1)
        ),
        "clipping_pct": round(capture.clipping_pct, 3),
        "echo_likelihood": None if echo_likelihood is None else round(echo_likelihood, 2),
        "underruns": underruns,
        "overruns": overruns,
    }
    if echo_delay_ms is not None:
        out["echo_delay_ms"] = round(echo_delay_ms, 1)
    if erle_db is not None:
        out["erle_db"] = round(erle_db, 1)
    if capture.speech_level_dbfs is not None:
        out["tx_speech_level_dbfs"] = round(capture.speech_level_dbfs, 1)
    if playout.clipping_pct:
        out["rx_clipping_pct"] = round(playout.clipping_pct, 3)
    issues = sorted({*capture.issues, *(f"rx_{i}" for i in playout.issues)})
    if issues:
        out["issues"] = issues
    return out
