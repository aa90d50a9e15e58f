"""AEC3 round trip: synthetic echo, cancel, then the detector finds no residual echo."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edgeagent.audio.aec import EchoCanceller, EchoCancellerConfig
from edgeagent.audio.checks import level_dbfs
from edgeagent.audio.echo import EchoDetector
from edgeagent.audio.synth import speech_like

FS = 48000
FRAME = 960
F = npt.NDArray[np.float64]
SECONDS = 8.0


def echo_of(render: F, delay_ms: float, erl_db: float, seed: int = 1) -> F:
    """Saturated loudspeaker, direct path + decaying tail, delay, gain for the given ERL."""
    rng = np.random.default_rng(seed)
    h = np.zeros(int(0.08 * FS))
    h[0] = 1.0
    k = np.arange(96, h.size)
    tail = rng.standard_normal(k.size) * np.exp(-(k - 96) / (0.02 * FS))
    h[k] = tail * np.sqrt(0.5 / np.sum(tail**2))
    src = np.tanh(2.0 * render / 32768.0) / 2.0
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


@pytest.mark.parametrize(("delay_ms", "erl_db"), [(40.0, 10.0), (100.0, 20.0), (300.0, 20.0)])
def test_round_trip_echo_cancelled_and_no_residual_echo(delay_ms: float, erl_db: float) -> None:
    far = speech_like(SECONDS, 10, -20.0)
    capture = echo_of(far, delay_ms, erl_db) + noise(SECONDS, -70.0, 3)
    aec = EchoCanceller()
    before, after = EchoDetector("capture"), EchoDetector("capture_aec")
    after_changes = []
    after_confirmed = []
    for i, (r, c) in enumerate(zip(frames(far), frames(capture), strict=True)):
        aec.process_render(r)
        out = aec.process_capture(c)
        assert out.dtype == np.int16 and out.shape == (FRAME,)
        before.push_render(r)
        before.push_capture(c)
        after.push_render(r)
        after_changes.extend(after.push_capture(out))
        if (i + 1) % 50 == 0:
            after_confirmed.append(after.estimate.confirmed)
    # the same echo is plainly there before the canceller ...
    assert before.echo_active
    assert before.estimate.delay_ms == pytest.approx(delay_ms, abs=1.0)
    # ... and gone after it
    assert after_changes == []
    assert not any(after_confirmed)
    erle = aec.erle_db
    assert erle is not None and erle >= 15.0
    assert aec.render_missing == 0 and aec.render_dropped == 0


def test_near_end_passes_when_far_end_is_silent() -> None:
    near = speech_like(3.0, 4, -26.0)
    aec = EchoCanceller(EchoCancellerConfig(stream_delay_ms=40))
    assert aec.stream_delay_ms == 40
    aec.stream_delay_ms = 60
    assert aec.stream_delay_ms == 60
    silence = np.zeros(FRAME, np.int16)
    e_in = e_out = 0.0
    for i, c in enumerate(frames(near)):
        aec.process_render(silence)
        out = aec.process_capture(c)
        if i >= 50:  # skip the high-pass filter's start
            e_in += float(np.dot(c.astype(np.float64), c))
            e_out += float(np.dot(out.astype(np.float64), out))
    assert level_dbfs(e_out / e_in * 1e6) == pytest.approx(level_dbfs(1e6), abs=1.0)
    assert aec.erle_db is None  # far end never active


def test_render_queue_pairs_missing_and_drops_overflow() -> None:
    aec = EchoCanceller(EchoCancellerConfig(max_render_queue=3))
    frame = np.full(FRAME, 100, np.int16)
    aec.process_capture(frame)
    assert aec.render_missing == 1
    for _ in range(5):
        aec.process_render(frame)
    assert aec.render_dropped == 2
    for _ in range(3):
        aec.process_capture(frame)
    assert aec.render_missing == 1
    aec.process_capture(frame)
    assert aec.render_missing == 2
