"""Paced (twin) devices on the event loop: the same frames and timing as the paced thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alsa_support import bench_alsa, read_raw, tone, write_raw

from edgeagent.clock import SystemClock
from edgeagent.hw.alsa import AlsaCapture, AlsaPlayback

FS = 960


def _alsa_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("alsa-")]


@pytest.mark.parametrize("on_loop", [True, False], ids=["loop", "thread"])
async def test_paced_capture_gives_the_infile_in_real_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_loop: bool
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    src = tone(440, 12 * FS / 48000)
    mic = alsa.add_mic("mic", write_raw(tmp_path / "mic.raw", src))
    capture = AlsaCapture(mic, clock=SystemClock(), paced=True, paced_on_loop=on_loop)
    task = asyncio.create_task(capture.run())
    try:
        await capture.wait_opened()
        assert bool(_alsa_threads()) is not on_loop  # the loop path runs no thread
        frames = [await capture.read() for _ in range(12)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert np.array_equal(np.concatenate([f.samples for f in frames]), src)
    assert [f.seq for f in frames] == list(range(12))
    assert all(f.samples.flags.writeable and f.samples.dtype == np.int16 for f in frames)
    assert frames[-1].ts - frames[0].ts >= 11 * 0.020 * 0.95  # paced, not a burst
    gaps = np.diff([f.ts for f in frames])
    assert np.median(gaps) == pytest.approx(0.020, abs=0.006)
    assert capture.frames_read >= 12 and capture.overruns == 0
    assert not _alsa_threads()


@pytest.mark.parametrize("on_loop", [True, False], ids=["loop", "thread"])
async def test_paced_playback_writes_what_it_is_given_in_real_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_loop: bool
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    out = tmp_path / "spk.raw"
    spk = alsa.add_speaker("spk", out)
    src = tone(1000, 8 * FS / 48000)
    frames: Iterator[np.ndarray] = iter(src.reshape(8, FS))
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    pulled_on: set[str] = set()

    def source() -> np.ndarray:
        pulled_on.add(threading.current_thread().name)
        frame = next(frames, None)
        if frame is None:
            loop.call_soon_threadsafe(done.set)
            return np.zeros(FS, dtype=np.int16)
        return frame

    playback = AlsaPlayback(spk, source, clock=SystemClock(), paced=True, paced_on_loop=on_loop)
    started = time.monotonic()
    task = asyncio.create_task(playback.run())
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elapsed = time.monotonic() - started
    written = read_raw(out)
    assert np.array_equal(written[: src.size], src)
    assert not written[src.size :].any()
    assert playback.frames_written >= 8 and playback.underruns == 0
    assert elapsed >= 7 * 0.020 * 0.95
    assert (pulled_on == {threading.current_thread().name}) is on_loop
    assert not _alsa_threads()


async def test_a_loop_paced_device_can_be_reopened_after_a_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    mic = alsa.add_mic("mic", write_raw(tmp_path / "mic.raw", tone(440, 1.0)))
    capture = AlsaCapture(mic, clock=SystemClock(), paced=True)
    for _ in range(2):
        task = asyncio.create_task(capture.run())
        await capture.wait_opened()
        await capture.read()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert capture.frames_read >= 2
