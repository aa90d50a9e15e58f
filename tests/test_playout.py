"""The playout buffer: target depth, drift correction, concealment, hard bound."""

from __future__ import annotations

import numpy as np
import pytest

from edgeagent.audio.playout import PlayoutBuffer, PlayoutSettings

FS = 960


def tone(index: int, freq: float = 440.0, amp: float = 10000.0) -> np.ndarray:
    t = np.arange(index * FS, (index + 1) * FS)
    return (amp * np.sin(2 * np.pi * freq * t / 48000)).astype(np.int16)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_prefills_to_target_then_holds_it_under_steady_push_pull() -> None:
    buf = PlayoutBuffer(PlayoutSettings(target_ms=60))
    out = []
    for i in range(200):
        buf.push(tone(i), ts=i * FS)
        out.append(buf.pull())
        if i > 5:
            assert 40.0 <= buf.depth_ms <= 60.0
    st = buf.stats()
    assert st.silent_frames == 2  # 0 ms and 20 ms buffered: not yet at the 60 ms target
    assert st.concealed_frames == 0
    assert st.underruns == 0
    assert st.overruns == 0
    assert st.compressed_frames == 0
    assert st.stretched_frames == 0
    # The played audio is the pushed audio, delayed by the target depth.
    played = np.concatenate(out[2:])
    sent = np.concatenate([tone(i) for i in range(len(out) - 2)])
    assert np.array_equal(played, sent)


@pytest.mark.parametrize("sender_speed", [1.01, 0.99])
def test_sender_clock_drift_is_corrected_for_60_seconds(sender_speed: float) -> None:
    settings = PlayoutSettings(target_ms=60, max_ms=200)
    buf = PlayoutBuffer(settings)
    period = 0.020
    sender_period = period / sender_speed
    next_push, pushed, depths = 0.0, 0, []
    for pull_index in range(3000):  # 60 s of playback periods
        now = pull_index * period
        while next_push <= now:
            buf.push(tone(pushed), ts=pushed * FS)
            pushed += 1
            next_push += sender_period
        buf.pull()
        depths.append(buf.depth_ms)
    st = buf.stats()
    late = depths[500:]  # after the first 10 s the controller has settled
    assert max(late) <= settings.target_ms + settings.tolerance_ms + 20
    assert min(late) >= settings.target_ms - settings.tolerance_ms - 40
    assert st.overruns == 0
    assert st.max_depth_ms <= settings.max_ms
    if sender_speed > 1:
        # 1 % fast = ~30 surplus frames in 60 s; each correction removes 2 % of a frame.
        assert st.compressed_frames >= 1000
        assert st.underruns == 0
    else:
        assert st.stretched_frames >= 1000
        assert st.underruns <= 1


def play_with_losses(buf: PlayoutBuffer, lost: range, frames: int) -> list[np.ndarray]:
    """Push-then-pull each period; out[k] is what played in frame k's slot."""
    for i in range(2):
        buf.push(tone(i), ts=i * FS)
    outs = []
    for i in range(2, frames + 2):
        if i not in lost:
            buf.push(tone(i), ts=i * FS)
        outs.append(buf.pull())
    return outs


def test_lost_frames_are_concealed_with_a_fade() -> None:
    buf = PlayoutBuffer(PlayoutSettings(target_ms=60, fade_frames=3))
    outs = play_with_losses(buf, range(10, 12), 30)
    st = buf.stats()
    assert st.concealed_frames == 2
    assert st.underruns == 0
    full = rms(tone(0))
    assert full * 0.95 > rms(outs[10]) > rms(outs[11]) > 0.0
    assert np.array_equal(outs[9], tone(9))
    assert np.array_equal(outs[12], tone(12))  # real audio resumes after the gap


def test_burst_longer_than_the_buffer_fades_to_silence_and_recovers() -> None:
    buf = PlayoutBuffer(PlayoutSettings(target_ms=60, fade_frames=3))
    outs = play_with_losses(buf, range(10, 20), 40)
    st = buf.stats()
    assert st.concealed_frames >= 4
    assert st.underruns == 1
    assert st.rebuffers == 1
    levels = [rms(o) for o in outs[10:16]]
    assert levels[0] > levels[1] > levels[2] > 0.0
    assert levels[3] == levels[4] == 0.0
    # After the burst the stream plays again at the target depth.
    assert rms(outs[-1]) == pytest.approx(rms(tone(0)), rel=0.05)
    assert buf.depth_ms == pytest.approx(40.0)


def test_overflow_drops_oldest_and_counts_overrun() -> None:
    settings = PlayoutSettings(target_ms=60, max_ms=200)
    buf = PlayoutBuffer(settings)
    for i in range(25):  # 500 ms pushed, nothing played
        buf.push(tone(i), ts=i * FS)
        assert buf.depth_ms <= settings.max_ms
    st = buf.stats()
    assert st.overruns == 15
    assert st.dropped_samples == 15 * FS
    assert st.max_depth_ms == pytest.approx(200.0)
    # The newest 200 ms survived; playing starts at the 60 ms target: frame 22.
    assert np.array_equal(buf.pull(), tone(22))
    assert buf.depth_ms == pytest.approx(40.0)


def test_underrun_fades_then_rebuffers_to_target() -> None:
    buf = PlayoutBuffer(PlayoutSettings(target_ms=40, fade_frames=2))
    for i in range(2):
        buf.push(tone(i), ts=i * FS)
    assert np.array_equal(buf.pull(), tone(0))
    assert np.array_equal(buf.pull(), tone(1))
    faded = [buf.pull() for _ in range(3)]
    assert rms(faded[0]) > rms(faded[1]) > 0.0
    assert rms(faded[2]) == 0.0
    st = buf.stats()
    assert st.underruns == 1
    assert st.rebuffers == 1
    assert not buf.playing
    # A sender that resumes far later restarts cleanly at the target depth.
    buf.push(tone(100), ts=100 * FS)
    assert rms(buf.pull()) == 0.0
    buf.push(tone(101), ts=101 * FS)
    assert np.array_equal(buf.pull(), tone(100))


def test_late_and_duplicate_frames_are_dropped() -> None:
    buf = PlayoutBuffer(PlayoutSettings(target_ms=40))
    buf.push(tone(0), ts=0)
    buf.push(tone(1), ts=FS)
    buf.pull()
    buf.pull()
    buf.push(tone(0), ts=0)  # already played
    assert buf.stats().late_frames == 1
    buf.push(tone(2), ts=2 * FS)
    buf.push(tone(2), ts=2 * FS)  # duplicate overwrites in place
    assert buf.depth_ms == pytest.approx(20.0)


def test_reordered_frames_play_in_timestamp_order() -> None:
    buf = PlayoutBuffer(PlayoutSettings(target_ms=60))
    for i in (0, 2, 1):
        buf.push(tone(i), ts=i * FS)
    assert [np.array_equal(buf.pull(), tone(i)) for i in range(3)] == [True] * 3


def test_hard_bound_holds_under_random_bursts_and_gaps() -> None:
    settings = PlayoutSettings(target_ms=60, max_ms=200)
    buf = PlayoutBuffer(settings)
    rng = np.random.default_rng(7)
    seq = 0
    for _ in range(3000):
        for _ in range(int(rng.choice([0, 1, 1, 1, 2, 5]))):
            if rng.random() > 0.05:
                buf.push(tone(seq), ts=seq * FS)
            seq += 1
        buf.pull()
        assert buf.depth_ms <= settings.max_ms
    assert buf.stats().max_depth_ms <= settings.max_ms


def test_settings_reject_a_target_beyond_the_bound() -> None:
    with pytest.raises(ValueError, match="max_ms"):
        PlayoutSettings(target_ms=80, max_ms=100)


def steady_tone(freq: float, frames: int, amp: float = 10000.0) -> np.ndarray:
    """`frames` 20 ms frames of one phase-continuous tone, shape (frames, FS)."""
    t = np.arange(frames * FS)
    return (amp * np.sin(2 * np.pi * freq * t / 48000)).astype(np.int16).reshape(frames, FS)


def window_pitches(x: np.ndarray, window: int = 4800) -> list[float]:
    """The FFT peak of each 100 ms of `x`, to 0.6 Hz (zero-padded)."""
    pad = 16 * window
    peaks = []
    for k in range(x.size // window):
        w = x[k * window : (k + 1) * window].astype(np.float64) * np.hanning(window)
        peaks.append(float(np.argmax(np.abs(np.fft.rfft(w, pad)))) * 48000 / pad)
    return peaks


def assert_caught_up_in_tune(
    buf: PlayoutBuffer, outs: list[np.ndarray], source: np.ndarray
) -> None:
    settings = buf.settings
    played = np.concatenate(outs)
    # Gentle corrections resample a frame by `stretch_fraction` at most; catching up
    # must not resample faster (8 % did: a 700 Hz tone played at 755 Hz for seconds).
    for pitch in window_pitches(played[4800:]):
        assert abs(pitch - 700) <= 700 * settings.stretch_fraction + 1.0, window_pitches(played)
    # Pieces are cut or repeated in phase: no step larger than the tone's own.
    assert (
        np.abs(np.diff(played[4800:].astype(np.int32))).max()
        <= 1.05 * np.abs(np.diff(source.reshape(-1).astype(np.int32))).max()
    )
    st = buf.stats()
    assert st.underruns == st.overruns == st.concealed_frames == 0
    assert abs(buf.depth_ms + 20 - settings.target_ms) <= settings.tolerance_ms


def test_a_burst_after_a_stall_is_cut_back_to_target_in_whole_pitch_periods() -> None:
    """The playback stalls for 180 ms (a starved CPU: the paced twin skips the periods
    it missed) while the frames keep arriving: the surplus goes within a second."""
    buf = PlayoutBuffer(PlayoutSettings(target_ms=60, max_ms=300))
    source = steady_tone(700, 150)
    outs, depths = [], []
    for period in range(150):
        buf.push(source[period], ts=period * FS)
        if not 11 <= period < 20:
            outs.append(buf.pull())
            depths.append(buf.depth_ms)
    assert max(depths) >= 200  # far off target: 180 ms too much
    assert_caught_up_in_tune(buf, outs, source)
    assert max(depths[11 + 50 :]) <= 60 + 15  # back within tolerance in a second
    assert buf.stats().compressed_frames <= 50


def test_a_sender_that_falls_behind_is_refilled_in_whole_pitch_periods() -> None:
    """The sender pauses 100 ms and goes on where it was: the buffer drains to one
    frame and is refilled by repeating pitch periods, not by playing slower."""
    buf = PlayoutBuffer(PlayoutSettings(target_ms=120, max_ms=300))
    source = steady_tone(700, 250)
    outs, seq, depths = [], 0, []
    for period in range(250):
        if not 20 <= period < 25:
            buf.push(source[seq], ts=seq * FS)
            seq += 1
        outs.append(buf.pull())
        depths.append(buf.depth_ms)
    assert min(depths) == 0.0
    assert buf.stats().stretched_frames <= 50
    assert_caught_up_in_tune(buf, outs, source[:seq])
