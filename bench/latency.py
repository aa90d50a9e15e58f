"""Added one-way latency through the bench loop: capture PCM -> call -> far end's playback PCM.

Run (loopback only, e.g. inside `unshare -n` with `lo` up):
    .venv/bin/python bench/latency.py [--runs 3] [--loss 15] [--target-ms 60] [--harness]

What runs. A mosquitto on a free loopback port and two in-process agents,
dev-a and dev-b (`edgeagent.agent.Agent`, the same code as `edgeagent run`:
CallSession with AEC3, the DSP checks, the libopus PLC/FEC decoder and our
playout buffer), each on ALSA `file` PCMs paced to real time. dev-a dials
dev-b; dev-a's capture PCM plays 0.5 s of silence then 8 s of the
speech-like synth (`edgeagent.audio.synth.speech_like`, -20 dBFS), dev-b's
is silent. Cases, `--runs` calls each:

- clean: a direct call on loopback (the figure bench/perf.py reports);
- loss, ours: media through the user-space relay of tests/lossy_relay.py
  (a signaling proxy rewrites the SDP candidates), `--loss` % of RTP dropped
  each way (seeded), with the agent's receive path (aiortc#543 workaround:
  aiortc's jitter buffer bypassed, edgeagent/call/tracks.py);
- loss, aiortc jitter buffer: the same, with both agents keeping aiortc's
  own audio jitter buffer (`AgentSeams.aiortc_jitter_buffer`), so what
  aiortc#543 does is measured on the agent's path.

Method (tests/latency_support.py). The paced capture reads period k at
T_in + k * 20 ms and the far end's paced playback writes period k at
T_out + k * 20 ms (each device's `first_period_at`), so input sample i
enters at T_in + i / 48000 and output sample j leaves at T_out + j / 48000.
Each audible 1 s window of the input is found in dev-b's playback file by
normalised cross-correlation; a window found at lag L (samples) has a
one-way delay of (T_out - T_in) + L / 48000. Windows matched with a
normalised correlation below 0.5 (mostly concealed or time-warped) are
counted, not used: a call's delay is the median of its matched windows, and
min-max shows whether it moved during the call. The median over all audible
windows, matched or not, is printed too ("all w."): where aiortc's jitter
buffer mangles the audio so that no window reaches 0.5, their lags still
agree on where the sound went (a different speech from the same synth
correlates 0.13-0.31 at random lags, tests/alsa_support.py).

This covers capture framing and queue, AEC and checks, Opus, SRTP,
loopback (or the relay), the receive path, concealment and the playout
buffer (target depth); not a real card's ADC/DAC buffers, which
scripts/hil-test adds on the bench Pi. Target: <= 80 ms (issue 3).

`--harness` instead measures the two bare aiortc peers of
tests/test_media_call.py (no agent: no AEC, checks or PLC decoder), the
method this script used before, for comparison. Numbers are printed; nothing
is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import statistics
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
from alsa_support import bench_alsa, read_raw  # noqa: E402
from call_support import endpoint_config, running, summaries, until  # noqa: E402
from latency_support import DelayWindow, delay_windows, matched  # noqa: E402
from lossy_relay import Direction, lossy_link  # noqa: E402

from edgeagent.audio.synth import speech_like  # noqa: E402

RATE = 48000
SEAMS: dict[str, Any] = {"install_crash_hooks": False}

# The line bench/perf.py reads (`parse_median`): the clean case's median.
SUMMARY = "added one-way latency, median of {n}: {ms:.1f} ms"
SUMMARY_LINE = re.compile(r"^added one-way latency, median of \d+: ([\d.]+) ms", re.MULTILINE)


def summary_line(clean_medians_ms: list[float]) -> str:
    """The clean case's line: the median over calls of each call's median delay."""
    return (
        SUMMARY.format(n=len(clean_medians_ms), ms=statistics.median(clean_medians_ms))
        + " (clean, two agents, playout target 60 ms; target <= 80 ms)"
    )


def parse_median(out: str) -> float | None:
    """The clean-case median from this script's output (None if it did not get there)."""
    m = SUMMARY_LINE.search(out)
    return float(m.group(1)) if m else None


def probe_signal() -> np.ndarray:
    lead = np.zeros(RATE // 2, dtype=np.int16)
    return np.concatenate([lead, np.rint(speech_like(8.0, 21, level_dbfs=-20.0)).astype(np.int16)])


@dataclass
class Run:
    case: str
    windows: list[DelayWindow]
    playout: dict[str, Any]  # dev-b's summary playout object
    relay_loss: float | None

    @property
    def delays(self) -> list[float]:
        return [w.delay_ms for w in matched(self.windows)]

    @property
    def median_ms(self) -> float | None:
        d = self.delays
        return statistics.median(d) if d else None

    @property
    def median_all_ms(self) -> float | None:
        """Over every audible window, matched or not: where most of the sound went."""
        return statistics.median(w.delay_ms for w in self.windows) if self.windows else None


async def agent_call(
    tmp: Path, port: int, signal: np.ndarray, *, loss: float, seed: int, aiortc_jb: bool, case: str
) -> Run:
    """One call dev-a -> dev-b; through the lossy relay when `loss` > 0."""
    alsa = bench_alsa(tmp)
    os.environ["ALSA_CONFIG_PATH"] = str(alsa.conf)
    cfg_a = endpoint_config(tmp, port, "dev-a", alsa, mic=signal)
    cfg_b = endpoint_config(tmp, port, "dev-b", alsa)
    seams = dict(SEAMS, aiortc_jitter_buffer=aiortc_jb)
    relay = None
    link = (
        lossy_link(
            port,
            a="dev-a",
            b="dev-b",
            a_to_b=Direction(loss=loss, seed=seed),
            b_to_a=Direction(loss=loss, seed=seed + 1000),
        )
        if loss > 0
        else contextlib.nullcontext()
    )
    async with (
        collector(port, "edge/v1/+/calls/#") as c,
        link as pair,
        running(cfg_b, **seams) as b,
        running(cfg_a, **seams) as a,
    ):
        relay, proxy = pair if pair is not None else (None, None)
        await a.calls_mgr.dial(proxy.alias_b if proxy is not None else "dev-b")
        a_session = await until(lambda: a.calls_mgr.active and a.calls_mgr.active.session)
        b_session = await until(lambda: b.calls_mgr.active and b.calls_mgr.active.session)
        frames = signal.size // 960 + 25  # the whole signal plus half a second
        await until(
            lambda: b_session.playback is not None and b_session.playback.frames_written >= frames,
            timeout=60,
        )
        t_in, t_out = a_session.capture.first_period_at, b_session.playback.first_period_at
        await a.calls_mgr.hangup()
        summary = await c.wait_for(lambda ms: summaries(ms, "dev-b"), timeout=10)
    assert t_in is not None
    assert t_out is not None
    windows = delay_windows(signal, read_raw(alsa.speakers["spk_dev-b"]), t_in=t_in, t_out=t_out)
    relay_loss = relay.a_to_b.rtp_dropped / max(1, relay.a_to_b.rtp_seen) if relay else None
    return Run(case, windows, summary[0]["playout"], relay_loss)


def print_run(i: int, r: Run, *, windows: bool = False) -> None:
    d = r.delays
    span = f"{min(d):5.1f}-{max(d):5.1f}" if d else "  -  "
    med = f"{r.median_ms:6.1f}" if r.median_ms is not None else "   -  "
    loose = f"{r.median_all_ms:6.1f}" if r.median_all_ms is not None else "   -  "
    p = r.playout
    loss = f"{100 * r.relay_loss:4.1f} %" if r.relay_loss is not None else "  -   "
    print(
        f"{r.case:<28} {i:3d} | {med} | {span:>11} | {len(d):2d}/{len(r.windows):2d} | {loose} | "
        f"{loss} | {p['underruns']:4d} {p['overruns']:4d} {p['late_frames']:4d} "
        f"{p['concealed_frames']:5d} {p['plc_frames']:4d} {p['fec_frames']:4d} "
        f"{p['max_depth_ms']:6.0f} | {statistics.median(w.rho for w in r.windows):4.2f}",
        flush=True,
    )
    if windows:
        print(
            "    windows (s: ms, rho): "
            + ", ".join(f"{w.at_s:.0f}: {w.delay_ms:.1f} {w.rho:.2f}" for w in r.windows)
        )


def print_case(case: str, runs: list[Run]) -> None:
    meds = [m for r in runs if (m := r.median_ms) is not None]
    all_d = [d for r in runs for d in r.delays]
    loose = [m for r in runs if (m := r.median_all_ms) is not None]
    found = sum(len(r.delays) for r in runs)
    total = sum(len(r.windows) for r in runs)
    p = [r.playout for r in runs]
    matched_part = (
        f"median {statistics.median(meds):.1f} ms over {len(meds)} calls, matched windows "
        f"{min(all_d):.1f}-{max(all_d):.1f} ms"
        if meds
        else "no window matched"
    )
    print(
        f"{case}: {matched_part} ({found}/{total} windows matched; median of all windows, "
        f"matched or not: {statistics.median(loose):.1f} ms); per call: underruns "
        f"{statistics.fmean(x['underruns'] for x in p):.1f}, overruns "
        f"{statistics.fmean(x['overruns'] for x in p):.1f}, late "
        f"{statistics.fmean(x['late_frames'] for x in p):.1f}, concealed "
        f"{statistics.fmean(x['concealed_frames'] for x in p):.1f}",
        flush=True,
    )


async def agents(args: argparse.Namespace, base: Path) -> None:
    from conftest import Broker, free_port, write_mosquitto_conf

    signal = probe_signal()
    port, ws_port = free_port(), free_port()
    conf = base / "mosquitto.conf"
    write_mosquitto_conf(conf, port, ws_port)
    broker = Broker(port=port, ws_port=ws_port, conf=conf)
    broker.start()
    loss = args.loss / 100
    cases = [("clean", 0.0, False)]
    if loss > 0:
        cases += [
            (f"{args.loss:g} % loss, ours", loss, False),
            (f"{args.loss:g} % loss, aiortc jitter buf", loss, True),
        ]
    results: dict[str, list[Run]] = {}
    try:
        print("two agents, file PCMs, playout target 60 ms (config default); delay per 1 s window")
        print(
            f"{'case':<28} run | median | min-max ms  | win   | all w. | relay  | "
            "undr ovr late concl  plc  fec maxdep | rho"
        )
        for case, p, aiortc_jb in cases:
            for i in range(args.runs):
                tmp = base / f"{case.replace(' ', '_').replace('%', 'pct')}-{i}"
                tmp.mkdir()
                run = await agent_call(
                    tmp, port, signal, loss=p, seed=31 + i, aiortc_jb=aiortc_jb, case=case
                )
                results.setdefault(case, []).append(run)
                print_run(i, run, windows=args.windows)
    finally:
        broker.stop()
    for case, runs in results.items():
        print_case(case, runs)
    clean = [m for r in results.get("clean", []) if (m := r.median_ms) is not None]
    if clean:
        print(summary_line(clean))


async def harness(args: argparse.Namespace, base: Path) -> None:
    """The earlier measurement: two bare aiortc peers (tests/test_media_call.py)."""
    from test_media_call import run_call

    from edgeagent.audio.playout import PlayoutSettings

    signal = probe_signal()
    results = []
    for i in range(args.runs):
        tmp = base / f"harness{i}"
        tmp.mkdir()
        os.environ["ALSA_CONFIG_PATH"] = str(bench_alsa(tmp).conf)
        result = await run_call(
            tmp,
            signal_a=signal,
            signal_b=np.zeros(RATE, dtype=np.int16),
            audible_frames=0,
            playout=PlayoutSettings(target_ms=args.target_ms),
            b_rendered_frames=signal.size // 960 + 25,
        )
        t_in, t_out = result.a.capture.first_period_at, result.b.playback.first_period_at  # type: ignore[union-attr]
        assert t_in is not None
        assert t_out is not None
        windows = delay_windows(signal, read_raw(result.b.spk_file), t_in=t_in, t_out=t_out)
        d = [w.delay_ms for w in matched(windows)]
        results.append(statistics.median(d))
        print(f"harness run {i}: {statistics.median(d):.1f} ms ({min(d):.1f}-{max(d):.1f})")
    print(
        f"aiortc peers only (test harness), median of {len(results)}: "
        f"{statistics.median(results):.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="calls per case")
    parser.add_argument("--loss", type=float, default=15.0, help="percent each way; 0: clean only")
    parser.add_argument(
        "--target-ms", type=float, default=60.0, help="playout target of --harness (agents: 60)"
    )
    parser.add_argument("--windows", action="store_true", help="print every window")
    parser.add_argument("--harness", action="store_true", help="bare aiortc peers instead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        await (harness if args.harness else agents)(args, Path(d))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
