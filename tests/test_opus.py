"""Opus settings: the loss hint that follows the far end, FEC only for a far end that uses it."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from edgeagent.call.opus import (
    LossHint,
    MonoOpusEncoder,
    OpusSettings,
    far_end_decodes_fec,
    far_end_is_aiortc,
    far_end_is_edgeagent,
    far_end_sends_fec,
    far_end_uses_fec,
    mark_sdp,
    munge_sdp,
    opus_fmtp,
    quantise_loss_hint,
)
from edgeagent.call.session import opus_settings
from edgeagent.config import Config

TB = fractions.Fraction(1, 48000)

CHROME_OFFER = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=group:BUNDLE 0\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
)


def test_defaults_are_the_measured_ones() -> None:
    s = OpusSettings()
    assert (s.bitrate_bps, s.complexity, s.fec) == (32000, 10, True)
    assert s.adaptive_loss_hint and s.expected_loss_percent is None
    assert not OpusSettings(expected_loss_percent=10).adaptive_loss_hint
    with pytest.raises(ValueError, match="expected_loss_percent"):
        OpusSettings(expected_loss_percent=101)
    with pytest.raises(ValueError, match="complexity"):
        OpusSettings(complexity=11)


def test_loss_hint_is_zero_on_a_clean_path_and_follows_reported_loss() -> None:
    hint = LossHint()
    assert [hint.update(x) for x in (0.0, 0.0, None, 0.0)] == [0, 0, 0, 0]
    # Sustained 10 % loss: the smoothed loss climbs through the levels to 10.
    rising = [hint.update(10.0) for _ in range(5)]
    assert rising[0] == 5 and rising[-1] == 10
    assert rising == sorted(rising)
    # 25 % loss reaches the top level; loss that stops brings the hint back to 0.
    assert [hint.update(25.0) for _ in range(3)][-1] == 20
    falling = [hint.update(0.0) for _ in range(10)]
    assert falling == sorted(falling, reverse=True)
    assert falling[-1] == 0
    assert hint.update(None) == 0  # no report: unchanged


def test_loss_hint_levels_have_hysteresis() -> None:
    assert quantise_loss_hint(6.0, 5) == 5
    assert quantise_loss_hint(7.0, 5) == 10
    assert quantise_loss_hint(6.0, 10) == 10  # inside the band: stays
    assert quantise_loss_hint(4.9, 10) == 5
    assert quantise_loss_hint(0.4, 0) == 0
    assert quantise_loss_hint(0.4, 1) == 1
    assert quantise_loss_hint(0.2, 1) == 0
    with pytest.raises(ValueError, match="smoothing"):
        LossHint(smoothing=0.0)


async def test_our_agents_are_told_apart_from_browsers_by_the_sdp() -> None:
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        offer = await pc.createOffer()
    finally:
        await pc.close()
    stock = munge_sdp(offer.sdp, OpusSettings())
    assert far_end_is_aiortc(stock) and not far_end_is_edgeagent(stock)
    assert opus_fmtp(stock)["useinbandfec"] == "1"
    assert not far_end_decodes_fec(stock)  # asks for FEC but cannot decode it (PyAV)
    # An agent decoding through libopus says so, and gets FEC like a browser.
    agent = mark_sdp(stock, "9.9", decodes_fec=True)
    assert far_end_is_aiortc(agent) and far_end_is_edgeagent(agent)
    assert far_end_uses_fec(agent) and far_end_decodes_fec(agent)
    plain = mark_sdp(stock, "9.9", decodes_fec=False)  # an agent without libopus0
    assert far_end_is_edgeagent(plain) and not far_end_decodes_fec(plain)
    # Who sends us FEC when we ask: browsers, and agents with their opus_fec on.
    assert far_end_sends_fec(agent) and far_end_sends_fec(CHROME_OFFER)
    assert not far_end_sends_fec(stock) and not far_end_sends_fec(plain)
    fec_off = mark_sdp(munge_sdp(offer.sdp, OpusSettings(fec=False)), "9.9", decodes_fec=True)
    assert far_end_uses_fec(fec_off) and not far_end_sends_fec(fec_off)
    assert not far_end_is_aiortc(CHROME_OFFER)
    assert far_end_decodes_fec(CHROME_OFFER)
    no_fec = CHROME_OFFER.replace("useinbandfec=1", "useinbandfec=0")
    assert not far_end_decodes_fec(no_fec)
    firefox = CHROME_OFFER.replace("o=- 4611731400430051336 2", "o=mozilla...THIS_IS_SDPARTA 1 0")
    assert not far_end_is_aiortc(firefox)
    assert opus_fmtp("v=0\r\n") == {}


async def test_the_tool_line_is_session_level_and_survives_aiortc_and_remarking() -> None:
    pc, far = RTCPeerConnection(), RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        offer = await pc.createOffer()
        marked = mark_sdp(munge_sdp(offer.sdp, OpusSettings()), "1.2.3", decodes_fec=True)
        lines = marked.split("\r\n")
        tool = lines.index("a=tool:edgeagent/1.2.3 opus-fec")
        assert tool < next(i for i, x in enumerate(lines) if x.startswith("m="))
        assert marked.endswith("\r\n") and "\n\n" not in marked
        # Marking again replaces the line rather than adding one.
        again = mark_sdp(marked, "1.2.4", decodes_fec=False)
        assert again.count("a=tool:") == 1 and "a=tool:edgeagent/1.2.4\r\n" in again
        assert not far_end_uses_fec(again)
        # aiortc (the far end of a call between agents) takes the marked offer.
        from aiortc import RTCSessionDescription

        await far.setRemoteDescription(RTCSessionDescription(marked, "offer"))
        assert far.remoteDescription is not None
    finally:
        await pc.close()
        await far.close()
    # Another tool's line is no mark of ours, nor is a name that only starts like it.
    assert not far_end_is_edgeagent(CHROME_OFFER.replace("s=-", "s=-\r\na=tool:other 1"))
    assert not far_end_is_edgeagent(CHROME_OFFER.replace("s=-", "s=-\r\na=tool:edgeagentx"))


def _frames(signal: np.ndarray) -> list[av.AudioFrame]:
    frames = []
    for i in range(0, signal.size - 959, 960):
        f = av.AudioFrame.from_ndarray(signal[None, i : i + 960], format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = 48000, i, TB
        frames.append(f)
    return frames


def _decode(payloads: list[bytes]) -> np.ndarray:
    dec = av.CodecContext.create("libopus", "r")
    out = []
    for data in payloads:
        for frame in dec.decode(av.Packet(data)):  # type: ignore[attr-defined]
            out.append(frame.to_ndarray().reshape(-1, frame.layout.nb_channels)[:, 0])
    return np.concatenate(out).astype(np.float64)


def test_changing_the_loss_hint_reopens_the_encoder_without_a_gap() -> None:
    t = np.arange(2 * 48000) / 48000
    tones = np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 1130 * t)
    signal = (tones * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * 6000).astype(np.int16)
    enc = MonoOpusEncoder(OpusSettings())
    assert enc.loss_hint_percent == 0 and enc.unused_options == {}
    payloads, stamps = [], []
    for k, frame in enumerate(_frames(signal)):
        if k == 40:
            assert enc.set_loss_hint(10)
            assert not enc.set_loss_hint(10)  # unchanged: no second reopen
        if k == 70:
            assert enc.set_fec(False)
        data, ts = enc.encode(frame)
        payloads += data
        stamps.append(ts)
    assert enc.reopens == 2
    assert (enc.loss_hint_percent, enc.fec) == (10, False)
    # RTP timestamps stay continuous across the reopens.
    assert stamps == [960 * k for k in range(len(stamps))]
    # Every decoded frame follows the source through both switches (a gap or a
    # desynchronised stream would drop the correlation towards 0; clean is ~0.98).
    out, ref, delay = _decode(payloads), signal.astype(np.float64), 312  # Opus lookahead
    rhos = [
        float(
            np.corrcoef(out[k * 960 + delay : (k + 1) * 960 + delay], ref[k * 960 : (k + 1) * 960])[
                0, 1
            ]
        )
        for k in range(5, 95)
    ]
    assert min(rhos) > 0.7, rhos
    assert min(rhos[:30]) > 0.9  # before any switch


def test_a_fixed_hint_is_not_changed_and_fec_stays_off_when_not_offered() -> None:
    enc = MonoOpusEncoder(OpusSettings(expected_loss_percent=10))
    assert enc.loss_hint_percent == 10
    assert not enc.set_loss_hint(0)
    assert enc.loss_hint_percent == 10
    off = MonoOpusEncoder(OpusSettings(fec=False))
    assert not off.set_fec(True)  # FEC not offered in the settings: never sent
    with pytest.raises(ValueError, match="loss hint"):
        MonoOpusEncoder(OpusSettings()).set_loss_hint(200)


def test_config_keys_map_to_settings_and_stay_backward_compatible() -> None:
    old = Config.model_validate({"device": {"id": "dev-a"}, "call": {"opus_bitrate_kbps": 24}})
    s = opus_settings(old)
    assert (s.bitrate_bps, s.complexity, s.fec, s.expected_loss_percent) == (24000, 10, True, None)
    fixed = Config.model_validate(
        {
            "device": {"id": "dev-a"},
            "call": {"opus_complexity": 5, "opus_fec": False, "opus_loss_hint_percent": 10},
        }
    )
    s = opus_settings(fixed)
    assert (s.complexity, s.fec, s.expected_loss_percent) == (5, False, 10)
    with pytest.raises(ValueError, match="opus_loss_hint_percent"):
        Config.model_validate({"device": {"id": "d"}, "call": {"opus_loss_hint_percent": "x"}})
