"""libopus through ctypes: PLC and FEC for lost packets, which PyAV cannot reach."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pytest

from edgeagent.call import libopus, opus
from edgeagent.call.libopus import DecodedAudio, OpusDecodeError, PlcDecoder
from edgeagent.call.opus import (
    LibopusMonoEncoder,
    MonoOpusDecoder,
    MonoOpusEncoder,
    OpusSettings,
    new_opus_encoder,
)

ENCODERS = [MonoOpusEncoder, LibopusMonoEncoder]

TB = Fraction(1, 48000)


@dataclass
class Encoded:
    """What aiortc's jitter buffer hands a decoder."""

    data: bytes
    timestamp: int


def _packets(
    signal: np.ndarray, *, fec: bool, encoder: type[opus._AdaptiveOpusEncoder] = MonoOpusEncoder
) -> list[Encoded]:
    """`signal` through an encoder of ours; with FEC and a 20 % hint every packet carries LBRR."""
    enc = encoder(OpusSettings(expected_loss_percent=20 if fec else 0, fec=fec))
    return _encode_all(enc, signal)


def _encode_all(
    enc: opus._AdaptiveOpusEncoder, signal: np.ndarray, start: int = 0
) -> list[Encoded]:
    out = []
    for i in range(0, signal.size - 959, 960):
        f = av.AudioFrame.from_ndarray(signal[None, i : i + 960], format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = 48000, start + i, TB
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


def _fec_recovery(packets: list[Encoded], lost: tuple[int, ...]) -> list[float]:
    """Correlation of each lost frame, as PlcDecoder conceals it, with its clean decode."""
    reference = [a for p in packets for a in PlcDecoder().decode(p)]
    corr = []
    for i in lost:
        dec = PlcDecoder()
        out = [a for j, p in enumerate(packets) if j != i for a in dec.decode(p)]
        got = next(a for a in out if a.timestamp == packets[i].timestamp).samples
        corr.append(np.corrcoef(got.astype(float), reference[i].samples.astype(float))[0, 1])
    return corr


@pytest.mark.parametrize("encoder", ENCODERS)
def test_fec_recovers_the_lost_frame_better_than_plc(
    encoder: type[opus._AdaptiveOpusEncoder],
) -> None:
    signal = _voice(3.0)
    lost = (44, 56, 93, 105)  # inside syllables
    with_fec = _fec_recovery(_packets(signal, fec=True, encoder=encoder), lost)
    plc_only = _fec_recovery(_packets(signal, fec=False, encoder=encoder), lost)
    assert min(with_fec) > 0.7  # measured 0.77-0.94 (PyAV's libopus)
    assert max(plc_only) < 0.6  # PLC extrapolates: 0.14-0.49


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


# --- the encoder through ctypes (LibopusMonoEncoder) -------------------------------------------


def test_the_ctypes_encoder_codes_speech_as_the_pyav_one_does() -> None:
    signal = _voice(3.0)
    ours = _packets(signal, fec=False, encoder=LibopusMonoEncoder)
    pyav = _packets(signal, fec=False, encoder=MonoOpusEncoder)
    # One packet per frame, the same RTP timestamps from 0.
    assert (
        [p.timestamp for p in ours]
        == [p.timestamp for p in pyav]
        == [960 * i for i in range(len(ours))]
    )
    # The same settings (32 kbit/s VBR): about the same size, the same audio.
    size = np.mean([len(p.data) for p in ours])
    assert abs(size - np.mean([len(p.data) for p in pyav])) < 0.15 * size
    assert 60 < size < 100  # ~32 kbit/s: 80 bytes a 20 ms frame
    a = np.concatenate([x.samples for p in ours for x in PlcDecoder().decode(p)])
    b = np.concatenate([x.samples for p in pyav for x in PlcDecoder().decode(p)])
    assert np.corrcoef(a.astype(float), b.astype(float))[0, 1] > 0.9


def test_the_ctypes_encoder_changes_hint_and_fec_between_frames_without_reopening() -> None:
    signal = _voice(3.0)
    enc = LibopusMonoEncoder(OpusSettings())  # adaptive hint, 0 to start: no LBRR yet
    third = (signal.size // 3) // 960 * 960
    packets = _encode_all(enc, signal[:third])
    assert enc.set_loss_hint(20) and not enc.set_loss_hint(20)
    packets += _encode_all(enc, signal[third : 2 * third], start=third)
    assert enc.set_fec(False)
    packets += _encode_all(enc, signal[2 * third :], start=2 * third)
    assert enc.reopens == 0 and enc.loss_hint_percent == 20 and not enc.fec
    n = third // 960
    assert [p.timestamp for p in packets] == [960 * i for i in range(len(packets))]
    before, during, after = (
        _fec_recovery(packets, tuple(k * n + i for i in (14, 26))) for k in range(3)
    )
    assert max(during) > 0.7 and max(during) > max(before) + 0.2  # FEC only with the hint
    assert max(after) < max(during)  # and not once it is turned off


def test_the_ctypes_encoder_resamples_other_frames_and_keeps_timestamps_running() -> None:
    enc = LibopusMonoEncoder(OpusSettings())
    t = np.arange(44100 // 50 * 10) / 44100
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    stereo = np.repeat(tone[None, :], 2, axis=0).reshape(1, -1, order="F")
    stamps = []
    for i in range(10):
        chunk = stereo[:, i * 882 * 2 : (i + 1) * 882 * 2]
        f = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
        f.sample_rate, f.pts = 44100, i * 882
        payloads, ts = enc.encode(f)
        stamps += [ts] * len(payloads)
    assert len(stamps) >= 8 and stamps == sorted(stamps)
    assert all(b - a == 960 for a, b in itertools.pairwise(stamps) if b != a)
    with pytest.raises(TypeError):
        enc.encode(b"not a frame")  # type: ignore[arg-type]


def test_the_pcm_encoder_refuses_bad_input_and_bad_settings() -> None:
    enc = libopus.PcmEncoder(bitrate_bps=32000, complexity=10, fec=True, loss_percent=0)
    with pytest.raises(ValueError, match="960 int16"):
        enc.encode(np.zeros(480, dtype=np.int16))
    with pytest.raises(ValueError, match="960 int16"):
        enc.encode(np.zeros(960, dtype=np.float32))
    with pytest.raises(libopus.OpusEncodeError, match="invalid argument"):
        enc.set(libopus.SET_PACKET_LOSS_PERC, 1000)
    # A strided view is copied, not read past its end.
    assert len(enc.encode(np.zeros(1920, dtype=np.int16)[::2])) > 0


def test_the_agent_encodes_through_libopus_and_falls_back_to_pyav_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(new_opus_encoder(OpusSettings()), LibopusMonoEncoder)
    monkeypatch.setattr(opus.libopus, "load", lambda: None)
    assert isinstance(new_opus_encoder(OpusSettings()), MonoOpusEncoder)
