"""Fails loudly when aiortc/aioice/PyAV change the internals our media path relies on.

If one of these fails after an upgrade, read edgeagent/call/tracks.py (jitter
buffer bypass), edgeagent/call/opus.py (sender encoder) and
edgeagent/call/ice.py (gather_candidates override) before touching the pin.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket

import aioice
import aioice.ice
import aiortc
import aiortc.rtcicetransport
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcicetransport import RTCIceGatherer

from edgeagent.call.ice import ice_configuration, resolve_host_addresses, restrict_host_addresses
from edgeagent.call.opus import (
    SENDER_ENCODER_ATTR,
    MonoOpusEncoder,
    OpusSettings,
    munge_sdp,
)
from edgeagent.call.tracks import RECEIVER_JITTER_ATTR, RECEIVER_STREAMS_ATTR, ArrivalOrderBuffer

DRIFT = "aiortc/aioice internals changed: re-check edgeagent/call/{tracks,opus,ice}.py"


def test_versions_are_the_pinned_ones() -> None:
    assert aiortc.__version__ == "1.16.0", f"aiortc is {aiortc.__version__}, pinned 1.16.0. {DRIFT}"
    assert aioice.__version__ == "0.13.0", f"aioice is {aioice.__version__}, pinned 0.13.0. {DRIFT}"


def test_receiver_still_feeds_packets_through_a_replaceable_jitter_buffer() -> None:
    src = inspect.getsource(aiortc.rtcrtpreceiver.RTCRtpReceiver)
    assert "self.__jitter_buffer = JitterBuffer(capacity=16, prefetch=4)" in src, DRIFT
    assert "self.__jitter_buffer.add(packet)" in src, DRIFT
    assert "self.__decoder_queue.put((codec, encoded_frame))" in src, DRIFT
    assert list(inspect.signature(JitterFrame).parameters) == ["data", "timestamp"], DRIFT
    assert "__jitter_buffer" in RECEIVER_JITTER_ATTR


def test_receiver_still_keeps_replaceable_stream_statistics() -> None:
    """SteadyStreamStatistics (edgeagent/call/tracks.py) relies on these."""
    src = inspect.getsource(aiortc.rtcrtpreceiver.RTCRtpReceiver)
    assert "self.__remote_streams: dict[int, StreamStatistics] = {}" in src, DRIFT
    assert (
        "self.__remote_streams[packet.ssrc] = StreamStatistics(codec.clockRate)\n"
        "        self.__remote_streams[packet.ssrc].add(packet)"
    ) in src, DRIFT
    assert "__remote_streams" in RECEIVER_STREAMS_ATTR
    stats = inspect.getsource(aiortc.rtcrtpreceiver.StreamStatistics)
    for field in ("_clockrate", "_jitter_q4", "_last_arrival", "_last_timestamp", "cycles"):
        assert f"self.{field} = " in stats, DRIFT
    assert "return self._jitter_q4 >> 4" in stats, DRIFT


def test_sender_and_receiver_take_only_differences_of_time_time() -> None:
    """monotonic_rtcp_clocks (edgeagent/call/tracks.py) gives them the monotonic clock."""
    expected = {
        aiortc.rtcrtpsender: [
            "rtt = time.time() - self.__lsr_time - (report.dlsr / 65536)",
            "self.__lsr_time = time.time()",
        ],
        aiortc.rtcrtpreceiver: [
            "arrival = int(time.time() * self._clockrate)",
            "self.__lsr_time[packet.ssrc] = time.time()",
            "delay = time.time() - self.__lsr_time[ssrc]",
        ],
    }
    for module, uses in expected.items():
        src = inspect.getsource(module)
        found = [line.strip() for line in src.splitlines() if re.search(r"\btime\.", line)]
        assert found == uses, f"{module.__name__}: {found}. {DRIFT}"


def test_arrival_order_buffer_passes_in_order_and_drops_late() -> None:
    class P:
        def __init__(self, seq: int) -> None:
            self.sequence_number = seq
            self.timestamp = seq * 960
            self._data = bytes([seq % 256])

    buf = ArrivalOrderBuffer()
    out = [buf.add(P(s))[1] for s in (65534, 65535, 1, 0, 1, 2)]  # wrap, loss, reorder, dup
    passed = [f.timestamp // 960 for f in out if f is not None]
    assert passed == [65534, 65535, 1, 2]
    assert buf.late == 2


def test_sender_creates_an_encoder_only_when_none_is_set() -> None:
    src = inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender)
    assert "if self.__encoder is None:\n            self.__encoder = get_encoder(codec)" in src, (
        DRIFT
    )
    assert "__encoder" in SENDER_ENCODER_ATTR


def test_our_opus_encoder_accepts_every_option_and_sends_mono_32k() -> None:
    import av
    import numpy as np

    enc = MonoOpusEncoder(OpusSettings())
    assert enc.unused_options == {}, f"FFmpeg ignored {enc.unused_options}: FEC/loss hint lost"
    sizes, stamps = [], []
    for i in range(50):
        frame = av.AudioFrame.from_ndarray(
            (np.sin(np.arange(960) * 0.05 + i) * 8000).astype(np.int16)[None, :],
            format="s16",
            layout="mono",
        )
        frame.sample_rate, frame.pts = 48000, i * 960
        payloads, ts = enc.encode(frame)
        sizes += [len(p) for p in payloads]
        stamps.append(ts)
    assert 40 < sum(sizes) / len(sizes) < 130  # ~80 bytes at 32 kbit/s
    assert stamps[:3] == [0, 960, 1920]


def test_empty_ice_servers_adds_no_public_stun_but_none_does() -> None:
    assert RTCIceGatherer(iceServers=[])._connection.stun_server is None
    assert RTCIceGatherer(iceServers=None)._connection.stun_server is not None
    assert ice_configuration().iceServers == []
    config = ice_configuration(
        ["stun:127.0.0.1:3478", "stun:127.0.0.1:3479"],
        ["turn:127.0.0.1:3478?transport=udp"],
        "u",
        "p",
        relay_only=True,
    )
    assert [s.urls for s in config.iceServers] == [
        "stun:127.0.0.1:3478",
        "turn:127.0.0.1:3478?transport=udp",
    ]


def test_aioice_gathering_internals_we_override_are_present() -> None:
    conn = aioice.ice.Connection(ice_controlling=True)
    for attr in (
        "_local_candidates_start",
        "_local_candidates_end",
        "_local_candidates",
        "_transport_policy",
        "_use_ipv4",
        "_use_ipv6",
        "_components",
    ):
        assert hasattr(conn, attr), f"aioice Connection lost {attr}. {DRIFT}"
    params = inspect.signature(conn.get_component_candidates).parameters
    assert list(params) == ["component", "addresses", "timeout"], DRIFT
    assert "get_host_addresses(" in inspect.getsource(aioice.ice.Connection.gather_candidates)


def test_resolve_host_addresses_takes_ips_and_interface_names() -> None:
    assert resolve_host_addresses(["127.0.0.1"]) == ["127.0.0.1"]
    assert "127.0.0.1" in resolve_host_addresses(["lo"])
    assert resolve_host_addresses(["no-such-if0"]) == []


async def test_restricted_gathering_offers_only_loopback_and_a_dead_stun_cannot_stall() -> None:
    # A STUN "server" that never answers (bound, never read): aioice would wait 5 s.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        pc = RTCPeerConnection(ice_configuration([f"stun:127.0.0.1:{port}"]))
        try:
            pc.addTransceiver("audio")
            assert restrict_host_addresses(pc, ["127.0.0.1"], gather_timeout_s=0.3) == 1
            offer = await pc.createOffer()
            await asyncio.wait_for(pc.setLocalDescription(offer), 2.5)
            candidates = [
                line for line in pc.localDescription.sdp.splitlines() if "a=candidate" in line
            ]
            assert candidates and all(" 127.0.0.1 " in c for c in candidates), candidates
        finally:
            await pc.close()


def test_munge_sdp_sets_mono_fec_and_bitrate_on_opus_only() -> None:
    sdp = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\n"
        "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;stereo=1\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
    )
    out = munge_sdp(sdp, OpusSettings(bitrate_bps=24000))
    fmtp = [line for line in out.splitlines() if line.startswith("a=fmtp")]
    assert fmtp == [
        "a=fmtp:111 minptime=10;stereo=0;useinbandfec=1;sprop-stereo=0;maxaveragebitrate=24000"
    ]
    bare = munge_sdp("m=audio 9 RTP/AVP 96\r\na=rtpmap:96 opus/48000/2\r\n", OpusSettings())
    assert "a=fmtp:96 minptime=10;useinbandfec=1;stereo=0" in bare


async def test_aiortc_keeps_our_munged_fmtp_in_the_local_description() -> None:
    pc = RTCPeerConnection(ice_configuration())
    try:
        pc.addTransceiver("audio")
        restrict_host_addresses(pc, ["127.0.0.1"])
        offer = await pc.createOffer()
        await pc.setLocalDescription(
            RTCSessionDescription(munge_sdp(offer.sdp, OpusSettings()), "offer")
        )
        assert "useinbandfec=1" in pc.localDescription.sdp, DRIFT
    finally:
        await pc.close()


def test_pyav_cannot_run_opus_plc_so_we_call_libopus_directly() -> None:
    import av

    dec = av.CodecContext.create("libopus", "r")
    assert dec.decode(av.Packet(b"")) == []
    with pytest.raises(EOFError):  # an empty packet is end-of-stream, not "lost frame"
        dec.decode(av.Packet(b"\xf8\xff\xfe"))


def test_ice_failure_reporting_internals_are_there() -> None:
    """ice.selected_candidates and ice_failure read these; ice fails a transport via the last."""
    conn = aioice.Connection(ice_controlling=True)
    assert hasattr(conn, "_nominated"), DRIFT
    assert hasattr(conn, "turn_server") and hasattr(conn, "turn_transport"), DRIFT
    assert hasattr(aiortc.rtcicetransport.RTCIceTransport, "_RTCIceTransport__setState"), DRIFT


def test_aioice_connect_is_still_the_loop_our_connect_replays() -> None:
    """edgeagent/call/ice.py `_connect` is aioice 0.13's `Connection.connect` with our Ta and
    an early end: if aioice's steps change, re-derive it (or drop it if aioice got faster)."""
    src = inspect.getsource(aioice.ice.Connection.connect)
    for step in (
        "self._pair_remote_candidate(remote_candidate)",
        "self.sort_check_list()",
        "self._unfreeze_initial()",
        "self.check_incoming(*early_check)",
        "self._early_checks_done = True",
        "if not self._check_periodic():",
        "await asyncio.sleep(0.02)",
        "res = await self._check_list_state.get()",
        "self._query_consent_task = asyncio.create_task(self.query_consent())",
    ):
        assert step in src, f"aioice Connection.connect lost {step!r}. {DRIFT}"
    assert src.count("\n") < 60, f"aioice Connection.connect grew. {DRIFT}"
    assert (aioice.ice.ICE_COMPLETED, aioice.ice.ICE_FAILED) == (1, 2), DRIFT
    # Aggressive nomination by the controlling side: nothing for us to add.
    assert "nominate = self.ice_controlling and not self.remote_is_lite" in inspect.getsource(
        aioice.ice.Connection.check_start
    ), DRIFT
    # aiortc starts ICE through the connection's `connect` attribute (our instance override).
    assert "await self._connection.connect()" in inspect.getsource(
        aiortc.rtcicetransport.RTCIceTransport.start
    ), DRIFT


def test_aiortc_still_makes_its_dtls_certificate_inside_the_constructor() -> None:
    """No per-connection certificate seam in 1.16: `RTCPeerConnection.__init__` generates one
    (0.1 ms of CPU here), so reusing a process-wide one could not remove that cost without
    patching aiortc process-wide. If a seam appears, see docs/profile.md section 5."""
    src = inspect.getsource(RTCPeerConnection.__init__)
    assert "self.__certificates = [RTCCertificate.generateCertificate()]" in src, DRIFT
    assert list(inspect.signature(RTCPeerConnection.__init__).parameters) == [
        "self",
        "configuration",
    ], DRIFT


# --- fast path (issue 7): the aiortc code that InlineEncode and InlineDecodeQueue replace ---


def _source_digest(obj: object) -> str:
    import hashlib

    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]  # type: ignore[arg-type]


def test_sender_encode_step_is_the_one_inline_encode_reproduces() -> None:
    """edgeagent/call/opus.py InlineEncode copies this method minus run_in_executor."""
    method = aiortc.rtcrtpsender.RTCRtpSender._next_encoded_frame
    src = inspect.getsource(method)
    assert "data = await self.__track.recv()" in src, DRIFT
    assert "if not self._enabled:" in src, DRIFT
    assert "audio_level = rtp.compute_audio_level_dbov(data)" in src, DRIFT
    assert "None, self.__encoder.encode, data, force_keyframe" in src, DRIFT
    assert "return RTCEncodedFrame(payloads, timestamp, audio_level)" in src, DRIFT
    assert _source_digest(method) == "89dd9fa4fb33741c", DRIFT
    run_rtp = inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender._run_rtp)
    assert "enc_frame = await self._next_encoded_frame(codec)" in run_rtp, DRIFT
    assert "packet.extensions.audio_level = (False, -enc_frame.audio_level)" in run_rtp, DRIFT
    assert list(inspect.signature(aiortc.rtcrtpsender.RTCEncodedFrame).parameters) == [
        "payloads",
        "timestamp",
        "audio_level",
    ], DRIFT


def test_audio_level_function_is_the_one_audio_level_dbov_matches() -> None:
    assert _source_digest(aiortc.rtp.compute_audio_level_dbov) == "d65138ae99e84548", DRIFT


def test_receiver_decoder_thread_is_the_one_inline_decode_stands_in_for() -> None:
    """edgeagent/call/tracks.py InlineDecodeQueue: put() decodes, get() waits for the stop."""
    worker = aiortc.rtcrtpreceiver.decoder_worker
    src = inspect.getsource(worker)
    assert "task = input_q.get()" in src and "if task is None:" in src, DRIFT
    assert "asyncio.run_coroutine_threadsafe(output_q.put(None), loop)" in src, DRIFT
    assert "decoder = get_decoder(codec)" in src, DRIFT
    assert _source_digest(worker) == "d500d4e567d6846c", DRIFT
    receiver = inspect.getsource(aiortc.rtcrtpreceiver.RTCRtpReceiver)
    assert "self.__decoder_queue: queue.Queue = queue.Queue()" in receiver, DRIFT
    assert "self.__decoder_queue,\n                    self._track._queue," in receiver, DRIFT
    assert "self.__decoder_queue.put(None)\n            self.__decoder_thread.join()" in receiver
    assert "self.__decoder_error" in receiver, DRIFT
    assert _source_digest(aiortc.rtcrtpreceiver.RTCRtpReceiver.receive) == "d6d8d8d7a0bf4e95"


# --- round 2 (docs/profile.md "Round 2"): mono decode, pushed sink, audio level -------------


def test_remote_track_hands_on_anything_but_none_so_a_push_failure_reaches_the_sink() -> None:
    """edgeagent/call/tracks.py RemoteAudioSink.push puts a `_PushFailed` on `_queue`."""
    src = inspect.getsource(aiortc.rtcrtpreceiver.RemoteStreamTrack)
    assert "self._queue: asyncio.Queue = asyncio.Queue()" in src, DRIFT
    assert "frame = await self._queue.get()\n        if frame is None:" in src, DRIFT
    assert "return frame" in src, DRIFT
    assert "return self._track" in inspect.getsource(aiortc.RTCRtpReceiver.track.fget), DRIFT


def test_aiortc_opus_decoder_is_the_one_mono_opus_decoder_mirrors() -> None:
    """edgeagent/call/opus.py MonoOpusDecoder: the same, with layout "mono"."""
    import aiortc.codecs.opus

    src = inspect.getsource(aiortc.codecs.opus.OpusDecoder)
    assert 'self.codec.layout = "stereo"' in src, DRIFT
    assert "packet.pts = encoded_frame.timestamp" in src, DRIFT
    assert _source_digest(aiortc.codecs.opus.OpusDecoder) == "40cd30859e54f638", DRIFT


def test_aiortc_receivers_never_read_the_rtp_audio_level() -> None:
    """Why `send_audio_level(pc, False)` is safe towards another agent (an aiortc far end)."""
    for module in (aiortc.rtcrtpreceiver, aiortc.rtcdtlstransport, aiortc.rtcpeerconnection):
        assert "audio_level" not in inspect.getsource(module), DRIFT


async def test_opus_is_sent_even_when_the_far_end_lists_it_after_g711() -> None:
    """aiortc keeps the offer's codec order and sends the first; `prefer_opus` reorders the
    negotiated codecs (`RTCRtpTransceiver._codecs`) so a gateway listing PCMU first gets Opus."""
    from edgeagent.call.opus import prefer_opus

    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    try:
        caller.addTransceiver("audio")
        offer = await caller.createOffer()
        m_line = next(x for x in offer.sdp.splitlines() if x.startswith("m=audio"))
        head, pts = m_line.split()[:3], m_line.split()[3:]
        pcmu_first = " ".join([*head, "0", *(pt for pt in pts if pt != "0")])
        lines = offer.sdp.replace(m_line, pcmu_first).splitlines()
        pcmu = next(x for x in lines if x.startswith("a=rtpmap:0 "))
        lines.remove(pcmu)
        lines.insert(next(i for i, x in enumerate(lines) if x.startswith("a=rtpmap:")), pcmu)
        offer.sdp = "\r\n".join(lines) + "\r\n"  # as a G.711-first gateway lists them
        await callee.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        assert callee.getTransceivers()[0]._codecs[0].mimeType == "audio/PCMU"
        assert prefer_opus(callee) == "opus"
        answer = await callee.createAnswer()
        first_pt = answer.sdp.split("m=audio")[1].split()[2]
        assert f"a=rtpmap:{first_pt} opus/48000" in answer.sdp
    finally:
        await caller.close()
        await callee.close()
