"""libopus's decoder through ctypes: packet-loss concealment and FEC, which PyAV cannot reach.

PyAV takes an empty packet for the end of the stream (tests/test_aiortc_pin.py), so
through it a lost frame can only be covered after decoding, by the playout buffer's
fade. libopus itself synthesises a lost frame from the decoder's state (PLC: pitch
and spectral envelope carried on) and, when the next packet carries in-band FEC
(LBRR), decodes a low-bitrate copy of the lost frame from it. Both need the decoder
to be told which frames are missing, in order, before the packet that follows them.

`PlcDecoder` does that from the RTP timestamps of the packets handed to it in arrival
order (`ArrivalOrderBuffer`): a gap of up to `max_gap_ms` is filled with PLC frames,
the last of them recovered from the arriving packet's FEC (libopus runs PLC instead
when that packet has none). A longer gap (an outage, a sender that paused) is left
to the playout buffer, which fades and then plays silence; it would be no use to
extrapolate speech over it.

The library is the system's (`libopus0` on Debian and Raspberry Pi OS), found with
`ctypes.util.find_library`. Without it `load()` returns None and calls decode through
PyAV with the playout buffer's fade, as before: the agent logs that once and goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
_MAX_FRAME = 5760  # 120 ms at 48 kHz: the longest an Opus packet decodes to
_OPUS_OK = 0


class OpusDecodeError(Exception):
    """libopus refused a packet (corrupt, or not Opus); the decoder's state is kept."""


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    """Decoded mono 48 kHz samples and their RTP timestamp; what `PlcDecoder` delivers.

    `kind` says where they came from: "packet", "plc" (synthesised for a lost
    packet) or "fec" (recovered from the next packet's in-band FEC).
    """

    samples: np.ndarray
    timestamp: int
    kind: str = "packet"


@functools.cache
def load() -> Any | None:
    """The system libopus with the decoder calls typed, or None when it is not installed."""
    name = ctypes.util.find_library("opus")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        logger.warning("opus: cannot load %s: %s", name, exc)
        return None
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    lib.opus_decoder_create.argtypes = [i32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_create.restype = vp
    lib.opus_decoder_destroy.argtypes = [vp]
    lib.opus_decoder_destroy.restype = None
    lib.opus_decode.argtypes = [vp, ctypes.c_char_p, i32, vp, ctypes.c_int, ctypes.c_int]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, i32, i32]
    lib.opus_packet_get_nb_samples.restype = ctypes.c_int
    lib.opus_strerror.argtypes = [ctypes.c_int]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_get_version_string.restype = ctypes.c_char_p
    return lib


def version() -> str | None:
    """libopus's version string ("libopus 1.3.1"), or None without the library."""
    lib = load()
    return None if lib is None else str(lib.opus_get_version_string().decode())


class PlcDecoder:
    """Mono 48 kHz Opus decoder that conceals lost packets (PLC) and recovers them (FEC).

    `decode` takes what aiortc's jitter buffer hands a decoder (`.data`, `.timestamp`)
    and returns the `DecodedAudio` to play, in timestamp order: concealed frames for
    any gap first, then the packet's own samples. Not thread-safe; one per stream.

    `fec_frames` counts frames decoded with libopus's FEC flag: recovered from the
    next packet's LBRR when it carried one (libopus 1.3 cannot say whether it did),
    PLC otherwise. With `fec=False` every lost frame is PLC.
    """

    def __init__(self, max_gap_ms: float = 100.0, *, fec: bool = True) -> None:
        lib = load()
        if lib is None:
            raise RuntimeError("libopus is not installed")
        self._lib = lib
        err = ctypes.c_int()
        state = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(err))
        if err.value != _OPUS_OK or not state:
            raise RuntimeError(f"opus_decoder_create: {self._error(err.value)}")
        self._state: ctypes.c_void_p | None = ctypes.c_void_p(state)
        self._pcm = np.zeros(_MAX_FRAME, dtype=np.int16)
        self._pcm_ptr = self._pcm.ctypes.data
        self.max_gap = int(max_gap_ms * SAMPLE_RATE / 1000)
        # Decode the last lost frame from the next packet's FEC; off for a sender known
        # to send none (libopus would run PLC anyway, but the count would mislead).
        self.fec = fec
        self._expected: int | None = None  # RTP timestamp the next packet should have
        self.packets = 0
        self.plc_frames = 0
        self.fec_frames = 0
        self.long_gaps = 0  # gaps over max_gap, left to the playout buffer

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and state.value:
            self._lib.opus_decoder_destroy(state)
            self._state = None

    def _error(self, code: int) -> str:
        return str(self._lib.opus_strerror(code).decode())

    def _run(self, data: bytes | None, samples: int, fec: bool) -> np.ndarray:
        if self._state is None:
            raise OpusDecodeError("decoder closed")
        n = self._lib.opus_decode(
            self._state, data, len(data) if data else 0, self._pcm_ptr, samples, int(fec)
        )
        if n < 0:
            raise OpusDecodeError(self._error(n))
        return self._pcm[:n].copy()

    def _conceal(self, start: int, gap: int, packet: bytes, duration: int) -> list[DecodedAudio]:
        """PLC for `gap` samples from `start`; the last `duration` of them from FEC."""
        out: list[DecodedAudio] = []
        use_fec = self.fec and gap >= duration
        plc = gap - duration if use_fec else gap
        ts = start
        while plc > 0:
            # PLC sizes are multiples of 2.5 ms; one 20 ms frame at a time.
            size = min(FRAME_SAMPLES, plc - plc % 120) or 120
            out.append(DecodedAudio(self._run(None, size, False), ts, "plc"))
            self.plc_frames += 1
            ts = (ts + size) & 0xFFFFFFFF
            plc -= size
        if use_fec:
            # Decodes the packet's LBRR copy of the frame before it; PLC if it has none.
            out.append(DecodedAudio(self._run(packet, duration, True), ts, "fec"))
            self.fec_frames += 1
        return out

    def decode(self, encoded_frame: Any) -> list[DecodedAudio]:
        data: bytes = bytes(encoded_frame.data)
        ts = int(encoded_frame.timestamp) & 0xFFFFFFFF
        duration = self._lib.opus_packet_get_nb_samples(data, len(data), SAMPLE_RATE)
        if duration <= 0:
            raise OpusDecodeError(self._error(duration) if duration < 0 else "packet of no samples")
        out: list[DecodedAudio] = []
        if self._expected is not None:
            gap = (ts - self._expected) & 0xFFFFFFFF
            if 0 < gap <= self.max_gap:
                out = self._conceal(self._expected, gap, data, duration)
            elif 0 < gap < 0x80000000:
                self.long_gaps += 1
        out.append(DecodedAudio(self._run(data, _MAX_FRAME, False), ts))
        self.packets += 1
        self._expected = (ts + duration) & 0xFFFFFFFF
        return out
