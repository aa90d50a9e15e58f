"""bench/latency.py's output as bench/perf.py reads it, and the delay method on known delays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from latency_support import delay_windows, matched

from edgeagent.audio.synth import speech_like

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import latency  # noqa: E402


def test_perf_reads_the_clean_median_and_nothing_else() -> None:
    out = "\n".join(
        [
            "clean: median 61.0 ms over 3 calls, matched windows 60.7-73.6 ms",
            "15 % loss, aiortc jitter buf: no window matched (0/24 windows matched; ...)",
            latency.summary_line([73.6, 60.7, 66.0]),
            "(95 s)",
        ]
    )
    assert latency.parse_median(out) == 66.0
    assert latency.parse_median("aiortc peers only (test harness), median of 3: 51.6 ms") is None
    assert latency.parse_median("15 % loss, ours: median 76.7 ms over 3 calls") is None


def test_delay_windows_find_a_known_delay_and_see_it_move() -> None:
    """Input sample i comes out at i + (delay - (T_out - T_in)) * rate: 70 ms for the first
    4 s, then 20 ms of stall and 90 ms; the playback device started 50 ms after capture."""
    rate = 48000
    sent = np.rint(speech_like(8.0, 5, level_dbfs=-20.0)).astype(np.int16)
    half = 4 * rate
    played = np.zeros(sent.size + rate, dtype=np.int16)
    played[960 : half + 960] = sent[:half]  # (70 - 50) ms = 960 samples
    played[half + 1920 : sent.size + 1920] = sent[half:]  # (90 - 50) ms
    windows = delay_windows(sent, played, t_in=10.0, t_out=10.05)
    found = matched(windows)
    assert len(found) == len(windows) >= 7  # pauses in the synth may leave one out
    assert {round(w.delay_ms, 1) for w in found if w.at_s < 4} == {70.0}
    assert {round(w.delay_ms, 1) for w in found if w.at_s >= 4} == {90.0}
    # A window the far end never played is not matched.
    assert not matched(delay_windows(sent, np.zeros_like(played), t_in=10.0, t_out=10.05))
