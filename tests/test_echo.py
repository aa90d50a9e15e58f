"""Two-stage echo detector on synthetic echo with known delay and ERL.

The echo path: loudspeaker saturation (tanh), a room response (direct path plus
a diffuse exponentially decaying tail at -3 dB direct-to-reverberant ratio),
a pure delay, a gain set so that render power / echo power is exactly the ERL,
plus microphone noise. Render and near-end talkers are speech-like: a jittered
glottal pulse train with a random pitch contour plus breath noise, low-passed
and cut into syllables (4 per second, a quarter of them silent).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edgeagent.audio.checks import AudioIssueChanged
from edgeagent.audio.echo import EchoDetector
from edgeagent.audio.synth import speech_like

FS = 48000
FRAME = 960
F = npt.NDArray[np.float64]


def room_ir(seed: int, drr_db: float = 3.0, tau_s: float = 0.02, length_s: float = 0.08) -> F:
    rng = np.random.default_rng(seed)
    n = int(length_s * FS)
    h = np.zeros(n)
    h[0] = 1.0
    k = np.arange(96, n)  # tail from 2 ms on
    tail = rng.standard_normal(k.size) * np.exp(-(k - 96) / (tau_s * FS))
    h[k] = tail * np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    return h


def echo_of(render: F, delay_ms: float, erl_db: float, seed: int = 1) -> F:
    src = np.tanh(2.0 * render / 32768.0) / 2.0  # loudspeaker saturation
    h = room_ir(seed)
    n = src.size + h.size
    e = np.fft.irfft(np.fft.rfft(src, n) * np.fft.rfft(h, n), n)[: src.size]
    d = round(delay_ms * FS / 1000)
    e = np.concatenate([np.zeros(d), e[: e.size - d]])
    out: F = e * np.sqrt(np.mean(render**2) / np.mean(e**2) * 10 ** (-erl_db / 10))
    return out


def noise(seconds: float, dbfs: float, seed: int) -> F:
    rng = np.random.default_rng(seed)
    out: F = rng.standard_normal(int(seconds * FS)) * 10 ** (dbfs / 20) * 32768
    return out


def frames(x: F) -> npt.NDArray[np.int16]:
    x = x[: x.size // FRAME * FRAME]
    return np.clip(np.round(x), -32768, 32767).astype(np.int16).reshape(-1, FRAME)


def run(
    render: F, capture: F, det: EchoDetector | None = None
) -> tuple[EchoDetector, list[AudioIssueChanged], list[bool]]:
    """Feed both streams tick by tick; return detector, changes, per-second confirmations."""
    det = det or EchoDetector()
    changes: list[AudioIssueChanged] = []
    confirmed: list[bool] = []
    for i, (r, c) in enumerate(zip(frames(render), frames(capture), strict=True)):
        det.push_render(r)
        changes.extend(det.push_capture(c))
        if (i + 1) % 50 == 0:
            confirmed.append(det.estimate.confirmed)
    return det, changes, confirmed


SECONDS = 5.0


@pytest.fixture(scope="module")
def far() -> F:
    return speech_like(SECONDS, 10, -20.0)


@pytest.mark.parametrize("delay_ms", [40.0, 100.0, 200.0, 300.0])
@pytest.mark.parametrize("erl_db", [10.0, 20.0, 30.0, 40.0])
def test_echo_detected_with_delay_and_erl(far: F, delay_ms: float, erl_db: float) -> None:
    capture = echo_of(far, delay_ms, erl_db) + noise(SECONDS, -70.0, 5)
    det, changes, confirmed = run(far, capture)
    est = det.estimate
    assert [(c.name, c.active) for c in changes] == [("echo", True)]
    assert confirmed[-1] and est.far_end_active
    assert est.delay_ms is not None and abs(est.delay_ms - delay_ms) <= 1.0
    assert est.erl_db is not None and abs(est.erl_db - erl_db) <= 2.0
    assert est.peak_ratio > 2.0
    assert est.likelihood > 0.5


def test_delay_between_sample_grid_points(far: F) -> None:
    """123.45 ms is not a whole number of 8 kHz (or 48 kHz) samples."""
    det, _, _ = run(far, echo_of(far, 123.45, 20.0) + noise(SECONDS, -70.0, 6))
    assert det.estimate.confirmed
    assert det.estimate.delay_ms is not None
    assert abs(det.estimate.delay_ms - 123.45) <= 0.25


@pytest.mark.parametrize("seed", range(8))
def test_no_echo_alarm_under_double_talk_without_echo(seed: int) -> None:
    far = speech_like(SECONDS, 200 + seed, -20.0)
    near = speech_like(SECONDS, 100 + seed, -26.0) + noise(SECONDS, -70.0, seed)
    det, changes, confirmed = run(far, near)
    assert changes == []
    assert not any(confirmed)
    assert det.estimate.far_end_active


@pytest.mark.parametrize("seed", range(3))
def test_echo_detected_under_double_talk(seed: int) -> None:
    far = speech_like(SECONDS, 200 + seed, -20.0)
    near = speech_like(SECONDS, 100 + seed, -26.0) + noise(SECONDS, -70.0, seed)
    det, changes, _ = run(far, near + echo_of(far, 100.0, 20.0))
    assert [(c.name, c.active) for c in changes] == [("echo", True)]
    assert det.estimate.delay_ms is not None and abs(det.estimate.delay_ms - 100.0) <= 1.0


def test_silent_far_end_is_not_judged(far: F) -> None:
    quiet = far * 10 ** (-40 / 20)  # active level -60 dBFS: below the -50 dBFS gate
    det, changes, confirmed = run(quiet, echo_of(quiet, 100.0, 10.0) + noise(SECONDS, -70.0, 1))
    assert changes == [] and not any(confirmed)
    assert not det.estimate.far_end_active
    assert det.estimate.likelihood == 0.0


def test_echo_clears_after_it_stops(far: F) -> None:
    det, changes, _ = run(far, echo_of(far, 100.0, 20.0) + noise(SECONDS, -70.0, 2))
    assert [(c.name, c.active) for c in changes] == [("echo", True)]
    later = speech_like(8.0, 11, -20.0)
    _, changes, confirmed = run(later, noise(8.0, -70.0, 3), det)
    assert [(c.name, c.active) for c in changes] == [("echo", False)]
    assert not det.echo_active
    assert not any(confirmed[2:])
