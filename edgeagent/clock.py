"""Time as a collaborator: the real clock, and a fake one that tests advance."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time, wall time and sleeping, passed in rather than fetched."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The clock of the machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when a test calls `advance`; sleepers wake in order."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall0 = start
        self._now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._wall0 + self._now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + max(0.0, seconds), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passed, in order."""
        target = self._now + seconds
        while True:
            await asyncio.sleep(0)  # let woken tasks register their next sleep
            due = sorted(
                (s for s in self._sleepers if s[0] <= target and not s[1].done()),
                key=lambda s: s[0],
            )
            if not due:
                break
            deadline, fut = due[0]
            self._now = max(self._now, deadline)
            self._sleepers.remove((deadline, fut))
            fut.set_result(None)
        self._now = target
        self._sleepers = [s for s in self._sleepers if not s[1].done()]
        await asyncio.sleep(0)
