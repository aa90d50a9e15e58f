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
BPL_FADE = 9.8
"""Our receive path without libopus0 (decoding through PyAV, which cannot ask libopus
for PLC): the playout buffer repeats the last good frame fading out over 3 frames,
then silence.

Fitted the way quality.md's Bpl values were (P.834 style: PESQ NB of libopus
output under seeded random loss, Ie_eff = 93.2 - R(PESQ), Bpl solved from
Ie_eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl)): our Opus encoder with its
defaults (32 kbit/s, complexity 10, loss hint 0, so no FEC), decoded and played
through `PlayoutBuffer`, 1-20 % loss x 3 seeds, median of 15 fits (6.3-14.8).
Lower than the 14.6 fitted for complexity 5 with a fixed 10 % hint: PESQ under
loss is about the same, but the clean reference (Ie) is better, so loss costs
relatively more. `bench/mos_vs_pesq.py --derive` repeats the fit; the
real-call table of that bench (other seeds, real calls) validates it.
"""
BPL_OPUS_PLC = 12.3
"""Opus with libopus packet-loss concealment: our receive path (`PlcDecoder`), and
assumed for any libopus receiver. Fitted on real agent-to-agent calls through the
lossy relay, on other seeds than the validation table's (`bench/mos_vs_pesq.py
--seed0 101 --seeds 2 --bpl-fit`: median of 10 lossy calls, 4.2-17.7); quality.md's
bench gave about 12. The offline fit (`--derive`, decoder and playout buffer without
a call) gives 10.2 and understates what PLC gains in a call (real calls on the
validation seeds: PESQ NB +0.14 to +0.42 over the fade at 1-20 % loss)."""
BPL_OPUS_PLC_FEC = 25.8
"""Opus with PLC and in-band FEC, random loss (FEC helps little with bursty loss), as our
encoder sends it: FEC from the moment the adaptive loss hint rises (`opus.LossHint`, a
few seconds into the loss), decoded by libopus. Fitted on real agent-to-agent calls
through the lossy relay, where both ends send and decode FEC (`bench/mos_vs_pesq.py
--seed0 101 --seeds 2 --bpl-fit`: median of 10 lossy calls, 6.1-35.1), validated on the
table's seeds. quality.md gives 33 for FEC at a fixed hint, from the first lost packet."""
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


OPUS_IE_BY_COMPLEXITY: dict[int, tuple[tuple[float, float], ...]] = {
    5: ((16.0, 34.9), (24.0, 26.1), (32.0, 19.5), (48.0, 11.0), (64.0, 5.3)),
    10: ((16.0, 25.6), (24.0, 15.9), (32.0, 10.7), (48.0, 7.0), (64.0, 0.0)),
}
"""(kbit/s, Ie) of our Opus encoder (voip, mono, 20 ms, loss hint 0 so no FEC
bits) at complexity 5 and 10, from PESQ NB at 0 % loss through `PlayoutBuffer`:
Ie = 93.2 - R(MOS-LQO) (`bench/mos_vs_pesq.py --derive`). Fitted with PyAV's
libopus build (`MonoOpusEncoder`); the system libopus 1.3.1 through ctypes, which
the agent now encodes with (`LibopusMonoEncoder`), gives every point within 1.4
(2026-11-27: 32 kbit/s complexity 10, Ie 11.1 against 10.7). 64 kbit/s at
complexity 10 scored PESQ NB 4.45, above what the narrowband E-model can
express (4.41): Ie 0.

quality.md's "Ie about 0 for Opus at 24 kbit/s or more" does not hold for our
encoder: 32 kbit/s scores PESQ NB 4.11 at complexity 10 (3.76 at complexity 5,
3.51 at complexity 5 with the old fixed 10 % loss hint, Ie 24.6).
"""
OPUS_IE_POINTS = OPUS_IE_BY_COMPLEXITY[10]
"""The default encoder's points (complexity 10)."""


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    xs = [p for p, _ in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def opus_ie(bitrate_kbps: float, complexity: int = 10) -> float:
    """Ie of our Opus encoder at `bitrate_kbps` and `complexity` (0..10).

    Interpolated in bitrate (clamped at 16 and 64 kbit/s) and linearly in
    complexity between the measured 5 and 10; below 5 the complexity-5 figure
    is used, which flatters complexities 0-4 (not measured).
    """
    low = _interpolate(OPUS_IE_BY_COMPLEXITY[5], bitrate_kbps)
    high = _interpolate(OPUS_IE_BY_COMPLEXITY[10], bitrate_kbps)
    share = min(1.0, max(0.0, (complexity - 5) / 5.0))
    return low + (high - low) * share


def receiver_loss_handling(*, fec_sent: bool) -> LossHandling:
    """How the far end conceals our lost packets: libopus PLC, with FEC when we send it.

    FEC is sent only to a far end that decodes it (a browser, a SIP phone, an agent
    with libopus: `opus.far_end_decodes_fec`); a stock aiortc peer gets none, and
    is assumed to run libopus PLC like the rest (it plays silence: optimistic there).
    """
    return LossHandling.OPUS_PLC_FEC if fec_sent else LossHandling.OPUS_PLC


def own_loss_handling(plc: bool, *, fec: bool = False) -> LossHandling:
    """How our own receive path conceals: libopus PLC (with FEC when the far end sends it),
    or the playout buffer's fade without libopus.

    `fec`: the far end sends in-band FEC under loss: it decodes FEC itself and we
    asked for it (`useinbandfec=1`), as a browser or an agent with libopus does.
    """
    if not plc:
        return LossHandling.FADE
    return LossHandling.OPUS_PLC_FEC if fec else LossHandling.OPUS_PLC


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
