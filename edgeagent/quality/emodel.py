"""ITU-T G.107 E-model, simplified (A = 0, default Ro and Is): R factor and MOS from delay and loss.

See ../shared/quality.md. The one-way delay is built from measured parts; the
loss robustness `bpl` is chosen by what the receiving decoder really does.
Deliberately not the lenient `rtt + 2*jitter + 10` shortcut.
"""

from __future__ import annotations

from enum import StrEnum

R_MAX = 93.2
"""R with no impairments (G.107 defaults: Ro - Is)."""

BPL_SILENCE_ON_LOSS = 6.0
"""Opus receiver that plays a lost frame as silence or skips it (aiortc as shipped)."""
BPL_OPUS_PLC = 12.0
"""Opus with packet-loss concealment."""
BPL_OPUS_PLC_FEC = 33.0
"""Opus with PLC and in-band FEC, random loss (FEC helps little with bursty loss)."""
BPL_G711_PLC = 25.1
"""G.711 with PLC (G.113 Appendix I)."""
BPL_G711 = 4.3
"""G.711 without PLC (G.113 Appendix I)."""


class LossHandling(StrEnum):
    """What the receiving decoder does with a lost frame."""

    SILENCE = "silence"
    OPUS_PLC = "opus_plc"
    OPUS_PLC_FEC = "opus_plc_fec"
    G711_PLC = "g711_plc"
    G711 = "g711"


BPL: dict[LossHandling, float] = {
    LossHandling.SILENCE: BPL_SILENCE_ON_LOSS,
    LossHandling.OPUS_PLC: BPL_OPUS_PLC,
    LossHandling.OPUS_PLC_FEC: BPL_OPUS_PLC_FEC,
    LossHandling.G711_PLC: BPL_G711_PLC,
    LossHandling.G711: BPL_G711,
}

OPUS_CODEC_MS = 6.5
"""Opus algorithmic delay (lookahead), default frame size."""
DEFAULT_DEVICE_MS = 20.0
"""Capture + playback device buffers when not measured (one 10 ms ALSA period each side)."""


def one_way_delay_ms(
    rtt_ms: float,
    playout_ms: float,
    packet_ms: float = 20.0,
    codec_ms: float = OPUS_CODEC_MS,
    device_ms: float = DEFAULT_DEVICE_MS,
) -> float:
    """Mouth-to-ear delay: RTT/2 + playout buffer depth + packetisation + codec + device buffers."""
    return max(0.0, rtt_ms) / 2.0 + max(0.0, playout_ms) + packet_ms + codec_ms + device_ms


def delay_impairment(d_ms: float) -> float:
    """Id for a one-way delay in ms."""
    d = max(0.0, d_ms)
    return 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)


def effective_equipment_impairment(
    loss_pct: float, *, ie: float = 0.0, bpl: float = BPL_SILENCE_ON_LOSS, burst_r: float = 1.0
) -> float:
    """Ie_eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)."""
    ppl = min(100.0, max(0.0, loss_pct))
    if ppl == 0.0:
        return ie
    return ie + (95.0 - ie) * ppl / (ppl / burst_r + bpl)


def r_factor(
    one_way_delay_ms: float,
    loss_pct: float,
    *,
    ie: float = 0.0,
    bpl: float = BPL_SILENCE_ON_LOSS,
    burst_r: float = 1.0,
) -> float:
    """R = 93.2 - Id - Ie_eff (A = 0); not clamped, so very bad calls go below 0."""
    return (
        R_MAX
        - delay_impairment(one_way_delay_ms)
        - effective_equipment_impairment(loss_pct, ie=ie, bpl=bpl, burst_r=burst_r)
    )


def mos_from_r(r: float) -> float:
    """G.107 mapping of R to MOS-CQE (1.0 .. 4.5; the cubic dips below 1 for R < 6.5: clamped)."""
    if r <= 0.0:
        return 1.0
    if r >= 100.0:
        return 4.5
    return max(1.0, 1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r))
