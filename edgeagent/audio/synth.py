"""Synthetic speech-like test signals with known truth.

Used wherever the agent or its checks need a signal whose properties are known
(echo and AEC tests, the DSP benchmark, test calls): a glottal pulse train with
a wandering pitch, shaped to the speech band, gated into syllables with pauses.
Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def speech_like(seconds: float, seed: int, level_dbfs: float = -26.0, *, rate: int = 48000) -> F64:
    """Speech-like float samples in int16 units, `level_dbfs` RMS over the active parts."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    knots = np.arange(0.0, seconds + 0.2, 0.1)
    f0 = np.interp(t, knots, rng.uniform(90.0, 220.0, knots.size))
    f0 *= 1.0 + 0.01 * rng.standard_normal(n)
    pulses = np.diff(np.floor(np.cumsum(f0) / rate), prepend=0.0)
    excitation = pulses * 8.0 + rng.standard_normal(n) * 0.4
    f = np.fft.rfftfreq(n, 1 / rate)
    shape = np.where((f > 100) & (f < 3800), 1.0, 0.0) / (1.0 + (f / 700.0) ** 1.2)
    voiced = np.fft.irfft(np.fft.rfft(excitation) * shape, n)
    syllables = int(seconds * 4) + 1
    amp = np.where(rng.random(syllables) < 0.25, 0.0, rng.uniform(0.3, 1.0, syllables))
    seg = rate // 4
    env = (np.repeat(amp, seg) * np.tile(np.hanning(seg), syllables))[:n]
    s = voiced * env
    rms = np.sqrt(np.mean(s[env > 0.05] ** 2))
    out: F64 = s * (10 ** (level_dbfs / 20) * 32768 / rms)
    return out
