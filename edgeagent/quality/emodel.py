"""ITU-T G.107 E-model, simplified (A = 0, default Ro and Is): R factor and MOS from delay and loss.

See ../shared/quality.md. The one-way delay is built from measured parts; the
loss robustness `bpl` is chosen by what the receiving decoder really does.
Deliberately not the lenient `rtt + 2*jitter + 10` shortcut.
"""

from __future__ import annotations

import bisect
from enum import StrEnum

R_MAX = 93.2
"""R with no impairments (G.107 defaults: Ro - Is)."""

BPL_SILENCE_ON_LOSS = 6.0
"""Opus receiver that plays a lost frame as silence or skips it (aiortc as shipped)."""
BPL_FADE = 14.6
"""Our receive path: no decoder PLC (PyAV cannot ask libopus for it), the playout
buffer repeats the last good frame fading out over 3 frames, then silence.

Fitted the way quality.md's Bpl values were (P.834 style: PESQ NB of libopus
output under seeded random loss, Ie_eff = 93.2 - R(PESQ), Bpl solved from
Ie_eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl)): our `MonoOpusEncoder` at 32 kbit/s,
decoded and played through `PlayoutBuffer`, 1-20 % loss x 3 seeds, median of 15
fits (11-33, most 12-18). `bench/mos_vs_pesq.py --derive` repeats the fit; the
real-call table of that bench (other seeds, real calls) validates it.
"""
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
    FADE = "fade"
    OPUS_PLC = "opus_plc"
    OPUS_PLC_FEC = "opus_plc_fec"
    G711_PLC = "g711_plc"
    G711 = "g711"


BPL: dict[LossHandling, float] = {
    LossHandling.SILENCE: BPL_SILENCE_ON_LOSS,
    LossHandling.FADE: BPL_FADE,
    LossHandling.OPUS_PLC: BPL_OPUS_PLC,
    LossHandling.OPUS_PLC_FEC: BPL_OPUS_PLC_FEC,
    LossHandling.G711_PLC: BPL_G711_PLC,
    LossHandling.G711: BPL_G711,
}

OPUS_CODEC_MS = 6.5
"""Opus algorithmic delay (lookahead), default frame size."""
DEFAULT_DEVICE_MS = 20.0
"""Capture + playback device buffers when not measured (one 10 ms ALSA period each side)."""


OPUS_IE_POINTS: tuple[tuple[float, float], ...] = (
    (16.0, 34.5),
    (24.0, 29.9),
    (32.0, 24.6),
    (48.0, 14.6),
    (64.0, 9.7),
)
"""(kbit/s, Ie) of our `MonoOpusEncoder` (voip, mono, 20 ms, complexity 5, in-band FEC
with a 10 % loss hint), from PESQ NB at 0 % loss: Ie = 93.2 - R(MOS-LQO).

quality.md's "Ie about 0 for Opus at 24 kbit/s or more" does not hold for this
encoder setting: complexity 5 and FEC (whose redundancy our receiver cannot
use) cost quality, e.g. 32 kbit/s gives PESQ NB 3.53 (3.77 without FEC, 3.90 at
complexity 10, 4.43 at 64 kbit/s without FEC at complexity 10).
"""


def opus_ie(bitrate_kbps: float) -> float:
    """Ie of our Opus encoder at `bitrate_kbps`, interpolated in OPUS_IE_POINTS (clamped ends)."""
    rates = [r for r, _ in OPUS_IE_POINTS]
    if bitrate_kbps <= rates[0]:
        return OPUS_IE_POINTS[0][1]
    if bitrate_kbps >= rates[-1]:
        return OPUS_IE_POINTS[-1][1]
    i = bisect.bisect_right(rates, bitrate_kbps)
    (r0, ie0), (r1, ie1) = OPUS_IE_POINTS[i - 1], OPUS_IE_POINTS[i]
    return ie0 + (ie1 - ie0) * (bitrate_kbps - r0) / (r1 - r0)


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
