"""Sample-format helpers for the media path: int16 frames, downmix, resample, stretch."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Samples = NDArray[np.int16]

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz


def to_int16(x: NDArray[np.floating] | NDArray[np.integer]) -> Samples:
    """Round and saturate to int16 (never wrap around)."""
    out: Samples = np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    return out


def downmix(samples: NDArray[np.int16], channels: int) -> Samples:
    """Interleaved (or (n, channels)) int16 to mono by averaging the channels."""
    if channels == 1:
        mono: Samples = samples.reshape(-1).astype(np.int16, copy=False)
        return mono
    if channels == 2 and samples.dtype == np.int16:
        # The decoder's stereo every 20 ms: floor((l + r) / 2) as a shift, the same
        # values as the general path below at a fifth of its cost.
        flat = samples.reshape(-1)
        pair = flat[0::2].astype(np.int32)
        pair += flat[1::2]
        pair >>= 1
        stereo_mix: Samples = pair.astype(np.int16)
        return stereo_mix
    frames = samples.reshape(-1, channels).astype(np.int32)
    mixed: Samples = (frames.sum(axis=1) // channels).astype(np.int16)
    return mixed


def resample_linear(samples: Samples, src_rate: int, dst_rate: int) -> Samples:
    """Linear-interpolation resample of a mono block (for non-48 kHz codecs; G.711 is 8 kHz).

    Each output sample sits at the centre of its own period on the input's time
    axis, so consecutive blocks join on the same grid. (`stretch` pins both ends
    instead: block by block that slows each 20 ms a little and jumps back at the
    edge, a 50 Hz buzz about 15 dB under a 1 kHz tone from 8 kHz.) Past the first
    and last input sample the edge sample is held.
    """
    n = samples.size
    if src_rate == dst_rate or n == 0:
        return samples
    out_len = round(n * dst_rate / src_rate)
    src = (np.arange(out_len) + 0.5) * (n / out_len) - 0.5
    return to_int16(np.interp(src, np.arange(n), samples.astype(np.float64)))


def stretch(samples: Samples, out_len: int) -> Samples:
    """Time-compress or stretch a mono block to `out_len` samples by interpolation.

    Used for drift correction: changing a 20 ms frame by 1-2 % this way shifts
    pitch imperceptibly and, unlike dropping or repeating samples, never clicks.
    """
    n = samples.size
    if n == out_len:
        return samples
    if n == 0:
        return np.zeros(out_len, dtype=np.int16)
    src = np.linspace(0.0, n - 1, out_len)
    return to_int16(np.interp(src, np.arange(n), samples.astype(np.float64)))
