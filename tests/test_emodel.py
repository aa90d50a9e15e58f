"""E-model: reference points from quality.md and the shape of the impairments."""

from __future__ import annotations

import itertools

import pytest

from edgeagent.quality.emodel import (
    BPL,
    BPL_FADE,
    BPL_OPUS_PLC,
    BPL_OPUS_PLC_FEC,
    BPL_SILENCE_ON_LOSS,
    OPUS_IE_BY_COMPLEXITY,
    OPUS_IE_POINTS,
    LossHandling,
    delay_impairment,
    effective_equipment_impairment,
    mos_from_r,
    one_way_delay_ms,
    opus_ie,
    own_loss_handling,
    r_factor,
    receiver_loss_handling,
)


@pytest.mark.parametrize(("r", "mos"), [(93.2, 4.41), (80.0, 4.02), (70.0, 3.60), (60.0, 3.10)])
def test_mos_reference_points(r: float, mos: float) -> None:
    assert mos_from_r(r) == pytest.approx(mos, abs=0.005)


def test_mos_is_clamped_and_monotonic() -> None:
    assert mos_from_r(-5.0) == 1.0
    assert mos_from_r(120.0) == 4.5
    values = [mos_from_r(r / 2) for r in range(0, 201)]
    assert all(a <= b for a, b in itertools.pairwise(values))


def test_no_impairment_gives_r_93_2() -> None:
    assert r_factor(0.0, 0.0) == pytest.approx(93.2)


def test_delay_impairment_knee_at_177_3_ms() -> None:
    assert delay_impairment(100.0) == pytest.approx(2.4)
    assert delay_impairment(177.3) == pytest.approx(0.024 * 177.3)
    assert delay_impairment(300.0) == pytest.approx(0.024 * 300 + 0.11 * (300 - 177.3))


def test_loss_impairment_depends_on_receiver_behaviour() -> None:
    # 5 % loss, Bpl 6 (silence on loss): 95 * 5 / (5 + 6)
    assert effective_equipment_impairment(5.0, bpl=BPL_SILENCE_ON_LOSS) == pytest.approx(
        95 * 5 / 11
    )
    silence = r_factor(60.0, 2.0, bpl=BPL[LossHandling.SILENCE])
    plc = r_factor(60.0, 2.0, bpl=BPL_OPUS_PLC)
    fec = r_factor(60.0, 2.0, bpl=BPL_OPUS_PLC_FEC)
    assert silence < plc < fec
    # bursty loss hurts more than random loss at the same rate
    assert r_factor(60.0, 2.0, bpl=BPL_OPUS_PLC, burst_r=2.0) < plc


def test_mos_falls_monotonically_with_loss_and_is_strict_without_plc() -> None:
    d = one_way_delay_ms(rtt_ms=40.0, playout_ms=60.0)
    mos = [mos_from_r(r_factor(d, loss)) for loss in (0, 1, 2, 5, 10, 20)]
    assert all(a > b for a, b in itertools.pairwise(mos))
    # A receiver without PLC at 5 % loss is a poor call, not the "fair" the lenient formula says.
    assert mos[3] < 2.6
    assert mos[0] > 4.3


def test_one_way_delay_is_built_from_measured_parts() -> None:
    assert one_way_delay_ms(100.0, 80.0, packet_ms=20.0, codec_ms=6.5, device_ms=30.0) == (
        pytest.approx(50 + 80 + 20 + 6.5 + 30)
    )
    assert one_way_delay_ms(0.0, 0.0, device_ms=0.0) == pytest.approx(26.5)


def test_fade_concealment_sits_between_silence_and_fec() -> None:
    assert BPL[LossHandling.FADE] == BPL_FADE
    assert BPL_SILENCE_ON_LOSS < BPL_FADE < BPL_OPUS_PLC_FEC
    fade = r_factor(60.0, 5.0, bpl=BPL_FADE)
    assert r_factor(60.0, 5.0, bpl=BPL_SILENCE_ON_LOSS) < fade < r_factor(60.0, 5.0, bpl=33.0)


def test_opus_ie_interpolates_the_measured_points_and_clamps() -> None:
    assert OPUS_IE_BY_COMPLEXITY[10] == OPUS_IE_POINTS  # the default encoder
    for kbps, ie in OPUS_IE_POINTS:
        assert opus_ie(kbps) == pytest.approx(ie)
    assert opus_ie(28.0) == pytest.approx((15.9 + 10.7) / 2)
    assert opus_ie(6.0) == OPUS_IE_POINTS[0][1]
    assert opus_ie(510.0) == OPUS_IE_POINTS[-1][1]
    for complexity in (5, 10):
        values = [opus_ie(k, complexity) for k in range(8, 80, 2)]
        assert all(a >= b for a, b in itertools.pairwise(values))
        assert all(ie >= 0.0 for _, ie in OPUS_IE_BY_COMPLEXITY[complexity])


def test_opus_ie_falls_with_complexity_and_clamps_below_the_measured_range() -> None:
    for kbps in (16.0, 24.0, 32.0, 48.0, 64.0):
        assert opus_ie(kbps, 10) < opus_ie(kbps, 5)
        assert opus_ie(kbps, 5) > opus_ie(kbps, 7) > opus_ie(kbps, 10)
    assert opus_ie(32.0, 7) == pytest.approx(19.5 + (10.7 - 19.5) * 2 / 5)
    assert opus_ie(32.0, 0) == opus_ie(32.0, 5) == pytest.approx(19.5)


def test_far_end_concealment_is_plc_with_fec_when_we_send_it() -> None:
    # FEC goes only to a far end that decodes it (opus.far_end_decodes_fec).
    assert receiver_loss_handling(fec_sent=False) is LossHandling.OPUS_PLC
    assert receiver_loss_handling(fec_sent=True) is LossHandling.OPUS_PLC_FEC


def test_our_receive_path_is_plc_with_libopus_and_fades_without() -> None:
    assert own_loss_handling(True) is LossHandling.OPUS_PLC
    assert own_loss_handling(True, fec=True) is LossHandling.OPUS_PLC_FEC
    assert own_loss_handling(False) is LossHandling.FADE
    assert own_loss_handling(False, fec=True) is LossHandling.FADE  # PyAV cannot use FEC


def test_a_clean_call_with_our_defaults_is_good_and_was_not_with_the_old_encoder() -> None:
    from edgeagent.call.session import MOS_DEGRADED, MOS_GOOD, health_for

    d = one_way_delay_ms(rtt_ms=1.0, playout_ms=55.0)
    clean = mos_from_r(r_factor(d, 0.0, ie=opus_ie(32.0, 10), bpl=BPL_FADE))
    assert clean > MOS_GOOD + 0.2
    assert health_for(clean, False, []) == ("good", ())
    # Complexity 5 with the fixed 10 % hint measured Ie 24.6: a clean call came out
    # "degraded" because of our own encoder, not the network.
    old = mos_from_r(r_factor(d, 0.0, ie=24.6, bpl=BPL_FADE))
    assert MOS_DEGRADED < old < MOS_GOOD
    # The thresholds are G.107/G.109's R = 70 and R = 60 boundaries.
    assert pytest.approx(mos_from_r(70.0), abs=0.01) == MOS_GOOD
    assert pytest.approx(mos_from_r(60.0), abs=0.01) == MOS_DEGRADED


def test_our_receiver_model_matches_the_bench_pesq_table() -> None:
    """bench/mos_vs_pesq.py real calls (PESQ NB): the model stays within 0.3 of each point."""
    d = one_way_delay_ms(rtt_ms=1.0, playout_ms=50.0)
    # Defaults: 32 kbit/s, complexity 10, loss hint 0 (agent to agent: no FEC).
    table = [(0.0, 4.18), (1.38, 3.83), (2.48, 3.27), (5.98, 2.69), (10.58, 1.87), (20.81, 1.55)]
    for loss, pesq_nb in table:
        mos = mos_from_r(r_factor(d, loss, ie=opus_ie(32.0, 10), bpl=BPL_FADE))
        assert abs(mos - pesq_nb) <= 0.3, (loss, mos, pesq_nb)


def test_plc_with_fec_matches_the_bench_pesq_table_between_agents() -> None:
    """bench/mos_vs_pesq.py, both ends agents with libopus: PLC plus the far end's FEC."""
    d = one_way_delay_ms(rtt_ms=1.0, playout_ms=50.0)
    table = [(0.0, 4.16), (1.37, 3.99), (2.50, 3.81), (5.99, 3.51), (10.60, 3.14), (20.94, 2.30)]
    plc_alone = [(5.98, 2.89), (10.60, 2.18), (20.85, 1.74)]  # the same drops without FEC
    for loss, pesq_nb in table:
        mos = mos_from_r(r_factor(d, loss, ie=opus_ie(32.0, 10), bpl=BPL_OPUS_PLC_FEC))
        assert abs(mos - pesq_nb) <= 0.3, (loss, mos, pesq_nb)
    for loss, pesq_nb in plc_alone:
        with_fec = mos_from_r(r_factor(d, loss, ie=opus_ie(32.0, 10), bpl=BPL_OPUS_PLC_FEC))
        assert with_fec - pesq_nb > 0.3  # FEC's model is not the PLC-alone one
