"""libopus through ctypes: the decoder's packet-loss concealment and FEC, which PyAV cannot
reach, and an encoder whose loss hint and FEC change between frames without a reopen.

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

`PcmEncoder` encodes mono 48 kHz int16 frames straight from their buffer: no PyAV frame
conversion or filter graph per frame (at a call's 20 ms cadence a frame costs 370-540 µs
against 550-660 through PyAV here: `bench/instructions.py --time --paced-s`), and
`OPUS_SET_PACKET_LOSS_PERC` / `OPUS_SET_INBAND_FEC` act from the next frame, where PyAV
had to reopen the codec. Its settings are what FFmpeg's libopus wrapper set before
(VoIP, unconstrained VBR, the bitrate, complexity, loss hint and FEC).

The library is the system's (`libopus0` on Debian and Raspberry Pi OS), found with
`ctypes.util.find_library`. Without it `load()` returns None and calls decode and encode
through PyAV (the playout buffer's fade instead of PLC), as before: the agent logs that
once and goes on.
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
    lib.opus_encoder_create.argtypes = [
        i32,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.opus_encoder_create.restype = vp
    lib.opus_encoder_destroy.argtypes = [vp]
    lib.opus_encoder_destroy.restype = None
    lib.opus_encode.argtypes = [vp, vp, ctypes.c_int, vp, i32]
    lib.opus_encode.restype = i32
    # opus_encoder_ctl is variadic: its arguments are passed as c_int32 at each call.
    lib.opus_encoder_ctl.restype = ctypes.c_int
    return lib


def version() -> str | None:
    """libopus's version string ("libopus 1.3.1"), or None without the library."""
    lib = load()
    return None if lib is None else str(lib.opus_get_version_string().decode())


class _Handle:
    """A libopus encoder or decoder state, destroyed with its owner."""

    _destroy = ""  # the libopus function that frees the state
    _lib: Any
    _state: ctypes.c_void_p | None

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and state.value:
            getattr(self._lib, self._destroy)(state)
            self._state = None

    def _error(self, code: int) -> str:
        return str(self._lib.opus_strerror(code).decode())


class PlcDecoder(_Handle):
    """Mono 48 kHz Opus decoder that conceals lost packets (PLC) and recovers them (FEC).

    `decode` takes what aiortc's jitter buffer hands a decoder (`.data`, `.timestamp`)
    and returns the `DecodedAudio` to play, in timestamp order: concealed frames for
    any gap first, then the packet's own samples. Not thread-safe; one per stream.

    `fec_frames` counts frames decoded with libopus's FEC flag: recovered from the
    next packet's LBRR when it carried one (libopus 1.3 cannot say whether it did),
    PLC otherwise. With `fec=False` every lost frame is PLC.
    """

    _destroy = "opus_decoder_destroy"

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


APPLICATION_VOIP = 2048
SET_BITRATE = 4002
SET_VBR = 4006
SET_COMPLEXITY = 4010
SET_INBAND_FEC = 4012
SET_PACKET_LOSS_PERC = 4014
SET_VBR_CONSTRAINT = 4020
_MAX_PACKET = 1500  # bytes; a 20 ms mono frame at 510 kbit/s is 1275


class OpusEncodeError(Exception):
    """libopus refused a frame or a setting."""


class PcmEncoder(_Handle):
    """Mono 48 kHz Opus encoder for 20 ms int16 frames; settings can change between frames.

    `encode(samples)` returns one packet per frame. `set(request, value)` applies an
    `opus_encoder_ctl` setter (the `SET_*` constants) to the next frame. Not thread-safe.
    """

    _destroy = "opus_encoder_destroy"

    def __init__(self, *, bitrate_bps: int, complexity: int, fec: bool, loss_percent: int) -> None:
        lib = load()
        if lib is None:
            raise RuntimeError("libopus is not installed")
        self._lib = lib
        err = ctypes.c_int()
        state = lib.opus_encoder_create(SAMPLE_RATE, 1, APPLICATION_VOIP, ctypes.byref(err))
        if err.value != _OPUS_OK or not state:
            raise RuntimeError(f"opus_encoder_create: {self._error(err.value)}")
        self._state: ctypes.c_void_p | None = ctypes.c_void_p(state)
        self._out = ctypes.create_string_buffer(_MAX_PACKET)
        self._out_ptr = ctypes.addressof(self._out)
        # What FFmpeg's libopus wrapper set (vbr "on": unconstrained VBR), so the
        # bitstream is what the E-model's Ie was fitted on (edgeagent/quality/emodel.py).
        for request, value in (
            (SET_BITRATE, bitrate_bps),
            (SET_COMPLEXITY, complexity),
            (SET_VBR, 1),
            (SET_VBR_CONSTRAINT, 0),
            (SET_INBAND_FEC, int(fec)),
            (SET_PACKET_LOSS_PERC, loss_percent),
        ):
            self.set(request, value)

    def set(self, request: int, value: int) -> None:
        if self._state is None:
            raise OpusEncodeError("encoder closed")
        rc = self._lib.opus_encoder_ctl(self._state, ctypes.c_int(request), ctypes.c_int32(value))
        if rc != _OPUS_OK:
            raise OpusEncodeError(f"opus_encoder_ctl({request}, {value}): {self._error(rc)}")

    def encode(self, samples: np.ndarray) -> bytes:
        """One packet for one 20 ms frame of mono int16 samples."""
        if self._state is None:
            raise OpusEncodeError("encoder closed")
        if samples.dtype != np.int16 or samples.shape != (FRAME_SAMPLES,):
            raise ValueError(
                f"expected {FRAME_SAMPLES} int16 samples, got {samples.dtype} {samples.shape}"
            )
        if not samples.flags.c_contiguous:
            samples = np.ascontiguousarray(samples)
        n = self._lib.opus_encode(
            self._state, samples.ctypes.data, FRAME_SAMPLES, self._out_ptr, _MAX_PACKET
        )
        if n < 0:
            raise OpusEncodeError(self._error(n))
        return self._out.raw[:n]
