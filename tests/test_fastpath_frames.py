"""Faster receive-path sample maths: the same values as the general formulas."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from edgeagent.audio.frames import downmix
from edgeagent.call.tracks import frame_to_mono


def _reference_downmix(samples: np.ndarray, channels: int) -> np.ndarray:
    frames = samples.reshape(-1, channels).astype(np.int32)
    return (frames.sum(axis=1) // channels).astype(np.int16)


def test_stereo_downmix_is_the_floor_average_of_the_channels() -> None:
    rng = np.random.default_rng(3)
    extremes = np.array([-32768, -32768, 32767, 32767, -32768, 32767, -1, 0, -3, 0, 1, 2])
    for block in (extremes, rng.integers(-32768, 32768, 1920)):
        samples = block.astype(np.int16)
        ours = downmix(samples, 2)
        assert ours.dtype == np.int16 and ours.shape == (samples.size // 2,)
        assert np.array_equal(ours, _reference_downmix(samples, 2))
    assert np.array_equal(
        downmix(extremes[:12].astype(np.int16), 3),
        _reference_downmix(extremes[:12].astype(np.int16), 3),
    )


@pytest.mark.parametrize(
    ("time_base", "pts", "rate"),
    [
        (fractions.Fraction(1, 48000), 123456 * 960, 48000),
        (fractions.Fraction(1, 8000), 160 * 77, 8000),
        (fractions.Fraction(1, 90000), 1_234_567, 48000),
    ],
)
def test_frame_to_mono_keeps_timestamps_and_samples(
    time_base: fractions.Fraction, pts: int, rate: int
) -> None:
    n = rate // 50
    left = (np.sin(np.arange(n) * 0.07) * 9000).astype(np.int16)
    right = (-left // 3).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(np.stack([left, right], 1).reshape(1, -1), "s16", "stereo")
    frame.sample_rate, frame.pts, frame.time_base = rate, pts, time_base
    mono, ts = frame_to_mono(frame)
    assert ts == round(pts * time_base * 48000)
    assert mono.size == 960
    if rate == 48000:
        expected = ((left.astype(np.int32) + right) // 2).astype(np.int16)
        assert np.array_equal(mono, expected)
    frame.pts = None
    assert frame_to_mono(frame)[1] is None
