"""Normalising aiortc 1.16 stats: units, missing values, per-window deltas."""

from __future__ import annotations

import asyncio
import datetime
import itertools

import pytest
from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCStatsReport,
    RTCTransportStats,
)

from edgeagent.quality.stats import NetworkStats, OutageLoss, normalise, window

T0 = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)


def report(
    t_s: float,
    *,
    received: int,
    lost: int,
    jitter: int,
    sent: int,
    bytes_sent: int,
    bytes_received: int,
    rtt_s: float | None,
    fraction_lost: int = 0,
    remote_lost: int = 0,
) -> RTCStatsReport:
    ts = T0 + datetime.timedelta(seconds=t_s)
    r = RTCStatsReport()
    r.add(
        RTCInboundRtpStreamStats(
            timestamp=ts,
            type="inbound-rtp",
            id="in",
            ssrc=1,
            kind="audio",
            transportId="t",
            packetsReceived=received,
            packetsLost=lost,
            jitter=jitter,
        )
    )
    r.add(
        RTCOutboundRtpStreamStats(
            timestamp=ts,
            type="outbound-rtp",
            id="out",
            ssrc=2,
            kind="audio",
            transportId="t",
            packetsSent=sent,
            bytesSent=bytes_sent,
            trackId="x",
        )
    )
    r.add(
        RTCRemoteInboundRtpStreamStats(
            timestamp=ts,
            type="remote-inbound-rtp",
            id="rin",
            ssrc=2,
            kind="audio",
            transportId="t",
            packetsReceived=sent - remote_lost,
            packetsLost=remote_lost,
            jitter=96,
            roundTripTime=rtt_s,
            fractionLost=fraction_lost,  # type: ignore[arg-type]
        )
    )
    r.add(
        RTCTransportStats(
            timestamp=ts,
            type="transport",
            id="t",
            packetsSent=sent,
            packetsReceived=received,
            bytesSent=bytes_sent,
            bytesReceived=bytes_received,
            iceRole="controlling",
            dtlsState="connected",
        )
    )
    return r


def test_units_are_normalised() -> None:
    ns = normalise(
        report(
            0,
            received=100,
            lost=2,
            jitter=960,
            sent=100,
            bytes_sent=16000,
            bytes_received=17000,
            rtt_s=0.085,
            fraction_lost=64,
            remote_lost=3,
        )
    )
    assert ns.jitter_ms == pytest.approx(20.0)  # 960 RTP units at 48 kHz
    assert ns.rtt_ms == pytest.approx(85.0)
    assert ns.remote_fraction_lost == pytest.approx(0.25)  # 64 / 256
    assert ns.remote_jitter_ms == pytest.approx(2.0)
    assert ns.packets_received == 100 and ns.packets_lost == 2
    assert ns.at_s == pytest.approx(T0.timestamp())


def test_missing_rtt_stays_none_and_dicts_work_too() -> None:
    ns = normalise(
        report(0, received=1, lost=0, jitter=0, sent=1, bytes_sent=1, bytes_received=1, rtt_s=None)
    )
    assert ns.rtt_ms is None
    as_dicts = [
        {
            "type": "inbound-rtp",
            "kind": "audio",
            "packetsReceived": 10,
            "packetsLost": 1,
            "jitter": 480,
        },
        {
            "type": "inbound-rtp",
            "kind": "video",
            "packetsReceived": 99,
            "packetsLost": 9,
            "jitter": 9000,
        },
    ]
    ns = normalise(as_dicts, at_s=12.5)
    assert (ns.packets_received, ns.packets_lost, ns.jitter_ms, ns.at_s) == (10, 1, 10.0, 12.5)
    assert ns.rtt_ms is None and ns.remote_fraction_lost is None


def test_window_loss_and_bitrate_from_deltas() -> None:
    a = normalise(
        report(
            0,
            received=250,
            lost=0,
            jitter=240,
            sent=250,
            bytes_sent=40_000,
            bytes_received=42_000,
            rtt_s=0.05,
        )
    )
    b = normalise(
        report(
            5,
            received=475,
            lost=25,
            jitter=480,
            sent=500,
            bytes_sent=120_000,
            bytes_received=112_000,
            rtt_s=0.06,
            remote_lost=5,
        )
    )
    w = window(a, b)
    assert w.duration_s == pytest.approx(5.0)
    assert w.loss_pct == pytest.approx(10.0)  # 25 lost of 250 expected in the window
    assert (w.packets_received, w.packets_lost) == (225, 25)
    assert w.jitter_ms == pytest.approx(10.0)
    assert w.rtt_ms == pytest.approx(60.0)
    assert w.tx_bitrate_kbps == pytest.approx(80_000 * 8 / 5 / 1000)
    assert w.rx_bitrate_kbps == pytest.approx(70_000 * 8 / 5 / 1000)
    assert w.remote_loss_pct == pytest.approx(2.0)  # 5 of 250 sent


def test_first_window_and_stalled_and_duplicate_reports() -> None:
    first = NetworkStats(at_s=10.0, packets_received=100, packets_lost=5)
    w = window(None, first)
    assert w.loss_pct == pytest.approx(100 * 5 / 105)
    assert w.tx_bitrate_kbps is None and w.rx_bitrate_kbps is None
    stalled = NetworkStats(at_s=15.0, packets_received=100, packets_lost=3)  # RTCP dup fix-up
    w = window(first, stalled)
    assert w.loss_pct is None  # nothing expected: media stalled, no loss figure
    assert w.packets_received == 0 and w.packets_lost == 0


async def test_the_first_quality_sample_covers_the_first_interval_of_the_call() -> None:
    """Baseline at the start of `run()`, so a quality message every `stats_interval_s`
    from the first one on (protocol section 2), not from twice the interval."""
    from edgeagent.call.session import CallSession
    from edgeagent.clock import FakeClock
    from edgeagent.config import CallConfig, Config, DeviceConfig

    clock = FakeClock()
    cfg = Config(device=DeviceConfig(id="dev-1"), call=CallConfig(stats_interval_s=2.0))
    session = CallSession(
        cfg,
        "c1",
        clock=clock,
        on_quality=lambda _s: None,
        on_issue=lambda _c: None,
        on_health=lambda _s, _w: None,
        on_media_stalled=lambda _s: None,
    )
    taken: list[tuple[bool, float]] = []  # (had a baseline, when)

    async def sample(prev: NetworkStats | None, now: float) -> NetworkStats:
        taken.append((prev is not None, now))
        stats = report(
            now, received=0, lost=0, jitter=0, sent=0, bytes_sent=0, bytes_received=0, rtt_s=None
        )
        return normalise(stats, at_s=now)

    session._sample = sample  # type: ignore[method-assign]
    loop = asyncio.ensure_future(session._stats_loop())
    try:
        await clock.advance(2.0)
        assert taken == [(False, 0.0), (True, 2.0)]  # a windowed sample, i.e. a message
        await clock.advance(2.0)
        assert taken[-1] == (True, 4.0)
    finally:
        loop.cancel()
        await session.pc.close()


def _stats(t_s: float, received: int, lost: int) -> NetworkStats:
    return NetworkStats(at_s=t_s, packets_received=received, packets_lost=lost)


def test_an_outage_counts_once_as_loss_whether_or_not_the_stream_comes_back() -> None:
    """1 s windows at 50 packets/s: 2 good, 3 with nothing, then the stream resumes half
    way into a window and the receiver counts the whole 3.5 s gap (175) as lost."""
    outages = OutageLoss()
    reports = [
        _stats(0, 0, 0),
        _stats(1, 50, 0),
        _stats(2, 100, 0),
        _stats(3, 100, 0),
        _stats(4, 100, 0),
        _stats(5, 100, 0),
        _stats(6, 125, 175),  # 0.5 s of packets; the gap seen as lost at last
        _stats(7, 174, 176),  # one ordinary loss after: not taken off
    ]
    got = [
        outages.adjust(window(prev, cur), media_flowed=True)
        for prev, cur in itertools.pairwise(reports)
    ]
    assert [w.loss_pct for w, _ in got] == [0.0, 0.0, 100.0, 100.0, 100.0, 50.0, 2.0]
    assert [empty for _, empty in got] == [False, False, True, True, True, False, False]
    # Packets lost over the call: the real gap (175) plus the ordinary one, not 325.
    assert sum(w.packets_lost for w, _ in got) == 176
    assert outages.outage_s == 3.0


def test_no_outage_before_media_flowed_or_in_a_zero_length_window() -> None:
    outages = OutageLoss()
    before = window(_stats(0, 0, 0), _stats(1, 0, 0))
    assert outages.adjust(before, media_flowed=False) == (before, False)
    assert before.loss_pct is None
    first = window(None, _stats(1, 0, 0))  # the first report: no duration
    assert outages.adjust(first, media_flowed=True) == (first, False)
    assert outages.outage_s == 0.0 and outages.assumed == 0


def test_credit_left_when_the_stream_comes_back_without_a_gap_is_dropped() -> None:
    """A far end that restarts its stream (new sequence numbers) shows no gap: the
    packets counted in the empty window are not taken off a later, real loss."""
    outages = OutageLoss()
    outages.adjust(window(_stats(0, 50, 0), _stats(1, 50, 0)), media_flowed=True)
    back, _ = outages.adjust(window(_stats(1, 50, 0), _stats(2, 100, 0)), media_flowed=True)
    later, _ = outages.adjust(window(_stats(2, 100, 0), _stats(3, 140, 10)), media_flowed=True)
    assert back.loss_pct == 0.0 and later.loss_pct == 20.0
