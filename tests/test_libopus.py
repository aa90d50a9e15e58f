"""libopus through ctypes: PLC and FEC for lost packets, which PyAV cannot reach."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pytest

from edgeagent.call import libopus
from edgeagent.call.libopus import DecodedAudio, OpusDecodeError, PlcDecoder
from edgeagent.call.opus import MonoOpusDecoder, MonoOpusEncoder, OpusSettings

TB = Fraction(1, 48000)


@dataclass
class Encoded:
    """What aiortc's jitter buffer hands a decoder."""

    data: bytes
    timestamp: int


def _packets(signal: np.ndarray, *, fec: bool) -> list[Encoded]:
    """`signal` through our encoder; with FEC and a 20 % hint every packet carries LBRR."""
    enc = MonoOpusEncoder(OpusSettings(expected_loss_percent=20 if fec else 0, fec=fec))
    out = []
    for i in range(0, signal.size - 959, 960):
        f = av.AudioFrame.from_ndarray(signal[None, i : i + 960], format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = 48000, i, TB
        payloads, ts = enc.encode(f)
        out += [Encoded(p, ts) for p in payloads]
    return out


def _voice(seconds: float = 3.0) -> np.ndarray:
    from edgeagent.audio.synth import speech_like

    return np.clip(speech_like(seconds, seed=7, level_dbfs=-20), -32768, 32767).astype(np.int16)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_the_system_libopus_is_there() -> None:
    # scripts/setup and scripts/install-pi install libopus0; without it calls fade.
    v = libopus.version()
    assert v is not None and v.startswith("libopus "), v


def test_a_clean_stream_decodes_like_pyav_with_contiguous_timestamps() -> None:
    packets = _packets(_voice(), fec=False)
    dec, ref = PlcDecoder(), MonoOpusDecoder()
    ours = [a for p in packets for a in dec.decode(p)]
    theirs = [f for p in packets for f in ref.decode(p)]
    assert [a.kind for a in ours] == ["packet"] * len(packets)
    assert [a.timestamp for a in ours] == [p.timestamp for p in packets]
    assert dec.plc_frames == dec.fec_frames == 0
    a = np.concatenate([x.samples for x in ours]).astype(np.float64)
    b = np.concatenate([f.to_ndarray()[0] for f in theirs]).astype(np.float64)
    assert a.size == b.size
    # The same stream through libopus either way (the builds may differ by a few LSB).
    assert np.corrcoef(a, b)[0, 1] > 0.999


def test_one_lost_packet_is_recovered_from_the_next_packets_fec() -> None:
    signal = _voice()
    packets = _packets(signal, fec=True)
    lost = 44  # inside a syllable (at an onset there is no earlier speech to carry)
    dec = PlcDecoder()
    out = [a for i, p in enumerate(packets) if i != lost for a in dec.decode(p)]
    assert dec.fec_frames == 1 and dec.plc_frames == 0
    recovered = next(a for a in out if a.kind == "fec")
    assert recovered.timestamp == packets[lost].timestamp
    assert recovered.samples.size == 960
    # The recovered frame is the lost speech at a lower bitrate, not silence or a copy.
    clean = PlcDecoder()
    reference = [a for p in packets for a in clean.decode(p)][lost].samples
    assert np.corrcoef(recovered.samples.astype(float), reference.astype(float))[0, 1] > 0.8
    assert [a.timestamp for a in out] == [p.timestamp for p in packets]


def test_fec_recovers_the_lost_frame_better_than_plc() -> None:
    signal = _voice(3.0)
    lost = (44, 56, 93, 105)  # inside syllables
    corr = {}
    for fec in (True, False):
        packets = _packets(signal, fec=fec)
        reference = [a for p in packets for a in PlcDecoder().decode(p)]
        for i in lost:
            dec = PlcDecoder()
            out = [a for j, p in enumerate(packets) if j != i for a in dec.decode(p)]
            got = next(a for a in out if a.timestamp == packets[i].timestamp).samples
            corr[fec, i] = np.corrcoef(got.astype(float), reference[i].samples.astype(float))[0, 1]
    assert min(corr[True, i] for i in lost) > 0.7  # measured 0.77-0.94
    assert max(corr[False, i] for i in lost) < 0.6  # PLC extrapolates: 0.14-0.49


def test_a_burst_is_concealed_with_plc_then_fec_and_a_long_gap_is_left_alone() -> None:
    packets = _packets(_voice(3.0), fec=True)
    dec = PlcDecoder(max_gap_ms=100)
    burst = {54, 55, 56}  # 60 ms of speech: two PLC frames, the third from packet 57's FEC
    outage = set(range(80, 90))  # 200 ms: longer than max_gap, left to the playout buffer
    out = [a for i, p in enumerate(packets) if i not in burst | outage for a in dec.decode(p)]
    kinds = {a.timestamp: a.kind for a in out}
    assert [kinds[packets[i].timestamp] for i in (54, 55, 56)] == ["plc", "plc", "fec"]
    assert all(packets[i].timestamp not in kinds for i in outage)
    assert dec.plc_frames == 2 and dec.fec_frames == 1 and dec.long_gaps == 1
    # PLC carries the voice on and decays; it is not silence.
    first = next(a for a in out if a.timestamp == packets[54].timestamp)
    assert _rms(first.samples) > 500


def test_without_fec_in_the_stream_the_last_lost_frame_is_plc_too() -> None:
    packets = _packets(_voice(), fec=False)
    dec = PlcDecoder()
    out = [a for i, p in enumerate(packets) if i != 20 for a in dec.decode(p)]
    concealed = next(a for a in out if a.timestamp == packets[20].timestamp)
    # Asked for FEC, libopus runs PLC when the packet carries none: still a 20 ms frame.
    assert concealed.kind == "fec" and concealed.samples.size == 960
    assert _rms(concealed.samples) > 0


def test_a_corrupt_packet_raises_and_the_decoder_goes_on() -> None:
    packets = _packets(_voice(1.0), fec=False)
    dec = PlcDecoder()
    dec.decode(packets[0])
    with pytest.raises(OpusDecodeError):
        dec.decode(Encoded(b"\xff\xff\xff\xff", packets[1].timestamp))
    out = dec.decode(packets[1])
    assert out[-1].kind == "packet" and out[-1].samples.size == 960


def test_decoded_audio_is_plain_data() -> None:
    a = DecodedAudio(np.zeros(960, dtype=np.int16), 1234, "plc")
    assert (a.timestamp, a.kind, a.samples.dtype) == (1234, "plc", np.int16)


def test_without_fec_expected_every_lost_frame_is_plc() -> None:
    packets = _packets(_voice(), fec=True)
    dec = PlcDecoder(fec=False)  # e.g. an aiortc far end, which never sends FEC
    out = [a for i, p in enumerate(packets) if i not in (54, 55) for a in dec.decode(p)]
    kinds = {a.timestamp: a.kind for a in out}
    assert [kinds[packets[i].timestamp] for i in (54, 55)] == ["plc", "plc"]
    assert dec.plc_frames == 2 and dec.fec_frames == 0


def test_the_sink_plays_decoded_audio_at_its_timestamp() -> None:
    from aiortc.mediastreams import AudioStreamTrack

    from edgeagent.audio.playout import PlayoutBuffer
    from edgeagent.call.tracks import RemoteAudioSink
    from edgeagent.clock import SystemClock

    sink = RemoteAudioSink(AudioStreamTrack(), PlayoutBuffer(), clock=SystemClock())
    tone = (np.sin(np.arange(960) * 2 * np.pi * 440 / 48000) * 8000).astype(np.int16)
    for i in range(6):
        sink.accept(DecodedAudio(tone, i * 960, "plc" if i == 3 else "packet"))
    assert sink.frames_received == 6
    st = sink.playout.stats()
    assert st.concealed_frames == 0  # the decoder concealed; the buffer had no gap
    with pytest.raises(TypeError):
        sink.accept(b"not audio")
