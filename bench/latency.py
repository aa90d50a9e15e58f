"""Added one-way latency through the bench loop: capture PCM -> call -> far end's playback PCM.

Run: .venv/bin/python bench/latency.py [--runs N] [--target-ms 60] [--relay-delay-ms D]

Method. Two aiortc peers on 127.0.0.1 (no signaling server: SDP is exchanged
in-process, exactly as tests/test_media_call.py does) each capture from an
ALSA `file` PCM (raw infile) and play into another (raw outfile). Both PCMs
are unclocked, so the capture and playback threads are paced to real time
(`paced=True`): the capture thread reads period k at T_in + k * 20 ms and the
far end's playback thread writes period k at T_out + k * 20 ms, where T_in and
T_out are the monotonic times of each device's first period
(`first_period_at`). So input sample i "enters" at T_in + i / 48000 and
output sample j "leaves" at T_out + j / 48000. The caller's microphone plays
espeak-ng speech (white-noise bursts if espeak-ng/sox are missing). The lag L
(in samples) that maximises the cross-correlation of the far end's playback
file with the input signal maps input sample i to output sample i + L, so

    added one-way latency = (T_out - T_in) + L / 48000

This covers capture framing, the capture queue, Opus encode/decode, DTLS/SRTP,
the network (loopback, or the user-space relay with --relay-delay-ms), the
receive path and the playout buffer (target depth). It does not include a
real card's ADC/DAC buffers, which the bench Pi's hardware-in-loop test adds.
Target: <= 80 ms. The peak-to-median ratio of the correlation is printed as a
confidence figure (a clean match is far above 10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from alsa_support import bench_alsa, read_raw, speech_raw  # noqa: E402
from lossy_relay import Direction, LossyRelay  # noqa: E402
from test_media_call import run_call  # noqa: E402

from edgeagent.audio.playout import PlayoutSettings  # noqa: E402

RATE = 48000


def test_signal(tmp: Path) -> np.ndarray:
    try:
        path = speech_raw(
            tmp / "speech.raw",
            "The quick brown fox jumps over the lazy dog. One two three four five.",
        )
        speech = read_raw(path)
    except BaseException:  # pytest.skip raises a BaseException subclass
        rng = np.random.default_rng(1)
        bursts = [np.concatenate([rng.normal(0, 3000, 4800), np.zeros(9600)]) for _ in range(12)]
        speech = np.concatenate(bursts).astype(np.int16)
    return np.concatenate([np.zeros(RATE // 2, dtype=np.int16), speech])


def xcorr_lag(out: np.ndarray, ref: np.ndarray) -> tuple[int, float]:
    """Lag (samples) of `ref` inside `out`, and the correlation peak-to-median ratio."""
    n = 1 << int(np.ceil(np.log2(out.size + ref.size)))
    spec = np.fft.rfft(out.astype(np.float64), n) * np.conj(np.fft.rfft(ref.astype(np.float64), n))
    corr = np.abs(np.fft.irfft(spec, n)[: out.size])
    lag = int(np.argmax(corr))
    return lag, float(corr[lag] / (np.median(corr) + 1e-9))


async def one_run(tmp: Path, signal: np.ndarray, target_ms: float, relay_delay_ms: float) -> None:
    os.environ["ALSA_CONFIG_PATH"] = str(bench_alsa(tmp).conf)
    relay = None
    if relay_delay_ms > 0:
        relay = LossyRelay(Direction(delay_ms=relay_delay_ms), Direction(delay_ms=relay_delay_ms))
        await relay.start()
    try:
        result = await run_call(
            tmp,
            signal_a=signal,
            signal_b=np.zeros(RATE, dtype=np.int16),
            audible_frames=0,
            relay=relay,
            playout=PlayoutSettings(target_ms=target_ms),
            b_rendered_frames=signal.size // 960 + 25,
        )
    finally:
        if relay is not None:
            relay.close()
    assert result.a.capture.first_period_at is not None
    assert result.b.playback is not None
    assert result.b.playback.first_period_at is not None
    out = read_raw(result.b.spk_file)
    lag, confidence = xcorr_lag(out, signal)
    t_in, t_out = result.a.capture.first_period_at, result.b.playback.first_period_at
    latency_ms = (t_out - t_in) * 1000 + lag * 1000 / RATE
    stats = result.b_stats
    RESULTS.append(latency_ms)
    print(
        f"latency {latency_ms:6.1f} ms  (T_out-T_in {1000 * (t_out - t_in):6.1f} ms, "
        f"lag {lag * 1000 / RATE:6.1f} ms, xcorr peak/median {confidence:5.0f}; "
        f"playout depth now {stats.depth_ms:.0f} ms, concealed {stats.concealed_frames}, "
        f"compressed {stats.compressed_frames}, stretched {stats.stretched_frames})"
    )


RESULTS: list[float] = []


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=60.0)
    parser.add_argument("--relay-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        signal = test_signal(base)
        for i in range(args.runs):
            run_dir = base / f"run{i}"
            run_dir.mkdir()
            await one_run(run_dir, signal, args.target_ms, args.relay_delay_ms)
    print(
        f"added one-way latency, median of {len(RESULTS)}: {statistics.median(RESULTS):.1f} ms "
        f"(playout target {args.target_ms:.0f} ms, relay delay {args.relay_delay_ms:.0f} ms; "
        f"target <= 80 ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())
