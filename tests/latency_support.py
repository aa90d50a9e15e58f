"""One-way delay through a call: what went into a capture PCM against the far end's playback.

The bench PCMs are unclocked `file` PCMs paced to real time: the capture reads
period k at T_in + k * 20 ms and the far end's playback writes period k at
T_out + k * 20 ms, T_in and T_out being each device's `first_period_at`. So
input sample i enters at T_in + i / 48000 and output sample j leaves at
T_out + j / 48000; if the sound of input sample i is found at output sample
i + L (the lag of the cross-correlation peak), the one-way delay is

    (T_out - T_in) + L / 48000

It covers capture framing, the capture queue, AEC and the checks on the
sending side, Opus, SRTP, the network (loopback or the lossy relay), the
receive path, concealment and the playout buffer; not a real card's ADC/DAC
buffers. Each window of the source is matched on its own, so a delay that
grows during a call shows up, and drift correction (a few samples dropped or
repeated between windows) does not smear a single global peak.
Used by tests/test_call_quality_e2e.py and bench/latency.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from alsa_support import RATE, best_match, level_dbfs


@dataclass(frozen=True, slots=True)
class DelayWindow:
    """Where one window of the source was found in what the far end played."""

    at_s: float  # start of the window in the source
    delay_ms: float  # one-way delay of that window
    rho: float  # normalised correlation at the match (1.0: identical waveform)


def delay_windows(
    sent: np.ndarray,
    played: np.ndarray,
    *,
    t_in: float,
    t_out: float,
    window_s: float = 1.0,
    min_level_dbfs: float = -40.0,
) -> list[DelayWindow]:
    """The one-way delay of each audible `window_s` window of `sent` (see the module doc).

    `sent` is the capture PCM's input from its first sample, `played` the far
    end's playback output from its first sample; `t_in`, `t_out` their devices'
    `first_period_at` (seconds, the same monotonic clock).
    """
    n = round(window_s * RATE)
    out = []
    for k in range(sent.size // n):
        window = sent[k * n : (k + 1) * n]
        if level_dbfs(window) < min_level_dbfs:
            continue
        at, rho = best_match(played, window)
        lag = at - k * n
        delay_ms = (t_out - t_in) * 1000 + lag * 1000 / RATE
        out.append(DelayWindow(at_s=k * window_s, delay_ms=delay_ms, rho=rho))
    return out


def matched(windows: list[DelayWindow], min_rho: float = 0.5) -> list[DelayWindow]:
    """The windows found with confidence (a window mostly concealed may match elsewhere)."""
    return [w for w in windows if w.rho >= min_rho]
