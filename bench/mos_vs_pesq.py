"""The agent's MOS against PESQ MOS-LQO of what the far end really played, at 0-20 % loss.

Run: .venv/bin/python bench/mos_vs_pesq.py [--loss 0,1,2,5,10,20] [--seeds 1] [--bpl-fit]

Method. A mosquitto on a free loopback port and two in-process agents, dev-a
and dev-b, with ALSA `file` PCMs (paced to real time). dev-a dials dev-b
through `tests/lossy_relay.py`: a signaling proxy rewrites the SDP
candidates so the media of this ordinary agent-to-agent call crosses a
user-space UDP relay that drops a seeded random fraction of RTP packets (both
directions, no added delay). dev-a's microphone plays espeak-ng speech;
dev-b's speaker file is the received audio. After the call, the received
audio is aligned with the sent speech by cross-correlation (the lag of the
correlation peak), both are resampled with sox, and PESQ (PyPI `pesq`, ITU-T
P.862) scores the received speech against the sent speech.

The agent's MOS for the same direction (a -> b) is the mean of the `mos` of
dev-b's `calls/<id>/quality` messages (dev-b is the receiver of that
direction; one message per `call.stats_interval_s` = 1 s); the summary's
`mos_avg` is the same figure. `a.remote_mos` is dev-a's estimate of that
direction from RTCP receiver reports, printed for comparison. The session
publishes the E-model with Ie of our Opus encoder (`emodel.opus_ie` at the
configured bitrate and complexity) and Bpl of our receive path's concealment
(between two agents with libopus0: PLC plus the FEC the far end sends under loss,
`emodel.BPL_OPUS_PLC_FEC`; PLC alone `BPL_OPUS_PLC` from a far end that sends no
FEC; the fade's `BPL_FADE` without libopus0);
the target is judged on that published MOS. `recomputed`
is the same model applied here to the published per-window figures (loss,
RTT, playout depth), a check that the session does what the bench expects.

`--cost` prints the encoder's CPU per frame at complexity 5 and 10; `--derive`
repeats the offline Ie/Bpl fits (edgeagent/quality/emodel.py) without a call: the
fade's and libopus PLC's (`PlcDecoder`), on the same packets and seeded drops.

Which PESQ. Narrowband P.862 + P.862.1 mapping at 8 kHz is the headline: our
E-model is G.107 with its default (narrowband, handset) parameters, whose
scale tops out at R = 93.2 / MOS 4.41; the wideband E-model (G.107.1, R up to
129) and P.862.2 live on a different scale, where wideband speech without
impairment scores above what narrowband can express. Comparing like with
like means the narrowband listening-quality scale. Wideband PESQ (16 kHz,
P.862.2) is printed as well, for the record.

`--bpl-fit` also prints the Bpl that, at each loss, would make the E-model
meet narrowband PESQ exactly (holding the measured delay), so a Bpl can be
fitted on other seeds than the ones it is then validated on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from agent_support import collector  # noqa: E402
from alsa_support import bench_alsa, read_raw, speech_raw  # noqa: E402
from call_support import endpoint_config, running  # noqa: E402
from conftest import Broker, free_port, write_mosquitto_conf  # noqa: E402
from lossy_relay import Direction, lossy_link  # noqa: E402
from pesq import pesq  # noqa: E402

from edgeagent.quality import emodel  # noqa: E402

RATE = 48000
LEAD_S = 1.5  # silence before the speech: the call is set up while the mic already runs
TAIL_S = 1.0
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
)


@dataclass
class Row:
    loss_set: float
    seed: int
    loss_relay: float
    loss_agent: float | None
    mos_agent: float | None
    mos_proposed: float | None
    mos_summary: float | None
    remote_mos: float | None
    playout_ms: float | None
    rtt_ms: float | None
    pesq_nb: float
    pesq_wb: float
    confidence: float


def speech(tmp: Path) -> np.ndarray:
    parts = []
    for i, text in enumerate(SENTENCES):
        parts.append(read_raw(speech_raw(tmp / f"s{i}.raw", text)))
        parts.append(np.zeros(RATE * 3 // 10, dtype=np.int16))
    return np.concatenate(parts)


def resample(x: np.ndarray, rate: int) -> np.ndarray:
    """48 kHz int16 -> `rate` with sox (its default high-quality band-limited resampler)."""
    fmt = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1"]
    out = subprocess.run(
        ["sox", *fmt, "-r", str(RATE), "-", *fmt, "-r", str(rate), "-"],
        input=x.astype("<i2").tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, dtype="<i2").astype(np.float64)


def xcorr_lag(out: np.ndarray, ref: np.ndarray) -> tuple[int, float]:
    """Lag (samples) of `ref` inside `out`, and the correlation peak-to-median ratio."""
    n = 1 << int(np.ceil(np.log2(out.size + ref.size)))
    spec = np.fft.rfft(out.astype(np.float64), n) * np.conj(np.fft.rfft(ref.astype(np.float64), n))
    corr = np.abs(np.fft.irfft(spec, n)[: out.size])
    lag = int(np.argmax(corr))
    return lag, float(corr[lag] / (np.median(corr) + 1e-9))


def score(received: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(PESQ NB, PESQ WB, alignment confidence) of `received` against `ref`."""
    lag, confidence = xcorr_lag(received, ref)
    deg = received[lag : lag + ref.size]
    if deg.size < ref.size:
        deg = np.concatenate([deg, np.zeros(ref.size - deg.size, dtype=np.int16)])
    nb = float(pesq(8000, resample(ref, 8000), resample(deg, 8000), "nb"))
    wb = float(pesq(16000, resample(ref, 16000), resample(deg, 16000), "wb"))
    return nb, wb, confidence


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


async def one_call(tmp: Path, port: int, signal: np.ndarray, loss: float, seed: int) -> Row:
    alsa = bench_alsa(tmp)
    os.environ["ALSA_CONFIG_PATH"] = str(alsa.conf)
    mic = np.concatenate(
        [np.zeros(round(LEAD_S * RATE), np.int16), signal, np.zeros(RATE * 5, np.int16)]
    )
    cfg_a = endpoint_config(tmp, port, "dev-a", alsa, mic=mic)
    cfg_b = endpoint_config(tmp, port, "dev-b", alsa)
    spk_b = alsa.speakers["spk_dev-b"]
    wanted_bytes = 2 * (mic.size - RATE * 5 + round(TAIL_S * RATE))
    seams: dict[str, Any] = {"install_crash_hooks": False}
    async with (
        collector(port, "edge/v1/+/calls/#") as c,
        lossy_link(
            port,
            a="dev-a",
            b="dev-b",
            a_to_b=Direction(loss=loss, seed=seed),
            b_to_a=Direction(loss=loss, seed=seed + 1000),
        ) as (relay, proxy),
        running(cfg_b, **seams),
        running(cfg_a, **seams) as a,
    ):
        await a.calls_mgr.dial(proxy.alias_b)
        deadline = time.monotonic() + 60
        while not (spk_b.exists() and spk_b.stat().st_size >= wanted_bytes):
            if time.monotonic() > deadline:
                raise TimeoutError("dev-b did not play the speech within 60 s")
            await asyncio.sleep(0.2)
        await a.calls_mgr.hangup()
        summary = await c.wait_for(
            lambda ms: [m.json() for m in ms if m.topic.startswith("edge/v1/dev-b/calls/")
                        and m.topic.endswith("/summary")],
            timeout=10,
        )  # fmt: skip
    quality_b = [m.json() for m in c.messages if m.topic.startswith("edge/v1/dev-b/calls/")]
    quality_b = [q for q in quality_b if "r_factor" in q]
    quality_a = [
        m.json()
        for m in c.messages
        if m.topic.startswith("edge/v1/dev-a/calls/") and m.topic.endswith("/quality")
    ]
    nb, wb, confidence = score(read_raw(spk_b), signal)
    d = relay.a_to_b
    return Row(
        loss_set=loss,
        seed=seed,
        loss_relay=d.rtp_dropped / max(1, d.rtp_seen),
        loss_agent=_mean([q["loss_pct"] for q in quality_b if q["loss_pct"] is not None]),
        mos_agent=_mean([q["mos"] for q in quality_b if q["mos"] is not None]),
        mos_proposed=_mean([m for q in quality_b if (m := proposed_mos(q)) is not None]),
        mos_summary=summary[0]["mos_avg"],
        remote_mos=_mean([q["remote_mos"] for q in quality_a if q.get("remote_mos") is not None]),
        playout_ms=_mean([q["playout_delay_ms"] for q in quality_b]),
        rtt_ms=_mean([q["rtt_ms"] for q in quality_b if q["rtt_ms"] is not None]),
        pesq_nb=nb,
        pesq_wb=wb,
        confidence=confidence,
    )


def proposed_mos(q: dict[str, Any], bitrate_kbps: float = 32.0) -> float | None:
    """MOS of one quality message recomputed with the receiver model the session uses.

    Same inputs the session uses (window loss, smoothed RTT, playout depth at the
    sample), with Ie of our Opus encoder (defaults) and Bpl of our receive path (PLC,
    and FEC from the far end: both ends are agents that decode FEC).
    """
    if q.get("loss_pct") is None:
        return None
    delay = emodel.one_way_delay_ms(q.get("rtt_ms") or 0.0, q["playout_delay_ms"])
    r = emodel.r_factor(
        delay,
        q["loss_pct"],
        ie=emodel.opus_ie(bitrate_kbps),
        bpl=emodel.BPL[emodel.own_loss_handling(True, fec=True)],
    )
    return emodel.mos_from_r(r)


def fitted_bpl(row: Row) -> float | None:
    """The Bpl that makes the E-model give PESQ NB at this row's loss and delay (None if none)."""
    if not row.loss_agent or row.playout_ms is None:
        return None
    delay = emodel.one_way_delay_ms(row.rtt_ms or 0.0, row.playout_ms)
    ie_eff = emodel.R_MAX - emodel.delay_impairment(delay) - r_of(row.pesq_nb)
    return solve_bpl(ie_eff, emodel.opus_ie(32.0), row.loss_agent)


def r_of(mos: float) -> float:
    """R whose G.107 MOS is `mos` (bisection; the mapping is monotonic)."""
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if emodel.mos_from_r(mid) < mos else (lo, mid)
    return lo


def solve_bpl(ie_eff: float, ie: float, loss_pct: float) -> float:
    """Bpl from Ie_eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl); inf when loss cost nothing."""
    if ie_eff <= ie:
        return math.inf
    return (95.0 - ie) * loss_pct / (ie_eff - ie) - loss_pct


def derive(signal: np.ndarray, seeds: tuple[int, ...] = (101, 202, 303)) -> None:
    """Ie and Bpl of our encoder + receive path, offline (no call): P.834-style fits to PESQ NB.

    Encodes with the agent's encoder (`new_opus_encoder`), drops seeded random packets, decodes the
    rest with libopus (as aiortc does) into our `PlayoutBuffer` (its fade is
    the concealment), and solves the E-model for Ie (0 % loss) and Bpl.
    """
    import dataclasses
    import fractions
    import random

    import av

    from edgeagent.audio.playout import PlayoutBuffer
    from edgeagent.call.libopus import PlcDecoder
    from edgeagent.call.opus import OpusSettings, new_opus_encoder
    from edgeagent.call.tracks import frame_to_mono

    tb = fractions.Fraction(1, RATE)
    # Playout runs this many packets behind arrival: the playout buffer's 60 ms target,
    # the time the decoder has to learn of a loss (from the next packet) before the
    # lost frame is due. Pulled in step with arrival, PLC frames would come too late.
    LAG = 3

    def encode(settings: OpusSettings) -> list[tuple[bytes, int]]:
        enc, packets = new_opus_encoder(settings), []
        for i in range(0, signal.size - 960, 960):
            f = av.AudioFrame.from_ndarray(signal[i : i + 960].reshape(1, -1), "s16", "mono")
            f.sample_rate, f.pts, f.time_base = RATE, i, tb
            data, ts = enc.encode(f)
            packets += [(data[0], ts)] if data else []
        return packets

    def receive(packets: list[tuple[bytes, int]], loss: float, seed: int) -> tuple[float, float]:
        rng = random.Random(seed)
        dec = av.CodecContext.create("libopus", "r")
        dec.sample_rate, dec.layout, dec.format = RATE, "stereo", "s16"  # type: ignore[attr-defined]
        playout, out, lost = PlayoutBuffer(), [], 0
        for i, (data, ts) in enumerate(packets):
            if rng.random() >= loss:
                pkt = av.Packet(data)
                pkt.pts, pkt.time_base = ts, tb
                for frame in dec.decode(pkt):  # type: ignore[attr-defined]
                    playout.push(*frame_to_mono(frame))
            else:
                lost += 1
            if i >= LAG:
                out.append(playout.pull())
        out += [playout.pull() for _ in range(LAG + 5)]
        return score(np.concatenate(out), signal)[0], 100.0 * lost / len(packets)

    def receive_plc(packets: list[tuple[bytes, int]], loss: float, seed: int) -> float:
        """As `receive`, through the agent's decoder: libopus PLC alone (no FEC sent)."""
        rng = random.Random(seed)
        dec, playout, out = PlcDecoder(fec=False), PlayoutBuffer(), []

        @dataclasses.dataclass
        class Encoded:
            data: bytes
            timestamp: int

        for i, (data, ts) in enumerate(packets):
            if rng.random() >= loss:
                for audio in dec.decode(Encoded(data, ts)):
                    playout.push(audio.samples, audio.timestamp)
            if i >= LAG:
                out.append(playout.pull())
        out += [playout.pull() for _ in range(LAG + 5)]
        return score(np.concatenate(out), signal)[0]

    nb, _ = receive(encode(OpusSettings(complexity=5, expected_loss_percent=10)), 0.0, 0)
    print(f"derive: old settings (32 kbit/s, complexity 5, fixed 10 % hint): PESQ NB {nb:.2f}")
    for complexity in (5, 10):
        for kbps in (16, 24, 32, 48, 64):
            settings = OpusSettings(bitrate_bps=kbps * 1000, complexity=complexity)
            nb, _ = receive(encode(settings), 0.0, 0)
            print(
                f"derive: opus {kbps} kbit/s complexity {complexity}, hint 0, 0 % loss: "
                f"PESQ NB {nb:.2f} -> Ie {93.2 - r_of(nb):.1f}",
                flush=True,
            )
    packets = encode(OpusSettings())  # the defaults: the agent's settings
    ie = 93.2 - r_of(receive(packets, 0.0, 0)[0])
    fits = []
    for loss in (0.01, 0.02, 0.05, 0.10, 0.20):
        for seed in seeds:
            nb, real = receive(packets, loss, seed)
            fits.append(bpl := solve_bpl(93.2 - r_of(nb), ie, real))
            print(f"derive: defaults, loss {real:4.1f} %: PESQ NB {nb:.2f} -> Bpl {bpl:.1f}")
    print(f"derive: Bpl median {statistics.median(fits):.1f} over {len(fits)} (Ie {ie:.1f})")
    plc_fits = []
    for loss in (0.01, 0.02, 0.05, 0.10, 0.20):
        for seed in seeds:
            nb = receive_plc(packets, loss, seed)
            _, real = receive(packets, loss, seed)  # the same seeded drops: the real loss
            plc_fits.append(bpl := solve_bpl(93.2 - r_of(nb), ie, real))
            print(f"derive: libopus PLC, loss {real:4.1f} %: PESQ NB {nb:.2f} -> Bpl {bpl:.1f}")
    print(f"derive: PLC Bpl median {statistics.median(plc_fits):.1f} over {len(plc_fits)}")


def encoder_cost(signal: np.ndarray, reps: int = 5) -> None:
    """CPU (thread time) of the agent's encoder per 20 ms frame: complexity 5 vs 10, hint 0/10.

    The settings are interleaved and repeated; the minimum of `reps` runs is
    printed (the least disturbed by the other processes on the machine), with
    the ratio to complexity 5 / hint 0 measured in the same run.
    """
    import fractions

    import av

    from edgeagent.call.opus import OpusSettings, new_opus_encoder

    tb = fractions.Fraction(1, RATE)
    frames = []
    for i in range(0, signal.size - 960, 960):
        f = av.AudioFrame.from_ndarray(signal[i : i + 960].reshape(1, -1), "s16", "mono")
        f.sample_rate, f.pts, f.time_base = RATE, i, tb
        frames.append(f)
    cases = [(5, 0), (5, 10), (10, 0), (10, 10)]
    best: dict[tuple[int, int], float] = {}
    for _ in range(reps):
        for complexity, hint in cases:
            enc = new_opus_encoder(OpusSettings(complexity=complexity, expected_loss_percent=hint))
            t0 = time.thread_time()
            for f in frames:
                enc.encode(f)
            us = (time.thread_time() - t0) / len(frames) * 1e6
            best[complexity, hint] = min(us, best.get((complexity, hint), math.inf))
    ref = best[5, 0]
    for (complexity, hint), us in best.items():
        print(
            f"cost: 32 kbit/s complexity {complexity:2d}, hint {hint:2d} %: "
            f"{us:5.0f} µs per 20 ms frame ({us / ref:.2f}x complexity 5 hint 0, "
            f"{100 * us / 20000:.2f} % of a core)"
        )


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "  -  " if v is None else format(v, spec)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="0,1,2,5,10,20", help="loss percentages")
    parser.add_argument("--seeds", type=int, default=1, help="calls per loss level")
    parser.add_argument("--seed0", type=int, default=7)
    parser.add_argument("--bpl-fit", action="store_true")
    parser.add_argument("--derive", action="store_true", help="only the offline Ie/Bpl fit")
    parser.add_argument("--cost", action="store_true", help="only the encoder CPU per frame")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    losses = [float(x) / 100 for x in args.loss.split(",")]
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        signal = speech(base)
        if args.cost:
            encoder_cost(signal)
        if args.derive:
            derive(signal)
        if args.cost or args.derive:
            return
        port, ws_port = free_port(), free_port()
        conf = base / "mosquitto.conf"
        write_mosquitto_conf(conf, port, ws_port)
        broker = Broker(port=port, ws_port=ws_port, conf=conf)
        broker.start()
        try:
            print(f"speech {signal.size / RATE:.1f} s, E-model bpl in use: see emodel.py")
            print(
                "loss set | relay | agent loss | agent MOS | recomputed | summary | a.remote | "
                "PESQ NB | PESQ WB | |MOS-NB| | playout ms | xcorr"
            )
            for loss in losses:
                for k in range(args.seeds):
                    run = base / f"l{loss:.2f}-{k}"
                    run.mkdir()
                    row = await one_call(run, port, signal, loss, args.seed0 + k)
                    rows.append(row)
                    diff = abs(row.mos_agent - row.pesq_nb) if row.mos_agent else None
                    print(
                        f"{100 * row.loss_set:6.0f} % | {100 * row.loss_relay:4.1f} % | "
                        f"{fmt(row.loss_agent, '8.2f')} % | {fmt(row.mos_agent, '9.2f')} | "
                        f"{fmt(row.mos_proposed, '10.2f')} | "
                        f"{fmt(row.mos_summary, '7.2f')} | {fmt(row.remote_mos, '8.2f')} | "
                        f"{row.pesq_nb:7.2f} | {row.pesq_wb:7.2f} | {fmt(diff, '8.2f')} | "
                        f"{fmt(row.playout_ms, '10.0f')} | {row.confidence:5.0f}"
                        + (f" | Bpl fit {fmt(fitted_bpl(row), '.1f')}" if args.bpl_fit else ""),
                        flush=True,
                    )
        finally:
            broker.stop()
    if not rows:
        return
    published = [abs(r.mos_agent - r.pesq_nb) for r in rows if r.mos_agent is not None]
    diffs = [abs(r.mos_proposed - r.pesq_nb) for r in rows if r.mos_proposed is not None]
    diffs_wb = [abs(r.mos_agent - r.pesq_wb) for r in rows if r.mos_agent is not None]
    print(
        f"mean |published MOS - PESQ NB| = {statistics.fmean(published):.2f} (target <= 0.3); "
        f"recomputed {statistics.fmean(diffs):.2f}; "
        f"published against PESQ WB {statistics.fmean(diffs_wb):.2f}; "
        f"{len(rows)} calls in {time.monotonic() - started:.0f} s"
    )
    if args.bpl_fit:
        fits = [b for r in rows if (b := fitted_bpl(r)) is not None and math.isfinite(b)]
        with contextlib.suppress(statistics.StatisticsError):
            print(f"fitted Bpl: median {statistics.median(fits):.1f} over {len(fits)} lossy calls")


if __name__ == "__main__":
    asyncio.run(main())
