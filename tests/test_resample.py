"""Decoded frames at other rates and channel counts become 48 kHz mono with the same tone.

Checked against the signal itself (FFT peak, level, residual after the best-fit
sine), not against another call of the same resampler.
"""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from edgeagent.call.tracks import frame_to_mono

OUT_RATE = 48000
LEVEL_DBFS = -12.0


def sine(freq: float, rate: int, n: int, level_dbfs: float = LEVEL_DBFS) -> np.ndarray:
    amp = 32768 * 10 ** (level_dbfs / 20) * np.sqrt(2)
    return np.rint(amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.int16)


def frames_of(samples: np.ndarray, layout: str, rate: int, channels: int) -> list[av.AudioFrame]:
    """20 ms packed s16 frames, as a decoder gives them (pts in samples at `rate`)."""
    n = rate // 50
    out = []
    for k in range(0, samples.size // channels - n + 1, n):
        chunk = samples[k * channels : (k + n) * channels]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), "s16", layout)
        frame.sample_rate, frame.pts = rate, k
        frame.time_base = fractions.Fraction(1, rate)
        out.append(frame)
    return out


def level_dbfs(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) / 32768))


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.argmax(spectrum) * OUT_RATE / x.size)


def tone_to_residual_db(x: np.ndarray, freq: float) -> float:
    """Power of the best-fit sine at `freq` over the power of everything else."""
    t = np.arange(x.size) / OUT_RATE
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x.astype(np.float64), rcond=None)
    fit = basis @ coef
    return float(10 * np.log10(np.sum(fit**2) / np.sum((x - fit) ** 2)))


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_a_tone_at_another_rate_becomes_the_same_tone_at_48_khz(rate: int, freq: float) -> None:
    frames = frames_of(sine(freq, rate, rate), "mono", rate, 1)  # one second
    assert len(frames) == 50
    outs = [frame_to_mono(f) for f in frames]
    assert all(o.dtype == np.int16 and o.size == 960 for o, _ in outs)
    # 48 kHz timestamps: 20 ms apart, whatever the source rate
    assert [ts for _, ts in outs] == [k * 960 for k in range(50)]
    played = np.concatenate([o for o, _ in outs])
    assert played.size == OUT_RATE
    assert peak_hz(played) == pytest.approx(freq, abs=1.0)  # 1 Hz bins over one second
    # Linear interpolation loses under 0.5 dB at 1 kHz from 8 kHz (sinc^2 response).
    assert level_dbfs(played) == pytest.approx(LEVEL_DBFS, abs=1.0)
    # Little besides the tone: linear interpolation's images of a 1 kHz tone from
    # 8 kHz are about 30 dB down; a resampler that restarts its grid in each
    # frame adds a 50 Hz buzz at the frame edges (15-22 dB at 8 and 16 kHz).
    assert tone_to_residual_db(played, freq) >= 25.0


@pytest.mark.parametrize("rate", [48000, 16000])
def test_a_stereo_frame_is_downmixed_to_the_mean_of_its_channels(rate: int) -> None:
    left = sine(1000.0, rate, rate)
    inter = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)  # right silent
    played = np.concatenate([frame_to_mono(f)[0] for f in frames_of(inter, "stereo", rate, 2)])
    assert played.size == OUT_RATE
    assert peak_hz(played) == pytest.approx(1000.0, abs=1.0)
    # (L + R) / 2: a channel alone comes out at half its amplitude, 6 dB down
    assert level_dbfs(played) == pytest.approx(LEVEL_DBFS - 6.02, abs=0.5)
    # the same tone in both channels comes out whole
    both = np.stack([left, left], axis=1).reshape(-1)
    whole = np.concatenate([frame_to_mono(f)[0] for f in frames_of(both, "stereo", rate, 2)])
    assert level_dbfs(whole) == pytest.approx(LEVEL_DBFS, abs=0.5)
