"""Cost of the per-frame audio checks, echo detector and AEC, in µs per 20 ms frame.

Run: .venv/bin/python bench/dsp.py [--seconds 10] [--repeats 7]

Each figure is the best of `repeats` passes over `seconds` of speech-like audio
(48 kHz mono int16, 960-sample frames) with echo (100 ms, ERL 20 dB) and noise,
so periodic work (stage 1 every 200 ms, GCC-PHAT every second) is amortised
over the frames it serves. Best-of rather than mean: the machine is shared.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from edgeagent.audio.aec import EchoCanceller
from edgeagent.audio.checks import FrameAnalyzer, clipped_samples
from edgeagent.audio.echo import EchoDetector
from edgeagent.audio.synth import speech_like

FS = 48000
FRAME = 960
F = npt.NDArray[np.float64]
I16 = npt.NDArray[np.int16]


def to_frames(x: F) -> I16:
    x = x[: x.size // FRAME * FRAME]
    return np.clip(np.round(x), -32768, 32767).astype(np.int16).reshape(-1, FRAME)


def signals(seconds: float) -> tuple[I16, I16, I16]:
    far = speech_like(seconds, 10, -20.0)
    near = speech_like(seconds, 11, -26.0)
    d = round(0.1 * FS)
    echo = np.concatenate([np.zeros(d), far[:-d]]) * 10 ** (-20 / 20)
    noise = np.random.default_rng(3).standard_normal(far.size) * 10 ** (-65 / 20) * 32768
    near_only = near + noise
    return to_frames(far), to_frames(echo + noise), to_frames(near_only)


def best_us_per_frame(
    make: Callable[[], Callable[[int], object]], n_frames: int, repeats: int
) -> float:
    """Best of `repeats` passes; `make()` builds fresh state and returns the per-frame step."""
    best = float("inf")
    for _ in range(repeats):
        step = make()
        t0 = time.perf_counter()
        for i in range(n_frames):
            step(i)
        best = min(best, time.perf_counter() - t0)
    return best / n_frames * 1e6


def best_us_per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    render, capture, near = signals(args.seconds)
    n = render.shape[0]
    reps = args.repeats
    rows: list[tuple[str, float, str]] = []

    # --- FrameAnalyzer components (numpy work of analyze(), one frame) ---
    x = np.empty(FRAME, np.float32)
    fr = capture[n // 2]
    overdriven = np.clip(fr.astype(np.int32) * 40, -32768, 32767).astype(np.int16)

    def level() -> float:
        np.copyto(x, fr, casting="unsafe")
        return float(np.dot(x, x))

    rows.append(("level (int16->f32, dot)", best_us_per_call(level, 20000, reps), "per frame"))
    rows.append(
        (
            "peak + digital silence (max, min)",
            best_us_per_call(lambda: (fr.max(), fr.min()), 20000, reps),
            "per frame",
        )
    )
    ones = np.ones(FRAME, np.float32)
    dc_us = best_us_per_call(lambda: np.dot(x, ones), 20000, reps)
    rows.append(("DC offset (dot with ones)", dc_us, "per frame"))
    rows.append(
        (
            "clipping runs (only on frames at the rail)",
            best_us_per_call(lambda: clipped_samples(overdriven), 5000, reps),
            "per clipped frame",
        )
    )

    def analyzer() -> Callable[[int], object]:
        fa = FrameAnalyzer("capture")
        return lambda i: fa.analyze(capture[i])

    fa_us = best_us_per_frame(analyzer, n, reps)
    rows.append(("FrameAnalyzer.analyze, all of it (1 stream)", fa_us, "per frame, amortised"))

    # --- echo detector ---
    def detector_only_pushes() -> Callable[[int], object]:
        det = EchoDetector()
        det._block_frames = 10**9  # stages never run: the per-frame part alone

        def step(i: int) -> None:
            det.push_render(render[i])
            det.push_capture(capture[i])

        return step

    rows.append(
        (
            "echo: ring writes (render + capture)",
            best_us_per_frame(detector_only_pushes, n, reps),
            "per frame",
        )
    )

    warm = EchoDetector()
    for i in range(n):
        warm.push_render(render[i])
        warm.push_capture(capture[i])
    s1 = best_us_per_call(warm._stage1, 500, reps)
    seg = best_us_per_call(warm._add_segment, 200, reps)
    s2_state = (warm._prev_gcc_delay, warm._estimate, warm._echo.active)
    s2 = best_us_per_call(warm._stage2, 200, reps)
    warm._prev_gcc_delay, warm._estimate, warm._echo.active = s2_state
    erl = best_us_per_call(lambda: warm._erl_db(100.0), 500, reps)
    rows.append(
        ("echo stage 1: envelope xcorr (per 200 ms)", s1, f"per call; {s1 / 10:.2f} amortised")
    )
    rows.append(
        (
            "echo stage 2: segment cross-spectrum (per 1 s)",
            seg,
            f"per call; {seg / 50:.2f} amortised",
        )
    )
    rows.append(
        ("echo stage 2: GCC-PHAT peak + ERL (per 1 s)", s2, f"per call; {s2 / 50:.2f} amortised")
    )
    rows.append(("  of which ERL least squares", erl, "per call (confirmed runs only)"))

    def detector() -> Callable[[int], object]:
        det = EchoDetector()

        def step(i: int) -> None:
            det.push_render(render[i])
            det.push_capture(capture[i])

        return step

    echo_us = best_us_per_frame(detector, n, reps)
    rows.append(("EchoDetector, all of it (render + capture)", echo_us, "per frame, amortised"))

    # --- everything for one 20 ms tick ---
    def capture_set() -> Callable[[int], object]:
        fa = FrameAnalyzer("capture")
        det = EchoDetector()

        def step(i: int) -> None:
            fa.analyze(capture[i])
            det.push_render(render[i])
            det.push_capture(capture[i])

        return step

    def full_set() -> Callable[[int], object]:
        raw, post, play = (
            FrameAnalyzer("capture"),
            FrameAnalyzer("capture_aec"),
            FrameAnalyzer("playout"),
        )
        det = EchoDetector()

        def step(i: int) -> None:
            raw.analyze(capture[i])
            post.analyze(near[i])
            play.analyze(render[i])
            det.push_render(render[i])
            det.push_capture(capture[i])

        return step

    one = best_us_per_frame(capture_set, n, reps)
    full = best_us_per_frame(full_set, n, reps)
    rows.append(("ALL CHECKS, capture stream + echo", one, "per frame, amortised"))
    rows.append(("ALL CHECKS, 3 streams + echo", full, "per frame, amortised"))

    def aec() -> Callable[[int], object]:
        ec = EchoCanceller()

        def step(i: int) -> None:
            ec.process_render(render[i])
            ec.process_capture(capture[i])

        return step

    rows.append(
        ("AEC3 (EchoCanceller render + capture)", best_us_per_frame(aec, n, reps), "per frame")
    )

    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'µs':>8}  note")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 30}")
    for name, us, note in rows:
        print(f"{name:<{width}}  {us:8.2f}  {note}")
    print()
    print(f"target: all checks <= 40 µs per 20 ms frame; frames: {n}, best of {reps}")


if __name__ == "__main__":
    main()
