"""The receive statistics behind RTCP and the quality messages' jitter_ms and rtt_ms.

aiortc's `StreamStatistics` takes every timestamp difference into RFC 3550's
jitter; `SteadyStreamStatistics` (edgeagent/call/tracks.py) skips the jumps
libwebrtc skips, takes the difference modulo 2**32 and measures arrival on the
monotonic clock. Each case runs both on the same packets: the stock one shows
the spike the case is about, ours does not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket

from edgeagent.call.ice import restrict_host_addresses
from edgeagent.call.tracks import (
    RECEIVER_STREAMS_ATTR,
    SteadyStreamStatistics,
    install_receive_path,
    monotonic_rtcp_clocks,
)

RATE = 48000
SENDER_LSR_ATTR = "_RTCRtpSender__lsr"
FRAME = 960  # 20 ms


@dataclass
class Packet:
    sequence_number: int
    timestamp: int


class Clocks:
    """Arrival times for both implementations: monotonic for ours, wall for aiortc's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.t = 1000.0
        self.wall_offset = 0.0
        monkeypatch.setattr(SteadyStreamStatistics, "_now", staticmethod(lambda: self.t))
        monkeypatch.setattr(
            aiortc.rtcrtpreceiver.time, "time", lambda: self.t + 1.7e9 + self.wall_offset
        )


def stream(
    n: int, *, ts0: int = 0, seq0: int = 0, jump_at: int = -1, jump: int = 0
) -> Iterator[Packet]:
    """`n` packets 20 ms apart; from packet `jump_at` on the timestamps are `jump` further."""
    for i in range(n):
        ts = ts0 + i * FRAME + (jump if 0 <= jump_at <= i else 0)
        yield Packet((seq0 + i) & 0xFFFF, ts & 0xFFFFFFFF)


def run(
    packets: Iterator[Packet], clocks: Clocks, *, step_wall_at: int = -1
) -> tuple[float, float]:
    """(stock, steady) jitter in ms, max over the stream, arrivals exactly 20 ms apart."""
    stock = aiortc.rtcrtpreceiver.StreamStatistics(RATE)
    steady = SteadyStreamStatistics(RATE)
    worst = [0.0, 0.0]
    for i, p in enumerate(packets):
        if i == step_wall_at:
            clocks.wall_offset += 3600.0  # NTP steps the wall clock an hour
        for k, s in enumerate((stock, steady)):
            s.add(p)  # type: ignore[arg-type]
            worst[k] = max(worst[k], 1000 * s.jitter / RATE)
        clocks.t += FRAME / RATE
    assert stock.packets_received == steady.packets_received
    assert stock.packets_expected == steady.packets_expected  # loss counting unchanged
    return worst[0], worst[1]


@pytest.mark.parametrize(
    ("name", "packets", "step_wall_at"),
    [
        ("timestamps jump an hour", lambda: stream(200, jump_at=100, jump=3600 * RATE), -1),
        (
            "timestamps jump back 10 s",
            lambda: stream(200, ts0=10**6, jump_at=100, jump=-10 * RATE),
            -1,
        ),
        ("32-bit timestamp wrap", lambda: stream(200, ts0=(1 << 32) - 50 * FRAME), -1),
        ("wall clock steps an hour", lambda: stream(200), 100),
    ],
)
def test_jumps_that_are_not_network_jitter_leave_it_alone(
    monkeypatch: pytest.MonkeyPatch, name: str, packets: object, step_wall_at: int
) -> None:
    clocks = Clocks(monkeypatch)
    stock, steady = run(packets(), clocks, step_wall_at=step_wall_at)  # type: ignore[operator]
    assert stock > 500.0, f"{name}: aiortc's jitter no longer spikes ({stock} ms)"
    assert steady < 1.0, f"{name}: {steady} ms"


def test_real_jitter_is_measured_as_aiortc_measures_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packets arriving 0/+8 ms off their 20 ms grid, with a sequence wrap: same figure."""
    clocks = Clocks(monkeypatch)
    stock = aiortc.rtcrtpreceiver.StreamStatistics(RATE)
    steady = SteadyStreamStatistics(RATE)
    for i, p in enumerate(stream(300, seq0=65500)):
        off = 0.008 if i % 2 else 0.0
        clocks.t += off
        for s in (stock, steady):
            s.add(p)  # type: ignore[arg-type]
        clocks.t += FRAME / RATE - off
    assert steady.jitter == stock.jitter
    assert 7.0 < 1000 * steady.jitter / RATE < 9.0  # ~|D| = 8 ms, RFC 3550's 1/16 average
    assert steady.cycles == stock.cycles == 1 << 16


async def test_install_receive_path_makes_new_streams_steady() -> None:
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.addTransceiver("audio", direction="sendrecv")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(
            RTCSessionDescription(offerer.localDescription.sdp, "offer")
        )
        install_receive_path(answerer)
        install_receive_path(answerer)  # idempotent
        (t,) = answerer.getTransceivers()
        streams = getattr(t.receiver, RECEIVER_STREAMS_ATTR)
        # What RTCRtpReceiver._handle_rtp_packet does for a new SSRC (pinned in
        # tests/test_aiortc_pin.py).
        streams[1234] = aiortc.rtcrtpreceiver.StreamStatistics(RATE)
        assert type(streams[1234]) is SteadyStreamStatistics
    finally:
        await offerer.close()
        await answerer.close()


def test_clock_is_monotonic() -> None:
    assert SteadyStreamStatistics._now is time.monotonic


async def remote_rtt_s(pc: RTCPeerConnection) -> tuple[float | None, object]:
    """(roundTripTime, the report's timestamp) of `pc`'s last RTCP receiver report."""
    for s in (await pc.getStats()).values():
        if s.type == "remote-inbound-rtp":
            return s.roundTripTime, s.timestamp
    return None, None


async def test_a_wall_clock_step_between_sr_and_rr_is_not_round_trip_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NTP steps a Pi's clock (no clock chip) when it first syncs, often during a call.
    aiortc timed RTCP on the wall clock: a step between one of our SRs and the far
    end's RR answering it became RTT whole (an hour's step: an hour of RTT, averaged
    out over a minute of reports). A real call on loopback; once our sender has sent an
    SR, the clock steps an hour and the RR for that SR arrives, in one loop turn."""
    a, b = RTCPeerConnection(), RTCPeerConnection()
    try:
        for pc in (a, b):
            pc.addTrack(AudioStreamTrack())  # silence, paced by aiortc
        offer = await a.createOffer()
        restrict_host_addresses(a, ["127.0.0.1"])  # loopback only: the network rule
        await a.setLocalDescription(offer)
        await b.setRemoteDescription(RTCSessionDescription(a.localDescription.sdp, "offer"))
        answer = await b.createAnswer()
        restrict_host_addresses(b, ["127.0.0.1"])
        await b.setLocalDescription(answer)
        await a.setRemoteDescription(RTCSessionDescription(b.localDescription.sdp, "answer"))
        install_receive_path(a)
        (sender,) = a.getSenders()
        async with asyncio.timeout(20):
            while getattr(sender, SENDER_LSR_ATTR) is None:  # the first SR not sent yet
                await asyncio.sleep(0.05)
        lsr = getattr(sender, SENDER_LSR_ATTR)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # NTP steps an hour
        rr = RtcpRrPacket(
            ssrc=1,
            reports=[RtcpReceiverInfo(sender._ssrc, 0, 0, 0, 0, lsr=lsr, dlsr=1)],
        )
        await sender._handle_rtcp_packet(rr)  # no await inside for an RR: same loop turn
        rtt = (await remote_rtt_s(a))[0]
    finally:
        await a.close()
        await b.close()
    assert rtt is not None
    assert 0 <= rtt < 2.0, f"an hour's clock step reported as {rtt:.1f} s of RTT"


def test_rtcp_of_senders_and_receivers_is_timed_on_the_monotonic_clock() -> None:
    """Process-wide once a call's receive path is installed (DLSR of our RRs included)."""
    monotonic_rtcp_clocks()
    assert aiortc.rtcrtpsender.time.time is time.monotonic  # type: ignore[attr-defined]
    assert aiortc.rtcrtpreceiver.time.time is time.monotonic  # type: ignore[attr-defined]
