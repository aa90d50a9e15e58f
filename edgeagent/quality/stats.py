"""Normalise aiortc 1.16 `getStats()` output and compute per-window network figures.

aiortc units differ from the W3C spec (../shared/quality.md): `jitter` is in
RTP clock units, `fractionLost` is the raw RTCP byte, `roundTripTime` is a
smoothed value in seconds and None until the first report pair, and the packet
counters are cumulative. `normalise()` turns a report into plain figures;
`window()` turns two consecutive ones into loss, bitrate and packet deltas.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

OPUS_CLOCK_HZ = 48000


@dataclass(frozen=True, slots=True)
class NetworkStats:
    """One report, in our units. Counters are cumulative; None where the report has no value."""

    at_s: float
    packets_received: int = 0
    packets_lost: int = 0
    jitter_ms: float | None = None
    packets_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_ms: float | None = None
    remote_fraction_lost: float | None = None
    remote_packets_lost: int | None = None
    remote_jitter_ms: float | None = None


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Figures for the window between two reports."""

    duration_s: float
    loss_pct: float | None
    jitter_ms: float | None
    rtt_ms: float | None
    packets_received: int
    packets_lost: int
    tx_bitrate_kbps: float | None
    rx_bitrate_kbps: float | None
    remote_loss_pct: float | None


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _seconds(ts: Any) -> float | None:
    if isinstance(ts, datetime.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=datetime.UTC)
        return float(ts.timestamp())
    if isinstance(ts, int | float):
        return float(ts)
    return None


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int | float) else 0


def normalise(
    report: Mapping[str, Any] | Iterable[Any],
    *,
    at_s: float | None = None,
    clock_rate_hz: int = OPUS_CLOCK_HZ,
    kind: str = "audio",
) -> NetworkStats:
    """Plain figures from an RTCStatsReport (or a list of stats objects or dicts).

    Counters of several streams of `kind` are summed, jitter is the worst one.
    `at_s` is when the report was taken (pass a monotonic time); by default the
    newest stats timestamp, in POSIX seconds.
    """
    items = report.values() if isinstance(report, Mapping) else report
    newest: float | None = None
    recv = lost = sent = bytes_sent = bytes_received = 0
    jitter: float | None = None
    rtt: float | None = None
    r_fraction: float | None = None
    r_lost: int | None = None
    r_jitter: float | None = None
    per_ms = clock_rate_hz / 1000.0
    for s in items:
        ts = _seconds(_get(s, "timestamp"))
        if ts is not None and (newest is None or ts > newest):
            newest = ts
        typ = _get(s, "type")
        if typ != "transport" and _get(s, "kind") not in (None, kind):
            continue
        if typ == "inbound-rtp":
            recv += _int(_get(s, "packetsReceived"))
            lost += _int(_get(s, "packetsLost"))
            j = _get(s, "jitter")
            if j is not None:
                jitter = max(jitter or 0.0, j / per_ms)
        elif typ == "outbound-rtp":
            sent += _int(_get(s, "packetsSent"))
            bytes_sent += _int(_get(s, "bytesSent"))
        elif typ == "remote-inbound-rtp":
            t = _get(s, "roundTripTime")
            if t is not None:
                rtt = max(rtt or 0.0, t * 1000.0)
            f = _get(s, "fractionLost")
            if f is not None:
                r_fraction = max(r_fraction or 0.0, f / 256.0)
            r_lost = (r_lost or 0) + _int(_get(s, "packetsLost"))
            j = _get(s, "jitter")
            if j is not None:
                r_jitter = max(r_jitter or 0.0, j / per_ms)
        elif typ == "transport":
            bytes_received += _int(_get(s, "bytesReceived"))
    if at_s is None:
        at_s = newest if newest is not None else 0.0
    return NetworkStats(
        at_s=at_s,
        packets_received=recv,
        packets_lost=lost,
        jitter_ms=jitter,
        packets_sent=sent,
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        rtt_ms=rtt,
        remote_fraction_lost=r_fraction,
        remote_packets_lost=r_lost,
        remote_jitter_ms=r_jitter,
    )


def _kbps(delta_bytes: int, duration_s: float) -> float | None:
    if duration_s <= 0.0 or delta_bytes < 0:
        return None
    return delta_bytes * 8.0 / duration_s / 1000.0


def window(prev: NetworkStats | None, cur: NetworkStats) -> WindowStats:
    """Loss, bitrate and packet counts between two reports (since the start when `prev` is None).

    Loss is lost / (lost + received) over the deltas; RTCP can report fewer
    losses than before (duplicates), so negative deltas count as zero.
    """
    base = prev or NetworkStats(at_s=cur.at_s)
    duration = cur.at_s - base.at_s if prev is not None else 0.0
    d_recv = max(0, cur.packets_received - base.packets_received)
    d_lost = max(0, cur.packets_lost - base.packets_lost)
    expected = d_recv + d_lost
    loss = 100.0 * d_lost / expected if expected else None
    remote_loss: float | None = None
    d_sent = cur.packets_sent - base.packets_sent
    if cur.remote_packets_lost is not None and d_sent > 0:
        d_rlost = max(0, cur.remote_packets_lost - (base.remote_packets_lost or 0))
        remote_loss = min(100.0, 100.0 * d_rlost / d_sent)
    elif cur.remote_fraction_lost is not None:
        remote_loss = 100.0 * cur.remote_fraction_lost
    has_dt = prev is not None and duration > 0.0
    return WindowStats(
        duration_s=duration,
        loss_pct=loss,
        jitter_ms=cur.jitter_ms,
        rtt_ms=cur.rtt_ms,
        packets_received=d_recv,
        packets_lost=d_lost,
        tx_bitrate_kbps=_kbps(cur.bytes_sent - base.bytes_sent, duration) if has_dt else None,
        rx_bitrate_kbps=(
            _kbps(cur.bytes_received - base.bytes_received, duration) if has_dt else None
        ),
        remote_loss_pct=remote_loss,
    )


PACKETS_PER_S = 50
"""Inbound packets a second a sending far end gives: 20 ms Opus frames (aiortc, browsers)."""
MAX_PACKETS_PER_S = 100
"""The most a far end sends: 10 ms frames, the `minptime` our SDP asks for."""


class OutageLoss:
    """Counts a stats window with no inbound packet at all as 100 % loss.

    RTCP-style loss (`packetsLost`) only sees a gap once a later packet arrives: while
    nothing arrives the window has no loss figure, and a call that ends in such an
    outage (`media_timeout`) would average to the loss of its good windows only. Once
    media has flowed, an empty window counts `duration * PACKETS_PER_S` packets lost
    (`loss_pct` 100). When packets come back with their sequence numbers continued, the
    receiver counts the gap as lost; the packets already counted are taken off that
    window's loss (once: any left over is dropped then), so the outage is counted once.

    A window that counts more lost than the far end could have sent since it was last
    heard (`MAX_PACKETS_PER_S`) saw its sequence numbers jump (a sender that renumbered),
    not loss: its loss is unknown (None), not the 99 % the jump would make of it.
    """

    def __init__(self) -> None:
        self.assumed = 0  # packets counted lost in empty windows, not yet seen as a gap
        self.outage_s = 0.0
        self.renumbered = 0  # windows whose loss was a sequence jump
        self._unheard_s = 0.0  # empty windows since packets last came

    def adjust(self, win: WindowStats, *, media_flowed: bool) -> tuple[WindowStats, bool]:
        """The window with outages counted; True when it is one (no packet in it)."""
        if win.duration_s <= 0.0:
            return win, False
        if win.packets_received == 0:
            if not media_flowed:
                return win, False
            assumed = max(1, round(win.duration_s * PACKETS_PER_S))
            self.assumed += assumed
            self.outage_s += win.duration_s
            self._unheard_s += win.duration_s
            return replace(win, loss_pct=100.0, packets_lost=assumed), True
        unheard_s, self._unheard_s = self._unheard_s + win.duration_s, 0.0
        if win.packets_lost > unheard_s * MAX_PACKETS_PER_S:
            self.assumed = 0
            self.renumbered += 1
            return replace(win, loss_pct=None, packets_lost=0), False
        credit, self.assumed = min(self.assumed, win.packets_lost), 0
        if credit == 0:
            return win, False
        lost = win.packets_lost - credit
        expected = win.packets_received + lost
        loss = 100.0 * lost / expected if expected else None
        return replace(win, loss_pct=loss, packets_lost=lost), False
