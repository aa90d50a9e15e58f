"""Instructions per 20 ms frame in the agent's audio path, counted by callgrind: repeatable.

CPU time on a shared VM moves by 10 % from run to run; instruction counts do not. Each
stage runs in its own Python process under `valgrind --tool=callgrind`, once with N and
once with 3N frames after the same warm-up, so (Ir(3N) - Ir(N)) / 2N is what one frame
costs with start-up, imports, the prepared signal and warm-up cancelled out. Counts are
split by the library the instructions ran in, so a change to the Python glue shows apart
from libopus or AEC3.

Stages (the agent's own classes, fed the bench speech of bench/speech.py):
- `aec`: `EchoCanceller.process_render` + `process_capture` (AEC3 and our ERLE sums);
- `checks`: the three `FrameAnalyzer`s and the `EchoDetector`, as `CallSession` runs them;
- `encode`: an `av.AudioFrame` built as `MicrophoneTrack.recv` builds it, then
  the agent's encoder (`opus.new_opus_encoder`: libopus through ctypes with libopus0,
  else PyAV; complexity 10, 32 kbit/s, VoIP);
- `decode`: `MonoOpusDecoder.decode`, `frame_to_mono`, `PlayoutBuffer.push` and `pull`
  (the PyAV receive path, used without libopus0);
- `plcdecode`: `PlcDecoder.decode` (libopus0 through ctypes, what calls use), `PlayoutBuffer.push`
  and `pull`;
- `libopus`: the floor for `encode` + `decode`: the same libopus build (PyAV's) called
  through ctypes with the same settings, no PyAV and no Python per sample.

Run: .venv/bin/python bench/instructions.py [--frames 100] [--stage NAME ...]
(about a minute per stage; valgrind must be installed).

`--time` measures the same stages by CPU time instead (no valgrind): thread time per
frame over `--frames` frames, best of three passes, printed as µs per frame and ms per
call-second (50 frames). `--paced-s S` then runs the chosen stages together, one frame
of each every 20 ms for S seconds, as a call does: between ticks the caches go cold and
the same work costs about twice as much. bench/perf.py runs both beside baresip: the
audio work every call does, with no transport, loop or statistics around it, in the
same run as the reference.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import cpusplit  # noqa: E402
import speech  # noqa: E402

RATE, FRAME = 48000, 960
WARMUP = 50
VALGRIND = ("valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no")
STAGES = ("aec", "checks", "encode", "decode", "plcdecode", "libopus")


# --- the stages (run inside the measured child) -------------------------------------------


def speech_frames(n: int) -> list[np.ndarray]:
    sig = speech.speech_signal(Path(tempfile.mkdtemp(prefix="bench-instr-")), (n + 1) * 0.02)
    return [sig[i * FRAME : (i + 1) * FRAME].copy() for i in range(n)]


def stage_aec(frames: list[np.ndarray]) -> Callable[[int], None]:
    from edgeagent.audio.aec import EchoCanceller

    aec = EchoCanceller()
    far = [np.roll(f, 480) // 4 for f in frames]

    def step(i: int) -> None:
        aec.process_render(far[i])
        aec.process_capture(frames[i])

    return step


def stage_checks(frames: list[np.ndarray]) -> Callable[[int], None]:
    from edgeagent.audio.checks import FrameAnalyzer
    from edgeagent.audio.echo import EchoDetector

    raw, tx, rx = FrameAnalyzer("capture_raw"), FrameAnalyzer("capture"), FrameAnalyzer("playout")
    echo = EchoDetector()
    far = [np.roll(f, 480) // 4 for f in frames]

    def step(i: int) -> None:
        echo.push_render(far[i])
        rx.analyze(far[i])
        raw.analyze(frames[i])
        tx.analyze(frames[i])
        echo.push_capture(frames[i])

    return step


def stage_encode(frames: list[np.ndarray]) -> Callable[[int], None]:
    import av

    from edgeagent.call.opus import OpusSettings, new_opus_encoder

    enc = new_opus_encoder(OpusSettings())
    tb = Fraction(1, RATE)

    def step(i: int) -> None:
        # As MicrophoneTrack.recv builds its frame (edgeagent/call/tracks.py).
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(np.ascontiguousarray(frames[i], dtype=np.int16))  # type: ignore[arg-type]
        frame.sample_rate = RATE
        frame.pts = i * FRAME
        frame.time_base = tb
        enc.encode(frame)

    return step


def _encoded(frames: list[np.ndarray]) -> list[bytes]:
    opus = LibOpus()
    return [opus.encode(f) for f in frames]


class _Encoded:  # what aiortc's jitter buffer hands the decoder
    def __init__(self, data: bytes, timestamp: int) -> None:
        self.data, self.timestamp = data, timestamp


def stage_decode(frames: list[np.ndarray]) -> Callable[[int], None]:
    """The PyAV receive path (`MonoOpusDecoder`): what a call uses without libopus0."""
    from edgeagent.audio.playout import PlayoutBuffer
    from edgeagent.call.opus import MonoOpusDecoder
    from edgeagent.call.tracks import frame_to_mono

    packets = [_Encoded(p, i * FRAME) for i, p in enumerate(_encoded(frames))]
    dec, playout = MonoOpusDecoder(), PlayoutBuffer()

    def step(i: int) -> None:
        for frame in dec.decode(packets[i]):
            samples, ts = frame_to_mono(frame)
            playout.push(samples, ts)
        playout.pull()

    return step


def stage_plcdecode(frames: list[np.ndarray]) -> Callable[[int], None]:
    """The receive path a call uses with libopus0 (`PlcDecoder`), into the playout buffer."""
    from edgeagent.audio.playout import PlayoutBuffer
    from edgeagent.call.libopus import PlcDecoder

    packets = [_Encoded(p, i * FRAME) for i, p in enumerate(_encoded(frames))]
    dec, playout = PlcDecoder(fec=False), PlayoutBuffer()

    def step(i: int) -> None:
        for audio in dec.decode(packets[i]):
            playout.push(audio.samples, audio.timestamp)
        playout.pull()

    return step


class LibOpus:
    """The libopus that PyAV loads, called directly: the codec's own cost."""

    VOIP, SET_BITRATE, SET_COMPLEXITY, SET_FEC, SET_LOSS = 2048, 4002, 4010, 4012, 4014

    def __init__(self, complexity: int = 10, bitrate: int = 32000) -> None:
        self.lib = ctypes.CDLL(self.path())
        err = ctypes.c_int()
        vp, i32 = ctypes.c_void_p, ctypes.c_int32
        self.lib.opus_encoder_create.restype = vp
        self.lib.opus_decoder_create.restype = vp
        self.lib.opus_encode.argtypes = [vp, vp, ctypes.c_int, vp, i32]
        self.lib.opus_encode.restype = i32
        self.lib.opus_decode.argtypes = [vp, ctypes.c_char_p, i32, vp, ctypes.c_int, ctypes.c_int]
        self.lib.opus_decode.restype = ctypes.c_int
        self.enc = ctypes.c_void_p(
            self.lib.opus_encoder_create(RATE, 1, self.VOIP, ctypes.byref(err))
        )
        self.dec = ctypes.c_void_p(self.lib.opus_decoder_create(RATE, 1, ctypes.byref(err)))
        for request, value in ((self.SET_BITRATE, bitrate), (self.SET_COMPLEXITY, complexity)):
            self.lib.opus_encoder_ctl(self.enc, request, ctypes.c_int(value))
        self.out = ctypes.create_string_buffer(4000)
        self.pcm = np.zeros(FRAME, dtype=np.int16)

    @staticmethod
    def path() -> str:
        import av

        site = Path(av.__file__).resolve().parent.parent
        found = sorted(glob.glob(str(site / "av.libs" / "libopus*.so*")))
        name = found[0] if found else ctypes.util.find_library("opus")
        if name is None:
            raise RuntimeError("no libopus to load")
        return name

    def encode(self, pcm: np.ndarray) -> bytes:
        n = self.lib.opus_encode(
            self.enc, pcm.ctypes.data, FRAME, ctypes.addressof(self.out), len(self.out)
        )
        if n < 0:
            raise RuntimeError(f"opus_encode failed: {n}")
        return self.out.raw[:n]

    def decode(self, packet: bytes) -> None:
        self.lib.opus_decode(self.dec, packet, len(packet), self.pcm.ctypes.data, FRAME, 0)


def stage_libopus(frames: list[np.ndarray]) -> Callable[[int], None]:
    opus = LibOpus()

    def step(i: int) -> None:
        opus.decode(opus.encode(frames[i]))

    return step


BUILDERS = {
    "aec": stage_aec,
    "checks": stage_checks,
    "encode": stage_encode,
    "decode": stage_decode,
    "plcdecode": stage_plcdecode,
    "libopus": stage_libopus,
}


def run_child(stage: str, frames: int, prepared: int) -> None:
    # The same preparation (signal, pre-encoded packets) in both runs, whatever N:
    # it cancels out of the difference with the imports.
    data = speech_frames(prepared)
    step = BUILDERS[stage](data)
    for i in range(WARMUP + frames):
        step(i)


# --- measuring (the parent) -------------------------------------------------------------------


def callgrind_costs(out: Path) -> dict[str, int]:
    """Self instruction counts per object file from an uncompressed callgrind output."""
    per: dict[str, int] = {}
    ob = "?"
    skip_next = False
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("ob="):
            ob = line[3:]
        elif line.startswith("calls="):
            skip_next = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip_next:
                skip_next = False
                continue
            parts = line.split()
            if len(parts) >= 2:
                per[ob] = per.get(ob, 0) + int(parts[1])
    return per


def measure(stage: str, frames: int, tmp: Path) -> dict[str, int]:
    """Ir per frame by object: (Ir at 3N frames - Ir at N) / 2N."""
    runs = []
    for n in (frames, 3 * frames):
        out = tmp / f"{stage}-{n}.callgrind"
        child = [sys.executable, __file__, "--child", stage, "--frames", str(n)]
        child += ["--prepared", str(WARMUP + 3 * frames + 5)]
        subprocess.run(
            [*VALGRIND, f"--callgrind-out-file={out}", *child],
            check=True,
            capture_output=True,
            # One BLAS thread: OpenBLAS's idle workers spin, which no count should include.
            env={**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"},
        )
        runs.append(callgrind_costs(out))
    return {
        ob: (runs[1].get(ob, 0) - runs[0].get(ob, 0)) // (2 * frames)
        for ob in set(runs[0]) | set(runs[1])
    }


def time_stage(stage: str, frames: int, passes: int = 3) -> float:
    """Best-of-`passes` thread time of one frame of `stage`, in µs (after a warm-up)."""
    data = speech_frames(WARMUP + frames)
    step = BUILDERS[stage](data)
    for i in range(WARMUP):
        step(i)
    best = float("inf")
    for _ in range(passes):
        start = time.thread_time()
        for i in range(WARMUP, WARMUP + frames):
            step(i)
        best = min(best, (time.thread_time() - start) / frames * 1e6)
    return best


def time_paced(
    stages: list[str], seconds: float, period_s: float = 0.02, per_tick: int = 1
) -> float:
    """Thread time of one frame of all `stages` together, one frame per `period_s`, in µs.

    `per_tick` > 1 runs that many frames back to back at each wake-up (a capture
    period of `per_tick` x 20 ms): what batching would save, at `per_tick - 1` x 20 ms
    more latency.

    What a call does: the stages run once per 20 ms tick and the thread sleeps in
    between, so their code and data are no longer in the caches when the next tick
    comes. On the development VM that about doubles their cost against `time_stage`'s
    back-to-back frames (encode: 640 against 250-300 µs a frame).
    """
    frames = round(seconds / period_s) // per_tick * per_tick
    warm = round(1.0 / period_s) // per_tick * per_tick
    data = speech_frames(warm + frames)
    steps = [BUILDERS[stage](data) for stage in stages]
    spent = 0.0
    next_at = time.monotonic()
    for tick in range(0, warm + frames, per_tick):
        if tick == warm:
            spent = 0.0
        start = time.thread_time()
        for i in range(tick, tick + per_tick):
            for step in steps:
                step(i)
        spent += time.thread_time() - start
        next_at += period_s * per_tick
        time.sleep(max(0.0, next_at - time.monotonic()))
    return spent / frames * 1e6


TIME_LINE = re.compile(r"^TIME (\w+)\s+([\d.]+) us/frame\s+([\d.]+) ms", re.M)
PACED_LINE = re.compile(r"^PACED (\S+)\s+([\d.]+) us/frame\s+([\d.]+) ms", re.M)


def parse_times(out: str) -> dict[str, float]:
    """`--time` output -> ms per call-second by stage (what bench/perf.py reads)."""
    return {stage: float(ms) for stage, _, ms in TIME_LINE.findall(out)}


def parse_paced(out: str) -> float | None:
    """`--time --paced-s` output -> ms per call-second of the stages at the call's cadence."""
    found = PACED_LINE.findall(out)
    return float(found[-1][2]) if found else None


def print_times(stages: list[str], frames: int, paced_s: float = 0.0, per_tick: int = 1) -> None:
    """`--time`: µs per frame and ms per call-second of each stage, one `TIME` line each;
    with `paced_s`, then all of them together at 20 ms intervals, one `PACED` line."""
    print(f"CPU time per 20 ms frame, best of 3 passes of {frames} frames (thread time)")
    for stage in stages:
        us = time_stage(stage, frames)
        print(f"TIME {stage:<10} {us:8.1f} us/frame {us * 50 / 1000:7.2f} ms per call-second")
    if paced_s > 0:
        us = time_paced(stages, paced_s, per_tick=per_tick)
        name = "+".join(stages)
        every = (
            f"{per_tick} frames of each every {20 * per_tick} ms"
            if per_tick > 1
            else ("one frame of each every 20 ms")
        )
        print(f"{every} for {paced_s:.0f} s (thread time)")
        print(f"PACED {name} {us:8.1f} us/frame {us * 50 / 1000:7.2f} ms per call-second")


def grouped(per_object: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ob, ir in per_object.items():
        group = cpusplit.group_of(Path(ob).name, {Path(ob).name: ob})
        out[group] = out.get(group, 0) + ir
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100, help="N (the runs take N and 3N)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="default: all")
    parser.add_argument(
        "--time", action="store_true", help="CPU time per frame instead of callgrind counts"
    )
    parser.add_argument(
        "--paced-s",
        type=float,
        default=0.0,
        help="with --time: also run the stages together every 20 ms for this long",
    )
    parser.add_argument(
        "--per-tick",
        type=int,
        default=1,
        help="with --paced-s: frames run back to back per wake-up (default 1)",
    )
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.frames, max(args.prepared, WARMUP + args.frames + 5))
        return
    if args.time:
        print_times(args.stage or list(STAGES), args.frames, args.paced_s, args.per_tick)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    stages = args.stage or list(STAGES)
    results: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as d:
        for stage in stages:
            print(f"{stage}: callgrind, {args.frames} and {3 * args.frames} frames ...", flush=True)
            results[stage] = grouped(measure(stage, args.frames, Path(d)))
    groups: list[str] = []
    for r in results.values():
        groups += [g for g, v in sorted(r.items(), key=lambda x: -x[1]) if g not in groups and v]
    width = max(len(g) for g in [*groups, "total"]) + 2
    print()
    print("thousand instructions per 20 ms frame (callgrind Ir)")
    print(f"{'':<{width}}" + "".join(f"{s:>10}" for s in stages))
    for g in groups:
        cells = "".join(f"{results[s].get(g, 0) / 1000:>10.1f}" for s in stages)
        print(f"{g:<{width}}" + cells)
    totals = "".join(f"{sum(results[s].values()) / 1000:>10.1f}" for s in stages)
    print(f"{'total':<{width}}" + totals)
    media = [s for s in ("aec", "checks", "encode", "decode") if s in results]
    if media:
        total = sum(sum(results[s].values()) for s in media)
        python = sum(results[s].get(cpusplit.GROUPS[0][0], 0) for s in media)
        print(
            f"\n{' + '.join(media)}: {total / 1000:.1f} k per frame, {total * 50 / 1e6:.0f} M per "
            f"second of call; the interpreter's share {python / max(total, 1):.1%}"
        )
    if {"encode", "decode", "libopus"} <= set(results):
        path = sum(sum(results[s].values()) for s in ("encode", "decode"))
        floor = sum(results["libopus"].values())
        print(
            f"encode + decode through PyAV and our wrappers: {path / 1000:.1f} k per frame, "
            f"{path / max(floor, 1):.2f}x libopus called directly ({floor / 1000:.1f} k)"
        )


if __name__ == "__main__":
    main()
