"""Opus for our calls: mono, configurable bitrate, in-band FEC, packet-loss hint.

aiortc 1.16 encodes Opus at a fixed 96 kbit/s stereo without FEC and offers
no knob. Two contained changes, applied per peer connection (no global patch):

- `munge_sdp` rewrites the Opus `a=fmtp` line of our local description
  (stereo=0, sprop-stereo=0, useinbandfec=1, maxaveragebitrate, minptime),
  so the far end (a browser, another device) sends us mono FEC-protected
  Opus too. Pass the munged SDP to `setLocalDescription`; aiortc re-parses it
  and the local description it signals carries the new line.
- `install_opus_encoder` pre-sets each audio sender's encoder (aiortc creates
  one lazily only when none is set: the name-mangled `_RTCRtpSender__encoder`,
  checked by tests/test_aiortc_pin.py) to `MonoOpusEncoder`.

The RTP payload format stays `opus/48000/2` (RFC 7587 mandates it); mono is
what `stereo=0` and the encoder's channel layout mean.
"""

from __future__ import annotations

import fractions
import logging
import re
from dataclasses import dataclass
from typing import Any

import av
from aiortc import RTCPeerConnection
from aiortc.codecs.base import Encoder
from av.frame import Frame
from av.packet import Packet

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
SENDER_ENCODER_ATTR = "_RTCRtpSender__encoder"


@dataclass(frozen=True, slots=True)
class OpusSettings:
    """What we send and ask for."""

    bitrate_bps: int = 32000
    fec: bool = True
    expected_loss_percent: int = 10  # libopus packet-loss hint; FEC needs it > 0
    complexity: int = 5  # 0..10; 5 keeps a Pi 3 well under a core per call

    def __post_init__(self) -> None:
        if not 6000 <= self.bitrate_bps <= 510000:
            raise ValueError(f"bitrate_bps {self.bitrate_bps} outside 6000..510000")
        if not 0 <= self.expected_loss_percent <= 100:
            raise ValueError("expected_loss_percent outside 0..100")
        if not 0 <= self.complexity <= 10:
            raise ValueError("complexity outside 0..10")

    def fmtp(self) -> dict[str, str]:
        return {
            "minptime": "10",
            "useinbandfec": "1" if self.fec else "0",
            "stereo": "0",
            "sprop-stereo": "0",
            "maxaveragebitrate": str(self.bitrate_bps),
        }


_RTPMAP = re.compile(r"^a=rtpmap:(\d+) opus/48000(?:/\d+)?\s*$", re.IGNORECASE)


def munge_sdp(sdp: str, settings: OpusSettings) -> str:
    """Return `sdp` with every Opus payload type's fmtp set to our settings."""
    lines = sdp.splitlines()
    opus_pts = {m.group(1) for line in lines if (m := _RTPMAP.match(line))}
    wanted = settings.fmtp()
    out: list[str] = []
    fmtp_done: set[str] = set()
    for line in lines:
        if line.startswith("a=fmtp:"):
            pt, _, params = line[len("a=fmtp:") :].partition(" ")
            if pt in opus_pts:
                merged = _parse_fmtp(params)
                merged.update(wanted)
                line = f"a=fmtp:{pt} {_format_fmtp(merged)}"
                fmtp_done.add(pt)
        out.append(line)
    # Opus payload types that had no fmtp line get one right after their rtpmap.
    result: list[str] = []
    for line in out:
        result.append(line)
        m = _RTPMAP.match(line)
        if m and m.group(1) not in fmtp_done:
            result.append(f"a=fmtp:{m.group(1)} {_format_fmtp(dict(wanted))}")
    return "\r\n".join(result) + "\r\n"


def _parse_fmtp(params: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in params.split(";"):
        key, sep, value = item.strip().partition("=")
        if key and sep:
            pairs[key] = value
    return pairs


def _format_fmtp(params: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in params.items())


class MonoOpusEncoder(Encoder):
    """libopus through PyAV: mono, `settings.bitrate_bps`, VoIP mode, FEC and loss hint."""

    def __init__(self, settings: OpusSettings) -> None:
        self.settings = settings
        self.codec = av.CodecContext.create("libopus", "w")
        self.codec.bit_rate = settings.bitrate_bps
        self.codec.format = "s16"
        self.codec.layout = "mono"
        self.codec.sample_rate = SAMPLE_RATE
        self.codec.time_base = TIME_BASE
        self.codec.options = {
            "application": "voip",
            "frame_duration": "20",
            "fec": "1" if settings.fec else "0",
            "packet_loss": str(settings.expected_loss_percent),
            "compression_level": str(settings.complexity),
        }
        self.codec.open()
        # PyAV leaves options FFmpeg did not recognise in the dict.
        self.unused_options = dict(self.codec.options)
        if self.unused_options:
            logger.warning("opus: encoder ignored options %s", self.unused_options)
        self._resampler: av.AudioResampler | None = None
        self._first_pts: int | None = None
        self._next_pts = 0

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        """Encode one frame; ([], 0) while the encoder buffers (the sender skips it)."""
        if not isinstance(frame, av.AudioFrame):
            raise TypeError(f"expected an audio frame, got {type(frame).__name__}")
        frames = [frame]
        if not (
            frame.format.name == "s16"
            and frame.layout.name == "mono"
            and frame.sample_rate == SAMPLE_RATE
            and frame.samples == FRAME_SAMPLES
            and frame.pts is not None
        ):
            # Anything else (stereo, other rates or sizes) goes through a resampler.
            if self._resampler is None:
                self._resampler = av.AudioResampler(
                    format="s16", layout="mono", rate=SAMPLE_RATE, frame_size=FRAME_SAMPLES
                )
            frames = list(self._resampler.resample(frame))
            for f in frames:
                f.pts = self._next_pts
                f.time_base = TIME_BASE
                self._next_pts += f.samples
        else:
            self._next_pts = int(frame.pts) + frame.samples
        packets = []
        for f in frames:
            packets += self.codec.encode(f)
        if not packets:
            return [], 0
        first = packets[0].pts or 0
        if self._first_pts is None:
            self._first_pts = first  # libopus starts at -preskip
        return [bytes(p) for p in packets], first - self._first_pts

    def pack(self, packet: Packet[Any]) -> tuple[list[bytes], int]:
        return [bytes(packet)], packet.pts or 0


def install_opus_encoder(pc: RTCPeerConnection, settings: OpusSettings) -> int:
    """Give every audio sender of `pc` that negotiated Opus a `MonoOpusEncoder`.

    Call after `setRemoteDescription` (the negotiated codecs are known then)
    and before media flows. Returns how many senders were set up; a sender
    whose codec is not Opus (G.711 with a gateway) keeps aiortc's encoder.
    """
    count = 0
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio":
            continue
        codecs = getattr(transceiver, "_codecs", [])
        if not codecs or codecs[0].mimeType.lower() != "audio/opus":
            continue
        sender = transceiver.sender
        if not hasattr(sender, SENDER_ENCODER_ATTR):
            raise RuntimeError("aiortc RTCRtpSender has no encoder attribute: version drift")
        current = getattr(sender, SENDER_ENCODER_ATTR)
        if isinstance(current, MonoOpusEncoder):
            count += 1
            continue
        if current is not None:
            logger.warning("opus: sender already encoding; leaving aiortc's encoder")
            continue
        setattr(sender, SENDER_ENCODER_ATTR, MonoOpusEncoder(settings))
        count += 1
    return count
