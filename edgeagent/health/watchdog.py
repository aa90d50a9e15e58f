"""The systemd watchdog: pings from the event loop only while the loop keeps time."""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgeagent.clock import Clock

logger = logging.getLogger(__name__)

# Lag is sampled this many times per ping period, so a stall is seen within a
# fraction of the period instead of hiding inside one long sleep.
_PROBES_PER_PERIOD = 4


class Watchdog:
    """Sends READY/STATUS/STOPPING and WATCHDOG=1 every half of `interval_s` (WatchdogSec).

    Lag is how far a scheduled sleep overshoots. If any probe in a ping period
    overshoots by more than `max_lag_s` (default: the ping period itself), that
    period's ping is skipped: a loop that cannot keep time cannot carry audio,
    and systemd should restart the process rather than believe it alive.
    """

    def __init__(
        self,
        notify: Callable[[str], bool],
        interval_s: float | None,
        clock: Clock,
        *,
        max_lag_s: float | None = None,
    ) -> None:
        self._notify = notify
        self._clock = clock
        self._period_s = interval_s / 2 if interval_s else None
        self._max_lag_s = max_lag_s if max_lag_s is not None else self._period_s
        self.pings = 0
        self.skipped = 0
        self.max_lag_seen_s = 0.0

    @property
    def period_s(self) -> float | None:
        """Seconds between pings, or None when systemd expects none."""
        return self._period_s

    def ready(self) -> bool:
        """Tell systemd start-up is done (READY=1)."""
        return self._notify("READY=1")

    def set_status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self._notify("STATUS=" + " ".join(text.split()))

    def stopping(self) -> bool:
        """Tell systemd a clean stop has begun (STOPPING=1)."""
        return self._notify("STOPPING=1")

    async def run(self) -> None:
        """Ping until cancelled; returns at once when no watchdog is configured."""
        period = self._period_s
        if period is None:
            logger.debug("watchdog: not enabled by systemd")
            return
        max_lag = self._max_lag_s if self._max_lag_s is not None else period
        probe = period / _PROBES_PER_PERIOD
        logger.info("watchdog: pinging every %.2f s, max loop lag %.3f s", period, max_lag)
        self._ping()
        stalled = False
        while True:
            worst = 0.0
            for _ in range(_PROBES_PER_PERIOD):
                start = self._clock.monotonic()
                await self._clock.sleep(probe)
                worst = max(worst, self._clock.monotonic() - start - probe)
            self.max_lag_seen_s = max(self.max_lag_seen_s, worst)
            if worst > max_lag:
                self.skipped += 1
                if not stalled:
                    logger.warning(
                        "watchdog: event loop lagged %.3f s (limit %.3f s); ping skipped",
                        worst,
                        max_lag,
                    )
                else:
                    logger.debug("watchdog: loop still lagging %.3f s; ping skipped", worst)
                stalled = True
                continue
            if stalled:
                logger.info("watchdog: event loop keeping time again; pings resumed")
                stalled = False
            self._ping()

    def _ping(self) -> None:
        self.pings += 1
        if not self._notify("WATCHDOG=1"):
            logger.debug("watchdog: WATCHDOG=1 not delivered (no notify socket)")
