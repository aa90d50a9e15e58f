"""A fast-paced aiortc audio track that sends a known signal (for the fast-path call tests)."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
from aiortc import MediaStreamTrack

RATE = 48000


class PacedSignal(MediaStreamTrack):
    """Sends `signal` in 20 ms mono frames every 5 ms, then silence."""

    kind = "audio"

    def __init__(self, signal: np.ndarray) -> None:
        super().__init__()
        self._signal, self._k = signal, 0

    async def recv(self) -> av.AudioFrame:
        await asyncio.sleep(0.005)
        block = self._signal[self._k : self._k + 960]
        if block.size < 960:
            block = np.zeros(960, np.int16)
        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), "s16", "mono")
        frame.sample_rate, frame.pts = RATE, self._k
        frame.time_base = fractions.Fraction(1, RATE)
        self._k += 960
        return frame
