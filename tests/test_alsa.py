"""AlsaCapture / AlsaPlayback on the ALSA file-PCM twin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alsa_support import bench_alsa, read_raw, tone, write_raw

from edgeagent.clock import SystemClock
from edgeagent.hw.alsa import AlsaCapture, AlsaPlayback, AudioDeviceError

FS = 960


async def test_capture_returns_the_infile_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    src = tone(440, 10 * FS / 48000)  # exactly ten periods
    # Past the end of its infile the file PCM returns the null slave's stale
    # buffer, not silence (seen with arecord too), so pad the file with zeros.
    padded = np.concatenate([src, np.zeros(4 * FS, dtype=np.int16)])
    mic = alsa.add_mic("mic", write_raw(tmp_path / "mic.raw", padded))
    capture = AlsaCapture(mic, clock=SystemClock(), queue_frames=10_000)
    task = asyncio.create_task(capture.run())
    try:
        frames = [await capture.read() for _ in range(12)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    got = np.concatenate([f.samples for f in frames[:10]])
    assert all(f.samples.shape == (FS,) and f.samples.dtype == np.int16 for f in frames)
    assert np.array_equal(got, src)
    assert not frames[10].samples.any() and not frames[11].samples.any()
    assert [f.seq for f in frames] == list(range(12))
    stamps = [f.ts for f in frames]
    assert stamps == sorted(stamps)
    assert capture.overruns == 0


async def test_paced_capture_delivers_at_real_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    mic = alsa.add_mic("mic", write_raw(tmp_path / "mic.raw", tone(440, 0.5)))
    capture = AlsaCapture(mic, clock=SystemClock(), paced=True)
    task = asyncio.create_task(capture.run())
    try:
        first = await capture.read()
        for _ in range(10):
            last = await capture.read()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Ten periods after the first cannot come sooner than 200 ms of real time.
    assert last.ts - first.ts >= 10 * 0.020 * 0.95
    assert last.seq - first.seq == 10


async def test_capture_drops_oldest_when_the_reader_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    mic = alsa.add_mic("mic", write_raw(tmp_path / "mic.raw", tone(440, 1.0)))
    capture = AlsaCapture(mic, clock=SystemClock(), queue_frames=3)  # unpaced: floods
    task = asyncio.create_task(capture.run())
    try:
        await capture.wait_opened()
        # Unclocked, the PCM refills the queue faster than the loop reads it.
        frames = [await capture.read() for _ in range(50)]
        assert capture.overruns > 0
        assert capture.pending() <= 3
        assert frames[-1].seq > 49  # frames were dropped, oldest first
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_playback_writes_what_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    out = tmp_path / "spk.raw"
    spk = alsa.add_speaker("spk", out)
    src = tone(1000, 8 * FS / 48000)
    frames: Iterator[np.ndarray] = iter(src.reshape(8, FS))
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def source() -> np.ndarray:
        frame = next(frames, None)
        if frame is None:
            loop.call_soon_threadsafe(done.set)
            return np.zeros(FS, dtype=np.int16)
        return frame

    playback = AlsaPlayback(spk, source, clock=SystemClock(), paced=True)
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
    assert playback.frames_written >= 8
    assert playback.underruns == 0
    assert elapsed >= 7 * 0.020 * 0.95  # paced: eight periods take real time


@pytest.mark.parametrize("kind", ["capture", "playback"])
async def test_missing_device_raises_audio_device_error_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    bench_alsa(tmp_path, monkeypatch)
    device: AlsaCapture | AlsaPlayback
    if kind == "capture":
        device = AlsaCapture("no_such_mic", clock=SystemClock())
    else:
        device = AlsaPlayback(
            "no_such_mic", lambda: np.zeros(FS, dtype=np.int16), clock=SystemClock()
        )
    with pytest.raises(AudioDeviceError) as info:
        await asyncio.wait_for(device.run(), 5)
    assert info.value.device == "no_such_mic"
    assert "no_such_mic" in str(info.value)
