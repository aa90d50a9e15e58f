"""ALSA capture and playback on threads: the only module that imports alsaaudio.

Blocking device I/O runs on one thread per device and crosses into the event
loop through a bounded queue (capture) or a pull callback (playback), so the
loop never blocks. The bench's ALSA ``file`` PCMs are not clocked (a read or
write returns at once); ``paced=True`` makes the thread sleep to real time so
frames come every period, as they would from a sound card.

A paced device (the twin) runs on the event loop by default
(`paced_on_loop`): a file PCM's read or write returns at once, so a loop
timer per period replaces the thread, its sleeps and the per-frame
`call_soon_threadsafe` (a self-pipe write and a loop wake-up each). A real
card (`paced=False`) keeps the blocking thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import alsaaudio
import numpy as np
from numpy.typing import NDArray

from edgeagent.clock import Clock

logger = logging.getLogger(__name__)

Samples = NDArray[np.int16]


class AudioDeviceError(Exception):
    """The audio device is missing, vanished or unusable (hardware fault, not a bug)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"audio device {device!r}: {reason}")
        self.device = device
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """One period read from the capture device."""

    seq: int  # period index since the device opened; counts xrun gaps too
    ts: float  # clock.monotonic() when the read returned
    samples: Samples  # int16, shape (period_frames,) for mono, (n, channels) otherwise


class _Pacer:
    """Sleeps a thread to real time, one period per call (for unclocked PCMs)."""

    def __init__(self, period_s: float, stop: threading.Event) -> None:
        self._period_s = period_s
        self._stop = stop
        self._next: float | None = None

    def wait(self) -> None:
        now = time.monotonic()
        if self._next is None:
            self._next = now
            return
        self._next += self._period_s
        delay = self._next - now
        if delay > 0:
            self._stop.wait(delay)
        elif delay < -10 * self._period_s:
            self._next = now  # fell far behind (suspend, debugger): do not burst


def _is_xrun(exc: alsaaudio.ALSAAudioError) -> bool:
    return "broken pipe" in str(exc).lower()


def _open_pcm(
    device: str,
    pcm_type: int,
    rate: int,
    channels: int,
    period_frames: int,
    periods: int,
    *,
    probe_only: bool = False,
) -> Any:
    """Open a PCM for blocking I/O, or (`probe_only`) just check that it opens.

    A blocking-mode open of a card another process holds waits in the kernel until
    it is free, and pyalsaaudio keeps the GIL meanwhile: the whole agent would
    freeze (no watchdog pings, no SIGTERM). So every open is first tried in
    non-blocking mode, which fails at once with "Device or resource busy".
    """

    def open_(mode: int) -> Any:
        return alsaaudio.PCM(
            type=pcm_type,
            mode=mode,
            rate=rate,
            channels=channels,
            format=alsaaudio.PCM_FORMAT_S16_LE,
            periodsize=period_frames,
            periods=periods,
            device=device,
        )

    try:
        probe = open_(alsaaudio.PCM_NONBLOCK)
        if probe_only:
            return probe
        probe.close()
        return open_(alsaaudio.PCM_NORMAL)
    except (alsaaudio.ALSAAudioError, ValueError, TypeError, OSError) as exc:
        # ValueError/TypeError: a name or setting pyalsaaudio refuses before ALSA sees it.
        raise AudioDeviceError(device, f"cannot open: {exc}") from exc


class AlsaCapture:
    """Reads fixed periods from a capture PCM on a thread into a bounded queue.

    `run()` opens the device and lasts until cancelled; it raises
    `AudioDeviceError` if the device is missing or vanishes. `read()` returns
    the next frame (oldest first); when the consumer lags, the oldest queued
    frame is dropped and counted in `overruns`.
    """

    def __init__(
        self,
        device: str,
        *,
        clock: Clock,
        rate: int = 48000,
        channels: int = 1,
        period_frames: int = 960,
        periods: int = 4,
        paced: bool = False,
        paced_on_loop: bool = True,
        queue_frames: int = 5,
    ) -> None:
        self.device = device
        self._clock = clock
        self._rate = rate
        self._channels = channels
        self._period_frames = period_frames
        self._periods = periods
        self._paced = paced
        self._on_loop = paced and paced_on_loop
        self._queue: asyncio.Queue[CapturedFrame | AudioDeviceError] = asyncio.Queue()
        self._queue_frames = queue_frames
        self._error: AudioDeviceError | None = None
        self._opened = asyncio.Event()
        self.first_period_at: float | None = None  # clock.monotonic() of the first read
        self.overruns = 0  # frames dropped because the consumer lagged
        self.xruns = 0  # ALSA capture overruns (-EPIPE)
        self.frames_read = 0

    @property
    def period_s(self) -> float:
        return self._period_frames / self._rate

    async def wait_opened(self) -> None:
        """Return once the device is open and the reader thread runs."""
        await self._opened.wait()

    def pending(self) -> int:
        """Frames queued and not yet read."""
        return self._queue.qsize()

    async def read(self) -> CapturedFrame:
        """The next captured frame; raises AudioDeviceError once the device failed."""
        item = await self._queue.get()
        if isinstance(item, AudioDeviceError):
            self._queue.put_nowait(item)  # every later reader sees it too
            raise item
        return item

    async def run(self) -> None:
        params = (self._rate, self._channels, self._period_frames, self._periods)
        if self._on_loop:
            reader = _PeriodReader(self)
            await _run_pcm_on_loop(
                "capture",
                self.device,
                alsaaudio.PCM_CAPTURE,
                params,
                self.period_s,
                opened=self._opened,
                step=lambda pcm: self._read_step(pcm, reader),
            )
            return
        await _run_pcm_thread(
            "capture",
            self.device,
            alsaaudio.PCM_CAPTURE,
            params,
            paced=self._paced,
            opened=self._opened,
            body=self._read_loop,
        )

    def _read_step(self, pcm: Any, reader: _PeriodReader) -> None:
        """One period on the loop: read, deliver; AudioDeviceError when the device failed."""
        try:
            frames = reader.read(pcm)
        except alsaaudio.ALSAAudioError as exc:
            err = AudioDeviceError(self.device, f"read failed: {exc}")
            logger.error("capture %s: %s", self.device, err.reason)
            self._error = err
            self._queue.put_nowait(err)
            raise err from exc
        for frame in frames:
            self._deliver(frame)

    def _deliver(self, frame: CapturedFrame) -> None:
        while self._queue.qsize() >= self._queue_frames:
            self._queue.get_nowait()
            self.overruns += 1
        self._queue.put_nowait(frame)

    def _fail(self, exc: AudioDeviceError, failed: asyncio.Future[AudioDeviceError]) -> None:
        logger.error("capture %s: %s", self.device, exc.reason)
        self._error = exc
        self._queue.put_nowait(exc)
        if not failed.done():
            failed.set_result(exc)

    def _read_loop(
        self,
        pcm: Any,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
        failed: asyncio.Future[AudioDeviceError],
    ) -> None:
        reader = _PeriodReader(self)
        pacer = _Pacer(self.period_s, stop) if self._paced else None
        try:
            while not stop.is_set():
                if pacer is not None:
                    pacer.wait()
                    if stop.is_set():
                        break
                for frame in reader.read(pcm):
                    loop.call_soon_threadsafe(self._deliver, frame)
        except alsaaudio.ALSAAudioError as exc:
            err = AudioDeviceError(self.device, f"read failed: {exc}")
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._fail, err, failed)
        except RuntimeError:
            pass  # the loop closed under us while delivering: nothing left to tell
        finally:
            with contextlib.suppress(alsaaudio.ALSAAudioError):
                pcm.close()


class _PeriodReader:
    """Turns `pcm.read()` results into `CapturedFrame`s; shared by the thread and loop drivers."""

    def __init__(self, capture: AlsaCapture) -> None:
        self._c = capture
        self._bytes_per_period = capture._period_frames * capture._channels * 2
        self._pending = bytearray()
        self._seq = 0

    def read(self, pcm: Any) -> list[CapturedFrame]:
        """One `pcm.read()`: the whole periods it completed (raises a non-xrun ALSA error)."""
        c = self._c
        try:
            n, data = pcm.read()
        except alsaaudio.ALSAAudioError as exc:
            if not _is_xrun(exc):
                raise
            n, data = -errno.EPIPE, b""
        if n < 0:
            c.xruns += 1
            self._seq += 1
            logger.debug("capture %s: xrun (%d)", c.device, n)
            return []
        frames = []
        if not self._pending and len(data) == self._bytes_per_period:
            chunks = [data]  # the usual case: one whole period, no reassembly
        else:
            self._pending += data
            chunks = []
            while len(self._pending) >= self._bytes_per_period:
                chunks.append(bytes(self._pending[: self._bytes_per_period]))
                del self._pending[: self._bytes_per_period]
        for chunk in chunks:
            samples = np.frombuffer(chunk, dtype="<i2").astype(np.int16)  # a writable copy
            if c._channels > 1:
                samples = samples.reshape(-1, c._channels)
            now = c._clock.monotonic()
            if c.first_period_at is None:
                c.first_period_at = now
            frames.append(CapturedFrame(seq=self._seq, ts=now, samples=samples))
            self._seq += 1
            c.frames_read += 1
        return frames


class AlsaPlayback:
    """Writes one period at a time to a playback PCM from a thread.

    Each period the thread calls `source()` (on the playback thread, or on the
    loop when paced on it; it must be thread-safe, e.g. `RemoteAudioSink.pull`)
    and writes what it returns. With a
    clocked device the blocking write paces the loop; with `paced=True` the
    thread sleeps to real time. ALSA underruns (-EPIPE) are counted in
    `underruns`. `run()` raises `AudioDeviceError` if the device is missing or
    vanishes.
    """

    def __init__(
        self,
        device: str,
        source: Callable[[], Samples],
        *,
        clock: Clock,
        rate: int = 48000,
        channels: int = 1,
        period_frames: int = 960,
        periods: int = 2,
        paced: bool = False,
        paced_on_loop: bool = True,
    ) -> None:
        self.device = device
        self._source = source
        self._clock = clock
        self._rate = rate
        self._channels = channels
        self._period_frames = period_frames
        self._periods = periods
        self._paced = paced
        self._on_loop = paced and paced_on_loop
        self._opened = asyncio.Event()
        self.first_period_at: float | None = None  # clock.monotonic() of the first write
        self.underruns = 0
        self.frames_written = 0

    async def wait_opened(self) -> None:
        """Return once the device is open and the writer thread runs."""
        await self._opened.wait()

    async def run(self) -> None:
        params = (self._rate, self._channels, self._period_frames, self._periods)
        if self._on_loop:
            await _run_pcm_on_loop(
                "playback",
                self.device,
                alsaaudio.PCM_PLAYBACK,
                params,
                self._period_frames / self._rate,
                opened=self._opened,
                step=self._write_step,
            )
            return
        await _run_pcm_thread(
            "playback",
            self.device,
            alsaaudio.PCM_PLAYBACK,
            params,
            paced=self._paced,
            opened=self._opened,
            body=self._write_loop,
        )

    def _write_one(self, pcm: Any) -> None:
        """Pull one period from the source and write it (raises a non-xrun ALSA error)."""
        frame = np.ascontiguousarray(self._source(), dtype="<i2")
        if self.first_period_at is None:
            self.first_period_at = self._clock.monotonic()
        try:
            n = pcm.write(frame.tobytes())
        except alsaaudio.ALSAAudioError as exc:
            if not _is_xrun(exc):
                raise
            n = -errno.EPIPE
        if n < 0:
            self.underruns += 1
            logger.debug("playback %s: xrun (%d)", self.device, n)
        else:
            self.frames_written += 1

    def _write_step(self, pcm: Any) -> None:
        """One period on the loop; AudioDeviceError when the device failed."""
        try:
            self._write_one(pcm)
        except alsaaudio.ALSAAudioError as exc:
            err = AudioDeviceError(self.device, f"write failed: {exc}")
            logger.error("playback %s: %s", self.device, err.reason)
            raise err from exc

    def _fail(self, exc: AudioDeviceError, failed: asyncio.Future[AudioDeviceError]) -> None:
        logger.error("playback %s: %s", self.device, exc.reason)
        if not failed.done():
            failed.set_result(exc)

    def _write_loop(
        self,
        pcm: Any,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
        failed: asyncio.Future[AudioDeviceError],
    ) -> None:
        pacer = _Pacer(self._period_frames / self._rate, stop) if self._paced else None
        try:
            while not stop.is_set():
                if pacer is not None:
                    pacer.wait()
                    if stop.is_set():
                        break
                self._write_one(pcm)
        except alsaaudio.ALSAAudioError as exc:
            err = AudioDeviceError(self.device, f"write failed: {exc}")
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fail, err, failed)
        finally:
            with contextlib.suppress(alsaaudio.ALSAAudioError):
                pcm.close()


_PcmLoop = Callable[
    [Any, asyncio.AbstractEventLoop, threading.Event, "asyncio.Future[AudioDeviceError]"], None
]


async def _run_pcm_thread(
    kind: str,
    device: str,
    pcm_type: int,
    params: tuple[int, int, int, int],
    *,
    paced: bool,
    opened: asyncio.Event,
    body: _PcmLoop,
) -> None:
    """Open the PCM and run `body` on its own thread until it reports a failure.

    Raises the AudioDeviceError the thread reported (or the open failure);
    on cancellation stops the thread and waits for it to close the PCM.
    """
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[AudioDeviceError] = loop.create_future()
    pcm = await asyncio.to_thread(_open_pcm, device, pcm_type, *params)
    stop = threading.Event()
    thread = threading.Thread(
        target=body, args=(pcm, loop, stop, failed), name=f"alsa-{kind}-{device}", daemon=True
    )
    thread.start()
    logger.info("%s %s: opened (paced=%s)", kind, device, paced)
    opened.set()
    try:
        raise await failed
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        opened.clear()


async def _run_pcm_on_loop(
    kind: str,
    device: str,
    pcm_type: int,
    params: tuple[int, int, int, int],
    period_s: float,
    *,
    opened: asyncio.Event,
    step: Callable[[Any], None],
) -> None:
    """Open an unclocked PCM and call `step(pcm)` once per period from a loop timer.

    For paced (file) PCMs only, whose read and write never block. Raises the
    AudioDeviceError `step` raised (or the open failure); on cancellation
    stops the timer and closes the PCM.
    """
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[AudioDeviceError] = loop.create_future()
    pcm = await asyncio.to_thread(_open_pcm, device, pcm_type, *params)
    next_at = loop.time()
    handle: asyncio.Handle | None = None

    def tick() -> None:
        nonlocal next_at, handle
        try:
            step(pcm)
        except AudioDeviceError as exc:
            if not failed.done():
                failed.set_result(exc)
            return
        now = loop.time()
        next_at += period_s
        if next_at < now - 10 * period_s:
            next_at = now  # fell far behind (suspend, debugger): do not burst
        handle = loop.call_at(next_at, tick)

    handle = loop.call_soon(tick)
    logger.info("%s %s: opened (paced on the event loop)", kind, device)
    opened.set()
    try:
        raise await failed
    finally:
        handle.cancel()
        opened.clear()
        with contextlib.suppress(alsaaudio.ALSAAudioError):
            pcm.close()


def probe_devices(capture: str, playback: str) -> None:
    """Open and close both PCMs once; raises AudioDeviceError naming the one that fails.

    Blocking: call it on a thread. Used between calls to notice a card that is
    missing at start, and to see it come back after a fault.
    """
    for device, pcm_type in ((capture, alsaaudio.PCM_CAPTURE), (playback, alsaaudio.PCM_PLAYBACK)):
        pcm = _open_pcm(device, pcm_type, 48000, 1, 960, 2, probe_only=True)
        pcm.close()
