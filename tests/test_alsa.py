"""AlsaCapture and AlsaPlayback on the ALSA file-PCM twin (pacing: test_fastpath_alsa)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import alsaaudio
import numpy as np
import pytest
from alsa_support import bench_alsa, tone, write_raw

from edgeagent.clock import SystemClock
from edgeagent.hw.alsa import AlsaCapture

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


async def test_capture_drops_oldest_when_the_reader_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = bench_alsa(tmp_path, monkeypatch)
    mic = alsa.add_mic("mic", write_raw(tmp_path / "mic.raw", tone(440, 1.0)))
    capture = AlsaCapture(mic, clock=SystemClock(), queue_frames=3)  # unpaced: floods
    task = asyncio.create_task(capture.run())
    try:
        await capture.wait_opened()
        # Nobody reads: the unclocked PCM fills the 3-frame queue and goes on reading.
        async with asyncio.timeout(10):
            while capture.overruns == 0:
                await asyncio.sleep(0.01)
        assert capture.pending() <= 3
        first = await capture.read()
        assert first.seq > 0  # frames were dropped, oldest first
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_device_name_pyalsaaudio_refuses_is_an_audio_device_error() -> None:
    """Not a ValueError escaping the device watch: the agent faults and retries as usual."""
    from edgeagent.hw.alsa import AudioDeviceError, _open_pcm

    with pytest.raises(AudioDeviceError, match="cannot open"):
        _open_pcm("hw:1\x00x", alsaaudio.PCM_CAPTURE, 48000, 1, 960, 4, probe_only=True)
