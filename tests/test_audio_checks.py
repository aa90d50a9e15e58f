"""Per-frame audio checks on synthetic signals with known levels."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edgeagent.audio.checks import (
    LEVEL_FLOOR_DBFS,
    AudioIssueChanged,
    FrameAnalyzer,
    Hysteresis,
    audio_object,
    clipped_samples,
)

FS = 48000
FRAME = 960
FPS = FS // FRAME


def tone(seconds: float, dbfs: float, freq: float = 440.0) -> npt.NDArray[np.float64]:
    t = np.arange(int(seconds * FS)) / FS
    return np.sqrt(2.0) * 10 ** (dbfs / 20) * 32768 * np.sin(2 * np.pi * freq * t)


def noise(seconds: float, dbfs: float, seed: int = 0) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(int(seconds * FS)) * 10 ** (dbfs / 20) * 32768


def bursts(seconds: float, dbfs: float, seed: int = 1) -> npt.NDArray[np.float64]:
    """Noise bursts of 250 ms, on about half the time: a crude talker with pauses."""
    rng = np.random.default_rng(seed)
    n_syl = int(seconds * 4)
    on = np.repeat(rng.random(n_syl) < 0.5, FS // 4).astype(float)
    return noise(seconds, dbfs, seed + 7)[: on.size] * on


def frames(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    x = x[: x.size // FRAME * FRAME]
    return np.clip(np.round(x), -32768, 32767).astype(np.int16).reshape(-1, FRAME)


def feed(fa: FrameAnalyzer, x: npt.NDArray[np.float64]) -> list[tuple[int, AudioIssueChanged]]:
    """Analyse every frame; return (frame index, change) for every issue change."""
    out = []
    for i, f in enumerate(frames(x)):
        out.extend((i, c) for c in fa.analyze(f).changes)
    return out


def named(changes: list[tuple[int, AudioIssueChanged]], name: str) -> list[tuple[int, bool]]:
    return [(i, c.active) for i, c in changes if c.name == name]


def test_level_peak_and_dc_of_one_frame() -> None:
    fa = FrameAnalyzer("capture")
    st = fa.analyze(frames(tone(0.02, -20.0, 1000.0))[0])
    assert st.level_dbfs == pytest.approx(-20.0, abs=0.05)
    assert st.peak == pytest.approx(32768 * 10 ** (-20 / 20) * np.sqrt(2), rel=0.01)
    assert st.clipped_samples == 0
    assert not st.is_digital_silence
    assert st.dc_offset == pytest.approx(0.0, abs=1e-3)
    st = fa.analyze(frames(tone(0.02, -30.0, 1000.0) + 0.1 * 32768)[0])
    assert st.dc_offset == pytest.approx(0.1, abs=1e-3)


def test_digital_silence_raises_no_audio_after_four_seconds_and_clears() -> None:
    fa = FrameAnalyzer("capture")
    x = np.concatenate([noise(1.0, -40), np.zeros(5 * FS), noise(2.0, -40)])
    changes = feed(fa, x)
    st = fa.analyze(np.zeros(FRAME, np.int16))
    assert st.is_digital_silence
    assert st.level_dbfs == LEVEL_FLOOR_DBFS
    # silence starts at frame 50: raised exactly 4 s later, cleared 0.5 s after audio is back
    assert named(changes, "no_audio") == [(50 + 4 * FPS - 1, True), (300 + FPS // 2 - 1, False)]
    assert named(changes, "dead_input") == []


def test_dead_input_at_minus_80_dbfs() -> None:
    fa = FrameAnalyzer("capture")
    changes = feed(fa, noise(5.0, -80))
    assert named(changes, "dead_input") == [(4 * FPS - 1, True)]
    assert "dead_input" in fa.active_issues()
    assert named(changes, "no_audio") == []


def test_stuck_input_constant_level_over_ten_seconds() -> None:
    fa = FrameAnalyzer("capture")
    changes = feed(fa, tone(11.0, -30.0, 1000.0))
    assert named(changes, "dead_input") == [(10 * FPS - 1, True)]


def test_speech_like_input_is_neither_dead_nor_stuck() -> None:
    fa = FrameAnalyzer("capture")
    changes = feed(fa, bursts(12.0, -26.0) + noise(12.0, -65.0, 3))
    assert changes == []


def test_clipped_samples_counts_only_runs_of_three_at_either_rail() -> None:
    f = np.zeros(20, np.int16)
    f[2:4] = 32767  # run of 2: not clipping
    f[6:9] = 32767  # run of 3
    f[12:16] = -32768  # run of 4 at the negative rail
    assert clipped_samples(f) == 7
    assert clipped_samples(np.zeros(20, np.int16)) == 0


def test_overdriven_tone_raises_clipping_clean_tone_does_not() -> None:
    fa = FrameAnalyzer("capture")
    changes = feed(fa, tone(3.0, 0.0, 300.0) * 10.0)  # +20 dB overdrive
    assert named(changes, "clipping") == [(FPS - 1, True)]
    assert fa.snapshot().clipping_pct > 10.0
    clean = FrameAnalyzer("capture")
    assert named(feed(clean, tone(3.0, -6.0, 300.0)), "clipping") == []
    assert clean.snapshot().clipping_pct == 0.0


@pytest.mark.parametrize(("floor_dbfs", "noisy"), [(-65.0, False), (-50.0, None), (-40.0, True)])
def test_noise_floor_at_set_levels_under_intermittent_speech(
    floor_dbfs: float, noisy: bool | None
) -> None:
    fa = FrameAnalyzer("capture")
    changes = feed(fa, noise(9.0, floor_dbfs, 5) + bursts(9.0, -20.0))
    nf = fa.noise_floor_dbfs
    assert nf is not None
    assert nf == pytest.approx(floor_dbfs, abs=2.0)
    if noisy is not None:  # -50 dBFS sits on the threshold: either outcome is right
        expected = [(3 * FPS - 1, True)] if noisy else []
        assert named(changes, "high_noise") == expected


def test_high_noise_does_not_flap_on_a_level_toggling_around_the_threshold() -> None:
    fa = FrameAnalyzer("capture")
    parts = [noise(2.0, -48.5 if k % 2 == 0 else -51.5, k) for k in range(15)]
    changes = feed(fa, np.concatenate(parts))
    assert len(named(changes, "high_noise")) <= 1


def test_clipping_toggling_every_second_raises_once_and_never_clears() -> None:
    fa = FrameAnalyzer("capture")
    hot, clean = tone(1.0, 0.0, 300.0) * 10.0, tone(1.0, -10.0, 300.0)
    changes = feed(fa, np.concatenate([hot, clean] * 6))
    assert named(changes, "clipping") == [(FPS - 1, True)]


def test_hysteresis_raises_and_clears_only_after_runs() -> None:
    h = Hysteresis(raise_after=3, clear_after=2)
    seq = [True, False] * 5 + [True] * 3 + [False, True] + [False] * 2
    flips = [i for i, bad in enumerate(seq) if h.update(bad)]
    assert flips == [12, 16]
    assert not h.active


def test_too_quiet_and_too_hot_speech() -> None:
    quiet = FrameAnalyzer("capture")
    q = named(feed(quiet, bursts(8.0, -46.0) + noise(8.0, -70.0, 2)), "too_quiet")
    assert [a for _, a in q] == [True]
    assert quiet.speech_level_dbfs == pytest.approx(-46.0, abs=1.5)
    hot = FrameAnalyzer("capture")
    h = named(feed(hot, bursts(8.0, -6.0) + noise(8.0, -70.0, 2)), "too_hot")
    assert [a for _, a in h] == [True]
    normal = FrameAnalyzer("capture")
    assert feed(normal, bursts(8.0, -26.0) + noise(8.0, -70.0, 2)) == []


def test_snapshot_feeds_the_quality_audio_object() -> None:
    cap = FrameAnalyzer("capture")
    play = FrameAnalyzer("playout")
    feed(cap, noise(6.0, -30.0))
    feed(play, tone(6.0, -20.0))
    snap = cap.snapshot()
    assert snap.level_dbfs == pytest.approx(-30.0, abs=0.2)
    obj = audio_object(
        snap, play.snapshot(), echo_likelihood=0.1, echo_delay_ms=None, underruns=2, overruns=0
    )
    assert obj["tx_level_dbfs"] == pytest.approx(-30.0, abs=0.2)
    assert obj["rx_level_dbfs"] == pytest.approx(-20.0, abs=0.2)
    assert obj["noise_floor_dbfs"] == pytest.approx(-30.0, abs=1.0)
    assert obj["clipping_pct"] == 0.0
    assert obj["underruns"] == 2
    assert "echo_delay_ms" not in obj
