"""A missing audio card is probed again with backoff: reopen_min_s doubling to reopen_max_s,
and from reopen_min_s again after it came back and went missing once more.

The agent runs on a fake clock; the test sees each wait of its audio watch (the
task the agent names "audio-watch") as the clock is asked for it, and moves time
to the end of that wait. The probes themselves are real: the card is a file PCM
whose definition the test removes from and puts back in the asoundrc.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from call_support import alsa_env, endpoint_config, events, running, until

from edgeagent.clock import FakeClock

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WATCH_TASK = "audio-watch"


class WatchedClock(FakeClock):
    """A FakeClock that records (when, how long) each sleep of the audio watch."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[float, float]] = []
        self._asked = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        if task is not None and task.get_name() == WATCH_TASK:
            self.waits.append((self.monotonic(), seconds))
            self._asked.set()
        await super().sleep(seconds)

    async def next_wait(self, count: int) -> tuple[float, float]:
        """Until the watch has asked for its `count`-th wait; returns it."""
        async with asyncio.timeout(10):
            while len(self.waits) < count:
                self._asked.clear()
                await self._asked.wait()
        return self.waits[count - 1]

    async def to_end_of(self, wait: tuple[float, float]) -> None:
        at, seconds = wait
        assert self.monotonic() <= at + seconds
        await self.advance(at + seconds - self.monotonic())


def touch(conf: Path, bump: int) -> None:
    """alsa-lib rereads its config when the file's mtime (in seconds) changes."""
    later = time.time() + bump
    os.utime(conf, (later, later))


async def test_probes_back_off_from_min_to_max_and_start_again_from_min_after_recovery(
    tmp_path: Path, broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg = endpoint_config(tmp_path, broker.port, "dev-a", alsa)
    text = cfg.read_text()
    text = text.replace('capture_device = "mic_dev-a"', 'capture_device = "mic_card"')
    text = text.replace("reopen_min_s = 0.2", "reopen_min_s = 0.5")
    cfg.write_text(text.replace("reopen_max_s = 1.0", "reopen_max_s = 4.0"))
    clock = WatchedClock()
    async with collector(broker.port, "edge/v1/#") as c, running(cfg, clock=clock) as a:
        # Missing at start: the first probe fails at once, then each failed probe
        # doubles the wait, up to reopen_max_s. Each wait starts when the one before
        # ended: a probe ran (and failed) at that instant.
        for k in range(1, 7):
            await clock.to_end_of(await clock.next_wait(k))
            assert a.health.current().state == "fault"
        assert clock.waits == [
            (0.0, 0.5),
            (0.5, 1.0),
            (1.5, 2.0),
            (3.5, 4.0),
            (7.5, 4.0),
            (11.5, 4.0),
        ]

        # The card is plugged in during the next wait: found at its end, not before.
        wait = await clock.next_wait(7)
        assert wait == (15.5, 4.0)
        alsa.add_mic("mic_card", tmp_path / "mic_dev-a.raw")
        touch(alsa.conf, 2)
        await clock.advance(3.9)
        assert a.health.current().state == "fault"
        await clock.to_end_of(wait)
        await c.wait_for(
            lambda ms: [
                e for e in events(ms, "dev-a") if e["message"] == "audio device available again"
            ]
        )
        assert a.health.current().state == "idle"

        # Unplugged again: a call fails on it, and probing starts over from reopen_min_s.
        alsa.remove_mic("mic_card")
        touch(alsa.conf, 4)
        await a.calls_mgr.dial("dev-b")
        # (Once that call is over: while a call is active the watch skips its probe.)
        await until(lambda: a.health.current().state == "fault" and a.calls_mgr.active is None)
        t = clock.monotonic()
        await clock.to_end_of(await clock.next_wait(8))
        await clock.next_wait(9)
        assert clock.waits[7:] == [(t, 0.5), (t + 0.5, 1.0)]
        assert len(clock.waits) == 9  # no probe while the card was there

        # One error event per stretch without the card, not one per failed probe.
        def device_levels(ms: list[Any]) -> list[str]:
            return [e["level"] for e in events(ms, "dev-a") if e["category"] == "audio.device"]

        levels = await c.wait_for(lambda ms: lv if len(lv := device_levels(ms)) >= 3 else None)
    assert levels == ["error", "info", "error"]
