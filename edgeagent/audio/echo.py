"""Two-stage acoustic echo detector: envelope correlation, then GCC-PHAT confirmation.

Stage 1 (every `stage1_interval_ms`): 5 ms sub-block powers of render (far end,
what the loudspeaker plays) and capture (microphone) are kept in ring buffers;
the normalised cross-correlation of the two envelopes over lags 0..max_delay
gives a likelihood and a coarse delay.

Stage 2 (every `gcc_interval_s`): GCC-PHAT of both streams decimated to 8 kHz
over the last `gcc_window_s`. The cross-spectrum is accumulated per segment
(capture segment against render over segment + max delay, so lags 0..max have
no circular wrap) and summed over the window, which equals the cross-correlation
of the whole window at a fraction of one long FFT's cost. Echo is confirmed when
the main peak is more than `peak_ratio` times the next one (outside +-1 ms) in
two consecutive runs whose delays agree within `consistent_ms`. The stage-1
delay is not used for confirmation: under double talk the envelopes correlate
at random lags. A confirmed run refines the delay (parabolic interpolation of
the peak) and estimates the ERL by least squares of capture sub-block powers on
`erl_taps` render taps from the delay on (echo power gain, reverberant tail
included, noise absorbed by the intercept). The debounced `echo` condition is
raised after `echo_raise_runs` confirmed runs and cleared after
`echo_clear_runs` unconfirmed ones.

Both stages are skipped while the far end is silent (render below
`far_end_active_dbfs`): echo cannot be judged then and the last figures hold.

Feed one render frame per capture frame, in the order they happen
(`push_render` then `push_capture` for each 20 ms tick); the delay is measured
between render frames as pushed and capture frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from edgeagent.audio.checks import (
    FULL_SCALE,
    AudioIssueChanged,
    Hysteresis,
    Int16Frame,
)

_NO_CHANGES: tuple[AudioIssueChanged, ...] = ()
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class EchoEstimate:
    """What the detector believes now; delay and ERL are None until known."""

    likelihood: float = 0.0
    delay_ms: float | None = None
    erl_db: float | None = None
    confirmed: bool = False
    peak_ratio: float = 0.0
    far_end_active: bool = False


@dataclass(frozen=True, slots=True)
class EchoDetectorConfig:
    sample_rate: int = 48000
    frame_samples: int = 960
    subblock_ms: float = 5.0
    max_delay_ms: float = 500.0
    envelope_window_s: float = 2.0
    stage1_interval_ms: float = 200.0
    gcc_interval_s: float = 1.0
    gcc_window_s: float = 2.0
    gcc_segment_s: float = 1.0
    gcc_rate_hz: int = 8000
    gcc_band_hz: tuple[float, float] = (200.0, 3600.0)
    peak_ratio: float = 2.0
    peak_guard_ms: float = 1.0
    consistent_ms: float = 1.0
    likelihood_threshold: float = 0.3
    far_end_active_dbfs: float = -50.0
    erl_taps: int = 12
    echo_raise_runs: int = 2
    echo_clear_runs: int = 5


class _Ring:
    """Fixed ring with doubled storage, so the latest `n` values are always one contiguous view."""

    __slots__ = ("_buf", "_i", "filled", "size")

    def __init__(self, size: int, dtype: type[np.generic]) -> None:
        self.size = size
        self._buf = np.zeros(2 * size, dtype=dtype)
        self._i = 0
        self.filled = 0

    def write(self, values: npt.NDArray[np.generic]) -> None:
        n = values.shape[0]
        i = self._i
        size = self.size
        if i + n <= size:
            self._buf[i : i + n] = values
            self._buf[i + size : i + size + n] = values
        else:  # wraps: write in two parts
            first = size - i
            self.write(values[:first])
            self.write(values[first:])
            return
        self._i = (i + n) % size
        self.filled = min(size, self.filled + n)

    def latest(self, n: int) -> npt.NDArray[np.generic]:
        """The last `n` values written, oldest first (a view)."""
        end = self._i + self.size
        return self._buf[end - n : end]


class EchoDetector:
    """Detects echo of the render stream in the capture stream (see module docstring)."""

    def __init__(self, stream: str = "capture", config: EchoDetectorConfig | None = None) -> None:
        cfg = config or EchoDetectorConfig()
        self.stream = stream
        self._cfg = cfg
        fps = cfg.sample_rate / cfg.frame_samples
        self._sub = round(cfg.sample_rate * cfg.subblock_ms / 1000.0)
        self._block_frames = max(1, round(cfg.stage1_interval_ms / 1000.0 * fps))
        self._block = self._block_frames * cfg.frame_samples
        self._dec = cfg.sample_rate // cfg.gcc_rate_hz
        if self._block % self._sub or cfg.sample_rate % cfg.gcc_rate_hz or self._block % self._dec:
            raise ValueError("frame size, sub-block, stage-1 interval and GCC rate do not fit")
        self._subs_per_block = self._block // self._sub
        self._lags = round(cfg.max_delay_ms / cfg.subblock_ms)
        self._win = round(cfg.envelope_window_s * 1000.0 / cfg.subblock_ms)

        # raw audio for the current block, envelopes, and 8 kHz audio for GCC-PHAT
        self._raw_r = _Ring(2 * self._block, np.int16)
        self._raw_c = _Ring(2 * self._block, np.int16)
        self._env_r = _Ring(self._win + self._lags, np.float64)
        self._env_c = _Ring(self._win + self._lags, np.float64)
        self._gcc_lags = round(cfg.max_delay_ms * cfg.gcc_rate_hz / 1000.0)
        self._seg_blocks = max(1, round(cfg.gcc_segment_s * 1000.0 / cfg.stage1_interval_ms))
        self._seg = self._seg_blocks * self._block // self._dec
        self._nfft = self._seg + self._gcc_lags  # no circular wrap for lags 0..max
        self._dec_r = _Ring(self._seg + self._gcc_lags, np.float64)
        self._dec_c = _Ring(self._seg, np.float64)
        n_segs = max(1, round(cfg.gcc_window_s / cfg.gcc_segment_s))
        self._xspec = np.zeros((n_segs, self._nfft // 2 + 1), dtype=np.complex128)
        self._seg_i = 0
        self._segs_done = 0
        freqs = np.fft.rfftfreq(self._nfft, 1.0 / cfg.gcc_rate_hz)
        self._out_band = (freqs < cfg.gcc_band_hz[0]) | (freqs > cfg.gcc_band_hz[1])
        self._ones_dec = np.ones(self._dec, dtype=np.float32)

        self._gcc_every = max(1, round(cfg.gcc_interval_s * 1000.0 / cfg.stage1_interval_ms))
        self._frames = 0
        self._blocks = 0
        self._far_thr = (FULL_SCALE**2) * 10.0 ** (cfg.far_end_active_dbfs / 10.0)

        self._likelihood = 0.0
        self._env_delay_ms: float | None = None
        self._prev_gcc_delay: float | None = None
        self._estimate = EchoEstimate()
        self._echo = Hysteresis(cfg.echo_raise_runs, cfg.echo_clear_runs)

    @property
    def estimate(self) -> EchoEstimate:
        """The latest estimate (replaced only when a stage runs)."""
        return self._estimate

    @property
    def echo_active(self) -> bool:
        """The debounced echo condition."""
        return self._echo.active

    def push_render(self, frame: Int16Frame) -> None:
        """One frame of what the loudspeaker plays."""
        self._raw_r.write(frame)

    def push_capture(self, frame: Int16Frame) -> tuple[AudioIssueChanged, ...]:
        """One frame of what the microphone hears; returns `echo` issue changes."""
        self._raw_c.write(frame)
        self._frames += 1
        if self._frames % self._block_frames:
            return _NO_CHANGES
        return self._end_block()

    def _end_block(self) -> tuple[AudioIssueChanged, ...]:
        n = self._block
        for raw, env, dec in (
            (self._raw_r, self._env_r, self._dec_r),
            (self._raw_c, self._env_c, self._dec_c),
        ):
            x = raw.latest(n).astype(np.float32)
            xs = x.reshape(self._subs_per_block, self._sub)
            env.write(np.einsum("ij,ij->i", xs, xs) * (1.0 / self._sub))
            dec.write(x.reshape(-1, self._dec) @ self._ones_dec)
        self._blocks += 1
        if self._env_c.filled >= self._win:
            self._stage1()
        if self._blocks % self._seg_blocks == 0 and self._dec_r.filled >= self._dec_r.size:
            self._add_segment()
        if self._blocks % self._gcc_every == 0 and self._segs_done >= self._xspec.shape[0]:
            return self._stage2()
        return _NO_CHANGES

    def _far_active(self, render_env: F64) -> bool:
        return bool(float(render_env.mean()) >= self._far_thr)

    def _stage1(self) -> None:
        win, lags = self._win, self._lags
        r_all: F64 = self._env_r.latest(win + lags)  # type: ignore[assignment]
        if not self._far_active(r_all[lags:]):
            self._estimate = replace(self._estimate, far_end_active=False)
            return
        c: F64 = self._env_c.latest(win)  # type: ignore[assignment]
        cz = c - c.mean()
        c_norm = math.sqrt(float(np.dot(cz, cz)))
        # entry i: render window starting at i, i.e. capture delayed by (lags - i) sub-blocks
        num = np.correlate(r_all, cz, "valid")
        both = np.empty((2, win + lags + 1), dtype=np.float64)
        both[:, 0] = 0.0
        np.cumsum(r_all, out=both[0, 1:])
        np.cumsum(r_all * r_all, out=both[1, 1:])
        sums = both[:, win:] - both[:, : lags + 1]
        var = np.maximum(sums[1] - sums[0] * sums[0] / win, 1e-30)
        corr = num / (np.sqrt(var) * max(c_norm, 1e-30))
        i = int(np.argmax(corr))
        self._likelihood = max(0.0, min(1.0, float(corr[i])))
        self._env_delay_ms = (lags - i) * self._cfg.subblock_ms
        est = self._estimate
        self._estimate = EchoEstimate(
            likelihood=self._likelihood,
            delay_ms=est.delay_ms if est.confirmed else self._env_delay_ms,
            erl_db=est.erl_db,
            confirmed=est.confirmed,
            peak_ratio=est.peak_ratio,
            far_end_active=True,
        )

    def _add_segment(self) -> None:
        """Cross-spectrum of the newest capture segment against render over segment + lags."""
        cap = self._dec_c.latest(self._seg)
        ren = self._dec_r.latest(self._seg + self._gcc_lags)
        spec = np.conj(np.fft.rfft(cap, self._nfft))
        spec *= np.fft.rfft(ren, self._nfft)
        self._xspec[self._seg_i] = spec
        self._seg_i = (self._seg_i + 1) % self._xspec.shape[0]
        self._segs_done += 1

    def _stage2(self) -> tuple[AudioIssueChanged, ...]:
        cfg = self._cfg
        r_env: F64 = self._env_r.latest(self._win)  # type: ignore[assignment]
        if not self._far_active(r_env):
            self._prev_gcc_delay = None
            return _NO_CHANGES
        # Summed segment cross-spectra: the exact cross-correlation over the whole window.
        spec = self._xspec.sum(axis=0)
        mag = np.abs(spec)
        spec /= np.maximum(mag, 1e-12 * float(mag.max()) + 1e-30)
        spec[self._out_band] = 0.0
        cc = np.abs(np.fft.irfft(spec, self._nfft)[: self._gcc_lags + 1])
        m0 = int(np.argmax(cc))
        main = float(cc[m0])
        guard = max(1, round(cfg.peak_guard_ms * cfg.gcc_rate_hz / 1000.0))
        lo, hi = max(0, m0 - guard), m0 + guard + 1
        nxt = max(
            float(cc[:lo].max()) if lo > 0 else 0.0, float(cc[hi:].max()) if hi < cc.size else 0.0
        )
        ratio = main / nxt if nxt > 0.0 else math.inf
        frac = 0.0
        if 0 < m0 < self._gcc_lags:
            a, c = float(cc[m0 - 1]), float(cc[m0 + 1])
            den = a - 2.0 * main + c
            if den < 0.0:
                frac = 0.5 * (a - c) / den
        delay_ms = (self._gcc_lags - (m0 + frac)) * 1000.0 / cfg.gcc_rate_hz

        strong = ratio > cfg.peak_ratio
        consistent = (
            self._prev_gcc_delay is not None
            and abs(delay_ms - self._prev_gcc_delay) <= cfg.consistent_ms
        )
        self._prev_gcc_delay = delay_ms if strong else None
        confirmed = strong and consistent
        erl = self._erl_db(delay_ms) if confirmed else None
        self._estimate = EchoEstimate(
            likelihood=self._likelihood,
            delay_ms=delay_ms if confirmed else self._env_delay_ms,
            erl_db=erl if erl is not None else (self._estimate.erl_db if confirmed else None),
            confirmed=confirmed,
            peak_ratio=ratio,
            far_end_active=True,
        )
        if self._echo.update(confirmed):
            value = delay_ms if confirmed else None
            return (AudioIssueChanged("echo", self._echo.active, value, self.stream),)
        return _NO_CHANGES

    def _erl_db(self, delay_ms: float) -> float | None:
        """Echo return loss: least squares of capture power on render power taps at the delay."""
        cfg = self._cfg
        win, lags = self._win, self._lags
        d0 = int(delay_ms // cfg.subblock_ms) - 1
        taps = [d for d in range(d0, d0 + cfg.erl_taps) if 0 <= d <= lags]
        if not taps:
            return None
        r_all: F64 = self._env_r.latest(win + lags)  # type: ignore[assignment]
        c: F64 = self._env_c.latest(win)  # type: ignore[assignment]
        scale = float(r_all.mean()) or 1.0
        x = np.empty((len(taps) + 1, win), dtype=np.float64)
        for j, d in enumerate(taps):
            np.multiply(r_all[lags - d : lags - d + win], 1.0 / scale, out=x[j])
        x[-1] = 1.0
        try:
            coef = np.linalg.solve(x @ x.T, x @ (c / scale))
        except np.linalg.LinAlgError:
            return None
        gain = float(coef[:-1].sum())
        if gain <= 0.0:
            return None
        return -10.0 * math.log10(gain)
