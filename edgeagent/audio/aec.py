"""Acoustic echo cancellation: a thin wrapper around libwebrtc's AEC3 (PyPI pywebrtc-audio).

The library processes near (capture) and far (render) audio together, in 10 ms
chunks internally; here render frames are queued as they are played and paired
with the next capture frame. Call `process_render()` for each frame handed to
the loudspeaker and `process_capture()` for each microphone frame, in the order
they happen. A capture frame with no render queued is paired with silence; a
render queue longer than `max_render_queue` frames drops its oldest frame (both
are counted). The residual fixed offset is what `stream_delay_ms` and AEC3's
own delay estimator absorb.

ERLE (echo return loss enhancement) is 10 log10(capture power / output power)
summed over the frames of the last `erle_window_s` in which the far end was
active; double talk lowers it, as it does in libwebrtc's own statistics.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pywebrtc_audio

from edgeagent.audio.checks import FULL_SCALE, Int16Frame

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EchoCancellerConfig:
    sample_rate: int = 48000
    frame_samples: int = 960
    stream_delay_ms: int = 0
    noise_suppression: bool = False
    ns_level: int = 1
    high_pass_filter: bool = True
    max_render_queue: int = 10
    far_end_active_dbfs: float = -50.0
    erle_window_s: int = 2
    erle_min_active_s: float = 0.5


class EchoCanceller:
    """AEC3 on a 48 kHz mono int16 stream, with an ERLE estimate."""

    def __init__(self, config: EchoCancellerConfig | None = None) -> None:
        cfg = config or EchoCancellerConfig()
        self._cfg = cfg
        self._ap = pywebrtc_audio.AudioProcessor(
            sample_rate=cfg.sample_rate,
            num_channels=1,
            echo_cancellation=True,
            noise_suppression=cfg.noise_suppression,
            high_pass_filter=cfg.high_pass_filter,
            ns_level=cfg.ns_level,
            stream_delay_ms=cfg.stream_delay_ms,
        )
        self._queue: deque[Int16Frame] = deque()
        self._silence = np.zeros(cfg.frame_samples, dtype=np.int16)
        self._xf = np.empty(cfg.frame_samples, dtype=np.float32)
        n = cfg.frame_samples
        self._far_thr = n * (FULL_SCALE**2) * 10.0 ** (cfg.far_end_active_dbfs / 10.0)
        self._frames_per_s = max(1, round(cfg.sample_rate / n))
        self._min_active = cfg.erle_min_active_s * self._frames_per_s
        # per-second blocks of (capture energy, output energy, active frames) while far end active
        self._blocks: deque[tuple[float, float, int]] = deque(maxlen=max(1, cfg.erle_window_s))
        self._in = 0.0
        self._out = 0.0
        self._active = 0
        self._frame_in_block = 0
        self.render_dropped = 0
        self.render_missing = 0

    @property
    def stream_delay_ms(self) -> int:
        """Delay hint: render written to the device until its echo reaches the capture."""
        return int(self._ap.stream_delay_ms)

    @stream_delay_ms.setter
    def stream_delay_ms(self, value: int) -> None:
        self._ap.stream_delay_ms = int(value)

    def process_render(self, frame: Int16Frame) -> None:
        """Queue one frame that goes to the loudspeaker (copied)."""
        self._queue.append(frame.copy())
        if len(self._queue) > self._cfg.max_render_queue:
            self._queue.popleft()
            self.render_dropped += 1
            if self.render_dropped == 1:
                logger.warning("aec: render queue overflow, dropping oldest render frames")

    def process_capture(self, frame: Int16Frame) -> Int16Frame:
        """Cancel echo in one microphone frame; returns the cleaned frame."""
        if self._queue:
            far = self._queue.popleft()
        else:
            far = self._silence
            self.render_missing += 1
        out: Int16Frame = self._ap.process(frame, far)
        x = self._xf
        np.copyto(x, far, casting="unsafe")
        if float(np.dot(x, x)) >= self._far_thr:
            np.copyto(x, frame, casting="unsafe")
            self._in += float(np.dot(x, x))
            np.copyto(x, out, casting="unsafe")
            self._out += float(np.dot(x, x))
            self._active += 1
        self._frame_in_block += 1
        if self._frame_in_block >= self._frames_per_s:
            self._blocks.append((self._in, self._out, self._active))
            self._in = self._out = 0.0
            self._active = self._frame_in_block = 0
        return out

    @property
    def erle_db(self) -> float | None:
        """ERLE over the last window of far-end activity; None without enough of it."""
        e_in = sum(b[0] for b in self._blocks)
        e_out = sum(b[1] for b in self._blocks)
        active = sum(b[2] for b in self._blocks)
        if active < self._min_active or e_in <= 0.0:
            return None
        return 10.0 * math.log10(e_in / max(e_out, 1e-9))

    def reset(self) -> None:
        """Forget the adaptive filter and queued render (e.g. between calls)."""
        self._ap.reset()
        self._queue.clear()
        self._blocks.clear()
        self._in = self._out = 0.0
        self._active = self._frame_in_block = 0
